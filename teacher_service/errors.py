"""Typed errors of the teacher service. Each message names the culprit (role, batch id, model path).

The errors cross process boundaries (raised inside Ray tasks/actors, re-raised in the driver), so each
defines `__reduce__`: pickling must rebuild it from its own constructor arguments.
"""

from __future__ import annotations

from typing import Any

from common.data.errors import TokenizerMismatchError, TokenizerSpecialTokensWarning
from common.topk import RecordError

__all__ = ["TeacherError", "TeacherUnavailableError", "TokenizerMismatchError", "TokenizerSpecialTokensWarning",
           "TeacherOutputError", "TeacherRecordError", "RayConnectionError"]


class TeacherError(RuntimeError):
    """Base class of teacher-service errors."""


class TeacherUnavailableError(TeacherError):
    """A teacher role's actor died and Ray's retries are used up; the batch could not be scored."""

    def __init__(self, role: str, batch_id: Any, cause: Any = None):
        self.role = role
        self.batch_id = batch_id
        self.cause_text = cause if isinstance(cause, str) or cause is None else f"{type(cause).__name__}: {cause}"
        first_line = (self.cause_text or "").strip().splitlines()[:1]
        super().__init__(f"teacher role {role!r} unavailable for batch {batch_id}"
                         + (f" ({first_line[0]})" if first_line else ""))

    def __reduce__(self) -> tuple[Any, ...]:
        return (TeacherUnavailableError, (self.role, self.batch_id, self.cause_text))


class TeacherOutputError(TeacherError):
    """A teacher produced unusable output (NaN/inf logits) for a batch."""

    def __init__(self, model: str, batch_id: Any, what: str):
        self.model, self.batch_id, self.what = model, batch_id, what
        super().__init__(f"teacher model {model} gave bad output for batch {batch_id}: {what}")

    def __reduce__(self) -> tuple[Any, ...]:
        return (TeacherOutputError, (self.model, self.batch_id, self.what))


class TeacherRecordError(RecordError):
    """A `common.topk.RecordError` raised while assembling a record, in a form that survives pickling.

    (RecordError's constructor takes three arguments, so Ray cannot rebuild it in the driver.)
    """

    def __reduce__(self) -> tuple[Any, ...]:
        return (TeacherRecordError, (self.batch_id, self.role, self.what))


class RayConnectionError(TeacherError):
    """Could not connect to the Ray cluster; the message says what to set (auth env vars, the address)."""
