"""Naive dense reference for every loss method, written independently of common.losses.

Plain fp64 tensors over the full vocabulary, in *probability* space (the implementation works in log
space on atoms), so a shared mistake is unlikely. Slow and memory-hungry on purpose: tests only.

- `ids=None`: the dense formula over all |V| tokens (what the sparse path must equal at k = |V|).
- `ids` given ([N, K], one row per counted position in row-major order): the atoms are built from the
  dense probabilities: the K support tokens plus one tail bucket holding the off-support mass
  (`tail: bucket`), or the support renormalised (`tail: drop`).
- `tail: student_base` (ids given): the target over the whole vocabulary, S0(v) times the move's ratio
  on the support, or the ratio of the tail buckets off it, normalised.
- `loss.delta_form`: `student_shift` target S0 * prod_j (T1_j / T0_j)^alpha_j; `paper` target
  T1 * (S0 / T0)^alpha (one pair). The move's ratio P / S0 replaces the teachers' ratio in delta_inverse,
  delta_match and the student-base tail; paper delta_anchor is KL(T1 || S * (T0 / S0)^alpha).
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.config import LossConfig
from common.topk import pair_roles

__all__ = ["reference_loss", "trl_generalized_jsd"]


def _kl(p: Tensor, q: Tensor) -> Tensor:
    """sum p log(p / q) over the last dim, with 0 log 0 = 0."""
    terms = torch.where(p > 0, p * (torch.log(p) - torch.log(q)), torch.zeros_like(p))
    return terms.sum(-1)


def _normalise(x: Tensor) -> Tensor:
    return x / x.sum(-1, keepdim=True)


def trl_generalized_jsd(student_logits: Tensor, teacher_logits: Tensor, beta: float) -> Tensor:
    """TRL's `GKDTrainer.generalized_jsd_loss` formula, per token ([N, V] logits -> [N]), re-derived here:

    beta = 0: KL(teacher || student); beta = 1: KL(student || teacher); else with
    M = beta * teacher + (1 - beta) * student: beta * KL(teacher || M) + (1 - beta) * KL(student || M).
    """
    s = torch.softmax(student_logits.double(), -1)
    t = torch.softmax(teacher_logits.double(), -1)
    if beta == 0:
        return _kl(t, s)
    if beta == 1:
        return _kl(s, t)
    m = beta * t + (1 - beta) * s
    return beta * _kl(t, m) + (1 - beta) * _kl(s, m)


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


def _ratio(p: dict[str, Tensor], alphas: list[float], form: str = "student_shift") -> Tensor:
    """The move's ratio P / S0 (unnormalised): prod_j (T1_j / T0_j)^alpha_j, or T1 (S0 / T0)^alpha / S0."""
    if form == "paper":
        assert len(alphas) == 1
        return p["sft"] * (p["student_base"] / p["base"]) ** alphas[0] / p["student_base"]
    ratio = torch.ones_like(next(iter(p.values())))
    for j, a in enumerate(alphas):
        sft, base = pair_roles(j)
        ratio = ratio * (p[sft] / p[base]) ** a
    return ratio


def _objective(cfg: LossConfig, target: Tensor, q: Tensor, y: Tensor | None) -> Tensor:
    """forward KL, reverse KL or the sampled-token loss of q against the (constant) target."""
    if cfg.objective == "forward_kl":
        return _kl(target, q)
    if cfg.objective == "reverse_kl":
        return _kl(q, target)
    assert y is not None
    lq = torch.log(q.gather(-1, y[:, None]).squeeze(1))
    adv = (torch.log(target.gather(-1, y[:, None]).squeeze(1)) - lq).detach()
    return -adv * lq


