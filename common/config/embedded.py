"""How the embedded default builds its tiny models (`embedded:`; common/tiny_world/)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from .base import Strict

__all__ = ["EmbeddedModelShape", "EMBEDDED_PRESET_DEFAULTS", "EmbeddedConfig"]


class EmbeddedModelShape(Strict):
    hidden_size: int = Field(default=64, gt=0)
    num_layers: int = Field(default=2, gt=0)
    num_heads: int = Field(default=4, gt=0)
    intermediate_size: int = Field(default=128, gt=0)


# Field defaults per embedded preset that differ from the schema's (which are format_shift's). A key absent
# from the config takes its preset's default; a key given explicitly wins.
EMBEDDED_PRESET_DEFAULTS: dict[str, dict[str, Any]] = {
    "format_shift": {},
    "style_shift": {"num_val": 200, "num_test": 1000, "pretrain_steps": 800, "sft_steps": 300},
}


class EmbeddedConfig(Strict):
    """How the embedded default builds its tiny models (only used by `embedded:` model paths).

    `preset` picks the world the models are built in (docs/EXPERIMENT.md says why each exists):
    - format_shift: bases pretrained on prose only; SFT teaches the prompt format and the tasks.
    - style_shift: bases pretrained on prose mixed with instruction-formatted examples answered tersely
      (`teacher_instruct_fraction` / `student_instruct_fraction` of their documents); SFT teaches a
      sentence answer style; the student base reads its own draw of the prose.
    Keys a preset does not use are ignored by its build (and left out of its cache key).
    """

    preset: Literal["format_shift", "style_shift"] = "format_shift"
    seed: int = 0
    vocab_size: int = Field(default=512, gt=16)
    num_train: int = Field(default=2000, gt=0)
    num_val: int = Field(default=100, gt=0)
    num_test: int = Field(default=100, gt=0)
    # format_shift: more test examples drawn after the train split (the build does not change).
    num_test_extra: int = Field(default=0, ge=0)
    # style_shift: the pool of instruction examples the bases' pretraining draws from, and the fraction of
    # each base's pretraining documents that are instruction-formatted (the rest is prose).
    num_pretrain: int = Field(default=2000, ge=0)
    teacher_instruct_fraction: float = Field(default=0.30, ge=0, lt=1)
    student_instruct_fraction: float = Field(default=0.15, ge=0, lt=1)
    corpus_sentences: int = Field(default=4000, gt=0)
    teacher: EmbeddedModelShape = Field(
        default_factory=lambda: EmbeddedModelShape(hidden_size=128, num_layers=4, num_heads=4, intermediate_size=256)
    )
    student: EmbeddedModelShape = Field(default_factory=EmbeddedModelShape)
    # Measured on the shared 2-core machine (build_threads=1): the default build takes ~85 s; the SFT
    # teacher scores ROUGE-L ~0.65 on the test split with greedy decoding, the student base ~0.005.
    pretrain_steps: int = Field(default=400, gt=0)
    sft_steps: int = Field(default=1000, gt=0)
    batch_size: int = Field(default=16, gt=0)
    lr: float = Field(default=2e-3, gt=0)
    max_length: int = Field(default=128, gt=8)
    # The SFT teacher: a full fine-tune of the base teacher, or a LoRA adapter of it (the teacher service then
    # serves base and SFT from one copy of the base weights: docs/TEACHER_SERVICE.md, "A LoRA teacher pair").
    # LoRA: rank and alpha of the adapter on every linear layer of the blocks (q, k, v, o, gate, up, down; the
    # LM head stays the base's), trained with its own learning rate (adapters take a larger one than a full
    # fine-tune). The lora_* keys are only read (and only in the build's cache key) with sft_teacher: lora.
    sft_teacher: Literal["full", "lora"] = "full"
    lora_rank: int = Field(default=8, gt=0)
    lora_alpha: float = Field(default=16.0, gt=0)
    lora_lr: float = Field(default=1e-2, gt=0)
    cache_dir: str | None = None  # default: $DELTAKD_CACHE or ~/.cache/deltakd
    # torch intra-op threads during the build (restored after); None keeps the caller's. Not in the cache key.
    build_threads: int | None = Field(default=1, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _preset_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            preset = data.get("preset", "format_shift")
            defaults = EMBEDDED_PRESET_DEFAULTS.get(preset, {})
            data = {**defaults, **data}
        return data
