"""Per-example teacher records, and the batch records (rows form) assembled from them.

A cache stores one `ExampleRecord` per training example: the example's counted positions `t` in its own
coordinates (position t holds the distribution over token t + 1, see docs/ARCHITECTURE.md) and their
support ids, log-probs and tails. Any batching can be assembled from them: a batch of examples padded to
length T is the concatenation of the examples' rows with `rows = b * T + t` (docs/ARCHITECTURE.md),
a `common.topk.TopKRecord`. Pure numpy.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.codec import SPAN_CAP, get_encoding
from common.topk import MASS_EPS, TopKRecord

from .errors import CacheError

__all__ = ["ExampleRecord", "split_batch", "assemble_batch", "encoding_mass_eps"]


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

    def check(self, mass_eps: float | None = None) -> ExampleRecord:
        """Raise CacheError naming the example if the arrays disagree; with mass_eps, also if a role's
        support mass plus tail exceeds 1 + mass_eps (what TopKRecord.validate checks)."""
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
            if mass_eps is not None and n:
                mass = float((np.exp(lp.astype(np.float64)).sum(-1) + self.tail[role]).max())
                if mass > 1 + mass_eps:
                    raise CacheError(f"{where}, role {role!r}: probability mass {mass:.6f} > 1 + {mass_eps}")
        return self


def encoding_mass_eps(encoding: str, roles: Iterable[str]) -> float:
    """How far above 1 a role's support mass plus tail may decode from `encoding` (for TopKRecord.validate).

    Per role, the decoded log-probs err by at most e (nats): 0 for f32; for f16 / bf16 a relative rounding
    u = 2^-11 / 2^-8 of |lp|, whose effect on the mass, sum p (e^(u |lp|) - 1), is about u * sum p |lp| <=
    u * (log K + 1) (taken for K up to 2^20); for uq<b> half its row's grid step, at most
    SPAN_CAP / (2^b - 2) / 2 (times fp16's rounding up of the step); a shift role adds its reference's
    error. The mass then grows by at most exp(e) - 1, plus the fp32 check's 1e-3. The bound is loose (a
    row spanning 80 nats is rare); every build checks the mass at fp32 before encoding.
    """
    layout = get_encoding(encoding).layout(roles)
    k_log = math.log(1 << 20)

    def err(role: str) -> float:
        codec, ref = layout[role]
        if codec.kind == "f32":
            own = 0.0
        elif codec.kind in ("f16", "bf16"):
            own = (k_log + 1.0) * (2.0**-11 if codec.kind == "f16" else 2.0**-8)
        else:
            own = SPAN_CAP / ((1 << codec.bits) - 2) / 2 * (1 + 2.0**-10)
        return own + (err(ref) if ref is not None else 0.0)

    worst = max((err(r) for r in layout), default=0.0)
    return float(math.expm1(worst) + MASS_EPS["float32"])


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
                   meta: dict[str, Any] | None = None) -> TopKRecord:
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
    return TopKRecord(
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
