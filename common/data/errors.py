"""Typed errors of the data layer. Each message names the culprit (file and line, model path).

Errors that cross process boundaries (raised in Ray tasks, re-raised in the driver) define `__reduce__`:
pickling must rebuild them from their own constructor arguments.
"""

from __future__ import annotations

from typing import Any

__all__ = ["TokenizerMismatchError", "TokenizerSpecialTokensWarning"]


class TokenizerMismatchError(ValueError):
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
