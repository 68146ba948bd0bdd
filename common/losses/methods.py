"""Each loss method as a per-token function of atom log-probs (docs/DESIGN.md section 1).

Notation (all `[N, A]` atom log-probs, fp32): S the student, S0 its frozen base, T1 = role `sft`,
T0 = role `base`, pair j's roles from `common.topk.pair_roles(j)`. The Delta target P and the *move*
u = log P - S0 (up to a per-row constant: the change that takes S0 to P) depend on `loss.delta_form`:

    paper (default):  log P = T1 + alpha (S0 - T0)            u = T1 + alpha (S0 - T0) - S0   (one pair)
    student_shift:    log P = S0 + delta                      u = delta = sum_j alpha_j (T1_j - T0_j)

renormalised over the atoms. The two agree at alpha = 1 (one pair), where both are computed exactly as the
student_shift form computes them (`S0 + 1.0 * (T1 - T0)`), so a run at alpha = 1 gives the same bits under
either form. In the paper form alpha = 0 is exactly kd (P is T1's atoms themselves).

KL(P || Q) = sum_a p_a (log p_a - log q_a) over the atoms; every target is detached by the caller.

| method          | per-token loss                                                     |
|-----------------|--------------------------------------------------------------------|
| `kd`            | KL(T1 || S)                                                        |
| `rkl`           | KL(S || T1)                                                        |
| `jsd`           | beta KL(T1 || M) + (1 - beta) KL(S || M), M = beta T1 + (1-beta) S  |
| `delta_kd`      | KL(P || S)                                                         |
| `delta_anchor`  | paper: KL(T1 || softmax(S - alpha (S0 - T0))); student_shift: KL(T1 || softmax(S - S0 + T0)), no alpha |
| `delta_inverse` | KL(S0 || softmax(S - u))                                           |
| `delta_match`   | mean_a over the k support atoms of (centred(S - S0) - centred(u))^2 |
| `parallelogram` | sum_c weight_c * L_c over `loss.weights`                            |

Under the paper form every Delta method is minimised by the same P (delta_anchor: S = T1 + alpha (S0 - T0);
delta_inverse: S - u = S0; delta_match: S - S0 = u up to a constant). Under student_shift delta_anchor keeps
its first form, whose minimiser is the alpha = 1 target whatever alpha.
`delta_anchor` uses pair 0 only: extra pairs have no single base teacher to anchor on, so they are ignored.
Extra pairs (more than one alpha) are refused under the paper form, whose alpha weighs the student base's
correction, not a pair's shift (config validation; `delta_move` raises too).
`delta_match` always uses the k support atoms (docs/DESIGN.md: "on the support"), in both tail modes: centring
removes the per-token normalisers, and a tail bucket's log-mass is not a shift of one token.

`loss.objective` (kd and delta_kd only; the method's target above, T1 or P):

| objective       | per-token loss                                                      |
|-----------------|---------------------------------------------------------------------|
| `forward_kl`    | KL(P || S) (the table above)                                        |
| `reverse_kl`    | KL(S || P)                                                          |
| `sampled_token` | -A * log S(y), A = log P(y) - log S(y) detached, y = the label atom |

The sampled-token form is the policy-gradient loss of on-policy distillation: its gradient is -A times the
gradient of log S(y); y must be a support atom (records built with the label forced into the support).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from common.config import LossConfig
from common.losses.divergences import (
    centred_shift_mse,
    delta_target,
    entropy,
    forward_kl,
    generalized_jsd,
    reverse_kl,
)
from common.topk import ROLE_BASE, ROLE_SFT, ROLE_STUDENT_BASE, pair_roles

__all__ = ["DISTILL_METHODS", "MethodLoss", "required_roles", "pair_shift", "delta_move", "delta_kd_target",
           "method_token_loss"]

DISTILL_METHODS = ("kd", "rkl", "jsd", "delta_kd", "delta_anchor", "delta_inverse", "delta_match")
_SHIFT_METHODS = ("delta_kd", "delta_inverse", "delta_match")


def required_roles(cfg: LossConfig, num_pairs: int) -> list[str]:
    """Roles the configured method reads, in a stable order (for the missing-role error)."""
    roles: list[str] = []
    for name in cfg.components:
        need = [ROLE_SFT]
        if name == "delta_anchor":
            need = [ROLE_SFT, ROLE_BASE, ROLE_STUDENT_BASE]
        elif name in _SHIFT_METHODS:
            need = [ROLE_STUDENT_BASE] + [r for j in range(num_pairs) for r in pair_roles(j)]
        roles.extend(r for r in need if r not in roles)
    return roles


class MethodLoss(NamedTuple):
    """loss [N] (differentiable in the student), components name -> [N] (parallelogram only),
    target_entropy [N], advantage [N] (sampled_token only, else None)."""

    loss: Tensor
    components: dict[str, Tensor]
    target_entropy: Tensor
    advantage: Tensor | None


def pair_shift(atoms: dict[str, Tensor], pair_alphas: list[float]) -> Tensor:
    """delta = sum_j alpha_j (T1_j - T0_j).  [N, A]"""
    total: Tensor | None = None
    for j, alpha in enumerate(pair_alphas):
        sft, base = pair_roles(j)
        term = alpha * (atoms[sft] - atoms[base])
        total = term if total is None else total + term
    if total is None:
        raise ValueError("pair_alphas is empty: the shift needs at least one teacher pair")
    return total


def _paper_alpha(pair_alphas: list[float]) -> float:
    if len(pair_alphas) != 1:
        raise ValueError(f"loss.delta_form='paper' takes one teacher pair, got {len(pair_alphas)} alphas "
                         f"{pair_alphas}: several pairs need loss.delta_form='student_shift'")
    return float(pair_alphas[0])


def _full_shift(form: str, pair_alphas: list[float]) -> bool:
    """True when the target is S0 + delta as student_shift computes it (every alpha there; alpha = 1 paper)."""
    if form == "student_shift":
        return True
    if form != "paper":
        raise ValueError(f"unknown loss.delta_form {form!r}")
    return _paper_alpha(pair_alphas) == 1.0


def delta_move(atoms: dict[str, Tensor], form: str, pair_alphas: list[float]) -> Tensor:
    """u = log P - S0 up to a per-row constant: delta (student_shift; alpha = 1 paper), else
    T1 + alpha (S0 - T0) - S0.  [N, A]"""
    if _full_shift(form, pair_alphas):
        return pair_shift(atoms, pair_alphas)
    a, s0 = pair_alphas[0], atoms[ROLE_STUDENT_BASE]
    return atoms[ROLE_SFT] + a * (s0 - atoms[ROLE_BASE]) - s0


def delta_kd_target(atoms: dict[str, Tensor], form: str, pair_alphas: list[float],
                    move: Tensor | None = None) -> Tensor:
    """The Delta target log P on the atoms, normalised.  [N, A]

    student_shift (and paper at alpha = 1): log_softmax(S0 + delta), `move` reused when given; paper:
    log_softmax(T1 + alpha (S0 - T0)), and at alpha = 0 T1's atoms themselves (already normalised), so the
    loss is kd's to the bit."""
    if _full_shift(form, pair_alphas):
        return delta_target(atoms[ROLE_STUDENT_BASE], pair_shift(atoms, pair_alphas) if move is None else move)
    a = pair_alphas[0]
    if a == 0.0:
        return atoms[ROLE_SFT]
    return torch.log_softmax(atoms[ROLE_SFT] + a * (atoms[ROLE_STUDENT_BASE] - atoms[ROLE_BASE]), dim=-1)


