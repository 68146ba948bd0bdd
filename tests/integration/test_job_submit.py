"""End to end: the tiny job submitted with the real `ray job submit` CLI (through deploy/submit.sh) to a
private local head with a dashboard and token authentication on; it must succeed and write its report.

The head is the session's `dashboard_head` (tests/integration/conftest.py: cluster.yaml's shape, started
once for the tests that need a dashboard), not the `ray_cluster` fixture, which has no dashboard.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.integration.ray_head import LocalHead, job_status, ray_cli

REPO = Path(__file__).resolve().parents[2]
TINY = "deploy/configs/tiny.yaml"
MAX_STEPS = 4
JOB_TIMEOUT_S = 240  # the tiny run with a 4-step budget takes well under a minute when models are cached

# A reduced budget: 4 steps, a 4-sequence batch on the 2 workers, a small evaluation.
REDUCED = [
    f"training.max_steps={MAX_STEPS}", f"training.checkpoint_every={MAX_STEPS}", "training.batch_size=4",
    "training.warmup_steps=1", "data.max_eval_examples=4", "evaluation.max_new_tokens=4",
    "evaluation.evaluate_before=false", "evaluation.evaluate_teacher=false", "output.plot=false",
]

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def _build_embedded_models() -> None:
    """Build (or find) the tiny models in this process, in the cache the job's driver will read.

    The head inherits this environment (DELTAKD_CACHE or ~/.cache/deltakd), so the job finds them built.
    """
    from common.config import load_config
    from common.tiny_world.build import resolve_model_paths

    resolve_model_paths(load_config(REPO / TINY))


def _job_logs(head: LocalHead, job_id: str) -> str:
    out = subprocess.run([str(ray_cli()), "job", "logs", "--address", head.dashboard_url, job_id],
                         env=head.env, capture_output=True, text=True, timeout=60)
    return (out.stdout + out.stderr)[-6000:]


def _wait_terminal(head: LocalHead, job_id: str) -> dict:
    """Follow the job with the real CLI (`ray job logs --follow`), then read its final status."""
    terminal = {"SUCCEEDED", "FAILED", "STOPPED"}
    follow = subprocess.run([str(ray_cli()), "job", "logs", "--follow", "--address", head.dashboard_url, job_id],
                            env=head.env, capture_output=True, text=True, timeout=JOB_TIMEOUT_S)
    # --follow returns when the log stream closes; the status may lag a moment behind it.
    deadline = time.monotonic() + 60
    info = job_status(head, job_id)
    while info["status"] not in terminal and time.monotonic() < deadline:
        time.sleep(0.5)
        info = job_status(head, job_id)
    info["followed_logs"] = (follow.stdout + follow.stderr)[-6000:]
    return info


def test_tiny_job_via_ray_job_submit(dashboard_head: LocalHead, tmp_path: Path) -> None:
    _build_embedded_models()
    out_dir = tmp_path / "run"
    job_id = f"deltakd-test-{uuid.uuid4().hex[:8]}"
    head = dashboard_head
    # Token authentication is on: the job API refuses a request that carries no token.
    status, body = head.api_get("/api/jobs/", with_token=False)
    assert status == 401, f"job API answered {status} without a token: {body[:200]}"

    submit = subprocess.run(
        ["bash", "deploy/submit.sh", "--config", TINY, "--address", head.dashboard_url,
         "--python", sys.executable, "--no-wait", "--submission-id", job_id, "--",
         *[a for kv in REDUCED for a in ("--set", kv)], "--output-dir", str(out_dir), "--no-progress"],
        cwd=REPO, env={**head.env, "RAY_BIN": str(ray_cli())}, capture_output=True, text=True, timeout=180,
    )
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout}\n{submit.stderr}"
    assert job_id in submit.stdout + submit.stderr

    info = _wait_terminal(head, job_id)
    assert info["status"] == "SUCCEEDED", (
        f"job {job_id} ended {info['status']}: {info.get('message')}\n{_job_logs(head, job_id)}")
    assert info["entrypoint"].startswith(f"{sys.executable} -m student_worker.train --config {TINY}")

    report_path = out_dir / "report.json"
    assert report_path.is_file(), f"no report.json in {out_dir}: {sorted(p.name for p in out_dir.iterdir())}"
    report = json.loads(report_path.read_text())
    assert report["steps"] == MAX_STEPS
    assert report["method"] == "delta_kd"
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(MAX_STEPS))
    assert (out_dir / "final_model").is_dir()
