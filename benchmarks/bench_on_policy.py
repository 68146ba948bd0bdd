"""On-policy steps (`training.on_policy`): lag 0 and lag 1 against the off-policy run, same models and budget.

Three real runs of `python -m student_worker.train --config deploy/configs/tiny.yaml` (delta_kd) per repeat
(subprocesses, alternating), differing only in `training.on_policy`:

    off_policy   fraction 0 (today's run: the data set's responses)
    lag0         fraction 1, lag 0: sample with the current weights, then teacher scoring, then the step
    lag1         fraction 1, lag 1: the next step's sample is drawn with weights one step old while the
                 teachers score the current one

Figures per mode (bench_e2e.run_train: report.json for the whole loop, metrics.jsonl for the steady state):
steps/s, teacher wait fraction (the workers' record wait / step time), the sampling share of the steady step
(`sample_s` / step time) and tokens/s (trained positions: on-policy runs train on the sampled tokens, so
tokens/s is not comparable with the off-policy run's). Ratios: lag0 / off_policy and lag1 / off_policy
steps/s. No target is set for these figures in the issue; they are reported as measured.

`--smoke` runs each training in this process and builds miniature models (in `--models-dir` if given), as
bench_e2e's smoke does, and its three runs attach to one teacher service (`teachers.attach`): the one in
`--teachers-namespace` if given (the smoke suite's, shared with bench_e2e and bench_cache), else one the
script starts (`bench_e2e.shared_teachers`), so the teachers start once; full runs each start their own. The
smoke's runs also share student rank processes (`bench_e2e.smoke_ranks`, or the caller's `main(argv, warm=...)`).

    python benchmarks/bench_on_policy.py [--smoke] [--repeats N] [--steps N] [--max-new-tokens N]
                                         [--ray-address ADDR] [--models-dir D] [--teachers-namespace NS]
"""

from __future__ import annotations

import os
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from _common import add_ray_args, base_parser, print_table, ray_session, summarize, write_result
from bench_e2e import (
    SMOKE_SETS,
    TINY,
    add_models_dir_arg,
    add_teachers_namespace_arg,
    attach_sets,
    run_train,
    shared_teachers,
    smoke_models_dir,
    smoke_ranks,
)

__all__ = ["MODES", "main"]

MODES: dict[str, list[str]] = {
    "off_policy": [],
    "lag0": ["training.on_policy.fraction=1", "training.on_policy.lag=0"],
    "lag1": ["training.on_policy.fraction=1", "training.on_policy.lag=1"],
}


