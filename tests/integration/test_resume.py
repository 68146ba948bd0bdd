"""Resume after a stop mid-run reproduces the uninterrupted run exactly (CPU), and refuses other configs."""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

from common.faults import FaultPlan
from tests.integration.test_student_training import (
    comparable,
    load_weights,
    make_cfg,
    read_rows,
)


@pytest.fixture(scope="module")
def tiny(tiny_world):
    return tiny_world  # the session's tiny world (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def teachers(session_teachers):
    # The session's teacher service: the last test kills a teacher with no_restart=True, so it stays dead
    # (this module runs after the service's other users: KILLS_SESSION_TEACHERS in conftest.py).
    return session_teachers.ensure()


def test_stop_and_resume_equals_an_uninterrupted_run(ray_cluster, tiny, teachers, tmp_path):
    from student_worker.checkpoint import CheckpointError
    from student_worker.driver import run_training

    tag, attach = teachers  # all runs score with the same attached teachers (a real, shared service)
    overrides = attach + ["training.max_steps=6", "training.checkpoint_every=3"]
    full = tmp_path / "full"
    run_training(make_cfg(tiny, full, overrides, tag=tag), progress=False)

    split = tmp_path / "split"
    cfg = make_cfg(tiny, split, overrides, tag=tag)
    stopped = run_training(cfg, stop_after=3, progress=False)
    assert stopped["stopped_at"] == 3 and not (split / "final_model").exists()
    assert len(read_rows(split)) == 3
    # another config must not resume from this checkpoint; the error lists the differing keys
    with pytest.raises(CheckpointError, match="loss.alpha"):
        run_training(make_cfg(tiny, split, overrides + ["loss.alpha=0.5"], tag=tag), resume=True, progress=False)
    run_training(make_cfg(tiny, split, overrides, tag=tag), resume=True, progress=False)

    rows_full, rows_split = read_rows(full), read_rows(split)
    assert [r["step"] for r in rows_split] == list(range(6))
    assert comparable(rows_split) == comparable(rows_full)  # loss, parts, grad norm, lr: bit for bit
    w_full, w_split = load_weights(full / "final_model"), load_weights(split / "final_model")
    assert w_full.keys() == w_split.keys()
    for name in w_full:
        assert np.array_equal(w_full[name], w_split[name]), name


def test_dead_teacher_checkpoints_completed_steps_and_names_role_and_batch(ray_cluster, tiny, teachers, tmp_path):
    """Runs LAST in this module: it kills the shared pool's base teacher (max_restarts=0)."""
    import ray

    from student_worker import checkpoint as ckpt
    from student_worker.driver import TrainingRunError, run_training
    from teacher_service.naming import replica_name

    tag, attach = teachers
    out = tmp_path / "dies"
    # 40 undelayed tiny steps take ~2 s on a fast machine; 0.1 s per step keeps the kill well inside the run.
    cfg = make_cfg(tiny, out, attach + ["training.max_steps=40", "training.checkpoint_every=100",
                                        "training.prefetch=1"], tag=tag)
    errors: list[BaseException] = []

    def target() -> None:
        try:
            run_training(cfg, progress=False, faults=FaultPlan(step_delay_s=0.1))
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=target)
    thread.start()
    while not ((out / "metrics.jsonl").is_file() and read_rows(out)):  # kill once a step is done
        assert thread.is_alive(), f"the run ended before its first step: {errors}"
        time.sleep(0.1)
    base = ray.get_actor(replica_name(cfg.teachers.name_prefix, "base", 0), namespace=cfg.teachers.namespace)
    ray.kill(base, no_restart=True)
    thread.join()
    assert len(errors) == 1 and isinstance(errors[0], TrainingRunError), errors
    message = str(errors[0])
    assert "'base'" in message and "batch" in message
    done = len(read_rows(out))
    assert 0 < done < 40
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert latest is not None and ckpt.read_state(latest)["step"] == done  # every completed step kept
