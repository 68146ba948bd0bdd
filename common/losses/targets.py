"""SparseTargets: the torch view of a TopKRecord, as the loss consumes it (counted positions only)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.topk import TopKRecord

__all__ = ["SparseTargets", "LossInputError", "targets_from_record"]


class LossInputError(ValueError):
    """The loss got inputs it cannot use (missing role, shape mismatch, label out of range).

    The message names the method, the role or tensor, and the batch id when known.
    """


@dataclass
class SparseTargets:
    """Teacher-side inputs of the loss for one batch, at its counted positions only (INTERFACES.md 1).

    ids:        [N, K] long, the support of each counted position (the SFT teacher's top-k ids; K = k + 1
                when a forced id, e.g. the label of an on-policy sample, was added)
    logprobs:   role -> [N, K] fp32, log_softmax(logits / tau) over the full vocabulary, at `ids`
    tail:       role -> [N] fp32, the role's mass off the support, 1 - sum_S p
    rows:       [N] long, flat index b * T + t of each counted position, strictly increasing
    batch_shape: (B, T) of the batch the rows index
    tau:        the temperature the teachers used
    vocab_size: the tokenizer's vocabulary size |V| (student logits beyond it are padding, cut)
    batch_id:   for error messages
    """

    ids: Tensor
    logprobs: dict[str, Tensor]
    tail: dict[str, Tensor]
    rows: Tensor
    batch_shape: tuple[int, int]
    tau: float
    vocab_size: int
    batch_id: Any = None

    @property
    def shape(self) -> tuple[int, int]:
        """(N, K): counted positions and support size."""
        n, k = self.ids.shape
        return int(n), int(k)

    @property
    def roles(self) -> list[str]:
        return list(self.logprobs)

    @property
    def mask(self) -> Tensor:
        """[B, T] bool, True at the counted positions (derived from `rows`)."""
        b, t = self.batch_shape
        out = torch.zeros(b * t, dtype=torch.bool, device=self.rows.device)
        out[self.rows] = True
        return out.view(b, t)

    def with_role(self, role: str, logprobs: Tensor, tail: Tensor) -> SparseTargets:
        """A new SparseTargets with one more role (e.g. `student_base` from the worker's frozen copy).

        logprobs: [N, K] log-probs at this object's `ids`; tail: [N]. Both are stored as fp32.
        """
        n, k = self.shape
        if tuple(logprobs.shape) != (n, k):
            raise LossInputError(f"batch {self.batch_id}, role {role!r}: logprobs shape "
                                 f"{tuple(logprobs.shape)} != ids shape {(n, k)}")
        if tuple(tail.shape) != (n,):
            raise LossInputError(f"batch {self.batch_id}, role {role!r}: tail shape {tuple(tail.shape)} != {(n,)}")
        lp = dict(self.logprobs)
        tl = dict(self.tail)
        lp[role] = logprobs.detach().to(device=self.ids.device, dtype=torch.float32)
        tl[role] = tail.detach().to(device=self.ids.device, dtype=torch.float32)
        return SparseTargets(self.ids, lp, tl, self.rows, self.batch_shape, self.tau, self.vocab_size,
                             self.batch_id)

    def require(self, roles: list[str], method: str) -> None:
        """Raise LossInputError naming the first role `method` needs that is missing."""
        for role in roles:
            if role not in self.logprobs:
                raise LossInputError(f"batch {self.batch_id}: loss method {method!r} needs role {role!r}, "
                                     f"targets have roles {self.roles}")


def _to_torch(x: np.ndarray, dtype: torch.dtype, device: torch.device | str) -> Tensor:
    # torch.tensor copies: Ray hands out read-only numpy views, which torch.from_numpy would warn about.
    return torch.tensor(np.ascontiguousarray(x), dtype=dtype).to(device)


def targets_from_record(record: TopKRecord, device: torch.device | str = "cpu") -> SparseTargets:
    """Decode a wire record (fp32, fp16 or bf16-as-uint16 log-probs) into fp32 torch tensors on `device`.

    A record in rows form (`record.rows`, ids [N, K]) is taken as it is; a record over every position
    (ids [B, T, k] with a [B, T] mask) is cut to its masked positions: rows = flat nonzero of the mask.
    The record is not re-validated here: the receiver calls `record.validate(...)` on receipt.
    """
    ids = np.asarray(record.ids)
    rows_attr = getattr(record, "rows", None)
    if ids.ndim == 2 and rows_attr is not None:  # rows form
        rows = np.asarray(rows_attr, dtype=np.int64)
        batch_shape = tuple(int(x) for x in getattr(record, "batch_shape"))  # noqa: B009 (rows-form records)

        def select(a: np.ndarray) -> np.ndarray:
            return a
    elif ids.ndim == 3:
        b, t, k = ids.shape
        batch_shape = (int(b), int(t))
        rows = np.flatnonzero(np.asarray(record.mask, dtype=bool).reshape(-1))

        def select(a: np.ndarray) -> np.ndarray:
            return a.reshape(b * t, *a.shape[2:])[rows]
    else:
        raise LossInputError(f"batch {record.batch_id}: record ids of shape {ids.shape} are neither [N, K] "
                             "with rows nor [B, T, k]")
    lp = {role: _to_torch(select(record.role_logprobs(role)), torch.float32, device) for role in record.logprobs}
    tail = {}
    for role in record.logprobs:
        if role not in record.tail:
            raise LossInputError(f"batch {record.batch_id}, role {role!r}: log-probs without tail mass")
        tail[role] = _to_torch(select(np.asarray(record.tail[role], dtype=np.float32)), torch.float32, device)
    return SparseTargets(
        ids=_to_torch(select(ids), torch.long, device),
        logprobs=lp,
        tail=tail,
        rows=_to_torch(rows, torch.long, device),
        batch_shape=(batch_shape[0], batch_shape[1]),
        tau=float(record.tau),
        vocab_size=int(record.vocab_size),
        batch_id=record.batch_id,
    )