def main(argv: list[str] | None = None, warm: Any = None) -> int:
    """The script (module docstring). warm: --smoke only, an in-process caller's WarmRanks
    (student_worker/worker_group.py) that the runs take their student ranks from and hand back to (the smoke
    suite shares one between its smokes); None: the smoke's runs share ranks of their own."""
    p = base_parser(__doc__.splitlines()[0])
    add_ray_args(p)
    add_models_dir_arg(p)
    add_teachers_namespace_arg(p)
    p.add_argument("--steps", type=int, default=40, help="training.max_steps of each run")
    p.add_argument("--max-new-tokens", type=int, default=32, help="training.on_policy.max_new_tokens")
    args = p.parse_args(argv)
    repeats = 1 if args.smoke else args.repeats
    steps = 4 if args.smoke else args.steps
    new_tokens = 8 if args.smoke else args.max_new_tokens

    with tempfile.TemporaryDirectory(prefix="dkb-onpolicy-") as tmp:
        root = Path(tmp)
        sets = [f"training.max_steps={steps}", "evaluation.enabled=false", "output.plot=false",
                "training.checkpoint_every=100000", f"training.on_policy.max_new_tokens={new_tokens}"]
        if args.smoke:
            sets += SMOKE_SETS + [f"embedded.cache_dir={smoke_models_dir(args, root)}"]
        from common.config import load_config
        from common.tiny_world.build import build_embedded_models

        cfg = load_config(TINY, sets)
        t0 = time.perf_counter()
        build_embedded_models(cfg.embedded, progress=False)  # outside the timed runs (cached afterwards)
        build_s = time.perf_counter() - t0

        given = args.teachers_namespace if args.smoke else None  # running teachers to attach to
        with ray_session(args.ray_address, num_cpus=8) as ray, \
                (nullcontext(given) if given or not args.smoke else shared_teachers(sets)) as namespace, \
                smoke_ranks(args.smoke, warm) as ranks:
            attach = attach_sets(namespace) if namespace else []
            address = args.ray_address or ray.get_runtime_context().gcs_address
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in MODES}
            for i in range(repeats):
                for mode, extra in MODES.items():  # alternate, so slow phases of a shared machine hit every mode
                    runs[mode].append(run_train("delta_kd", root / f"{mode}-{i}", sets + attach + extra, address,
                                                in_process=args.smoke, warm=ranks))

    def med(mode: str, key: str) -> float:
        return float(summarize([r[key] for r in runs[mode]])["median"])

    def sample_share(mode: str) -> float:
        return float(summarize([r["steady_step_parts"]["sample_s"] for r in runs[mode]])["median"])

    figures: dict[str, Any] = {
        "steps_per_run": steps, "max_new_tokens": new_tokens, "embedded_build_s": build_s, "overrides": sets,
        "modes": {m: list(extra) for m, extra in MODES.items()},
        "runs": runs,
        "steps_per_s_ratio_lag0_over_off": med("lag0", "steps_per_s") / med("off_policy", "steps_per_s"),
        "steps_per_s_ratio_lag1_over_off": med("lag1", "steps_per_s") / med("off_policy", "steps_per_s"),
        "steps_per_s_ratio_lag1_over_lag0": med("lag1", "steps_per_s") / med("lag0", "steps_per_s"),
        "teacher_wait_fraction": {m: med(m, "teacher_wait_fraction") for m in MODES},
        "steady_teacher_wait_fraction": {m: med(m, "steady_teacher_wait_fraction") for m in MODES},
        "steady_sample_fraction": {m: sample_share(m) for m in MODES},
        "summary": {m: {k: summarize([r[k] for r in rs]) for k in ("steps_per_s", "steady_steps_per_s",
                                                                    "teacher_wait_fraction", "tokens_per_s")}
                    for m, rs in runs.items()},
    }
    print_table(["mode", "steps/s", "steady steps/s", "tokens/s", "teacher wait", "steady wait", "steady sample"],
                [[m, med(m, "steps_per_s"), med(m, "steady_steps_per_s"), med(m, "tokens_per_s"),
                  med(m, "teacher_wait_fraction"), med(m, "steady_teacher_wait_fraction"), sample_share(m)]
                 for m in MODES], title=f"tiny default (delta_kd), {steps} steps per run, {new_tokens} new tokens")
    print(f"steps/s lag0/off {figures['steps_per_s_ratio_lag0_over_off']:.3f}, "
          f"lag1/off {figures['steps_per_s_ratio_lag1_over_off']:.3f}, "
          f"lag1/lag0 {figures['steps_per_s_ratio_lag1_over_lag0']:.3f}")
    notes = ["no target in the issue for these figures; reported as measured",
             "report.json figures cover each run's whole loop; steady = metrics.jsonl rows after prefetch + 2",
             "tokens/s counts trained positions: the sampled tokens in on-policy runs, the responses off-policy",
             f"embedded models built or found in cache in {build_s:.1f} s before the timed runs",
             *([f"--smoke: the runs attached to one teacher service ({'given' if given else 'started here'}: "
                f"{' '.join(attach)})"] if attach else []),
             f"DELTAKD_CACHE={os.environ.get('DELTAKD_CACHE', '(unset)')}"]
    write_result("bench_on_policy", args, figures, [], notes)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
