"""`python -m student_worker.experiment --methods sft,kd,delta_kd --seeds 3 [--config X] [--set a.b=v ...]
[--output-dir D] [--address A]`: the method comparison.

Every run uses the same config (same student base, data and budget) except `loss.method` and `seed`
(seeds `seed, seed+1, ...`). Runs go one after another in this process through `run_training`, on one Ray
cluster, attached to ONE teacher pool that the experiment starts (or, with `teachers.attach: true` in the
config, to the running service). The student base and the SFT teacher are evaluated once, here; runs set
`evaluation.evaluate_before/evaluate_teacher: false`.

Outputs in D (default runs/experiment): `runs/<method>-seed<s>/` (each run's own outputs), `experiment.json`
(rewritten after every run: every run's report, per-method aggregates, the hash of the shared config),
`experiment.md`, `rouge_by_method.png`. A rerun reuses a finished run whose report.json exists and whose
saved config hashes like the planned one (runtime-only keys aside: teacher names, output dir).

Spread: mean, sample std (ddof = 1; 0 for one seed), min and max over seeds. Diagnostics per run come from
its metrics.jsonl; the size of the shift is measured here on a few training batches (see `shift_diagnostics`).
Exit codes: 0 done, 2 bad config / arguments, 3 a run failed (finished runs stay on disk).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig, config_from_dict

__all__ = ["ExperimentError", "RUN_OVERRIDES", "run_key", "shared_key", "aggregate", "run_diagnostics",
           "shift_diagnostics", "evaluate_references", "run_experiment", "experiment_table", "main"]

ROUGE = ("rougeL", "rouge1", "rouge2")
# Every run of an experiment gets these on top of the shared config (the experiment evaluates the two
# fixed reference models once itself).
RUN_OVERRIDES = ("evaluation.evaluate_before=false", "evaluation.evaluate_teacher=false")
# Keys that say where a run writes and which actors it talks to, not what it computes.
_RUNTIME_KEYS = (("teachers", "namespace"), ("teachers", "name_prefix"), ("teachers", "attach"),
                 ("output", "dir"), ("run_name",))
# metrics.jsonl keys averaged over a run's steps (when the method logs them).
_STEP_MEANS = ("topk_mass_sft", "topk_mass_base", "topk_mass_student_base", "target_entropy", "grad_norm")
_DIAG_BATCH_ID0 = 10**9  # diagnostic batch ids: far from training ids (teacher caches key on content too)


class ExperimentError(RuntimeError):
    """A run of the comparison failed or its outputs are unusable; the message names the run."""


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


def _stats(values: list[float]) -> dict[str, float]:
    a = np.asarray(values, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if a.size > 1 else 0.0,
            "min": float(a.min()), "max": float(a.max()), "n": int(a.size)}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: {"seeds", rougeL/rouge1/rouge2: {mean, std, min, max, n}, "diagnostics": {key: mean}}."""
    out: dict[str, dict[str, Any]] = {}
    for method in dict.fromkeys(r["method"] for r in runs):
        mine = [r for r in runs if r["method"] == method]
        agg: dict[str, Any] = {"seeds": [r["seed"] for r in mine]}
        for key in ROUGE:
            agg[key] = _stats([r["report"]["rouge"]["student_after"][key] for r in mine])
        keys = sorted({k for r in mine for k in r["diagnostics"]})
        agg["diagnostics"] = {k: float(np.mean([r["diagnostics"][k] for r in mine if k in r["diagnostics"]]))
                              for k in keys}
        out[method] = agg
    return out