def _method(name: str, q: Tensor, p: dict[str, Tensor], cfg: LossConfig, alphas: list[float],
            k: int | None, y: Tensor | None) -> Tensor:
    t1 = p.get("sft")
    if name == "kd":
        return _objective(cfg, t1.detach(), q, y)
    if name == "rkl":
        return _kl(q, t1)
    if name == "jsd":
        b = cfg.jsd_beta
        if b == 0:
            return _kl(t1, q)
        if b == 1:
            return _kl(q, t1)
        m = b * t1 + (1 - b) * q
        return b * _kl(t1, m) + (1 - b) * _kl(q, m)
    s0 = p.get("student_base")
    ratio = _ratio(p, alphas, cfg.delta_form)
    if name == "delta_kd":
        if cfg.delta_form == "paper":  # written from the paper's pi* = T1 (S0 / T0)^alpha / Z
            return _objective(cfg, _normalise(t1 * (s0 / p["base"]) ** alphas[0]).detach(), q, y)
        return _objective(cfg, _normalise(s0 * ratio).detach(), q, y)
    if name == "delta_anchor":
        if cfg.delta_form == "paper":
            return _kl(t1, _normalise(q * (p["base"] / s0) ** alphas[0]))
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
        return sum(w * _method(c, q, p, cfg, alphas, k, y) for c, w in cfg.weights.items())
    raise ValueError(name)


def _student_base_tail(q: Tensor, dense: dict[str, Tensor], sup: Tensor, cfg: LossConfig, alphas: list[float],
                       y: Tensor) -> Tensor:
    """tail: student_base over the whole vocabulary: the teachers' ratio on the support ids, and the ratio
    of their tail masses everywhere else, applied to the dense S0."""
    s0 = dense["student_base"]
    atoms = {r: _atoms(pr, sup, "bucket") for r, pr in dense.items()}
    atom_ratio = _ratio(atoms, alphas, cfg.delta_form)  # [N, K+1]
    k = sup.shape[1]
    ratio = atom_ratio[:, k:].expand_as(s0).clone()
    ratio.scatter_(-1, sup, atom_ratio[:, :k])
    if cfg.method == "delta_inverse":
        return _kl(s0, _normalise(q / ratio))
    target = _normalise(s0 * ratio).detach()
    return _objective(cfg, target, q, y)


def reference_loss(
    student_logits: Tensor,
    dense_logprobs: dict[str, Tensor],
    labels: Tensor,
    cfg: LossConfig,
    pair_alphas: list[float] | None = None,
    ids: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Sum over counted positions (labels != -100) of lam*CE + (1-lam)*tau^2*L_method, and their count.

    student_logits: [B, T, V'] (cut to V = dense width; cast to fp64 here, so grads reach the input);
    dense_logprobs: role -> [B, T, V] log-probs at temperature tau; labels [B, T]; ids: [N, K] support
    of the counted positions (row-major) or None for the dense formula.
    """
    v = next(iter(dense_logprobs.values())).shape[-1]
    counted = labels != -100
    z = student_logits[..., :v].double()[counted]  # [N, V]
    lab = labels[counted]
    ce = -torch.log_softmax(z, -1).gather(-1, lab[:, None]).squeeze(1)
    if cfg.method == "sft":
        return ce.sum(), int(counted.sum())
    alphas = [cfg.alpha] if pair_alphas is None else pair_alphas
    sup = None if ids is None else ids.long()
    q_dense = torch.softmax(z / cfg.tau, -1)
    dense = {r: torch.exp(lp.double()[counted]) for r, lp in dense_logprobs.items()}
    if cfg.tail == "student_base":
        assert sup is not None
        dist = _student_base_tail(q_dense, dense, sup, cfg, alphas, lab)
    else:
        q = _atoms(q_dense, sup, cfg.tail)
        p = {r: _atoms(pr, sup, cfg.tail) for r, pr in dense.items()}
        k = None if sup is None else sup.shape[-1]
        y = lab
        if sup is not None and cfg.objective == "sampled_token":
            y = (sup == lab[:, None]).int().argmax(-1)  # the label's atom
        dist = _method(cfg.method, q, p, cfg, alphas, k, y)
    per_token = cfg.lam * ce + (1 - cfg.lam) * cfg.tau**2 * dist
    return per_token.sum(), int(counted.sum())
