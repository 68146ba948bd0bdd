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


@pytest.fixture(scope="session")
def ray_cluster() -> Iterator[dict]:
    import ray

    temp_dir = tempfile.mkdtemp(prefix="dkd-", dir="/tmp")  # short path: Ray's socket names have a limit
    ctx = ray.init(
        address="local",
        num_cpus=RAY_NUM_CPUS,
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
