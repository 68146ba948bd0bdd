"""Fault injection for tests and benchmarks: a `FaultPlan` that the test builds and hands in.

A run config never carries faults. A test or benchmark builds a plan and passes it to the entry it calls:

    plan = FaultPlan(step_delay_s=0.25)                        # or FaultPlan.from_json('{"step_delay_s": 0.25}')
    run_training(cfg, faults=plan)                             # student_worker.driver: Driver(cfg, faults=plan)
    TeacherPool.start(cfg, faults=plan)                        # teacher_service.pool (its TeacherActors)
    build_cache(cfg, uri, faults=plan)                         # teacher_service.cache.build (its engine stages)

The driver hands its plan to the student workers and to the teacher pool it starts (attached teachers keep
whatever plan they were started with). A test that needs the plan in a subprocess (to SIGKILL a driver)
runs `python -m tests.integration.fault_run --faults '<json>' train|cache <the CLI's arguments>`.

Production code holds `faults: FaultPlan | None` and calls a hook below only when a plan is present, so a run
without one sleeps, raises and exits nowhere. Pure: stdlib only.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["FaultPlan", "RankError", "InjectedRankError"]


class InjectedRankError(RuntimeError):
    """Raised by a student rank for `FaultPlan.rank_error`: mid-step, after the input agreement."""


@dataclass(frozen=True)
class RankError:
    """Student rank `rank` raises once, mid-step (after the input agreement, in the forward), at step `step`,
    in the run's first worker group only (a restored group runs that step normally)."""

    rank: int
    step: int

    def __post_init__(self) -> None:
        for name in ("rank", "step"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FaultPlan.rank_error.{name} must be an integer >= 0, got {value!r}")


@dataclass(frozen=True)
class FaultPlan:
    """The faults and slow-downs of one test run; every field off by default.

    step_delay_s: each student worker sleeps this long at the end of every step call (so a test can kill
      things "mid-run"); the sleep is outside the step's timed parts (see StudentWorkerImpl._step).
    teacher_delay_s: each teacher (TeacherActor, cache-build stage) sleeps this long in every top-k / gather
      call, counted as its busy time (controlled teacher time in benchmarks).
    crash_in_checkpoint: when the driver writes the checkpoint of this many completed steps, the workers
      write their parts, half of state.json is written, then the driver process exits (exit code 1).
    rank_error: one rank raises mid-step once (the fail-fast recovery path).
    """

    step_delay_s: float = 0.0
    teacher_delay_s: float = 0.0
    crash_in_checkpoint: int | None = None
    rank_error: RankError | None = None

    def __post_init__(self) -> None:
        for name in ("step_delay_s", "teacher_delay_s"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FaultPlan.{name} must be a number >= 0, got {value!r}")
            object.__setattr__(self, name, float(value))
        crash = self.crash_in_checkpoint
        if crash is not None and (not isinstance(crash, int) or isinstance(crash, bool) or crash <= 0):
            raise ValueError(f"FaultPlan.crash_in_checkpoint must be an integer > 0 or None, got {crash!r}")
        if isinstance(self.rank_error, dict):
            object.__setattr__(self, "rank_error", RankError(**self.rank_error))
        if self.rank_error is not None and not isinstance(self.rank_error, RankError):
            raise ValueError(f"FaultPlan.rank_error must be a RankError or None, got {self.rank_error!r}")

    # ------------------------------------------------------------------ building and passing on
    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FaultPlan:
        """A plan from a mapping of its fields (rank_error as {"rank", "step"}). Raises ValueError naming an
        unknown key and the nearest field."""
        names = [f.name for f in dataclasses.fields(cls)]
        for key in data:
            if key not in names:
                close = difflib.get_close_matches(str(key), names, n=1, cutoff=0.5)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise ValueError(f"unknown fault {key!r}{hint}; a FaultPlan has {names}")
        rank_error = data.get("rank_error")
        if isinstance(rank_error, dict):
            unknown = set(rank_error) - {"rank", "step"}
            if unknown:
                raise ValueError(f"unknown key(s) {sorted(unknown)} in rank_error: expected 'rank' and 'step'")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        return cls.from_dict(json.loads(text))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    # ------------------------------------------------------------------ hooks (called only when a plan is present)
    def teacher_call(self) -> None:
        """In every teacher top-k / gather call: `teacher_delay_s`."""
        if self.teacher_delay_s > 0:
            time.sleep(self.teacher_delay_s)

    def step_done(self) -> None:
        """At the end of every student step call: `step_delay_s`."""
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)

    def mid_step(self, rank: int, step: int, generation: int) -> None:
        """In the step after the input agreement: raise InjectedRankError for `rank_error` (first group only)."""
        fault = self.rank_error
        if fault is not None and generation == 0 and fault.rank == rank and fault.step == step:
            raise InjectedRankError(f"FaultPlan.rank_error: rank {rank} raises mid-step at step {step}")

    def writing_checkpoint(self, tmp_dir: Path, step: int) -> None:
        """After the workers wrote their parts of checkpoint `step` into `tmp_dir`, before state.json is complete
        and the directory renamed: for `crash_in_checkpoint == step`, leave half a state.json and exit.
        `os._exit` skips every cleanup, as a SIGKILL or a power cut would."""
        if self.crash_in_checkpoint != step:
            return
        with open(Path(tmp_dir) / "state.json", "w") as f:
            f.write('{"step": ')  # half a JSON document: what an interrupted write leaves
            f.flush()
            os.fsync(f.fileno())
        print(f"FaultPlan.crash_in_checkpoint={step}: crashing while writing {tmp_dir}", flush=True)
        os._exit(1)
