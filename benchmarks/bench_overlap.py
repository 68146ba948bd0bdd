"""Overlap of teacher and student work: the driver's window of in-flight batches against serial steps.

Figure 2 of the benchmarks issue. The real training loop runs: `student_worker.driver.Driver` (teacher work
of `prefetch + 1` steps submitted ahead, each worker's next step call queued behind the current one) and a
real `StudentWorker` actor (tiny Llama forward + backward + AdamW through `train_step`, delta_kd with its
frozen base copy). Two teacher sides, measured in the same run:

- stand-in: `SleepPool.submit` calls one serial `SleepTeacher` actor that sleeps a fixed time per batch (no
  CPU) and returns a precomputed, valid `TopKRecord` for the batch's shape and id;
- real pool: the real `TeacherPool` (sft top-k -> base gather -> assembler actor, routing, back-pressure) on
  tiny teachers, each call slowed by a FaultPlan's `teacher_delay_s` (common/faults.py), so teacher time is
  controlled on 2 cores (the teachers' own compute is small beside the delay and is reported: `teacher_call_s`).

1. calibrate: stand-in with teacher time 0 -> the student step time S (steady-state seconds per step);
2. for teacher time T in {0.5, 1, 2} x S and prefetch in {0, default 2}, on each teacher side:

       efficiency = steady steps/s / (1 / max(T, S))            target: >= 0.95 at T = S, prefetch 2

   (serial, prefetch 0, gives about S / (T + S) = 0.5 at T = S). Steady steps/s skips the first
   `prefetch + 2` steps (the window filling, first-call allocations). On the real pool T is the delay per
   call (each role adds it once per batch, in parallel over roles); `efficiency_measured_T` uses the
   measured mean busy time per call of the slowest role instead.

Hooks into the driver (subclass `_BenchDriver`): `_start_pool` installs the cell's pool; one shared
`WorkerGroup` (its `stop` a no-op) and `_release` keep one worker group and one pool per delay across the runs
(start-up costs seconds per run). The stepping loop itself is the driver's, unmodified.

`--smoke`: teacher time 1x only, 8 steps of a hidden-32 student, one repeat, and no warm-up runs (the
calibration and the first run on the real pool start their actors): five runs, every cell kind once.

    python benchmarks/bench_overlap.py [--smoke] [--repeats N] [--steps N] [--ray-address ADDR]
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _common import Target, add_ray_args, base_parser, print_table, ray_session, summarize, write_result

from teacher_service.record_handle import OBJECT_STORE, RecordHandle

__all__ = ["SleepPool", "main"]

K = 64
TARGET = 0.95
FACTORS = (0.5, 1.0, 2.0)


class SleepPool:
    """Stands in for TeacherPool: `submit` returns a RecordHandle of a record from a sleeping teacher actor."""

    def __init__(self, teacher: Any, delay_s: float):
        self.teacher, self.delay_s, self.submitted = teacher, float(delay_s), 0

    def submit(self, batch_id: int, input_ids: np.ndarray, attention_mask: np.ndarray, loss_mask: np.ndarray,
               include: np.ndarray | None = None, transport: str = OBJECT_STORE) -> RecordHandle:
        if include is not None or transport != OBJECT_STORE:
            raise ValueError("SleepPool has no forced ids (include) and no RDT: the overlap benchmark runs "
                             "off-policy batches through the object store")
        self.submitted += 1
        return RecordHandle.object_store(self.teacher.record.remote(batch_id, np.ascontiguousarray(loss_mask, dtype=bool),
                                                                    self.delay_s))

    def stats(self) -> dict[str, Any]:
        return {"submitted": self.submitted, "tokens": 0, "busy_s": 0.0}

    def warm_up(self, assemble: bool = True) -> list[Any]:
        return []  # a sleeping teacher has no first-call costs

    def actors(self) -> list[Any]:
        return [self.teacher]

    def shutdown(self, force: bool = False) -> None:
        """The sleeping teacher outlives each run; main() kills it at the end."""


def _slice(rec: Any, loss_mask: np.ndarray) -> Any:
    """A record for this loss mask: the first N rows of the largest record (what a real teacher would return
    for a batch with N counted positions), contiguous."""
    from common.topk import rows_from_mask

    c = np.ascontiguousarray
    rows = rows_from_mask(loss_mask)
    n = len(rows)
    return dataclasses.replace(rec, ids=c(rec.ids[:n]), rows=rows, batch_shape=tuple(loss_mask.shape),
                               logprobs={r: c(a[:n]) for r, a in rec.logprobs.items()},
                               tail={r: c(a[:n]) for r, a in rec.tail.items()})


def _sleep_teacher(ray: Any, largest: Any) -> Any:
    @ray.remote(num_cpus=0)
    class SleepTeacher:
        """Serial (one call at a time, like one teacher replica): sleep, then return a record of cached rows."""

        def __init__(self, largest: Any):
            self.largest = largest

        def record(self, batch_id: int, loss_mask: np.ndarray, delay_s: float) -> Any:
            rec = _slice(self.largest, loss_mask)
            time.sleep(delay_s)
            return dataclasses.replace(rec, batch_id=batch_id)

    return SleepTeacher.remote(largest)


def _driver_class() -> type:
    from student_worker.driver import Driver
    from student_worker.worker_group import WorkerGroup

    class _SharedGroup(WorkerGroup):
        """One worker group for every run of the benchmark: started once, stopped by main() at the end."""

        def start(self, resume_dir: Path | None, pool: Any = None, rdt: bool = False) -> None:
            if not getattr(self, "started", False):
                super().start(resume_dir, pool, rdt)
                self.started = True

        def create(self) -> None:
            if not self.workers:
                super().create()

        def stop(self, keep: bool = False) -> None:
            """Kept for the next run (kill() ends it)."""

        def kill(self) -> None:
            super().stop()

    class _BenchDriver(Driver):
        shared_group: Any = None  # created by the first run, reused by the others
        sleep_pool: Any = None  # the cell's pool: a SleepPool or a real TeacherPool, kept across runs

        def __init__(self, cfg: Any, **kwargs: Any):
            super().__init__(cfg, **kwargs)
            if _BenchDriver.shared_group is None:
                _BenchDriver.shared_group = _SharedGroup(cfg, self.out)
            self.group = _BenchDriver.shared_group

        def _start_pool(self) -> Any:
            self.pool = _BenchDriver.sleep_pool
            return self.pool

        def _release(self, keep_workers: bool = False) -> None:
            self.group.stop()  # the group and the pool outlive the run; main() ends them

    return _BenchDriver


def _config(student: Path, teacher: Path, out: Path, steps: int, prefetch: int, batch_size: int,
            max_length: int) -> Any:
    from common.config import config_from_dict

    return config_from_dict({
        "run_name": "bench_overlap",
        "models": {"base_teacher": {"path": str(teacher)}, "sft_teacher": {"path": str(teacher)},
                   "student": {"path": str(student)}},
        "data": {"max_length": max_length, "max_train_examples": 256, "max_eval_examples": 8},
        "loss": {"method": "delta_kd", "k": K},
        "teachers": {"student_base_source": "worker", "num_cpus": 0.5, "namespace": "bench-overlap",
                     "name_prefix": f"bench-overlap-{out.name}"},
        "training": {"num_workers": 1, "num_cpus_per_worker": 1, "batch_size": batch_size, "max_steps": steps,
                     "prefetch": prefetch, "warmup_steps": 0, "checkpoint_every": 10**6},
        "evaluation": {"enabled": False}, "output": {"dir": str(out), "plot": False},
    })


def _steady_rate(out_dir: Path, skip: int) -> tuple[float, float, float]:
    """(steps/s, teacher wait fraction, median worker compute s) over the rows after the first `skip`."""
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = rows[skip:] if len(rows) > skip + 1 else rows[-2:]
    secs = sum(r["step_s"] for r in rows)
    return (len(rows) / secs, sum(r["teacher_wait_s"] for r in rows) / secs,
            statistics.median(r["compute_s"] for r in rows))


def _cell(runs: list[tuple[float, float, float]], teacher_s: float, student_s: float, factor: float,
          prefetch: int, call_s: list[float] | None = None) -> dict[str, Any]:
    rates = [r[0] for r in runs]
    cell = {"teacher_factor": factor, "teacher_s": teacher_s, "prefetch": prefetch,
            "steps_per_s": summarize(rates),
            "efficiency": summarize([r * max(teacher_s, student_s) for r in rates]),
            "teacher_wait_fraction": summarize([r[1] for r in runs]),
            "worker_compute_s": summarize([r[2] for r in runs])}
    if call_s:
        cell["teacher_call_s"] = summarize(call_s)
        cell["efficiency_measured_T"] = summarize([r * max(c, student_s) for r, c in zip(rates, call_s)])
    return cell


def _slowest_call_s(pool: Any, before: dict[str, Any]) -> float:
    """Mean busy seconds per call over the run, of the slowest teacher role (stats diff before/after)."""
    after = pool.stats()["roles"]
    per_role = []
    for role, replicas in after.items():
        calls = sum(s["calls"] for s in replicas) - sum(s["calls"] for s in before[role])
        busy = sum(s["busy_s"] for s in replicas) - sum(s["busy_s"] for s in before[role])
        per_role.append(busy / max(calls, 1))
    return max(per_role)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    add_ray_args(p)
    p.add_argument("--steps", type=int, default=30, help="steps per run")
    p.add_argument("--hidden", type=int, default=256, help="student hidden size")
    p.add_argument("--max-length", type=int, default=128, help="data.max_length (tokens per sequence)")
    p.add_argument("--prefetch", type=int, default=None, help="the windowed prefetch (default: the config's)")
    args = p.parse_args(argv)
    from common.config import TrainingConfig
    from common.faults import FaultPlan
    from tests.tiny import make_llama, make_tokenizer

    window = TrainingConfig().prefetch if args.prefetch is None else args.prefetch
    repeats = 1 if args.smoke else args.repeats
    steps = 8 if args.smoke else args.steps
    factors = (1.0,) if args.smoke else FACTORS
    batch_size, max_length = (4, 32) if args.smoke else (8, args.max_length)
    hidden = 32 if args.smoke else args.hidden

    with tempfile.TemporaryDirectory(prefix="dkb-overlap-") as tmp, ray_session(args.ray_address, num_cpus=6) as ray:
        root = Path(tmp)
        tok = make_tokenizer(root / "tok", extra_words=" ".join(f"w{i}" for i in range(1024)))
        student = make_llama(root / "student", tok, seed=3, hidden_size=hidden, num_layers=2, num_heads=4,
                             intermediate_size=2 * hidden)
        # The real pool's teachers: tiny on purpose, so the controlled delay is most of their time.
        teacher = make_llama(root / "teacher", tok, seed=4, hidden_size=16, num_layers=1, num_heads=2,
                             intermediate_size=32)
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(str(tok)))
        from bench_wire import make_record

        from teacher_service import TeacherPool

        sleeper = _sleep_teacher(ray, make_record(batch_size, max_length, K, ["sft", "base"], "float32", vocab))
        driver_cls = _driver_class()
        run_no = iter(range(10**6))
        pools: list[Any] = []

        def run(pool: Any, prefetch: int) -> tuple[float, float, float]:
            driver_cls.sleep_pool = pool
            n = next(run_no)
            out = root / f"run{n}"
            # A new data seed per run: other batches, so the teachers' result cache (keyed by batch id and
            # inputs) never answers a call without its delay.
            cfg = _config(student, teacher, out, steps, prefetch, batch_size, max_length)
            driver_cls(cfg.model_copy(update={"seed": n}), progress=False).run()
            return _steady_rate(out, skip=prefetch + 2)

        try:
            if not args.smoke:  # the smoke's calibration run is its warm-up too: it checks plumbing, not figures
                run(SleepPool(sleeper, 0.0), window)  # warm-up: worker start, first-call allocations, record cache
            calib_runs = [run(SleepPool(sleeper, 0.0), window) for _ in range(repeats)]
            student_s = statistics.median(1.0 / r[0] for r in calib_runs)
            cells: dict[str, Any] = {}
            for factor in factors:
                teacher_s = factor * student_s
                for prefetch in (0, window):
                    runs = [run(SleepPool(sleeper, teacher_s), prefetch) for _ in range(repeats)]
                    cells[f"standin_T{factor}x_prefetch{prefetch}"] = _cell(runs, teacher_s, student_s, factor,
                                                                           prefetch)
                cfg = _config(student, teacher, root / f"pool{factor}", steps, window, batch_size, max_length)
                pool = TeacherPool.start(cfg, faults=FaultPlan(teacher_delay_s=teacher_s))  # sleeps per call
                pools.append(pool)
                if not args.smoke:
                    run(pool, window)  # warm-up of this pool's actors (and its assembler)
                for prefetch in (0, window):
                    runs, call_s = [], []
                    for _ in range(repeats):
                        before = pool.stats()["roles"]
                        runs.append(run(pool, prefetch))
                        call_s.append(_slowest_call_s(pool, before))
                    cells[f"pool_T{factor}x_prefetch{prefetch}"] = _cell(runs, teacher_s, student_s, factor,
                                                                        prefetch, call_s)
        finally:
            if driver_cls.shared_group is not None:
                driver_cls.shared_group.kill()
            ray.kill(sleeper, no_restart=True)
            for pool in pools:
                pool.shutdown()

    print_table(["cell", "teacher s", "steps/s", "efficiency", "wait frac", "compute s"],
                [[name, c["teacher_s"], c["steps_per_s"]["median"], c["efficiency"]["median"],
                  c["teacher_wait_fraction"]["median"], c["worker_compute_s"]["median"]]
                 for name, c in cells.items()], title=f"overlap: student step {student_s:.4f} s")
    targets = [Target(f"efficiency_{side}_T1x_prefetch{window}", cells[f"{side}_T1.0x_prefetch{window}"]
                      ["efficiency"]["median"], ">=", TARGET, f"median over repeats; {what}")
               for side, what in (("pool", "the real TeacherPool, teachers slowed by FaultPlan.teacher_delay_s"),
                                  ("standin", "a sleeping stand-in for the pool"))]
    figures = {"student_step_s": summarize([1.0 / r[0] for r in calib_runs]),
               "student_compute_s": summarize([r[2] for r in calib_runs]),
               "steps_per_run": steps, "batch_size": batch_size, "max_length": max_length,
               "window_prefetch": window, "cells": cells,
               "serial_efficiency_T1x": {side: cells[f"{side}_T1.0x_prefetch0"]["efficiency"]["median"]
                                         for side in ("pool", "standin")}}
    notes = ["efficiency = steady steps/s * max(teacher s, student s); steady = rows after the first "
             "prefetch + 2 steps of each run, from the driver's metrics.jsonl (step_s: the worker's time per step)",
             "stand-in: one serial actor sleeping a fixed time per batch, returning a cached valid record",
             "real pool: TeacherPool (sft top-k, base gather, assembler) on tiny Llamas (hidden 16) whose every "
             "call sleeps FaultPlan.teacher_delay_s; teacher_call_s = measured busy s per call, slowest role",
             f"student: tiny Llama hidden={hidden}, 2 layers, vocab {vocab}, batch {batch_size} x <= "
             f"{max_length} tokens, delta_kd with the worker's frozen base copy, 1 worker"]
    write_result("bench_overlap", args, figures, targets, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
