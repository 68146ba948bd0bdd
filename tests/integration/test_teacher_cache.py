"""Teach once, distil many (issue 14 part two) on tiny models in the session's Ray cluster.

One module: a shared teacher service (the live runs attach to it), ONE live reference run of 6 steps (2 epochs
of 3 steps, 2 ranks x 4 examples, 24 examples in 6 shards of 4) to compare with, and two fp32 caches of it:
`auto`'s (written through by a run) and the Ray Data pipeline's (a build that survived two kills, below):
- a run from the pipeline's fp32 cache gives the live run's metrics rows bit for bit over epoch 0 (the batches
  the build replayed) and starts no teacher; epoch 1 is checked within 1e-5 (measured equal here);
- `auto` writes epoch 0 through (the same shard bytes as the pipeline build), then reads the cache; a later
  auto run starts no teacher;
- a compact (q8d10) cache with a student base added serves two students of different sizes; its rows are
  within the stated tolerance of the live run's;
- bad caches are refused before training (mismatch, missing role, missing shard, no cache, another unfinished
  build); a corrupted shard stops the run at the step that needs it, naming it, after a checkpoint; resumed
  from it with `teachers.cache.on_error: live` (the batch recomputed by the running service), the run ends
  with the live run's rows (epoch 0 bit for bit: the cache cursor resumes exactly);
- the build survives its Ray Data worker killed mid-build and its driver (a CLI subprocess) SIGKILLed:
  the rerun resumes and the contents equal, byte for byte, the cache `auto` wrote through with live teachers
  (the build is not run a third time uninterrupted: the run from this cache reproducing the live run's rows
  bit for bit, and its bytes equalling auto's, are the checks that it holds what an uninterrupted build holds).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.config import RunConfig, dump_config
from common.faults import FaultPlan
from tests.integration.test_student_training import (
    comparable,
    make_cfg,
    read_rows,
)
from tests.tiny import make_llama

REPO = Path(__file__).resolve().parents[2]
STEPS, STEPS_PER_EPOCH = 6, 3  # 24 examples, global batch 8
SHARDS = 6  # of 4 examples: one scoring batch (per-rank batch 4) each
RUN = [f"training.max_steps={STEPS}", "training.checkpoint_every=2", "data.max_train_examples=24",
       "teachers.cache.shard_size=4", "output.plot=false"]
FP32 = ["teachers.cache.encoding=fp32"]
pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def tiny(tiny_world, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    # the session's tiny world (tests/integration/conftest.py) and a second student of another size with the
    # same tokenizer
    big = make_llama(root / "student_big", tiny_world["tokenizer"], seed=4, hidden_size=24, num_layers=3,
                     num_heads=2, intermediate_size=48)
    return {**tiny_world, "student_big": big}


@pytest.fixture(scope="module")
def service(session_teachers):
    return session_teachers.ensure()  # the session's teacher service (tests/integration/session_teachers.py)


def cfg_for(tiny: dict[str, Path], service: tuple[str, list[str]], out: Path, extra: list[str] | None = None,
            attach: bool = True) -> RunConfig:
    tag, attach_overrides = service
    return make_cfg(tiny, out, RUN + (attach_overrides if attach else []) + (extra or []), tag=tag)


def shard_bytes(root: Path) -> dict[str, bytes]:
    return {n: (root / "shards" / n).read_bytes() for n in sorted(os.listdir(root / "shards"))}


@pytest.fixture(scope="module")
def reference(ray_cluster, tiny, service, warm_ranks, tmp_path_factory) -> dict[str, Any]:
    """The live run's rows, and the `auto` run beside it: it writes epoch 0 through to an fp32 cache, then reads
    that cache (test_auto_writes_epoch_zero_through_then_reads_the_cache checks it; the bad-cache test copies
    its cache)."""
    from student_worker.driver import run_training

    root = tmp_path_factory.mktemp("ref")
    run_training(cfg_for(tiny, service, root / "live", FP32), progress=False, warm=warm_ranks)
    uri = root / "auto_cache"
    auto = run_training(cfg_for(tiny, service, root / "auto", FP32 + ["teachers.source=auto",
                                                                      f"teachers.cache.uri={uri}"]), progress=False,
                        warm=warm_ranks)
    return {"rows": comparable(read_rows(root / "live")), "root": root, "auto": {
        "cache": uri, "report": auto, "rows": comparable(read_rows(root / "auto"))}}


@pytest.fixture
def no_teachers(monkeypatch):
    """Fail the test if the run starts or attaches to any teacher."""
    from teacher_service import TeacherPool

    def refuse(*args, **kwargs):
        raise AssertionError("a run served by the cache started or attached to teachers")

    monkeypatch.setattr(TeacherPool, "start", classmethod(refuse))
    monkeypatch.setattr(TeacherPool, "attach", classmethod(refuse))


def cached(uri: Path) -> list[str]:
    return ["teachers.source=cache", f"teachers.cache.uri={uri}"]


def assert_rows(got: list[dict[str, Any]], want: list[dict[str, Any]], rel: float) -> None:
    """Epoch 0 bit for bit; later epochs (batched differently from the build) within `rel` on the loss."""
    assert got[:STEPS_PER_EPOCH] == want[:STEPS_PER_EPOCH]
    for g, w in zip(got[STEPS_PER_EPOCH:], want[STEPS_PER_EPOCH:]):
        assert g["batch_ids"] == w["batch_ids"] and g["loss"] == pytest.approx(w["loss"], rel=rel)


def test_run_from_the_cache_reproduces_the_live_run_without_teachers(tiny, service, reference, built, no_teachers,
                                                                   tmp_path, warm_ranks):
    from student_worker.driver import run_training

    # the pipeline's cache (the build of test_a_build_survives_a_killed_worker_and_a_killed_driver)
    report = run_training(cfg_for(tiny, service, tmp_path / "run", FP32 + cached(built["cache"])), progress=False, warm=warm_ranks)
    assert_rows(comparable(read_rows(tmp_path / "run")), reference["rows"], rel=1e-5)
    src = report["record_source"]
    assert src["source"] == "cache" and src["encoding"] == "fp32"
    assert sum(f["batches"] for f in src["feeders"]) == 2 * STEPS and all(f["shards_read"] for f in src["feeders"])


def test_auto_writes_epoch_zero_through_then_reads_the_cache(tiny, service, reference, built, tmp_path, monkeypatch,
        warm_ranks):
    from student_worker.driver import run_training

    auto = reference["auto"]  # the run beside the live one (the `reference` fixture)
    uri = auto["cache"]
    src = auto["report"]["record_source"]
    assert src["reading_cache"] and src["last_live_step"] == STEPS_PER_EPOCH - 1, src
    assert_rows(auto["rows"], reference["rows"], rel=1e-5)
    assert shard_bytes(uri) == shard_bytes(built["cache"])  # what `cache build` writes, byte for byte
    # a later run: the cache is complete, so no teacher is needed at all
    from teacher_service import TeacherPool

    monkeypatch.setattr(TeacherPool, "attach", classmethod(lambda *a, **k: pytest.fail("attached to teachers")))
    report = run_training(cfg_for(tiny, service, tmp_path / "b", FP32 + ["teachers.source=auto", f"teachers.cache.uri={uri}",
                                                                        "training.max_steps=2",
                                                                        "training.num_workers=1"]), progress=False, warm=warm_ranks)
    assert report["record_source"]["source"] == "cache"


def test_a_compact_cache_serves_two_students_of_different_sizes(tiny, service, reference, tmp_path,
        warm_ranks):
    """q8d10 (the default encoding) with the small student's base added: its delta_kd run reads lp_S0 from the
    cache (no frozen copy) and stays within the stated tolerance of the live fp32 run; the bigger student
    trains from the same cache with its own frozen base."""
    from student_worker.driver import Driver, InputError, run_training
    from teacher_service.cache.build import add_role, build_cache

    uri = tmp_path / "q8"
    build_cache(cfg_for(tiny, service, tmp_path / "build"), str(uri), progress=False, say=lambda _: None)
    manifest, stats = add_role(cfg_for(tiny, service, tmp_path / "build"), str(uri), progress=False,
                               say=lambda _: None)
    assert [a.role for a in manifest.added_roles] == ["student_base"] and stats["shards_written"] == SHARDS
    small = cfg_for(tiny, service, tmp_path / "small", cached(uri) + ["teachers.student_base_source=cache"])
    run_training(small, progress=False, warm=warm_ranks)
    got, want = comparable(read_rows(tmp_path / "small")), reference["rows"]
    assert len(got) == len(want) == STEPS
    for g, w in zip(got, want):  # q8d10 teachers and lp_S0 against live fp32 teachers and the frozen copy
        assert g["batch_ids"] == w["batch_ids"] and g["loss"] == pytest.approx(w["loss"], rel=2e-3)
    # one worker, batches of 8: the cache serves a run batched unlike its build (epoch 1 of the others does too)
    big = [f"models.student.path={tiny['student_big']}", "training.max_steps=3", "training.num_workers=1"]
    report = run_training(cfg_for(tiny, service, tmp_path / "big", cached(uri) + big), progress=False, warm=warm_ranks)
    rows = read_rows(tmp_path / "big")
    assert len(rows) == 3 and all(np.isfinite(r["loss"]) for r in rows) and report["record_source"]["source"] == "cache"
    with pytest.raises(InputError, match=r"lacks role\(s\) \['student_base'\].*other models"):
        Driver(cfg_for(tiny, service, tmp_path / "big2", cached(uri) + big + ["teachers.student_base_source=cache"]),
               progress=False).preflight()


def test_bad_caches_are_refused_before_any_training_step(tiny, service, reference, tmp_path, warm_ranks):
    from student_worker.driver import Driver, InputError, TrainingRunError, run_training

    def preflight(out: str, extra: list[str]) -> str:
        with pytest.raises(InputError) as err:
            Driver(cfg_for(tiny, service, tmp_path / out, extra), progress=False).preflight()
        assert not (tmp_path / out).exists()  # nothing written
        return str(err.value)

    uri = reference["auto"]["cache"]
    assert "k: cache 16, run 8" in preflight("k", cached(uri) + ["loss.k=8"])
    msg = preflight("data", cached(uri) + ["data.max_train_examples=20"])
    assert "data.examples_sha256" in msg and "data.num_examples: cache 24, run 20" in msg
    assert "roles.sft.path" in preflight("models", cached(uri) + [f"models.sft_teacher.path={tiny['base_teacher']}"])
    assert "no teacher cache" in preflight("none", cached(tmp_path / "nothing"))
    assert "lacks role(s) ['student_base']" in preflight("s0", cached(uri) + ["teachers.student_base_source=cache"])
    other = tmp_path / "other"  # an unfinished build for other settings: auto would not continue it
    shutil.copytree(uri, other)
    (other / "manifest.json").unlink()
    msg = preflight("auto", ["teachers.source=auto", f"teachers.cache.uri={other}", "teachers.cache.encoding=q8"])
    assert "encoding: cache 'fp32', build 'q8'" in msg and "would continue this unfinished build" in msg
    broken = tmp_path / "broken"
    shutil.copytree(uri, broken)
    (broken / "shards" / "shard-00004.parquet").unlink()
    assert "shard-00004.parquet (build order positions 16..19)" in preflight("missing", cached(broken))
    # a corrupted shard: the run trains the steps before it, then stops at the step that needs it
    shutil.copytree(uri, broken, dirs_exist_ok=True)
    path = broken / "shards" / "shard-00004.parquet"  # rank 0's batch of step 2 (global batch 8, shards of 4)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(TrainingRunError, match=r"step 2 failed.*shard-00004.parquet \(build order positions 16..19\)"
                                               r" is corrupted"):
        run_training(cfg_for(tiny, service, tmp_path / "corrupt", FP32 + cached(broken)), progress=False, warm=warm_ranks)
    assert [r["step"] for r in read_rows(tmp_path / "corrupt")] == [0, 1]
    assert (tmp_path / "corrupt" / "checkpoints" / "ckpt-000002").is_dir()
    # resumed from that checkpoint with the batches of the bad shard recomputed live by the running teacher
    # service: the cache cursor follows the batch plan, so the run ends with the live run's rows
    report = run_training(cfg_for(tiny, service, tmp_path / "corrupt", FP32 + cached(broken) +
                                  ["teachers.cache.on_error=live"]), resume=True, progress=False, warm=warm_ranks)
    rows = read_rows(tmp_path / "corrupt")
    assert [r["step"] for r in rows] == list(range(STEPS))
    assert_rows(comparable(rows), reference["rows"], rel=1e-5)
    assert sum(f["recomputed_live"] for f in report["record_source"]["feeders"]) >= 2


def _sidecars(root: Path) -> int:
    folder = root / "shard_meta"
    return len([n for n in os.listdir(folder) if n.endswith(".json") and not n.startswith(".")]) if folder.is_dir() else 0


def _wait(cond: Any, what: str, timeout: float = 240.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


@pytest.fixture(scope="module")
def built(tiny, service, ray_cluster, tmp_path_factory) -> dict[str, Any]:
    """The fp32 cache built by the Ray Data pipeline, through two kills: its driver (a CLI subprocess) SIGKILLed
    with two shards written and its top-k stage held after scoring them, then the resumed build's top-k worker
    SIGKILLed while held after its first shard, that shard written (FaultPlan.stage_hold_after: the build runs
    at full speed, and each kill lands where it should, whatever order Ray Data hands the shards over in). Records what the test below asserts; the run-from-cache and auto tests read the
    cache it leaves."""
    import ray._private.state as ray_state  # the GCS actor table (pids); the state API needs the dashboard

    from teacher_service.cache.build import build_cache

    root = tmp_path_factory.mktemp("built")
    cfg = cfg_for(tiny, service, root / "b", FP32)
    first = FaultPlan(stage_hold_after=2, hold_dir=str(root / "holds-cli"))
    second = FaultPlan(stage_hold_after=1, hold_dir=str(root / "holds-resumed"))
    for plan in (first, second):
        Path(plan.hold_dir).mkdir()
    uri = root / "c"
    config_path = root / "build.yaml"
    dump_config(cfg, config_path)
    got: dict[str, Any] = {"cache": uri}
    proc = subprocess.Popen([sys.executable, "-m", "tests.integration.fault_run", "--faults", first.to_json(),
                             "cache", "build", "--config", str(config_path), "--out", str(uri),
                             "--address", ray_cluster["gcs_address"], "--no-progress"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait(lambda: (first.stage_held() and _sidecars(uri) >= 2) or proc.poll() is not None,
              "two shards of the CLI build, its top-k stage held after them")
        proc.send_signal(signal.SIGKILL)  # the build's driver dies: its Ray Data actors go with it
    finally:
        proc.kill()
        proc.wait(timeout=60)
    got["cli_returncode"], got["cli_stderr"] = proc.returncode, proc.stderr.read() if proc.stderr else ""
    got["manifest_after_kill"] = (uri / "manifest.json").exists()
    done = got["done"] = _sidecars(uri)

    box: dict[str, Any] = {}

    def resume() -> None:
        try:
            box["result"] = build_cache(cfg, str(uri), progress=False, say=lambda _: None, faults=second)
        except BaseException as exc:  # reported by the test's assertion
            box["error"] = exc

    thread = threading.Thread(target=resume)
    thread.start()
    try:
        def topk_actor() -> Any:
            alive = [a for a in ray_state.actors().values()
                     if a["State"] == "ALIVE" and "TopKStage" in a["ActorClassName"]]
            return alive[0] if alive else None

        # the resumed build has written a shard and its top-k stage waits before the next
        _wait(lambda: (second.stage_held() and _sidecars(uri) > done) or "error" in box or "result" in box,
              "a shard of the resumed build, its top-k stage held after it")
        got["ended_before_the_kill"] = {k: box[k] for k in ("result", "error") if k in box}
        victim = got["victim"] = topk_actor()
        assert victim is not None, "no live top-k stage actor in the resumed build"
        os.kill(victim["Pid"], signal.SIGKILL)  # a Ray Data worker dies mid-build: restarted, its shard retried
    finally:
        second.release_stage()  # the retry passes straight on (and a failed wait above leaves nothing held)
        thread.join(timeout=600)
    got["box"] = box
    got["victim_restarts"] = ray_state.actors()[victim["ActorID"]]["NumRestarts"]
    return got


def test_a_build_survives_a_killed_worker_and_a_killed_driver(built, reference):
    from teacher_service.cache import CacheReader

    assert built["cli_returncode"] == -signal.SIGKILL, built["cli_stderr"][-3000:]
    assert not built["manifest_after_kill"]
    done = built["done"]
    assert 2 <= done < SHARDS
    assert not built["ended_before_the_kill"], built["ended_before_the_kill"]  # still building when killed
    box = built["box"]
    assert "error" not in box, box.get("error")
    assert built["victim_restarts"] >= 1
    manifest, stats = box["result"]
    assert stats["shards_written"] == SHARDS - done and manifest.head.scoring["batch"] == 4
    auto = reference["auto"]["cache"]  # written through by a run with live teachers (test_auto_... checks it)
    assert shard_bytes(built["cache"]) == shard_bytes(auto)
    assert [s.sha256 for s in manifest.shards] == [s.sha256 for s in CacheReader(str(auto)).manifest.shards]
