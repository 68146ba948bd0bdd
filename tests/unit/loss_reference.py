"""Naive dense reference for every loss method, written independently of common.losses.

Plain fp64 tensors over the full vocabulary, in *probability* space (the implementation works in log
space on atoms), so a shared mistake is unlikely. Slow and memory-hungry on purpose: tests only.

- `ids=None`: the dense formula over all |V| tokens (what the sparse path must equal at k = |V|).
- `ids` given: the atoms are built from the dense probabilities: the k support tokens plus one tail
  bucket holding the off-support mass (`tail: bucket`), or the support renormalised (`tail: drop`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.config import LossConfig
from common.topk import pair_roles

__all__ = ["reference_loss"]


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """sum p log(p / q) over the last dim, with 0 log 0 = 0."""
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1)


def _normalise(x: Tensor) -> Tensor:
    return x / x.sum(-1, keepdim=True)


def _atoms(probs: Tensor, ids: Tensor | None, tail: str) -> Tensor:
    """Dense probabilities [N, V] -> atom probabilities [N, A]."""
    if ids is None:
        return probs
    on_support = torch.gather(probs, -1, ids)
    if tail == "drop":
        return _normalise(on_support)
    off = torch.ones_like(probs, dtype=torch.bool).scatter(-1, ids, False)
    tail_mass = (probs * off).sum(-1, keepdim=True)
    return torch.cat([on_support, tail_mass], dim=-1)


def _method(name: str, q: Tensor, p: dict[str, Tensor], cfg: LossConfig, alphas: list[float],
            k: int | None) -> Tensor:
    t1 = p.get("sft")
    if name == "kd":
        return _kl(t1, q)
    if name == "rkl":
        return _kl(q, t1)
    if name == "jsd":
        b = cfg.jsd_beta
        m = (1 - b) * t1 + b * q
        return b * _kl(t1, m) + (1 - b) * _kl(q, m)
    s0 = p.get("student_base")
    ratio = torch.ones_like(q)
    for j, a in enumerate(alphas):
        sft, base = pair_roles(j)
        ratio = ratio * (p[sft] / p[base]) ** a
    if name == "delta_kd":
        return _kl(_normalise(s0 * ratio), q)
    if name == "delta_anchor":
        return _kl(t1, _normalise(q * p["base"] / s0))
    if name == "delta_inverse":
        return _kl(s0, _normalise(q / ratio))
    if name == "delta_match":
        n_sup = q.shape[-1] if k is None else k
        d_s = torch.log(q[:, :n_sup]) - torch.log(s0[:, :n_sup])
        d_t = torch.log(ratio[:, :n_sup])
        d_s = d_s - d_s.mean(-1, keepdim=True)
        d_t = d_t - d_t.mean(-1, keepdim=True)
        return ((d_s - d_t) ** 2).mean(-1)
    if name == "parallelogram":
        return sum(w * _method(c, q, p, cfg, alphas, k) for c, w in cfg.weights.items())
    raise ValueError(name)


def reference_loss(
    student_logits: Tensor,
    dense_logprobs: dict[str, Tensor],
    labels: Tensor,
    mask: Tensor,
    cfg: LossConfig,
    pair_alphas: list[float] | None = None,
    ids: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Sum over counted tokens of lam*CE + (1-lam)*tau^2*L_method, and the token count.

    student_logits: [B, T, V'] (cut to V = dense width; cast to fp64 here, so grads reach the input);
    dense_logprobs: role -> [B, T, V] teacher log-probs at temperature tau; labels [B, T]; mask [B, T];
    ids: [B, T, k] support or None for the dense formula.
    """
    v = next(iter(dense_logprobs.values())).shape[-1]
    counted = (labels != -100) & mask
    z = student_logits[..., :v].double()[counted]  # [N, V]
    lab = labels[counted]
    ce = -torch.log_softmax(z, -1).gather(-1, lab[:, None]).squeeze(1)
    if cfg.method == "sft":
        return ce.sum(), int(counted.sum())
    alphas = [cfg.alpha] if pair_alphas is None else pair_alphas
    sup = None if ids is None else ids[counted].long()
    q = _atoms(torch.softmax(z / cfg.tau, -1), sup, cfg.tail)
    p = {r: _atoms(torch.exp(lp.double()[counted]), sup, cfg.tail) for r, lp in dense_logprobs.items()}
    k = None if ids is None else ids.shape[-1]
    dist = _method(cfg.method, q, p, cfg, alphas, k)
    per_token = cfg.lam * ce + (1 - cfg.lam) * cfg.tau**2 * dist
    return per_token.sum(), int(counted.sum())