def run_diagnostics(run_dir: Path, report: dict[str, Any]) -> dict[str, float]:
    """From a run's metrics.jsonl: step means of top-k masses, target entropy and grad norm; the grad
    norm's max; the final loss; the mean loss and CE (when logged) over the last 10 steps."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not rows:
        raise ExperimentError(f"{path}: no metrics rows")
    out: dict[str, float] = {}
    for key in _STEP_MEANS:
        vals = [r[key] for r in rows if key in r]
        if vals:
            out[key] = float(np.mean(vals))
    out["grad_norm_max"] = float(max(r["grad_norm"] for r in rows))
    out["final_loss"] = float(report["final_loss"])
    out["loss_last10"] = float(np.mean([r["loss"] for r in rows[-10:]]))
    if "ce" in rows[-1]:
        out["ce_last10"] = float(np.mean([r["ce"] for r in rows[-10:]]))
    out["steps_per_s"] = float(report["steps_per_s"])
    return out


def _student_base_spec(cfg: RunConfig) -> Any:
    return cfg.models.student_base if cfg.models.student_base is not None else cfg.models.student


def evaluate_references(cfg: RunConfig) -> dict[str, dict[str, Any]]:
    """ROUGE of the student base and the SFT teacher on the eval set, once for every run.

    The same function as the driver's own evaluations (`evaluate_spec`: same examples and generation
    settings), run as Ray tasks that ask for `teachers.num_gpus`, so a GPU cluster evaluates on GPUs."""
    import ray

    from student_worker.data import load_examples
    from student_worker.driver import evaluate_spec_task

    e = cfg.evaluation
    examples = load_examples(cfg.data, "eval", cfg.embedded)
    task = evaluate_spec_task.options(num_cpus=min(1.0, cfg.teachers.num_cpus), num_gpus=cfg.teachers.num_gpus)
    specs = {"student_base": _student_base_spec(cfg), "sft_teacher": cfg.models.sft_teacher}
    refs = {name: task.remote(spec, examples, e.max_new_tokens, e.batch_size) for name, spec in specs.items()}
    return {name: ray.get(ref) for name, ref in refs.items()}


def shift_diagnostics(cfg: RunConfig, pool: Any, num_batches: int) -> dict[str, float]:
    """How far Delta-KD's target sits from the SFT teacher, measured on the first `num_batches` training
    batches (seed cfg.seed), on the atoms (k support ids + tail bucket) of the pool's records.

    Per counted token, with atoms T1 (sft), T0 (base), S0 (student base, scored here), delta = alpha
    (T1 - T0) and target = softmax(S0 + delta), TV(P, Q) = 0.5 sum_a |p_a - q_a|. Returns token means of:
    tv_sft_base (the teachers' shift), tv_target_student_base (the shift Delta-KD puts on the student),
    tv_target_sft (Delta-KD's target vs KD's), tv_student_base_base (student base vs teacher base),
    kl_sft_target = KL(T1 || target), mean_abs_delta = sum_a p_T1 |delta_a|, topk_mass_<role>,
    entropy_<sft|target|student_base>, top1_agree_target_sft (same argmax), top1_label_<sft|target>
    (argmax among the k ids is the label).
    """
    import ray
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from common.losses import targets_from_record
    from common.losses.loss import teacher_atoms
    from common.topk import ROLE_BASE, ROLE_SFT, ROLE_STUDENT_BASE
    from student_worker.data import BatchPlan, collate, load_examples, tokenize_examples
    from student_worker.train_step import add_student_base

    spec = _student_base_spec(cfg)
    tok = AutoTokenizer.from_pretrained(spec.path, revision=spec.revision, trust_remote_code=spec.trust_remote_code)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train = tokenize_examples(load_examples(cfg.data, "train", cfg.embedded), tok, cfg.data)
    plan = BatchPlan(len(train), cfg.training.batch_size, 1, cfg.seed, cfg.data.shuffle)
    batches = [collate([train[i] for i in plan.step_indices(s)[0]], pad)
               for s in range(min(num_batches, plan.steps_per_epoch))]
    refs = [pool.submit(_DIAG_BATCH_ID0 + s, b["input_ids"], b["attention_mask"], b["loss_mask"])
            for s, b in enumerate(batches)]
    model = AutoModelForCausalLM.from_pretrained(spec.path, revision=spec.revision, dtype=torch.float32,
                                                 trust_remote_code=spec.trust_remote_code).eval()
    sums: dict[str, float] = {}
    count = 0
    with torch.no_grad():
        for b, record in zip(batches, ray.get(refs)):
            t = {k: torch.as_tensor(np.array(b[k])) for k in ("input_ids", "attention_mask")}
            targets = add_student_base(model, {**t, "input_ids": t["input_ids"].long()}, targets_from_record(record),
                                       cfg.loss.chunk_tokens)
            m = targets.mask & torch.as_tensor(b["loss_mask"])
            ids, label = targets.ids[m], torch.as_tensor(b["labels"])[m]
            at = {r: teacher_atoms(targets.logprobs[r][m], targets.tail[r][m], "bucket")
                  for r in (ROLE_SFT, ROLE_BASE, ROLE_STUDENT_BASE)}
            p = {r: a.exp() for r, a in at.items()}
            delta = cfg.loss.alpha * (at[ROLE_SFT] - at[ROLE_BASE])
            target = torch.log_softmax(at[ROLE_STUDENT_BASE] + delta, dim=-1)
            pt = target.exp()
            k = ids.shape[1]
            vals = {
                "tv_sft_base": 0.5 * (p[ROLE_SFT] - p[ROLE_BASE]).abs().sum(-1),
                "tv_target_student_base": 0.5 * (pt - p[ROLE_STUDENT_BASE]).abs().sum(-1),
                "tv_target_sft": 0.5 * (pt - p[ROLE_SFT]).abs().sum(-1),
                "tv_student_base_base": 0.5 * (p[ROLE_STUDENT_BASE] - p[ROLE_BASE]).abs().sum(-1),
                "kl_sft_target": (p[ROLE_SFT] * (at[ROLE_SFT] - target)).sum(-1),
                "mean_abs_delta": (p[ROLE_SFT] * delta.abs()).sum(-1),
                "entropy_sft": -(p[ROLE_SFT] * at[ROLE_SFT]).sum(-1),
                "entropy_target": -(pt * target).sum(-1),
                "entropy_student_base": -(p[ROLE_STUDENT_BASE] * at[ROLE_STUDENT_BASE]).sum(-1),
                "top1_agree_target_sft": (target[:, :k].argmax(-1) == at[ROLE_SFT][:, :k].argmax(-1)).double(),
                "top1_label_sft": (ids.gather(1, at[ROLE_SFT][:, :k].argmax(-1, keepdim=True))[:, 0] == label).double(),
                "top1_label_target": (ids.gather(1, target[:, :k].argmax(-1, keepdim=True))[:, 0] == label).double(),
            }
            for r in at:
                vals[f"topk_mass_{r}"] = targets.logprobs[r][m].exp().sum(-1)
            for key, v in vals.items():
                sums[key] = sums.get(key, 0.0) + float(v.double().sum())
            count += int(m.sum())
    if count == 0:
        raise ExperimentError("shift diagnostics: the diagnostic batches have no counted tokens")
    return {key: s / count for key, s in sums.items()} | {"tokens": float(count), "batches": float(len(batches))}


def _cached_json(path: Path, key: str, compute: Callable[[], Any]) -> Any:
    """`compute()` once per key: the result is kept in `path` as {"key", "value"}."""
    if path.is_file():
        saved = json.loads(path.read_text())
        if saved.get("key") == key:
            return saved["value"]
    value = compute()
    path.write_text(json.dumps({"key": key, "value": value}, indent=1, sort_keys=True))
    return value


def _reusable(run_dir: Path, key: str) -> dict[str, Any] | None:
    """The run's report when it finished with a config that hashes to `key`, else None."""
    import yaml

    report_path, cfg_path = run_dir / "report.json", run_dir / "config.yaml"
    if not (report_path.is_file() and cfg_path.is_file()):
        return None
    saved = config_from_dict(yaml.safe_load(cfg_path.read_text()), source=str(cfg_path))
    if run_key(saved) != key:
        return None
    report: dict[str, Any] = json.loads(report_path.read_text())
    return report if "student_after" in report.get("rouge", {}) else None


def _git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def run_experiment(cfg: RunConfig, methods: list[str], seeds: list[int], out_dir: Path, *,
                   shift_batches: int = 4, progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Train every (seed, method) run (seed-major order) on the initialised Ray cluster; returns the
    experiment dict also written to out_dir/experiment.json. `cfg` has resolved model paths."""
    from student_worker.driver import run_training

    if not cfg.evaluation.enabled or cfg.data.eval is None:
        raise ExperimentError("the comparison scores held-out ROUGE: it needs evaluation.enabled=true and data.eval")
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = config_from_dict(cfg.model_dump(mode="json"), list(RUN_OVERRIDES))
    started_pool = not cfg.teachers.attach
    if started_pool:  # own actor names: never collide with a running service or another experiment
        cfg = config_from_dict(cfg.model_dump(mode="json"),
                               [f"teachers.name_prefix={cfg.teachers.name_prefix}-exp{uuid.uuid4().hex[:6]}"])
    shared = shared_key(cfg)
    plan = [(m, s) for s in seeds for m in methods]
    exp: dict[str, Any] = {
        "command": command, "git": _git_sha(), "shared_config_hash": shared, "methods": methods, "seeds": seeds,
        "budget": {k: getattr(cfg.training, k) for k in ("max_steps", "batch_size", "lr", "num_workers")},
        "loss": {k: getattr(cfg.loss, k) for k in ("alpha", "tau", "lam", "k", "tail")},
        "eval_examples": None, "status": "running", "runs": [], "aggregates": {},
    }
    paths = {"json": out_dir / "experiment.json", "md": out_dir / "experiment.md",
             "plot": out_dir / "rouge_by_method.png"}

    def save() -> None:
        exp["aggregates"] = aggregate(exp["runs"]) if exp["runs"] else {}
        paths["json"].write_text(json.dumps(exp, indent=1, sort_keys=True))

    exp["references"] = _cached_json(out_dir / "references.json", shared, lambda: evaluate_references(cfg))
    exp["eval_examples"] = exp["references"]["student_base"]["num_examples"]
    save()
    run_cfgs = {(m, s): config_from_dict(cfg.model_dump(mode="json"), [
        f"loss.method={m}", f"seed={s}", "teachers.attach=true", f"run_name={cfg.run_name}-{m}-seed{s}",
        f"output.dir={out_dir / 'runs' / f'{m}-seed{s}'}"]) for m, s in plan}
    todo = [ms for ms in plan if _reusable(run_cfgs[ms].output_dir, run_key(run_cfgs[ms])) is None]
    shift_path = out_dir / "shift.json"
    need_shift = not (shift_path.is_file() and json.loads(shift_path.read_text()).get("key") == shared)
    pool = None
    try:
        if need_shift or any(m != "sft" for m, _ in todo):  # a rerun of finished runs starts no teacher
            from teacher_service import TeacherPool

            try:
                pool = TeacherPool.start(cfg) if started_pool else TeacherPool.attach(cfg)
            except Exception as exc:
                raise ExperimentError(f"the teacher pool ({'start' if started_pool else 'attach'}, namespace "
                                      f"{cfg.teachers.namespace!r}) failed: {exc}") from exc
        exp["shift"] = _cached_json(shift_path, shared, lambda: shift_diagnostics(cfg, pool, shift_batches))
        for i, (m, s) in enumerate(plan):
            rc = run_cfgs[(m, s)]
            report, t0 = _reusable(rc.output_dir, run_key(rc)), time.perf_counter()
            reused, timing = report is not None, rc.output_dir / "experiment_run.json"
            if report is None:
                if rc.output_dir.exists():  # unfinished or made with another config: start it afresh
                    print(f"{rc.output_dir}: unfinished or from another config; training it again", flush=True)
                    shutil.rmtree(rc.output_dir)
                try:
                    report = run_training(rc, progress=progress)
                except Exception as exc:
                    exp["status"] = f"failed: {m} seed {s}: {exc}"
                    save()
                    raise ExperimentError(f"run {m} seed {s} ({rc.output_dir}) failed: {exc}") from exc
                timing.write_text(json.dumps({"wall_s": time.perf_counter() - t0}))
            wall = json.loads(timing.read_text())["wall_s"] if timing.is_file() else None
            entry = {"method": m, "seed": s, "run_key": run_key(rc), "output_dir": str(rc.output_dir),
                     "reused": reused, "wall_s": wall,
                     "report": report, "diagnostics": run_diagnostics(rc.output_dir, report)}
            exp["runs"].append(entry)
            save()
            after = report["rouge"]["student_after"]
            print(f"[{i + 1}/{len(plan)}] {m} seed {s}: ROUGE-L {after['rougeL']:.4f}"
                  + (" (reused)" if reused else f" ({wall:.0f} s)"), flush=True)
    finally:
        if pool is not None:
            pool.shutdown()  # kills only the actors this experiment started
    exp["status"] = "complete"
    save()
    plot_experiment(exp, paths["plot"])
    paths["md"].write_text(experiment_markdown(exp))
    exp["paths"] = {k: str(v) for k, v in paths.items()}
    return exp


def experiment_table(exp: dict[str, Any]) -> str:
    """Fixed-width table: references, then per method mean ± std [min, max] of ROUGE-L/1/2 over seeds."""
    lines = [f"{'model':<22} {'n':>2}  " + "  ".join(f"{k:<31}" for k in ("ROUGE-L", "ROUGE-1", "ROUGE-2"))]
    for name, label in (("student_base", "student base"), ("sft_teacher", "SFT teacher")):
        r = exp["references"][name]
        lines.append(f"{label:<22} {'-':>2}  " + "  ".join(f"{r[k]:<31.4f}" for k in ROUGE))
    for method, agg in exp["aggregates"].items():
        cells = [f"{agg[k]['mean']:.4f} ± {agg[k]['std']:.4f} [{agg[k]['min']:.3f}, {agg[k]['max']:.3f}]"
                 for k in ROUGE]
        lines.append(f"{'student ' + method:<22} {agg['rougeL']['n']:>2}  " + "  ".join(f"{c:<31}" for c in cells))
    return "\n".join(lines)


def experiment_markdown(exp: dict[str, Any]) -> str:
    """experiment.md: command, budget, the table, per-method diagnostics and the shift diagnostics."""
    md = ["# deltakd method comparison", "", f"- command: `{exp.get('command')}`", f"- git: {exp.get('git')}",
          f"- shared config hash: `{exp['shared_config_hash']}`", f"- budget: {exp['budget']}",
          f"- loss: {exp['loss']}", f"- seeds: {exp['seeds']}, eval examples: {exp['eval_examples']}", "",
          "Held-out ROUGE (F-measure): mean ± sample std [min, max] over seeds.", "", "```",
          experiment_table(exp), "```", "", "![ROUGE by method](rouge_by_method.png)", ""]
    keys = sorted({k for a in exp["aggregates"].values() for k in a["diagnostics"]})
    md += ["## Training diagnostics (means over seeds)", "", "| method | " + " | ".join(keys) + " |",
           "|---" * (len(keys) + 1) + "|"]
    for method, agg in exp["aggregates"].items():
        d = agg["diagnostics"]
        md.append(f"| {method} | " + " | ".join(f"{d[k]:.4g}" if k in d else "-" for k in keys) + " |")
    if exp.get("shift"):
        md += ["", "## Shift diagnostics (token means over the first training batches)", "",
               "| quantity | value |", "|---|---|"]
        md += [f"| {k} | {v:.4g} |" for k, v in sorted(exp["shift"].items())]
    return "\n".join(md) + "\n"


def plot_experiment(exp: dict[str, Any], path: Path) -> None:
    """Grouped bars: ROUGE-L/1/2 per method (mean, error bar = sample std, dots = seeds) and the two
    reference models (student base, SFT teacher) as single bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = ["student base"] + [f"{m}" for m in exp["aggregates"]] + ["SFT teacher"]
    fig, ax = plt.subplots(figsize=(1.8 * len(groups) + 2, 4))
    width = 0.8 / len(ROUGE)
    for j, key in enumerate(ROUGE):
        means = ([exp["references"]["student_base"][key]] + [a[key]["mean"] for a in exp["aggregates"].values()]
                 + [exp["references"]["sft_teacher"][key]])
        stds = [0.0] + [a[key]["std"] for a in exp["aggregates"].values()] + [0.0]
        x = np.arange(len(groups)) + (j - 1) * width
        ax.bar(x, means, width, yerr=stds, capsize=3, label=key)
        for i, method in enumerate(exp["aggregates"], start=1):
            vals = [r["report"]["rouge"]["student_after"][key] for r in exp["runs"] if r["method"] == method]
            ax.plot([x[i]] * len(vals), vals, "k.", markersize=3)
    ax.set_xticks(np.arange(len(groups)), groups)
    ax.set_ylabel("held-out ROUGE (F)")
    ax.set_title(f"seeds {exp['seeds']}, {exp['budget']['max_steps']} steps")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    from common.config import LOSS_METHODS, ConfigError, load_config
    from student_worker.train import DEFAULT_CONFIG

    p = argparse.ArgumentParser(prog="python -m student_worker.experiment", description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="sft,kd,delta_kd", help="comma-separated loss methods")
    p.add_argument("--seeds", type=int, default=3, help="number of seeds per method: seed, seed+1, ...")
    p.add_argument("--config", default=str(DEFAULT_CONFIG))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--output-dir", default="runs/experiment")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, else a local cluster)")
    p.add_argument("--shift-batches", type=int, default=4, help="training batches for the shift diagnostics")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in LOSS_METHODS]
    if not methods or bad or len(set(methods)) != len(methods) or args.seeds < 1:
        print(f"error: --methods needs distinct names from {LOSS_METHODS} (bad: {bad}) and --seeds >= 1",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not cfg.evaluation.enabled or cfg.data.eval is None:
        print("error: the comparison scores held-out ROUGE: set evaluation.enabled=true and data.eval",
              file=sys.stderr)
        return 2
    import os

    import ray

    from student_worker.embedded_models import resolve_model_paths

    cfg = resolve_model_paths(cfg)
    if not ray.is_initialized():
        # Not a bare ray.init(): on a shared machine it would join whatever cluster `ray start` left.
        ray.init(address=args.address or (None if os.environ.get("RAY_ADDRESS") else "local"),
                 include_dashboard=False, logging_level=logging.ERROR)
    command = "python -m student_worker.experiment " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        exp = run_experiment(cfg, methods, [cfg.seed + i for i in range(args.seeds)], Path(args.output_dir),
                             shift_batches=args.shift_batches, progress=not args.no_progress, command=command)
    except ExperimentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    print()
    print(experiment_table(exp))
    print()
    for name, path in exp["paths"].items():
        print(f"{name:>5}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
