"""benchmarks/gpu_run.sh, read as text (it runs only on the GPU machine): its most valuable parts (the
real-shape figures of gpu_check) come first, and the set-up's and their own limits fit inside the budget, so a
slow first start skips only the tests that come last; Ray's memory monitor is off for it; and the benchmarks'
private cluster sizes its object store from the memory available."""

from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = (ROOT / "benchmarks/gpu_run.sh").read_text()


def _parts() -> list[tuple[str, int]]:
    """(part, limit s) of every `want PART && run "..." LIMIT` line, in order."""
    return [(m.group(1), int(m.group(2))) for m in re.finditer(r'^want (\w+) && run "[^"]+" (\d+) ', SCRIPT, re.M)]


def test_real_shape_figures_run_first_and_fit_the_budget() -> None:
    parts = _parts()
    assert [p for p, _ in parts] == ["teacher", "loss_student", "rdt", "tests", "tests_ray"]
    setup = sum(int(m.group(1)) for m in re.finditer(r'^\s*run "(?:ray.cluster_resources|cuda_ipc probe)" (\d+) ',
                                                     SCRIPT, re.M))
    budget = int(re.search(r"BUDGET=\$\{DELTAKD_GPU_BUDGET_S:-(\d+)\}", SCRIPT).group(1))
    kept = 15  # the summary's share (`run` caps each part by what is left minus 15 s)
    assert setup + sum(limit for _, limit in parts[:4]) <= budget - kept
    default = re.search(r"PARTS=\$\{DELTAKD_GPU_PARTS:-([\w,]+)\}", SCRIPT).group(1).split(",")
    assert default == [p for p, _ in parts]


def test_memory_is_guarded(tmp_path: Path) -> None:
    assert "export RAY_memory_monitor_refresh_ms=0" in SCRIPT
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        from _common import default_object_store_bytes
    finally:
        sys.path.pop(0)
    gib = 2**30
    assert default_object_store_bytes(meminfo="/nonexistent") == 2 * gib  # unknown: the old fixed size
    tmp = tmp_path / "meminfo"
    tmp.write_text("MemTotal: 4194304 kB\nMemAvailable: 2097152 kB\n")  # 2 GiB available
    assert default_object_store_bytes(meminfo=str(tmp)) == gib // 2
    tmp.write_text("MemAvailable: 67108864 kB\n")  # 64 GiB: capped
    assert default_object_store_bytes(meminfo=str(tmp)) == 2 * gib
    tmp.write_text("MemAvailable: 262144 kB\n")  # 256 MiB: the floor
    assert default_object_store_bytes(meminfo=str(tmp)) == 256 * 2**20
