"""The main job end to end on the shared local Ray cluster: tiny random Llamas, inline JSONL data.

Helpers here (`tiny_setup`, `make_cfg`, `comparable`) are also used by the other training modules.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from common.config import RunConfig, config_from_dict
from common.faults import FaultPlan, Hold
from student_worker.report import TIMING_KEYS as REPORT_TIMING_KEYS
from tests.tiny import make_model_set

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa".split()
NUMBERS = "one two three four five six seven eight nine ten".split()


def write_jsonl(path: Path, n: int, seed: int) -> Path:
    """Dolly-style rows whose words are all in tests/tiny.py's vocabulary (reverse a list of words)."""
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(n):
            items = list(rng.choice(WORDS + NUMBERS, size=int(rng.integers(2, 5)), replace=False))
            f.write(json.dumps({"instruction": "reverse the words :", "context": " ".join(items),
                                "response": " ".join(reversed(items))}) + "\n")
    return path


def tiny_setup(root: Path) -> dict[str, Path]:
    paths = make_model_set(root / "models")
    paths["train"] = write_jsonl(root / "train.jsonl", 48, seed=0)
    paths["eval"] = write_jsonl(root / "eval.jsonl", 4, seed=1)
    return paths


def make_cfg(paths: dict[str, Path], out: Path, overrides: list[str] | None = None, tag: str | None = None) -> RunConfig:
    tag = tag or uuid.uuid4().hex[:8]  # own namespace / names: never collide with another test's teachers
    data: dict[str, Any] = {
        "run_name": "t",
        "models": {"base_teacher": {"path": str(paths["base_teacher"])},
                   "sft_teacher": {"path": str(paths["sft_teacher"])},
                   "student": {"path": str(paths["student"])}},
        "data": {"train": str(paths["train"]), "eval": str(paths["eval"]), "max_length": 48,
                 "max_eval_examples": 4},
        "loss": {"method": "delta_kd", "k": 16},
        "teachers": {"namespace": f"t-{tag}", "name_prefix": f"teacher-{tag}", "num_cpus": 1},
        "training": {"num_workers": 2, "batch_size": 8, "max_steps": 10, "lr": 5e-3, "warmup_steps": 2,
                     "checkpoint_every": 5, "keep_checkpoints": 2, "prefetch": 2},
        "evaluation": {"enabled": False, "max_new_tokens": 8, "batch_size": 8},
        "output": {"dir": str(out), "plot": True},
    }
    return config_from_dict(data, overrides or [])


# Wall-clock figures (student_worker.report.TIMING_KEYS); everything else in a metrics row must match exactly
# between equivalent runs.
TIMING_KEYS = REPORT_TIMING_KEYS


def comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def read_rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def load_weights(model_dir: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    out: dict[str, np.ndarray] = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def tiny(tiny_world):
    return tiny_world  # the session's tiny world (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def shared_teachers(session_teachers):
    """One teacher service for several runs (they attach by namespace, as to a long-lived service): starting
    teachers costs ~20 s on 2 cores, training a few steps ~1 s each. The session's service
    (tests/integration/session_teachers.py); (tag, overrides that attach)."""
    return session_teachers.ensure()


def teacher_service(paths: dict[str, Path], out: Path, overrides: list[str] | None = None):
    from teacher_service import TeacherPool

    tag = uuid.uuid4().hex[:8]
    pool = TeacherPool.start(make_cfg(paths, out, overrides, tag=tag))
    try:
        yield tag, ["teachers.attach=true"]
    finally:
        pool.shutdown()


def test_delta_kd_two_workers_trains_and_writes_everything(ray_cluster, tiny, shared_teachers, tmp_path,
        warm_ranks):
    from transformers import AutoModelForCausalLM

    from student_worker.driver import run_training

    # attached to the module's teachers (it only reads them); runs that start their own teachers:
    # test_job_submit, the bench_e2e smoke
    tag, attach = shared_teachers
    out = tmp_path / "run"
    cfg = make_cfg(tiny, out, attach + ["evaluation.enabled=true", "training.max_steps=12",
                                        "training.checkpoint_every=6"], tag=tag)
    report = run_training(cfg, progress=False, warm=warm_ranks)
    rows = read_rows(out)
    assert [r["step"] for r in rows] == list(range(12))
    # every batch id (step * W + rank) trained exactly once
    assert sorted(b for r in rows for b in r["batch_ids"]) == list(range(24))
    losses = [r["loss"] for r in rows]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    for key in ("grad_norm", "lr", "distill", "topk_mass_sft", "teacher_wait_frac"):
        assert key in rows[0], key
    saved = json.loads((out / "report.json").read_text())
    for key in ("method", "config_hash", "steps", "tokens", "tokens_per_s", "steps_per_s",
                "teacher_wait_fraction", "rouge"):
        assert key in saved, key
    assert saved["method"] == "delta_kd" and saved["steps"] == 12
    assert set(saved["rouge"]) == {"student_base", "student_after", "sft_teacher"}
    assert 0 <= saved["rouge"]["student_after"]["rougeL"] <= 1
    assert (out / "report.md").is_file() and (out / "loss_curve.png").stat().st_size > 0
    assert (out / "config.yaml").is_file()
    assert not list(out.glob(".deltakd-probe-*"))  # both workers read the shared-dir probe; it is removed
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["ckpt-000006", "ckpt-000012"]
    for model_dir in (out / "final_model", out / "checkpoints/ckpt-000012/model"):
        model = AutoModelForCausalLM.from_pretrained(str(model_dir))
        assert model.config.hidden_size == 16
    final, last = load_weights(out / "final_model"), load_weights(out / "checkpoints/ckpt-000012/model")
    start = load_weights(tiny["student"])
    assert all(np.array_equal(final[k], last[k]) for k in final)
    assert any(not np.array_equal(final[k], start[k]) for k in final)  # it did train
    print(f"\ndelta_kd: steps/s {report['steps_per_s']:.3f}, teacher wait {report['teacher_wait_fraction']:.3f}")


def _wait_dead(handle: Any, timeout_s: float = 60.0) -> None:
    """Until the GCS's actor table has `handle`'s actor DEAD (the state API would need a dashboard)."""
    import ray._private.state as ray_state

    actor_id = handle._actor_id.hex()
    deadline = time.monotonic() + timeout_s
    while ray_state.actors().get(actor_id, {}).get("State") != "DEAD":
        assert time.monotonic() < deadline, f"actor {actor_id} not DEAD {timeout_s:.0f} s after ray.kill"
        time.sleep(0.1)


def test_two_workers_make_the_same_update_as_one(ray_cluster, tiny, shared_teachers, tmp_path):
    """...and a run on ranks an earlier run left (WarmRanks) is bit for bit the run on new ranks; an idle rank
    that died is replaced by a new one."""
    import ray

    from student_worker.driver import WarmRanks, run_training

    tag, attach = shared_teachers
    weights, warm = {}, WarmRanks(namespace=f"warm-{tag}")
    try:
        for workers, ranks in ((1, None), (2, warm), ("2 again", warm), ("2, one idle rank dead", warm)):
            out = tmp_path / f"w{workers}"
            # the 2-worker runs also recompute activations (training.gradient_checkpointing): same update
            ckpt = ["training.gradient_checkpointing=true"] if workers != 1 else []
            before = warm.idle_names()
            if workers == "2, one idle rank dead":
                dead = ray.get_actor(before[0], namespace=warm.namespace)
                ray.kill(dead, no_restart=True)  # only asks: a call sent at once may still be answered
                _wait_dead(dead)
                with pytest.raises(ray.exceptions.RayActorError):  # dead before the run looks at it
                    ray.get(dead.__ray_ready__.remote(), timeout=60)
            run_training(make_cfg(tiny, out, attach + [f"training.num_workers={str(workers)[0]}",
                                                       "training.max_steps=2"] + ckpt, tag=tag),
                         progress=False, warm=ranks)
            weights[workers] = load_weights(out / "final_model")
            rows = comparable(read_rows(out))
            if workers == 2:
                first_rows = rows
            if workers == "2 again":  # the same two processes, reset and set up again: the same run
                assert warm.idle_names() == before and len(before) == 2
                assert rows == first_rows
            if workers != 1 and workers != 2:
                for name, w in weights[2].items():
                    np.testing.assert_array_equal(w, weights[workers][name], err_msg=name)
            if workers == "2, one idle rank dead":  # the live one reused, a new one for the dead one
                after = warm.idle_names()
                assert before[1] in after and before[0] not in after and len(after) == 2, (before, after)
                assert rows == first_rows
    finally:
        warm.close()
    start = load_weights(tiny["student"])
    for name, w1 in weights[1].items():
        assert not np.array_equal(w1, start[name]) or np.all(w1 == 0)
        # Same global batch: the only difference is fp32 summation order (per-rank sums + gloo's
        # all-reduce vs one sum), ~1e-7 relative in the gradient. Adam divides g by sqrt(v) (~|g| on these
        # first steps), so a weight moves by ~lr = 5e-3 per step and the difference stays near lr * 1e-4.
        np.testing.assert_allclose(weights[2][name], w1, rtol=0, atol=1e-6, err_msg=name)


def test_a_warm_rank_whose_reset_hangs_is_replaced_by_new_ranks(ray_cluster, tiny, tmp_path, monkeypatch):
    """A reset that does not return in time (here a stand-in actor whose reset sleeps) costs the run its warm
    ranks, not the run: the group kills them and starts new ones."""
    import ray

    from student_worker import worker_group
    from student_worker.driver import WarmRanks
    from student_worker.worker_group import WorkerGroup

    @ray.remote(num_cpus=0)
    class StuckRank:
        def reset(self, *args: Any, **kwargs: Any) -> None:
            time.sleep(600)

    monkeypatch.setattr(worker_group, "READY_TIMEOUT_S", 2.0)
    cfg = make_cfg(tiny, tmp_path / "out", ["loss.method=sft", "training.num_workers=1"])
    warm = WarmRanks(namespace=f"stuck-{tmp_path.name}")
    stuck = StuckRank.options(name="stuck", namespace=warm.namespace).remote()
    warm.give(cfg, [(stuck, "stuck")])
    group = WorkerGroup(cfg, tmp_path / "out", warm=warm)
    try:
        group.create()
        assert group.names != ["stuck"] and len(group.workers) == 1
        with pytest.raises(ray.exceptions.RayActorError):  # killed, not left sleeping
            ray.get(stuck.__ray_ready__.remote(), timeout=60)
        ray.get(group.workers[0].__ray_ready__.remote(), timeout=120)  # the new rank
    finally:
        group.stop()
        warm.close()


def test_sft_runs_with_no_teacher_actor(ray_cluster, tiny, tmp_path, warm_ranks):
    import ray

    from student_worker.driver import run_training

    # Every rank waits at the end of step 2 (a FaultPlan hold): the run is looked at mid-training, at full speed.
    out = tmp_path / "sft"
    cfg = make_cfg(tiny, out, ["loss.method=sft", "training.max_steps=6"])
    seen: list[list[str]] = []
    result: dict[str, Any] = {}
    hold = Hold(step=2)
    plan = FaultPlan(holds=(hold,), hold_dir=str(tmp_path))
    thread = threading.Thread(target=lambda: result.update(run_training(cfg, progress=False, faults=plan,
                                                                                warm=warm_ranks)))
    thread.start()
    try:
        deadline = time.monotonic() + 240
        while not plan.held(hold, cfg.training.num_workers):  # before and at the hold, look for teacher actors
            assert thread.is_alive() and time.monotonic() < deadline, f"the run never reached step 2: {result}"
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
            seen.append([n for n in names if n.startswith(cfg.teachers.name_prefix)])
            time.sleep(0.2)
        names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)]
        seen.append([n for n in names if n.startswith(cfg.teachers.name_prefix)])
    finally:
        plan.release(hold)
        thread.join(timeout=240)
    assert seen and all(s == [] for s in seen)
    assert result["method"] == "sft" and "teacher_stats" not in result
    rows = read_rows(out)
    assert len(rows) == 6 and "distill" not in rows[0] or rows[0].get("distill", 0.0) == 0.0
    assert rows[-1]["loss"] < rows[0]["loss"]


