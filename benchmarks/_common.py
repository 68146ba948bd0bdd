"""Shared harness for the benchmark scripts: provenance, repeats, targets, JSON out, a printed table.

Every `benchmarks/bench_<thing>.py` builds its figures with `time_repeats` / `summarize`, states each
target with `Target`, and ends with `write_result(...)`, which writes
`benchmarks/results/<name>.json` (or `--out-dir`) holding:

    {"name", "git": {"sha", "dirty"}, "machine": {...}, "args": {...}, "smoke": bool,
     "figures": {...}, "targets": [{"name", "value", "op", "threshold", "met", "note"}], "notes": [...],
     "created_unix": float}

Timings are absolute seconds on whatever machine ran them; on a shared CPU box only the ratios measured
in the same run mean anything, which is why every script reports ratios next to the raw numbers.

This module imports neither Ray nor transformers: `gpu_check.py` uses it on a machine that has no Ray.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "REPO_ROOT",
    "RESULTS_DIR",
    "BenchError",
    "Target",
    "base_parser",
    "git_info",
    "machine_info",
    "summarize",
    "time_repeats",
    "write_result",
    "print_table",
    "reset_peak_rss",
    "peak_rss_bytes",
    "current_rss_bytes",
    "add_ray_args",
    "ray_session",
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"

# Scripts run as `python benchmarks/bench_x.py`: sys.path[0] is benchmarks/, so the project's packages
# are importable only if installed. The GPU machine runs from a bare checkout, hence the repo root here.
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(1, str(REPO_ROOT))
# Progress bars and info logs from transformers/HF hub would bury the tables.
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class BenchError(RuntimeError):
    """A benchmark could not measure what it promises. The message names the figure and the cause."""


@dataclass
class Target:
    """One target from the issue: `value op threshold` (op is '<=' or '>=')."""

    name: str
    value: float | None
    op: str
    threshold: float
    note: str = ""
    met: bool | None = field(default=None)

    def __post_init__(self) -> None:
        if self.op not in ("<=", ">="):
            raise BenchError(f"target {self.name!r}: op must be '<=' or '>=', got {self.op!r}")
        if self.value is None or not math.isfinite(self.value):
            self.met = None  # not measured in this run (a dependency missing): neither met nor missed
        else:
            self.met = self.value <= self.threshold if self.op == "<=" else self.value >= self.threshold


def base_parser(description: str) -> argparse.ArgumentParser:
    """The options every script shares: --smoke, --repeats N, --out-dir D."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 repeat, seconds (for the smoke test)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (min/median/max)")
    p.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="where <name>.json is written")
    return p


