"""Shared fixtures. The Ray cluster fixture lives in tests/integration/conftest.py (one per session)."""

import os

# Keep tests on the CPU, single-threaded BLAS per process (2-core machines), and quiet.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import torch  # noqa: E402

# On a loaded 2-core machine, intra-op threads make tiny ops 100x slower (thread hand-off dominates).
torch.set_num_threads(1)


TYPE_CHECK_TEST = "tests/unit/test_type_check.py"


def pytest_collection_finish(session) -> None:
    """Start `mypy common` beside the tests when its test was collected (tests/type_check.py)."""
    if any(item.nodeid.startswith(TYPE_CHECK_TEST) for item in session.items):
        from tests import type_check

        type_check.start()


def pytest_sessionfinish(session, exitstatus) -> None:
    from tests import type_check

    type_check.stop()
    _end_stray_children()


def _end_stray_children() -> None:
    """Kill the multiprocessing children a failed or timed-out test left running: at exit, multiprocessing
    joins every non-daemonic child, so one stuck child would hold the whole run open after its summary."""
    import multiprocessing
    import sys

    for child in multiprocessing.active_children():
        print(f"tests/conftest.py: killing a child process left running: {child.name} (pid {child.pid})",
              file=sys.stderr)
        child.kill()
        child.join(5)
