"""One training step's loss: a pure function of (model, batch, teacher targets, config). No Ray.

Reduction (STYLE.md): `distillation_loss` returns a sum over this rank's counted tokens; we divide once by
the GLOBAL token count N (all ranks together), so every rank's gradient is a piece of the same mean:

    loss_r = world_size * loss_sum_r / N

DDP then *averages* gradients over ranks (divides by world_size), giving

    grad = (1 / world_size) * sum_r world_size * d(loss_sum_r) / N = d(sum_r loss_sum_r) / N,

exactly the gradient of one process on the whole global batch (up to fp32 summation order).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from common.config import LossConfig
from common.losses import SparseTargets, distillation_loss
from common.sparse import sparse_gather
from common.topk import ROLE_STUDENT_BASE

__all__ = [
    "TrainStepError", "STUDENT_BASE_METHODS", "needs_student_base", "add_student_base", "train_step", "lr_factor",
]

# Methods whose loss reads lp_S0 (the student's frozen starting distribution).
STUDENT_BASE_METHODS = ("delta_kd", "delta_anchor", "delta_inverse", "delta_match")


class TrainStepError(RuntimeError):
    """A step cannot be computed (e.g. lp_S0 is needed but neither the record nor a frozen copy has it)."""


def needs_student_base(loss_cfg: LossConfig) -> bool:
    """True when the configured loss uses lp_S0 (a parallelogram counts its non-zero components)."""
    if loss_cfg.method == "parallelogram":
        return any(w != 0 and name in STUDENT_BASE_METHODS for name, w in loss_cfg.weights.items())
    return loss_cfg.method in STUDENT_BASE_METHODS


@torch.no_grad()
def add_student_base(
    base_model: torch.nn.Module, batch: dict[str, torch.Tensor], targets: SparseTargets, chunk_tokens: int
) -> SparseTargets:
    """Score the frozen base copy at the record's support and add it as role `student_base`.

    base_model(input_ids [B,T]) -> logits [B,T,V']; lp_S0 = log_softmax(logits / tau)[ids] -> [B,T,k] fp32,
    tail [B,T] = 1 - sum_S p_S0 (common.sparse.sparse_gather, padded vocabulary rows cut).
    """
    logits = base_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    lp, tail = sparse_gather(logits, targets.ids, tau=targets.tau, vocab_size=targets.vocab_size,
                             chunk_tokens=chunk_tokens)
    return targets.with_role(ROLE_STUDENT_BASE, lp, tail)


def train_step(
    model: torch.nn.Module,
    base_model: torch.nn.Module | None,
    batch: dict[str, torch.Tensor],
    targets: SparseTargets | None,
    loss_cfg: LossConfig,
    pair_alphas: list[float] | None,
    global_tokens: int,
    world_size: int,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward the student and return (loss to call .backward() on, metrics).

    batch: input_ids [B,T] long, attention_mask [B,T], labels [B,T] long (-100 = ignored, already shifted).
    targets: sparse teacher targets for this rank's rows (None for method sft). When the loss needs lp_S0
        and the record lacks `student_base`, `base_model` (the frozen copy) supplies it.
    global_tokens: counted tokens over ALL ranks of this step (> 0); world_size: number of DDP ranks.
    metrics: the loss's per-token means over this rank's tokens, plus `loss_sum` (this rank's unscaled
        sum, float) and `tokens` (this rank's counted tokens, int); the driver combines ranks by tokens.
    """
    if global_tokens <= 0:
        raise TrainStepError(f"global_tokens must be > 0, got {global_tokens} (a batch with no response tokens?)")
    if targets is not None and needs_student_base(loss_cfg) and ROLE_STUDENT_BASE not in targets.logprobs:
        if base_model is None:
            raise TrainStepError(
                f"loss.method={loss_cfg.method!r} needs role {ROLE_STUDENT_BASE!r}: the record lacks it and "
                "this worker holds no frozen base copy (teachers.student_base_source)"
            )
        targets = add_student_base(base_model, batch, targets, loss_cfg.chunk_tokens)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = distillation_loss(logits, targets, batch["labels"], loss_cfg, pair_alphas)
    loss = out.loss_sum * (world_size / global_tokens)
    metrics: dict[str, Any] = dict(out.metrics)
    metrics["loss_sum"] = float(out.loss_sum.detach())
    metrics["tokens"] = int(out.num_tokens)
    return loss, metrics


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Multiplier of the base lr after `step` optimizer steps.

    warmup (step < W): (step + 1) / W; then cosine from 1 down to min_lr_ratio at step = max_steps:
    min + (1 - min) * 0.5 * (1 + cos(pi * (step - W) / (max_steps - W))).
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
