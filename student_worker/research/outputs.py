"""The summaries of a method comparison (student_worker/research/experiment.py), made from its experiment dict:
per-method aggregates over seeds (`aggregate`, stored in experiment.json), the confidence intervals and
verdicts (`comparison`, stored as `exp["comparison"]`), the fixed-width tables (`experiment_table`,
`comparison_lines`, printed), experiment.md (`experiment_markdown`), rouge_by_method.png
(`plot_experiment`) and rougeL_ci_by_method.png (`plot_rouge_l_ci`).

Spread: mean, sample std (ddof = 1; 0 for one seed), min and max over seeds. Intervals: 95 % t-intervals
over seeds and evaluation examples (two-way crossed variance, Satterthwaite df: small-sample correct at few
seeds; student_worker/research/stats.py), differences paired by seed and example against the baseline method (kd by
default), each with its raw verdict and, beside it, Holm's verdict over all the differences of the table;
the two-way bootstrap interval of each difference is kept beside them (`bootstrap`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from student_worker.research.stats import (
    DEFAULT_REPLICATES,
    Interval,
    holm,
    holm_verdict,
    paired_difference,
    paired_t,
    sizes,
    t_interval,
    verdict,
)

__all__ = ["ROUGE", "aggregate", "score_matrix", "comparison", "comparison_lines", "experiment_table",
           "experiment_markdown", "plot_experiment", "plot_rouge_l_ci"]

ROUGE = ("rougeL", "rouge1", "rouge2")


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


def score_matrix(runs: list[dict[str, Any]], method: str, key: str = "rougeL") -> tuple[list[int], np.ndarray] | None:
    """(seeds, [S, N] per-example scores) of a method's runs, rows in seed order; None when a run's report
    has no per-example scores (a run made before evaluation kept them) or the runs scored different counts."""
    mine = sorted((r for r in runs if r["method"] == method), key=lambda r: r["seed"])
    rows = [r["report"]["rouge"]["student_after"].get("per_example", {}).get(key) for r in mine]
    if not rows or any(row is None for row in rows) or len({len(row) for row in rows}) != 1:
        return None
    return [r["seed"] for r in mine], np.asarray(rows, dtype=np.float64)


def comparison(exp: dict[str, Any], baseline: str = "kd", key: str = "rougeL",
               replicates: int = DEFAULT_REPLICATES, seed: int = 0) -> dict[str, Any]:
    """Per method: mean and 95% t-interval of `key` over seeds and examples; per method other than the
    baseline: the paired difference from the baseline (on the seeds both ran), its t-interval, p-value and
    verdict, Holm's adjusted p and verdict over all the differences (`holm`, `holm_verdict`), and the
    two-way bootstrap interval (`bootstrap`); the two reference models: mean and CI over examples. Methods
    without per-example scores are listed in `missing`."""
    out: dict[str, Any] = {"baseline": baseline, "key": key, "level": 0.95, "replicates": replicates,
                           "interval": "t", "methods": {}, "differences": {}, "references": {}, "missing": []}
    mats = {}
    for method in exp["aggregates"]:
        got = score_matrix(exp["runs"], method, key)
        if got is None:
            out["missing"].append(method)
            continue
        mats[method] = got
        out["methods"][method] = t_interval(got[1]).as_dict()
    for name, ref in exp.get("references", {}).items():
        per = ref.get("per_example", {}).get(key)
        if per is not None:
            out["references"][name] = t_interval(per).as_dict()
    if baseline in mats:
        b_seeds, b = mats[baseline]
        for method, (seeds, m) in mats.items():
            common = [s for s in seeds if s in b_seeds]
            if method == baseline or not common or m.shape[1] != b.shape[1]:
                continue
            pm, pb = m[[seeds.index(s) for s in common]], b[[b_seeds.index(s) for s in common]]
            diff = paired_t(pm, pb)
            boot = paired_difference(pm, pb, replicates, seed)
            label = {"rougeL": "ROUGE-L", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2"}.get(key, key)
            out["differences"][method] = {**diff.as_dict(), "verdict": verdict(method, baseline, diff, label),
                                          "bootstrap": {"lo": boot.lo, "hi": boot.hi, "replicates": replicates}}
    diffs = out["differences"]
    adjusted = holm({m: d["p_value"] for m, d in diffs.items()}, 1.0 - out["level"])
    for method, d in diffs.items():
        d["holm"] = {**adjusted[method], "family": len(diffs)}
        d["holm_verdict"] = holm_verdict(method, Interval(**{k: d[k] for k in Interval.__dataclass_fields__}),
                                         adjusted[method], len(diffs))
    return out


def comparison_lines(comp: dict[str, Any]) -> list[str]:
    """The printed block: each model's mean and 95% CI, then per method its raw verdict and, below it, the
    p-value, Holm's verdict over the table's differences and the bootstrap interval."""
    key = comp["key"]
    if comp.get("interval") == "t":
        lines = [f"{key}: mean [95% CI], t-interval over seeds and examples (two-way variance, Satterthwaite df)"]
    else:  # an experiment.json written before the t-intervals
        lines = [f"{key}: mean [95% CI], bootstrap over seeds and examples ({comp['replicates']} replicates)"]
    names = [(f"student {m}", iv) for m, iv in comp["methods"].items()]
    names += [({"student_base": "student base", "sft_teacher": "SFT teacher"}.get(n, n), iv)
              for n, iv in comp["references"].items()]
    width = max([22, *(len(name) for name, _ in names)])
    for name, iv in names:
        lines.append(f"  {name:<{width}} {iv['mean']:.4f} [{iv['lo']:.4f}, {iv['hi']:.4f}]  "
                     f"({sizes(Interval(**iv))})")
    if comp["differences"]:
        lines.append(f"differences from {comp['baseline']}, paired by seed and example:")
        for d in comp["differences"].values():
            lines.append(f"  {d['verdict']}")
            if "holm_verdict" in d:
                boot = d["bootstrap"]
                lines.append(f"      {d['holm_verdict']}; two-way bootstrap [{boot['lo']:+.4f}, {boot['hi']:+.4f}]")
    elif comp["baseline"] not in comp["methods"]:
        lines.append(f"no differences: the baseline {comp['baseline']!r} is not among the compared methods")
    if comp["missing"]:
        lines.append(f"no per-example scores (runs made before they were kept): {', '.join(comp['missing'])}")
    return lines


def experiment_table(exp: dict[str, Any]) -> str:
    """Fixed-width table: references, then per method mean ± std [min, max] of ROUGE-L/1/2 over seeds."""
    w = max([22, *(len("student " + m) for m in exp["aggregates"])])
    lines = [f"{'model':<{w}} {'n':>2}  " + "  ".join(f"{k:<31}" for k in ("ROUGE-L", "ROUGE-1", "ROUGE-2"))]
    for name, label in (("student_base", "student base"), ("sft_teacher", "SFT teacher")):
        r = exp["references"][name]
        lines.append(f"{label:<{w}} {'-':>2}  " + "  ".join(f"{r[k]:<31.4f}" for k in ROUGE))
    for method, agg in exp["aggregates"].items():
        cells = [f"{agg[k]['mean']:.4f} ± {agg[k]['std']:.4f} [{agg[k]['min']:.3f}, {agg[k]['max']:.3f}]"
                 for k in ROUGE]
        lines.append(f"{'student ' + method:<{w}} {agg['rougeL']['n']:>2}  " + "  ".join(f"{c:<31}" for c in cells))
    return "\n".join(lines)


def experiment_markdown(exp: dict[str, Any]) -> str:
    """experiment.md: command, budget, the table, per-method diagnostics and the shift diagnostics."""
    md = ["# deltakd method comparison", "", f"- command: `{exp.get('command')}`", f"- git: {exp.get('git')}",
          f"- shared config hash: `{exp['shared_config_hash']}`", f"- budget: {exp['budget']}",
          f"- loss: {exp['loss']}", f"- seeds: {exp['seeds']}, eval examples: {exp['eval_examples']}", "",
          "Held-out ROUGE (F-measure): mean ± sample std [min, max] over seeds.", "", "```",
          experiment_table(exp), "```", "", "![ROUGE by method](rouge_by_method.png)", ""]
    if exp.get("comparison"):
        md += ["## Confidence intervals and verdicts", "", "```", *comparison_lines(exp["comparison"]), "```", "",
               "![ROUGE-L by method with 95% CIs](rougeL_ci_by_method.png)", ""]
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


def _ticks(ax: Any, names: list[str]) -> None:
    """Method names under the bars; long ones (variants) slanted so that they do not overlap."""
    slant = max(len(n) for n in names) > 12
    ax.set_xticks(np.arange(len(names)), names, rotation=30 if slant else 0, ha="right" if slant else "center",
                  fontsize=8 if slant else None)


def plot_experiment(exp: dict[str, Any], path: Path) -> None:
    """Grouped bars: ROUGE-L/1/2 per method (mean, error bar = sample std, dots = seeds) and the two
    reference models (student base, SFT teacher) as single bars."""
    # deferred: matplotlib.pyplot costs ~0.8 s at import (measured); the experiment CLI's start-up imports this
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
    _ticks(ax, groups)
    ax.set_ylabel("held-out ROUGE (F)")
    ax.set_title(f"seeds {exp['seeds']}, {exp['budget']['max_steps']} steps")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_rouge_l_ci(exp: dict[str, Any], path: Path) -> None:
    """ROUGE-L by method: the mean over seeds and examples with its 95% bootstrap CI as an error bar, the
    per-seed means as dots, and the two reference models as dashed lines."""
    # deferred: matplotlib.pyplot costs ~0.8 s at import (measured); the experiment CLI's start-up imports this
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comp = exp["comparison"]
    methods = list(comp["methods"])
    fig, ax = plt.subplots(figsize=(1.3 * len(methods) + 3, 4))
    for i, method in enumerate(methods):
        iv = comp["methods"][method]
        ax.errorbar([i], [iv["mean"]], yerr=[[iv["mean"] - iv["lo"]], [iv["hi"] - iv["mean"]]], fmt="o",
                    capsize=6, color="C0")
        got = score_matrix(exp["runs"], method, comp["key"])
        if got is not None:
            ax.plot([i + 0.12] * len(got[0]), got[1].mean(axis=1), "k.", markersize=4)
    for j, (name, iv) in enumerate(comp["references"].items()):
        label = {"student_base": "student base", "sft_teacher": "SFT teacher"}.get(name, name)
        ax.axhline(iv["mean"], ls="--", color=f"C{j + 1}", label=f"{label} {iv['mean']:.3f}")
    _ticks(ax, methods)
    ax.set_xlim(-0.5, len(methods) - 0.5)
    ax.set_ylabel(f"held-out {comp['key']} (F)")
    n: dict[str, Any] = next(iter(comp["methods"].values()), {})
    ax.set_title(f"mean and 95% CI over {n.get('seeds', '?')} seeds x {n.get('examples', '?')} examples")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
