"""The models of a run: the teachers, the student and its base, extra teacher pairs."""

from __future__ import annotations

from pydantic import Field

from .base import DType, Strict

__all__ = ["ModelSpec", "TeacherPair", "ModelsConfig"]


class ModelSpec(Strict):
    """A causal LM by hub id or local path. `embedded:<role>` names a tiny model the default run builds."""

    path: str
    revision: str | None = None
    dtype: DType = "auto"
    trust_remote_code: bool = False


class TeacherPair(Strict):
    """One (base, SFT) teacher couple. Its shift `lp_sft - lp_base` enters the target with weight alpha."""

    base: ModelSpec
    sft: ModelSpec
    alpha: float = 1.0


class ModelsConfig(Strict):
    base_teacher: ModelSpec
    sft_teacher: ModelSpec
    student: ModelSpec
    # The student's frozen starting point lp_S0. None: the student's own starting checkpoint.
    student_base: ModelSpec | None = None
    # Further teacher pairs for the several-pair shift sum_j alpha_j * (lp_T1_j - lp_T0_j).
    extra_pairs: list[TeacherPair] = Field(default_factory=list)
