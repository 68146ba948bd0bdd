"""`python -m student_worker.research.experiment --methods sft,kd,delta_kd --seeds 5 [--eval-examples 500] [--baseline kd]
[--config X] [--set a.b=v ...] [--output-dir D] [--address A]`: the method comparison. This module plans and runs it (`run_experiment`,
`main`) and decides which finished runs a rerun reuses (`run_key`, `shared_key`).

Variants: a --methods entry may be `method@key=value[,key=value...]`, a method with overrides of its own,
e.g. `--methods sft,kd,delta_kd,delta_kd@alpha=0.5,delta_kd@tau=2,kd@tau=2,delta_kd@tail=student_base,parallelogram`;
on-policy ones: `--methods sft,kd,delta_kd,delta_kd@on_policy=0.5,delta_kd@on_policy=1,kd@on_policy=1`.
Keys are short aliases (alpha, delta_form, tau, lam, k, tail, objective, jsd_beta, lr, steps; on-policy batches: on_policy
= training.on_policy.fraction, lag, temperature, top_p, max_new_tokens), weights.<name>
(loss.weights.<name>) or dotted loss.* / training.* config keys; a piece with `=` and no `@` continues the
variant before it (`delta_kd@alpha=0.5,tau=2` is one entry). The entry, spaces removed, is the variant's name
in every table and in experiment.json (`methods`, `variants`: its overrides); its runs are in
`runs/<name with @ and commas as +>-seed<s>/`. See student_worker/research/variants.py. The measurements besides
training are in student_worker/research/diagnostics.py; the aggregates, table, experiment.md and plot in
student_worker/research/outputs.py (their public names are importable from here too).

Worlds are `--set` keys, shared by every run (a variant may not change the models): issue 23's world B puts
S0+ (the style_shift student base fine-tuned on its own terse answers, built and cached on first use by
common.tiny_world.build.build_student_plus) in place with `--set "models.student={path: 'embedded:student_plus'}"`
(start and frozen base) or `--set "models.student_base={path: 'embedded:student_plus'}"` (frozen scorer
only); docs/EXPERIMENT.md has the commands. Without them nothing changes.

Every run uses the same config (same student base, data and budget) except `loss.method`, `seed`
(seeds `seed, seed+1, ...`) and a variant's own overrides. Runs go one after another in this process
through `run_training`, on one Ray cluster, attached to ONE teacher pool that the experiment starts (or, with `teachers.attach: true` in the
config, to the running service). The student base and the SFT teacher are evaluated once, here; runs set
`evaluation.evaluate_before/evaluate_teacher: false`.

Outputs in D (default runs/experiment): `runs/<method or variant>-seed<s>/` (each run's own outputs), `experiment.json`
(rewritten after every run: every run's report with per-example scores, per-method aggregates, the hash of
the shared config; at the end the confidence intervals and verdicts), `experiment.md`, `rouge_by_method.png`,
`rougeL_ci_by_method.png`. A rerun reuses a finished run whose report.json exists and whose
saved config hashes like the planned one (runtime-only keys aside: teacher names, output dir); an unfinished
run resumes from its newest checkpoint when that checkpoint's config matches (student_worker.checkpoint's
RESUME_IGNORED_KEYS aside), else it is trained again from step 0.

Spread: mean, sample std (ddof = 1; 0 for one seed), min and max over seeds. Statistics: each method's
ROUGE-L with a 95% CI, and its difference from the baseline method (kd), paired by seed and evaluation
example, with a plain verdict ("delta_kd - kd = +x [lo, hi]: not distinguishable" when the interval covers
0). The intervals are t-intervals over seeds and examples (two-way crossed variance, Satterthwaite df:
correct at few seeds, where a bootstrap of 5 seed means is too narrow); beside each raw verdict, Holm's
verdict over all the table's differences (a table of many comparisons over-claims without it), and the
two-way bootstrap interval (student_worker/research/stats.py; experiment.json comparison.differences.<m>: p_value,
df, holm, holm_verdict, bootstrap). `--eval-examples` (default 500,
MiniLLM's convention) sets data.max_eval_examples. Diagnostics per run come from
its metrics.jsonl; the size of the shift is measured by the experiment on a few training batches (see
`shift_diagnostics` in student_worker/research/diagnostics.py).
Exit codes: 0 done, 2 bad config / arguments, 3 a run failed (finished runs stay on disk). On a failure
experiment.json keeps the finished runs and says `"status": "failed: ..."`; the teachers it started are stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from common.config import (
    DEFAULT_CONFIG,
    LOSS_METHODS,
    RUNTIME,
    ConfigError,
    RunConfig,
    config_from_dict,
    keys_with_policy,
    load_config,
    with_legacy_delta_form,
    without_retired_keys,
)
from common.faults import FaultPlan
from student_worker.research.diagnostics import (
    ExperimentError,
    evaluate_references,
    run_diagnostics,
    shift_diagnostics,
)
from student_worker.research.outputs import (
    aggregate,
    comparison,
    comparison_lines,
    experiment_markdown,
    experiment_table,
    plot_experiment,
    plot_rouge_l_ci,
)
from student_worker.research.variants import Variant, VariantError, parse_methods, parse_variant

__all__ = ["ExperimentError", "RUN_OVERRIDES", "run_key", "shared_key", "aggregate", "run_diagnostics",
           "shift_diagnostics", "evaluate_references", "variant_configs", "saved_run_config", "run_experiment",
           "experiment_table", "main"]

# Every run of an experiment gets these on top of the shared config (the experiment evaluates the two
# fixed reference models once itself).
RUN_OVERRIDES = ("evaluation.evaluate_before=false", "evaluation.evaluate_teacher=false")
# Keys that say where a run writes, which actors it talks to and where it logs, not what it computes.
# (the schema's RUNTIME keys, common/config/base.py).
_RUNTIME_KEYS = tuple(tuple(key.rstrip(".").split(".")) for key in keys_with_policy(RunConfig, RUNTIME))


def _digest(data: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _computational(cfg: RunConfig) -> dict[str, Any]:
    d = cfg.model_dump(mode="json")
    for path in _RUNTIME_KEYS:
        node = d
        for p in path[:-1]:
            node = node[p]
        node.pop(path[-1], None)
    return d


def run_key(cfg: RunConfig) -> str:
    """Hash of what a run computes: the whole config minus teacher names, attach and output location."""
    return _digest(_computational(cfg))


def shared_key(cfg: RunConfig) -> str:
    """Hash of the part every run of the experiment shares: `run_key` without loss.method and seed."""
    d = _computational(cfg)
    d["loss"].pop("method")
    d.pop("seed")
    return _digest(d)

def variant_configs(cfg: RunConfig, variants: list[Variant]) -> dict[str, RunConfig]:
    """Each variant's config (the shared one plus its overrides; seed and output not set yet), by label.
    Raises ConfigError naming the variant when its overrides do not validate, or when two variants make the
    same run (e.g. `delta_kd@alpha=1` when alpha is 1 already)."""
    base = cfg.model_dump(mode="json")
    out: dict[str, RunConfig] = {}
    keys: dict[str, str] = {}
    for v in variants:
        try:
            vc = config_from_dict(base, list(v.overrides), source="the shared config and its overrides")
        except ConfigError as exc:
            raise ConfigError(f"--methods entry {v.label!r}: {exc}") from None
        key = run_key(vc)
        if key in keys:
            raise ConfigError(f"--methods entries {keys[key]!r} and {v.label!r} make the same runs (same config)")
        keys[key] = v.label
        out[v.label] = vc
    return out


def _cached_json(path: Path, key: str, compute: Callable[[], Any]) -> Any:
    """`compute()` once per key: the result is kept in `path` as {"key", "value"}."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    path.write_text(json.dumps({"key": key, "value": value}, indent=1, sort_keys=True))
    return value


