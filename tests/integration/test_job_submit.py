"""End to end: the tiny job submitted with the real `ray job submit` CLI (through deploy/submit.sh) to a
private local head with a dashboard and token authentication on, pinned the way deploy/cluster.yaml pins it.

The head is the session's `dashboard_head` (tests/integration/conftest.py), which has cluster.yaml's shape on
this host: a head with no CPUs and two more raylets, a teacher node with the custom resource `teacher_gpu` and
a student node with `student_gpu`. The paper config pins teachers with `teachers.resources` and student ranks
with `training.resources_per_worker`; the submitted job is pinned the same way. ONE job (a module fixture:
a submission and a 4-step run cost ~20 s on 2 cores) serves both checks:
- the submission: the job API refuses a request without the token; `ray job submit` succeeds and the job
  writes its report, metrics, checkpoint and final model;
- the topology: every teacher actor ran on the teacher node and every student worker on the student node
  (read back from Ray's state API, for the job's own namespace), so the rank-0 rendezvous and the output.dir
  probe worked with no worker on the driver's node (the driver runs on the head).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

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
# cluster.yaml's pinning: teachers on the teacher node type, student ranks on the student node type
PINNED = ["teachers.resources={teacher_gpu: 1}", "training.resources_per_worker={student_gpu: 1}"]

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


@pytest.fixture(scope="module")
def job(dashboard_head: LocalHead, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The pinned tiny job, submitted once: its id, namespace, output dir, submit result and final status."""
    _build_embedded_models()
    out_dir = tmp_path_factory.mktemp("job") / "run"
    job_id = f"deltakd-test-{uuid.uuid4().hex[:8]}"
    namespace = f"dkd-job-{uuid.uuid4().hex[:8]}"
    head = dashboard_head
    # Token authentication is on: the job API refuses a request that carries no token.
    no_token = head.api_get("/api/jobs/", with_token=False)
    sets = [*REDUCED, *PINNED, f"teachers.namespace={namespace}"]
    submit = subprocess.run(
        ["bash", "deploy/submit.sh", "--config", TINY, "--address", head.dashboard_url,
         "--python", sys.executable, "--no-wait", "--submission-id", job_id, "--",
         *[a for kv in sets for a in ("--set", kv)], "--output-dir", str(out_dir), "--no-progress"],
        cwd=REPO, env={**head.env, "RAY_BIN": str(ray_cli())}, capture_output=True, text=True, timeout=180,
    )
    info = _wait_terminal(head, job_id) if submit.returncode == 0 else {"status": "NOT SUBMITTED"}
    return {"head": head, "id": job_id, "namespace": namespace, "out": out_dir, "submit": submit,
            "no_token": no_token, "info": info}


def _succeeded(job: dict[str, Any]) -> None:
    submit, info = job["submit"], job["info"]
    assert submit.returncode == 0, f"ray job submit failed:\n{submit.stdout}\n{submit.stderr}"
    assert info["status"] == "SUCCEEDED", (
        f"job {job['id']} ended {info['status']}: {info.get('message')}\n{_job_logs(job['head'], job['id'])}")


def test_tiny_job_via_ray_job_submit(job: dict[str, Any]) -> None:
    status, body = job["no_token"]
    assert status == 401, f"job API answered {status} without a token: {body[:200]}"
    _succeeded(job)
    assert job["id"] in job["submit"].stdout + job["submit"].stderr
    assert job["info"]["entrypoint"].startswith(f"{sys.executable} -m student_worker.train --config {TINY}")

    out_dir = job["out"]
    report_path = out_dir / "report.json"
    assert report_path.is_file(), f"no report.json in {out_dir}: {sorted(p.name for p in out_dir.iterdir())}"
    report = json.loads(report_path.read_text())
    assert report["steps"] == MAX_STEPS
    assert report["method"] == "delta_kd"
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in rows] == list(range(MAX_STEPS))
    assert (out_dir / "final_model" / "config.json").is_file()
    assert (out_dir / "checkpoints" / f"ckpt-{MAX_STEPS:06d}" / "state.json").is_file()


def test_teachers_and_students_land_on_their_node_types(job: dict[str, Any]) -> None:
    _succeeded(job)
    head: LocalHead = job["head"]
    status, body = head.api_get("/api/v0/nodes?limit=100")
    assert status == 200, body[:500]
    nodes = json.loads(body)["data"]["result"]["result"]
    node_of = {kind: {n["node_id"] for n in nodes if kind in n.get("resources_total", {})}
               for kind in ("teacher_gpu", "student_gpu")}
    assert all(len(ids) == 1 for ids in node_of.values()), nodes
    status, body = head.api_get(f"/api/v0/actors?limit=1000&detail=1&filter_keys=ray_namespace"
                                f"&filter_predicates=%3D&filter_values={job['namespace']}")
    assert status == 200, body[:500]
    actors = json.loads(body)["data"]["result"]["result"]

    placed = {(a["class_name"], a.get("name") or ""): a["node_id"] for a in actors}
    teachers = {k: v for k, v in placed.items() if k[0] == "TeacherActor"}
    students = {k: v for k, v in placed.items() if k[0] == "StudentWorkerImpl"}
    assert len(teachers) == 2 and len(students) == 2, placed  # sft + base; two ranks
    assert set(teachers.values()) == node_of["teacher_gpu"], placed
    assert set(students.values()) == node_of["student_gpu"], placed
