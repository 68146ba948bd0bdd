"""Overlap of teacher and student work: the driver's window of in-flight batches against serial steps.

Figure 2 of the benchmarks issue. The real training loop runs: `student_worker.driver.Driver` (its
window: `prefetch + 1` batches submitted ahead, each record ref nested to the worker of its rank) and a
real `StudentWorker` actor (tiny Llama forward + backward + AdamW through `train_step`, delta_kd with its
frozen base copy). Only the teacher pool is replaced: `SleepPool.submit` calls one serial `SleepTeacher`
actor that sleeps a fixed time per batch (no CPU) and returns a precomputed, valid `TopKRecord` for the
batch's shape and id.

1. calibrate: teacher time 0 -> the student step time S (steady-state seconds per step);
2. for teacher time T in {0.5, 1, 2} x S and prefetch in {0, default 2}:

       efficiency = steady steps/s / (1 / max(T, S))            target: >= 0.9 at T = S, prefetch 2

   (serial, prefetch 0, gives about S / (T + S) = 0.5 at T = S). Steady steps/s skips the first
   `prefetch + 2` steps (the window filling, first-call allocations).

Hooks into the driver (subclass `_BenchDriver`): `_start_pool` installs the SleepPool; `_start_workers` /
`_stop_workers` keep one worker group across the runs (start-up costs seconds per run). The stepping loop
itself is the driver's, unmodified.

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

__all__ = ["SleepPool", "main"]

K = 64
TARGET = 0.9
FACTORS = (0.5, 1.0, 2.0)


class SleepPool:
    """Stands in for TeacherPool: `submit` returns a ref to a record from a sleeping teacher actor."""

    def __init__(self, teacher: Any, delay_s: float):
        self.teacher, self.delay_s, self.submitted = teacher, float(delay_s), 0

    def submit(self, batch_id: int, input_ids: np.ndarray, attention_mask: np.ndarray, loss_mask: np.ndarray) -> Any:
        self.submitted += 1
        return self.teacher.record.remote(batch_id, np.ascontiguousarray(loss_mask, dtype=bool), self.delay_s)

    def stats(self) -> dict[str, Any]:
        return {"submitted": self.submitted, "tokens": 0, "busy_s": 0.0}

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

    class _BenchDriver(Driver):
        shared_workers: list[Any] = []
        sleep_pool: SleepPool | None = None

        def _start_pool(self) -> None:
            self.pool = _BenchDriver.sleep_pool

        def _start_workers(self, resume_dir: Path | None) -> None:
            if not _BenchDriver.shared_workers:
                super()._start_workers(resume_dir)
                _BenchDriver.shared_workers = list(self.workers)
            self.workers = list(_BenchDriver.shared_workers)

        def _stop_workers(self) -> None:
            self.workers = []  # kept for the next run; main() kills them at the end

    return _BenchDriver


def _config(student: Path, out: Path, steps: int, prefetch: int, batch_size: int, max_length: int) -> Any:
    from common.config import config_from_dict

    spec = {"path": str(student)}
    return config_from_dict({
        "run_name": "bench_overlap", "models": {"base_teacher": spec, "sft_teacher": spec, "student": spec},
        "data": {"max_length": max_length, "max_train_examples": 256, "max_eval_examples": 8},
        "loss": {"method": "delta_kd", "k": K},
        "teachers": {"student_base_source": "worker"},
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


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__.splitlines()[0])
    add_ray_args(p)
    p.add_argument("--steps", type=int, default=30, help="steps per run")
    p.add_argument("--hidden", type=int, default=256, help="student hidden size")
    p.add_argument("--max-length", type=int, default=128, help="data.max_length (tokens per sequence)")
    p.add_argument("--prefetch", type=int, default=None, help="the windowed prefetch (default: the config's)")
    args = p.parse_args(argv)
    from common.config import TrainingConfig
    from tests.tiny import make_llama, make_tokenizer

    window = TrainingConfig().prefetch if args.prefetch is None else args.prefetch
    repeats = 1 if args.smoke else args.repeats
    steps = 6 if args.smoke else args.steps
    factors = (1.0,) if args.smoke else FACTORS
    batch_size, max_length = (4, 32) if args.smoke else (8, args.max_length)

    with tempfile.TemporaryDirectory(prefix="dkb-overlap-") as tmp, ray_session(args.ray_address, num_cpus=4) as ray:
        root = Path(tmp)
        tok = make_tokenizer(root / "tok", extra_words=" ".join(f"w{i}" for i in range(1024)))
        student = make_llama(root / "student", tok, seed=3, hidden_size=32 if args.smoke else args.hidden,
                             num_layers=2, num_heads=4, intermediate_size=2 * (32 if args.smoke else args.hidden))
        from transformers import AutoTokenizer

        vocab = len(AutoTokenizer.from_pretrained(str(tok)))
        from bench_wire import make_record

        teacher = _sleep_teacher(ray, make_record(batch_size, max_length, K, ["sft", "base"], "float32", vocab))
        driver_cls = _driver_class()
        run_no = iter(range(10**6))

        def run(delay: float, prefetch: int) -> tuple[float, float, float]:
            driver_cls.sleep_pool = SleepPool(teacher, delay)
            out = root / f"run{next(run_no)}"
            cfg = _config(student, out, steps, prefetch, batch_size, max_length)
            driver_cls(cfg, progress=False).run()
            return _steady_rate(out, skip=prefetch + 2)

        try:
            run(0.0, window)  # warm-up: worker start, first-call allocations, teacher record cache
            calib_runs = [run(0.0, window) for _ in range(repeats)]
            calib = [1.0 / r[0] for r in calib_runs]
            student_s = statistics.median(calib)
            cells: dict[str, Any] = {}
            for factor in factors:
                teacher_s = factor * student_s
                for prefetch in (0, window):
                    effs, waits, rates, computes = [], [], [], []
                    for _ in range(repeats):
                        rate, wait, compute = run(teacher_s, prefetch)
                        rates.append(rate)
                        waits.append(wait)
                        computes.append(compute)
                        effs.append(rate * max(teacher_s, student_s))
                    cells[f"T{factor}x_prefetch{prefetch}"] = {
                        "teacher_factor": factor, "teacher_s": teacher_s, "prefetch": prefetch,
                        "steps_per_s": summarize(rates), "efficiency": summarize(effs),
                        "teacher_wait_fraction": summarize(waits),
                        "worker_compute_s": summarize(computes)}
        finally:
            for w in driver_cls.shared_workers:
                ray.kill(w, no_restart=True)
            ray.kill(teacher, no_restart=True)

    print_table(["teacher", "prefetch", "teacher s", "steps/s", "efficiency", "wait frac", "compute s"],
                [[f"{c['teacher_factor']}x", c["prefetch"], c["teacher_s"], c["steps_per_s"]["median"],
                  c["efficiency"]["median"], c["teacher_wait_fraction"]["median"],
                  c["worker_compute_s"]["median"]] for c in cells.values()],
                title=f"overlap: student step {student_s:.4f} s")
    key = f"T1.0x_prefetch{window}"
    targets = [Target(f"efficiency_T1x_prefetch{window}", cells[key]["efficiency"]["median"], ">=", TARGET,
                      "median over repeats; the real driver loop and StudentWorker")]
    figures = {"student_step_s": summarize(calib), "student_compute_s": summarize([r[2] for r in calib_runs]),
               "steps_per_run": steps, "batch_size": batch_size,
               "max_length": max_length, "window_prefetch": window, "cells": cells,
               "serial_efficiency_T1x": cells["T1.0x_prefetch0"]["efficiency"]["median"]}
    notes = ["efficiency = steady steps/s * max(teacher s, student s); steady = rows after the first "
             "prefetch + 2 steps of each run, from the driver's metrics.jsonl (step_s)",
             "teacher: one serial actor sleeping a fixed time per batch, returning a cached valid record",
             f"student: tiny Llama hidden={32 if args.smoke else args.hidden}, 2 layers, vocab {vocab}, "
             f"batch {batch_size} x <= {max_length} tokens, delta_kd with the worker's frozen base copy"]
    write_result("bench_overlap", args, figures, targets, notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
