"""Fault recovery helpers of the driver: worker-crash detection, named worker actors, test-only fault hooks.

Operating promise (DESIGN.md section 4): a run survives the death of a student worker (the driver replaces
the whole worker group and reloads the newest complete checkpoint, so the result on CPU is bit-for-bit the
uninterrupted run's) and of a teacher actor (Ray restarts it and retries its calls; teacher calls are keyed
by batch id). Everything else stops the run with a typed error after a checkpoint of the completed steps.

Student worker actors are NAMED so an operator (or a test) can find them:
`{run_name}-student-{rank}-{run_uid}` in the namespace `teachers.namespace`, where `run_uid` is 8 hex digits
drawn once per worker group (a restored group gets new names; two runs never collide).

Test-only fault hooks (environment variables of the DRIVER process; unset in production, where they cost
nothing). They exist because a fault must be hit at a known point without sleeps or races in production code:

- `DELTAKD_TEST_STEP_DELAY_S=<seconds>`: each student worker sleeps this long after every training step,
  so a test can reliably kill something "mid-run". The driver reads it and passes it to its workers.
- `DELTAKD_FAULT_CRASH_IN_CHECKPOINT=<step>`: when the driver writes the checkpoint of `<step>` completed
  steps, it lets the workers write their parts into `ckpt-XXXXXX.tmp`, writes half of `state.json`, then
  `os._exit(1)`s: a crash while a checkpoint is being written. The previous checkpoint must stay intact.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import ray

__all__ = [
    "MAX_WORKER_RESTARTS",
    "STEP_DELAY_ENV",
    "CRASH_IN_CHECKPOINT_ENV",
    "WorkerCrash",
    "find_cause",
    "new_run_uid",
    "worker_actor_name",
    "step_delay_s",
    "maybe_crash_in_checkpoint",
]

MAX_WORKER_RESTARTS = 3
STEP_DELAY_ENV = "DELTAKD_TEST_STEP_DELAY_S"
CRASH_IN_CHECKPOINT_ENV = "DELTAKD_FAULT_CRASH_IN_CHECKPOINT"

# Errors that mean "the actor process is gone", as opposed to an exception raised by the method.
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class WorkerCrash(Exception):
    """A student worker actor died (its process is gone); the driver restores the group from a checkpoint."""

    def __init__(self, rank: int, cause: BaseException):
        super().__init__(f"student worker rank {rank} died: {str(cause).splitlines()[0] if str(cause) else cause!r}")
        self.rank, self.cause = rank, cause


def find_cause(exc: BaseException | None, cls: type | tuple[type, ...]) -> BaseException | None:
    """The DEEPEST exception of type `cls` in a chain of Ray task errors (`.cause`) and Python causes.

    Deepest: Ray wraps a remote error in a RayTaskError that is also an instance of the error's class but
    whose message is a traceback; the innermost one is the typed error with the plain message."""
    found, seen = None, 0
    while exc is not None and seen < 20:
        if isinstance(exc, cls):
            found = exc
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        seen += 1
    return found


def new_run_uid() -> str:
    """8 hex digits naming one worker group (part of every worker actor's name)."""
    return uuid.uuid4().hex[:8]


def worker_actor_name(run_name: str, rank: int, run_uid: str) -> str:
    """`{run_name}-student-{rank}-{run_uid}`: the Ray actor name of one student worker."""
    return f"{run_name}-student-{rank}-{run_uid}"


def step_delay_s() -> float:
    """Seconds each worker sleeps after a step (test hook `DELTAKD_TEST_STEP_DELAY_S`; 0 when unset)."""
    raw = os.environ.get(STEP_DELAY_ENV, "").strip()
    if not raw:
        return 0.0
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{STEP_DELAY_ENV}={raw!r}: expected a number of seconds") from None
    if value < 0:
        raise ValueError(f"{STEP_DELAY_ENV}={raw!r}: must be >= 0")
    return value


def maybe_crash_in_checkpoint(tmp_dir: Path, step: int) -> None:
    """Test hook: if `DELTAKD_FAULT_CRASH_IN_CHECKPOINT == step`, leave a half-written checkpoint and die.

    Called by the driver after the workers wrote their parts into `tmp_dir` and before `state.json` is
    complete and the directory renamed. `os._exit` skips every cleanup, as a SIGKILL or a power cut would.
    """
    raw = os.environ.get(CRASH_IN_CHECKPOINT_ENV, "").strip()
    if not raw or int(raw) != step:
        return
    with open(tmp_dir / "state.json", "w") as f:
        f.write('{"step": ')  # half a JSON document: what an interrupted write leaves
        f.flush()
        os.fsync(f.fileno())
    print(f"{CRASH_IN_CHECKPOINT_ENV}={raw}: crashing while writing {tmp_dir}", flush=True)
    os._exit(1)