def saved_run_config(raw: dict[str, Any], source: str) -> RunConfig:
    """A finished run's saved config. One saved before loss.delta_form existed ran the student_shift form:
    it reads as student_shift where the form changes its loss (alpha != 1 or extra pairs), else as the
    default (the same computation, so such a run is reused by a plan made now; common.config's
    `with_legacy_delta_form`)."""
    return config_from_dict(with_legacy_delta_form(raw, source), source=source)


def _reusable(run_dir: Path, key: str) -> dict[str, Any] | None:
    """The run's report when it finished with a config that hashes to `key`, else None."""
    report_path, cfg_path = run_dir / "report.json", run_dir / "config.yaml"
    if not (report_path.is_file() and cfg_path.is_file()):
        return None
    saved = saved_run_config(without_retired_keys(yaml.safe_load(cfg_path.read_text())), str(cfg_path))
    if run_key(saved) != key:
        return None
    report: dict[str, Any] = json.loads(report_path.read_text())
    return report if "student_after" in report.get("rouge", {}) else None


def _resumable(rc: RunConfig) -> Path | None:
    """The newest complete checkpoint of an unfinished run made with this run's config, else None."""
    from student_worker import checkpoint as ckpt  # deferred: torch (~3 s measured); see main

    latest = ckpt.latest_checkpoint(rc.output_dir / "checkpoints") if rc.output_dir.is_dir() else None
    if latest is None:
        return None
    try:
        ckpt.check_resume_config(latest, rc.model_dump(mode="json"))
        ckpt.verify_checkpoint(latest)
    except ckpt.CheckpointError as exc:
        print(f"{rc.output_dir}: not resumable ({exc})", flush=True)
        return None
    return latest


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_experiment(cfg: RunConfig, methods: list[str] | list[Variant], seeds: list[int], out_dir: Path, *,
                   shift_batches: int = 4, progress: bool = True, command: str | None = None,
                   baseline: str = "kd", faults: FaultPlan | None = None) -> dict[str, Any]:
    """Train every (seed, method) run (seed-major order) on the initialised Ray cluster; returns the
    experiment dict also written to out_dir/experiment.json. `cfg` has resolved model paths; `methods` are
    method names or variants (strings are parsed as --methods entries). Raises ExperimentError, also for
    a variant whose config does not validate. `faults`: a test's FaultPlan for the pool it starts and every
    run (common/faults.py); not part of any run's identity."""
    # deferred: torch and Ray (~9.5 s measured); see main
    from student_worker.driver import WarmRanks, run_training

    if not cfg.evaluation.enabled or cfg.data.eval is None:
        raise ExperimentError("the comparison scores held-out ROUGE: it needs evaluation.enabled=true and data.eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict(cfg.model_dump(mode="json"), list(RUN_OVERRIDES))
    started_pool = not cfg.teachers.attach
    if started_pool:  # own actor names: never collide with a running service or another experiment
        cfg = config_from_dict(cfg.model_dump(mode="json"),
                               [f"teachers.name_prefix={cfg.teachers.name_prefix}-exp{uuid.uuid4().hex[:6]}"])
    shared = shared_key(cfg)
    try:
        variants = [m if isinstance(m, Variant) else parse_variant(m) for m in methods]
        vcfgs = variant_configs(cfg, variants)
    except (VariantError, ConfigError) as exc:
        raise ExperimentError(str(exc)) from exc
    by_label = {v.label: v for v in variants}
    labels = list(by_label)
    plan = [(m, s) for s in seeds for m in labels]
    exp: dict[str, Any] = {
        "command": command, "git": _git_sha(), "shared_config_hash": shared, "methods": labels,
        "variants": {v.label: list(v.settings) for v in variants if v.settings}, "seeds": seeds,
        "budget": {k: getattr(cfg.training, k) for k in ("max_steps", "batch_size", "lr", "num_workers")},
        "loss": {k: getattr(cfg.loss, k) for k in ("delta_form", "alpha", "tau", "lam", "k", "tail")},
        "eval_examples": None, "status": "running", "runs": [], "aggregates": {},
    }
    paths = {"json": out_dir / "experiment.json", "md": out_dir / "experiment.md",
             "plot": out_dir / "rouge_by_method.png", "ci_plot": out_dir / "rougeL_ci_by_method.png"}

    def save() -> None:
        exp["runs"].sort(key=lambda r: plan.index((r["method"], r["seed"])))
        exp["aggregates"] = aggregate(exp["runs"]) if exp["runs"] else {}
        paths["json"].write_text(json.dumps(exp, indent=1, sort_keys=True))

    def entry(m: str, s: int, report: dict[str, Any], reused: bool) -> dict[str, Any]:
        rc = run_cfgs[(m, s)]
        timing = rc.output_dir / "experiment_run.json"
        wall = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
        return {"method": m, "seed": s, "run_key": run_key(rc), "output_dir": str(rc.output_dir),
                "reused": reused, "wall_s": wall,
                "report": report, "diagnostics": run_diagnostics(rc.output_dir, report)}

    exp["references"] = _cached_json(out_dir / "references.json", shared, lambda: evaluate_references(cfg))
    exp["eval_examples"] = exp["references"]["student_base"]["num_examples"]
    run_cfgs = {(m, s): config_from_dict(vcfgs[m].model_dump(mode="json"), [
        f"seed={s}", "teachers.attach=true", f"run_name={cfg.run_name}-{by_label[m].slug}-seed{s}",
        f"output.dir={out_dir / 'runs' / f'{by_label[m].slug}-seed{s}'}"]) for m, s in plan}
    finished = {ms: r for ms in plan if (r := _reusable(run_cfgs[ms].output_dir, run_key(run_cfgs[ms]))) is not None}
    # Finished runs are in experiment.json from the start: a rerun that fails early does not drop them.
    exp["runs"] = [entry(m, s, report, True) for (m, s), report in finished.items()]
    save()
    todo = [ms for ms in plan if ms not in finished]
    shift_path = out_dir / "shift.json"
    need_shift = not (shift_path.is_file() and json.loads(shift_path.read_text()).get("key") == shared)
    pool, warm = None, WarmRanks()  # the runs share their student ranks (processes), one after another
    try:
        if need_shift or any(by_label[m].method != "sft" for m, _ in todo):  # a rerun of finished runs starts no teacher
            from teacher_service import TeacherPool  # deferred: torch (~5 s measured); see main

            try:
                pool = TeacherPool.start(cfg, faults=faults) if started_pool else TeacherPool.attach(cfg)
            except Exception as exc:
                raise ExperimentError(f"the teacher pool ({'start' if started_pool else 'attach'}, namespace "
                                      f"{cfg.teachers.namespace!r}) failed: {exc}") from exc
        exp["shift"] = _cached_json(shift_path, shared, lambda: shift_diagnostics(cfg, pool, shift_batches))
        for i, (m, s) in enumerate(plan):
            rc = run_cfgs[(m, s)]
            reused = (m, s) in finished
            if not reused:
                t0 = time.perf_counter()
                resume = _resumable(rc)
                if resume is not None:  # a run that stopped part-way (e.g. a lost teacher): continue it
                    print(f"{rc.output_dir}: unfinished; resuming from {resume.name}", flush=True)
                elif rc.output_dir.exists():  # no usable checkpoint, or another config: start it afresh
                    print(f"{rc.output_dir}: unfinished or from another config; training it again", flush=True)
                    shutil.rmtree(rc.output_dir)
                try:
                    report = run_training(rc, resume=resume is not None, progress=progress, faults=faults,
                                          warm=warm)
                except Exception as exc:
                    exp["status"] = f"failed: {m} seed {s}: {exc}"
                    raise ExperimentError(f"run {m} seed {s} ({rc.output_dir}) failed: {exc}") from exc
                (rc.output_dir / "experiment_run.json").write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
                exp["runs"].append(entry(m, s, report, False))
                save()
            done = next(r for r in exp["runs"] if (r["method"], r["seed"]) == (m, s))
            after, wall = done["report"]["rouge"]["student_after"], done["wall_s"]
            print(f"[{i + 1}/{len(plan)}] {m} seed {s}: ROUGE-L {after['rougeL']:.4f}"
                  + (" (reused)" if reused else f" ({wall:.0f} s)"), flush=True)
    except BaseException as exc:  # experiment.json says so (finished runs stay listed), then the error goes on
        if exp["status"] == "running":
            exp["status"] = f"failed: {type(exc).__name__}: {exc}"
        save()
        raise
    finally:
        warm.close()
        if pool is not None:
            pool.shutdown()  # kills only the actors this experiment started
    exp["status"] = "complete"
    exp["comparison"] = comparison(exp, baseline)
    save()
    plot_experiment(exp, paths["plot"])
    plot_rouge_l_ci(exp, paths["ci_plot"])
    paths["md"].write_text(experiment_markdown(exp))
    exp["paths"] = {k: str(v) for k, v in paths.items()}
    return exp


def main(argv: list[str] | None = None, faults: FaultPlan | None = None) -> int:
    """The CLI. `faults`: a test's FaultPlan (common/faults.py) for `run_experiment`; the CLI has none."""
    p = argparse.ArgumentParser(prog="python -m student_worker.research.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="sft,kd,delta_kd",
                   help="comma-separated loss methods and variants method@key=value[,key=value] (see above)")
    p.add_argument("--seeds", type=int, default=5, help="number of seeds per method: seed, seed+1, ...")
    p.add_argument("--eval-examples", type=int, default=500,
                   help="held-out examples scored per run (sets data.max_eval_examples; 0: the whole eval set)")
    p.add_argument("--baseline", default="kd", help="the method (or variant) every other one is compared with")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--output-dir", default="runs/experiment")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--shift-batches", type=int, default=4, help="training batches for the shift diagnostics")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    try:
        methods = parse_methods(args.methods, LOSS_METHODS)
    except VariantError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.seeds < 1:
        print("error: --seeds must be >= 1", file=sys.stderr)
        return 2
    if args.eval_examples < 0:
        print("error: --eval-examples must be >= 0", file=sys.stderr)
        return 2
    cap = f"data.max_eval_examples={args.eval_examples or 'null'}"
    try:
        cfg = load_config(args.config, [cap, *args.overrides])
        variant_configs(cfg, methods)  # a bad variant is an error before any cluster or teacher starts
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cfg.evaluation.enabled or cfg.data.eval is None:
        print("error: the comparison scores held-out ROUGE: set evaluation.enabled=true and data.eval",
              file=sys.stderr)
        return 2
    # deferred: Ray (~0.8 s) and the tiny world's builder (torch, ~3.5 s), measured on the loaded 2-core host:
    # --help and the argument / config errors above exit without them
    import ray

    from common.tiny_world.build import resolve_model_paths

    cfg = resolve_model_paths(cfg)
    if not ray.is_initialized():
        # Not a bare ray.init(): on a shared machine it would join whatever cluster `ray start` left.
        ray.init(address=args.address or (None if os.environ.get("RAY_ADDRESS") else "local"),
                 include_dashboard=False, logging_level=logging.ERROR)
    command = "python -m student_worker.research.experiment " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        exp = run_experiment(cfg, methods, [cfg.seed + i for i in range(args.seeds)], Path(args.output_dir),
                             shift_batches=args.shift_batches, progress=not args.no_progress, command=command,
                             baseline=args.baseline, faults=faults)
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print()
    print(experiment_table(exp))
    print()
    print("\n".join(comparison_lines(exp["comparison"])))
    if args.eval_examples and exp["eval_examples"] < args.eval_examples:
        print(f"note: the eval set has {exp['eval_examples']} examples, fewer than --eval-examples "
              f"{args.eval_examples} (embedded: raise embedded.num_test, or num_test_extra for format_shift)")
    print()
    for name, path in exp["paths"].items():
        print(f"{name:>5}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
