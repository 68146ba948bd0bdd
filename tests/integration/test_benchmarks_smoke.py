"""Smoke test of every benchmark script: `--smoke` writes valid JSON with the expected keys.

Timings are never asserted (they are noise on a shared CPU machine); what is checked: the script's
`main(argv)` returns 0, its JSON parses strictly (no NaN), carries provenance (git sha, machine), figures
with the keys the README table reads, targets whose `met` agrees with value/op/threshold, and the wire
sizes, which are exact arithmetic.

The smokes are one suite in this process: each test imports its script and calls its `main` with the
command line a user would type (`--smoke --out-dir D [--ray-address A] [--models-dir M]`), so the interpreter,
torch and Ray start once, not once per script. Scripts that use Ray get the session's cluster (`ray_session`
keeps a connection it finds), and the end-to-end smokes share one set of miniature embedded models
(`--models-dir`) and one teacher service serving them (`--teachers-namespace`: bench_e2e's delta_kd run,
bench_on_policy's three runs and bench_cache's live pool attach to it, so the teachers start once; those
smokes run last, so the service is up only while they run). Their in-process training runs also take their
student ranks from the session's `warm_ranks` (each script's `main(argv, warm=...)`), so the seven runs of
those three smokes start one rank process, not one each. Each script is still runnable on its own
(`python benchmarks/<script>.py --smoke`), starting its own teachers and ranks.
"""

from __future__ import annotations

import importlib
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BENCHMARKS = REPO / "benchmarks"

# script -> (uses Ray, dotted figure keys that must exist); the SHARED_MODELS ones last (the shared teachers)
SCRIPTS = {
    "bench_wire": (True, ["sizes", "throughput.sparse_k64_fp32.tokens_per_s.median",
                          "throughput.dense_bf16.tokens_per_s.median", "sparse_over_dense_tokens_per_s"]),
    "bench_loss": (False, ["per_vocab", "tokens", "k"]),
    "bench_transport": (True, ["sizes", "k"]),
    "bench_overlap": (True, ["student_step_s.median", "cells.pool_T1.0x_prefetch0.efficiency.median",
                             "cells.pool_T1.0x_prefetch2.efficiency.median",
                             "cells.pool_T1.0x_prefetch2.teacher_call_s.median",
                             "cells.standin_T1.0x_prefetch2.efficiency.median", "serial_efficiency_T1x.pool"]),
    "gpu_check": (True, ["teacher", "loss.time_ratio", "student.kd_over_sft_time", "rdt.ratio_to_in_process",
                         "scaled_down"]),
    "bench_fsdp_memory": (False, ["ddp.param_grad_optim_bytes", "fsdp2.param_grad_optim_bytes",
                                  "ratio_param_grad_optim_bytes", "fsdp2.steps_per_s"]),
    "bench_vllm_convert": (False, ["cells.flat_topk_all.seconds.median", "cells.dicts_include_half.seconds.median"]),
    "bench_lora_pair": (True, ["weight_bytes.pair", "weight_bytes.two_actors", "weight_bytes_ratio_pair_over_two",
                               "engine.tokens_per_s_ratio_pair_over_two.median",
                               "pool.tokens_per_s_ratio_pair_over_two.median", "pool.actors.pair"]),
    "bench_e2e": (True, ["runs.delta_kd", "runs.sft", "steps_per_s_ratio_kd_over_sft",
                         "teacher_wait_fraction_kd", "steady_step_parts_kd"]),
    "bench_on_policy": (True, ["runs.off_policy", "runs.lag0", "runs.lag1", "steps_per_s_ratio_lag0_over_off",
                               "steps_per_s_ratio_lag1_over_off", "steady_teacher_wait_fraction.lag1",
                               "steady_sample_fraction.lag0"]),
    "bench_cache": (True, ["encodings", "read", "batch_invariance", "pipeline.live_pool.tokens_per_s",
                           "pipeline.build.fp32.tokens_per_s", "pipeline.build.q8d10.file_bytes_per_token",
                           "pipeline.steps_per_s_over_sft.delta_kd_cache_s0",
                           "pipeline.steady_steps_per_s_over_sft.delta_kd_cache_s0", "pipeline.read_per_rank"]),
}
# the scripts whose smoke builds the miniature embedded models (tiny.yaml's, reduced): one set for all
SHARED_MODELS = {"bench_e2e", "bench_on_policy", "bench_cache"}


