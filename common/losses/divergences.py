"""Per-token building blocks on "atom" log-probabilities (pure torch, fp32).

An *atom* is one outcome of the sparse distribution a loss compares: the k support ids, plus (with
`tail: bucket`) one bucket holding all the probability mass off the support. Every function here takes
log-probs `[N, A]` (N tokens, A atoms) and returns a per-token value `[N]`. Nothing here reduces over
tokens: the caller sums and counts (docs/DESIGN.md: the trainer divides once by the global token count).

Argument order is always (target, student): the first argument is the distribution the student is
pulled towards (detached by the caller), the second is the student's.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "LOG_TAIL_FLOOR",
    "LOGPROB_FLOOR",
    "safe_log",
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "delta_target",
    "centred_shift_mse",
    "entropy",
]

# log(1e-30): the floor of a tail bucket's log-mass. With k = |V| every role's tail is exactly 0; a
# common finite floor for teachers *and* the student makes that atom identical in all of them, so it adds
# exactly nothing to any KL (its mass 1e-30 times a log-ratio of 0) and nothing is -inf.
LOG_TAIL_FLOOR = math.log(1e-30)
# Teacher log-probs may legally be -inf (a token given zero mass). Replaced by this finite value:
# exp(-1e4) == 0 in fp32, so the atom still carries no mass, but p * (log p - log q) is 0, not NaN.
LOGPROB_FLOOR = -1.0e4


def safe_log(mass: Tensor, floor: float = LOG_TAIL_FLOOR) -> Tensor:
    """log(max(mass, exp(floor))): finite log of a tail mass that may be exactly 0.  [...] -> [...]"""
    return torch.log(mass.clamp(min=math.exp(floor)))


def forward_kl(target_lp: Tensor, student_lp: Tensor) -> Tensor:
    """KL(P || Q) = sum_a p_a (log p_a - log q_a), P = exp(target_lp), Q = exp(student_lp).

    target_lp, student_lp: [N, A] log-probs over the same atoms. Returns [N]. Mode-covering (plain KD).
    """
    p = target_lp.exp()
    return (p * (target_lp - student_lp)).sum(-1)


def reverse_kl(target_lp: Tensor, student_lp: Tensor) -> Tensor:
    """KL(Q || P) = sum_a q_a (log q_a - log p_a), Q the student, P the target. [N, A] -> [N]. Mode-seeking."""
    q = student_lp.exp()
    return (q * (student_lp - target_lp)).sum(-1)


def generalized_jsd(target_lp: Tensor, student_lp: Tensor, beta: float) -> Tensor:
    """Generalised Jensen-Shannon divergence of GKD (Agarwal et al. 2024, eq. 1) as TRL parameterises it.

        M = beta * P + (1 - beta) * Q                       P = the target (teacher), Q = the student
        L = beta * KL(P || M) + (1 - beta) * KL(Q || M)

    [N, A] -> [N]. Endpoints, as in TRL's `generalized_jsd_loss`: beta = 0 is the forward KL(P || Q) (`kd`),
    beta = 1 is the reverse KL(Q || P) (`rkl`); beta = 0.5 is the usual symmetric JSD. The endpoints are
    special cases, not limits: as beta -> 0 the mixture formula itself goes to 0 like beta * KL(P || Q).
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta={beta} must lie in [0, 1]")
    if beta == 0.0:
        return forward_kl(target_lp, student_lp)
    if beta == 1.0:
        return reverse_kl(target_lp, student_lp)
    log_m = torch.logaddexp(target_lp + math.log(beta), student_lp + math.log1p(-beta))
    return beta * forward_kl(target_lp, log_m) + (1.0 - beta) * forward_kl(student_lp, log_m)


def delta_target(base_lp: Tensor, shift: Tensor) -> Tensor:
    """The Delta-KD target: log softmax_atoms(base_lp + shift).

    base_lp: [N, A] the student's base lp_S0; shift: [N, A] delta = sum_j alpha_j (lp_T1_j - lp_T0_j).
    Returns [N, A] normalised log-probs. With base_lp == lp_T0 and alpha = 1 this is exactly lp_T1.
    """
    return torch.log_softmax(base_lp + shift, dim=-1)


def centred_shift_mse(student_shift: Tensor, teacher_shift: Tensor) -> Tensor:
    """mean_a ((d_S - mean_a d_S) - (d_T - mean_a d_T))^2 over atoms. [N, A] -> [N].

    Centring removes each side's per-token constant (log normalisers), so only the *shape* of the shift
    is matched: d_S = lp_S - lp_S0 (the student's own shift) against d_T = delta (the teacher's).
    """
    diff = student_shift - teacher_shift
    diff = diff - diff.mean(-1, keepdim=True)
    return (diff * diff).mean(-1)


def entropy(lp: Tensor) -> Tensor:
    """H(P) = -sum_a p_a log p_a. [N, A] -> [N]."""
    return -(lp.exp() * lp).sum(-1)
