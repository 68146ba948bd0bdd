"""The summaries of a method comparison (student_worker/experiment.py), made from its experiment dict:
per-method aggregates over seeds (`aggregate`, stored in experiment.json), the fixed-width table
(`experiment_table`, printed), experiment.md (`experiment_markdown`) and rouge_by_method.png
(`plot_experiment`).

Spread: mean, sample std (ddof = 1; 0 for one seed), min and max over seeds.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ROUGE", "aggregate", "experiment_table", "experiment_markdown", "plot_experiment"]

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
