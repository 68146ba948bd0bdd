"""Teacher service: engines that score token ids, Ray actors around them, the pool and the client.

Ray-dependent names (TeacherPool, TeacherClient, TeacherActor, assemble_record) are imported lazily on first
access, so `from teacher_service import TeacherEngine` does not import Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

from common.data.tokenizer_check import check_tokenizers, tokenizer_fingerprint

from .engine_hf import TeacherEngine
from .errors import TeacherError, TeacherOutputError, TeacherUnavailableError, TokenizerMismatchError

__all__ = [
    "TeacherEngine",
    "TeacherPool",
    "TeacherClient",
    "TeacherActor",
    "assemble_record",
    "TeacherError",
    "TeacherOutputError",
    "TeacherUnavailableError",
    "TokenizerMismatchError",
    "tokenizer_fingerprint",
    "check_tokenizers",
]

_LAZY = {"TeacherPool": "pool", "TeacherClient": "client", "TeacherActor": "actor", "assemble_record": "assemble"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
