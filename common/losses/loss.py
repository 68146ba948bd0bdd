"""`distillation_loss`: every method of DESIGN.md section 1 on the sparse targets + the student's logits.

Per counted token (labels != -100 and targets.mask):

    L_token = lam * CE(softmax(z), label) + (1 - lam) * tau^2 * L_method(atoms)

where z are the student's logits at temperature 1 (CE) and the atoms are built from log_softmax(z / tau)
(see `common.losses.methods` for L_method). `loss_sum` is the sum of L_token over counted tokens; the
caller divides once by the global token count.

Atoms of the student, from lp_S = log_softmax(z / tau) over the full vocabulary (cut to vocab_size):
- `tail: bucket`: [lp_S at the k ids, max(log sum_{v not in S} p_S(v), log 1e-30)]. The off-support
  log-mass is the logsumexp of lp_S with the support filled by -1e30 (finite: k = |V| stays finite).
- `tail: drop`: log_softmax of lp_S at the k ids (renormalised over the support).
Atoms of a teacher role: [lp at ids, log max(tail, 1e-30)] (bucket) or its k values (drop), then
renormalised over the atoms (wire rounding leaves them summing to 1 +- eps; a proper distribution keeps
every KL >= 0). Teacher -inf log-probs become -1e4 (zero mass, finite arithmetic).

Memory: the counted rows are processed `cfg.chunk_tokens` at a time in two fp32 `[chunk, V]` blocks,
allocated once per call: one holds the chunk's logits and then their gradient, the other is scratch for the
logsumexp and the CE softmax. The working set is fixed whatever the number of chunks. The gradient with
respect to the logits is formed analytically from the gradient of the small `[chunk, A]` atom tensor
(autograd on the atoms only) and written straight into one buffer shaped like `student_logits` (its dtype);
nothing of size `[chunk, V]` is kept for backward.
For the bucket atoms a_j = s_{id_j} - lse(s), a_tail = lse_off(s) - lse(s) with s = z / tau:

    dL/ds_v = sum_{j: id_j = v} g_j + g_tail * p_off(v) - G * p(v),   G = sum_j g_j + g_tail

with p = softmax(s), p_off(v) = exp(s_v - lse_off) off the support (0 on it), and g_tail = 0 where the
tail log-mass sits at its floor (the clamp passes no gradient). For drop atoms a = log_softmax(s_S):
dL/ds_S = g - (sum_j g_j) softmax(s_S), 0 elsewhere. Then dL/dz = dL/ds / tau, and CE adds
lam * (softmax(z) - onehot(label)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from common.config import LossConfig
from common.losses.divergences import LOG_TAIL_FLOOR, LOGPROB_FLOOR, safe_log
from common.losses.methods import method_token_loss, required_roles
from common.losses.targets import LossInputError, SparseTargets

__all__ = ["LossOutput", "distillation_loss", "teacher_atoms"]

IGNORE_INDEX = -100
# Fills the support before the off-support logsumexp: finite (unlike -inf), so when k = |V| the
# logsumexp is a finite -1e30 + log|V| (then clamped to the tail floor) and no -inf enters the arithmetic.
_SUPPORT_FILL = -1.0e30


@dataclass
class LossOutput:
    """loss_sum: scalar fp32, sum over counted tokens (grad flows to student_logits);
    num_tokens: counted tokens; metrics: per-token means over counted tokens (0.0 when none)."""

    loss_sum: Tensor
    num_tokens: int
    metrics: dict[str, float] = field(default_factory=dict)


def teacher_atoms(logprobs: Tensor, tail: Tensor, mode: str) -> Tensor:
    """A teacher role's atom log-probs, renormalised over the atoms.

    logprobs: [N, k] at the support, tail: [N] off-support mass. Returns [N, k+1] (bucket) or [N, k] (drop).
    """
    lp = logprobs.clamp(min=LOGPROB_FLOOR)
    if mode == "bucket":
        lp = torch.cat([lp, safe_log(tail)[:, None]], dim=-1)
    return torch.log_softmax(lp, dim=-1)


class _PrecomputedGrad(torch.autograd.Function):
    """Connects `value` to `logits` with a gradient already computed in the forward pass."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, value: Tensor, grad: Tensor) -> Tensor:
        ctx.grad = grad
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor, None, None]:
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("distillation_loss: backward ran twice through one LossOutput.loss_sum; "
                               "its gradient buffer is scaled in place, compute the loss again instead")
        ctx.grad = None  # scaled in place (no second [B, T, V] buffer); a second backward would be wrong
        return grad.mul_(grad_out.to(grad.dtype)), None, None


