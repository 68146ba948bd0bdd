"""Tokenizer fingerprints and the pre-flight check that every model of a run shares one vocabulary.

Runs before any weights are loaded: only tokenizer files are read.

What decides compatibility here is the token -> id map. The driver tokenizes with the student's tokenizer
and every teacher receives those ids, and the teachers' support ids are read back against the same map, so
two models are interchangeable exactly when each id names the same token in both. Which tokens a model
*calls* eos, bos or pad is a choice made on top of one shared vocabulary (Qwen2-7B ends text with
`<|endoftext|>`, Qwen2-7B-Instruct with `<|im_end|>`, both in the same 151,646-token map): it changes what
the data ends responses with, not what the ids mean, so it is a warning, not an error.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from typing import Any

from common.config import ModelSpec, RunConfig
from common.data.errors import TokenizerMismatchError, TokenizerSpecialTokensWarning
from common.roles import teacher_role_specs

__all__ = ["tokenizer_fingerprint", "special_token_choices", "check_tokenizers", "load_tokenizer"]

# The special-token slots whose choice may differ between models of one vocabulary (warned about).
SPECIAL_SLOTS = ("bos_token", "eos_token", "pad_token", "unk_token")


def load_tokenizer(spec: ModelSpec) -> Any:
    """The tokenizer of a model spec (hub id or local path), honouring revision and trust_remote_code."""
    # deferred: transformers costs ~1.4 s at import (measured); both CLIs' start-up imports this module
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec.path, revision=spec.revision,
                                         trust_remote_code=spec.trust_remote_code)


def _as_tokenizer(path_or_tokenizer: Any) -> Any:
    tok = path_or_tokenizer
    if isinstance(tok, str | ModelSpec) or hasattr(tok, "__fspath__"):
        spec = tok if isinstance(tok, ModelSpec) else ModelSpec(path=str(tok))
        tok = load_tokenizer(spec)
    return tok


def tokenizer_fingerprint(path_or_tokenizer: Any) -> str:
    """sha256 of the token -> id map: `get_vocab()` sorted by id, added tokens included (they are part of it).

    Equal fingerprints mean every id names the same token string, so ids from one model's tokenizer mean
    the same thing to the other. Deliberately NOT in it: which tokens are called eos/bos/pad (see
    `special_token_choices`) and the merges/normaliser (the teachers never tokenize the run's text; they
    score the ids the student's tokenizer produced). This is the one fingerprint of the project: records
    and teacher caches carry it.
    """
    tok = _as_tokenizer(path_or_tokenizer)
    vocab = sorted(((int(i), str(t)) for t, i in tok.get_vocab().items()))
    blob = json.dumps({"token_ids": vocab}, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def special_token_choices(path_or_tokenizer: Any) -> dict[str, str | None]:
    """{slot: token string or None} for bos/eos/pad/unk: the choices that may differ within one vocabulary."""
    tok = _as_tokenizer(path_or_tokenizer)
    out: dict[str, str | None] = {}
    for slot in SPECIAL_SLOTS:
        value = getattr(tok, slot, None)
        out[slot] = None if value is None else str(value)
    return out


def _special_differences(a: dict[str, str | None], b: dict[str, str | None]) -> list[str]:
    return [f"{slot} {a[slot]!r} vs {b[slot]!r}" for slot in SPECIAL_SLOTS if a.get(slot) != b.get(slot)]


def check_tokenizers(cfg: RunConfig, include_student: bool = True) -> dict[str, Any]:
    """Check that every teacher role (and the student) shares one token -> id map and that k <= its size.

    Returns {"fingerprint": str, "vocab_size": int, "roles": {role: path}, "warnings": [str]}. Raises
    TokenizerMismatchError naming both model paths and the first id on which they disagree, or ValueError
    naming loss.k and the vocabulary size. Special-token choices that differ from the student's (the
    tokenizer that builds the batches; the first role's when the student is not included) are a
    `TokenizerSpecialTokensWarning` naming both models and the tokens, shown once per process.
    """
    specs = dict(teacher_role_specs(cfg))
    if include_student:
        specs.setdefault("student", cfg.models.student)
    loaded: dict[tuple[str, str | None], tuple[str, int, dict[str, str | None], Any]] = {}
    for spec in specs.values():  # one load per distinct model
        key = (spec.path, spec.revision)
        if key not in loaded:
            tok = load_tokenizer(spec)
            loaded[key] = (tokenizer_fingerprint(tok), len(tok), special_token_choices(tok), tok)

    def info(role: str) -> tuple[str, int, dict[str, str | None], Any]:
        return loaded[(specs[role].path, specs[role].revision)]

    roles = list(specs)
    first = roles[0]
    first_fp, vocab_size = info(first)[:2]
    for role in roles[1:]:
        if info(role)[0] != first_fp:
            raise TokenizerMismatchError(f"{first}={specs[first].path}", f"{role}={specs[role].path}", first_fp,
                                         info(role)[0], _first_difference(info(first)[3], info(role)[3]))
    reference = "student" if "student" in specs else first
    messages: list[str] = []
    seen = {(specs[reference].path, specs[reference].revision)}
    for role in roles:
        key = (specs[role].path, specs[role].revision)
        diffs = _special_differences(info(reference)[2], info(role)[2])
        if key in seen or not diffs:
            continue
        seen.add(key)
        messages.append(f"{reference}={specs[reference].path} and {role}={specs[role].path} share one vocabulary "
                        f"but choose different special tokens: {'; '.join(diffs)}. Batches are built with the "
                        f"{reference}'s tokenizer (responses end with its eos), so {role} sees those tokens where "
                        f"it may expect its own")
    for msg in messages:
        # stacklevel 1: the warning's location is this line, so the default filter shows it once per process
        # although the driver's pre-flight and the pool's start both check.
        warnings.warn(msg, TokenizerSpecialTokensWarning, stacklevel=1)
    k = cfg.loss.k
    if not 0 < k <= vocab_size:
        raise ValueError(f"loss.k={k} out of range: must be in 1..{vocab_size} (the tokenizer's vocabulary size, "
                         f"model {specs[first].path})")
    return {"fingerprint": first_fp, "vocab_size": vocab_size,
            "roles": {role: spec.path for role, spec in specs.items()}, "warnings": messages}


def _first_difference(tok_a: Any, tok_b: Any) -> str:
    """A short description of the first id (or token) on which two token -> id maps disagree."""
    a = {int(i): t for t, i in tok_a.get_vocab().items()}
    b = {int(i): t for t, i in tok_b.get_vocab().items()}
    for i in sorted(set(a) | set(b)):
        if a.get(i) != b.get(i):
            return f"id {i} is {a.get(i)!r} vs {b.get(i)!r}; sizes {len(a)} vs {len(b)}"
    return f"sizes {len(a)} vs {len(b)}"
