"""`RecordHandle`: one batch's teacher record as it travels, whatever the transport.

    handle = pool.submit(batch_id, ids, am, lm, transport=...)   # TeacherPool (or a record source)
    worker.train_step.remote(step, batch, global_tokens, handle.head, *handle.parts)
    targets = receive_targets(head, parts, record, device, required_roles)   # in the receiving worker

It lives with the teacher service (which makes handles) and the student worker imports it (imports point
down only); the receiving side (`fetch_record`, `receive_targets`) is here too, so the wire format of a
record is defined in one file.

- object store: `head = {"transport": "object_store", "box": [ref]}`, no parts. The ref of the assembled
  numpy `TopKRecord` travels NESTED in the head, so Ray does not resolve it before the call: the worker
  `ray.get`s it inside the step and times that wait (`record_wait_s`).
- Ray Direct Transport: `head = {"transport": "rdt", "meta": ..., "roles": [...]}` and the role parts' refs
  as `parts`, which the caller passes as DIRECT arguments (RDT refs must be); Ray fetches them before the
  method runs, so the wait is the worker's idle gap before the call.
Both build the same `SparseTargets` (tested bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import ray
import torch

from common.losses import SparseTargets, targets_from_record
from common.losses.targets import targets_from_parts

__all__ = ["RecordHandle", "OBJECT_STORE", "RDT", "TRANSPORTS", "fetch_record", "receive_targets"]

OBJECT_STORE = "object_store"
RDT = "rdt"
TRANSPORTS = (OBJECT_STORE, RDT)  # transport.kind


@dataclass(frozen=True)
class RecordHandle:
    head: dict[str, Any]
    parts: tuple[Any, ...] = ()

    @classmethod
    def object_store(cls, ref: Any) -> RecordHandle:
        """The ref of an assembled TopKRecord in Ray's object store."""
        return cls({"transport": OBJECT_STORE, "box": [ref]})

    @classmethod
    def rdt(cls, meta: dict[str, Any], roles: list[str], parts: list[Any]) -> RecordHandle:
        """The record's metadata and its role parts' RDT refs (`TeacherPool.submit(..., transport="rdt")`)."""
        return cls({"transport": RDT, "meta": meta, "roles": list(roles)}, tuple(parts))

    @property
    def ref(self) -> Any:
        """The object-store ref of the assembled TopKRecord (for callers that `ray.get` it, or a cache
        write-through); RDT handles have none."""
        if self.head["transport"] != OBJECT_STORE:
            raise TypeError("an RDT record handle has no object-store ref")
        return self.head["box"][0]


def fetch_record(head: dict[str, Any] | None) -> Any:
    """The object-store record a head points at (a blocking `ray.get`; the caller times it), or None for RDT
    heads (their parts arrived as arguments) and for sft (no head)."""
    if head is None or head["transport"] != OBJECT_STORE:
        return None
    return ray.get(head["box"][0])


def receive_targets(head: dict[str, Any], parts: tuple[Any, ...], record: Any, device: torch.device,
                    required_roles: list[str]) -> SparseTargets:
    """The loss targets of a received record on `device`: the fetched object-store `record` validated, or the
    RDT parts validated on the device (one host sync, no numpy). Raises RecordError / LossInputError naming
    the batch and role."""
    if head["transport"] == RDT:
        return targets_from_parts(head["meta"], head["roles"], list(parts), device, required_roles)
    return targets_from_record(record.validate(required_roles), device)
