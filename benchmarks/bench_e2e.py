"""End to end: the tiny default with live teachers (delta_kd) against `method: sft`, same models and budget.

Figure 5 of the benchmarks issue. Two real runs of `python -m student_worker.train --config
deploy/configs/tiny.yaml` per repeat (subprocesses, alternating), differing only in `loss.method`:

    steps/s ratio = delta_kd steps/s / sft steps/s        (1.0 = distillation costs nothing extra)
    teacher wait fraction = time the student workers spent waiting for records / step time
    steady step parts = each named part of a step (student_worker/worker.py STEP_PARTS) / step time

Both read from each run's report.json (whole loop) and metrics.jsonl (steady state: rows after the
first `prefetch + 2` steps). No target is set for this figure in the issue; it is reported as measured.

Isolation: the runs attach to one cluster this script starts (or `--ray-address`) by explicit address,
so they never find someone else's head through `address="auto"`. The embedded models are built (or
found in the cache) before the first timed run; `--smoke` builds miniature ones in a temp cache (or in
`--models-dir`, where several smokes share them) and runs each training in this process
(`student_worker.train.main` with the same arguments): it checks the plumbing, not the figures, and
saves an interpreter start and a Ray attach per run; its runs share student rank processes (`smoke_ranks`:
a WarmRanks of its own, or the caller's `main(argv, warm=...)`). With `--teachers-namespace NS` its delta_kd run
attaches to teachers already serving those models there (`shared_teachers`: the smoke suite starts one
service for bench_e2e, bench_on_policy and bench_cache) instead of starting its own.

    python benchmarks/bench_e2e.py [--smoke] [--repeats N] [--steps N] [--ray-address ADDR] [--models-dir D]
                                   [--teachers-namespace NS]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from _common import (
    REPO_ROOT,
    BenchError,
    add_ray_args,
    base_parser,
    print_table,
    ray_session,
    summarize,
    write_result,
)

__all__ = ["run_train", "smoke_models_dir", "smoke_ranks", "shared_ranks", "add_models_dir_arg", "add_teachers_namespace_arg", "attach_sets",
           "shared_teachers", "main"]

TINY = REPO_ROOT / "deploy" / "configs" / "tiny.yaml"
SMOKE_SETS = ["embedded.pretrain_steps=2", "embedded.sft_steps=2", "embedded.num_train=32", "embedded.num_val=8",
              "embedded.num_test=8", "embedded.corpus_sentences=64", "training.num_workers=1",
              "training.batch_size=4", "data.max_train_examples=32"]


def run_train(method: str, out: Path, sets: list[str], address: str, in_process: bool = False,
              warm: Any = None) -> dict[str, Any]:
    """One `python -m student_worker.train` run; returns its report.json plus steady-state figures.

    in_process: call `student_worker.train.main` with the same arguments here instead of a subprocess
    (smoke runs; this process must be connected to `address` already). warm: in-process only, a WarmRanks
    (student_worker/worker_group.py) whose idle student ranks the run takes and hands back.
    """
    argv = ["--config", str(TINY), "--output-dir", str(out), "--address", address, "--no-progress",
            "--set", f"loss.method={method}"]
    for s in sets:
        argv += ["--set", s]
    cmd = [sys.executable, "-m", "student_worker.train", *argv]
    t0 = time.perf_counter()
    if in_process:
        from student_worker.train import main as train_main

        rc, stderr = train_main(argv, warm=warm), "(in this process: see the output above)"
    else:
        proc = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, timeout=1800)
        rc, stderr = proc.returncode, proc.stderr[-4000:]
    wall = time.perf_counter() - t0
    if rc != 0:
        raise BenchError(f"bench_e2e: {method} run failed (rc {rc}): {' '.join(cmd)}\n{stderr}")
    report = json.loads((out / "report.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    cfg_prefetch = 2
    for s in sets:
        if s.startswith("training.prefetch="):
            cfg_prefetch = int(s.split("=", 1)[1])
    steady = rows[cfg_prefetch + 2:] if len(rows) > cfg_prefetch + 3 else rows[-2:]
    secs = sum(r["step_s"] for r in steady)
    parts = {k: sum(r["step_parts"][k] for r in steady) / secs for k in steady[0]["step_parts"]}
    return {"steps": report["steps"], "steps_per_s": report["steps_per_s"], "tokens_per_s": report["tokens_per_s"],
            "teacher_wait_fraction": report["teacher_wait_fraction"], "steady_steps_per_s": len(steady) / secs,
            "steady_teacher_wait_fraction": sum(r["teacher_wait_s"] for r in steady) / secs,
            # the workers' own step (record decode, frozen base forward, loss, backward, optimiser):
            # on a CPU box the teachers share its cores, so this grows with them even when nobody waits
            "steady_worker_compute_s": sorted(r["compute_s"] for r in steady)[len(steady) // 2],
            "steady_step_s": secs / len(steady),
            # each named part of the step (student_worker.worker.STEP_PARTS) as a fraction of the steady time
            "steady_step_parts": parts,
            "wall_s": wall, "final_loss": report.get("final_loss")}


def smoke_models_dir(args: Any, root: Path) -> Path:
    """Where a smoke builds (or finds) its miniature embedded models: --models-dir, else `root`/cache."""
    return Path(args.models_dir) if args.models_dir else root / "cache"


def add_models_dir_arg(p: Any) -> None:
    p.add_argument("--models-dir", type=Path, default=None,
                   help="--smoke: build or find the miniature embedded models here (shared by several smokes); "
                        "default: a temp dir of this run")


def add_teachers_namespace_arg(p: Any) -> None:
    p.add_argument("--teachers-namespace", default=None,
                   help="--smoke: attach the runs to the teachers already serving the miniature models in this Ray "
                        "namespace (started by `shared_teachers` with the same models, e.g. by the smoke suite, "
                        "which shares one service between the smokes) instead of starting them here")


def attach_sets(namespace: str) -> list[str]:
    """The overrides that attach a run of tiny.yaml to the teachers `shared_teachers` started in `namespace`."""
    return [f"teachers.namespace={namespace}", "teachers.attach=true"]


@contextmanager
def shared_teachers(sets: list[str], namespace: str | None = None) -> Iterator[str]:
    """Teachers for every run of tiny.yaml + `sets` (delta_kd), in `namespace` (default: a fresh one), shut
    down at the end; yields the namespace (runs attach with `attach_sets`). The models must exist (built)."""
    from common.config import load_config
    from common.tiny_world.build import resolve_model_paths
    from teacher_service import TeacherPool

    namespace = namespace or f"bench-teachers-{uuid.uuid4().hex[:8]}"
    pool = TeacherPool.start(resolve_model_paths(load_config(TINY, sets + [f"teachers.namespace={namespace}"])))
    try:
        yield namespace
    finally:
        pool.shutdown()


@contextmanager
def shared_ranks(warm: Any = None) -> Iterator[Any]:
    """The WarmRanks (student_worker/worker_group.py) in-process runs share, one after another: `warm` if the
    caller gives one (left open), else one of their own, closed at the end. Inside the Ray session."""
    if warm is not None:
        yield warm
        return
    from student_worker.driver import WarmRanks

    own = WarmRanks()
    try:
        yield own
    finally:
        own.close()


@contextmanager
def smoke_ranks(smoke: bool, warm: Any = None) -> Iterator[Any]:
    """`shared_ranks(warm)` for a smoke's in-process runs; None (each run starts its own ranks) for full runs,
    which are subprocesses."""
    if not smoke:
        yield None
        return
    with shared_ranks(warm) as ranks:
        yield ranks


def main(argv: list[str] | None = None, warm: Any = None) -> int:
    """The script (module docstring). warm: --smoke only, an in-process caller's WarmRanks
    (student_worker/worker_group.py) that the runs take their student ranks from and hand back to (the smoke
    suite shares one between its smokes); None: the smoke's runs share ranks of their own."""
    p = base_parser(__doc__.splitlines()[0])
    add_ray_args(p)
    add_models_dir_arg(p)
    add_teachers_namespace_arg(p)
    p.add_argument("--steps", type=int, default=40, help="training.max_steps of each run")
    args = p.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    steps = 4 if args.smoke else args.steps
    # --smoke --teachers-namespace: the delta_kd run attaches to running teachers (none start here)
    attach = attach_sets(args.teachers_namespace) if args.smoke and args.teachers_namespace else []

    with tempfile.TemporaryDirectory(prefix="dkb-e2e-") as tmp:
        root = Path(tmp)
        sets = [f"training.max_steps={steps}", "evaluation.enabled=false", "output.plot=false",
                "training.checkpoint_every=100000"]
        if args.smoke:
            sets += SMOKE_SETS + [f"embedded.cache_dir={smoke_models_dir(args, root)}"]
        from common.config import load_config
        from common.tiny_world.build import build_embedded_models

        cfg = load_config(TINY, sets)
        t0 = time.perf_counter()
        build_embedded_models(cfg.embedded, progress=False)  # outside the timed runs (cached afterwards)
        build_s = time.perf_counter() - t0

        with ray_session(args.ray_address, num_cpus=8) as ray, smoke_ranks(args.smoke, warm) as ranks:
            address = args.ray_address or ray.get_runtime_context().gcs_address
            runs: dict[str, list[dict[str, Any]]] = {"delta_kd": [], "sft": []}
            for i in range(repeats):
                for method in runs:  # alternate, so slow phases of a shared machine hit both
                    runs[method].append(run_train(method, root / f"{method}-{i}",
                                                  sets + (attach if method == "delta_kd" else []), address,
                                                  in_process=args.smoke, warm=ranks))

    def med(method: str, key: str) -> float:
        return float(summarize([r[key] for r in runs[method]])["median"])

    figures: dict[str, Any] = {
        "steps_per_run": steps, "embedded_build_s": build_s, "overrides": sets,
        "runs": runs,
        "steps_per_s_ratio_kd_over_sft": med("delta_kd", "steps_per_s") / med("sft", "steps_per_s"),
        "steady_steps_per_s_ratio_kd_over_sft": med("delta_kd", "steady_steps_per_s") / med("sft", "steady_steps_per_s"),
        "teacher_wait_fraction_kd": med("delta_kd", "teacher_wait_fraction"),
        "steady_teacher_wait_fraction_kd": med("delta_kd", "steady_teacher_wait_fraction"),
        "steady_step_parts_kd": {k: float(summarize([r["steady_step_parts"][k] for r in runs["delta_kd"]])["median"])
                                 for k in runs["delta_kd"][0]["steady_step_parts"]},
        "summary": {m: {k: summarize([r[k] for r in rs]) for k in ("steps_per_s", "steady_steps_per_s",
                                                                    "teacher_wait_fraction", "tokens_per_s")}
                    for m, rs in runs.items()},
    }
    print_table(["method", "steps/s", "steady steps/s", "tokens/s", "teacher wait", "steady wait",
                 "steady compute s"],
                [[m, med(m, "steps_per_s"), med(m, "steady_steps_per_s"), med(m, "tokens_per_s"),
                  med(m, "teacher_wait_fraction"), med(m, "steady_teacher_wait_fraction"),
                  med(m, "steady_worker_compute_s")] for m in runs], title=f"tiny default, {steps} steps per run")
    print(f"steps/s ratio delta_kd/sft: {figures['steps_per_s_ratio_kd_over_sft']:.3f} "
          f"(steady {figures['steady_steps_per_s_ratio_kd_over_sft']:.3f})")
    notes = ["no target in the issue for this figure; reported as measured",
             "report.json figures cover each run's whole loop; steady = metrics.jsonl rows after prefetch + 2",
             f"embedded models built or found in cache in {build_s:.1f} s before the timed runs",
             f"DELTAKD_CACHE={os.environ.get('DELTAKD_CACHE', '(unset)')}"] + (
        [f"--smoke: the delta_kd run attached to running teachers ({' '.join(attach)})"] if attach else [])
    write_result("bench_e2e", args, figures, [], notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
