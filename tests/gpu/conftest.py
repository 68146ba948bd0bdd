"""The GPU tier: every test here is marked `gpu` and runs on CUDA, or is skipped without it.

`DELTAKD_GPU_DRYRUN=1` runs the same tests on the CPU instead of skipping them (`benchmarks/gpu_run.sh`
with that variable set does it): the same lines, shapes and comparisons, bf16 included, with the CUDA-only
parts swapped for their CPU twins (the `device` fixture is the CPU, the RDT transport is gloo). It checks
the tests themselves on a machine without a GPU; it is not a GPU result.

`DELTAKD_GPU_FACTS=<file>`: tests append the figures they measure (errors against references, whether
two runs were bitwise equal) as JSON lines there, through the `fact` fixture, for gpu_run.sh's log.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest
import torch

DRYRUN_ENV = "DELTAKD_GPU_DRYRUN"
FACTS_ENV = "DELTAKD_GPU_FACTS"


def has_cuda() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # a broken driver reads as no GPU: the tier is skipped, not errored
        return False


def dry_run() -> bool:
    return not has_cuda() and os.environ.get(DRYRUN_ENV) == "1"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = os.path.dirname(__file__)
    skip = None if has_cuda() or dry_run() else pytest.mark.skip(reason=f"needs CUDA (or {DRYRUN_ENV}=1)")
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(pytest.mark.gpu)
            if skip is not None:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """cuda:0, or the CPU on a dry run."""
    return torch.device("cuda", 0) if has_cuda() else torch.device("cpu")


@pytest.fixture
def fact(request: pytest.FixtureRequest) -> Callable[..., None]:
    """fact(name, **values): print one measured figure and append it to $DELTAKD_GPU_FACTS (if set)."""
    def record(name: str, **values: Any) -> None:
        row = {"test": request.node.nodeid, "fact": name, "device": "cuda" if has_cuda() else "cpu (dry run)",
               **values}
        print("FACT", json.dumps(row, default=str))
        path = os.environ.get(FACTS_ENV)
        if path:
            with open(path, "a") as fh:
                fh.write(json.dumps(row, default=str) + "\n")

    return record
