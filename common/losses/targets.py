"""SparseTargets: the torch view of a teacher record, as the loss consumes it; and its constructors.

Two ways a record reaches the loss (ARCHITECTURE.md, "the record path"):
- object store: a numpy `TopKRecord`, validated by the assembler -> `targets_from_record(record, device)`;
- Ray Direct Transport: the role parts as torch tensors, as the teachers produced them (CUDA on GPUs) ->
  `targets_from_parts(meta, roles, parts, device)`, which validates them on the device (one host sync per
  record) and never converts them to numpy.
Both give bit-identical SparseTargets for the same teacher outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from common.topk import MASS_EPS, ROLE_SFT, WIRE_DTYPES, RecordError, TopKRecord

__all__ = ["SparseTargets", "LossInputError", "targets_from_record", "targets_from_parts"]


class LossInputError(ValueError):
    """The loss got inputs it cannot use (missing role, shape mismatch, label out of range).

    The message names the method, the role or tensor, and the batch id when known.
    """


@dataclass
class SparseTargets:
    """Teacher-side inputs of the loss for one batch, at its counted positions only (docs/ARCHITECTURE.md).

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


# ---------------------------------------------------------------------------------------------------------
# Constructors (the records branch). They build the rows form of docs/ARCHITECTURE.md ("Position convention").


def _make_targets(ids: Tensor, logprobs: dict[str, Tensor], tail: dict[str, Tensor], rows: Tensor,
                  batch_shape: tuple[int, int], tau: float, vocab_size: int, batch_id: Any) -> SparseTargets:
    """SparseTargets from rows-form tensors (ids [N, K] long, fp32 logprobs [N, K] / tail [N], rows [N] long)."""
    return SparseTargets(ids=ids, logprobs=logprobs, tail=tail, rows=rows, batch_shape=batch_shape, tau=tau,
                         vocab_size=vocab_size, batch_id=batch_id)

_TORCH_WIRE = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _wire_to_device(x: np.ndarray, wire_dtype: str, device: torch.device | str) -> Tensor:
    """A numpy wire array -> fp32 on `device`; the 16-bit wire travels to the device as 16 bits."""
    x = np.ascontiguousarray(x)
    if wire_dtype == "bfloat16":  # uint16 bit patterns: reinterpret as torch bf16 (exact), widen on the device
        t = torch.from_numpy(x.view(np.int16).copy()).view(torch.bfloat16)
    else:
        t = torch.from_numpy(x.copy())  # copy: Ray hands out read-only views
    return t.to(device).float()


def targets_from_record(record: TopKRecord, device: torch.device | str = "cpu") -> SparseTargets:
    """A numpy wire record (fp32, fp16 or bf16-as-uint16 log-probs) -> fp32 SparseTargets on `device`.

    The record is not re-validated here: the receiver validates it on receipt (`record.validate(...)`).
    """
    lp: dict[str, Tensor] = {}
    tail: dict[str, Tensor] = {}
    for role in record.logprobs:
        if role not in record.tail:
            raise LossInputError(f"batch {record.batch_id}, role {role!r}: log-probs without tail mass")
        lp[role] = _wire_to_device(record.logprobs[role], record.wire_dtype, device)
        tail[role] = _wire_to_device(np.asarray(record.tail[role], dtype=np.float32), "float32", device)
    rows = torch.from_numpy(np.asarray(record.rows, dtype=np.int64).copy()).to(device)
    ids = torch.from_numpy(np.asarray(record.ids).copy()).to(device).long()
    b, t = record.batch_shape
    return _make_targets(ids, lp, tail, rows, (int(b), int(t)), float(record.tau), int(record.vocab_size),
                         record.batch_id)


def _meta_rows(meta: dict[str, Any]) -> tuple[np.ndarray, tuple[int, int]]:
    """The record's rows (host numpy, from the sender's loss mask) checked against batch_shape."""
    bid = meta.get("batch_id")
    b, t = (int(s) for s in meta["batch_shape"])
    rows = np.asarray(meta["rows"])
    if rows.ndim != 1 or not np.issubdtype(rows.dtype, np.integer):
        raise RecordError(bid, None, f"rows must be a 1-d integer array, got {rows.dtype} {tuple(rows.shape)}")
    if rows.size and (rows.min() < 0 or rows.max() >= b * t):
        raise RecordError(bid, None, f"rows out of range [0, B*T={b * t}): min {rows.min()}, max {rows.max()}")
    if rows.size > 1 and not (np.diff(rows.astype(np.int64)) > 0).all():
        raise RecordError(bid, None, "rows must be strictly increasing")
    return rows.astype(np.int64), (b, t)


def _part_tensor(x: Any, device: torch.device | str) -> Tensor:
    if isinstance(x, Tensor):
        return x.to(device)  # no-op when the transport delivered it on this device
    return torch.from_numpy(np.array(x)).to(device)  # a numpy part (tests, mixed callers): copied once


