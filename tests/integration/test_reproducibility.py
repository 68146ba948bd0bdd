"""common/reproducibility.py: what a process computes with after `apply_compute_settings`.

The kernel-set pin is process-wide and fixed at torch's first dispatched operation, so those cases run in
fresh interpreters (a few seconds each on a quiet machine: torch's import) and sit with the integration
tests. No Ray."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from common.reproducibility import PINNED_ENV, compute_info, cpu_has_avx2

_PROBE = textwrap.dedent("""
    import json, os, sys, warnings
    warnings.simplefilter("always")
    import torch
    if sys.argv[1] == "late":
        torch.randn(64)  # something computes before the settings: the pin cannot take effect any more
    from common.reproducibility import apply_compute_settings
    with warnings.catch_warnings(record=True) as caught:
        info = apply_compute_settings(json.loads(sys.argv[2]), where="probe")
    print(json.dumps({"info": info, "warnings": [str(w.message) for w in caught]}))
""")


def _probe(when: str, settings: dict, env: dict[str, str]) -> dict:
    import os

    out = subprocess.run([sys.executable, "-c", _PROBE, when, json.dumps(settings)], capture_output=True, text=True,
                         env={**os.environ, **env}, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not cpu_has_avx2(), reason="the AVX2 pin applies to x86-64 CPUs with AVX2 only")
def test_avx2_pin_overrides_another_kernel_set_and_fixes_threads() -> None:
    # ATEN_CPU_CAPABILITY=default stands in for "another CPU's kernels": the pin replaces it.
    got = _probe("first", {"torch_threads": 1, "cpu_isa": "avx2"}, {"ATEN_CPU_CAPABILITY": "default",
                                                                     "OMP_NUM_THREADS": "2"})
    info = got["info"]
    assert info["cpu_capability"] == "AVX2" and info["torch_threads"] == 1 and not got["warnings"]
    assert {k: info[k] for k in PINNED_ENV} == PINNED_ENV
    # "native" leaves the environment's choice alone.
    native = _probe("first", {"torch_threads": 2, "cpu_isa": "native"}, {"ATEN_CPU_CAPABILITY": "default"})["info"]
    assert native["cpu_capability"] == "DEFAULT" and native["torch_threads"] == 2


@pytest.mark.skipif(not cpu_has_avx2(), reason="the AVX2 pin applies to x86-64 CPUs with AVX2 only")
def test_a_pin_that_comes_too_late_says_so() -> None:
    got = _probe("late", {"cpu_isa": "avx2"}, {"ATEN_CPU_CAPABILITY": "default"})
    assert got["info"]["cpu_capability"] == "DEFAULT"
    assert len(got["warnings"]) == 1 and "probe: reproducibility.cpu_isa=avx2 could not take effect" in got["warnings"][0]


def test_compute_info_reports_versions_and_threads() -> None:
    import torch

    info = compute_info()
    assert info["torch"] == torch.__version__ and info["torch_threads"] == torch.get_num_threads()
    assert {"cpu_capability", "machine", "deterministic", "transformers", *PINNED_ENV} <= set(info)