def _dig(doc: dict, dotted: str):
    node = doc
    parts = dotted.split(".")
    i = 0
    while i < len(parts):
        # keys may contain dots (e.g. "T1.0x_prefetch0"): take the longest prefix that is a key
        for j in range(len(parts), i, -1):
            key = ".".join(parts[i:j])
            if isinstance(node, dict) and key in node:
                node, i = node[key], j
                break
        else:
            raise KeyError(f"{dotted!r}: no key at {'.'.join(parts[i:])!r} (have {list(node)[:12]})")
    return node


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bench-models")


@pytest.fixture(scope="module")
def teachers_namespace(models_dir: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """One teacher service on the shared miniature models (bench_e2e.shared_teachers), for the SHARED_MODELS
    smokes; the first request builds the models."""
    request.getfixturevalue("ray_cluster")
    _main("bench_e2e")  # benchmarks/ on the path, its modules pickled by value
    from bench_e2e import SMOKE_SETS, TINY, shared_teachers

    from common.config import load_config
    from common.tiny_world.build import build_embedded_models

    sets = SMOKE_SETS + [f"embedded.cache_dir={models_dir}"]
    build_embedded_models(load_config(TINY, sets).embedded, progress=False)
    with shared_teachers(sets) as namespace:
        yield namespace


def _main(script: str):
    """The script's `main`, imported as `python benchmarks/<script>.py` would (benchmarks/ on the path).

    Ray workers cannot import benchmarks/ modules (the session's cluster started before they were on this
    process's path), so their remote classes and functions travel by value, as a script's `__main__` does.
    """
    from ray import cloudpickle

    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))  # appended: the scripts' module names never shadow anything else
    module = importlib.import_module(script)
    for name, mod in list(sys.modules.items()):  # the script and the benchmarks/ modules it imported
        if Path(getattr(mod, "__file__", None) or "/").parent == BENCHMARKS and name not in _BY_VALUE:
            cloudpickle.register_pickle_by_value(mod)
            _BY_VALUE.add(name)
    return module.main


_BY_VALUE: set[str] = set()


def _run(script: str, out_dir: Path, ray_address: str | None, models_dir: Path | None,
         teachers_namespace: str | None = None, warm: object | None = None) -> dict:
    argv = ["--smoke", "--out-dir", str(out_dir)]
    if ray_address:
        argv += ["--ray-address", ray_address]
    if models_dir:
        argv += ["--models-dir", str(models_dir)]
    if teachers_namespace:
        argv += ["--teachers-namespace", teachers_namespace]
    rc = _main(script)(argv, **({"warm": warm} if warm is not None else {}))
    assert rc == 0, f"{script} failed (rc {rc})"
    path = out_dir / f"{script}.json"
    assert path.is_file(), f"{script} wrote no {path}"

    def no_constants(name: str) -> None:
        raise ValueError(f"{path}: non-JSON constant {name}")

    return json.loads(path.read_text(), parse_constant=no_constants)


