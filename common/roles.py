"""Roles: the one place that says which distributions a run needs, and which model produces each.

A role is one distribution in a teacher record: `sft` (the SFT teacher, whose top-k is the support), `base`
(the base teacher), `student_base` (the student's starting checkpoint, lp_S0), and `sft_j` / `base_j` for
each extra teacher pair j >= 1.

- `role_model_specs(cfg)`: every role -> the model that produces it;
- `teacher_role_specs(cfg)`: the roles the teacher pool starts actors for (student_base only with
  teachers.student_base_source: teacher);
- `record_roles(cfg)`: the roles a student worker requires in each record it receives;
- `cache_roles(cfg, student_base_from_cache)`: the roles a run reads from the teacher cache;
- `needs_student_base(loss)`: whether the loss uses lp_S0 at all.
What one loss method reads from the targets it is given is `common.losses.methods.required_roles`.
"""

from __future__ import annotations

from common.config import LossConfig, ModelSpec, RunConfig
from common.losses import required_roles as loss_roles
from common.topk import ROLE_BASE, ROLE_SFT, ROLE_STUDENT_BASE, pair_roles

__all__ = ["STUDENT_BASE_METHODS", "needs_student_base", "role_model_specs", "teacher_role_specs", "record_roles",
           "cache_roles", "gather_roles"]

# The loss methods that read lp_S0.
STUDENT_BASE_METHODS = ("delta_kd", "delta_anchor", "delta_inverse", "delta_match")


def needs_student_base(loss_cfg: LossConfig) -> bool:
    """True when the configured loss uses lp_S0 (a parallelogram counts its non-zero components)."""
    if loss_cfg.method == "parallelogram":
        return any(w != 0 and name in STUDENT_BASE_METHODS for name, w in loss_cfg.weights.items())
    return loss_cfg.method in STUDENT_BASE_METHODS


def role_model_specs(cfg: RunConfig) -> dict[str, ModelSpec]:
    """role -> the model that produces it: sft, base, student_base (models.student_base, else the student's
    own starting checkpoint), and sft_j / base_j for each extra teacher pair."""
    m = cfg.models
    specs = {ROLE_SFT: m.sft_teacher, ROLE_BASE: m.base_teacher,
             ROLE_STUDENT_BASE: m.student_base if m.student_base is not None else m.student}
    for j, pair in enumerate(m.extra_pairs, start=1):
        sft_j, base_j = pair_roles(j)
        specs[sft_j], specs[base_j] = pair.sft, pair.base
    return specs


def teacher_role_specs(cfg: RunConfig) -> dict[str, ModelSpec]:
    """role -> model spec of every teacher role the pool starts, in chain order (sft first).

    sft, base; student_base (from models.student_base, else models.student) only when
    teachers.student_base_source == "teacher"; sft_j, base_j for each models.extra_pairs[j-1].
    """
    m = cfg.models
    specs: dict[str, ModelSpec] = {ROLE_SFT: m.sft_teacher, ROLE_BASE: m.base_teacher}
    if cfg.teachers.student_base_source == "teacher":
        specs[ROLE_STUDENT_BASE] = m.student_base if m.student_base is not None else m.student
    for j, pair in enumerate(m.extra_pairs, start=1):
        sft_j, base_j = pair_roles(j)
        specs[sft_j] = pair.sft
        specs[base_j] = pair.base
    return specs


def gather_roles(roles: list[str]) -> list[str]:
    """Every role but pair 0's SFT teacher gathers at its support."""
    return [r for r in roles if r != ROLE_SFT]


def record_roles(cfg: RunConfig) -> list[str]:
    """Roles a student worker requires in each record (lp_S0 only when a teacher role or the teacher cache
    supplies it; the worker's frozen copy adds it otherwise)."""
    method = cfg.loss.method
    if method == "sft":
        return []
    roles = [ROLE_SFT]
    uses_shift = method.startswith("delta") or (
        method == "parallelogram" and any(w != 0 and n.startswith("delta") for n, w in cfg.loss.weights.items())
    )
    if uses_shift:
        for j in range(1 + len(cfg.models.extra_pairs)):
            roles.extend(pair_roles(j))
    if needs_student_base(cfg.loss) and cfg.teachers.student_base_source in ("teacher", "cache"):
        roles.append(ROLE_STUDENT_BASE)
    return list(dict.fromkeys(roles))


def cache_roles(cfg: RunConfig, student_base_from_cache: bool = False) -> list[str]:
    """The roles a run must read from the cache: what its loss method needs, without `student_base` unless
    lp_S0 is to come from the cache too (otherwise the worker's frozen copy computes it)."""
    if cfg.loss.method == "sft":
        return []
    need = loss_roles(cfg.loss, 1 + len(cfg.models.extra_pairs))
    return [r for r in need if r != ROLE_STUDENT_BASE or student_base_from_cache]
