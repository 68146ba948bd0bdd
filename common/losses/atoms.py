"""Atoms: the sparse distributions every loss compares, and the student's gradient through them.

An atom is one outcome: a support id, or (`tail: bucket`) the bucket of all mass off the support.
All functions work on one chunk of counted rows: `x` is an fp32 `[n, V]` block of scaled logits
s = z / tau (V cut to the tokenizer's size), `ids` its `[n, K]` support, `tmp` a `[n, V]` scratch block.

Student atoms, from lp_S = log_softmax(s):
- `bucket`: [lp_S at the K ids, max(log sum_{v not in S} p_S(v), log 1e-30)]. The off-support log-mass is
  the logsumexp of s with the support filled by -1e30 (finite: K = |V| stays finite).
- `drop`: log_softmax of s at the K ids (renormalised over the support).
Teacher atoms: [lp at ids, log max(tail, 1e-30)] (bucket) or the K values (drop), renormalised over the
atoms (wire rounding leaves them summing to 1 +- eps). Teacher -inf log-probs become -1e4.

Gradient with respect to s, given g = dL/d atoms ([n, A]); bucket atoms a_j = s_{id_j} - lse(s),
a_tail = lse_off(s) - lse(s):

    dL/ds_v = sum_{j: id_j = v} g_j + g_tail * p_off(v) - G * p(v),   G = sum_j g_j + g_tail

with p = softmax(s), p_off(v) = exp(s_v - lse_off) off the support (0 on it), and g_tail = 0 where the
tail log-mass sits at its floor (the clamp passes no gradient). Drop atoms a = log_softmax(s_S):
dL/ds_S = g - (sum_j g_j) softmax(s_S), 0 elsewhere.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.losses.divergences import LOG_TAIL_FLOOR, LOGPROB_FLOOR, safe_log

__all__ = ["teacher_atoms", "logsumexp_rows", "student_atoms", "atom_grad_into", "row_support"]

# Fills the support before the off-support logsumexp: finite (unlike -inf), so when K = |V| the
# logsumexp is a finite -1e30 + log|V| (then clamped to the tail floor) and no -inf enters the arithmetic.
_SUPPORT_FILL = -1.0e30


def teacher_atoms(logprobs: Tensor, tail: Tensor, mode: str) -> Tensor:
    """A teacher role's atom log-probs, renormalised over the atoms.

    logprobs: [N, K] at the support, tail: [N] off-support mass. Returns [N, K+1] (bucket) or [N, K] (drop).
    """
    lp = logprobs.clamp(min=LOGPROB_FLOOR)
    if mode == "bucket":
        lp = torch.cat([lp, safe_log(tail)[:, None]], dim=-1)
    return torch.log_softmax(lp, dim=-1)


def logsumexp_rows(x: Tensor, tmp: Tensor) -> Tensor:
    """logsumexp over the last dim of x [n, V] (finite rows), using tmp [n, V] as its only temporary."""
    m = x.amax(dim=-1, keepdim=True)
    return torch.sub(x, m, out=tmp).exp_().sum(dim=-1).log_().add_(m.squeeze(-1))


def row_support(x: Tensor, ids: Tensor, tmp: Tensor, lse: Tensor | None = None) -> dict[str, Tensor]:
    """lse(s), s at the ids and lse over the off-support ids of x (restored on return).

    Returns {"lse": [n], "s_sup": [n, K], "lse_off": [n]}; lse_off is about -1e30 when K = |V|.
    """
    if lse is None:
        lse = logsumexp_rows(x, tmp)
    s_sup = x.gather(-1, ids)
    x.scatter_(-1, ids, _SUPPORT_FILL)
    lse_off = logsumexp_rows(x, tmp)
    x.scatter_(-1, ids, s_sup)  # restore: exact, these are the values gathered above
    return {"lse": lse, "s_sup": s_sup, "lse_off": lse_off}


def student_atoms(x: Tensor, ids: Tensor, mode: str, tmp: Tensor,
                  lse: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """The student's atoms from x ([n, V] scaled logits, restored on return) and what the gradient needs.

    lse: logsumexp(s) when the caller has it (tau = 1: the CE's).
    """
    if mode == "drop":
        if lse is None:
            lse = logsumexp_rows(x, tmp)
        s_sup = x.gather(-1, ids)
        return torch.log_softmax(s_sup, dim=-1), {"lse": lse, "s_sup": s_sup}
    saved = row_support(x, ids, tmp, lse)
    lse, s_sup, lse_off = saved["lse"], saved["s_sup"], saved["lse_off"]
    raw_tail = lse_off - lse
    saved["unclamped"] = raw_tail > LOG_TAIL_FLOOR
    atoms = torch.cat([s_sup - lse[:, None], raw_tail.clamp(min=LOG_TAIL_FLOOR)[:, None]], dim=-1)
    return atoms, saved


def atom_grad_into(x: Tensor, ids: Tensor, g: Tensor, mode: str, saved: dict[str, Tensor]) -> None:
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
