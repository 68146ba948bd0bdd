"""`CacheFeeder`: one per student rank, it reads that rank's batch records from the teacher cache.

The driver submits each step's batch to the rank's feeder as it would submit it to the teacher pool, up to
`training.prefetch` steps ahead, and hands the returned ref to the worker, which `ray.get`s it like a live
record: the worker's code path is the same for both sources. The feeder keeps the rank's recently used
shards encoded in memory (`teachers.cache.memory_mb`), decodes only the batch's examples, and starts reading
the shards of the coming batches (`upcoming`) in a background thread while the current one is served.

A shard whose checksum fails raises ShardError naming it (every rank then rejects the step and the run stops
after a checkpoint), unless `teachers.cache.on_error: live`: then the batch is recomputed by the running
teacher service (teachers.namespace / name_prefix), if there is one, in the live batch itself.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import ray

from common.reproducibility import apply_compute_settings
from teacher_service.client import TeacherClient

from .errors import ShardError
from .reader import CacheReader

__all__ = ["CacheFeeder", "FeederImpl"]


class FeederImpl:
    """The feeder's logic (plain Python; the Ray actor below wraps it)."""

    def __init__(self, uri: str, roles: list[str], run_roles: dict[str, dict[str, Any]], max_bytes: int,
                 on_error: str = "stop", live: dict[str, Any] | None = None, compute: dict[str, Any] | None = None):
        """run_roles: the run's model identity per role (picks an added role of the run's own student base);
        live: {namespace, name_prefix, k, tau, wire_dtype} of the teacher service for on_error="live"."""
        if compute is not None:
            apply_compute_settings(compute, where="cache feeder")
        self.reader = CacheReader(uri, roles=roles, run_roles=run_roles, max_bytes_in_memory=max_bytes)
        self.on_error, self.live = on_error, live or {}
        self.counters = {"batches": 0, "rows": 0, "seconds": 0.0, "recomputed_live": 0}
        self._client: Any = None

    def batch(self, batch_id: Any, examples: Sequence[int], seq_len: int, upcoming: Sequence[Sequence[int]] = (),
              live_inputs: dict[str, np.ndarray] | None = None) -> Any:
        """The rows-form TopKRecord of `examples` padded to `seq_len`; upcoming: the examples of this rank's
        next batches (their shards are read ahead). live_inputs: the collated batch (input_ids,
        attention_mask, loss_mask), for a live recompute when on_error is "live"."""
        t0 = time.perf_counter()
        if upcoming:
            self.reader.prefetch(upcoming)
        try:
            rec = self.reader.batch(list(examples), int(seq_len), batch_id)
        except ShardError as exc:
            if self.on_error != "live" or live_inputs is None:
                raise
            rec = self._recompute(batch_id, live_inputs, exc)
        self.counters["batches"] += 1
        self.counters["rows"] += rec.num_rows
        self.counters["seconds"] += time.perf_counter() - t0
        return rec

    def _recompute(self, batch_id: Any, inputs: dict[str, np.ndarray], cause: ShardError) -> Any:
        try:
            if self._client is None:
                self._client = TeacherClient(namespace=self.live["namespace"], name_prefix=self.live["name_prefix"])
            rec = self._client.record(inputs["input_ids"], k=int(self.live["k"]), tau=float(self.live["tau"]),
                                      attention_mask=inputs["attention_mask"], loss_mask=inputs["loss_mask"],
                                      wire_dtype=self.live.get("wire_dtype", "float32"))
        except Exception as exc:  # no service reachable: the cache error is what the user must see
            raise ShardError(f"{cause}; recomputing batch {batch_id} live failed too "
                             f"(teachers.cache.on_error: live): {type(exc).__name__}: {exc}") from None
        missing = [r for r in self.reader.roles if r not in rec.logprobs]
        if missing:
            raise ShardError(f"{cause}; the teacher service that could recompute batch {batch_id} lacks roles "
                             f"{missing}")
        keep = set(self.reader.roles)
        self.counters["recomputed_live"] += 1
        return dataclasses.replace(rec, batch_id=batch_id,
                                   logprobs={r: v for r, v in rec.logprobs.items() if r in keep},
                                   tail={r: v for r, v in rec.tail.items() if r in keep},
                                   meta={**rec.meta, "source": "live (cache shard failed)", "cause": str(cause)})

    def warm_up(self, upcoming: Sequence[Sequence[int]]) -> bool:
        """Start reading the shards of the rank's first batches (and pay the process's first-read costs) while
        the workers load their models."""
        self.reader.prefetch(upcoming)
        return True

    def stats(self) -> dict[str, Any]:
        return {**self.counters, "shards_read": self.reader.shards_read,
                "bytes_in_memory": self.reader.bytes_in_memory}

    def ping(self) -> bool:
        return True


# Threads: a stats call is answered while a batch is being read. Restarted and retried on a crash: a batch is a
# pure function of the cache.
CacheFeeder = ray.remote(num_cpus=0, max_concurrency=2, max_restarts=-1, max_task_retries=-1)(FeederImpl)
