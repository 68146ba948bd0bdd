"""Identities that decide whether a cache fits a run: models, tokenized data, and the run's settings.

Weights fingerprint (`weights_fingerprint`), cheap for a 7B model (a few MiB read): sha256 over, per file of
the model folder in name order, its name and size and
- `config.json` and `*.index.json`: the whole file;
- `*.safetensors`: the header (tensor names, dtypes, shapes, offsets) and 16 blocks of 64 KiB spread evenly
  over the tensor data;
- `*.bin`, `*.pt`, `*.pth`: 16 blocks of 64 KiB spread over the file.
Fine-tuning changes every weight, so the sampled blocks tell an SFT model from its base even though their
headers are identical; it does not prove two folders hold identical weights byte for byte.
Tokenizer files are not part of it (the tokenizer has its own fingerprint).

A hub id is fingerprinted from its local snapshot when the Hugging Face cache has one; otherwise its
fingerprint is None and a cache check compares hub id and revision instead.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from common.config import ModelSpec, RunConfig
from common.roles import role_model_specs

from .errors import CacheError

__all__ = ["weights_fingerprint", "model_identity", "examples_fingerprint",
           "run_roles", "run_valid_for"]

_BLOCK = 64 * 1024
_BLOCKS = 16
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _sample(f: Any, start: int, end: int, h: Any) -> None:
    span = end - start
    if span <= _BLOCK * _BLOCKS:
        f.seek(start)
        h.update(f.read(span))
        return
    for i in range(_BLOCKS):
        f.seek(start + (span - _BLOCK) * i // (_BLOCKS - 1))
        h.update(f.read(_BLOCK))


def weights_fingerprint(model_dir: str | os.PathLike[str]) -> str:
    """sha256 (hex) of a local model folder's config and sampled weights (module docstring)."""
    root = Path(model_dir)
    files = sorted(p for p in root.iterdir() if p.is_file() and (
        p.name in ("config.json", "adapter_config.json") or p.name.endswith(".index.json") or p.name.endswith(_WEIGHT_SUFFIXES)))
    if not any(p.name.endswith(_WEIGHT_SUFFIXES) for p in files):
        raise CacheError(f"{root}: no weight files (*.safetensors, *.bin, *.pt) to fingerprint")
    h = hashlib.sha256()
    for p in files:
        size = p.stat().st_size
        h.update(f"{p.name}\0{size}\0".encode())
        with p.open("rb") as f:
            if p.name.endswith(".json"):
                h.update(f.read())
            elif p.name.endswith(".safetensors"):
                raw = f.read(8)
                if len(raw) < 8:
                    raise CacheError(f"{p}: truncated safetensors file ({size} bytes)")
                (header_len,) = struct.unpack("<Q", raw)
                if 8 + header_len > size:
                    raise CacheError(f"{p}: safetensors header length {header_len} exceeds the file ({size} bytes)")
                h.update(f.read(header_len))
                _sample(f, 8 + header_len, size, h)
            else:
                _sample(f, 0, size, h)
    return h.hexdigest()


def _local_dir(spec: ModelSpec) -> Path | None:
    p = Path(spec.path).expanduser()
    if p.is_dir():
        return p
    try:  # a hub id: its snapshot in the local Hugging Face cache, if any (never downloads)
        from huggingface_hub import snapshot_download  # deferred: hub access (optional dependency)

        return Path(snapshot_download(spec.path, revision=spec.revision, local_files_only=True))
    except Exception:  # noqa: BLE001 - any failure means "not available locally"; the identity says so
        return None


def model_identity(spec: ModelSpec) -> dict[str, Any]:
    """{"path", "revision", "fingerprint"} of a model spec (fingerprint None when it is not local)."""
    local = _local_dir(spec)
    return {"path": spec.path, "revision": spec.revision,
            "fingerprint": weights_fingerprint(local) if local is not None else None}


def examples_fingerprint(examples: Iterable[Any]) -> str:
    """sha256 over the tokenized examples: each one's length, prompt length and token ids (int32 LE).

    Accepts objects with `input_ids` and `prompt_len` (common.data.batching.TokenizedExample) or
    (input_ids, prompt_len) pairs.
    """
    h = hashlib.sha256()
    for ex in examples:
        ids, prompt_len = (ex.input_ids, ex.prompt_len) if hasattr(ex, "input_ids") else ex
        arr = np.asarray(ids, dtype="<i4")
        h.update(struct.pack("<qq", arr.size, int(prompt_len)))
        h.update(arr.tobytes())
    return h.hexdigest()


def run_roles(cfg: RunConfig, roles: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Model identities of the given roles under this run's config."""
    specs = role_model_specs(cfg)
    unknown = [r for r in roles if r not in specs]
    if unknown:
        raise CacheError(f"roles {unknown} are not produced by any model of this run (roles: {sorted(specs)})")
    return {r: model_identity(specs[r]) for r in roles}


def run_valid_for(cfg: RunConfig, *, tokenizer_fingerprint: str, vocab_size: int, examples_sha256: str,
                  num_examples: int, k: int | None = None, encoding: str | None = None) -> dict[str, Any]:
    """The `valid_for` section a cache must have to serve this run (manifest.py). k defaults to loss.k;
    encoding None accepts any encoding."""
    d = cfg.data
    out: dict[str, Any] = {
        "tokenizer_fingerprint": tokenizer_fingerprint,
        "vocab_size": int(vocab_size),
        "k": int(cfg.loss.k if k is None else k),
        "tau": float(cfg.loss.tau),
        "max_length": d.max_length,
        "overlong": d.overlong,
        "prompt_template": d.prompt_template,
        "context_template": d.context_template,
        "data": {"source": d.train, "split": d.train_split, "columns": d.columns.model_dump(mode="json"),
                 "max_examples": d.max_train_examples, "num_examples": int(num_examples),
                 "examples_sha256": examples_sha256},
    }
    if encoding is not None:
        out["encoding"] = encoding
    return out
