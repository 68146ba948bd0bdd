"""`StepPipeline`: the driver's window of steps in flight, from teacher submission to every rank's result.

Per step s (0-based) with W ranks, rank r trains batch id `s * W + r`. The pipeline keeps the teacher work of
steps s .. s + prefetch submitted to the record source and every rank's calls for steps s .. s + min(prefetch,
2) queued: the next call waits in the actor's queue, so a worker goes from one step straight into the next
while the driver does its bookkeeping or waits on the teachers. Each turn (`advance`) dispatches first, then
tops up the teacher window. Each record goes straight to the worker of its rank; the driver never reads one.

A checkpoint save due after step N - 1 is queued between the calls of steps N - 1 and N (`StepInFlight.save`),
so it sees exactly N completed steps (the workers check). On-policy steps (student_worker/on_policy_steps.py)
start without arrays: their teacher work is submitted once the ranks' samples are back, and nothing is queued
past an on-policy step whose samples are not, so the window runs ahead only as far as the weights allow.

`wait()` fails fast (see `wait_step`).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from common.config import RunConfig
from common.data.batching import BatchPlan, TokenizedExample, collate
from student_worker import checkpoint as ckpt
from student_worker.record_source import RecordSource
from student_worker.recovery import ACTOR_GONE, WorkerCrash, find_cause, rejection_error
from student_worker.worker import StepRejected
from student_worker.worker_group import WorkerGroup

__all__ = ["StepInFlight", "StepPipeline", "submit_records", "wait_step", "QUEUED_STEPS"]

# Steps with worker calls queued at most (slack for a driver turn slower than a step; after a failed step the
# rest refuse to run at once).
QUEUED_STEPS = 3


@dataclass
class StepInFlight:
    step: int
    arrays: list[dict[str, np.ndarray]]  # per rank (empty for an on-policy step until its samples are in)
    records: list[Any] = field(default_factory=list)  # per rank: what the record source returned
    calls: list[Any] | None = None  # per rank: the queued train-step call, once dispatched
    save: tuple[Path, list[Any]] | None = None  # the checkpoint after this step, queued behind its calls
    on_policy: bool = False  # trains on the student's samples (training.on_policy)
    samples: list[dict[str, Any]] | None = None  # per rank: the samples (on-policy steps, once collected)


def submit_records(item: StepInFlight, source: RecordSource | None, indices: list[list[int]] | None,
                   include_labels: bool) -> None:
    """Each rank's batch to the record source (None for sft: no record). indices: the training examples per
    rank (None for sampled batches, which only live teachers can score). include_labels: force each label
    into its position's support (K = k + 1)."""
    if source is None:
        return
    for rank, a in enumerate(item.arrays):
        bid = item.step * len(item.arrays) + rank
        include = a["labels"] if include_labels else None
        item.records.append(source.submit(item.step, rank, bid, a, None if indices is None else indices[rank],
                                          include=include))


def wait_step(item: StepInFlight) -> list[dict[str, Any]]:
    """Every rank's result of a dispatched step, failing fast.

    Raises WorkerCrash at the FIRST rank that died or raised after the input agreement, without waiting for
    the others (they may sit in DDP's all-reduce until the collective timeout). Ranks that all rejected the
    step at the agreement (StepRejected: nobody touched the model, nobody is left in a collective) are
    collected and raised as their typed error (recovery.rejection_error).
    """
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


