"""Compute settings that every process of a run applies before its first tensor operation, so the same
config computes the same bits on another x86-64 machine (`reproducibility:` in the run config).

Why each setting (measured on this project's 2-core AMD EPYC VM, torch 2.13 CPU; docs/EXPERIMENT.md):
- Threads. torch picks its intra-op thread count from the machine (cores, OMP_NUM_THREADS); Ray sets
  OMP_NUM_THREADS=1 in its workers only when the variable is unset in the environment Ray starts from.
  A fixed count removes the machine from that choice.
- CPU kernels. torch dispatches its vectorised kernels by the CPU's widest instruction set (AVX2 here,
  AVX-512 on most recent Xeons and on AMD Zen 4): even `normal_` (weight initialisation) returns other
  bits with another kernel (`ATEN_CPU_CAPABILITY=default` here changed a freshly initialised Llama's
  weights). `ATEN_CPU_CAPABILITY=avx2` pins the AVX2 kernels; it is read at the first dispatched
  operation, so setting it in-process works as long as nothing ran before.
- MKL. torch's CPU matmuls go to MKL, which picks its own code path per CPU; `MKL_CBWR=AVX2` (Intel's
  conditional numerical reproducibility) fixes the AVX2 path. Here it gives the same bits as MKL's
  default (which is already AVX2 on this CPU); `MKL_CBWR=COMPATIBLE` gave other bits.

`apply_compute_settings(cfg)` returns `compute_info()`: what the process actually runs with, which the
embedded build records in its marker (compare two machines' markers to see why numbers differ).
Pure: stdlib, torch and the config schema only.
"""

from __future__ import annotations

import os
import platform
import warnings
from importlib import metadata
from typing import Any

import torch

__all__ = ["PINNED_ENV", "apply_compute_settings", "compute_info", "cpu_has_avx2"]

# The environment a pinned x86-64 process computes with.
PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}


def cpu_has_avx2() -> bool:
    """True on an x86-64 CPU with AVX2 and FMA (what torch's AVX2 kernels need), from /proc/cpuinfo."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def _setting(cfg: Any, key: str, default: Any) -> Any:
    if cfg is None:
        return default
    if isinstance(cfg, dict):
        return cfg.get(key, default)
    return getattr(cfg, key, default)


def apply_compute_settings(cfg: Any, where: str = "this process") -> dict[str, Any]:
    """Apply a ReproducibilityConfig (or its dict; None: the schema defaults) to this process.

    cpu_isa "avx2" sets PINNED_ENV on x86-64 CPUs with AVX2 (elsewhere it does nothing: other CPUs have
    other kernels, and a CPU without AVX2 cannot run them); torch_threads sets torch.set_num_threads;
    deterministic turns on torch.use_deterministic_algorithms(warn_only=True). If torch had already
    dispatched a kernel with another instruction set (something computed before this call), the pin
    cannot take effect: a RuntimeWarning names `where` and the instruction set in use."""
    isa = _setting(cfg, "cpu_isa", "avx2")
    threads = _setting(cfg, "torch_threads", 1)
    deterministic = _setting(cfg, "deterministic", False)
    pin = isa == "avx2" and cpu_has_avx2()
    if pin:
        os.environ.update(PINNED_ENV)
    if threads is not None:
        torch.set_num_threads(int(threads))
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # cuBLAS needs it for deterministic mode
        torch.use_deterministic_algorithms(True, warn_only=True)
    info = compute_info()
    if pin and info["cpu_capability"] != "AVX2":
        warnings.warn(f"{where}: reproducibility.cpu_isa=avx2 could not take effect (torch already runs its "
                      f"{info['cpu_capability']} kernels: something computed before the settings were applied); "
                      "results may differ from other machines'", RuntimeWarning, stacklevel=2)
    return info


def compute_info() -> dict[str, Any]:
    """What this process computes with: torch threads and kernel set, the pinning variables, versions."""
    info: dict[str, Any] = {
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": platform.machine(),
        "deterministic": torch.are_deterministic_algorithms_enabled(),
    }
    for key in (*PINNED_ENV, "OMP_NUM_THREADS"):
        info[key] = os.environ.get(key)
    for package in ("transformers", "numpy"):
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    return info
