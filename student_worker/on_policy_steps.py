"""The driver's side of on-policy steps (`training.on_policy`, student_worker/on_policy.py): which steps
sample, their sample calls on the worker group, the collected samples, and the sample a lag-1 checkpoint
carries.

An on-policy step starts without arrays: its sample calls are queued on the ranks (`queue_samples`), and once
their results are in (`collect_samples`) its arrays are the prompts plus the samples and its teacher work is
submitted (`submit_sampled`) with the sampled tokens forced into the support.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import ray

from common.config import RunConfig
from common.data.batching import BatchPlan
from student_worker import checkpoint as ckpt
from student_worker.on_policy import SampleSchedule, load_samples, sample_stats, sampled_batch, save_samples
from student_worker.recovery import ACTOR_GONE, WorkerCrash
from student_worker.step_pipeline import StepInFlight, submit_records
from student_worker.worker_group import WorkerGroup

__all__ = ["OnPolicySteps", "submit_sampled", "queue_samples", "collect_samples"]


class OnPolicySteps:
    """The on-policy side of the step pipeline. `prompts`: each training example's prompt ids
    (student_worker.on_policy.on_policy_prompts)."""

    def __init__(self, cfg: RunConfig, plan: BatchPlan, prompts: list[list[int]]):
        self.schedule = SampleSchedule(cfg.training.on_policy, cfg.seed, cfg.training.max_steps)
        self.lag = cfg.training.on_policy.lag
        self.plan, self.prompts, self.world = plan, prompts, cfg.training.num_workers

    def on_policy(self, step: int) -> bool:
        return self.schedule.on_policy(step)

    def step_prompts(self, step: int) -> list[list[list[int]]]:
        """Per rank, the prompts of step `step`'s examples."""
        return [[self.prompts[i] for i in idx] for idx in self.plan.step_indices(step)]

    def request(self, upto: int, group: WorkerGroup) -> None:
        """Queue the sample calls of the on-policy steps through `upto` not queued yet. Called right before a
        train call is queued, so each sample runs with the weights its lag asks for."""
        for k in self.schedule.to_request(upto):
            self.schedule.requested[k] = queue_samples(k, group, self.step_prompts(k))

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


def submit_sampled(item: StepInFlight, samples: list[dict[str, Any]], prompts: list[list[list[int]]], pad_id: int,
                   source: Any) -> None:
    """An on-policy step's samples are in: its arrays become prompt + sample per row, and its teacher work is
    submitted with the sampled tokens (the labels) forced into the support (K = k + 1)."""
    item.samples = samples
    item.arrays = [sampled_batch(p, s, pad_id) for p, s in zip(prompts, samples)]
    submit_records(item, source, None, include_labels=True)


def queue_samples(step: int, group: WorkerGroup, prompts: list[list[list[int]]]) -> list[Any]:
    """Queue every rank's sample call of on-policy step `step` (rank r: batch id step * W + r, its prompts)."""
    world = len(group)
    return group.call_each("sample", [(step, step * world + rank, prompts[rank]) for rank in range(world)])


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
