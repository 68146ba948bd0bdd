"""SparseTargets: the torch view of a TopKRecord, as the loss consumes it."""

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
    """Teacher-side inputs of the loss for one batch (all fp32 except ids and mask).

    ids:       [B, T, k] long, the support (the SFT teacher's top-k ids)
    logprobs:  role -> [B, T, k] fp32, log_softmax(logits / tau) over the full vocabulary, at `ids`
    tail:      role -> [B, T] fp32, the role's mass off the support, 1 - sum_S p
    mask:      [B, T] bool, positions that carry a teacher distribution
    tau:       the temperature the teachers used
    vocab_size: the tokenizer's vocabulary size |V| (student logits beyond it are padding, cut)
    batch_id:  for error messages
    """

    ids: Tensor
    logprobs: dict[str, Tensor]
    tail: dict[str, Tensor]
    mask: Tensor
    tau: float
    vocab_size: int
    batch_id: Any = None

    @property
    def shape(self) -> tuple[int, int, int]:
        b, t, k = self.ids.shape
        return int(b), int(t), int(k)

    @property
    def roles(self) -> list[str]:
        return list(self.logprobs)

    def with_role(self, role: str, logprobs: Tensor, tail: Tensor) -> SparseTargets:
        """A new SparseTargets with one more role (e.g. `student_base` from the worker's frozen copy).

        logprobs: [B, T, k] log-probs at this object's `ids`; tail: [B, T]. Both are stored as fp32.
        """
        b, t, k = self.shape
        if tuple(logprobs.shape) != (b, t, k):
            raise LossInputError(f"batch {self.batch_id}, role {role!r}: logprobs shape "
                                 f"{tuple(logprobs.shape)} != ids shape {(b, t, k)}")
        if tuple(tail.shape) != (b, t):
            raise LossInputError(f"batch {self.batch_id}, role {role!r}: tail shape {tuple(tail.shape)} != {(b, t)}")
        lp = dict(self.logprobs)
        tl = dict(self.tail)
        lp[role] = logprobs.detach().to(device=self.ids.device, dtype=torch.float32)
        tl[role] = tail.detach().to(device=self.ids.device, dtype=torch.float32)
        return SparseTargets(self.ids, lp, tl, self.mask, self.tau, self.vocab_size, self.batch_id)

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

    The record is not re-validated here: the receiver calls `record.validate(...)` on receipt.
    """
    lp = {role: _to_torch(record.role_logprobs(role), torch.float32, device) for role in record.logprobs}
    tail = {}
    for role in record.logprobs:
        if role not in record.tail:
            raise LossInputError(f"batch {record.batch_id}, role {role!r}: log-probs without tail mass")
        tail[role] = _to_torch(np.asarray(record.tail[role], dtype=np.float32), torch.float32, device)
    return SparseTargets(
        ids=_to_torch(record.ids, torch.long, device),
        logprobs=lp,
        tail=tail,
        mask=_to_torch(np.asarray(record.mask, dtype=bool), torch.bool, device),
        tau=float(record.tau),
        vocab_size=int(record.vocab_size),
        batch_id=record.batch_id,
    )
