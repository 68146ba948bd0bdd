"""`WorkerGroup`: the student ranks as one object: creation, rendezvous, placement, restarts, calls on all.

    group = WorkerGroup(cfg, out)
    group.create()                      # actors start and import while the teachers load (non-blocking)
    group.start(resume_dir, pool, rdt)  # process group, DDP, optimizer, checkpoint; RDT group when used
    group.call("begin", step)           # one call per rank, in rank order: their refs
    group.call_whole("save_model", path)  # a call that needs the whole model: rank 0's result
    group.replace(resume_dir, pool, rdt)  # kill every rank at once, start a new generation from a checkpoint
    group.stop()                        # kill them; stop(keep=True) hands them to the group's WarmRanks

Ranks are NAMED actors, `{run_name}-student-{rank}-{run_uid}` in the namespace `teachers.namespace`, with a
fresh `run_uid` per generation (student_worker/recovery.py), so an operator can find them and a restored
group never collides with the one it replaces (ranks of a WarmRanks: see there). `generation` counts the groups
before this one.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import ray
from ray.experimental.collective import create_collective_group, destroy_collective_group

from common.config import RunConfig
from common.faults import FaultPlan
from student_worker import checkpoint as ckpt
from student_worker.recovery import find_cause, new_run_uid, worker_actor_name
from student_worker.shared_output import check_shared_output
from student_worker.worker import StudentWorker

__all__ = ["WorkerGroup", "WarmRanks"]

READY_TIMEOUT_S = 30.0  # an idle rank that does not answer (or reset) in this long is dropped (it may be gone)


class WarmRanks:
    """Student worker processes kept between the runs of one driver process (run_experiment's runs, a test
    session's): a run takes its ranks from here when an earlier run of the same kind left them, instead of
    starting processes that import torch and transformers again (~4 CPU-s per rank on the 2-core host).

    A run hands its ranks back only when it ends cleanly (finished, or stopped by `stop_after`); a failure kills
    them, as without WarmRanks. A taken rank is reset (`StudentWorkerImpl.reset`) and set up like a new one;
    the resets are awaited (READY_TIMEOUT_S): one that fails or hangs makes the run start new ranks instead.
    Only CPU DDP ranks are kept (`key`): fsdp2 and gloo RDT groups take over torch's default process group, which
    a process cannot leave, and NCCL communicators are not torn down in-process here. Equal worker resources and
    reproducibility settings are required (threads, kernel set and determinism are per process). Ranks started
    for a WarmRanks are named `student-<n>-<uid>` in ITS namespace (they outlive runs: no run's name fits them);
    idle ranks keep their Ray resources; `close()` kills them."""

    def __init__(self, namespace: str = "deltakd-warm-ranks") -> None:
        self.namespace = namespace
        self._uid, self._started = new_run_uid(), 0
        self._idle: dict[str, list[tuple[Any, str]]] = {}

    def new_name(self) -> str:
        self._started += 1
        return f"student-{self._started}-{self._uid}"

    @staticmethod
    def key(cfg: RunConfig) -> str | None:
        """Which runs can share ranks (None: this run's ranks are never kept)."""
        t = cfg.training
        if t.strategy != "ddp" or t.num_gpus_per_worker > 0:
            return None
        return json.dumps([t.num_cpus_per_worker, dict(t.resources_per_worker), cfg.reproducibility.model_dump()],
                          sort_keys=True)

    def take(self, cfg: RunConfig, n: int) -> list[tuple[Any, str]]:
        """Up to `n` live idle ranks (actor, name) for a run of `cfg`, in the order they were handed back (one
        that died while idle is dropped)."""
        key = self.key(cfg)
        idle = self._idle.get(key, []) if key is not None else []
        taken: list[tuple[Any, str]] = []
        while idle and len(taken) < n:
            actor, name = idle.pop(0)
            try:
                ray.get(actor.__ray_ready__.remote(), timeout=READY_TIMEOUT_S)
            except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                ray.kill(actor, no_restart=True)
                continue
            taken.append((actor, name))
        return taken

    def give(self, cfg: RunConfig, ranks: list[tuple[Any, str]]) -> None:
        """Keep a cleanly ended run's ranks (rank order) for the next run; ranks that cannot be kept are killed."""
        key = self.key(cfg)
        if key is None:
            for actor, _ in ranks:
                ray.kill(actor, no_restart=True)
            return
        self._idle.setdefault(key, []).extend(ranks)

    def idle_names(self) -> list[str]:
        """The names of the idle ranks (kept, not in a run)."""
        return [name for ranks in self._idle.values() for _, name in ranks]

    def close(self) -> None:
        """Kill every idle rank."""
        for ranks in self._idle.values():
            for actor, _ in ranks:
                ray.kill(actor, no_restart=True)
        self._idle.clear()


class WorkerGroup:
    """The run's student worker actors, one per rank (`training.num_workers`)."""

    def __init__(self, cfg: RunConfig, out: Path, faults: FaultPlan | None = None, warm: WarmRanks | None = None):
        """faults: a test's FaultPlan (common/faults.py) handed to every rank; None in production. warm: where the
        first generation's ranks come from when it has some, and where `stop(keep=True)` leaves them."""
        self.cfg, self.out, self.faults, self.warm = cfg, out, faults, warm
        self.cfg_dict = cfg.model_dump(mode="json")
        self.world = cfg.training.num_workers
        self.workers: list[Any] = []
        self.names: list[str] = []
        self.generation = 0  # how many groups came before this one (a restore starts the next)
        self._rdt_group: str | None = None

    def __len__(self) -> int:
        return len(self.workers)

    @property
    def rank0(self) -> Any:
        return self.workers[0]

    def create(self) -> None:
        """Create the actors (non-blocking: their processes start and import while teachers load)."""
        t = self.cfg.training
        taken = self.warm.take(self.cfg, self.world) if self.warm is not None and self.generation == 0 else []
        resets = [actor.reset.remote(self.cfg_dict, rank, self.world, self.generation, faults=self.faults)
                  for rank, (actor, _) in enumerate(taken)]
        try:  # bounded: a reset drops the last run's gloo group, whose teardown is not ours to bound
            ray.get(resets, timeout=READY_TIMEOUT_S)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError) as exc:
            print(f"warm ranks: a reset failed ({type(exc).__name__}); starting new ranks instead", flush=True)
            for actor, _ in taken:
                ray.kill(actor, no_restart=True)
            taken = []
        uid, namespace = new_run_uid(), self.cfg.teachers.namespace
        fresh = [worker_actor_name(self.cfg.run_name, rank, uid) for rank in range(len(taken), self.world)]
        if self.warm is not None:
            fresh, namespace = [self.warm.new_name() for _ in fresh], self.warm.namespace
        self.names = [name for _, name in taken] + fresh
        self.workers = [actor for actor, _ in taken] + [
            StudentWorker.options(num_cpus=t.num_cpus_per_worker, num_gpus=t.num_gpus_per_worker, name=name,
                                  resources=dict(t.resources_per_worker) or None,
                                  namespace=namespace).remote(self.cfg_dict, rank, self.world, self.generation,
                                                              faults=self.faults)
            for rank, name in enumerate(fresh, start=len(taken))
        ]

    def start(self, resume_dir: Path | None, pool: Any = None, rdt: bool = False) -> None:
        """Set up the created ranks: the shared-output check, the process group (rank 0's address), DDP, the
        optimizer and the checkpoint; the RDT collective group with the pool's actors when `rdt`. A refused
        checkpoint file raises its typed CheckpointError."""
        if not self.workers:
            self.create()
        check_shared_output(self.out, self.workers, self.cfg.output.require_shared_dir)
        init_method = ray.get(self.rank0.rendezvous_address.remote())
        arg = None if resume_dir is None else str(resume_dir)
        try:
            ray.get(self.call("setup", init_method, arg))
        except ray.exceptions.RayTaskError as exc:
            typed = find_cause(exc, ckpt.CheckpointError)
            if typed is None:
                raise
            raise typed from exc
        if rdt:
            # the ranks' placements decide `auto` (and fix the run's transport); cuda_ipc is one-sided and
            # needs no collective group (Ray refuses one with that backend)
            backend = pool.rdt_backend(self.workers)
            if backend == "gloo" and self.cfg.training.strategy == "fsdp2":
                raise RuntimeError("transport.rdt_backend=auto chose gloo, whose RDT group would take over torch's "
                                   "default process group, which training.strategy=fsdp2 uses for the student "
                                   "ranks: use transport.kind=object_store (or an nccl / cuda_ipc RDT backend)")
            if backend != "cuda_ipc":
                self._rdt_group = f"deltakd-rdt-{time.time_ns()}"
                create_collective_group(pool.actors() + self.workers, backend=backend, name=self._rdt_group)

    def call(self, method: str, *args: Any) -> list[Any]:
        """`method(*args)` queued on every rank, in rank order; returns the refs (not waited for)."""
        return [getattr(w, method).remote(*args) for w in self.workers]

    def call_whole(self, method: str, *args: Any) -> Any:
        """Rank 0's result of `method(*args)` for a call that needs the whole model (save_model, evaluate): on
        rank 0 alone under ddp (it holds the whole model); on every rank under fsdp2 (each rank's shards are
        gathered), waiting for all."""
        if self.cfg.training.strategy == "fsdp2":
            return ray.get(self.call(method, *args))[0]
        return ray.get(getattr(self.rank0, method).remote(*args))

    def call_each(self, method: str, per_rank: list[tuple[Any, ...]]) -> list[Any]:
        """`method(*per_rank[r])` queued on rank r; returns the refs."""
        return [getattr(w, method).remote(*args) for w, args in zip(self.workers, per_rank, strict=True)]

    def stop(self, keep: bool = False) -> None:
        """Kill every rank at once (survivors may sit in a collective with a failed rank) and the RDT group;
        `keep` (a cleanly ended run): hand the ranks to the WarmRanks instead, when there is one."""
        if self._rdt_group is not None:
            destroy_collective_group(self._rdt_group)
            self._rdt_group = None
        if keep and self.warm is not None:
            self.warm.give(self.cfg, list(zip(self.workers, self.names, strict=True)))
        else:
            for w in self.workers:
                ray.kill(w, no_restart=True)
        self.workers, self.names = [], []

    def replace(self, resume_dir: Path | None, pool: Any = None, rdt: bool = False) -> None:
        """A new generation of ranks in place of this one, started from `resume_dir` (None: from scratch)."""
        self.stop()
        self.generation += 1
        self.create()
        self.start(resume_dir, pool, rdt)
