"""A dead Ray head recorded on the host must not hang anything (issue 22).

`ray start --head` records its address in $RAY_TMPDIR/ray/ray_current_cluster (default /tmp/ray), and a head
that dies without `ray stop` leaves the record behind; `ray.init()` then retries it for ever. Here the record
is the test's own: RAY_TMPDIR points every subprocess at a private temp dir whose record names a closed port
(what a killed head leaves: nothing listens there any more), so no other cluster on the host is read or touched.

- the main job (no --address, no RAY_ADDRESS, no teachers.attach) starts its own private local cluster and runs;
- a run with teachers.attach=true exits 2 well within the bound, with one message naming the address and the
  record file it came from.
A hung head (a port that accepts connections and never answers) is tests/unit/test_ray_connect.py's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.config import dump_config
from tests.integration.ray_head import free_ports
from tests.integration.test_student_training import make_cfg

REPO = Path(__file__).resolve().parents[2]
RUN_TIMEOUT_S = 300
BOUND_S = 30.0  # issue 22: an attaching run stops in under 30 s (the probe's own bound is 10 s)


@pytest.fixture(scope="module")
def tiny(tiny_world):
    return tiny_world  # the session's tiny world (tests/integration/conftest.py); read only here


@pytest.fixture
def stale_record() -> Iterator[tuple[dict[str, str], str, Path]]:
    """(environment whose Ray record names a dead head, that address, the record file)."""
    temp = Path(tempfile.mkdtemp(prefix="dkx-", dir="/tmp"))  # short: a local cluster's sockets go below it
    (port,) = free_ports(1)  # free now: nothing listens there, as after a head was killed
    record = temp / "ray" / "ray_current_cluster"
    record.parent.mkdir()
    address = f"127.0.0.1:{port}"
    record.write_text(address)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "DELTAKD_RAY_CONNECT_TIMEOUT_S")}
    env["RAY_TMPDIR"] = str(temp)  # Ray's record (and a local cluster's session dir) live under $RAY_TMPDIR/ray
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        yield env, address, record
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _train(tiny: dict[str, Path], out: Path, env: dict[str, str], overrides: list[str],
           *args: str) -> tuple[subprocess.CompletedProcess, float]:
    config = out.parent / f"{out.name}.yaml"
    dump_config(make_cfg(tiny, out, overrides), config)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "student_worker.train", "--config", str(config), "--no-progress",
                           *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    return done, time.monotonic() - t0


def test_main_job_starts_its_own_cluster_despite_a_dead_recorded_head(tiny, stale_record, tmp_path) -> None:
    env, address, _ = stale_record
    out = tmp_path / "run"
    # the smallest run that proves it: one worker, two sft steps (no teacher actors), on 2 logical CPUs
    done, took = _train(tiny, out, env, ["loss.method=sft", "training.num_workers=1", "training.max_steps=2",
                                         "training.checkpoint_every=2", "training.num_cpus_per_worker=0.5",
                                         "output.plot=false"])
    assert done.returncode == 0, f"exit {done.returncode} after {took:.0f} s:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert json.loads((out / "report.json").read_text())["steps"] == 2
    assert address not in done.stdout + done.stderr  # the dead head was never tried
    print(f"\nmain job with a dead head recorded: own cluster, 2 steps, {took:.1f} s")


def test_attaching_run_exits_2_within_the_bound_naming_the_record(tiny, stale_record, tmp_path) -> None:
    env, address, record = stale_record
    done, took = _train(tiny, tmp_path / "attached", env, ["teachers.attach=true"])
    assert done.returncode == 2, f"exit {done.returncode} after {took:.0f} s:\n{done.stderr[-3000:]}"
    assert took < BOUND_S, f"took {took:.1f} s"
    lines = done.stderr.strip().splitlines()
    assert lines[0] == (f"error: cannot connect to the Ray cluster at '{address}' (from the address an earlier "
                        f"`ray start` on this host recorded in {record}): no Ray head answers there: Connection "
                        "refused (no Ray head listens there: it has stopped or died)"), lines
    assert any("`ray start --head`" in line for line in lines[1:]) and "Traceback" not in done.stderr
    print(f"\nattaching run with a dead head recorded: exit 2 in {took:.1f} s")
