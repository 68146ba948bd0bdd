"""One training step's loss: a pure function of (model, batch, teacher targets, config). No Ray.

The fused path (default): the student module is `HiddenStatesLM(causal_lm)`, whose forward runs the
backbone only and returns the last hidden states [B, T, H]; the loss applies the LM head to the counted
rows chunk by chunk (`common.losses`), so no [B, T, V] logits exist. DDP wraps that module, so the
forward DDP sees is the one the loss uses, and the head's weight (a parameter of the wrapped model) gets
its gradient, synced like every other, through the loss's backward. The frozen student base is run the
same way (backbone only, no grad) and scored at the counted rows and the support only.

The logits path: when the module given is the causal LM itself (`loss.fused: off`, a model whose logits
the head alone cannot reproduce under `loss.fused: auto`, tests): its forward returns [B, T, V'] logits.

Reduction (docs/STYLE.md): `distillation_loss` returns a sum over the rank's counted tokens; we divide once by
the GLOBAL token count N (all ranks together), so every rank's gradient is a piece of the same mean:

    loss_r = world_size * loss_sum_r / N

DDP then *averages* gradients over ranks (divides by world_size), giving

    grad = (1 / world_size) * sum_r world_size * d(loss_sum_r) / N = d(sum_r loss_sum_r) / N,

exactly the gradient of one process on the whole global batch (up to fp32 summation order).
"""

from __future__ import annotations

import logging
import math
import sys
from typing import Any

import torch

from common.config import LossConfig
from common.losses import HiddenStates, SparseTargets, StudentInput, distillation_loss, support_logprobs
from common.roles import needs_student_base
from common.topk import ROLE_STUDENT_BASE

__all__ = [
    "TrainStepError", "HiddenStatesLM", "fused_head_problem", "loss_forward_module",
    "enable_gradient_checkpointing", "model_output", "add_student_base", "train_step",
    "lr_factor",
]

log = logging.getLogger(__name__)

# Methods whose loss reads lp_S0 (the student's frozen starting distribution).
# Config keys by which Hugging Face models post-process logits after the LM head (softcapping, scaling):
# the fused loss applies the head alone, so for these it would compute another distribution.
_LOGIT_POSTPROCESSING_KEYS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier",
                              "lm_head_multiplier")


class TrainStepError(RuntimeError):
    """A step cannot be computed (e.g. lp_S0 is needed but neither the record nor a frozen copy has it)."""


class HiddenStatesLM(torch.nn.Module):
    """A Hugging Face causal LM run without its LM head: forward(input_ids, attention_mask) -> the last
    hidden states [B, T, H] (after the final norm; `lm.base_model`'s `last_hidden_state`). `head()` gives
    the head's (weight [V', H], bias [V'] | None). Holds `lm` as a submodule: same parameters."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = self.lm.base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.last_hidden_state

    def head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        head = self.lm.get_output_embeddings()
        return head.weight, head.bias


def fused_head_problem(lm: torch.nn.Module) -> str | None:
    """Why the fused loss cannot reproduce `lm`'s logits, or None when it can.

    Checks that the output embedding is a linear layer, that no known logit post-processing key is set in
    the config, and, on a 4-token probe, that lm_head(last hidden state) equals the model's own logits.
    """
    get_head = getattr(lm, "get_output_embeddings", None)
    head = get_head() if get_head is not None else None
    if not isinstance(head, torch.nn.Linear) or not hasattr(lm, "base_model") or lm.base_model is lm:
        return "it has no separate backbone and linear LM head (base_model / get_output_embeddings())"
    config = getattr(lm, "config", None)
    text = config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config
    for key in _LOGIT_POSTPROCESSING_KEYS:
        value = getattr(text, key, None)
        if value not in (None, False, 0, 1, 0.0, 1.0):
            return f"config.{key} = {value!r} post-processes its logits after the LM head"
    device = head.weight.device
    ids = (torch.arange(4, device=device) % head.weight.shape[0])[None, :]
    was_training = lm.training
    lm.eval()
    try:
        with torch.no_grad():
            own = lm(input_ids=ids).logits.float()
            ours = head(HiddenStatesLM(lm)(ids, torch.ones_like(ids))).float()
    finally:
        lm.train(was_training)
    tol = 1e-4 * max(1.0, float(own.abs().max()))
    if own.shape != ours.shape or not torch.allclose(own, ours, rtol=1e-4, atol=tol):
        diff = float((own - ours).abs().max()) if own.shape == ours.shape else float("nan")
        return f"its logits differ from lm_head(last hidden state) on a probe (max |diff| {diff:.3g})"
    return None


def loss_forward_module(lm: torch.nn.Module, loss_cfg: LossConfig, name: str) -> torch.nn.Module:
    """The module whose forward the step runs: HiddenStatesLM(lm) for the fused loss, or lm itself.

    loss.fused: off -> lm; on -> HiddenStatesLM, or TrainStepError naming the model and the key when the
    head alone cannot reproduce its logits; auto -> HiddenStatesLM when it can, else lm (logged).
    """
    if loss_cfg.fused == "off":
        return lm
    problem = fused_head_problem(lm)
    if problem is None:
        return HiddenStatesLM(lm)
    if loss_cfg.fused == "on":
        raise TrainStepError(f"model {name}: {problem}; the fused loss (loss.fused: on) would train on other "
                             "logits than the model's: set loss.fused to 'auto' or 'off'")
    log.warning("model %s: %s; the loss takes its full [B, T, V] logits instead (loss.fused: auto)", name, problem)
    return lm


def enable_gradient_checkpointing(lm: torch.nn.Module) -> None:
    """Recompute each decoder layer in backward (non-reentrant checkpoints, which DDP supports)."""
    kwargs = {"use_reentrant": False}
    if hasattr(lm, "activation_checkpointing_enable"):  # transformers >= 5.x
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def is_dtensor(x: Any) -> bool:
    """isinstance(x, DTensor) without importing torch.distributed.tensor: that import costs ~0.5 s of CPU (sympy
    among it, measured with -X importtime) in every rank of every run, and no DTensor can exist before it ran."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(x, module.DTensor)


