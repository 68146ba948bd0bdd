"""Teacher faults: a killed actor is restarted and its batches retried; a dead role and a NaN teacher give
typed errors naming role / model and batch id.

The restart runs on the session's restartable teacher service (tests/integration/session_teachers.py: the same
restart policy, max_restarts=2 and max_task_retries=-1, and no teachers of its own to start); the typed errors
need a pool of their own (a NaN base teacher, no restarts)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from common.config import RunConfig, config_from_dict
from teacher_service import TeacherPool, TeacherUnavailableError
from teacher_service.errors import TeacherOutputError
from tests.tiny import make_model_set


def _cfg(paths: dict[str, Path], prefix: str, *overrides: str) -> RunConfig:
    data: dict[str, Any] = {
        "models": {"base_teacher": {"path": str(paths["base_teacher"])},
                   "sft_teacher": {"path": str(paths["sft_teacher"])},
                   "student": {"path": str(paths["student"])}},
        "loss": {"k": 8},
        "teachers": {"name_prefix": prefix, "namespace": "deltakd-test", "num_cpus": 0.5},
    }
    return config_from_dict(data, list(overrides))


def _batches(vocab: int, n: int) -> dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    out = {}
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        ids = rng.integers(4, vocab, size=(4, 48)).astype(np.int32)
        am = np.ones_like(ids)
        out[i] = (ids, am, am.astype(bool))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_model_set(tmp_path_factory.mktemp("faults"))


def test_killed_teacher_is_restarted_and_batches_retried(ray_cluster: dict, tiny_world: dict[str, Path],
                                                         session_teachers, tmp_path: Path) -> None:
    from tests.integration.session_teachers import OVERRIDES
    from tests.integration.test_student_training import make_cfg

    tag, attach = session_teachers.ensure()
    cfg = make_cfg(tiny_world, tmp_path, attach + ["teachers.max_inflight_per_replica=16"], tag=tag)
    assert OVERRIDES == ["teachers.max_restarts=2", "teachers.max_task_retries=-1"]  # what the service runs with
    pool = TeacherPool.attach(cfg)
    try:
        batches = _batches(pool.vocab_size, 8)
        undisturbed = {i: ray.get(pool.submit(i, *b).ref) for i, b in batches.items()}
        base = pool.handles["base"][0]
        pid_before = ray.get(base.health.remote())["pid"]
        refs = {i: pool.submit(i, *b).ref for i, b in batches.items()}
        ray.kill(base, no_restart=False)  # dies with batches queued / running; Ray restarts it
        records = {i: ray.get(r) for i, r in refs.items()}
        assert ray.get(base.health.remote())["pid"] != pid_before, "the base actor was not restarted"
        assert ray.get(base.stats.remote())["calls"] > 0, "no retried call reached the restarted actor"
        assert sorted(r.batch_id for r in records.values()) == sorted(batches)  # none lost or duplicated
        for i, rec in records.items():
            assert rec.batch_id == i
            np.testing.assert_array_equal(rec.ids, undisturbed[i].ids)
            for role in ("sft", "base"):  # same model, same inputs, deterministic CPU forward
                np.testing.assert_array_equal(rec.logprobs[role], undisturbed[i].logprobs[role])
                np.testing.assert_array_equal(rec.tail[role], undisturbed[i].tail[role])
    finally:
        pool.shutdown()


def test_nan_teacher_and_dead_role_give_typed_errors(ray_cluster: dict, models: dict[str, Path],
                                                     tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    nan_dir = tmp_path / "nan_base"
    m = AutoModelForCausalLM.from_pretrained(str(models["base_teacher"]))
    with torch.no_grad():
        m.lm_head.weight.fill_(float("nan"))
    m.save_pretrained(str(nan_dir))
    AutoTokenizer.from_pretrained(str(models["base_teacher"])).save_pretrained(str(nan_dir))

    cfg = _cfg(models, "dead", f"models.base_teacher.path={nan_dir}", "teachers.max_restarts=0",
               "teachers.max_task_retries=0")
    pool = TeacherPool.start(cfg)
    try:
        ids, am, lm = _batches(pool.vocab_size, 1)[0]
        with pytest.raises(TeacherOutputError) as nan_err:
            ray.get(pool.submit(41, ids, am, lm).ref)
        assert str(nan_dir) in str(nan_err.value) and "batch 41" in str(nan_err.value)

        ray.kill(pool.handles["base"][0], no_restart=True)
        with pytest.raises(TeacherUnavailableError) as dead:
            ray.get(pool.submit(42, ids, am, lm).ref)
        cause = dead.value.cause if hasattr(dead.value, "cause") else dead.value
        assert isinstance(cause, TeacherUnavailableError)
        assert cause.role == "base" and cause.batch_id == 42
        assert "'base'" in str(dead.value) and "batch 42" in str(dead.value)
    finally:
        pool.shutdown()
