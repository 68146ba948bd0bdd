"""The wire record: sparse top-k teacher distributions for one batch (DESIGN.md section 2).

The SFT teacher picks the support `ids` = its top-k token ids per position. Every other role's
distribution is gathered at the same ids. Each role also reports its tail mass `1 - sum_S p`, so a loss
can keep the rest of the vocabulary as one bucket or drop it.

Position convention: position t holds the distribution a model predicts *after* reading token t
(i.e. over token t+1), exactly the model's logits[:, t]. `mask[b, t]` is True where that prediction
is trained on (a response token follows).

Pure numpy: this module never imports torch, ray or transformers, so it can be used anywhere.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["TopKRecord", "RecordError", "WIRE_DTYPES", "ROLE_SFT", "ROLE_BASE", "ROLE_STUDENT_BASE",
           "pair_roles", "to_wire_dtype"]

ROLE_SFT = "sft"
ROLE_BASE = "base"
ROLE_STUDENT_BASE = "student_base"

# numpy has no bfloat16; on the wire bf16 travels as its upper 16 bits in a uint16 array.
WIRE_DTYPES = ("float32", "float16", "bfloat16")

# Mass above 1 is allowed by this much: fp32 sums of k probabilities plus the tail drift by a few ulps,
# and bf16 log-probs (8-bit mantissa) are off by up to ~0.4% each.
_MASS_EPS = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 2e-2}


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


def _from_wire_dtype(x: np.ndarray, wire_dtype: str) -> np.ndarray:
    if wire_dtype == "bfloat16":
        return (x.astype(np.uint32) << 16).view(np.float32)
    return x.astype(np.float32, copy=False)


@dataclass
class TopKRecord:
    """Sparse teacher distributions for one batch.

    ids:       [B, T, k] int32, the support (the SFT teacher's top-k ids, descending by its log-prob)
    logprobs:  role -> [B, T, k] log-probs at `ids` (wire dtype: float32, float16 or bf16-as-uint16),
               log-softmax of logits / tau over the full vocabulary
    tail:      role -> [B, T] float32, the role's probability mass outside the support (1 - sum_S p)
    mask:      [B, T] bool, positions that are trained on
    """

    batch_id: int | str
    ids: np.ndarray
    logprobs: dict[str, np.ndarray]
    tail: dict[str, np.ndarray]
    mask: np.ndarray
    tau: float
    vocab_size: int
    tokenizer_fingerprint: str = ""
    wire_dtype: str = "float32"
    meta: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ shapes and access
    @property
    def shape(self) -> tuple[int, int, int]:
        b, t, k = self.ids.shape
        return int(b), int(t), int(k)

    @property
    def roles(self) -> list[str]:
        return list(self.logprobs)

    def role_logprobs(self, role: str) -> np.ndarray:
        """fp32 [B, T, k] log-probs of a role, decoded from the wire dtype."""
        if role not in self.logprobs:
            raise RecordError(self.batch_id, role, f"missing; record has roles {self.roles}")
        return _from_wire_dtype(self.logprobs[role], self.wire_dtype)

    def nbytes(self) -> int:
        arrays = [self.ids, self.mask, *self.logprobs.values(), *self.tail.values()]
        return int(sum(a.nbytes for a in arrays))

    def bytes_per_token(self) -> float:
        b, t, _ = self.shape
        return self.nbytes() / max(1, b * t)

    def with_role(self, role: str, logprobs: np.ndarray, tail: np.ndarray) -> TopKRecord:
        """A copy with one more role (fp32 log-probs at this record's ids), encoded to the wire dtype."""
        lp = dict(self.logprobs)
        tl = dict(self.tail)
        lp[role] = to_wire_dtype(logprobs, self.wire_dtype)
        tl[role] = np.ascontiguousarray(tail, dtype=np.float32)
        return TopKRecord(self.batch_id, self.ids, lp, tl, self.mask, self.tau, self.vocab_size,
                          self.tokenizer_fingerprint, self.wire_dtype, dict(self.meta))

    # ------------------------------------------------------------------ validation
    def validate(self, required_roles: list[str] | tuple[str, ...] = (), check_mass: bool = True) -> TopKRecord:
        """Check shapes, dtypes, finiteness, id range and mass <= 1 + eps. Raises RecordError."""
        bid = self.batch_id
        if self.wire_dtype not in WIRE_DTYPES:
            raise RecordError(bid, None, f"unknown wire dtype {self.wire_dtype!r}")
        if self.ids.ndim != 3:
            raise RecordError(bid, None, f"ids must be [B, T, k], got shape {tuple(self.ids.shape)}")
        if self.ids.dtype != np.int32:
            raise RecordError(bid, None, f"ids must be int32, got {self.ids.dtype}")
        b, t, k = self.shape
        if not 0 < k <= self.vocab_size:
            raise RecordError(bid, None, f"k={k} out of range (1..vocab_size={self.vocab_size})")
        if self.mask.shape != (b, t):
            raise RecordError(bid, None, f"mask shape {tuple(self.mask.shape)} != {(b, t)}")
        if self.ids.size and (self.ids.min() < 0 or self.ids.max() >= self.vocab_size):
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
        eps = _MASS_EPS[self.wire_dtype]
        valid = self.mask.astype(bool)
        for role in self.logprobs:
            lp = self.role_logprobs(role)
            tail = np.asarray(self.tail[role])
            if lp.shape != (b, t, k):
                raise RecordError(bid, role, f"logprobs shape {tuple(lp.shape)} != ids shape {(b, t, k)}")
            if tail.shape != (b, t):
                raise RecordError(bid, role, f"tail shape {tuple(tail.shape)} != {(b, t)}")
            lp_v, tail_v = lp[valid], tail[valid]
            # -inf is a legal log-prob (a token the model gives zero mass); NaN and +inf are not.
            if np.isnan(lp_v).any() or np.isposinf(lp_v).any():
                n = int(np.isnan(lp_v).sum() + np.isposinf(lp_v).sum())
                raise RecordError(bid, role, f"{n} non-finite log-prob values (NaN or +inf)")
            if lp_v.size and lp_v.max() > eps:
                raise RecordError(bid, role, f"log-prob {lp_v.max():.4g} > 0")
            if not np.isfinite(tail_v).all():
                raise RecordError(bid, role, "non-finite tail mass")
            if tail_v.size and (tail_v.min() < -eps or tail_v.max() > 1 + eps):
                raise RecordError(bid, role, f"tail mass outside [0, 1]: [{tail_v.min():.4g}, {tail_v.max():.4g}]")
            if check_mass and lp_v.size:
                mass = np.exp(lp_v.astype(np.float64)).sum(-1) + tail_v
                worst = float(mass.max())
                if worst > 1 + eps:
                    raise RecordError(bid, role, f"probability mass {worst:.6f} > 1 + {eps} (support + tail)")
        return self

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
    ) -> TopKRecord:
        """Build a record from full-vocabulary log-probs `[B, T, V]` per role (already at temperature tau).

        The support is `support_role`'s top-k (ties broken by lower id); tails are computed from the
        mass off the support in float64 so that k = V gives tail exactly 0.
        """
        if support_role not in dense_logprobs:
            raise RecordError(batch_id, support_role, "support role missing from dense inputs")
        ref = np.asarray(dense_logprobs[support_role], dtype=np.float32)
        b, t, v = ref.shape
        if not 0 < k <= v:
            raise RecordError(batch_id, support_role, f"k={k} out of range (1..vocab_size={v})")
        # stable descending sort: ties keep the lower id first
        order = np.argsort(-ref, axis=-1, kind="stable")[..., :k].astype(np.int32)
        logprobs: dict[str, np.ndarray] = {}
        tails: dict[str, np.ndarray] = {}
        for role, dense in dense_logprobs.items():
            dense = np.asarray(dense, dtype=np.float32)
            if dense.shape != (b, t, v):
                raise RecordError(batch_id, role, f"dense shape {dense.shape} != {(b, t, v)}")
            at = np.take_along_axis(dense, order, axis=-1)
            off = np.exp(dense.astype(np.float64))
            np.put_along_axis(off, order.astype(np.int64), 0.0, axis=-1)
            logprobs[role] = to_wire_dtype(at, wire_dtype)
            tails[role] = np.clip(off.sum(-1), 0.0, 1.0).astype(np.float32)
        m = np.ones((b, t), dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
        return cls(batch_id, order, logprobs, tails, m, float(tau), int(v), tokenizer_fingerprint, wire_dtype)

    # ------------------------------------------------------------------ (de)serialisation for caches
    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat name -> array mapping (for safetensors/npz caches; no pickle)."""
        out = {"ids": self.ids, "mask": self.mask.astype(np.uint8)}
        for role in self.logprobs:
            out[f"logprobs.{role}"] = self.logprobs[role]
            out[f"tail.{role}"] = self.tail[role]
        return out

    def header(self) -> dict[str, Any]:
        return {"batch_id": self.batch_id, "tau": self.tau, "vocab_size": self.vocab_size,
                "tokenizer_fingerprint": self.tokenizer_fingerprint, "wire_dtype": self.wire_dtype,
                "meta": self.meta}

    @classmethod
    def from_arrays(cls, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> TopKRecord:
        lp = {n.split(".", 1)[1]: a for n, a in arrays.items() if n.startswith("logprobs.")}
        tl = {n.split(".", 1)[1]: a for n, a in arrays.items() if n.startswith("tail.")}
        return cls(header["batch_id"], arrays["ids"], lp, tl, arrays["mask"].astype(bool), float(header["tau"]),
                   int(header["vocab_size"]), header.get("tokenizer_fingerprint", ""),
                   header.get("wire_dtype", "float32"), dict(header.get("meta", {})))
