"""The "Performance" table: the latest figures in benchmarks/results/*.json against their targets.

    python benchmarks/summary.py            # print the markdown table
    python benchmarks/summary.py --write    # also replace the table in docs/PERFORMANCE.md (between markers)

Each row names the script, the figure, the target, the measured value, whether it is met, and the run
(git sha, smoke or full). Figures without a target in the issue (end to end, GPU throughput) are listed
with target "-".
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import REPO_ROOT, RESULTS_DIR, BenchError

__all__ = ["performance_rows", "performance_markdown", "main"]

DOC = REPO_ROOT / "docs" / "PERFORMANCE.md"
BEGIN, END = "<!-- figures:begin -->", "<!-- figures:end -->"
ORDER = ["bench_wire", "bench_overlap", "bench_transport", "bench_loss", "bench_e2e", "bench_on_policy",
         "bench_cache", "bench_vllm_convert", "bench_fsdp_memory", "gpu_check"]


def _fmt(x: Any) -> str:
    if x is None:
        return "not measured"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def _target_text(t: dict[str, Any]) -> str:
    thr = t["threshold"]
    if t["name"].endswith("ratio_to_dense"):
        return f"{t['op']} 1/{1 / thr:.0f}"
    return f"{t['op']} {_fmt(thr)}"


def _value_text(t: dict[str, Any]) -> str:
    v = t["value"]
    if v is not None and t["name"].endswith("ratio_to_dense"):
        return f"1/{1 / v:.0f}"
    return _fmt(v)


def _pair(d: dict[str, Any] | None, keys: tuple[str, ...]) -> str | None:
    """Several figures of one dict in one cell (None: not measured by that results file)."""
    return None if not d else ", ".join(_fmt(d.get(k)) for k in keys)


# Figures shown beside the targets: script -> list of (label, getter over the JSON's "figures").
_EXTRA: dict[str, list[tuple[str, Callable[[dict[str, Any]], Any]]]] = {
    "bench_wire": [("sparse k=64 fp32 / dense tokens/s through the object store",
                    lambda f: f["sparse_over_dense_tokens_per_s"]["sparse_k64_fp32"])],
    "bench_overlap": [("serial (prefetch 0) efficiency at T = S", lambda f: f["serial_efficiency_T1x"])],
    "bench_loss": [("step peak growth beyond the weights from the smaller to the larger V: logits, fused (MiB)",
                    lambda f: "{:.0f}, {:.0f}".format(*(f["step_growth_beyond_weights_bytes"][v] / 2**20
                                                       for v in ("step_logits", "step_fused")))),
                   ("step peak at the largest V, fused / logits",
                    lambda f: f["per_vocab"][max(f["per_vocab"], key=int)]["ratios"]["step_fused_over_logits_peak"])],
    "bench_transport": [("object store, driver ray.get / in-process (largest batch)",
                         lambda f: list(f["sizes"].values())[-1]["object_store_get"]["ratio_to_in_process"])],
    "bench_e2e": [("steps/s delta_kd / sft (whole loop)", lambda f: f["steps_per_s_ratio_kd_over_sft"]),
                  ("steps/s delta_kd / sft (steady state)", lambda f: f["steady_steps_per_s_ratio_kd_over_sft"]),
                  ("teacher wait fraction, delta_kd (steady state)",
                   lambda f: f["steady_teacher_wait_fraction_kd"])],
    "bench_on_policy": [("steps/s on-policy lag 0 / off-policy (delta_kd, whole loop)",
                         lambda f: f["steps_per_s_ratio_lag0_over_off"]),
                        ("steps/s on-policy lag 1 / off-policy (delta_kd, whole loop)",
                         lambda f: f["steps_per_s_ratio_lag1_over_off"]),
                        ("teacher wait fraction, off / lag 0 / lag 1 (steady state)",
                         lambda f: " / ".join(_fmt(f["steady_teacher_wait_fraction"][m])
                                              for m in ("off_policy", "lag0", "lag1")))],
    "bench_cache": [("cache build tokens/s / live pool tokens/s, same batches and teachers (fp32, q8d10)",
                     lambda f: _pair(f.get("pipeline", {}).get("build_over_live_pool_tokens_per_s"), ("fp32", "q8d10"))),
                    ("steps/s over sft (whole loop): delta_kd live, from the cache, from the cache with "
                     "student_base cached", lambda f: _pair(f.get("pipeline", {}).get("steps_per_s_over_sft"),
                                                            ("delta_kd_live", "delta_kd_cache", "delta_kd_cache_s0")))],
    "bench_fsdp_memory": [("fsdp2 / ddp, 2 ranks on CPU: peak RSS above start per rank; steps/s",
                           lambda f: f"{f['ratio_peak_rss_delta']:.3g}; {f['ratio_steps_per_s']:.3g}")],
    "gpu_check": [("device", lambda f: f["device"] + (" (scaled down)" if f["scaled_down"] else "")),
                  ("teacher top-k tokens/s / bare forward, per shape",
                   lambda f: ", ".join(f"{s} {v['topk_tokens_per_s_over_bare']:.3g}"
                                       for s, v in f["teacher"].items())),
                  ("teacher gather time / top-k time, per shape",
                   lambda f: ", ".join(f"{s} {v['gather_over_topk_time']:.3g}" for s, v in f["teacher"].items())),
                  ("student delta_kd step with the frozen copy / sft step",
                   lambda f: f["student"]["delta_kd_frozen_base_over_sft_time"]),
                  ("RDT transport of the record part", lambda f: f["rdt"].get("backend") or f["rdt"]["error"])],
}


def performance_rows(results_dir: Path = RESULTS_DIR) -> list[list[str]]:
    """[script, figure, target, measured, met, run] rows for every results file present."""
    rows = []
    for name in ORDER:
        path = results_dir / f"{name}.json"
        if not path.is_file():
            rows.append([name, "(no results yet)", "-", "-", "-", "-"])
            continue
        doc = json.loads(path.read_text())
        sha = (doc["git"].get("sha") or "no-git")[:8] + ("+dirty" if doc["git"].get("dirty") else "")
        kind = "smoke" if doc["smoke"] else "full"
        if doc["figures"].get("scaled_down"):
            kind = f"scaled down on {doc['figures'].get('device', '?')}"
        run = f"{sha}, {kind}"
        for t in doc["targets"]:
            met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
            rows.append([name, t["name"], _target_text(t), _value_text(t), met, run])
        for label, get in _EXTRA.get(name, []):
            try:
                value = get(doc["figures"])
            except (KeyError, TypeError, IndexError) as exc:
                raise BenchError(f"{path}: figure {label!r} missing ({exc!r}); rerun the script") from exc
            rows.append([name, label, "-", _fmt(value), "-", run])
    return rows


def performance_markdown(results_dir: Path = RESULTS_DIR) -> str:
    head = ["script", "figure", "target", "measured", "met", "run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in performance_rows(results_dir)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS_DIR)
    p.add_argument("--write", action="store_true", help=f"replace the table between the markers in {DOC}")
    args = p.parse_args(argv)
    table = performance_markdown(args.results)
    print(table)
    if args.write:
        text = DOC.read_text()
        if BEGIN not in text or END not in text:
            raise BenchError(f"{DOC} lacks the markers {BEGIN} / {END}")
        pre, rest = text.split(BEGIN, 1)
        _, post = rest.split(END, 1)
        DOC.write_text(f"{pre}{BEGIN}\n{table}\n{END}{post}")
        print(f"updated {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