def git_info() -> dict[str, Any]:
    """HEAD's sha and whether the tree differs from it: `dirty` = modified tracked files or untracked
    files outside benchmarks/results (read-only git commands)."""
    def run(*cmd: str) -> str:
        return subprocess.run(["git", *cmd], cwd=REPO_ROOT, capture_output=True, text=True,
                              check=True, timeout=30).stdout.strip()

    try:
        sha = run("rev-parse", "HEAD")
        dirty = bool(run("status", "--porcelain", "--untracked-files=no"))
        # Code not yet committed at all is invisible to `dirty`; count it (results files excepted).
        untracked = [line for line in run("status", "--porcelain", "--untracked-files=all").splitlines()
                     if line.startswith("??") and "benchmarks/results/" not in line]
    except (OSError, subprocess.SubprocessError) as exc:
        # A checkout copied without .git (the GPU machine may get one): say so rather than invent a sha.
        return {"sha": None, "dirty": None, "error": f"git unavailable in {REPO_ROOT}: {exc}"}
    return {"sha": sha, "dirty": dirty or bool(untracked), "modified_tracked": dirty,
            "untracked_files": len(untracked)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """CPU count and model, memory, Python/torch versions, the CUDA device when there is one."""
    info: dict[str, Any] = {
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "load_avg_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
    try:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        info["mem_total_gib"] = round(pages * page_size / 2**30, 1)
    except (ValueError, OSError):
        info["mem_total_gib"] = None
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except ImportError:
        info["torch"] = None
    if "ray" in sys.modules:  # report Ray's version only where the script uses it; never import it here
        info["ray"] = sys.modules["ray"].__version__
    return info


def summarize(values: Sequence[float]) -> dict[str, float | int]:
    """min / median / max / n of a list of measurements."""
    if not values:
        raise BenchError("summarize: no measurements")
    return {"min": min(values), "median": statistics.median(values), "max": max(values), "n": len(values)}


def time_repeats(fn: Callable[[], Any], repeats: int, warmup: int = 1,
                 sync: Callable[[], None] | None = None) -> list[float]:
    """Wall seconds of `fn()` over `repeats` timed calls after `warmup` untimed ones.

    sync: called before reading the clock (torch.cuda.synchronize on GPU), so queued work is counted.
    """
    if repeats < 1:
        raise BenchError(f"repeats must be >= 1, got {repeats}")
    for _ in range(warmup):
        fn()
    if sync:
        sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        times.append(time.perf_counter() - t0)
    return times


# -------------------------------------------------------------------------------- process memory (Linux)

def reset_peak_rss() -> None:
    """Reset this process's peak RSS (VmHWM) to its current RSS: Linux's /proc/self/clear_refs '5'."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError as exc:
        raise BenchError(f"cannot reset peak RSS via /proc/self/clear_refs: {exc}") from exc


def _status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise BenchError(f"/proc/self/status has no {key} line")


def peak_rss_bytes() -> int:
    """Peak resident set size since the last `reset_peak_rss()` (VmHWM)."""
    return _status_kib("VmHWM") * 1024


def current_rss_bytes() -> int:
    return _status_kib("VmRSS") * 1024


# -------------------------------------------------------------------------------- output

def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN/inf; None reads as "not measured"
    if hasattr(x, "item") and callable(x.item):  # numpy / torch scalars
        return _jsonable(x.item())
    return x


def write_result(name: str, args: argparse.Namespace, figures: dict[str, Any], targets: list[Target],
                 notes: list[str] | None = None) -> Path:
    """Write `<args.out_dir>/<name>.json` and print the targets table. Returns the path."""
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "name": name,
        "git": git_info(),
        "machine": machine_info(),
        "args": {k: v for k, v in vars(args).items()},
        "smoke": bool(getattr(args, "smoke", False)),
        "figures": figures,
        "targets": [asdict(t) for t in targets],
        "notes": notes or [],
        "created_unix": time.time(),
    }
    path = out_dir / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n")
    os.replace(tmp, path)  # atomic: a reader never sees half a file
    if targets:
        print_table(["target", "value", "op", "threshold", "met"],
                    [[t.name, t.value, t.op, t.threshold, t.met] for t in targets], title=f"{name}: targets")
    print(f"wrote {path}")
    return path


def _cell(x: Any) -> str:
    if isinstance(x, float):
        if x == 0 or 1e-3 <= abs(x) < 1e6:
            return f"{x:.4g}"
        return f"{x:.3e}"
    return "-" if x is None else str(x)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
    """A plain fixed-width table on stdout."""
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    if title:
        print(f"\n== {title}")
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    sys.stdout.flush()


# -------------------------------------------------------------------------------- Ray (imported lazily)

def add_ray_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ray-address", default=None,
                   help="attach to a running cluster (e.g. the test session's GCS address); "
                        "default: start a private local one and shut it down at the end")


def default_object_store_bytes(cap: int = 2 * 2**30, share: float = 0.25, meminfo: str = "/proc/meminfo") -> int:
    """The object store a private cluster asks for: `share` of the memory available now, at most `cap` (at
    least 256 MiB). A fixed 2 GiB on a machine whose memory starts small is most of it."""
    try:
        with open(meminfo) as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        available = int(fields["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return cap
    return max(256 * 2**20, min(cap, int(available * share)))


@contextmanager
def ray_session(address: str | None, num_cpus: int = 8, object_store_bytes: int | None = None) -> Iterator[Any]:
    """A Ray connection for one script: attach to `address`, or start a private local cluster (its object
    store `object_store_bytes`, default `default_object_store_bytes()`).

    A caller already connected (the smoke suite, tests/integration/test_benchmarks_smoke.py, runs the
    scripts' mains in its own process) keeps its connection: it is used as is and left open.
    Never `ray stop`: a private cluster is ended with ray.shutdown(), which touches no one else's.
    """
    import shutil
    import tempfile

    import ray

    if ray.is_initialized():
        yield ray
        return
    temp_dir = None
    if address:
        ray.init(address=address, logging_level="ERROR", log_to_driver=False)
    else:
        temp_dir = tempfile.mkdtemp(prefix="dkb-", dir="/tmp")  # short: Ray's socket paths have a limit
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _temp_dir=temp_dir,
                 object_store_memory=object_store_bytes or default_object_store_bytes(), logging_level="ERROR",
                 log_to_driver=False)
    try:
        yield ray
    finally:
        ray.shutdown()
        if temp_dir:
            shutil.rmtree(temp_dir, ignore_errors=True)
