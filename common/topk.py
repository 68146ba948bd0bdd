"""The wire record: sparse top-k teacher distributions for one batch, at its counted positions only.

The SFT teacher picks the support `ids` = its top-k token ids per position. Every other role's
distribution is gathered at the same ids. Each role also reports its tail mass `1 - sum_S p`, so a loss
can keep the rest of the vocabulary as one bucket or drop it.

Position convention: position t holds the distribution a model predicts *after* reading token t
(i.e. over token t+1), exactly the model's logits[:, t]. A *counted* position is one the loss trains on
(loss_mask true: a response token follows). A record carries the counted positions only: `rows` lists them
as flat indices b * T + t of the batch [B, T], strictly increasing, and row n of every array belongs to
position rows[n]. Prompt and padding positions are neither scored by the teachers nor sent.

Pure numpy: this module never imports torch, ray or transformers, so it can be used anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["TopKRecord", "RecordError", "WIRE_DTYPES", "MASS_EPS", "ROLE_SFT", "ROLE_BASE", "ROLE_STUDENT_BASE",
           "pair_roles", "to_wire_dtype", "from_wire_dtype", "rows_from_mask", "scatter_rows",
           "topk_with_include"]

ROLE_SFT = "sft"
ROLE_BASE = "base"
ROLE_STUDENT_BASE = "student_base"

# numpy has no bfloat16; on the wire bf16 travels as its upper 16 bits in a uint16 array.
WIRE_DTYPES = ("float32", "float16", "bfloat16")

# Mass above 1 is allowed by this much: fp32 sums of k probabilities plus the tail drift by a few ulps,
# and bf16 log-probs (8-bit mantissa) are off by up to ~0.4% each.
MASS_EPS = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 2e-2}


def pair_roles(j: int) -> tuple[str, str]:
    """Role names (sft, base) of teacher pair j. Pair 0 is the main pair ('sft', 'base')."""
    return (ROLE_SFT, ROLE_BASE) if j == 0 else (f"{ROLE_SFT}_{j}", f"{ROLE_BASE}_{j}")


class RecordError(ValueError):
    """A record failed validation. The message names the batch id, the role and what is wrong."""

    def __init__(self, batch_id: Any, role: str | None, what: str):
        self.batch_id = batch_id
        self.role = role
        self.what = what
        who = f"role {role!r}" if role else "record"
        super().__init__(f"bad teacher record for batch {batch_id}, {who}: {what}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Ray pickles exceptions across processes; rebuild from the three fields, not from str(self).
        return (type(self), (self.batch_id, self.role, self.what))


def to_wire_dtype(x: np.ndarray, wire_dtype: str) -> np.ndarray:
    """fp32 -> the wire dtype. bfloat16 is rounded to nearest-even and stored as uint16 bits."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if wire_dtype == "float32":
        return x
    if wire_dtype == "float16":
        return x.astype(np.float16)
    if wire_dtype == "bfloat16":
        bits = x.view(np.uint32)
        rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
        return ((bits + rounding) >> 16).astype(np.uint16)
    raise ValueError(f"unknown wire dtype {wire_dtype!r}; expected one of {WIRE_DTYPES}")


def from_wire_dtype(x: np.ndarray, wire_dtype: str) -> np.ndarray:
    """The wire dtype -> fp32 (exact: every wire value is an fp32 value)."""
    if wire_dtype == "bfloat16":
        return (np.asarray(x).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x).astype(np.float32, copy=False)


def rows_from_mask(mask: np.ndarray) -> np.ndarray:
    """[B, T] bool -> the flat indices b * T + t of its true positions, int32 [N], increasing."""
    return np.flatnonzero(np.asarray(mask, dtype=bool)).astype(np.int32)


def scatter_rows(values: np.ndarray, rows: np.ndarray, batch_shape: tuple[int, int], fill: Any) -> np.ndarray:
    """[N, ...] values at `rows` -> [B, T, ...], every other position holding `fill`."""
    b, t = batch_shape
    values = np.asarray(values)
    out = np.full((b * t, *values.shape[1:]), fill, dtype=values.dtype)
    out[np.asarray(rows, dtype=np.int64)] = values
    return out.reshape(b, t, *values.shape[1:])