def _component_loss(name: str, student: Tensor, atoms: dict[str, Tensor], cfg: LossConfig,
                    pair_alphas: list[float], k: int, delta: Tensor | None) -> Tensor:
    if name == "kd":
        return forward_kl(atoms[ROLE_SFT], student)
    if name == "rkl":
        return reverse_kl(atoms[ROLE_SFT], student)
    if name == "jsd":
        return generalized_jsd(atoms[ROLE_SFT], student, cfg.jsd_beta)
    if name == "delta_anchor":
        a = pair_alphas[0]
        if cfg.delta_form == "student_shift" or a == 1.0:
            moved = student - atoms[ROLE_STUDENT_BASE] + atoms[ROLE_BASE]
        else:
            moved = student - a * (atoms[ROLE_STUDENT_BASE] - atoms[ROLE_BASE])
        return forward_kl(atoms[ROLE_SFT], torch.log_softmax(moved, dim=-1))
    if delta is None:
        raise ValueError(f"internal: method {name!r} needs the shift")
    if name == "delta_kd":
        return forward_kl(delta_kd_target(atoms, cfg.delta_form, pair_alphas, delta), student)
    if name == "delta_inverse":
        return forward_kl(atoms[ROLE_STUDENT_BASE], torch.log_softmax(student - delta, dim=-1))
    if name == "delta_match":
        return centred_shift_mse((student - atoms[ROLE_STUDENT_BASE])[:, :k], delta[:, :k])
    raise ValueError(f"unknown distillation method {name!r}; expected one of {DISTILL_METHODS}")


