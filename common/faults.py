"""Fault injection for tests and benchmarks: a `FaultPlan` that the test builds and hands in.

A run config never carries faults. A test or benchmark builds a plan and passes it to the entry it calls:

    plan = FaultPlan(step_delay_s=0.25)                        # or FaultPlan.from_json('{"step_delay_s": 0.25}')
    plan = FaultPlan(holds=(Hold(step=3),), hold_dir=str(tmp))   # every rank waits after step 3 for the test
    run_training(cfg, faults=plan)                             # student_worker.driver: Driver(cfg, faults=plan)
    TeacherPool.start(cfg, faults=plan)                        # teacher_service.pool (its TeacherActors)
    build_cache(cfg, uri, faults=plan)                         # teacher_service.cache.build (its engine stages)

The driver hands its plan to the student workers and to the teacher pool it starts (attached teachers keep
whatever plan they were started with). A test that needs the plan in a subprocess (to SIGKILL a driver)
runs `python -m tests.integration.fault_run --faults '<json>' train|cache <the CLI's arguments>`.

A hold lets a run go at full speed and still be acted on at a known point: every student rank stops at the end
of the held step (outside its clock), the test sees `plan.held(hold, ranks)`, kills what it kills, and
`plan.release(hold)` lets the ranks go on (a rank that was killed never does). A cache build's top-k stage holds
the same way once it has scored a given number of shards (`stage_hold_after`, `stage_held`, `release_stage`).

Production code holds `faults: FaultPlan | None` and calls a hook below only when a plan is present, so a run
without one sleeps, raises, waits and exits nowhere. Pure: stdlib only.
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

__all__ = ["FaultPlan", "RankError", "Hold", "InjectedRankError", "HOLD_TIMEOUT_S"]

HOLD_TIMEOUT_S = 600.0  # a held rank gives up (raises) after this long without a release: a test that died
HOLD_POLL_S = 0.05  # how often a held rank looks for its release file (a stat call)


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
class Hold:
    """Every student rank stops at the end of step `step` (0-based: after it trained that step, before the
    driver has its result) in worker group `generation` (0: the run's first group; each restore starts the
    next), outside the step's clock, until the test releases it. A replay of that step in another generation,
    and the same step after the release, pass straight on."""

    step: int
    generation: int = 0

    def __post_init__(self) -> None:
        for name in ("step", "generation"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"FaultPlan.holds: Hold.{name} must be an integer >= 0, got {value!r}")

    @property
    def key(self) -> str:
        return f"step{self.step}-gen{self.generation}"


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
    holds: points (Hold) where every student rank waits for the test (`held`, `release`); hold_dir: the
      directory (on the ranks' host) where ranks say they wait and the test releases them; needed with holds.
    stage_hold_after: a cache build's top-k stage actor that has scored this many shards waits before its next
      one for the test (`stage_held`, `release_stage`): counted per actor, as Ray Data hands shards over in no
      fixed order; after the release (a restarted actor's count starts again) it passes straight on. Needs
      hold_dir.
    """

    step_delay_s: float = 0.0
    teacher_delay_s: float = 0.0
    crash_in_checkpoint: int | None = None
    rank_error: RankError | None = None
    holds: tuple[Hold, ...] = ()
    hold_dir: str | None = None
    stage_hold_after: int | None = None

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
        if not isinstance(self.holds, list | tuple):
            raise ValueError(f"FaultPlan.holds must be a list of Hold, got {self.holds!r}")
        holds = tuple(Hold(**h) if isinstance(h, dict) else h for h in self.holds)
        for h in holds:
            if not isinstance(h, Hold):
                raise ValueError(f"FaultPlan.holds must be a list of Hold, got {h!r} in it")
        object.__setattr__(self, "holds", holds)
        if self.hold_dir is not None:
            object.__setattr__(self, "hold_dir", str(self.hold_dir))
        if holds and not self.hold_dir:
            raise ValueError("FaultPlan.holds needs FaultPlan.hold_dir: where the ranks wait and are released")
        after = self.stage_hold_after
        if after is not None and (not isinstance(after, int) or isinstance(after, bool) or after < 0):
            raise ValueError(f"FaultPlan.stage_hold_after must be an integer >= 0 or None, got {after!r}")
        if after is not None and not self.hold_dir:
            raise ValueError("FaultPlan.stage_hold_after needs FaultPlan.hold_dir: where the stage waits and is "
                             "released")

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
        for hold in data.get("holds") or ():
            if isinstance(hold, dict) and set(hold) - {"step", "generation"}:
                raise ValueError(f"unknown key(s) {sorted(set(hold) - {'step', 'generation'})} in a hold: "
                                 "expected 'step' and 'generation'")
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

    def step_done(self, rank: int, step: int, generation: int) -> None:
        """At the end of every student step call (outside its clock): `step_delay_s`, then a hold at this step
        and generation: say so in hold_dir and wait for the test's release."""
        if self.step_delay_s > 0:
            time.sleep(self.step_delay_s)
        hold = Hold(step, generation)
        if hold in self.holds:
            self._wait_at(hold.key, f"rank{rank}", f"step {step} (worker group {generation}): rank {rank}")

    def shard_start(self, scored: int) -> None:
        """In a cache build's top-k stage actor, before each shard, having scored `scored` shards: the hold
        (`stage_hold_after`)."""
        if scored == self.stage_hold_after:
            self._wait_at("stage", "topk", f"the top-k stage after {scored} shard(s)")

    def _wait_at(self, key: str, who: str, what: str) -> None:
        """Say `<key>.<who>.held` in hold_dir, then wait until `<key>.released` appears (HOLD_TIMEOUT_S)."""
        assert self.hold_dir is not None  # __post_init__
        released = Path(self.hold_dir) / f"{key}.released"
        (Path(self.hold_dir) / f"{key}.{who}.held").touch()
        deadline = time.monotonic() + HOLD_TIMEOUT_S
        while not released.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"FaultPlan hold at {what} was not released within {HOLD_TIMEOUT_S:g} s "
                                   f"({released} never appeared)")
            time.sleep(HOLD_POLL_S)

    # ------------------------------------------------------------------ the test's side of a hold
    def held(self, hold: Hold, ranks: int) -> bool:
        """True once `ranks` student ranks wait at `hold` (ranks 0 .. ranks - 1)."""
        assert self.hold_dir is not None and hold in self.holds, hold
        return all((Path(self.hold_dir) / f"{hold.key}.rank{r}.held").exists() for r in range(ranks))

    def release(self, hold: Hold) -> None:
        """Let the ranks waiting at `hold` go on (and any that reach it later)."""
        assert self.hold_dir is not None and hold in self.holds, hold
        (Path(self.hold_dir) / f"{hold.key}.released").touch()

    def stage_held(self) -> bool:
        """True once a cache build's top-k stage waits at `stage_hold_after`."""
        assert self.hold_dir is not None and self.stage_hold_after is not None
        return (Path(self.hold_dir) / "stage.topk.held").exists()

    def release_stage(self) -> None:
        """Let the waiting top-k stage go on (and any stage that reaches the hold later pass straight on)."""
        assert self.hold_dir is not None and self.stage_hold_after is not None
        (Path(self.hold_dir) / "stage.released").touch()

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