def topk_with_include(ref: np.ndarray, k: int, include: np.ndarray | None = None) -> np.ndarray:
    """Support ids [N, K] of log-probs ref [N, V]: the top-k descending (ties: lower id first).

    include [N] (optional): one id per row forced into the support, K = k + 1 with all ids distinct: when
    the id is already among the top-k, slot k holds the (k+1)-th best id, else the forced id.
    This is the reference the teacher engines follow (common.sparse does the same in torch).
    """
    n, v = ref.shape
    width = k if include is None else k + 1
    if not 0 < width <= v:
        raise ValueError(f"support of {width} ids out of range (1..vocab_size={v})"
                         + ("" if include is None else f": k={k} plus the forced id"))
    order = np.argsort(-ref, axis=-1, kind="stable")[:, :width].astype(np.int32)
    if include is None:
        return order
    forced = np.asarray(include, dtype=np.int64).reshape(n)
    if n and (forced.min() < 0 or forced.max() >= v):
        raise ValueError(f"forced ids out of range [0, {v}): min {forced.min()}, max {forced.max()}")
    in_top = (order[:, :k] == forced[:, None]).any(-1)
    order[:, k] = np.where(in_top, order[:, k], forced)
    return order


@dataclass
class TopKRecord:
    """Sparse teacher distributions for one batch, at its N counted positions.

    ids:       [N, K] int32, the support (the SFT teacher's top-k ids, descending by its log-prob; K = k + 1
               when a forced id per row was added, see `topk_with_include`)
    logprobs:  role -> [N, K] log-probs at `ids` (wire dtype: float32, float16 or bf16-as-uint16),
               log-softmax of logits / tau over the full vocabulary
    tail:      role -> [N] float32, the role's probability mass outside the support (1 - sum_S p)
    rows:      [N] int32, flat index b * T + t of each counted position, strictly increasing
    batch_shape: (B, T) of the batch the rows index
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

    # ------------------------------------------------------------------ shapes and access
    @property
    def shape(self) -> tuple[int, int]:
        """(N, K): counted positions, support size."""
        n, k = self.ids.shape
        return int(n), int(k)

    @property
    def num_rows(self) -> int:
        return int(self.ids.shape[0])

    @property
    def roles(self) -> list[str]:
        return list(self.logprobs)

    @property
    def mask(self) -> np.ndarray:
        """[B, T] bool, true at the counted positions (derived from rows)."""
        b, t = self.batch_shape
        m = np.zeros(b * t, dtype=bool)
        m[np.asarray(self.rows, dtype=np.int64)] = True
        return m.reshape(b, t)

    def scatter(self, values: np.ndarray, fill: Any) -> np.ndarray:
        """[N, ...] per-row values (e.g. `ids`, `role_logprobs(r)`) -> [B, T, ...], `fill` elsewhere."""
        return scatter_rows(values, self.rows, self.batch_shape, fill)

    def role_logprobs(self, role: str) -> np.ndarray:
        """fp32 [N, K] log-probs of a role, decoded from the wire dtype."""
        if role not in self.logprobs:
            raise RecordError(self.batch_id, role, f"missing; record has roles {self.roles}")
        return from_wire_dtype(self.logprobs[role], self.wire_dtype)

    def nbytes(self) -> int:
        """Bytes on the wire: ids, rows, every role's log-probs and tail (the header is not counted)."""
        arrays = [self.ids, self.rows, *self.logprobs.values(), *self.tail.values()]
        return int(sum(np.asarray(a).nbytes for a in arrays))

    def bytes_per_token(self) -> float:
        """Bytes per counted (trained) token."""
        return self.nbytes() / max(1, self.num_rows)

    def with_role(self, role: str, logprobs: np.ndarray, tail: np.ndarray) -> TopKRecord:
        """A copy with one more role (fp32 [N, K] log-probs at this record's ids, tail [N]) in the wire dtype."""
        lp = dict(self.logprobs)
        tl = dict(self.tail)
        lp[role] = to_wire_dtype(logprobs, self.wire_dtype)
        tl[role] = np.ascontiguousarray(tail, dtype=np.float32)
        return TopKRecord(self.batch_id, self.ids, lp, tl, self.rows, self.batch_shape, self.tau, self.vocab_size,
                          self.tokenizer_fingerprint, self.wire_dtype, dict(self.meta))

    # ------------------------------------------------------------------ validation
    def validate(self, required_roles: list[str] | tuple[str, ...] = (), check_mass: bool = True) -> TopKRecord:
        """Check shapes, dtypes, rows, finiteness, id range and mass <= 1 + eps. Raises RecordError.

        eps is the wire dtype's (MASS_EPS); a record decoded from a lossy storage encoding (the teacher cache)
        states its own bound in meta["mass_eps"] (teacher_service.cache.records.encoding_mass_eps), used when
        larger: its values were checked at fp32 before they were encoded."""
        bid = self.batch_id
        if self.wire_dtype not in WIRE_DTYPES:
            raise RecordError(bid, None, f"unknown wire dtype {self.wire_dtype!r}")
        if self.ids.ndim != 2:
            raise RecordError(bid, None, f"ids must be [N, K], got shape {tuple(self.ids.shape)}")
        if self.ids.dtype != np.int32:
            raise RecordError(bid, None, f"ids must be int32, got {self.ids.dtype}")
        n, k = self.shape
        if not 0 < k <= self.vocab_size:
            raise RecordError(bid, None, f"k={k} out of range (1..vocab_size={self.vocab_size})")
        self._validate_rows(n)
        if n and (self.ids.min() < 0 or self.ids.max() >= self.vocab_size):
            raise RecordError(bid, None, f"ids out of range [0, {self.vocab_size}): "
                                         f"min {self.ids.min()}, max {self.ids.max()}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            raise RecordError(bid, None, f"tau must be a positive number, got {self.tau}")
        for role in required_roles:
            if role not in self.logprobs:
                raise RecordError(bid, role, f"missing; record has roles {self.roles}")
        if set(self.logprobs) != set(self.tail):
            raise RecordError(bid, None, f"roles with log-probs {sorted(self.logprobs)} != "
                                         f"roles with tail {sorted(self.tail)}")
        eps = MASS_EPS[self.wire_dtype]
        mass_eps = max(eps, float(self.meta.get("mass_eps", eps)))
        for role in self.logprobs:
            lp = self.role_logprobs(role)
            tail = np.asarray(self.tail[role])
            if lp.shape != (n, k):
                raise RecordError(bid, role, f"logprobs shape {tuple(lp.shape)} != ids shape {(n, k)}")
            if tail.shape != (n,):
                raise RecordError(bid, role, f"tail shape {tuple(tail.shape)} != {(n,)}")
            # -inf is a legal log-prob (a token the model gives zero mass); NaN and +inf are not.
            if np.isnan(lp).any() or np.isposinf(lp).any():
                bad = int(np.isnan(lp).sum() + np.isposinf(lp).sum())
                raise RecordError(bid, role, f"{bad} non-finite log-prob values (NaN or +inf)")
            if lp.size and lp.max() > eps:
                raise RecordError(bid, role, f"log-prob {lp.max():.4g} > 0")
            if not np.isfinite(tail).all():
                raise RecordError(bid, role, "non-finite tail mass")
            if tail.size and (tail.min() < -eps or tail.max() > 1 + eps):
                raise RecordError(bid, role, f"tail mass outside [0, 1]: [{tail.min():.4g}, {tail.max():.4g}]")
            if check_mass and lp.size:
                mass = np.exp(lp.astype(np.float64)).sum(-1) + tail
                worst = float(mass.max())
                if worst > 1 + mass_eps:
                    raise RecordError(bid, role, f"probability mass {worst:.6f} > 1 + {mass_eps:.4g} (support + tail)")
        return self

    def _validate_rows(self, n: int) -> None:
        bid = self.batch_id
        shape = tuple(self.batch_shape)
        if len(shape) != 2 or any(int(s) < 0 for s in shape):
            raise RecordError(bid, None, f"batch_shape must be (B, T), got {self.batch_shape}")
        rows = np.asarray(self.rows)
        if rows.ndim != 1 or rows.shape[0] != n:
            raise RecordError(bid, None, f"rows shape {tuple(rows.shape)} != ({n},): one row per support row")
        if rows.dtype != np.int32:
            raise RecordError(bid, None, f"rows must be int32, got {rows.dtype}")
        total = int(shape[0]) * int(shape[1])
        if n and (rows.min() < 0 or rows.max() >= total):
            raise RecordError(bid, None, f"rows out of range [0, B*T={total}) for batch_shape {shape}: "
                                         f"min {rows.min()}, max {rows.max()}")
        if n > 1 and not (np.diff(rows.astype(np.int64)) > 0).all():
            at = int(np.argmin(np.diff(rows.astype(np.int64)) > 0))
            raise RecordError(bid, None, f"rows must be strictly increasing: rows[{at}]={rows[at]}, "
                                         f"rows[{at + 1}]={rows[at + 1]}")

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_dense(
        cls,
        batch_id: int | str,
        dense_logprobs: dict[str, np.ndarray],
        k: int,
        mask: np.ndarray | None = None,
        tau: float = 1.0,
        support_role: str = ROLE_SFT,
        wire_dtype: str = "float32",
        tokenizer_fingerprint: str = "",
        include: np.ndarray | None = None,
    ) -> TopKRecord:
        """Build a record from full-vocabulary log-probs `[B, T, V]` per role (already at temperature tau).

        mask [B, T] bool selects the counted positions (default: all). The support is `support_role`'s
        top-k (ties broken by lower id); include [B, T] (optional) forces its value at each counted position
        into the support (K = k + 1, `topk_with_include`). Tails are computed from the mass off the support
        in float64, so k = V gives tail exactly 0.
        """
        if support_role not in dense_logprobs:
            raise RecordError(batch_id, support_role, "support role missing from dense inputs")
        ref = np.asarray(dense_logprobs[support_role], dtype=np.float32)
        b, t, v = ref.shape
        m = np.ones((b, t), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        if m.shape != (b, t):
            raise RecordError(batch_id, None, f"mask shape {m.shape} != {(b, t)}")
        rows = rows_from_mask(m)
        forced = None if include is None else np.asarray(include).reshape(b * t)[rows]
        try:
            order = topk_with_include(ref.reshape(b * t, v)[rows], k, forced)
        except ValueError as err:
            raise RecordError(batch_id, support_role, f"k={k}: {err}") from None
        logprobs: dict[str, np.ndarray] = {}
        tails: dict[str, np.ndarray] = {}
        for role, dense in dense_logprobs.items():
            dense = np.asarray(dense, dtype=np.float32)
            if dense.shape != (b, t, v):
                raise RecordError(batch_id, role, f"dense shape {dense.shape} != {(b, t, v)}")
            at_rows = dense.reshape(b * t, v)[rows]
            at = np.take_along_axis(at_rows, order, axis=-1)
            off = np.exp(at_rows.astype(np.float64))
            np.put_along_axis(off, order.astype(np.int64), 0.0, axis=-1)
            logprobs[role] = to_wire_dtype(at, wire_dtype)
            tails[role] = np.clip(off.sum(-1), 0.0, 1.0).astype(np.float32)
        return cls(batch_id, order, logprobs, tails, rows, (int(b), int(t)), float(tau), int(v),
                   tokenizer_fingerprint, wire_dtype)

    # ------------------------------------------------------------------ (de)serialisation for caches
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat name -> array mapping (for safetensors/npz caches; no pickle)."""
        out = {"ids": self.ids, "rows": np.asarray(self.rows)}
        for role in self.logprobs:
            out[f"logprobs.{role}"] = self.logprobs[role]
            out[f"tail.{role}"] = self.tail[role]
        return out

    def header(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "batch_shape": [int(s) for s in self.batch_shape], "tau": self.tau,
                "vocab_size": self.vocab_size, "tokenizer_fingerprint": self.tokenizer_fingerprint,
                "wire_dtype": self.wire_dtype, "meta": self.meta}

    @classmethod
    def from_arrays(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> TopKRecord:
        lp = {n.split(".", 1)[1]: a for n, a in arrays.items() if n.startswith("logprobs.")}
        tl = {n.split(".", 1)[1]: a for n, a in arrays.items() if n.startswith("tail.")}
        b, t = header["batch_shape"]
        return cls(header["batch_id"], arrays["ids"], lp, tl, arrays["rows"], (int(b), int(t)),
                   float(header["tau"]), int(header["vocab_size"]), header.get("tokenizer_fingerprint", ""),
                   header.get("wire_dtype", "float32"), dict(header.get("meta", {})))
