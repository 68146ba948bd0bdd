"""The calls of one training step: submit its teacher work, queue its worker calls, wait for them (fail fast).

Used by the driver's loop (student_worker/driver.py). A `StepInFlight` is one step from submission to result:
the collated per-rank arrays, the per-rank teacher record refs, the queued worker calls and the checkpoint
save queued behind them. An on-policy step (student_worker/on_policy.py) starts without arrays: its sample
calls are queued on the workers (`queue_samples`), and once their results are in (`collect_samples`) its
arrays are the prompts plus the samples and its teacher work is submitted (`submit_sampled`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from common.config import RunConfig
from common.data.batching import BatchPlan, TokenizedExample, collate
from student_worker import checkpoint as ckpt
from student_worker.on_policy import SampleSchedule, load_samples, sample_stats, sampled_batch, save_samples
from student_worker.recovery import ACTOR_GONE, WorkerCrash, find_cause, rejection_error

__all__ = ["StepInFlight", "OnPolicySteps", "submit_step", "submit_sampled", "queue_samples", "collect_samples",
           "dispatch_step", "queue_save", "wait_step"]


@dataclass
class StepInFlight:
    step: int
    arrays: list[dict[str, np.ndarray]]  # per rank (empty for an on-policy step until its samples are in)
    records: list[Any] = field(default_factory=list)  # per rank: ObjectRef, or (meta, roles, refs) for RDT
    calls: list[Any] | None = None  # per rank: the queued train-step call, once dispatched
    save: tuple[Path, list[Any]] | None = None  # the checkpoint after this step, queued behind its calls
    on_policy: bool = False  # trains on the student's samples (training.on_policy)
    samples: list[dict[str, Any]] | None = None  # per rank: the samples (on-policy steps, once collected)


def submit_step(step: int, plan: BatchPlan, examples: list[TokenizedExample], pad_id: int, source: Any,
                include_labels: bool = False) -> StepInFlight:
    """Collate the step's per-rank batches and submit them to the record source (student_worker/record_source.py:
    live teachers or the teacher cache; None for sft). Rank r's batch id is step * W + r.
    include_labels: force each label into its position's support (K = k + 1; loss.objective sampled_token)."""
    indices = plan.step_indices(step)
    item = StepInFlight(step, [collate([examples[i] for i in idx], pad_id) for idx in indices])
    _submit_records(item, source, indices, include_labels)
    return item


def submit_sampled(item: StepInFlight, samples: list[dict[str, Any]], prompts: list[list[list[int]]], pad_id: int,
                   source: Any) -> None:
    """An on-policy step's samples are in: its arrays become prompt + sample per row, and its teacher work is
    submitted with the sampled tokens (the labels) forced into the support (K = k + 1)."""
    item.samples = samples
    item.arrays = [sampled_batch(p, s, pad_id) for p, s in zip(prompts, samples)]
    _submit_records(item, source, None, include_labels=True)


def _submit_records(item: StepInFlight, source: Any, indices: list[list[int]] | None, include_labels: bool) -> None:
    """Each rank's batch to the record source. indices: the training examples per rank (None for sampled
    batches, which only live teachers can score)."""
    if source is None:
        return
    for rank, a in enumerate(item.arrays):
        bid = item.step * len(item.arrays) + rank
        include = a["labels"] if include_labels else None
        item.records.append(source.submit(item.step, rank, bid, a, None if indices is None else indices[rank],
                                          include=include))


def queue_samples(step: int, workers: list[Any], prompts: list[list[list[int]]]) -> list[Any]:
    """Queue every rank's sample call of on-policy step `step` (rank r: batch id step * W + r, its prompts)."""
    return [w.sample.remote(step, step * len(workers) + rank, prompts[rank]) for rank, w in enumerate(workers)]


