"""bench_cache's Ray part (issue 14 part two): building the cache and training from it, on the tiny default.

All on one Ray cluster (the script's private one, or `--ray-address`), with the same teachers and data:

1. `live_pool`: the teacher pool (TeacherPool.start) scoring the build order's batches (the run's epoch-0
   batches and the examples it drops) once: counted tokens / seconds from the pool's start (its model load
   included) to the last record. The smoke suite's (`--teachers-namespace`) attaches to its running teachers
   instead: no model load in its figure.
2. `build`: `build_cache` (the Ray Data pipeline) over the same batches, per encoding (fp32 and the default):
   counted tokens / seconds from the call to the manifest (actor start-up included), and the cache's file
   bytes per counted token on disk; `add_role` of the student base on the default-encoding cache.
3. `train`: training runs of the same budget: sft, delta_kd live, delta_kd from the cache (the worker's
   frozen base computes lp_S0), delta_kd from the cache with student_base cached. steps/s from each run's
   report (its whole loop, start-up waits included) and steady state (metrics rows after the first
   prefetch + 2 steps, as bench_e2e); the ratio to sft is the issue's figure (goal >= 0.9 with
   student_base cached). The smoke trains sft and delta_kd from the cache with student_base cached only
   (the two runs the figure needs); the other two are the same `_train` with other overrides, run by
   bench_e2e's smoke (delta_kd live, the same miniature models) and tests/integration/test_teacher_cache.py
   (delta_kd from a cache, lp_S0 by the worker's frozen base). It also caps the data at the 16 examples
   its 4 steps train on (4 batches of 4, one epoch), so the pool and the builds score 4 batches, not 8.
4. `read_per_rank`: per rank, the feeder's rows / seconds spent serving batches (read + checksum + decode +
   assembly) in the cached runs.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from bench_e2e import SMOKE_SETS, TINY, attach_sets, shared_ranks

__all__ = ["cache_runs"]

# smoke: the examples its 4 steps of 4 train on (one epoch, nothing dropped); the build scores only these
SMOKE_EXAMPLES = 16
RUN_SETS = ["evaluation.enabled=false", "output.plot=false", "training.checkpoint_every=100000",
            "teachers.namespace=bench-cache"]


def _live_pool(cfg: Any, ts: Any) -> dict[str, Any]:
    import ray

    from common.data.batching import collate
    from teacher_service import TeacherPool

    order = ts.plan.build_order()
    b = ts.plan.per_rank_batch
    batches = [order[i: i + b] for i in range(0, len(order), b)]
    arrays = [collate([ts.examples[e] for e in bt], ts.pad_id) for bt in batches]
    tokens = int(sum(a["loss_mask"].sum() for a in arrays))
    t0 = time.perf_counter()
    pool = TeacherPool.attach(cfg) if cfg.teachers.attach else TeacherPool.start(cfg)
    try:
        refs = [pool.submit(i, a["input_ids"], a["attention_mask"], a["loss_mask"]).ref for i, a in enumerate(arrays)]
        ray.get(refs)
        seconds = time.perf_counter() - t0
    finally:
        pool.shutdown()
    return {"batches": len(batches), "batch": b, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds}


def _train(cfg: Any, out: Path, warm: Any) -> dict[str, Any]:
    import json

    from student_worker.driver import run_training

    report = run_training(cfg, progress=False, warm=warm)  # figures are of the loop: rank starts do not count
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    skip = cfg.training.prefetch + 2  # bench_e2e's steady state: the rows after the first prefetch + 2 steps
    steady = rows[skip:] if len(rows) > skip + 1 else rows[-2:]
    src = report.get("record_source") or {}
    feeders = src.get("feeders") or []
    return {"steps": report["steps"], "steps_per_s": report["steps_per_s"], "tokens_per_s": report["tokens_per_s"],
            "teacher_wait_fraction": report["teacher_wait_fraction"], "source": src.get("source", "live"),
            "steady_steps": len(steady), "steady_steps_per_s": len(steady) / sum(r["step_s"] for r in steady),
            "steady_teacher_wait_fraction": sum(r["teacher_wait_s"] for r in steady) / sum(r["step_s"] for r in steady),
            "read_per_rank": [{"rank": r, "batches": f["batches"], "rows": f["rows"], "seconds": f["seconds"],
                               "rows_per_s": f["rows"] / f["seconds"] if f["seconds"] > 0 else None,
                               "shards_read": f["shards_read"]} for r, f in enumerate(feeders)]}


def cache_runs(smoke: bool, steps: int, models_dir: Path | None = None,
               teachers_namespace: str | None = None, warm: Any = None) -> dict[str, Any]:
    """The figures of the module docstring (the caller holds the Ray connection).

    models_dir: smoke only, where the miniature embedded models are built or found (default: a temp dir).
    teachers_namespace: smoke only, teachers already serving those models (bench_e2e.shared_teachers): the
    live pool attaches to them instead of starting its own.
    warm: a caller's WarmRanks (student_worker/worker_group.py) the training runs take their ranks from and
    hand back to, left open (the smoke suite's); None: the runs share ranks of their own, closed at the end.
    """
    from common.codec import DEFAULT_ENCODING
    from common.config import load_config
    from common.data.batching import load_training_set
    from teacher_service.cache.build import add_role, build_cache
    from teacher_service.cli import resolve_paths

    with tempfile.TemporaryDirectory(prefix="dkb-cache-") as tmp:
        root = Path(tmp)
        sets = RUN_SETS + [f"training.max_steps={steps}"]
        if smoke:
            sets += SMOKE_SETS + [f"embedded.cache_dir={models_dir or root / 'models'}",
                             f"data.max_train_examples={SMOKE_EXAMPLES}"]

        def cfg_of(extra: list[str], out: str) -> Any:
            return resolve_paths(load_config(TINY, sets + extra + [f"output.dir={root / out}"]))

        t0 = time.perf_counter()
        cfg = cfg_of([], "live")  # builds (or finds) the embedded models outside the timed parts
        models_s = time.perf_counter() - t0
        ts = load_training_set(cfg)
        attach = attach_sets(teachers_namespace) if smoke and teachers_namespace else []
        pool = _live_pool(cfg_of(attach, "live") if attach else cfg, ts)
        builds: dict[str, Any] = {}
        for enc in ("fp32", DEFAULT_ENCODING):
            uri = root / f"cache-{enc}"
            manifest, stats = build_cache(cfg, str(uri), encoding=enc, progress=False, say=lambda _: None)
            builds[enc] = {**stats, "file_bytes_per_token": manifest.num_bytes / max(manifest.num_tokens, 1),
                           "num_tokens": manifest.num_tokens, "shards": len(manifest.shards)}
        uri = root / f"cache-{DEFAULT_ENCODING}"
        _, add = add_role(cfg, str(uri), progress=False, say=lambda _: None)
        cached = ["teachers.source=cache", f"teachers.cache.uri={uri}"]
        plans = {"sft": ["loss.method=sft"], "delta_kd_live": [], "delta_kd_cache": cached,
                 "delta_kd_cache_s0": cached + ["teachers.student_base_source=cache"]}
        if smoke:  # the runs the figure needs (module docstring, 3)
            plans = {m: plans[m] for m in ("sft", "delta_kd_cache_s0")}
        with shared_ranks(warm) as ranks:  # the runs one after another on the same rank processes
            runs = {m: _train(cfg_of(extra, m), root / m, ranks) for m, extra in plans.items()}
    sft = runs["sft"]["steps_per_s"]
    return {"overrides": sets, "live_pool_overrides": attach, "models_s": models_s, "live_pool": pool, "build": builds, "add_role_student_base": add,
            "build_over_live_pool_tokens_per_s": {e: b["tokens_per_s"] / pool["tokens_per_s"] for e, b in builds.items()
                                                  if b["tokens_per_s"]},
            "train": runs, "steps_per_s_over_sft": {m: r["steps_per_s"] / sft for m, r in runs.items()},
            "steady_steps_per_s_over_sft": {m: r["steady_steps_per_s"] / runs["sft"]["steady_steps_per_s"]
                                            for m, r in runs.items()},
            "read_per_rank": runs["delta_kd_cache_s0"]["read_per_rank"]}
