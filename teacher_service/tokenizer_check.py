"""Tokenizer fingerprints and the pre-flight check that every model of a run shares one tokenizer.

Runs before any weights are loaded: only tokenizer files are read.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from common.config import ModelSpec, RunConfig

from .errors import TokenizerMismatchError
from .roles import teacher_role_specs

__all__ = ["tokenizer_fingerprint", "check_tokenizers", "load_tokenizer"]


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer of a model spec (hub id or local path), honouring revision and trust_remote_code."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.path, revision=spec.revision,
                                         trust_remote_code=spec.trust_remote_code)


def tokenizer_fingerprint(path_or_tokenizer: Any) -> str:
    """sha256 over the sorted vocabulary (token, id) pairs and the special tokens (name -> token, id).

    Two tokenizers with the same fingerprint map every string to the same ids; added tokens are part of
    `get_vocab()`, so they count too.
    """
    tok = path_or_tokenizer
    if isinstance(tok, str | ModelSpec) or hasattr(tok, "__fspath__"):
        spec = tok if isinstance(tok, ModelSpec) else ModelSpec(path=str(tok))
        tok = load_tokenizer(spec)
    vocab = sorted(tok.get_vocab().items())
    special = sorted((str(name), str(value)) for name, value in tok.special_tokens_map.items())
    special_ids = sorted(zip(tok.all_special_tokens, tok.all_special_ids))
    blob = json.dumps({"vocab": vocab, "special": special, "special_ids": special_ids}, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def check_tokenizers(cfg: RunConfig, include_student: bool = True) -> dict[str, Any]:
    """Check that every teacher role (and the student) shares one tokenizer and that k <= its size.

    Returns {"fingerprint": str, "vocab_size": int, "roles": {role: path}}. Raises TokenizerMismatchError
    naming both model paths, or ValueError naming k and the vocabulary size.
    """
    specs = dict(teacher_role_specs(cfg))
    if include_student:
        specs.setdefault("student", cfg.models.student)
    first_role, first_fp, vocab_size = None, "", 0
    by_path: dict[tuple[str, str | None], tuple[str, int]] = {}
    for role, spec in specs.items():
        key = (spec.path, spec.revision)
        if key not in by_path:  # one load per distinct model
            tok = load_tokenizer(spec)
            by_path[key] = (tokenizer_fingerprint(tok), len(tok))
        fp, size = by_path[key]
        if first_role is None:
            first_role, first_fp, vocab_size = role, fp, size
        elif fp != first_fp:
            raise TokenizerMismatchError(f"{first_role}={specs[first_role].path}", f"{role}={spec.path}",
                                         first_fp, fp)
    k = cfg.loss.k
    if not 0 < k <= vocab_size:
        raise ValueError(f"loss.k={k} out of range: must be in 1..{vocab_size} (the tokenizer's vocabulary size, "
                         f"model {specs[str(first_role)].path})")
    return {"fingerprint": first_fp, "vocab_size": vocab_size,
            "roles": {role: spec.path for role, spec in specs.items()}}