def model_output(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> StudentInput:
    """Run `model` (HiddenStatesLM or a causal LM, optionally inside DDP) on the batch: HiddenStates for
    the fused path, else the logits [B, T, V']."""
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    if isinstance(inner, HiddenStatesLM):
        hidden = model(batch["input_ids"], batch["attention_mask"])
        weight, bias = inner.head()
        if is_dtensor(weight):  # fsdp2 (student_worker/sharding.py): the root unit must still be gathered
            raise TrainStepError("the LM head is still sharded after the forward (its FSDP2 unit resharded): the "
                                 "fused loss needs the gathered weight, whose gradient FSDP reduce-scatters")
        return HiddenStates(hidden, weight, bias)
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@torch.no_grad()
def add_student_base(
    base_model: torch.nn.Module, batch: dict[str, torch.Tensor], targets: SparseTargets, chunk_tokens: int
) -> SparseTargets:
    """Score the frozen base copy at the targets' rows and support and add it as role `student_base`.

    base_model: HiddenStatesLM or a causal LM; lp_S0 = log_softmax(logits / tau) at ids -> [N, K] fp32,
    tail [N] = 1 - sum_S p_S0 (padded vocabulary rows cut), never more than [chunk_tokens, V] logits.
    """
    out = model_output(base_model, batch)
    lp, tail = support_logprobs(out, targets.rows, targets.ids, targets.tau, targets.vocab_size, chunk_tokens)
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

    model: HiddenStatesLM (fused) or a causal LM (logits), possibly wrapped in DDP; base_model: the
        frozen copy likewise (no grad), used when the loss needs lp_S0 and the targets lack it.
    batch: input_ids [B,T] long, attention_mask [B,T], labels [B,T] long (-100 = ignored, already shifted).
    targets: sparse teacher targets for this rank's counted rows (None for method sft).
    global_tokens: counted tokens over ALL ranks of this step (> 0); world_size: number of DDP ranks.
    metrics: the loss's per-token means over this rank's tokens, plus `loss_sum` (this rank's unscaled
        sum, float) and `tokens` (this rank's counted tokens, int); the driver combines ranks by tokens.
    """
    if global_tokens <= 0:
        raise TrainStepError(f"global_tokens must be > 0, got {global_tokens} (a batch with no response tokens?)")
    base_out: StudentInput | None = None
    if targets is not None and needs_student_base(loss_cfg) and ROLE_STUDENT_BASE not in targets.logprobs:
        if base_model is None:
            raise TrainStepError(
                f"loss.method={loss_cfg.method!r} needs role {ROLE_STUDENT_BASE!r}: the record lacks it and "
                "this worker holds no frozen base copy (teachers.student_base_source)"
            )
        with torch.no_grad():
            base_out = model_output(base_model, batch)
    student = model_output(model, batch)
    out = distillation_loss(student, targets, batch["labels"], loss_cfg, pair_alphas, student_base=base_out)
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
