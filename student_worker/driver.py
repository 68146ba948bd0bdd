"""The driver: one process orchestrates teachers and student workers (DESIGN.md section 3).

Per step s (0-based) with W workers, rank r trains batch id `s * W + r`. The driver keeps the teacher work of
steps s .. s + prefetch submitted to the teacher pool and every worker's calls for steps s .. s + min(prefetch,
2) queued: the next call waits in the actor's queue, so a worker goes from one step straight into the next
while the driver does its bookkeeping or waits on the pool. Each loop turn dispatches first, then
tops up the teacher window, then waits. Each record ref goes straight to the worker of its rank (nested in a
list for the object store, as direct arguments for RDT); the driver never reads a record.

Checkpoints are taken after every `checkpoint_every` completed steps and at the end; a checkpoint named
`ckpt-N` holds the state after N completed steps (N is also the data cursor: the next step index). Its save
is queued between the calls of steps N-1 and N, so it sees exactly N completed steps (the workers check).

On-policy steps (`training.on_policy`, student_worker/on_policy.py): the workers draw the step's samples
with a `sample` call queued between their train calls (lag 0: right after the previous step's; lag 1: one
step earlier), the driver collects the (small) sampled id arrays, submits their teacher work with the sampled
tokens forced into the support, and only then queues the step's train calls; nothing is queued past an
on-policy step whose samples are not back, so the window runs ahead only as far as the weights allow.

A checkpoint write that fails at the storage level (no space left, EIO: `ckpt.io_error_of`) removes its partial
`.tmp` directory and raises `ckpt.CheckpointWriteError`; the previous checkpoint is untouched (the CLI exits
74 with one message). `steps_done` is how far the run got, for the message of an interrupted run.

Failures (`step_calls.wait_step`, `Driver._loop`): a worker process that dies, or a rank that raises after the step's
input agreement (the other ranks may then sit in a collective), makes the driver kill the whole worker group
at once, start a new one from the last checkpoint and replay (at most MAX_WORKER_RESTARTS times). A step
every rank rejected at the input agreement (a teacher unavailable, a bad record) and a deterministic input
error of the loss stop the run with TrainingRunError naming the culprit, after a checkpoint of the completed
steps when the workers are intact.
"""

from __future__ import annotations

import json
import shutil
import time
from collections import deque
from pathlib import Path
from typing import Any

import ray

from common.config import RunConfig, config_hash, dump_config
from student_worker import checkpoint as ckpt
from student_worker.data import load_examples, load_training_set
from student_worker.evaluate import evaluate_spec
from student_worker.record_source import check_cache, open_record_source
from student_worker.recovery import (
    ACTOR_GONE,
    MAX_WORKER_RESTARTS,
    WorkerCrash,
    check_resources,
    find_cause,
    is_fatal_rank_error,
    maybe_crash_in_checkpoint,
    new_run_uid,
    teacher_inflight_cap,
    worker_actor_name,
)
from student_worker.report import run_summary, step_row, write_report
from student_worker.selection import BestModelSelection
from student_worker.shared_output import check_shared_output
from student_worker.step_calls import (
    OnPolicySteps,
    StepInFlight,
    dispatch_step,
    queue_save,
    submit_step,
    wait_step,
)
from student_worker.tracking import MetricsTracker, check_trackers
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


_QUEUED_STEPS = 3


