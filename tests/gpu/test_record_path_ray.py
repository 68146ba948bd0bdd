"""The tiny run end to end on one GPU through Ray: both teachers and one student worker share the GPU
(fractional `num_gpus`); the teachers' records reach the worker over Ray Direct Transport `cuda_ipc`, and
the same run over the object store must give the same metrics rows. Every Ray worker process of this
module runs with tests/gpu/host_guard.py installed, so the test sees what reached the worker
(`targets_from_parts`' arguments: CUDA tensors) and every host copy or numpy conversion on the record
path (none allowed).

Dry run (no CUDA, DELTAKD_GPU_DRYRUN=1): the same two runs on the CPU, with `gloo` as the RDT transport
(its CPU twin: the driver then creates the collective group that cuda_ipc does not need).

Needs Ray: on the GPU machine it comes from the device bundle (benchmarks/gpu_run.sh).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

ray = pytest.importorskip("ray", reason="needs Ray (on the GPU machine: the device bundle)")

from tests.integration.numpy_guard import LOG_ENV  # noqa: E402
from tests.integration.test_student_training import comparable, make_cfg, read_rows, tiny_setup  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
GPU_SHARE = 0.3  # two teachers and one worker on one GPU
# Functions of the RDT record path, teacher top-k to loss: no host copy or numpy conversion under them.
RECORD_PATH = {"topk", "support", "gather", "_topk", "_gather", "_for_transport", "train_step", "receive_targets",
               "targets_from_parts", "logged_targets_from_parts", "distillation_loss"}
# The two runs may differ only where CUDA's backward kernels sum in another order (atomics in the
# attention and scatter backward): an fp32 master weight one ulp apart can round to another bf16 value
# under autocast (2^-8 relative) and later steps compound it. Step 0's forward-only figures (loss and
# its parts, before any weight moved) must be equal bit for bit: the teachers' records are bit-identical
# on both paths (fp32 wire) and the forward is deterministic.
METRIC_RTOL = 1e-3
FORWARD_KEYS = ("loss", "ce", "distill", "target_entropy")
PROJECT_FUNCTIONS = RECORD_PATH | {"to_numpy_wire", "warm_up", "save_checkpoint", "write_rng_state", "setup",
                                   "load_checkpoint", "_step", "health"}


@pytest.fixture(scope="module")
def guarded_ray(device: torch.device) -> Iterator[Path]:
    """A private local Ray cluster (this module only) whose worker processes install host_guard; yields
    the guard's log file."""
    if ray.is_initialized():
        pytest.skip("another Ray session is up in this process (run tests/gpu on its own)")
    temp_dir = tempfile.mkdtemp(prefix="dkg-", dir="/tmp")  # short: Ray's socket paths have a limit
    guard = Path(temp_dir) / "guard"
    guard.mkdir()
    (guard / "sitecustomize.py").write_text("from tests.gpu.host_guard import install\ninstall()\n")
    log = Path(temp_dir) / "host_guard.jsonl"
    path = os.pathsep.join(p for p in [str(guard), str(ROOT), os.environ.get("PYTHONPATH", "")] if p)
    ray.init(address="local", num_cpus=8, num_gpus=1 if device.type == "cuda" else 0, include_dashboard=False,
             _temp_dir=temp_dir, logging_level="ERROR", log_to_driver=os.environ.get("DELTAKD_TEST_RAY_LOGS") == "1",
             runtime_env={"env_vars": {"PYTHONPATH": path, LOG_ENV: str(log)}})
    try:
        print("ray.cluster_resources():", ray.cluster_resources())
        yield log
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run(paths: dict[str, Path], out: Path, log: Path, overrides: list[str]) -> tuple[list[dict[str, Any]],
                                                                                    list[dict[str, Any]]]:
    """One training run; returns its metrics rows and the guard's log lines written during it."""
    from student_worker.driver import run_training

    start = log.stat().st_size if log.exists() else 0
    run_training(make_cfg(paths, out, overrides), progress=False)
    with open(log) as fh:
        fh.seek(start)
        calls = [json.loads(line) for line in fh.read().splitlines()]
    return read_rows(out), calls


