"""The `format_shift` preset's build (the first preset; unchanged, bit for bit): a word-level tokenizer
trained on the corpus plus the formatted train split; a Llama base teacher and a smaller Llama student base
pretrained on the prose corpus only (causal LM on packed blocks); the SFT teacher fine-tuned from the base
teacher on the train split (loss on response tokens only).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from common.config import DataConfig, EmbeddedConfig
from common.data.examples import format_prompt
from common.tiny_world.suite import generate_corpus, generate_instruction_suite
from common.tiny_world.training import (
    new_llama,
    packed_blocks,
    role_paths,
    save_built,
    train_causal_lm,
    train_sft_teacher,
    train_tokenizer,
)

__all__ = ["build_format_into"]


def build_format_into(ecfg: EmbeddedConfig, out: Path, progress: bool) -> dict[str, Any]:
    """Build the format_shift models into `out`; returns the marker's info."""
    t0 = time.monotonic()
    out.mkdir(parents=True)
    paths = role_paths(out)
    suite = generate_instruction_suite(ecfg.seed, ecfg.num_train, ecfg.num_val, ecfg.num_test)
    corpus = generate_corpus(ecfg.seed, ecfg.corpus_sentences)
    data_cfg = DataConfig(max_length=ecfg.max_length, overlong="truncate")
    prompts = [format_prompt(e["instruction"], e["context"], data_cfg) for e in suite["train"]]
    tokenizer = train_tokenizer(
        corpus + [p + " " + e["response"] for p, e in zip(prompts, suite["train"])], ecfg.vocab_size,
        paths["tokenizer"],
    )
    max_positions = max(512, ecfg.max_length)

    # Pretraining: random blocks of the packed corpus; the sampler is seeded so the build is reproducible.
    blocks = packed_blocks(corpus, tokenizer, min(ecfg.max_length, 64))
    full_mask = torch.ones_like(blocks[:1], dtype=torch.long)

    def corpus_batches(gen: torch.Generator) -> Any:
        def batch(step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            idx = torch.randint(len(blocks), (ecfg.batch_size,), generator=gen)
            x = blocks[idx]
            labels = torch.cat([x[:, 1:], torch.full_like(x[:, :1], -100)], dim=1)
            return x, full_mask.expand_as(x), labels
        return batch

    info: dict[str, Any] = {"vocab": len(tokenizer)}
    for role, shape, seed in (("base_teacher", ecfg.teacher, ecfg.seed * 1000 + 1),
                              ("student", ecfg.student, ecfg.seed * 1000 + 2)):
        model = new_llama(shape, tokenizer, seed, max_positions)
        gen = torch.Generator().manual_seed(seed)
        info[f"{role}_pretrain_loss"] = train_causal_lm(model, corpus_batches(gen), ecfg.pretrain_steps, ecfg.lr,
                                               f"pretrain {role}", progress)
        info[f"{role}_params"] = save_built(model, tokenizer, paths[role])

    info["sft_teacher_train_loss"] = train_sft_teacher(paths, prompts, suite, tokenizer, data_cfg, ecfg, progress)
    info["build_seconds"] = round(time.monotonic() - t0, 1)
    return info