def test_rdt_gives_the_same_losses_as_the_object_store(ray_cluster, tiny, shared_teachers, tmp_path, warm_ranks):
    from student_worker.driver import run_training

    tag, attach = shared_teachers
    rows = {}
    for kind in ("object_store", "rdt"):
        out = tmp_path / kind
        run_training(make_cfg(tiny, out, attach + [f"transport.kind={kind}", "transport.rdt_backend=gloo",
                                                   "training.max_steps=2"], tag=tag), progress=False,
                     warm=warm_ranks)  # the rdt run starts ranks of its own (the driver takes no warm ranks for it)
        rows[kind] = comparable(read_rows(out))
    assert len(rows["rdt"]) == 2
    # fp32 tensors cross gloo bit for bit, and the worker computes the same loss from the same record.
    assert rows["rdt"] == rows["object_store"]


def test_resources_the_cluster_lacks_are_named_before_the_run_waits(ray_cluster, tiny, tmp_path, capsys):
    from student_worker.driver import Driver

    cfg = make_cfg(tiny, tmp_path / "r", ["teachers.resources={teacher_gpu: 1}",
                                          "training.resources_per_worker={student_gpu: 0.5}"])
    Driver(cfg, progress=False)._check_resources()  # reads ray.cluster_resources(); starts nothing
    warning = capsys.readouterr().out
    assert "WARNING" in warning and "teacher_gpu: 2 needed, 0 available" in warning  # sft + base
    assert "student_gpu: 1 needed, 0 available" in warning and "teachers.resources" in warning
    Driver(make_cfg(tiny, tmp_path / "ok"), progress=False)._check_resources()
    assert "WARNING" not in capsys.readouterr().out
