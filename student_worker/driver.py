"""The driver: one process orchestrates teachers and student workers (DESIGN.md section 3).

Per step s (0-based) with W workers, rank r trains batch id `s * W + r`. The driver keeps `prefetch`
batches beyond the current one submitted to the teacher pool; each record ref goes straight to the worker
of its rank (nested in a list for the object store, as direct arguments for RDT); the driver never reads a
record. Checkpoints are taken after every `checkpoint_every` completed steps and at the end; a checkpoint
named `ckpt-N` holds the state after N completed steps (N is also the data cursor: the next step index).
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import ray

from common.config import RunConfig, config_hash, dump_config
from student_worker import checkpoint as ckpt
from student_worker.data import BatchPlan, collate, load_examples, tokenize_examples
from student_worker.evaluate import evaluate_spec
from student_worker.recovery import (
    ACTOR_GONE,
    MAX_WORKER_RESTARTS,
    WorkerCrash,
    find_cause,
    maybe_crash_in_checkpoint,
    new_run_uid,
    step_delay_s,
    worker_actor_name,
)
from student_worker.report import run_summary, step_row, write_report
from student_worker.shared_output import check_shared_output
from student_worker.worker import StudentWorker

__all__ = ["TrainingRunError", "InputError", "Driver", "run_training", "find_cause", "MAX_WORKER_RESTARTS"]

class TrainingRunError(RuntimeError):
    """The run cannot continue (teacher unavailable, workers keep dying). The message names the culprit."""


class InputError(ValueError):
    """Bad input found by `Driver.preflight` (data rows, tokenizers, k), before anything was written.

    The message names the culprit (file and line, model paths, key); `__cause__` is the original typed error
    (DataError, TokenizerMismatchError, ...)."""


# The SFT teacher's ceiling, evaluated in a Ray task so that it gets a GPU when the teachers had one.
evaluate_spec_task = ray.remote(num_cpus=1)(evaluate_spec)


@dataclass
class _InFlight:
    step: int
    arrays: list[dict[str, np.ndarray]]  # per rank
    records: list[Any] = field(default_factory=list)  # per rank: ObjectRef, or (meta, roles, refs) for RDT


class Driver:
    """One training run. `run()` returns the report dict; outputs go to cfg.output_dir."""

    def __init__(self, cfg: RunConfig, resume: bool = False, stop_after: int | None = None, progress: bool = True):
        self.cfg, self.resume, self.stop_after, self.progress = cfg, resume, stop_after, progress
        self.out = cfg.output_dir.resolve()  # workers get absolute paths, whatever their working directory
        self.ckpt_root = self.out / "checkpoints"
        self.cfg_dict = cfg.model_dump(mode="json")
        self.world = cfg.training.num_workers
        self.rdt = cfg.transport.kind == "rdt" and cfg.loss.method != "sft"
        self.pool: Any = None
        self.workers: list[Any] = []
        self.rows: list[dict[str, Any]] = []
        self.rouge: dict[str, Any] = {}
        self.restarts = 0
        self._group_name: str | None = None
        self.worker_names: list[str] = []
        self.resume_dir: Path | None = None
        self._preflight_done = False

    # ------------------------------------------------------------------ checks before anything is written
    def preflight(self) -> None:
        """Every check that needs no Ray and writes nothing: the resume checkpoint (config, files), that a
        fresh run does not overwrite a previous one, the data (rows, columns, lengths), one tokenizer for all
        roles and k in 1..V. Raises CheckpointError or InputError naming the culprit."""
        from student_worker.data import DataError
        from teacher_service.errors import TeacherError

        if self._preflight_done:
            return
        if self.resume:  # first: a checkpoint of another config is the user's most likely mistake here
            self.resume_dir = ckpt.latest_checkpoint(self.ckpt_root)
            if self.resume_dir is not None:
                ckpt.check_resume_config(self.resume_dir, self.cfg_dict)
                ckpt.verify_checkpoint(self.resume_dir)
        try:
            self._load_data()
            if self.cfg.loss.method != "sft":
                from teacher_service.tokenizer_check import check_tokenizers

                check_tokenizers(self.cfg)  # tokenizer files only: no weights are loaded yet
        except (DataError, TeacherError, ValueError) as exc:
            raise InputError(f"{type(exc).__name__}: {exc}") from exc
        if not self.resume:  # last: a bad row or tokenizer is reported as such, wherever the output goes
            ckpt.check_no_previous_run(self.out)
        self._preflight_done = True

    # ------------------------------------------------------------------ set-up
    def _load_data(self) -> None:
        from transformers import AutoTokenizer

        spec = self.cfg.models.student
        tok = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        train = load_examples(self.cfg.data, "train", self.cfg.embedded)
        self.train_tok = tokenize_examples(train, tok, self.cfg.data)
        self.eval_examples = (load_examples(self.cfg.data, "eval", self.cfg.embedded)
                              if self.cfg.evaluation.enabled and self.cfg.data.eval else [])
        self.plan = BatchPlan(len(self.train_tok), self.cfg.training.batch_size, self.world, self.cfg.seed,
                              self.cfg.data.shuffle)

    def _check_resources(self) -> None:
        """Warn (loudly) when teachers + workers ask for more CPUs/GPUs than the cluster has right now:
        Ray would wait forever for the missing slots (an autoscaling cluster may still add them)."""
        t, tc = self.cfg.training, self.cfg.teachers
        n_teachers = 0 if self.cfg.loss.method == "sft" or tc.attach else sum(
            tc.replicas.get(r, 1) for r in self._teacher_roles())
        need = {"CPU": self.world * t.num_cpus_per_worker + n_teachers * tc.num_cpus,
                "GPU": self.world * t.num_gpus_per_worker + n_teachers * tc.num_gpus}
        for per, count in ((tc.resources, n_teachers), (t.resources_per_worker, self.world)):
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

    def _teacher_roles(self) -> list[str]:
        from teacher_service.roles import teacher_role_specs

        return list(teacher_role_specs(self.cfg))

    def _start_pool(self) -> None:
        if self.cfg.loss.method == "sft":
            return  # no teacher at all for plain SFT
        from teacher_service import TeacherPool

        self.pool = TeacherPool.attach(self.cfg) if self.cfg.teachers.attach else TeacherPool.start(self.cfg)
        # Not waited for: the teachers' one-off first-call costs overlap with the workers' set-up, and any
        # remainder shows up as the first step's teacher wait. A real fault recurs on the first real batch.
        self.pool.warm_up(assemble=not self.rdt)

    def _create_workers(self) -> None:
        """Create the actors (non-blocking: their processes start and import while teachers load)."""
        t = self.cfg.training
        uid, delay = new_run_uid(), step_delay_s()
        self.worker_names = [worker_actor_name(self.cfg.run_name, rank, uid) for rank in range(self.world)]
        self.workers = [
            StudentWorker.options(num_cpus=t.num_cpus_per_worker, num_gpus=t.num_gpus_per_worker, name=name,
                                  resources=dict(t.resources_per_worker) or None,
                                  namespace=self.cfg.teachers.namespace).remote(self.cfg_dict, rank, self.world,
                                                                                delay)
            for rank, name in enumerate(self.worker_names)
        ]

    def _start_workers(self, resume_dir: Path | None) -> None:
        """Set up the created workers: process group, DDP, optimizer, checkpoint; RDT group when used."""
        if not self.workers:
            self._create_workers()
        check_shared_output(self.out, self.workers, self.cfg.output.require_shared_dir)
        init_method = ray.get(self.workers[0].rendezvous_address.remote())
        arg = None if resume_dir is None else str(resume_dir)
        try:
            ray.get([w.setup.remote(init_method, arg) for w in self.workers])
        except ray.exceptions.RayTaskError as exc:  # e.g. a refused checkpoint file: raise the typed error
            typed = find_cause(exc, ckpt.CheckpointError)
            if typed is None:
                raise
            raise typed from exc
        if self.rdt:
            # the workers' placements decide `auto` (and fix the run's transport); cuda_ipc is one-sided
            # and needs no collective group (Ray refuses one with that backend)
            backend = self.pool.rdt_backend(self.workers)
            if backend != "cuda_ipc":
                from ray.experimental.collective import create_collective_group

                self._group_name = f"deltakd-rdt-{time.time_ns()}"
                create_collective_group(self.pool.actors() + self.workers, backend=backend, name=self._group_name)

    def _stop_workers(self) -> None:
        if self._group_name is not None:
            from ray.experimental.collective import destroy_collective_group

            destroy_collective_group(self._group_name)
            self._group_name = None
        for w in self.workers:
            ray.kill(w, no_restart=True)
        self.workers, self.worker_names = [], []

    def _restore_workers(self, crash: WorkerCrash) -> int:
        """Replace the whole worker group (the survivors may be stuck in a collective with the dead rank) and
        load the newest complete checkpoint; returns the step to continue from. The metrics rows of the steps
        after that checkpoint are dropped here and rewritten when those steps are replayed."""
        self.restarts += 1
        if self.restarts > MAX_WORKER_RESTARTS:
            raise TrainingRunError(f"student workers died {self.restarts} times (last: {crash}); giving up; "
                                   f"resume later from {ckpt.latest_checkpoint(self.ckpt_root)}") from crash.cause
        print(f"{crash}; restoring the worker group from the last checkpoint", flush=True)
        self._stop_workers()
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        self._create_workers()
        self._start_workers(latest)
        step = 0 if latest is None else int(ckpt.read_state(latest)["step"])
        self.rows = [r for r in self.rows if r["step"] < step]
        self._rewrite_metrics()
        return step

    # ------------------------------------------------------------------ steps
    def _submit(self, step: int) -> _InFlight:
        arrays = [collate([self.train_tok[i] for i in idx], self.pad_id) for idx in self.plan.step_indices(step)]
        item = _InFlight(step, arrays)
        if self.pool is not None:
            for rank, a in enumerate(arrays):
                bid = step * self.world + rank
                submit = self.pool.submit_parts if self.rdt else self.pool.submit
                item.records.append(submit(bid, a["input_ids"], a["attention_mask"], a["loss_mask"]))
        return item

    def _run_step(self, item: _InFlight) -> list[dict[str, Any]]:
        global_tokens = int(sum(a["loss_mask"].sum() for a in item.arrays))
        refs = []
        for rank, w in enumerate(self.workers):
            batch = {k: item.arrays[rank][k] for k in ("input_ids", "attention_mask", "labels")}
            if self.rdt:
                meta, roles, parts = item.records[rank]
                refs.append(w.train_step_rdt.remote(item.step, batch, global_tokens, meta, roles, *parts))
            else:
                box = [item.records[rank]] if item.records else None  # nested: the worker resolves it
                refs.append(w.train_step.remote(item.step, batch, box, global_tokens))
        rank_of = {r: i for i, r in enumerate(refs)}
        results: list[dict[str, Any]] = [{} for _ in refs]
        errors: list[BaseException] = []
        remaining = list(refs)
        while remaining:
            ready, remaining = ray.wait(remaining, num_returns=1)
            try:
                results[rank_of[ready[0]]] = ray.get(ready[0])
            except ACTOR_GONE as exc:
                raise WorkerCrash(rank_of[ready[0]], exc) from exc
            except ray.exceptions.RayTaskError as exc:
                errors.append(exc)
        if errors:
            from common.topk import RecordError
            from student_worker.worker import PeerInputError
            from teacher_service.errors import TeacherError, TeacherUnavailableError

            # The typed teacher error (dead role, NaN output, bad record) names role/model and batch.
            typed = ([c for e in errors if (c := find_cause(e, TeacherUnavailableError))]
                     + [c for e in errors if (c := find_cause(e, (TeacherError, RecordError)))])
            first = next((e for e in errors if not find_cause(e, PeerInputError)), errors[0])
            raise typed[0] if typed else first
        return results

    # ------------------------------------------------------------------ outputs
    def _rewrite_metrics(self) -> None:
        with open(self.out / "metrics.jsonl", "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")

    def _checkpoint(self, step: int) -> Path:
        tmp = ckpt.begin_checkpoint(self.ckpt_root, step)
        for rank, ref in enumerate([w.save_checkpoint.remote(str(tmp)) for w in self.workers]):
            try:
                ray.get(ref)
            except ACTOR_GONE as exc:  # the .tmp directory is left behind and never read
                raise WorkerCrash(rank, exc) from exc
        maybe_crash_in_checkpoint(tmp, step)  # test-only fault hook (student_worker/recovery.py)
        state = {"step": step, "data_cursor": step, "config_hash": config_hash(self.cfg), "config": self.cfg_dict,
                 "metrics": self.rows, "rouge": self.rouge}
        return ckpt.finalize_checkpoint(tmp, state, self.cfg.training.keep_checkpoints)

    def _evaluate_student(self) -> dict[str, Any]:
        e = self.cfg.evaluation
        return ray.get(self.workers[0].evaluate.remote(self.eval_examples, e.max_new_tokens, e.batch_size))

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        from tqdm import tqdm

        self.preflight()  # nothing is written before every input check passed
        start_step, resume_dir = 0, self.resume_dir
        if self.resume and resume_dir is None:
            print(f"--resume: no complete checkpoint under {self.ckpt_root}; starting from step 0")
        elif resume_dir is not None:
            state = ckpt.read_state(resume_dir)
            start_step, self.rows, self.rouge = int(state["step"]), list(state["metrics"]), state["rouge"]
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.out / "config.yaml")
        self._rewrite_metrics()
        t = self.cfg.training
        end_step = t.max_steps if self.stop_after is None else min(t.max_steps, self.stop_after)
        try:
            self._check_resources()
            self._create_workers()
            self._start_pool()
            self._start_workers(resume_dir)
            e = self.cfg.evaluation
            if self.eval_examples and e.evaluate_before and "student_base" not in self.rouge:
                self.rouge["student_base"] = self._evaluate_student()
            step, last_ckpt = start_step, start_step if resume_dir is not None else -1
            pending: deque[_InFlight] = deque()
            next_submit = step
            bar = tqdm(total=t.max_steps, initial=step, disable=not self.progress, desc=self.cfg.loss.method)
            t_loop, t_prev = time.perf_counter(), time.perf_counter()
            while step < end_step:
                while next_submit < end_step and len(pending) < t.prefetch + 1:
                    pending.append(self._submit(next_submit))
                    next_submit += 1
                item = pending.popleft()
                try:
                    per_rank = self._run_step(item)
                except WorkerCrash as crash:
                    pending.clear()
                    step = next_submit = bar.n = self._restore_workers(crash)
                    t_prev = time.perf_counter()
                    continue
                except Exception as exc:
                    if step != last_ckpt:  # keep what is done: the model is still at `step` completed steps
                        self._checkpoint(step)
                    raise TrainingRunError(f"step {step} failed; checkpoint of {step} completed steps written "
                                           f"under {self.ckpt_root}: {type(exc).__name__}: {exc}") from exc
                now = time.perf_counter()
                row = step_row(step, per_rank, item.arrays, now - t_prev)
                t_prev = now
                self.rows.append(row)
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(row) + "\n")
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                                wait=f"{100 * row['teacher_wait_frac']:.0f}%")
                bar.update(1)
                step += 1
                if step % t.checkpoint_every == 0 or step == end_step:
                    try:
                        self._checkpoint(step)
                    except WorkerCrash as crash:  # died while saving: replay from the previous checkpoint
                        pending.clear()
                        step = next_submit = bar.n = self._restore_workers(crash)
                        t_prev = time.perf_counter()
                        continue
                    last_ckpt = step
            bar.close()
            loop_s = time.perf_counter() - t_loop
            if step < t.max_steps:  # stopped early on purpose (--stop-after): as if interrupted
                return {"stopped_at": step, "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root))}
            ray.get(self.workers[0].save_model.remote(str(self.out / "final_model")))
            if self.eval_examples:
                self.rouge["student_after"] = self._evaluate_student()
            teacher_stats = self.pool.stats() if self.pool is not None else None
            self._release()  # frees the CPU/GPU slots the teacher's evaluation task needs on small machines
            if self.eval_examples and e.evaluate_teacher:
                spec, tc = self.cfg.models.sft_teacher, self.cfg.teachers
                task = evaluate_spec_task.options(num_cpus=min(1.0, tc.num_cpus), num_gpus=tc.num_gpus)
                self.rouge["sft_teacher"] = ray.get(task.remote(spec, self.eval_examples, e.max_new_tokens,
                                                                e.batch_size))
            return self._report(start_step, step, loop_s, teacher_stats)
        finally:
            self._release()

    def _release(self) -> None:
        """Kill the workers and the teachers this run started (attached teachers stay up)."""
        self._stop_workers()
        if self.pool is not None:
            self.pool.shutdown()  # kills only the actors it started (not attached ones)
            self.pool = None

    def _report(self, start_step: int, step: int, loop_s: float,
                teacher_stats: dict[str, Any] | None) -> dict[str, Any]:
        report = run_summary(self.cfg, self.rows, start_step, step, loop_s, self.rouge, self.restarts,
                             teacher_stats, paths={"output_dir": str(self.out),
                                                   "final_model": str(self.out / "final_model"),
                                                   "metrics": str(self.out / "metrics.jsonl"),
                                                   "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root))})
        write_report(self.out, report, self.rows, self.cfg.output.plot)  # adds its files to report["paths"]
        return report


def run_training(cfg: RunConfig, resume: bool = False, stop_after: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Run one training job on the already-initialised Ray cluster; returns the report dict."""
    return Driver(cfg, resume=resume, stop_after=stop_after, progress=progress).run()
