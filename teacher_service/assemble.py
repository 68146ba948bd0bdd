"""Building a numpy `TopKRecord` from the parts the teacher roles return (the object-store path).

`assemble_record` is a pure function: the pool's long-lived `RecordAssembler` actor runs it (and
`assemble_task` for one-off client calls). It gets the role refs *nested in a list*, so it resolves them
itself and can turn a dead actor into `TeacherUnavailableError(role, batch_id)`. The RDT path does not
assemble a numpy record: the receiving worker builds the loss targets from the tensors directly
(`common.losses.targets.targets_from_parts`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import ray
import torch

from common.topk import ROLE_SFT, RecordError, TopKRecord, rows_from_mask

from .actor import to_numpy_wire
from .errors import TeacherRecordError, TeacherUnavailableError

__all__ = ["assemble_record", "assemble_task", "RecordAssembler", "record_meta"]


def record_meta(batch_id: Any, loss_mask: np.ndarray, tau: float, vocab_size: int, fingerprint: str,
                wire_dtype: str) -> dict[str, Any]:
    """Everything a record needs besides the role parts (small; travels with the refs).

    rows: int32 [N], the flat indices b * T + t where loss_mask [B, T] is true; batch_shape: (B, T).
    """
    mask = np.asarray(loss_mask, dtype=bool)
    return {"batch_id": batch_id, "rows": rows_from_mask(mask), "batch_shape": tuple(int(s) for s in mask.shape),
            "tau": float(tau), "vocab_size": int(vocab_size), "tokenizer_fingerprint": fingerprint,
            "wire_dtype": wire_dtype}


def _to_numpy(x: Any) -> np.ndarray:
    """numpy view of a part array; a torch bf16 tensor becomes its uint16 bit pattern (the wire bf16)."""
    if isinstance(x, torch.Tensor):
        return to_numpy_wire(x)
    return np.asarray(x)


def assemble_record(meta: dict[str, Any], roles: list[str], parts: list[dict[str, Any]]) -> TopKRecord:
    """One validated TopKRecord from per-role parts.

    parts[i] for roles[i]: {"logprobs": [N,K] wire dtype, "tail": [N]} (+ "ids" int32 [N,K] for sft);
    numpy arrays or torch tensors (bf16 tensors for a bfloat16 wire; copied to the host). Raises RecordError
    on bad values. (The RDT path does not come here: `common.losses.targets.targets_from_parts`.)
    """
    if len(roles) != len(parts):
        raise ValueError(f"batch {meta.get('batch_id')}: {len(roles)} roles but {len(parts)} parts")
    by_role = dict(zip(roles, parts))
    if ROLE_SFT not in by_role or "ids" not in by_role[ROLE_SFT]:
        raise ValueError(f"batch {meta.get('batch_id')}: the sft part with the support ids is missing "
                         f"(roles {roles})")
    wire = meta["wire_dtype"]
    ids = _to_numpy(by_role[ROLE_SFT]["ids"]).astype(np.int32, copy=False)
    logprobs = {r: _to_numpy(p["logprobs"]) for r, p in by_role.items()}
    tails = {r: _to_numpy(p["tail"]).astype(np.float32, copy=False) for r, p in by_role.items()}
    b, t = meta["batch_shape"]
    rec = TopKRecord(meta["batch_id"], ids, logprobs, tails, np.asarray(meta["rows"], dtype=np.int32),
                     (int(b), int(t)), float(meta["tau"]), int(meta["vocab_size"]),
                     meta.get("tokenizer_fingerprint", ""), wire, dict(meta.get("extra", {})))
    return rec.validate(required_roles=roles)


_ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


def assemble_from_refs(meta: dict[str, Any], roles: list[str], nested_refs: list[ray.ObjectRef]) -> TopKRecord:
    """Resolve the role refs in chain order (sft first: a dead sft fails every later role too)."""
    parts = []
    for role, ref in zip(roles, nested_refs):
        try:
            parts.append(ray.get(ref))
        except _ACTOR_GONE as err:
            raise TeacherUnavailableError(role, meta["batch_id"], err) from err
    try:
        return assemble_record(meta, roles, parts)
    except RecordError as err:
        raise TeacherRecordError(err.batch_id, err.role, err.what) from None


# One-off assembly (the client's `record()`).
assemble_task = ray.remote(num_cpus=0, max_retries=0)(assemble_from_refs)


@ray.remote(num_cpus=0, max_concurrency=64, max_restarts=-1, max_task_retries=-1)
class RecordAssembler:
    """The assembler of a driver's pools (`teacher_service.pool.shared_assembler`): one long-lived threaded
    actor instead of a task per record.

    Each assembly blocks in `ray.get` until the teachers answer, so with a window of records in flight a
    task per record held several pooled worker processes; Ray started fresh ones as the window refilled
    (about 1.5 s each on 2 cores), which showed up as periodic stalls of the students. Threads of one
    process wait for free. Retried on restart (assembly is a pure function of the refs); application
    errors (TeacherUnavailableError, TeacherRecordError) are not retried.
    """

    def assemble(self, meta: dict[str, Any], roles: list[str], nested_refs: list[ray.ObjectRef]) -> TopKRecord:
        return assemble_from_refs(meta, roles, nested_refs)