class Driver:
    """One training run. `run()` returns the report dict; outputs go to cfg.output_dir."""

    def __init__(self, cfg: RunConfig, resume: bool = False, stop_after: int | None = None, progress: bool = True):
        self.cfg, self.resume, self.stop_after, self.progress = cfg, resume, stop_after, progress
        self.out = cfg.output_dir.resolve()  # workers get absolute paths, whatever their working directory
        self.ckpt_root = self.out / "checkpoints"
        self.cfg_dict = cfg.model_dump(mode="json")
        self.world = cfg.training.num_workers
        # RDT carries live teachers' tensors; cache and auto records go through the object store
        self.rdt = cfg.transport.kind == "rdt" and cfg.loss.method != "sft" and cfg.teachers.source == "live"
        self.pool: Any = None
        self.source: Any = None  # student_worker/record_source.py: live pool, teacher cache, or auto
        self.cache_plan: Any = None
        self.workers: list[Any] = []
        self.rows: list[dict[str, Any]] = []
        self.rouge: dict[str, Any] = {}
        self.restarts = 0
        self.recoveries: list[dict[str, Any]] = []  # one per worker-group restore: step, rank, cause, seconds
        self._group_name: str | None = None
        self.worker_names: list[str] = []
        self.resume_dir: Path | None = None
        self._preflight_done = False
        self.tracker: MetricsTracker | None = None
        self.sampling: OnPolicySteps | None = None  # training.on_policy (set up with the data)
        # every batch's labels forced into its support when the loss scores the label's atom
        self.include_labels = cfg.loss.objective == "sampled_token"

    @property
    def steps_done(self) -> int:
        """Completed steps so far (the metrics rows cover steps 0 .. steps_done - 1, a resume's included)."""
        return len(self.rows)

    # ------------------------------------------------------------------ checks before anything is written
    def preflight(self) -> None:
        """Every check that needs no Ray and writes nothing: the resume checkpoint (config, files), that a
        fresh run does not overwrite a previous one, the data (rows, columns, lengths), one tokenizer for all
        roles and k in 1..V; with on-policy steps, the prompts' lengths (data.overlong), an EOS in the student's
        generation config and (lag 1) the sample the resume checkpoint carries. Raises CheckpointError or
        InputError naming the culprit."""
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
            check_trackers(self.cfg)  # logging.report_to: its packages are installed
            if self.cfg.loss.method != "sft" and self.cfg.teachers.source != "cache":
                from teacher_service.tokenizer_check import check_tokenizers

                check_tokenizers(self.cfg)  # tokenizer files only: no weights are loaded yet
            if self.sampling is not None:
                from student_worker.on_policy import student_eos_ids

                spec = self.cfg.models.student
                student_eos_ids(spec.path, spec.revision, spec.trust_remote_code)  # a sample must be able to end
            # the teacher cache (teachers.source cache / auto): settings, models, roles and shards checked now
            self.cache_plan = check_cache(self.cfg, self.train_set)
        except (DataError, TeacherError, ValueError) as exc:
            raise InputError(f"{type(exc).__name__}: {exc}") from exc
        if self.resume_dir is not None and self.sampling is not None:  # lag 1: the sample it carries
            self.sampling.stored(self.resume_dir, int(ckpt.read_state(self.resume_dir)["step"]))
        if not self.resume:  # last: a bad row or tokenizer is reported as such, wherever the output goes
            ckpt.check_no_previous_run(self.out)
        self._preflight_done = True

    # ------------------------------------------------------------------ set-up
    def _load_data(self) -> None:
        self.train_set = load_training_set(self.cfg)
        self.pad_id, self.train_tok, self.plan = self.train_set.pad_id, self.train_set.examples, self.train_set.plan
        self.eval_examples = (load_examples(self.cfg.data, "eval", self.cfg.embedded)
                              if self.cfg.evaluation.enabled and self.cfg.data.eval else [])
        self.selection = BestModelSelection.from_config(self.cfg, self.out)  # evaluation.select_best
        op = self.cfg.training.on_policy
        if op.enabled:  # each example's prompt for on-policy steps, cut or refused (data.overlong)
            from student_worker.on_policy import on_policy_prompts

            d = self.cfg.data
            prompts = on_policy_prompts(self.train_tok, d.max_length - op.max_new_tokens, d.overlong,
                                        self.train_set.bos_id)
            self.sampling = OnPolicySteps(self.cfg, self.plan, prompts)

    def _check_resources(self) -> None:
        """Warn (loudly) when teachers + workers ask for more CPUs/GPUs than the cluster has right now."""
        check_resources(self.cfg, self._teacher_roles())

    def _teacher_roles(self) -> list[str]:
        from teacher_service.roles import teacher_role_specs

        return list(teacher_role_specs(self.cfg))

    def _start_source(self) -> None:
        """The record source (None for sft: no teacher at all); a cache that serves the run starts no teacher."""
        self.source = open_record_source(self.cfg, self.cache_plan, self.train_set, self.workers, self._start_pool,
                                         self.rdt)
        if self.source is not None:
            # Not waited for: the teachers' one-off first-call costs overlap with the workers' set-up, and any
            # remainder shows up as the first step's teacher wait. A real fault recurs on the first real batch.
            self.source.warm_up()

    def _start_pool(self) -> Any:
        from teacher_service import TeacherPool

        # The pool's in-flight cap sized for the window (recovery.teacher_inflight_cap); the rest as configured.
        tc = self.cfg.teachers
        cap = max(tc.max_inflight_per_replica, teacher_inflight_cap(self.cfg, self._teacher_roles()))
        cfg = self.cfg.model_copy(update={"teachers": tc.model_copy(update={"max_inflight_per_replica": cap})})
        self.pool = TeacherPool.attach(cfg) if tc.attach else TeacherPool.start(cfg)
        return self.pool

    def _create_workers(self) -> None:
        """Create the actors (non-blocking: their processes start and import while teachers load). Their
        generation (how many groups came before) gates the test-only `testing.rank_error`."""
        t = self.cfg.training
        uid = new_run_uid()
        self.worker_names = [worker_actor_name(self.cfg.run_name, rank, uid) for rank in range(self.world)]
        self.workers = [
            StudentWorker.options(num_cpus=t.num_cpus_per_worker, num_gpus=t.num_gpus_per_worker, name=name,
                                  resources=dict(t.resources_per_worker) or None,
                                  namespace=self.cfg.teachers.namespace).remote(self.cfg_dict, rank, self.world,
                                                                                self.restarts)
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

    def _restore_workers(self, crash: WorkerCrash, step: int) -> int:
        """Replace the whole worker group at once (the survivors may be stuck in a collective with the failed
        rank) and load the newest complete checkpoint; returns the step to continue from. The metrics rows of
        the steps after that checkpoint are dropped here and rewritten when those steps are replayed."""
        t0 = time.perf_counter()
        self.restarts += 1
        if self.restarts > MAX_WORKER_RESTARTS:
            self._stop_workers()
            raise TrainingRunError(f"student workers failed {self.restarts} times (last: {crash}); giving up; "
                                   f"resume later from {ckpt.latest_checkpoint(self.ckpt_root)}") from crash.cause
        print(f"step {step}: {crash}; restoring the worker group from the last checkpoint", flush=True)
        self._stop_workers()
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        self._create_workers()
        self._start_workers(latest)
        restored = 0 if latest is None else int(ckpt.read_state(latest)["step"])
        self.rows = [r for r in self.rows if r["step"] < restored]  # (the loop restarts its samples: _begin)
        self._rewrite_metrics()
        self.selection.restore(latest, None if latest is None else ckpt.read_state(latest))
        if self.tracker is not None:
            self.tracker.rewind(restored)
        seconds = time.perf_counter() - t0
        self.recoveries.append({"step": step, "rank": crash.rank, "cause": str(crash), "restored_step": restored,
                                "seconds": seconds})
        print(f"worker group restored at step {restored} in {seconds:.1f} s", flush=True)
        return restored

    # ------------------------------------------------------------------ steps (student_worker/step_calls.py)
    def _submit(self, step: int) -> StepInFlight:
        """The window's item for `step`: an off-policy step's records are submitted now; an on-policy
        step waits for its samples (`OnPolicySteps.samples_in`)."""
        if self.sampling is not None and self.sampling.on_policy(step):
            return StepInFlight(step, [], on_policy=True)
        return submit_step(step, self.plan, self.train_tok, self.pad_id, self.source, self.include_labels)

    def _begin(self, step: int) -> None:
        """The loop (re)starts at `step` (a fresh run, a resume, a restored worker group)."""
        ray.get([w.begin.remote(step) for w in self.workers])
        if self.sampling is not None:
            self.sampling.restart(step, self.ckpt_root)

    def _dispatch(self, item: StepInFlight) -> None:
        dispatch_step(item, self.workers, self.rdt)

    def _queue_save(self, item: StepInFlight) -> None:
        queue_save(item, self.workers, self.ckpt_root)

    # ------------------------------------------------------------------ outputs
    def _rewrite_metrics(self) -> None:
        with open(self.out / "metrics.jsonl", "w") as f:
            for r in self.rows:
                f.write(json.dumps(r) + "\n")

    def _checkpoint(self, step: int) -> Path:
        try:
            tmp = ckpt.begin_checkpoint(self.ckpt_root, step)
        except OSError as exc:
            if ckpt.io_error_of(exc) is None:
                raise
            raise ckpt.CheckpointWriteError(step, self.ckpt_root / ckpt.checkpoint_name(step),
                                            ckpt.latest_checkpoint(self.ckpt_root), exc) from exc
        return self._finish_checkpoint(step, tmp, [w.save_checkpoint.remote(str(tmp), step) for w in self.workers])

    def _finish_checkpoint(self, step: int, tmp: Path, saves: list[Any]) -> Path:
        """Wait for the workers' parts (queued saves), then write state.json and rename the directory.
        A storage failure (full disk, EIO) in any part removes `tmp` and raises CheckpointWriteError."""
        failed: BaseException | None = None
        for rank, ref in enumerate(saves):
            try:
                ray.get(ref)
            except ACTOR_GONE as exc:  # the .tmp directory is left behind and never read
                raise WorkerCrash(rank, exc) from exc
            except Exception as exc:
                if ckpt.io_error_of(exc) is None:
                    raise
                failed = failed or exc  # the other ranks' parts are waited for before tmp is removed
        try:
            if failed is not None:
                raise failed
            if self.sampling is not None:  # lag 1: the sample of `step`, drawn with the weights before it
                self.sampling.save_into(tmp, step)
            maybe_crash_in_checkpoint(tmp, step, self.cfg.testing.crash_in_checkpoint)  # test-only hook
            self.selection.save_into(tmp)  # the best model so far travels with the checkpoint
            state = {"step": step, "data_cursor": step, "config_hash": config_hash(self.cfg),
                     "config": self.cfg_dict, "metrics": self.rows, "rouge": self.rouge,
                     "selection": self.selection.state()}
            return ckpt.finalize_checkpoint(tmp, state, self.cfg.training.keep_checkpoints)
        except Exception as exc:
            os_error = ckpt.io_error_of(exc)
            if os_error is None:
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # frees the space it took; the previous checkpoint stays
            raise ckpt.CheckpointWriteError(step, tmp, ckpt.latest_checkpoint(self.ckpt_root), os_error) from exc

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
            self.selection.restore(resume_dir, state)
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.out / "config.yaml")
        self._rewrite_metrics()
        self.tracker = MetricsTracker(self.cfg, self.out, start_step)  # logging.report_to
        t = self.cfg.training
        end_step = t.max_steps if self.stop_after is None else min(t.max_steps, self.stop_after)
        try:
            self._check_resources()
            self._create_workers()
            self._start_source()
            self._start_workers(resume_dir)
            e = self.cfg.evaluation
            if self.eval_examples and e.evaluate_before and "student_base" not in self.rouge:
                self.rouge["student_base"] = self._evaluate_student()
            self._bar = tqdm(total=t.max_steps, initial=start_step, disable=not self.progress,
                             desc=self.cfg.loss.method)
            t_loop = time.perf_counter()
            step = self._loop(start_step, end_step, start_step if resume_dir is not None else -1)
            self._bar.close()
            loop_s = time.perf_counter() - t_loop
            if step < t.max_steps:  # stopped early on purpose (--stop-after): as if interrupted
                return {"stopped_at": step, "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root))}
            ray.get(self.workers[0].save_model.remote(str(self.out / "final_model")))
            best = self.selection.final_spec()  # None unless evaluation.select_best chose a step
            if self.eval_examples and best is None:
                self.rouge["student_after"] = self._evaluate_student()
            teacher_stats = self.source.stats() if self.source is not None else None
            self.source_info = self.source.describe() if self.source is not None else None
            self._release()  # frees the CPU/GPU slots the teacher's evaluation task needs on small machines
            tc = self.cfg.teachers
            task = evaluate_spec_task.options(num_cpus=min(1.0, tc.num_cpus), num_gpus=tc.num_gpus)
            compute = self.cfg.reproducibility.model_dump()
            if self.eval_examples and best is not None:  # the selected model's test score
                self.rouge["student_after"] = ray.get(task.remote(best, self.eval_examples, e.max_new_tokens,
                                                                  e.batch_size, compute))
            if self.eval_examples and e.evaluate_teacher:
                self.rouge["sft_teacher"] = ray.get(task.remote(self.cfg.models.sft_teacher, self.eval_examples,
                                                                e.max_new_tokens, e.batch_size, compute))
            for name, scores in self.rouge.items():
                self.tracker.log_scalars(f"eval/{name}", scores, step)
            return self._report(start_step, step, loop_s, teacher_stats)
        finally:
            self._release()
            if self.tracker is not None:
                self.tracker.close()

    def _loop(self, step: int, end_step: int, last_ckpt: int) -> int:
        """Train steps `step` .. end_step - 1; returns the number of completed steps (end_step).

        Each turn: (1) dispatch the current step and the ones behind it, (2) top up the teacher window,
        (3) wait for the current step, then log it, validate and checkpoint when due."""
        t = self.cfg.training
        # Steps with worker calls queued: those whose teacher work is submitted, at most _QUEUED_STEPS (slack for a
        # driver turn slower than a step; after a failed step the rest refuse to run at once).
        queued = min(t.prefetch + 1, _QUEUED_STEPS)
        window: deque[StepInFlight] = deque()  # submitted steps, in order; window[0] is `step`
        self._begin(step)
        while step < end_step:
            try:
                self._dispatch_ahead(window, step, end_step, queued)
                t_submit = time.perf_counter()
                while len(window) < t.prefetch + 1 and window[-1].step + 1 < end_step:  # may wait (back-pressure)
                    window.append(self._submit(window[-1].step + 1))
                submit_s = time.perf_counter() - t_submit
                item = window[0]
                per_rank = self._wait(item, last_ckpt)
            except WorkerCrash as crash:
                step = self._recover(crash, step, window)
                continue
            row = step_row(step, per_rank, item.arrays, driver_submit_s=submit_s)
            if self.sampling is not None:  # a run with on-policy steps: every row says what kind it was
                row.update(self.sampling.finish(item))
            self.rows.append(row)
            with open(self.out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self.tracker.log_row(row)
            self._log(row)
            window.popleft()
            if self.source is not None:
                self.source.step_done(step)
            step += 1
            if self.selection.due(step):  # validation ROUGE-L; the best weights are kept (no step queued past)
                self.tracker.log_scalars("validation", self.selection.update(step, self.workers[0]), step)
            if step % t.checkpoint_every == 0 or step == end_step:
                try:
                    if item.save is not None:
                        self._finish_checkpoint(step, *item.save)
                    else:
                        self._checkpoint(step)
                except WorkerCrash as crash:  # died while saving: replay from the previous checkpoint
                    step = self._recover(crash, step, window)
                    continue
                last_ckpt = step
        return step

    def _dispatch_ahead(self, window: deque[StepInFlight], step: int, end_step: int, queued: int) -> None:
        """Queue the workers' calls for the current step and up to `queued - 1` steps behind it (a checkpoint
        save due between two steps goes between their calls). Stops before a step after which validation is
        due, and before an on-policy step whose samples are not back: its sample calls are queued right before
        the train call of step - lag, and waited for when nothing but finished steps and the sample itself
        run before them on the workers (i <= lag); else only taken when already done. Raises WorkerCrash."""
        t = self.cfg.training
        lag = t.on_policy.lag
        for i in range(min(queued, end_step - step)):
            if i == len(window):
                window.append(self._submit(step + i))
            item = window[i]
            if i > 0 and self.selection.due(item.step):
                break  # validation scores the weights after item.step steps: nothing is queued past them
            if item.calls is not None:
                continue
            if i > 0 and (item.step % t.checkpoint_every == 0) and window[i - 1].save is None:
                self._queue_save(window[i - 1])
            if self.sampling is not None:
                self.sampling.request(item.step + lag, self.workers)
                if not self.sampling.samples_in(item, i <= lag, self.source, self.pad_id):
                    break
            self._dispatch(item)

    def _wait(self, item: StepInFlight, last_ckpt: int) -> list[dict[str, Any]]:
        """Every rank's result of the current step. WorkerCrash goes to `_recover`; a step every rank
        rejected (the model is at `item.step` completed steps) is checkpointed and stops the run."""
        try:
            return wait_step(item)
        except WorkerCrash:
            raise
        except Exception as exc:
            if item.step != last_ckpt:
                self._checkpoint(item.step)  # queued behind the calls already sent, which refuse to run
            raise TrainingRunError(f"step {item.step} failed; checkpoint of {item.step} completed steps written "
                                   f"under {self.ckpt_root}: {type(exc).__name__}: {exc}") from exc

    def _recover(self, crash: WorkerCrash, step: int, window: deque[StepInFlight]) -> int:
        """A rank died or raised: stop the run on bad input (a replay would fail the same way), else replace
        the worker group from the last checkpoint. Returns the step the loop continues from."""
        if crash.raised and is_fatal_rank_error(crash.cause):
            self._stop_workers()  # the other ranks may sit in a collective; no checkpoint can be taken
            raise TrainingRunError(f"step {step} failed on rank {crash.rank}; the workers were stopped; the "
                                   f"last checkpoint is {ckpt.latest_checkpoint(self.ckpt_root)}: "
                                   f"{crash}") from crash.cause
        window.clear()
        step = self._bar.n = self._restore_workers(crash, step)
        self._begin(step)
        return step

    def _log(self, row: dict[str, Any]) -> None:
        """Progress every `training.log_every` steps: the bar's figures, or one console line without a bar."""
        self._bar.update(1)
        if (row["step"] + 1) % self.cfg.training.log_every:
            return
        figures = dict(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                       wait=f"{100 * row['teacher_wait_frac']:.0f}%")
        if self.progress:
            self._bar.set_postfix(figures)
        else:
            print(f"step {row['step'] + 1}/{self.cfg.training.max_steps} "
                  + " ".join(f"{k} {v}" for k, v in figures.items()), flush=True)

    def _release(self) -> None:
        """Kill the workers and the teachers this run started (attached teachers stay up)."""
        self._stop_workers()
        if self.source is not None:
            self.source.shutdown()  # kills only the actors it started (not attached teachers)
            self.source = None
        self.pool = None

    def _report(self, start_step: int, step: int, loop_s: float,
                teacher_stats: dict[str, Any] | None) -> dict[str, Any]:
        report = run_summary(self.cfg, self.rows, start_step, step, loop_s, self.rouge, self.restarts,
                             teacher_stats, recoveries=self.recoveries, paths={"output_dir": str(self.out),
                                                   "final_model": str(self.out / "final_model"),
                                                   "metrics": str(self.out / "metrics.jsonl"),
                                                   "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root))})
        report["selection"] = self.selection.summary()
        if getattr(self, "source_info", None) is not None:
            report["record_source"] = self.source_info
        write_report(self.out, report, self.rows, self.cfg.output.plot)  # adds its files to report["paths"]
        return report


def run_training(cfg: RunConfig, resume: bool = False, stop_after: int | None = None,
                 progress: bool = True) -> dict[str, Any]:
    """Run one training job on the already-initialised Ray cluster; returns the report dict."""
    return Driver(cfg, resume=resume, stop_after=stop_after, progress=progress).run()