def targets_from_parts(meta: dict[str, Any], roles: list[str], parts: list[dict[str, Any]],
                       device: torch.device | str, required_roles: list[str] | tuple[str, ...] = (),
                       ) -> SparseTargets:
    """SparseTargets straight from the teachers' role parts (the RDT path), validated on `device`.

    meta: `teacher_service.assemble.record_meta(...)` (batch_id, rows, batch_shape, tau, vocab_size,
    wire_dtype); parts[i] for roles[i]: {"logprobs": [N, K] (torch wire dtype), "tail": [N] fp32}, plus
    "ids" [N, K] int32 in the sft part. The tensors stay torch tensors (moved to `device` if they are not
    there already); the checks of `TopKRecord.validate` run on the device and cost one host sync (a single
    boolean), more only when a check fails (to say which). Raises RecordError naming batch id and role.
    """
    bid = meta.get("batch_id")
    wire = meta.get("wire_dtype", "float32")
    if wire not in WIRE_DTYPES:
        raise RecordError(bid, None, f"unknown wire dtype {wire!r}")
    if len(roles) != len(parts):
        raise RecordError(bid, None, f"{len(roles)} roles but {len(parts)} parts")
    by_role = dict(zip(roles, parts))
    for role in required_roles:
        if role not in by_role:
            raise RecordError(bid, role, f"missing; record has roles {list(roles)}")
    if ROLE_SFT not in by_role or "ids" not in by_role[ROLE_SFT]:
        raise RecordError(bid, ROLE_SFT, f"the sft part with the support ids is missing (roles {list(roles)})")
    rows_np, batch_shape = _meta_rows(meta)
    vocab = int(meta["vocab_size"])
    ids = _part_tensor(by_role[ROLE_SFT]["ids"], device)
    n = rows_np.shape[0]
    if ids.ndim != 2 or ids.shape[0] != n or ids.dtype not in (torch.int32, torch.int64):
        raise RecordError(bid, ROLE_SFT, f"ids must be int32 [N, K] with N = {n} rows, got {ids.dtype} "
                                         f"{tuple(ids.shape)}")
    k = int(ids.shape[1])
    if not 0 < k <= vocab:
        raise RecordError(bid, None, f"k={k} out of range (1..vocab_size={vocab})")
    lp: dict[str, Tensor] = {}
    tail: dict[str, Tensor] = {}
    for role, part in by_role.items():
        x, tl = _part_tensor(part["logprobs"], device), _part_tensor(part["tail"], device)
        if tuple(x.shape) != (n, k) or x.dtype != _TORCH_WIRE[wire]:
            raise RecordError(bid, role, f"logprobs must be {_TORCH_WIRE[wire]} {(n, k)} (ids shape), got "
                                         f"{x.dtype} {tuple(x.shape)}")
        if tuple(tl.shape) != (n,) or tl.dtype != torch.float32:
            raise RecordError(bid, role, f"tail must be float32 {(n,)}, got {tl.dtype} {tuple(tl.shape)}")
        lp[role], tail[role] = x.float(), tl
    _check_values_on_device(bid, ids, lp, tail, vocab, MASS_EPS[wire])
    rows = torch.from_numpy(rows_np).to(ids.device)
    return _make_targets(ids.long(), lp, tail, rows, batch_shape, float(meta["tau"]), vocab, bid)


def _value_checks(ids: Tensor, lp: dict[str, Tensor], tail: dict[str, Tensor], vocab: int, eps: float,
                  ) -> list[tuple[str | None, str, Tensor]]:
    """(role, what, flag tensor) per check, in TopKRecord.validate's order; a flag is True when it fails."""
    checks: list[tuple[str | None, str, Tensor]] = [(None, "ids out of range", (ids < 0).any() | (ids >= vocab).any())]
    for role, x in lp.items():
        t = tail[role]
        checks += [
            (role, "non-finite log-prob values (NaN or +inf)", (torch.isnan(x) | torch.isposinf(x)).any()),
            (role, "log-prob > 0", (x > eps).any()),
            (role, "non-finite tail mass", ~torch.isfinite(t).all()),
            (role, "tail mass outside [0, 1]", ((t < -eps) | (t > 1 + eps)).any()),
            (role, "probability mass > 1 (support + tail)", (x.exp().sum(-1) + t > 1 + eps).any()),
        ]
    return checks


def _check_values_on_device(bid: Any, ids: Tensor, lp: dict[str, Tensor], tail: dict[str, Tensor], vocab: int,
                            eps: float) -> None:
    if ids.numel() == 0:
        return
    checks = _value_checks(ids, lp, tail, vocab, eps)
    flags = torch.stack([flag for _, _, flag in checks])
    if not bool(flags.any()):  # the one host sync of a good record
        return
    role, what, _ = checks[flags.tolist().index(True)]
    if role is None:
        what += f" [0, {vocab}): min {int(ids.min())}, max {int(ids.max())}"
    elif what.startswith("non-finite log-prob"):
        what = f"{int((torch.isnan(lp[role]) | torch.isposinf(lp[role])).sum())} {what}"
    elif what == "log-prob > 0":
        what = f"log-prob {float(lp[role].max()):.4g} > 0"
    elif what.startswith("tail mass outside"):
        what += f": [{float(tail[role].min()):.4g}, {float(tail[role].max()):.4g}]"
    elif what.startswith("probability mass"):
        worst = float((lp[role].double().exp().sum(-1) + tail[role]).max())
        what = f"probability mass {worst:.6f} > 1 + {eps} (support + tail)"
    raise RecordError(bid, role, what)
