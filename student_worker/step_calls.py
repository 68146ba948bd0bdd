"""The calls of one training step: submit its teacher work, queue its worker calls, wait for them (fail fast).

Used by the driver's loop (student_worker/driver.py). A `StepInFlight` is one step from submission to result:
the collated per-rank arrays, the per-rank teacher record refs, the queued worker calls and the checkpoint
save queued behind them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from student_worker import checkpoint as ckpt
from student_worker.data import BatchPlan, TokenizedExample, collate
from student_worker.recovery import ACTOR_GONE, WorkerCrash, find_cause, rejection_error

__all__ = ["StepInFlight", "submit_step", "dispatch_step", "queue_save", "wait_step"]


@dataclass
class StepInFlight:
    step: int
    arrays: list[dict[str, np.ndarray]]  # per rank
    records: list[Any] = field(default_factory=list)  # per rank: ObjectRef, or (meta, roles, refs) for RDT
    calls: list[Any] | None = None  # per rank: the queued train-step call, once dispatched
    save: tuple[Path, list[Any]] | None = None  # the checkpoint after this step, queued behind its calls


def submit_step(step: int, plan: BatchPlan, examples: list[TokenizedExample], pad_id: int, source: Any,
                ) -> StepInFlight:
    """Collate the step's per-rank batches and submit them to the record source (student_worker/record_source.py:
    live teachers or the teacher cache; None for sft). Rank r's batch id is step * W + r."""
    indices = plan.step_indices(step)
    arrays = [collate([examples[i] for i in idx], pad_id) for idx in indices]
    item = StepInFlight(step, arrays)
    if source is not None:
        for rank, (a, idx) in enumerate(zip(arrays, indices)):
            item.records.append(source.submit(step, rank, step * len(arrays) + rank, a, idx))
    return item


def dispatch_step(item: StepInFlight, workers: list[Any], rdt: bool) -> None:
    """Queue every rank's call for this step (returns at once; the calls run after those queued before)."""
    global_tokens = int(sum(a["loss_mask"].sum() for a in item.arrays))
    calls = []
    for rank, w in enumerate(workers):
        batch = {k: item.arrays[rank][k] for k in ("input_ids", "attention_mask", "labels")}
        if rdt:
            meta, roles, parts = item.records[rank]
            calls.append(w.train_step_rdt.remote(item.step, batch, global_tokens, meta, roles, *parts))
        else:
            box = [item.records[rank]] if item.records else None  # nested: the worker resolves it
            calls.append(w.train_step.remote(item.step, batch, box, global_tokens))
    item.calls = calls


def queue_save(item: StepInFlight, workers: list[Any], ckpt_root: Path) -> None:
    """Queue the workers' parts of the checkpoint after `item` (item.step + 1 completed steps)."""
    tmp = ckpt.begin_checkpoint(ckpt_root, item.step + 1)
    item.save = (tmp, [w.save_checkpoint.remote(str(tmp), item.step + 1) for w in workers])


def wait_step(item: StepInFlight) -> list[dict[str, Any]]:
    """Every rank's result of a dispatched step, failing fast.

    Raises WorkerCrash at the FIRST rank that died or raised after the input agreement, without waiting for
    the others (they may sit in DDP's all-reduce until the collective timeout). Ranks that all rejected the
    step at the agreement (StepRejected: nobody touched the model, nobody is left in a collective) are
    collected and raised as their typed error (recovery.rejection_error).
    """
    from student_worker.worker import StepRejected

    assert item.calls is not None
    rank_of = {ref: i for i, ref in enumerate(item.calls)}
    results: list[dict[str, Any]] = [{} for _ in item.calls]
    rejected: list[BaseException] = []
    remaining = list(item.calls)
    while remaining:
        ready, remaining = ray.wait(remaining, num_returns=1)
        rank = rank_of[ready[0]]
        try:
            results[rank] = ray.get(ready[0])
        except ACTOR_GONE as exc:
            raise WorkerCrash(rank, exc) from exc
        except ray.exceptions.RayTaskError as exc:
            if find_cause(exc, StepRejected) is not None:
                rejected.append(exc)
                continue
            raise WorkerCrash(rank, exc, raised=True) from exc
    if rejected:
        raise rejection_error(rejected)
    return results
