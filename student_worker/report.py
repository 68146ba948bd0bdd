"""The run's report: report.json (figures), report.md (readable), loss_curve.png, and the console table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["write_report", "rouge_table", "plot_losses"]

_ROWS = (("student_base", "student base"), ("student_after", "student after {method}"),
         ("sft_teacher", "SFT teacher"))


def rouge_table(report: dict[str, Any]) -> str:
    """A fixed-width table: one row per evaluated model, columns ROUGE-L, ROUGE-1, ROUGE-2."""
    rouge = report.get("rouge", {})
    lines = [f"{'model':<28} {'ROUGE-L':>8} {'ROUGE-1':>8} {'ROUGE-2':>8}"]
    for key, label in _ROWS:
        r = rouge.get(key)
        name = label.format(method=report.get("method", "?"))
        if r is None:
            lines.append(f"{name:<28} {'-':>8} {'-':>8} {'-':>8}")
        else:
            lines.append(f"{name:<28} {r['rougeL']:>8.4f} {r['rouge1']:>8.4f} {r['rouge2']:>8.4f}")
    return "\n".join(lines)


def plot_losses(metrics: list[dict[str, Any]], path: Path) -> None:
    """Loss and its parts (ce, distill, loss_<component>) against the step, PNG via matplotlib Agg."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m["step"] for m in metrics]
    keys = ["loss"] + sorted({k for m in metrics for k in m if k in ("ce", "distill") or k.startswith("loss_")})
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        ax.plot(steps, [m.get(key, float("nan")) for m in metrics], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("per-token loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out_dir: Path, report: dict[str, Any], metrics: list[dict[str, Any]], plot: bool) -> dict[str, Path]:
    """Write report.json, report.md and (when `plot`) loss_curve.png into out_dir; returns their paths."""
    paths = {"report_json": out_dir / "report.json", "report_md": out_dir / "report.md"}
    paths["report_json"].write_text(json.dumps(report, indent=1, sort_keys=True))
    md = [
        f"# deltakd run: {report.get('method')}",
        "",
        f"- config hash: `{report.get('config_hash')}`",
        f"- steps: {report.get('steps')}, tokens: {report.get('tokens')}",
        f"- tokens/s: {report.get('tokens_per_s', 0):.1f}, steps/s: {report.get('steps_per_s', 0):.3f}",
        f"- teacher wait fraction: {report.get('teacher_wait_fraction', 0):.3f}",
        "",
        "```",
        rouge_table(report),
        "```",
    ]
    if plot and metrics:
        paths["loss_curve"] = out_dir / "loss_curve.png"
        plot_losses(metrics, paths["loss_curve"])
        md += ["", "![loss curve](loss_curve.png)"]
    paths["report_md"].write_text("\n".join(md) + "\n")
    return paths
