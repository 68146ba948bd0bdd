"""`WorkerGroup`: the student ranks as one object: creation, rendezvous, placement, restarts, calls on all.

    group = WorkerGroup(cfg, out)
    group.create()                      # actors start and import while the teachers load (non-blocking)
    group.start(resume_dir, pool, rdt)  # process group, DDP, optimizer, checkpoint; RDT group when used
    group.call("begin", step)           # one call per rank, in rank order: their refs
    group.call_whole("save_model", path)  # a call that needs the whole model: rank 0's result
    group.replace(resume_dir, pool, rdt)  # kill every rank at once, start a new generation from a checkpoint
    group.stop()

Ranks are NAMED actors, `{run_name}-student-{rank}-{run_uid}` in the namespace `teachers.namespace`, with a
fresh `run_uid` per generation (student_worker/recovery.py), so an operator can find them and a restored
group never collides with the one it replaces. `generation` counts the groups before this one.
"""

from __future__ import annotations

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

__all__ = ["WorkerGroup"]


class WorkerGroup:
    """The run's student worker actors, one per rank (`training.num_workers`)."""

    def __init__(self, cfg: RunConfig, out: Path, faults: FaultPlan | None = None):
        """faults: a test's FaultPlan (common/faults.py) handed to every rank; None in production."""
        self.cfg, self.out, self.faults = cfg, out, faults
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
        uid = new_run_uid()
        self.names = [worker_actor_name(self.cfg.run_name, rank, uid) for rank in range(self.world)]
        self.workers = [
            StudentWorker.options(num_cpus=t.num_cpus_per_worker, num_gpus=t.num_gpus_per_worker, name=name,
                                  resources=dict(t.resources_per_worker) or None,
                                  namespace=self.cfg.teachers.namespace).remote(self.cfg_dict, rank, self.world,
                                                                                self.generation, faults=self.faults)
            for rank, name in enumerate(self.names)
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

    def stop(self) -> None:
        """Kill every rank at once (survivors may sit in a collective with a failed rank) and the RDT group."""
        if self._rdt_group is not None:
            destroy_collective_group(self._rdt_group)
            self._rdt_group = None
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers, self.names = [], []

    def replace(self, resume_dir: Path | None, pool: Any = None, rdt: bool = False) -> None:
        """A new generation of ranks in place of this one, started from `resume_dir` (None: from scratch)."""
        self.stop()
        self.generation += 1
        self.create()
        self.start(resume_dir, pool, rdt)
