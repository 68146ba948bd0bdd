"""`loss.tail: student_base`: a dense target over the whole vocabulary from the sparse shift.

The worker holds the student base's full row (its frozen copy), so the move u = log P - S0 (methods.py),
known on the K support ids plus one tail bucket, moves S0 over every token (this project's formulas):

    delta_v = u at v's atom                  v in the support
    delta_v = u at the tail bucket           every other v
    student_shift (and paper at alpha = 1):  u = sum_j alpha_j (T1_j - T0_j), the bucket's: the teachers' tail
                                             log-mass ratio, sum_j alpha_j (log tail_T1_j - log tail_T0_j)
    paper:                                   u = T1 + alpha (S0 - T0) - S0 on the atoms (S0's bucket atom is
                                             its own off-support log-mass)

    delta_kd:       P(v) = S0(v) exp(delta_v) / Z       exactly normalised over V, row by row
                    forward_kl: KL(P || S)   reverse_kl: KL(S || P)   sampled_token: -A log S(y),
                    A = log P(y) - log S(y) (y any token: P is defined on the whole vocabulary)
    delta_inverse:  KL(S0 || R),  R(v) = S(v) exp(-delta_v) / Z'

Off the support the target keeps the student base's own shape (scaled by one factor), instead of the
bucket's single atom; in the paper form that factor gives the off-support tokens together the mass the
bucket atom has in the paper target (T1's off-support shape taken to be S0's: the wire carries no other). Everything is computed per chunk on `[n, V]` fp32 blocks; the gradient with respect
to the student's scaled logits s = z / tau is analytic:

    forward KL: q - p     reverse KL: q * (log q - log p - KL)     sampled: A * (q - onehot(y))
    delta_inverse: r - S0

(q = softmax(s), p = P, r = R). Teacher atoms are the bucket atoms (renormalised), as for `tail: bucket`.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from common.losses.atoms import logsumexp_rows

__all__ = ["TailChunk", "student_base_tail_chunk"]


class TailChunk(NamedTuple):
    """dist/entropy [n] (entropy of the target); advantage [n] or None; grad: the block holding dL/ds
    (None without gradients); free: a block the caller may overwrite."""

    dist: Tensor
    entropy: Tensor
    advantage: Tensor | None
    grad: Tensor | None
    free: Tensor


def _rowdot(a: Tensor, b: Tensor) -> Tensor:
    """sum over the last dim of a * b for [n, V] blocks, without an [n, V] temporary."""
    return torch.bmm(a.unsqueeze(1), b.unsqueeze(2)).view(-1)


def student_base_tail_chunk(x: Tensor, base: Tensor, tmp: Tensor, lse_s: Tensor, ids: Tensor, delta: Tensor,
                            label: Tensor, method: str, objective: str, need_grad: bool) -> TailChunk:
    """One chunk of the student-base-tail loss.

    x: [n, V] the student's scaled logits s (left intact); lse_s: logsumexp(s) [n]; base: [n, V] the
    student base's scaled logits s0 (overwritten); tmp: [n, V] scratch (overwritten); ids: [n, K] the
    support; delta: [n, K+1] the move u on the support atoms and (last column) the tail bucket;
    label: [n] the token y of each row (sampled_token).
    """
    k = ids.shape[1]
    d_sup, d_tail = delta[:, :k], delta[:, k]
    if method == "delta_inverse":
        lse0 = logsumexp_rows(base, tmp)
        base.sub_(lse0[:, None])  # log S0
        s0 = torch.exp(base, out=tmp)
        neg_h = _rowdot(s0, base)  # sum S0 log S0
        s0_sup = s0.gather(-1, ids)
        s0_delta = d_tail * (1.0 - s0_sup.sum(-1)).clamp(min=0.0) + (s0_sup * d_sup).sum(-1)
        s0_s = _rowdot(s0, x)  # sum S0 s
        # R's logits s - delta in `base`, normalised in place: r = exp(. - m) / sum
        torch.sub(x, d_tail[:, None], out=base)
        base.scatter_(-1, ids, x.gather(-1, ids) - d_sup)
        m = base.amax(dim=-1, keepdim=True)
        total = base.sub_(m).exp_().sum(-1)
        lse_r = total.log() + m.squeeze(-1)
        # KL(S0 || R) = sum S0 log S0 - sum S0 (s - delta) + lse_r
        dist = neg_h - s0_s + s0_delta + lse_r
        grad = base.div_(total[:, None]).sub_(s0) if need_grad else None
        return TailChunk(dist, -neg_h, None, grad, tmp)
    # delta_kd: P's logits u = s0 + delta_v in `base`, then log P = u - lse(u)
    s0_sup = base.gather(-1, ids)
    base.add_(d_tail[:, None])
    base.scatter_(-1, ids, s0_sup + d_sup)
    base.sub_(logsumexp_rows(base, tmp)[:, None])  # log P
    p = torch.exp(base, out=tmp)
    ent = -_rowdot(p, base)
    if objective == "forward_kl":
        # KL(P || S) = sum P log P - sum P s + lse(s)
        dist = -ent - _rowdot(p, x) + lse_s
        grad = torch.sub(x, lse_s[:, None], out=base).exp_().sub_(p) if need_grad else None
        return TailChunk(dist, ent, None, grad, tmp)
    if objective == "reverse_kl":
        log_ratio = torch.sub(x, base, out=tmp).sub_(lse_s[:, None])  # log q - log p
        q = torch.sub(x, lse_s[:, None], out=base).exp_()
        dist = _rowdot(q, log_ratio)
        grad = log_ratio.sub_(dist[:, None]).mul_(q) if need_grad else None
        return TailChunk(dist, ent, None, grad, base)
    if objective == "sampled_token":
        lq_y = x.gather(-1, label[:, None]).squeeze(1) - lse_s
        advantage = base.gather(-1, label[:, None]).squeeze(1) - lq_y
        dist = -advantage * lq_y
        grad = None
        if need_grad:  # d(-A log q(y))/ds = A (q - onehot(y)), A held constant
            grad = torch.sub(x, lse_s[:, None], out=base).exp_().mul_(advantage[:, None])
            grad.scatter_add_(-1, label[:, None], -advantage[:, None])
        return TailChunk(dist, ent, advantage, grad, tmp)
    raise ValueError(f"unknown loss.objective {objective!r}")