@pytest.mark.parametrize("script", list(SCRIPTS))
def test_benchmark_smoke_writes_json(script: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    uses_ray, keys = SCRIPTS[script]
    address = request.getfixturevalue("ray_cluster")["gcs_address"] if uses_ray else None
    shared = request.getfixturevalue("models_dir") if script in SHARED_MODELS else None
    namespace = request.getfixturevalue("teachers_namespace") if script in SHARED_MODELS else None
    warm = request.getfixturevalue("warm_ranks") if script in SHARED_MODELS else None
    doc = _run(script, tmp_path, address, shared, namespace, warm)

    assert doc["name"] == script and doc["smoke"] is True
    assert doc["git"].get("sha") is None or len(doc["git"]["sha"]) == 40
    assert doc["machine"]["cpu_count"] >= 1 and doc["machine"]["torch"]
    for key in keys:
        _dig(doc["figures"], key)
    for t in doc["targets"]:
        assert set(t) >= {"name", "value", "op", "threshold", "met"}, t
        if t["value"] is None:
            assert t["met"] is None, t
        else:
            assert math.isfinite(t["value"])
            assert t["met"] == (t["value"] <= t["threshold"] if t["op"] == "<=" else t["value"] >= t["threshold"]), t

    if script == "bench_lora_pair":  # one copy of the base: the pair holds base + adapter, two actors two bases
        w = doc["figures"]["weight_bytes"]
        assert w["pair"] == w["base"] + w["adapter"] and w["two_actors"] == 2 * w["base"] and w["adapter"] > 0
        assert doc["figures"]["pool"]["actors"] == {"pair": 1, "two": 2}

    if script == "bench_wire":
        # Exact arithmetic, per counted token: ids int32 k + row index int32 + per role (k log-probs + fp32 tail).
        sizes = {(r["roles"], r["wire_dtype"], r["k"]): r["bytes_per_token"] for r in doc["figures"]["sizes"]}
        assert sizes[(2, "float32", 64)] == 64 * 4 + 4 + 2 * (64 * 4 + 4) == 780
        assert sizes[(2, "bfloat16", 64)] == sizes[(2, "float16", 64)] == 64 * 4 + 4 + 2 * (64 * 2 + 4) == 524
        counted = doc["figures"]["counted_positions_embedded_default"]
        assert 0 < counted["counted_over_positions"] < counted["counted_over_attended"] < 1
        assert counted["rows_form_over_every_position"] < 0.5  # prompt and padding are most positions
        accuracy = {(r["method"], r["wire_dtype"]): r for r in doc["figures"]["accuracy_vs_fp32"]}
        for method in ("kd", "delta_kd"):  # both 16-bit wires are close to fp32; fp16 closer than bf16
            fp16, bf16 = accuracy[(method, "float16")], accuracy[(method, "bfloat16")]
            assert 0 < fp16["grad_rel_err"] < bf16["grad_rel_err"] < 0.05, (fp16, bf16)
        met = {t["name"]: t["met"] for t in doc["targets"]}
        assert met["k64_two_roles_bf16_wire_ratio_to_dense"] is True  # 524 / 304128 = 1/580 <= 1/400
        assert met["k64_two_roles_fp32_wire_ratio_to_dense"] is False  # 780 / 304128 = 1/390 > 1/400
    if script == "bench_e2e":
        for method in ("delta_kd", "sft"):
            run = doc["figures"]["runs"][method][0]
            assert run["steps"] == doc["figures"]["steps_per_run"]
            assert 0.0 <= run["teacher_wait_fraction"] <= 1.0
            assert sum(run["steady_step_parts"].values()) == pytest.approx(1.0)  # the parts add up to the step
    if script == "bench_cache":  # the build scores exactly the batches the live pool scored; compact is smaller
        pipe = doc["figures"]["pipeline"]
        assert {b["num_tokens"] for b in pipe["build"].values()} == {pipe["live_pool"]["tokens"]}
        assert pipe["build"]["q8d10"]["file_bytes_per_token"] < pipe["build"]["fp32"]["file_bytes_per_token"]
        assert pipe["train"]["delta_kd_cache_s0"]["source"] == "cache" and pipe["read_per_rank"][0]["batches"] == 4
    if script == "gpu_check":  # the toy scale on the CPU: the RDT part over gloo, the CPU twin of cuda_ipc
        assert doc["figures"]["scale"] == "toy" and doc["figures"]["rdt"]["backend"] == "gloo"
        assert doc["figures"]["rdt"]["receiver"]["rows"] == doc["figures"]["rdt"]["tokens"]
