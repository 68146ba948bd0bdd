"""The driver: one process orchestrates teachers and student workers (docs/DESIGN.md section 3).

    report = Driver(cfg).run()     # preflight -> setup -> train -> finish

- preflight: every input check that needs no Ray and writes nothing (resume checkpoint, data, tokenizers,
  the teacher cache);
- setup: the worker group (student_worker/worker_group.py), the record source (live teachers, the teacher
  cache or both: student_worker/record_source.py), the step pipeline (student_worker/step_pipeline.py);
- train: one loop over steps: advance the pipeline, wait for the current step, log it, validate and
  checkpoint when due; a checkpoint named `ckpt-N` holds the state after N completed steps (N is also the
  data cursor);
- finish: the final model, the evaluations (the student, the SFT teacher's ceiling) and the report.

Failures: a worker process that dies, or a rank that raises after the step's input agreement (the other ranks
may then sit in a collective), makes the driver replace the whole worker group at once from the last
checkpoint and replay (at most MAX_WORKER_RESTARTS times). A step every rank rejected at the input agreement
(a teacher unavailable, a bad record) and a deterministic input error of the loss stop the run with
TrainingRunError naming the culprit, after a checkpoint of the completed steps when the workers are intact.

A checkpoint write that fails at the storage level (no space left, EIO: `ckpt.io_error_of`) removes its partial
`.tmp` directory and raises `ckpt.CheckpointWriteError`; the previous checkpoint is untouched (the CLI exits
74 with one message). `steps_done` is how far the run got, for the message of an interrupted run.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from common.config import RunConfig, config_hash, dump_config
from common.faults import FaultPlan
from common.roles import teacher_role_specs
from student_worker import checkpoint as ckpt
from student_worker.evaluate import evaluate_spec
from student_worker.on_policy_steps import OnPolicySteps
from student_worker.preflight import InputError, check_run_inputs
from student_worker.record_source import RecordSource, open_record_source
from student_worker.recovery import (
    ACTOR_GONE,
    MAX_WORKER_RESTARTS,
    WorkerCrash,
    check_resources,
    find_cause,
    is_fatal_rank_error,
    teacher_inflight_cap,
)
from student_worker.report import run_summary, step_row, write_report
from student_worker.step_pipeline import StepInFlight, StepPipeline
from student_worker.tracking import MetricsTracker
from student_worker.worker_group import WarmRanks, WorkerGroup
from teacher_service import TeacherPool

__all__ = ["TrainingRunError", "InputError", "Driver", "run_training", "find_cause", "MAX_WORKER_RESTARTS",
           "WarmRanks"]


class TrainingRunError(RuntimeError):
    """The run cannot continue (teacher unavailable, workers keep dying). The message names the culprit."""


# The SFT teacher's ceiling, evaluated in a Ray task so that it gets a GPU when the teachers had one.
evaluate_spec_task = ray.remote(num_cpus=1)(evaluate_spec)


class Driver:
    """One training run. `run()` returns the report dict; outputs go to cfg.output_dir.

    faults: a test's or benchmark's FaultPlan (common/faults.py), handed to the student workers and to the
    teacher pool this driver starts; None (production) injects nothing."""

    def __init__(self, cfg: RunConfig, resume: bool = False, stop_after: int | None = None, progress: bool = True,
                 faults: FaultPlan | None = None, warm: WarmRanks | None = None):
        self.cfg, self.resume, self.stop_after, self.progress = cfg, resume, stop_after, progress
        self.faults = faults
        self.out = cfg.output_dir.resolve()  # workers get absolute paths, whatever their working directory
        self.ckpt_root = self.out / "checkpoints"
        self.cfg_dict = cfg.model_dump(mode="json")
        # RDT carries live teachers' tensors; cache and auto records go through the object store
        self.rdt = cfg.transport.kind == "rdt" and cfg.loss.method != "sft" and cfg.teachers.source == "live"
        self.group = WorkerGroup(cfg, self.out, faults, warm=None if self.rdt else warm)  # RDT: see WarmRanks
        self.pool: Any = None  # the live TeacherPool, when the record source started or attached one
        self.source: RecordSource | None = None  # None for sft: no teacher at all
        self.pipeline: StepPipeline | None = None
        self.cache_plan: Any = None
        self.rows: list[dict[str, Any]] = []  # one metrics row per completed step
        self.rouge: dict[str, Any] = {}
        self.recoveries: list[dict[str, Any]] = []  # one per worker-group restore: step, rank, cause, seconds
        self.resume_dir: Path | None = None
        self.sampling: OnPolicySteps | None = None  # training.on_policy (set up with the data)
        self.tracker: MetricsTracker | None = None
        self.bar: Any = None
        self.source_info: dict[str, Any] | None = None
        self._preflight_done = False

    @property
    def steps_done(self) -> int:
        """Completed steps so far (the metrics rows cover steps 0 .. steps_done - 1, a resume's included)."""
        return len(self.rows)

    # ------------------------------------------------------------------ checks before anything is written
    def preflight(self) -> None:
        """Every check that needs no Ray and writes nothing (student_worker/preflight.py); once. Raises
        CheckpointError or InputError naming the culprit."""
        if self._preflight_done:
            return
        inputs = check_run_inputs(self.cfg, self.out, self.ckpt_root, self.resume)
        self.train_set, self.eval_examples, self.selection = inputs.train_set, inputs.eval_examples, inputs.selection
        self.sampling, self.cache_plan, self.resume_dir = inputs.sampling, inputs.cache_plan, inputs.resume_dir
        self._preflight_done = True

    # ------------------------------------------------------------------ the run
    def run(self) -> dict[str, Any]:
        """preflight -> setup -> train -> finish; the workers and the teachers this run started are released
        whatever happens."""
        self.preflight()  # nothing is written before every input check passed
        start_step = self._open_outputs()
        t = self.cfg.training
        end_step = t.max_steps if self.stop_after is None else min(t.max_steps, self.stop_after)
        try:
            self._setup()
            t_loop = time.perf_counter()
            step = self._train(start_step, end_step)
            loop_s = time.perf_counter() - t_loop
            if step < t.max_steps:  # stopped early on purpose (--stop-after): as if interrupted
                self._release(keep_workers=True)
                return {"stopped_at": step, "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root))}
            return self._finish(start_step, step, loop_s)
        finally:
            self._release()
            if self.tracker is not None:
                self.tracker.close()

    def _open_outputs(self) -> int:
        """The state the run starts from (the resume checkpoint's, or step 0) and its output files; returns
        the first step to train."""
        start_step = 0
        if self.resume and self.resume_dir is None:
            print(f"--resume: no complete checkpoint under {self.ckpt_root}; starting from step 0")
        elif self.resume_dir is not None:
            state = ckpt.read_state(self.resume_dir)
            start_step, self.rows, self.rouge = int(state["step"]), list(state["metrics"]), state["rouge"]
            self.selection.restore(self.resume_dir, state)
        self.out.mkdir(parents=True, exist_ok=True)
        dump_config(self.cfg, self.out / "config.yaml")
        self._rewrite_metrics()
        self.tracker = MetricsTracker(self.cfg, self.out, start_step)  # logging.report_to
        return start_step

    def _setup(self) -> None:
        """Workers, record source and step pipeline. The ranks' processes start and import while the teachers
        load; the teachers' warm-up is not waited for (its one-off first-call costs overlap with the workers'
        set-up; any remainder shows as the first step's teacher wait)."""
        self._check_resources()
        self.group.create()
        self.source = open_record_source(self.cfg, self.cache_plan, self.train_set, self.group.workers,
                                         self._start_pool, self.rdt)
        if self.source is not None:
            self.source.warm_up()
        self.group.start(self.resume_dir, self.pool, self.rdt)
        ts = self.train_set
        self.pipeline = StepPipeline(self.cfg, self.group, self.source, ts.plan, ts.examples, ts.pad_id,
                                     self.ckpt_root, self.sampling, self.selection.due)
        e = self.cfg.evaluation
        if self.eval_examples and e.evaluate_before and "student_base" not in self.rouge:
            self.rouge["student_base"] = self._evaluate_student()

    def _check_resources(self) -> None:
        """Warn (loudly) when teachers + workers ask for more CPUs/GPUs than the cluster has right now."""
        check_resources(self.cfg, list(teacher_role_specs(self.cfg)))

    def _start_pool(self) -> Any:
        """The live teacher pool (started, or attached with teachers.attach), its in-flight cap sized for the
        window (recovery.teacher_inflight_cap); the rest as configured."""
        tc = self.cfg.teachers
        cap = max(tc.max_inflight_per_replica, teacher_inflight_cap(self.cfg, list(teacher_role_specs(self.cfg))))
        cfg = self.cfg.model_copy(update={"teachers": tc.model_copy(update={"max_inflight_per_replica": cap})})
        self.pool = TeacherPool.attach(cfg) if tc.attach else TeacherPool.start(cfg, faults=self.faults)
        return self.pool

    def _train(self, step: int, end_step: int) -> int:
        """Train steps `step` .. end_step - 1; returns the number of completed steps (end_step).

        Each turn: (1) advance the pipeline (dispatch the current step and those behind it, top up the teacher
        window), (2) wait for the current step, then log it, validate and checkpoint when due."""
        t = self.cfg.training
        assert self.pipeline is not None
        pipeline = self.pipeline
        last_ckpt = step if self.resume_dir is not None else -1
        self.bar = tqdm(total=t.max_steps, initial=step, disable=not self.progress, desc=self.cfg.loss.method)
        pipeline.begin(step)
        while step < end_step:
            try:
                submit_s = pipeline.advance(step, end_step)
                per_rank = self._wait(pipeline.current, last_ckpt)
            except WorkerCrash as crash:
                step = self._recover(crash, step)
                continue
            item = pipeline.finish()
            self._record_step(item, per_rank, submit_s)
            step += 1
            if self.selection.due(step):  # validation ROUGE-L; the best weights are kept (no step queued past)
                self.tracker.log_scalars("validation", self.selection.update(step, self.group), step)
            if step % t.checkpoint_every == 0 or step == end_step:
                try:
                    if item.save is not None:
                        self._finish_checkpoint(step, *item.save)
                    else:
                        self._checkpoint(step)
                except WorkerCrash as crash:  # died while saving: replay from the previous checkpoint
                    step = self._recover(crash, step)
                    continue
                last_ckpt = step
        self.bar.close()
        return step

    def _record_step(self, item: StepInFlight, per_rank: list[dict[str, Any]], submit_s: float) -> None:
        """The step's metrics row: metrics.jsonl, the trackers and the progress line."""
        row = step_row(item.step, per_rank, item.arrays, driver_submit_s=submit_s)
        if self.sampling is not None:  # a run with on-policy steps: every row says what kind it was
            row.update(self.sampling.finish(item))
        self.rows.append(row)
        with open(self.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        self.tracker.log_row(row)
        self._log(row)

    def _wait(self, item: StepInFlight, last_ckpt: int) -> list[dict[str, Any]]:
        """Every rank's result of the current step. WorkerCrash goes to `_recover`; a step every rank
        rejected (the model is at `item.step` completed steps) is checkpointed and stops the run."""
        assert self.pipeline is not None
        try:
            return self.pipeline.wait()
        except WorkerCrash:
            raise
        except Exception as exc:
            if item.step != last_ckpt:
                self._checkpoint(item.step)  # queued behind the calls already sent, which refuse to run
            raise TrainingRunError(f"step {item.step} failed; checkpoint of {item.step} completed steps written "
                                   f"under {self.ckpt_root}: {type(exc).__name__}: {exc}") from exc

    # ------------------------------------------------------------------ recovery
    def _recover(self, crash: WorkerCrash, step: int) -> int:
        """A rank died or raised: stop the run on bad input (a replay would fail the same way), else replace
        the worker group from the last checkpoint. Returns the step the loop continues from."""
        if crash.raised and is_fatal_rank_error(crash.cause):
            self.group.stop()  # the other ranks may sit in a collective; no checkpoint can be taken
            raise TrainingRunError(f"step {step} failed on rank {crash.rank}; the workers were stopped; the "
                                   f"last checkpoint is {ckpt.latest_checkpoint(self.ckpt_root)}: "
                                   f"{crash}") from crash.cause
        step = self.bar.n = self._restore_workers(crash, step)
        assert self.pipeline is not None
        self.pipeline.begin(step)
        return step

    def _restore_workers(self, crash: WorkerCrash, step: int) -> int:
        """Replace the whole worker group at once (the survivors may be stuck in a collective with the failed
        rank) and load the newest complete checkpoint; returns the step to continue from. The metrics rows of
        the steps after that checkpoint are dropped here and rewritten when those steps are replayed."""
        t0 = time.perf_counter()
        if self.group.generation + 1 > MAX_WORKER_RESTARTS:
            self.group.stop()
            raise TrainingRunError(f"student workers failed {self.group.generation + 1} times (last: {crash}); "
                                   f"giving up; resume later from {ckpt.latest_checkpoint(self.ckpt_root)}"
                                   ) from crash.cause
        print(f"step {step}: {crash}; restoring the worker group from the last checkpoint", flush=True)
        latest = ckpt.latest_checkpoint(self.ckpt_root)
        self.group.replace(latest, self.pool, self.rdt)
        restored = 0 if latest is None else int(ckpt.read_state(latest)["step"])
        self.rows = [r for r in self.rows if r["step"] < restored]  # (the pipeline restarts its samples: begin)
        self._rewrite_metrics()
        self.selection.restore(latest, None if latest is None else ckpt.read_state(latest))
        if self.tracker is not None:
            self.tracker.rewind(restored)
        seconds = time.perf_counter() - t0
        self.recoveries.append({"step": step, "rank": crash.rank, "cause": str(crash), "restored_step": restored,
                                "seconds": seconds})
        print(f"worker group restored at step {restored} in {seconds:.1f} s", flush=True)
        return restored

    # ------------------------------------------------------------------ checkpoints and outputs
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
        return self._finish_checkpoint(step, tmp, self.group.call("save_checkpoint", str(tmp), step))

    def _finish_checkpoint(self, step: int, tmp: Path, saves: list[Any]) -> Path:
        """Wait for the workers' parts (queued saves), then write state.json and rename the directory.
        A storage failure (full disk, EIO) in any part removes `tmp` and raises CheckpointWriteError."""
        failed: BaseException | None = None
        errors: list[tuple[int, BaseException]] = []
        for rank, ref in enumerate(saves):  # every rank's part is waited for before deciding
            try:
                ray.get(ref)
            except Exception as exc:
                errors.append((rank, exc))
        for rank, exc in sorted(errors, key=lambda e: not isinstance(e[1], ACTOR_GONE)):  # a dead rank first
            if isinstance(exc, ACTOR_GONE):  # the .tmp directory is left behind and never read
                raise WorkerCrash(rank, exc) from exc
            if ckpt.io_error_of(exc) is not None:
                failed = failed or exc
            elif self.cfg.training.strategy == "fsdp2":  # a sharded save is a collective: a rank that broke
                raise WorkerCrash(rank, exc, raised=True) from exc  # it is a mid-step error (recovery.py)
            else:
                raise exc
        try:
            if failed is not None:
                raise failed
            if self.sampling is not None:  # lag 1: the sample of `step`, drawn with the weights before it
                self.sampling.save_into(tmp, step)
            if self.faults is not None:
                self.faults.writing_checkpoint(tmp, step)  # FaultPlan.crash_in_checkpoint
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

    def _log(self, row: dict[str, Any]) -> None:
        """Progress every `training.log_every` steps: the bar's figures, or one console line without a bar."""
        self.bar.update(1)
        if (row["step"] + 1) % self.cfg.training.log_every:
            return
        figures = dict(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}",
                       wait=f"{100 * row['teacher_wait_frac']:.0f}%")
        if self.progress:
            self.bar.set_postfix(figures)
        else:
            print(f"step {row['step'] + 1}/{self.cfg.training.max_steps} "
                  + " ".join(f"{k} {v}" for k, v in figures.items()), flush=True)

    # ------------------------------------------------------------------ finish
    def _finish(self, start_step: int, step: int, loop_s: float) -> dict[str, Any]:
        """The final model, the evaluations and the report. The teachers are released before the SFT teacher's
        ceiling is evaluated (in a Ray task, which gets a GPU when the teachers had one)."""
        e = self.cfg.evaluation
        self.group.call_whole("save_model", str(self.out / "final_model"))
        best = self.selection.final_spec()  # None unless evaluation.select_best chose a step
        if self.eval_examples and best is None:
            self.rouge["student_after"] = self._evaluate_student()
        teacher_stats = self.source.stats() if self.source is not None else None
        self.source_info = self.source.describe() if self.source is not None else None
        self._release(keep_workers=True)  # frees the CPU/GPU slots the teacher's evaluation task needs on small machines
        tc = self.cfg.teachers
        task = evaluate_spec_task.options(num_cpus=min(1.0, tc.num_cpus), num_gpus=tc.num_gpus)
        compute = self.cfg.reproducibility.model_dump()
        if self.eval_examples and best is not None:  # the selected model's test score
            self.rouge["student_after"] = ray.get(task.remote(best, self.eval_examples, e.max_new_tokens,
                                                              e.batch_size, compute))
        if self.eval_examples and e.evaluate_teacher:
            self.rouge["sft_teacher"] = ray.get(task.remote(self.cfg.models.sft_teacher, self.eval_examples,
                                                            e.max_new_tokens, e.batch_size, compute))
        assert self.tracker is not None
        for name, scores in self.rouge.items():
            self.tracker.log_scalars(f"eval/{name}", scores, step)
        return self._report(start_step, step, loop_s, teacher_stats)

    def _evaluate_student(self) -> dict[str, Any]:
        e = self.cfg.evaluation
        return self.group.call_whole("evaluate", self.eval_examples, e.max_new_tokens, e.batch_size)

    def _release(self, keep_workers: bool = False) -> None:
        """Kill the workers (`keep_workers`: a clean end hands them to the WarmRanks, if any) and the teachers this
        run started (attached teachers stay up)."""
        self.group.stop(keep=keep_workers)
        if self.source is not None:
            self.source.shutdown()  # kills only the actors it started (not attached teachers)
            self.source = None
        self.pool = None

    def _report(self, start_step: int, step: int, loop_s: float,
                teacher_stats: dict[str, Any] | None) -> dict[str, Any]:
        report = run_summary(self.cfg, self.rows, start_step, step, loop_s, self.rouge, self.group.generation,
                             teacher_stats, recoveries=self.recoveries, paths={"output_dir": str(self.out),
                                                   "final_model": str(self.out / "final_model"),
                                                   "metrics": str(self.out / "metrics.jsonl"),
                                                   "checkpoint": str(ckpt.latest_checkpoint(self.ckpt_root))})
        report["selection"] = self.selection.summary()
        if self.source_info is not None:
            report["record_source"] = self.source_info
        write_report(self.out, report, self.rows, self.cfg.output.plot)  # adds its files to report["paths"]
        return report


def run_training(cfg: RunConfig, resume: bool = False, stop_after: int | None = None, progress: bool = True,
                 faults: FaultPlan | None = None, warm: WarmRanks | None = None) -> dict[str, Any]:
    """Run one training job on the already-initialised Ray cluster; returns the report dict. `faults`: a
    test's FaultPlan (common/faults.py); None injects nothing. `warm`: student ranks shared between runs."""
    return Driver(cfg, resume=resume, stop_after=stop_after, progress=progress, faults=faults, warm=warm).run()