def _same(a: Any, b: Any, step: int, key: str) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if step == 0 and key in FORWARD_KEYS:
            return a == b
        return math.isclose(a, b, rel_tol=METRIC_RTOL, abs_tol=1e-9)
    return a == b


def test_tiny_run_over_cuda_ipc_keeps_records_on_the_gpu_and_matches_the_object_store(
        guarded_ray: Path, device: torch.device, tmp_path_factory: pytest.TempPathFactory, fact) -> None:
    log = guarded_ray
    cuda = device.type == "cuda"
    paths = tiny_setup(tmp_path_factory.mktemp("e2e-gpu"))
    common = ["training.num_workers=1", "training.batch_size=4", "training.max_steps=6",
              "training.checkpoint_every=3", "loss.method=delta_kd", "loss.k=16"]
    if cuda:
        common += [f"teachers.num_gpus={GPU_SHARE}", f"training.num_gpus_per_worker={GPU_SHARE}"]
    backend = "cuda_ipc" if cuda else "gloo"
    rdt_rows, rdt_calls = _run(paths, tmp_path_factory.mktemp("rdt") / "run", log,
                               [*common, "transport.kind=rdt", f"transport.rdt_backend={backend}"])
    os_rows, os_calls = _run(paths, tmp_path_factory.mktemp("os") / "run", log,
                             [*common, "transport.kind=object_store"])

    # what reached the worker: the teachers' tensors, on the GPU, one record per step
    arrivals = [c for c in rdt_calls if c["call"] == "targets_from_parts"]
    assert len(arrivals) == 6, arrivals
    want = "cuda" if cuda else "cpu"
    assert all(d == want for c in arrivals for part in c["devices"] for d in part), arrivals
    assert all(c["types"] == ["Tensor"] for c in arrivals), arrivals
    # no host copy and no numpy conversion anywhere on the record path
    on_path = [c for c in rdt_calls if c["call"] != "targets_from_parts" and RECORD_PATH & set(c["stack"])]
    assert not on_path, f"host copies / numpy conversions on the RDT record path: {on_path[:5]}"
    # the guard is live in the teachers: the object-store run converts at the actors' edge, and it is seen
    edge = [c for c in os_calls if "to_numpy_wire" in c.get("stack", [])]
    assert edge, "the guard saw no numpy conversion in the object-store run: it is not installed"
    assert not [c for c in os_calls if c["call"] == "targets_from_parts"]

    # the same training either way
    a, b = comparable(rdt_rows), comparable(os_rows)
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(6))
    assert [set(r) for r in a] == [set(r) for r in b]
    bitwise = a == b
    worst = max((abs(x[k] - y[k]) / max(abs(y[k]), 1e-12) for x, y in zip(a, b) for k in x
                 if isinstance(x[k], float) and isinstance(y[k], float)), default=0.0)
    # every host copy of the RDT run, by the innermost project function above it (for the log: the
    # warm-up's object-store call and checkpoint saves are expected there, the record path is not)
    copies = Counter(next((f for f in reversed(c["stack"]) if f in PROJECT_FUNCTIONS), "other")
                     for c in rdt_calls if c["call"] == "host_copy")
    fact("rdt_vs_object_store_metrics", backend=backend, rows_bitwise_equal=bitwise, max_rel_diff=worst,
         host_copies_on_record_path=len(on_path), arrivals=len(arrivals), host_copies_elsewhere=dict(copies))
    bad = [(r["step"], k, r[k], s[k]) for r, s in zip(a, b) for k in r if not _same(r[k], s[k], r["step"], k)]
    assert not bad, f"metrics differ between RDT ({backend}) and the object store: {bad[:8]}"
