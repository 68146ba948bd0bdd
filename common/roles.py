"""Which teacher roles a run config asks for, and which model serves each."""

from __future__ import annotations

from common.config import ModelSpec, RunConfig
from common.topk import ROLE_BASE, ROLE_SFT, ROLE_STUDENT_BASE, pair_roles

__all__ = ["teacher_role_specs", "gather_roles"]


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
