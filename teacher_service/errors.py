"""Typed errors of the teacher service. Each message names the culprit (role, batch id, model path).

The errors cross process boundaries (raised inside Ray tasks/actors, re-raised in the driver), so each
defines `__reduce__`: pickling must rebuild it from its own constructor arguments.
"""

from __future__ import annotations

from typing import Any

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


class TokenizerMismatchError(TeacherError):
    """Two models that must share one vocabulary do not: their token -> id maps differ.

    `detail` says where (e.g. "id 151646 is '<|x|>' vs None; sizes 151646 vs 151647").
    """

    def __init__(self, model_a: str, model_b: str, fingerprint_a: str, fingerprint_b: str, detail: str = ""):
        self.model_a, self.model_b = model_a, model_b
        self.fingerprint_a, self.fingerprint_b = fingerprint_a, fingerprint_b
        self.detail = detail
        super().__init__(f"tokenizer mismatch: {model_a} (fingerprint {fingerprint_a[:12]}) != "
                         f"{model_b} (fingerprint {fingerprint_b[:12]})" + (f": {detail}" if detail else "")
                         + "; all models must share one token -> id map")

    def __reduce__(self) -> tuple[Any, ...]:
        return (TokenizerMismatchError, (self.model_a, self.model_b, self.fingerprint_a, self.fingerprint_b,
                                         self.detail))


class TokenizerSpecialTokensWarning(UserWarning):
    """Models share one vocabulary but call different tokens eos/bos/pad/unk (a base model and its instruct
    version, e.g. Qwen2's `<|endoftext|>` vs `<|im_end|>`). Legitimate; the message names both models."""


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
