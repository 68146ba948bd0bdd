"""The training objective (`loss:`); common.losses has each method's formula as implemented."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from .base import (
    DELTA_FORM_METHODS,
    LOSS_METHODS,
    OBJECTIVE_METHODS,
    PAIR_SHIFT_METHODS,
    STUDENT_BASE_TAIL_METHODS,
    LossMethod,
    Strict,
    did_you_mean,
)

__all__ = ["LossConfig"]


class LossConfig(Strict):
    """The training objective. See common.losses for each method's formula as implemented."""

    method: LossMethod = "delta_kd"
    # paper: target = softmax(T1 + alpha * (S0 - T0)), alpha = 0 is kd, 1 the full shift softmax(S0 + T1 - T0);
    # student_shift: target = softmax(S0 + alpha * (T1 - T0)) (the project's first form; alpha = 0 is S0).
    # The same at alpha = 1. The paper form is from a secondary transcription (docs/LOSSES.md).
    delta_form: Literal["paper", "student_shift"] = "paper"
    alpha: float = 1.0  # delta_form's alpha (see above); extra pairs carry their own under student_shift
    tau: float = Field(default=1.0, gt=0)  # distillation temperature; the KD part is scaled by tau^2
    lam: float = Field(default=0.0, ge=0, le=1)  # L = lam * CE + (1 - lam) * tau^2 * L_distill
    # jsd: GKD / TRL's generalised JSD, M = beta*T + (1-beta)*S; beta = 0 is forward KL(T||S), 1 is reverse KL
    jsd_beta: float = Field(default=0.5, ge=0, le=1)
    # Off-support mass: one bucket per role, dropped (support renormalised), or (delta_kd, delta_inverse) the
    # student base's own full row moved by the tail bucket's shift (needs teachers.student_base_source: worker)
    tail: Literal["bucket", "drop", "student_base"] = "bucket"
    # kd / delta_kd only: forward KL to the target, reverse KL, or the sampled-token policy-gradient form
    # (the label must be in the support: records built with the label forced in, as on-policy batches are)
    objective: Literal["forward_kl", "reverse_kl", "sampled_token"] = "forward_kl"
    k: int = Field(default=64, gt=0)  # support size chosen by the SFT teacher
    # parallelogram: weights of the component losses (names from LOSS_METHODS except sft/parallelogram)
    weights: dict[str, float] = Field(default_factory=lambda: {"delta_kd": 0.5, "kd": 0.5})
    # Counted rows per chunk of the student loss (fp32 [chunk, V] blocks; was loss.chunk_tokens).
    loss_chunk_rows: int = Field(default=256, gt=0)
    # The student's loss from its last hidden states + LM head, chunk by chunk (no [B, T, V] logits): auto =
    # on unless the model post-processes its logits (e.g. softcapping; then the logits path, logged), on =
    # an error for such a model, off = always the logits path.
    fused: Literal["auto", "on", "off"] = "auto"

    @field_validator("weights")
    @classmethod
    def _known_components(cls, v: dict[str, float]) -> dict[str, float]:
        allowed = [m for m in LOSS_METHODS if m not in ("sft", "parallelogram")]
        for name in v:
            if name not in allowed:
                raise ValueError(f"unknown parallelogram component {name!r}{did_you_mean(name, allowed)}")
        return v

    @model_validator(mode="after")
    def _compatible(self) -> LossConfig:
        if self.objective != "forward_kl" and self.method not in OBJECTIVE_METHODS:
            raise ValueError(f"loss.objective={self.objective!r} applies to loss.method in {OBJECTIVE_METHODS}, "
                             f"not {self.method!r}")
        if self.tail == "student_base" and self.method not in STUDENT_BASE_TAIL_METHODS:
            raise ValueError(f"loss.tail='student_base' applies to loss.method in {STUDENT_BASE_TAIL_METHODS} "
                             f"(the methods whose target is built on the student base), not {self.method!r}")
        if self.tail == "student_base" and self.method == "delta_inverse" and self.objective != "forward_kl":
            raise ValueError("loss.tail='student_base' with loss.method='delta_inverse' has no loss.objective "
                             f"other than 'forward_kl' (got {self.objective!r})")
        return self

    @property
    def components(self) -> list[str]:
        """The methods this loss computes: the parallelogram's weighted components, else the method."""
        return sorted(self.weights) if self.method == "parallelogram" else [str(self.method)]

    @property
    def reads_pair_shift(self) -> bool:
        """True when a component reads every teacher pair's shift (models.extra_pairs enter the loss)."""
        return any(c in PAIR_SHIFT_METHODS for c in self.components)

    @property
    def delta_form_matters(self) -> bool:
        """True when loss.delta_form changes this loss (with one teacher pair): a Delta method and alpha != 1."""
        return self.alpha != 1.0 and any(c in DELTA_FORM_METHODS for c in self.components)
