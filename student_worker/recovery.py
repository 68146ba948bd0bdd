"""Fault recovery helpers of the driver: rank failures, named worker actors, resources.

Operating promise (docs/DESIGN.md section 4): a run survives the death of a student worker, or a rank raising
mid-step (the driver kills the whole worker group at once, starts a new one and reloads the newest complete
checkpoint, so the result on CPU is bit-for-bit the uninterrupted run's), and of a teacher actor (Ray
restarts it and retries its calls; teacher calls are keyed by batch id).

Which rank errors are retried and which stop the run:
- retried (group replaced, steps since the last checkpoint replayed; at most MAX_WORKER_RESTARTS times): a
  worker process that died; a rank that raised after the step's input agreement with anything but the
  errors below (a CUDA/NCCL error, a collective timeout, out of memory, a bug that may not recur, a
  test's injected `FaultPlan.rank_error`);
- stop the run (TrainingRunError, exit 3): a step every rank rejected at the input agreement (the teacher
  record is missing or invalid: TeacherUnavailableError, TeacherOutputError, RecordError, ... named by
  `rejection_error`), after a checkpoint of the completed steps; and a rank that raised bad input after the
  agreement (`is_fatal_rank_error`: what the loss found; a replay would fail the same way), with
  the last checkpoint as it is (the other ranks may sit in a collective, so the group is killed first).

Student worker actors are NAMED so an operator (or a test) can find them:
`{run_name}-student-{rank}-{run_uid}` in the namespace `teachers.namespace`, where `run_uid` is 8 hex digits
drawn once per worker group (a restored group gets new names; two runs never collide).

Faults are injected by tests and benchmarks through a `common.faults.FaultPlan` handed to the driver, never
through the run config or environment variables.
"""

from __future__ import annotations

import uuid

import ray

from common.config import ConfigError, RunConfig
from common.losses.targets import LossInputError
from common.topk import RecordError
from student_worker.step_errors import PeerInputError, StepRejected
from student_worker.train_step import TrainStepError
from teacher_service.cache.errors import CacheError
from teacher_service.errors import TeacherError, TeacherUnavailableError

__all__ = [
    "MAX_WORKER_RESTARTS",
    "ACTOR_GONE",
    "WorkerCrash",
    "find_cause",
    "is_fatal_rank_error",
    "rejection_error",
    "new_run_uid",
    "worker_actor_name",
    "check_resources",
    "teacher_inflight_cap",
]

MAX_WORKER_RESTARTS = 3

# Errors that mean "the actor process is gone", as opposed to an exception raised by the method.
ACTOR_GONE = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)


class WorkerCrash(Exception):
    """A student worker died (its process is gone) or raised mid-step (`raised`); the driver replaces the
    whole group and restores it from the last checkpoint."""

    def __init__(self, rank: int, cause: BaseException, raised: bool = False):
        root = find_cause(cause, Exception) if raised else cause
        text = f"{type(root).__name__}: {root}" if raised else str(cause)
        first = text.splitlines()[0] if text else repr(cause)
        super().__init__(f"student worker rank {rank} {'raised mid-step' if raised else 'died'}: {first}")
        self.rank, self.cause, self.raised = rank, cause, raised


def is_fatal_rank_error(exc: BaseException) -> bool:
    """True for errors raised after the input agreement that a replay would repeat (bad input the loss or
    the step found: LossInputError, TrainStepError, RecordError, ConfigError): the run stops, no retry."""
    return find_cause(exc, (LossInputError, TrainStepError, RecordError, ConfigError)) is not None


def rejection_error(errors: list[BaseException]) -> BaseException:
    """The error to report for a step every rank rejected at the input agreement (worker.StepRejected):
    the typed teacher error (dead role, NaN output, bad record, a teacher cache shard that failed its
    checksum: it names role/model/shard and batch) if any rank had one, else the first rank's own error (not
    a peer's 'another rank failed')."""
    for types in (TeacherUnavailableError, (TeacherError, RecordError, CacheError)):
        for e in errors:
            typed = find_cause(e, types)
            if typed is not None:
                return typed
    own = [e for e in errors if find_cause(e, PeerInputError) is None] or errors
    rejected = find_cause(own[0], StepRejected)
    return rejected if rejected is not None else own[0]


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


def check_resources(cfg: RunConfig, teacher_roles: list[str]) -> None:
    """Warn (loudly) when teachers + workers ask for more CPUs/GPUs than the cluster has right now:
    Ray would wait forever for the missing slots (an autoscaling cluster may still add them)."""
    t, tc = cfg.training, cfg.teachers
    world = t.num_workers
    started = not (cfg.loss.method == "sft" or tc.attach or tc.source == "cache")  # a cache run starts none
    n_teachers = sum(tc.replicas.get(r, 1) for r in teacher_roles) if started else 0
    need = {"CPU": world * t.num_cpus_per_worker + n_teachers * tc.num_cpus,
            "GPU": world * t.num_gpus_per_worker + n_teachers * tc.num_gpus}
    for per, count in ((tc.resources, n_teachers), (t.resources_per_worker, world)):
        for name, amount in per.items():  # custom resources that pin actors to node types
            need[name] = need.get(name, 0.0) + amount * count
    have = ray.cluster_resources()
    short = {k: (v, have.get(k, 0.0)) for k, v in need.items() if v > have.get(k, 0.0) + 1e-9}
    if short:
        print("WARNING: this run asks for more than the Ray cluster has now ("
              + ", ".join(f"{k}: {v:g} needed, {h:g} available" for k, (v, h) in short.items())
              + "); it will wait for resources. Lower training.num_cpus_per_worker / teachers.num_cpus "
              "(fractions are fine), check teachers.resources / training.resources_per_worker against the "
              "nodes' custom resources, or add nodes.", flush=True)


def teacher_inflight_cap(cfg: RunConfig, teacher_roles: list[str]) -> int:
    """Calls in flight per teacher replica that the driver's window needs: W x (prefetch + 1) batches (plus
    the warm-up batch) over the fewest replicas of any role, so that topping up the window does not wait in
    the pool's back-pressure in normal operation (`teachers.max_inflight_per_replica` is raised to it)."""
    t = cfg.training
    fewest = max(1, min([cfg.teachers.replicas.get(r, 1) for r in teacher_roles] or [1]))
    batches = t.num_workers * (t.prefetch + 1) + 1
    return -(-batches // fewest)


