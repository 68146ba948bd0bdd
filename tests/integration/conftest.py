"""One local Ray cluster for the whole pytest session (Ray's "Tips for testing Ray programs").

It runs in a private temp dir with a fixed logical CPU count; it is ended with ray.shutdown(), never
`ray stop` (which would end every Ray process on the host).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

RAY_NUM_CPUS = 16  # logical slots: teachers and workers each ask for 1; the machine has 2 real cores
# Logical GPUs Ray declares on a host without CUDA, so that multi-GPU teacher placement (placement groups, the
# GPU ids Ray hands a replica) is exercised here: two replicas of 4 (test_teacher_placement.py). Only actors
# that ask for GPUs get any; every other test asks for none and runs on the CPU as before. On a CUDA host Ray
# counts the real GPUs instead (a declared count would hand out ids of devices that do not exist).
RAY_FAKE_GPUS = 8


def _declared_gpus() -> int | None:
    import torch

    return None if torch.cuda.is_available() else RAY_FAKE_GPUS


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    import ray

    temp_dir = tempfile.mkdtemp(prefix="dkd-", dir="/tmp")  # short path: Ray's socket names have a limit
    ctx = ray.init(
        address="local",
        num_cpus=RAY_NUM_CPUS,
        num_gpus=_declared_gpus(),
        include_dashboard=False,
        _temp_dir=temp_dir,
        logging_level="ERROR",
        log_to_driver=os.environ.get("DELTAKD_TEST_RAY_LOGS") == "1",
    )
    try:
        yield {"address": ctx.address_info["address"], "gcs_address": ctx.address_info["gcs_address"],
               "temp_dir": temp_dir}
    finally:
        ray.shutdown()
        shutil.rmtree(temp_dir, ignore_errors=True)


# One private head WITH a dashboard (job API, state API) for the tests that need what `ray_cluster` lacks:
# `ray job submit`, the README's service flow from other processes, and cluster.yaml's node types. It has
# cluster.yaml's shape: a head with no CPUs and two more raylets on this host, one with the `teacher_gpu`
# resource and one with `student_gpu` (CPUs on both, so runs that pin nothing fit too). Started once, on
# first use, and ended at the end of the session by its own process groups (never `ray stop`). Tests that
# use it run last (pytest_collection_modifyitems below), so it does not idle beside the other tests.
DASHBOARD_NODES = {"teacher": (4, {"teacher_gpu": 2}), "student": (6, {"student_gpu": 2})}


@pytest.fixture(scope="session")
def dashboard_head() -> Iterator:
    from contextlib import ExitStack

    from tests.integration.ray_head import local_ray_head, local_ray_nodes

    with ExitStack() as stack:
        head = stack.enter_context(local_ray_head(num_cpus=0))
        # each `ray start --block` leads its own process group; the two nodes start side by side
        groups = [head.proc.pid, *stack.enter_context(local_ray_nodes(head, DASHBOARD_NODES))]
        try:
            yield head
        finally:
            end_groups(groups)


def end_groups(groups: list[int], grace_s: float = 1.0) -> None:
    """SIGTERM every process group at once; SIGKILL what is left after `grace_s`.

    After SIGTERM each `ray start --block` group took about 30 s to exit here (30.3, 31.4 and 33.3 s,
    signalled together), and the per-group teardown (ray_head.py) waits 30 s, then SIGKILLs the group
    anyway; this ends the same groups the same way, without that wait. The leaders stay unreaped until the
    stack's teardown, so the grace is always spent in full: it is the short moment SIGTERM gets, nothing
    at the end of a test session needs more."""
    import signal
    import time

    def signal_all(sig: int) -> list[int]:
        alive = []
        for pgid in groups:
            try:
                os.killpg(pgid, sig)
                alive.append(pgid)
            except ProcessLookupError:
                pass
        return alive

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while signal_all(0) and time.monotonic() < deadline:
        time.sleep(0.2)
    signal_all(signal.SIGKILL)  # the stack's teardown then reaps each leader and removes the temp dirs


# The shared tiny world and its one teacher service (tests/integration/session_teachers.py): every module that
# trains against attached teachers uses these instead of building models and starting teachers of its own.
@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """tiny_setup's models and data, built once (read-only: a test that needs a changed copy makes one)."""
    from tests.integration.test_student_training import tiny_setup

    return tiny_setup(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def session_teachers(ray_cluster, tiny_world, tmp_path_factory) -> Iterator:
    from tests.integration.session_teachers import SessionTeachers

    teachers = SessionTeachers(tiny_world, tmp_path_factory.mktemp("session_svc"))
    try:
        yield teachers
    finally:
        teachers.shutdown()


@pytest.fixture(scope="session")
def warm_ranks(ray_cluster) -> Iterator:
    """Student ranks shared by the session's in-process runs (student_worker/worker_group.py WarmRanks): a run that
    ends cleanly leaves its worker processes to the next run of the same kind, which then skips starting
    processes that import torch and transformers (~4 CPU-s per rank). In-process CLI runs take them through
    `student_worker.train.main(warm=)`; a test that kills a rank of a run on them finds it in the WarmRanks
    namespace (test_faults.py `_warm_run_ranks`). CLI subprocesses, RDT and fsdp2 runs start their own."""
    from student_worker.driver import WarmRanks

    warm = WarmRanks()
    try:
        yield warm
    finally:
        warm.close()


def pytest_collection_modifyitems(items: list) -> None:
    """Tests on the dashboard head last (stable order otherwise), so the head starts once and late."""
    items.sort(key=lambda item: "dashboard_head" in getattr(item, "fixturenames", ()))
