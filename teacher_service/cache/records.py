"""Per-example teacher records, and the batch records (rows form) assembled from them.

A cache stores one `ExampleRecord` per training example: the example's counted positions `t` in its own
coordinates (position t holds the distribution over token t + 1, see docs/ARCHITECTURE.md) and their
support ids, log-probs and tails. Any batching can be assembled from them: a batch of examples padded to
length T is the concatenation of the examples' rows with `rows = b * T + t` (INTERFACES.md section 1).

`assemble_batch` returns `common.topk.TopKRecord` once that class carries `rows` (the records branch);
until then it returns `RowsRecord`, a stand-in with the same fields. Pure numpy.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import CacheError

__all__ = ["ExampleRecord", "RowsRecord", "split_batch", "assemble_batch", "rows_record_class"]


@dataclass
class ExampleRecord:
    """The teacher outputs of one example at its counted positions.

    example: its index in the tokenized training set; length: its token count (len(input_ids));
    t [n] int32 strictly increasing, 0 <= t < length - 1; ids [n, K] int32; logprobs role -> [n, K] fp32;
    tail role -> [n] fp32.
    """

    example: int
    length: int
    t: np.ndarray
    ids: np.ndarray
    logprobs: dict[str, np.ndarray]
    tail: dict[str, np.ndarray]

    @property
    def num_rows(self) -> int:
        return int(self.t.shape[0])

    def check(self) -> ExampleRecord:
        """Raise CacheError naming the example if the arrays disagree."""
        n = self.num_rows
        where = f"example {self.example}"
        if self.t.ndim != 1 or self.ids.ndim != 2 or self.ids.shape[0] != n:
            raise CacheError(f"{where}: t {tuple(self.t.shape)} and ids {tuple(self.ids.shape)} disagree")
        if n and (int(self.t[0]) < 0 or int(self.t[-1]) >= self.length - 1 or (np.diff(self.t) <= 0).any()):
            raise CacheError(f"{where}: positions must be strictly increasing in [0, length - 1 = "
                             f"{self.length - 1}), got {self.t.tolist()[:8]}...")
        for role, lp in self.logprobs.items():
            if lp.shape != self.ids.shape or self.tail.get(role, np.empty(0)).shape != (n,):
                raise CacheError(f"{where}, role {role!r}: logprobs {tuple(lp.shape)} / tail shapes do not match "
                                 f"ids {tuple(self.ids.shape)}")
            if np.isnan(lp).any() or np.isposinf(lp).any() or not np.isfinite(self.tail[role]).all():
                raise CacheError(f"{where}, role {role!r}: NaN or +inf teacher values")
        return self


@dataclass
class RowsRecord:
    """Stand-in for the rows-form `TopKRecord` of INTERFACES.md section 1 (same fields, numpy, fp32 values).

    ids [N, K] int32; logprobs role -> [N, K]; tail role -> [N] fp32; rows [N] int32 = b * T + t, strictly
    increasing; batch_shape (B, T).
    """

    batch_id: int | str
    ids: np.ndarray
    logprobs: dict[str, np.ndarray]
    tail: dict[str, np.ndarray]
    rows: np.ndarray
    batch_shape: tuple[int, int]
    tau: float
    vocab_size: int
    tokenizer_fingerprint: str = ""
    wire_dtype: str = "float32"
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def mask(self) -> np.ndarray:
        """[B, T] bool: True at the counted positions."""
        b, t = self.batch_shape
        out = np.zeros(b * t, dtype=bool)
        out[self.rows] = True
        return out.reshape(b, t)


def rows_record_class() -> type:
    """`common.topk.TopKRecord` when it is the rows form (has a `rows` field), else `RowsRecord`."""
    from common.topk import TopKRecord

    names = {f.name for f in dataclasses.fields(TopKRecord)}
    return TopKRecord if "rows" in names else RowsRecord


def split_batch(example_indices: Sequence[int], lengths: Sequence[int], rows: np.ndarray, batch_shape: tuple[int, int],
                ids: np.ndarray, logprobs: dict[str, np.ndarray], tail: dict[str, np.ndarray]) -> list[ExampleRecord]:
    """Cut a batch's rows-form teacher output into one ExampleRecord per example (b-th of `example_indices`).

    rows [N] flat b * T + t, strictly increasing; ids [N, K]; logprobs role -> [N, K]; tail role -> [N].
    """
    bsz, seq = batch_shape
    if len(example_indices) != bsz or len(lengths) != bsz:
        raise CacheError(f"batch of shape {batch_shape} but {len(example_indices)} example indices and "
                         f"{len(lengths)} lengths")
    rows = np.asarray(rows, dtype=np.int64)
    if rows.size and ((np.diff(rows) <= 0).any() or rows[0] < 0 or rows[-1] >= bsz * seq):
        raise CacheError(f"rows must be strictly increasing in [0, B*T = {bsz * seq})")
    b_of = rows // seq
    bounds = np.searchsorted(b_of, np.arange(bsz + 1))
    out = []
    for b, ex in enumerate(example_indices):
        s = slice(int(bounds[b]), int(bounds[b + 1]))
        out.append(ExampleRecord(
            example=int(ex), length=int(lengths[b]), t=(rows[s] % seq).astype(np.int32),
            ids=np.ascontiguousarray(ids[s], dtype=np.int32),
            logprobs={r: np.ascontiguousarray(v[s], dtype=np.float32) for r, v in logprobs.items()},
            tail={r: np.ascontiguousarray(v[s], dtype=np.float32) for r, v in tail.items()},
        ).check())
    return out


def assemble_batch(examples: Sequence[ExampleRecord], seq_len: int, batch_id: int | str, tau: float,
                   vocab_size: int, roles: Sequence[str] | None = None, tokenizer_fingerprint: str = "",
                   meta: dict[str, Any] | None = None) -> Any:
    """The rows-form batch record of `examples` (in batch order) padded to length `seq_len`.

    rows = b * seq_len + t; roles: the roles to keep (default: all the first example has). Every position
    must fit: t < seq_len (an example longer than the batch raises CacheError naming it).
    """
    if not examples:
        raise CacheError(f"batch {batch_id}: no examples to assemble")
    keep = list(roles) if roles is not None else list(examples[0].logprobs)
    k = examples[0].ids.shape[1]
    parts_rows = []
    for b, ex in enumerate(examples):
        if ex.ids.shape[1] != k:
            raise CacheError(f"batch {batch_id}: example {ex.example} has K = {ex.ids.shape[1]}, others {k}")
        missing = [r for r in keep if r not in ex.logprobs]
        if missing:
            raise CacheError(f"batch {batch_id}: example {ex.example} lacks roles {missing}")
        if ex.num_rows and int(ex.t[-1]) >= seq_len:
            raise CacheError(f"batch {batch_id}: example {ex.example} has a counted position {int(ex.t[-1])} "
                             f">= the batch length {seq_len}")
        parts_rows.append(b * seq_len + ex.t.astype(np.int64))
    rows = np.concatenate(parts_rows).astype(np.int32)
    cls = rows_record_class()
    return cls(
        batch_id=batch_id,
        ids=np.concatenate([ex.ids for ex in examples]).astype(np.int32, copy=False),
        logprobs={r: np.concatenate([ex.logprobs[r] for ex in examples]) for r in keep},
        tail={r: np.concatenate([ex.tail[r] for ex in examples]) for r in keep},
        rows=rows,
        batch_shape=(len(examples), int(seq_len)),
        tau=float(tau),
        vocab_size=int(vocab_size),
        tokenizer_fingerprint=tokenizer_fingerprint,
        wire_dtype="float32",
        meta=dict(meta or {}),
    )