def collect_samples(refs: list[Any], block: bool) -> list[dict[str, Any]] | None:
    """The ranks' sample results, or None when `block` is false and some are not ready. A rank that died or
    raised while sampling is a WorkerCrash (no collective is involved: the driver replaces the group)."""
    if not block:
        _, pending = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
        if pending:
            return None
    results = []
    for rank, ref in enumerate(refs):
        try:
            results.append(ray.get(ref))
        except ACTOR_GONE as exc:
            raise WorkerCrash(rank, exc) from exc
        except ray.exceptions.RayTaskError as exc:
            raise WorkerCrash(rank, exc, raised=True) from exc
    return results


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


class OnPolicySteps:
    """The driver's side of on-policy steps (`training.on_policy`): which steps sample, their sample calls,
    the collected samples, and the sample a lag-1 checkpoint carries. `prompts`: each training example's
    prompt ids (student_worker.on_policy.on_policy_prompts)."""

    def __init__(self, cfg: RunConfig, plan: BatchPlan, prompts: list[list[int]]):
        self.schedule = SampleSchedule(cfg.training.on_policy, cfg.seed, cfg.training.max_steps)
        self.lag = cfg.training.on_policy.lag
        self.plan, self.prompts, self.world = plan, prompts, cfg.training.num_workers

    def on_policy(self, step: int) -> bool:
        return self.schedule.on_policy(step)

    def step_prompts(self, step: int) -> list[list[list[int]]]:
        """Per rank, the prompts of step `step`'s examples."""
        return [[self.prompts[i] for i in idx] for idx in self.plan.step_indices(step)]

    def request(self, upto: int, workers: list[Any]) -> None:
        """Queue the sample calls of the on-policy steps through `upto` not queued yet. Called right before a
        train call is queued, so each sample runs with the weights its lag asks for."""
        for k in self.schedule.to_request(upto):
            self.schedule.requested[k] = queue_samples(k, workers, self.step_prompts(k))

    def results(self, step: int, block: bool) -> list[dict[str, Any]] | None:
        """Step `step`'s samples: already collected (or carried by the checkpoint the loop started from), or
        from its queued calls (None when `block` is false and they are not done). Raises WorkerCrash."""
        got = self.schedule.results.get(step)
        if got is None:
            got = collect_samples(self.schedule.requested[step], block)
            if got is not None:
                self.schedule.results[step] = got
        return got

    def samples_in(self, item: StepInFlight, block: bool, source: Any, pad_id: int) -> bool:
        """True when `item` can be dispatched: an off-policy step, or an on-policy one whose samples are in
        (its arrays are then built and its teacher work submitted here)."""
        if not item.on_policy or item.samples is not None:
            return True
        got = self.results(item.step, block)
        if got is None:
            return False
        submit_sampled(item, got, self.step_prompts(item.step), pad_id, source)
        return True

    def stored(self, ckpt_dir: Path, step: int) -> list[dict[str, Any]] | None:
        """The sample of `step` a lag-1 checkpoint carries (None when the loop draws it itself). Raises
        CheckpointError naming the file when it is missing or wrong."""
        return load_samples(ckpt_dir, step, self.world) if self.schedule.needs_stored(step) else None

    def restart(self, step: int, ckpt_root: Path) -> None:
        """The loop (re)starts at `step` from the checkpoint of `step` steps (or from scratch)."""
        self.schedule.restart(step, self.stored(ckpt_root / ckpt.checkpoint_name(step), step))

    def save_into(self, tmp_dir: Path, step: int) -> None:
        """Write the sample of `step` into the checkpoint of `step` steps when a resume needs it (lag 1)."""
        if self.schedule.needs_stored(step):
            got = self.results(step, block=True)  # queued before step - 1's train call: done by now
            assert got is not None
            save_samples(tmp_dir, step, got)

    def finish(self, item: StepInFlight) -> dict[str, int]:
        """A step is done: its metrics row's counts (student_worker.on_policy.STAT_KEYS); older samples go."""
        self.schedule.forget_before(item.step + 1)
        return sample_stats(item.samples)