class StepPipeline:
    """The window of steps in flight between the record source and the worker group.

    `sampling`: the on-policy side (student_worker.on_policy_steps.OnPolicySteps) or None; `validation_due`:
    step -> bool, true when validation scores the weights after that many steps (nothing is queued past)."""

    def __init__(self, cfg: RunConfig, group: WorkerGroup, source: RecordSource | None, plan: BatchPlan,
                 examples: list[TokenizedExample], pad_id: int, ckpt_root: Path, sampling: Any = None,
                 validation_due: Any = None):
        self.cfg, self.group, self.source, self.plan = cfg, group, source, plan
        self.examples, self.pad_id, self.ckpt_root, self.sampling = examples, pad_id, ckpt_root, sampling
        self.validation_due = validation_due or (lambda step: False)
        t = cfg.training
        self.prefetch, self.checkpoint_every, self.lag = t.prefetch, t.checkpoint_every, t.on_policy.lag
        self.queued = min(t.prefetch + 1, QUEUED_STEPS)
        # every batch's labels forced into its support when the loss scores the label's atom
        self.include_labels = cfg.loss.objective == "sampled_token"
        self.window: deque[StepInFlight] = deque()  # submitted steps, in order; window[0] is the current one

    def begin(self, step: int) -> None:
        """The loop (re)starts at `step` (a fresh run, a resume, a restored worker group)."""
        self.window.clear()
        ray.get(self.group.call("begin", step))
        if self.sampling is not None:
            self.sampling.restart(step, self.ckpt_root)

    def advance(self, step: int, end_step: int) -> float:
        """One turn: dispatch the current step and the ones behind it, then top up the teacher window (may
        wait: back-pressure). Returns the seconds spent topping up. Raises WorkerCrash."""
        self._dispatch_ahead(step, end_step)
        t0 = time.perf_counter()
        while len(self.window) < self.prefetch + 1 and self.window[-1].step + 1 < end_step:
            self.window.append(self._submit(self.window[-1].step + 1))
        return time.perf_counter() - t0

    @property
    def current(self) -> StepInFlight:
        return self.window[0]

    def wait(self) -> list[dict[str, Any]]:
        """Every rank's result of the current step (`wait_step`)."""
        return wait_step(self.current)

    def finish(self) -> StepInFlight:
        """The current step is done: drop it from the window and tell the record source."""
        item = self.window.popleft()
        if self.source is not None:
            self.source.step_done(item.step)
        return item

    def _submit(self, step: int) -> StepInFlight:
        """The window's item for `step`: an off-policy step's records are submitted now; an on-policy step
        waits for its samples (`OnPolicySteps.samples_in`)."""
        if self.sampling is not None and self.sampling.on_policy(step):
            return StepInFlight(step, [], on_policy=True)
        indices = self.plan.step_indices(step)
        item = StepInFlight(step, [collate([self.examples[i] for i in idx], self.pad_id) for idx in indices])
        submit_records(item, self.source, indices, self.include_labels)
        return item

    def _dispatch_ahead(self, step: int, end_step: int) -> None:
        """Queue the ranks' calls for the current step and up to `queued - 1` steps behind it (a checkpoint
        save due between two steps goes between their calls). Stops before a step after which validation is
        due, and before an on-policy step whose samples are not back: its sample calls are queued right before
        the train call of step - lag, and waited for when nothing but finished steps and the sample itself
        run before them on the workers (i <= lag); else only taken when already done."""
        window = self.window
        for i in range(min(self.queued, end_step - step)):
            if i == len(window):
                window.append(self._submit(step + i))
            item = window[i]
            if i > 0 and self.validation_due(item.step):
                break  # validation scores the weights after item.step steps: nothing is queued past them
            if item.calls is not None:
                continue
            if i > 0 and (item.step % self.checkpoint_every == 0) and window[i - 1].save is None:
                self._queue_save(window[i - 1])
            if self.sampling is not None:
                self.sampling.request(item.step + self.lag, self.group)
                if not self.sampling.samples_in(item, i <= self.lag, self.source, self.pad_id):
                    break
            self._dispatch(item)

    def _dispatch(self, item: StepInFlight) -> None:
        """Queue every rank's train call for this step (returns at once; the calls run after those queued
        before). Each rank gets its record handle's call arguments (student_worker.record_source)."""
        global_tokens = int(sum(a["loss_mask"].sum() for a in item.arrays))
        per_rank = []
        for rank in range(len(self.group)):
            batch = {k: item.arrays[rank][k] for k in ("input_ids", "attention_mask", "labels")}
            record = item.records[rank] if item.records else None
            per_rank.append(_train_args(item.step, batch, global_tokens, record))
        item.calls = self.group.call_each("train_step", per_rank)

    def _queue_save(self, item: StepInFlight) -> None:
        """Queue the ranks' parts of the checkpoint after `item` (item.step + 1 completed steps)."""
        tmp = ckpt.begin_checkpoint(self.ckpt_root, item.step + 1)
        item.save = (tmp, self.group.call("save_checkpoint", str(tmp), item.step + 1))


def _train_args(step: int, batch: dict[str, np.ndarray], global_tokens: int, record: Any) -> tuple[Any, ...]:
    """A rank's `train_step` arguments: the record handle's head, then its parts as DIRECT arguments (RDT refs
    must be; object-store handles have none, their ref travels nested in the head and is resolved, and
    timed, by the worker)."""
    if record is None:
        return (step, batch, global_tokens, None)
    return (step, batch, global_tokens, record.head, *record.parts)
