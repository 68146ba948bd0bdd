"""deploy/cluster.yaml's topology on one host: teachers and students land on their own node types.

cluster.yaml gives the head no CPUs and declares the custom resources `teacher_gpu` and `student_gpu` on
its two worker node types; the paper config pins teachers with `teachers.resources` and student ranks with
`training.resources_per_worker`. The session's `dashboard_head` (tests/integration/conftest.py) has that
shape on this host: a head with CPU 0 and two more raylets, a teacher node and a student node with those
resources (other tests' runs use the same cluster; this one reads back only its own namespace's actors). The tiny job, pinned the same way, must finish with every teacher actor on the teacher node and
every student worker on the student node (read back from Ray's state API), and the rank-0 rendezvous and the
output.dir probe must work with no worker on the driver's node. Everything ends by its own process groups.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.integration.ray_head import LocalHead

REPO = Path(__file__).resolve().parents[2]
TINY = "deploy/configs/tiny.yaml"
STEPS = 3
RUN_TIMEOUT_S = 240

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]


def test_teachers_and_students_land_on_their_node_types(dashboard_head: LocalHead, tmp_path: Path) -> None:
    from common.config import load_config
    from common.tiny_world.build import resolve_model_paths

    resolve_model_paths(load_config(REPO / TINY))  # build (or find) the tiny models in the shared cache
    namespace = f"dkd-topo-{uuid.uuid4().hex[:8]}"
    out = tmp_path / "run"
    overrides = [
        f"teachers.namespace={namespace}", "teachers.resources={teacher_gpu: 1}",
        "training.resources_per_worker={student_gpu: 1}", f"training.max_steps={STEPS}",
        f"training.checkpoint_every={STEPS}", "training.batch_size=4", "training.warmup_steps=1",
        "evaluation.enabled=false", "output.plot=false",
    ]
    head = dashboard_head
    proc = subprocess.run(
        [sys.executable, "-m", "student_worker.train", "--config", TINY,
         *[a for kv in overrides for a in ("--set", kv)], "--output-dir", str(out),
         "--address", head.gcs_address, "--no-progress"],
        cwd=REPO, env=head.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert proc.returncode == 0, f"exit {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    status, body = head.api_get("/api/v0/nodes?limit=100")
    assert status == 200, body[:500]
    nodes = json.loads(body)["data"]["result"]["result"]
    node_of = {kind: {n["node_id"] for n in nodes if kind in n.get("resources_total", {})}
               for kind in ("teacher_gpu", "student_gpu")}
    assert all(len(ids) == 1 for ids in node_of.values()), nodes
    status, body = head.api_get(f"/api/v0/actors?limit=1000&detail=1&filter_keys=ray_namespace"
                                f"&filter_predicates=%3D&filter_values={namespace}")
    assert status == 200, body[:500]
    actors = json.loads(body)["data"]["result"]["result"]

    placed = {(a["class_name"], a.get("name") or ""): a["node_id"] for a in actors}
    teachers = {k: v for k, v in placed.items() if k[0] == "TeacherActor"}
    students = {k: v for k, v in placed.items() if k[0] == "StudentWorkerImpl"}
    assert len(teachers) == 2 and len(students) == 2, placed  # sft + base; two ranks
    assert set(teachers.values()) == node_of["teacher_gpu"], placed
    assert set(students.values()) == node_of["student_gpu"], placed
    report = json.loads((out / "report.json").read_text())
    assert report["steps"] == STEPS and (out / "final_model" / "config.json").is_file()
    assert (out / "checkpoints" / f"ckpt-{STEPS:06d}" / "state.json").is_file()