def _logsumexp(x: Tensor, tmp: Tensor) -> Tensor:
    """logsumexp over the last dim of x [n, V] (finite rows), using tmp [n, V] as its only temporary."""
    m = x.amax(dim=-1, keepdim=True)
    return torch.sub(x, m, out=tmp).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))


def _student_atoms(x: Tensor, ids: Tensor, mode: str, tmp: Tensor,
                   lse: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """x: [n, V] fp32 scaled logits s = z / tau (restored on return); tmp: a [n, V] scratch block; lse:
    logsumexp(s) when the caller has it (tau = 1: the CE's). Returns atoms and what the gradient needs."""
    if lse is None:
        lse = _logsumexp(x, tmp)
    s_sup = x.gather(-1, ids)
    if mode == "drop":
        return torch.log_softmax(s_sup, dim=-1), {"lse": lse, "s_sup": s_sup}
    x.scatter_(-1, ids, _SUPPORT_FILL)
    lse_off = _logsumexp(x, tmp)
    x.scatter_(-1, ids, s_sup)  # restore: exact, these are the values gathered above
    raw_tail = lse_off - lse
    unclamped = raw_tail > LOG_TAIL_FLOOR
    atoms = torch.cat([s_sup - lse[:, None], raw_tail.clamp(min=LOG_TAIL_FLOOR)[:, None]], dim=-1)
    return atoms, {"lse": lse, "s_sup": s_sup, "lse_off": lse_off, "unclamped": unclamped}


def _distill_grad_into(x: Tensor, ids: Tensor, g: Tensor, mode: str, saved: dict[str, Tensor]) -> None:
    """Overwrite x ([n, V] scaled logits s) with dL/ds given g = dL/d atoms ([n, A])."""
    k = ids.shape[1]
    if mode == "drop":
        q = torch.softmax(saved["s_sup"], dim=-1)
        x.zero_()
        x.scatter_add_(-1, ids, g - g.sum(-1, keepdim=True) * q)
        return
    lse, lse_off, unclamped = saved["lse"], saved["lse_off"], saved["unclamped"]
    g_sup = g[:, :k]
    g_tail = torch.where(unclamped, g[:, k], torch.zeros_like(g[:, k]))
    big_g = g_sup.sum(-1) + g_tail
    # p_off(v) = p(v) * exp(lse - lse_off); where clamped g_tail = 0 and the exponent (huge) is not used.
    c = g_tail * torch.exp(torch.where(unclamped, lse - lse_off, torch.zeros_like(lse)))
    p_sup = torch.exp(saved["s_sup"] - lse[:, None])
    x.sub_(lse[:, None]).exp_().mul_((c - big_g)[:, None])  # off-support: p * (g_tail*exp(..) - G)
    x.scatter_(-1, ids, p_sup * (-big_g)[:, None])
    x.scatter_add_(-1, ids, g_sup)


def _rows_fp32(flat: Tensor, rows: Tensor, out: Tensor) -> Tensor:
    """flat[rows] as fp32, written into `out` ([len(rows), V] fp32) and returned."""
    if flat.dtype == torch.float32:
        return torch.index_select(flat, 0, rows, out=out)
    return out.copy_(flat.index_select(0, rows))


def _check_inputs(student_logits: Tensor, targets: SparseTargets | None, labels: Tensor,
                  cfg: LossConfig) -> int:
    if student_logits.ndim != 3:
        raise LossInputError(f"student_logits must be [B, T, V], got shape {tuple(student_logits.shape)}")
    b, t, v_pad = student_logits.shape
    if tuple(labels.shape) != (b, t):
        raise LossInputError(f"labels shape {tuple(labels.shape)} != student_logits [B, T] {(b, t)}")
    if targets is None:
        if cfg.method != "sft":
            raise LossInputError(f"loss method {cfg.method!r} needs teacher targets, got None")
        return int(v_pad)
    bid = targets.batch_id
    if tuple(targets.ids.shape[:2]) != (b, t):
        raise LossInputError(f"batch {bid}: targets ids {tuple(targets.ids.shape)} and student_logits "
                             f"{tuple(student_logits.shape)} disagree on [B, T]")
    if v_pad < targets.vocab_size:
        raise LossInputError(f"batch {bid}: student_logits have {v_pad} vocabulary rows < the "
                             f"tokenizer's vocab_size {targets.vocab_size}")
    if not 0 < targets.shape[2] <= targets.vocab_size:
        raise LossInputError(f"batch {bid}: k={targets.shape[2]} out of range (1..{targets.vocab_size})")
    if abs(targets.tau - cfg.tau) > 1e-6 * max(1.0, cfg.tau):
        raise LossInputError(f"batch {bid}: targets were made at tau={targets.tau}, loss.tau={cfg.tau}")
    return int(targets.vocab_size)


def distillation_loss(
    student_logits: Tensor,
    targets: SparseTargets | None,
    labels: Tensor,
    cfg: LossConfig,
    pair_alphas: list[float] | None = None,
) -> LossOutput:
    """The configured loss for one batch (formulas in this module's and `methods`' docstrings).

    student_logits: [B, T, V'] any float dtype, V' >= vocab_size (rows beyond vocab_size are cut);
    targets: SparseTargets ([B, T, k]) or None for method `sft`; labels: [B, T] long, -100 = ignored;
    pair_alphas: alpha_j per teacher pair (default [cfg.alpha]).
    Returns LossOutput(loss_sum scalar fp32, num_tokens, metrics per-token means).
    """
    vocab = _check_inputs(student_logits, targets, labels, cfg)
    b, t, v_pad = student_logits.shape
    device = student_logits.device
    alphas = [float(cfg.alpha)] if pair_alphas is None else [float(a) for a in pair_alphas]
    counted = labels != IGNORE_INDEX
    roles: list[str] = []
    if targets is not None and cfg.method != "sft":
        roles = required_roles(cfg, len(alphas))
        targets.require(roles, cfg.method)
        counted = counted & targets.mask.to(device)
    rows = counted.reshape(-1).nonzero().squeeze(1)
    flat_labels = labels.reshape(-1)[rows]
    n = int(rows.numel())
    if n and (int(flat_labels.min()) < 0 or int(flat_labels.max()) >= vocab):
        bid = None if targets is None else targets.batch_id
        raise LossInputError(f"batch {bid}: labels out of range [0, {vocab}): min {int(flat_labels.min())}, "
                             f"max {int(flat_labels.max())}")

    # metric keys are fixed up front so an all-masked batch reports the same keys (as 0.0)
    keys = ["ce"]
    if cfg.method != "sft":
        keys += ["distill", "target_entropy"]
        keys += [f"loss_{c}" for c in sorted(cfg.weights)] if cfg.method == "parallelogram" else []
        keys += [f"topk_mass_{r}" for r in (targets.roles if targets is not None else [])]
    else:
        keys += ["distill"]
    sums = torch.zeros(len(keys), dtype=torch.float64, device=device)
    total = torch.zeros((), dtype=torch.float64, device=device)

    need_grad = torch.is_grad_enabled() and student_logits.requires_grad
    flat = student_logits.detach().reshape(b * t, v_pad)[:, :vocab]
    grad_buf = torch.zeros((b * t, v_pad), dtype=student_logits.dtype, device=device) if need_grad else None
    lam, tau = float(cfg.lam), float(cfg.tau)
    k = 0 if targets is None else targets.shape[2]
    lp_flat = {} if targets is None else {r: targets.logprobs[r].reshape(b * t, k) for r in targets.roles}
    tail_flat = {} if targets is None else {r: targets.tail[r].reshape(b * t) for r in targets.roles}
    ids_flat = None if targets is None else targets.ids.reshape(b * t, k).to(device)

    # Two fp32 [chunk, V] blocks, allocated once and refilled per chunk: `work` holds the chunk's logits (then
    # its gradient), `scratch` the logsumexp temporaries and the CE softmax. Fresh blocks per chunk (and
    # torch.logsumexp's own temporaries) made the CPU allocator's peak drift by several blocks between runs.
    width = min(cfg.chunk_tokens, n)
    work = torch.empty((width, vocab), dtype=torch.float32, device=device) if n else None
    scratch = torch.empty_like(work) if work is not None else None
    for start in range(0, n, cfg.chunk_tokens):
        r = rows[start : start + cfg.chunk_tokens]
        lab = flat_labels[start : start + cfg.chunk_tokens][:, None]
        assert work is not None and scratch is not None
        x = _rows_fp32(flat, r, work[: r.numel()])  # the chunk's fp32 [n, V] block (a copy)
        tmp = scratch[: r.numel()]
        lse1 = _logsumexp(x, tmp)
        ce = lse1 - x.gather(-1, lab).squeeze(1)
        chunk_sums: dict[str, Tensor] = {"ce": ce.sum()}
        if cfg.method == "sft":
            token_loss = ce
            chunk_sums["distill"] = torch.zeros((), device=device)
            if grad_buf is not None:
                x.sub_(lse1[:, None]).exp_().scatter_add_(-1, lab, torch.full_like(ce[:, None], -1.0))
        else:
            assert targets is not None and ids_flat is not None
            ids = ids_flat.index_select(0, r.to(ids_flat.device))
            if tau != 1.0:
                x.div_(tau)
            s_atoms, saved = _student_atoms(x, ids, cfg.tail, tmp, lse1 if tau == 1.0 else None)
            atoms = {role: teacher_atoms(lp_flat[role][r], tail_flat[role][r], cfg.tail) for role in roles}
            a = s_atoms.detach().requires_grad_(grad_buf is not None)
            with torch.enable_grad():
                dist, comps, ent = method_token_loss(a, atoms, cfg, alphas, k)
                (g,) = torch.autograd.grad(dist.sum(), a) if grad_buf is not None else (None,)
            dist = dist.detach()
            token_loss = lam * ce + (1.0 - lam) * tau * tau * dist
            chunk_sums["distill"] = dist.sum()
            chunk_sums["target_entropy"] = ent.sum()
            for name, comp in comps.items():
                chunk_sums[f"loss_{name}"] = comp.detach().sum()
            for role in targets.roles:
                chunk_sums[f"topk_mass_{role}"] = lp_flat[role][r].exp().sum()
            if grad_buf is not None and g is not None:
                _distill_grad_into(x, ids, g, cfg.tail, saved)
                x.mul_((1.0 - lam) * tau)  # (1 - lam) tau^2 * dL/ds * ds/dz, ds/dz = 1 / tau
                if lam > 0.0:
                    soft = _rows_fp32(flat, r, tmp)
                    x.add_(soft.sub_(lse1[:, None]).exp_().mul_(lam))
                    x.scatter_add_(-1, lab, torch.full_like(ce[:, None], -lam))
        total += token_loss.sum().double()
        sums += torch.stack([chunk_sums[key].double() for key in keys])
        if grad_buf is not None:
            grad_buf[:, :vocab].index_copy_(0, r, x.to(grad_buf.dtype))
        del x

    means = (sums / max(n, 1)).tolist()
    metrics = {key: float(v) for key, v in zip(keys, means)}
    value = total.float()
    if grad_buf is None:
        return LossOutput(value, n, metrics)
    loss_sum = _PrecomputedGrad.apply(student_logits, value, grad_buf.view(b, t, v_pad))
    return LossOutput(loss_sum, n, metrics)