def _objective(objective: str, target: Tensor, student: Tensor,
               label_atom: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """(per-token loss, advantage or None) of `objective` against the detached target."""
    if objective == "forward_kl":
        return forward_kl(target, student), None
    if objective == "reverse_kl":
        return reverse_kl(target, student), None
    if objective == "sampled_token":
        if label_atom is None:
            raise ValueError("internal: loss.objective 'sampled_token' needs the label's atom index")
        lp_y = student.gather(-1, label_atom[:, None]).squeeze(1)
        advantage = (target.gather(-1, label_atom[:, None]).squeeze(1) - lp_y).detach()
        return -advantage * lp_y, advantage
    raise ValueError(f"unknown loss.objective {objective!r}")


def method_token_loss(
    student: Tensor, atoms: dict[str, Tensor], cfg: LossConfig, pair_alphas: list[float], k: int,
    label_atom: Tensor | None = None,
) -> MethodLoss:
    """The configured method's per-token loss L_method (before tau^2 and the CE mix).

    student: [N, A] the student's atom log-probs (differentiable); atoms: role -> [N, A] detached;
    k: the support size (atoms beyond k are the tail bucket); label_atom: [N] long, the atom of each row's
    label (needed by objective sampled_token). The target entropy is that of the distribution the student
    is pulled towards: P when the method uses the move, S0 for delta_inverse, else T1.
    """
    names = cfg.components
    needs_shift = any(n in _SHIFT_METHODS for n in names)
    delta = delta_move(atoms, cfg.delta_form, pair_alphas) if needs_shift else None
    advantage = None
    if cfg.objective != "forward_kl":  # kd or delta_kd (config validation)
        if cfg.method == "kd":
            target = atoms[ROLE_SFT]
        else:
            target = delta_kd_target(atoms, cfg.delta_form, pair_alphas, delta)
        loss, advantage = _objective(cfg.objective, target, student, label_atom)
        parts: dict[str, Tensor] = {str(cfg.method): loss}
    else:
        parts = {n: _component_loss(n, student, atoms, cfg, pair_alphas, k, delta) for n in names}
    if cfg.method == "parallelogram":
        loss = sum((cfg.weights[n] * parts[n] for n in names), torch.zeros_like(student[:, 0]))
        components = parts
    else:
        loss = parts[str(cfg.method)]
        components = {}
    with torch.no_grad():
        if delta is not None and (cfg.method != "delta_inverse"):
            target = delta_kd_target(atoms, cfg.delta_form, pair_alphas, delta)
        elif cfg.method == "delta_inverse":
            target = atoms[ROLE_STUDENT_BASE]
        else:
            target = atoms[ROLE_SFT]
        target_entropy = entropy(target)
    return MethodLoss(loss, components, target_entropy, advantage)
