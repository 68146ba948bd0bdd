"""The run's figures: one metrics row per step (`step_row`), the summary (`run_summary`), and the files
report.json (figures), report.md (readable), loss_curve.png, plus the console table."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig, config_hash

__all__ = ["TIMING_KEYS", "step_row", "run_summary", "write_report", "rouge_table", "plot_losses"]

# Per-rank metrics that are NOT per-token means (everything else is combined weighted by tokens).
_NON_TOKEN_KEYS = {"rank", "batch_id", "grad_norm", "lr", "teacher_wait_s", "compute_s", "loss_sum", "tokens",
                   "step_s", "step_parts"}

# Timing keys of a metrics row (wall-clock figures; everything else must match between equivalent runs).
TIMING_KEYS = frozenset({"step_s", "step_parts", "tokens_per_s", "teacher_wait_s", "teacher_wait_frac", "compute_s",
                         "critical_rank", "driver_submit_s"})

_ROWS = (("student_base", "student base"), ("student_after", "student after {method}"),
         ("sft_teacher", "SFT teacher"))


def step_row(step: int, per_rank: list[dict[str, Any]], arrays: list[dict[str, np.ndarray]],
             driver_submit_s: float = 0.0) -> dict[str, Any]:
    """One metrics.jsonl row from the ranks' step results.

    loss = sum of the ranks' loss sums / their tokens; every other per-token metric is the token-weighted mean
    over ranks; grad_norm and lr are rank 0's (identical after the all-reduce); input_tokens counts every real
    (attention-masked) token of the global batch.

    Time: the ranks meet at the step's input agreement, so the step's critical path is the rank that reached
    it LAST (the least `peer_wait_s`: the others waited for it there). The row's `step_s` and `step_parts`
    (named intervals that sum to step_s: student_worker.worker.STEP_PARTS) are that rank's (`critical_rank`);
    `teacher_wait_s` is its `record_wait_s`, the real stall on teachers; `compute_s` its own work (prepare,
    forward, backward, exposed all-reduce, optimizer). `driver_submit_s`: the driver's time submitting
    teacher work in that loop turn (waiting in the pool's back-pressure included), which overlaps the
    workers' queued calls; not a part of the step.
    """
    tokens = sum(m["tokens"] for m in per_rank)
    input_tokens = int(sum(a["attention_mask"].sum() for a in arrays))
    row: dict[str, Any] = {"step": step, "batch_ids": [m["batch_id"] for m in per_rank],
                           "loss": sum(m["loss_sum"] for m in per_rank) / max(tokens, 1)}
    for key in sorted(per_rank[0]):
        if key not in _NON_TOKEN_KEYS:
            row[key] = sum(m[key] * m["tokens"] for m in per_rank) / max(tokens, 1)
    critical = min(range(len(per_rank)), key=lambda r: (per_rank[r]["step_parts"]["peer_wait_s"], r))
    crit = per_rank[critical]
    step_s = crit["step_s"]
    row.update({"grad_norm": per_rank[0]["grad_norm"], "lr": per_rank[0]["lr"], "tokens": tokens,
                "input_tokens": input_tokens, "step_s": step_s, "tokens_per_s": input_tokens / max(step_s, 1e-9),
                "teacher_wait_s": crit["teacher_wait_s"],
                "teacher_wait_frac": min(1.0, crit["teacher_wait_s"] / max(step_s, 1e-9)),
                "compute_s": crit["compute_s"], "step_parts": dict(crit["step_parts"]),
                "critical_rank": critical, "driver_submit_s": driver_submit_s})
    return row


def run_summary(cfg: RunConfig, rows: list[dict[str, Any]], start_step: int, step: int, loop_s: float,
                rouge: dict[str, Any], restarts: int, teacher_stats: dict[str, Any] | None,
                paths: dict[str, str], recoveries: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """report.json's figures. Speeds count only this process's steps (rows from `start_step` on: a resumed
    run's earlier rows were timed by another process); tokens and the final loss cover the whole run.
    `step_time_fractions`: each named step part's share of the summed step time (they add up to 1)."""
    run_rows = [r for r in rows if r["step"] >= start_step]
    wait = sum(r["teacher_wait_s"] for r in run_rows)
    step_time = sum(r["step_s"] for r in run_rows)
    part_names = list(dict.fromkeys(k for r in run_rows for k in r.get("step_parts", {})))
    fractions = {k: sum(r.get("step_parts", {}).get(k, 0.0) for r in run_rows) / max(step_time, 1e-9)
                 for k in part_names}
    report = {
        "method": cfg.loss.method, "config_hash": config_hash(cfg), "steps": step,
        "tokens": int(sum(r["tokens"] for r in rows)),
        "tokens_per_s": sum(r["input_tokens"] for r in run_rows) / max(loop_s, 1e-9),
        "steps_per_s": len(run_rows) / max(loop_s, 1e-9),
        "teacher_wait_fraction": wait / max(step_time, 1e-9),
        "final_loss": rows[-1]["loss"] if rows else None,
        "rouge": rouge, "transport": cfg.transport.kind, "num_workers": cfg.training.num_workers,
        "worker_restarts": restarts, "recoveries": list(recoveries or []), "step_time_fractions": fractions,
        "paths": dict(paths),
    }
    if teacher_stats is not None:
        report["teacher_stats"] = {k: v for k, v in teacher_stats.items() if k in ("tokens", "busy_s")}
    return report


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
    # deferred: matplotlib.pyplot costs ~1.5 s at import (measured); the driver's start-up imports this module
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
    """Write report.json, report.md and (when `plot`) loss_curve.png into out_dir; returns their paths.

    The paths are added to `report["paths"]` first, so report.json lists itself and its siblings too."""
    paths = {"report_json": out_dir / "report.json", "report_md": out_dir / "report.md"}
    if plot and metrics:
        paths["loss_curve"] = out_dir / "loss_curve.png"
    report.setdefault("paths", {}).update({k: str(v) for k, v in paths.items()})
    paths["report_json"].write_text(json.dumps(report, indent=1, sort_keys=True))
    md = [
        f"# deltakd run: {report.get('method')}",
        "",
        f"- config hash: `{report.get('config_hash')}`",
        f"- steps: {report.get('steps')}, tokens: {report.get('tokens')}",
        f"- tokens/s: {report.get('tokens_per_s', 0):.1f}, steps/s: {report.get('steps_per_s', 0):.3f}",
        f"- teacher wait fraction: {report.get('teacher_wait_fraction', 0):.3f}",
        "- step time: " + (", ".join(f"{k.removesuffix('_s')} {100 * v:.1f}%"
                                      for k, v in report.get("step_time_fractions", {}).items() if v > 0) or "-"),
        "",
        "```",
        rouge_table(report),
        "```",
    ]
    if "loss_curve" in paths:
        plot_losses(metrics, paths["loss_curve"])
        md += ["", "![loss curve](loss_curve.png)"]
    paths["report_md"].write_text("\n".join(md) + "\n")
    return paths
