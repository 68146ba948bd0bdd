"""The timed parts of one training step on a worker: `STEP_PARTS` and the `StepClock` that books them.

Each step call returns `step_s` (the time since the end of the worker's previous step call; calls outside the
loop, e.g. evaluation, excluded) and `step_parts`, consecutive named intervals that sum to it.
"""

from __future__ import annotations

import time

__all__ = ["STEP_PARTS", "TEACHER_WAIT_PARTS", "COMPUTE_PARTS", "StepClock"]

# The named parts of a step, in time order; they sum to the step's `step_s` (within float rounding):
#   dispatch_s     the worker had no call to run: waiting for the driver (bookkeeping, a blocked submit)
#   checkpoint_s   writing this rank's checkpoint parts since the previous step
#   sample_s       drawing on-policy samples since the previous step (this step's; with on_policy.lag 1,
#                  the next step's, drawn before this one trains)
#   record_wait_s  waiting for this rank's teacher record (object store: ray.get; RDT: the gap before the call)
#   peer_wait_s    the input agreement all-reduce: waiting for the other ranks to have their records
#   prepare_s      validating the record, building the loss targets, moving the batch to the device
#   forward_s      the student's (and the frozen base's) forward and the loss
#   backward_s     backward computation
#   allreduce_s    the gradient all-reduce left exposed after backward's computation (DDP overlaps the rest)
#   optimizer_s    gradient clipping, the optimizer and the scheduler step
STEP_PARTS = ("dispatch_s", "checkpoint_s", "sample_s", "record_wait_s", "peer_wait_s", "prepare_s", "forward_s",
              "backward_s", "allreduce_s", "optimizer_s")
TEACHER_WAIT_PARTS = ("record_wait_s",)
COMPUTE_PARTS = ("prepare_s", "forward_s", "backward_s", "allreduce_s", "optimizer_s")


class StepClock:
    """Consecutive named intervals of one step call, from `start` (the end of the worker's previous call).

    `before`: seconds that belong to this step but lie before `start` (the idle gap before a checkpoint save
    and the save itself, which ran between the previous step and this one). `lap(name)` closes the interval
    since the last mark; `add` books seconds measured separately (the caller keeps them consecutive)."""

    def __init__(self, start: float, now: float, before: float):
        self.start, self.last, self.before = start, now, before
        self.parts: dict[str, float] = dict.fromkeys(STEP_PARTS, 0.0)

    def add(self, name: str, seconds: float) -> None:
        self.parts[name] += seconds

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.parts[name] += now - self.last
        self.last = now

    def total(self) -> float:
        """The step's `step_s`: `before` plus the time from `start` to the last mark."""
        return self.before + (self.last - self.start)
