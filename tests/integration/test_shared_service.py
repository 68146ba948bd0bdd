"""End to end: one long-lived teacher service, two student jobs sharing it.

On a private local head (tests/integration/ray_head.py, token auth on): `python -m teacher_service serve`
starts the tiny teachers as detached named actors; two training drivers, in two separate processes at the
same time, attach to them by namespace (`teachers.attach=true`) and both finish; `status` then counts the
calls of both; `stop` ends the service, after which attaching fails with an error naming the namespace.
"""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.integration.ray_head import LocalHead, local_ray_head

REPO = Path(__file__).resolve().parents[2]
TINY = "deploy/configs/tiny.yaml"
MAX_STEPS = 2
NUM_WORKERS = 1  # one rank per driver keeps two concurrent drivers cheap; each step sends one batch per rank
RUN_TIMEOUT_S = 240

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480)]


def _service_overrides(namespace: str) -> list[str]:
    return ["--set", f"teachers.namespace={namespace}"]


def _train_args(namespace: str, seed: int, out_dir: Path, address: str) -> list[str]:
    reduced = [
        f"teachers.namespace={namespace}", "teachers.attach=true", f"seed={seed}",
        f"training.max_steps={MAX_STEPS}", f"training.checkpoint_every={MAX_STEPS}", "training.batch_size=2",
        f"training.num_workers={NUM_WORKERS}", "training.warmup_steps=1", "evaluation.enabled=false",
        "output.plot=false",
    ]
    return [sys.executable, "-m", "student_worker.train", "--config", TINY,
            *[a for kv in reduced for a in ("--set", kv)],
            "--output-dir", str(out_dir), "--address", address, "--no-progress"]


def _service(head: LocalHead, command: str, namespace: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "teacher_service", command, "--config", TINY, *_service_overrides(namespace),
         "--address", head.gcs_address, *extra],
        cwd=REPO, env=head.env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S,
    )


def test_two_students_share_one_teacher_service(tmp_path: Path) -> None:
    from common.config import load_config
    from student_worker.embedded_models import resolve_model_paths

    resolve_model_paths(load_config(REPO / TINY))  # build (or find) the tiny models in the shared cache
    namespace = f"dkd-svc-{uuid.uuid4().hex[:8]}"
    with local_ray_head(num_cpus=8) as head:
        served = _service(head, "serve", namespace)
        assert served.returncode == 0, f"serve failed:\n{served.stdout}\n{served.stderr}"
        assert namespace in served.stdout

        # Two drivers at once, different seeds (different batches, so no call is a cache hit of the other's).
        out_dirs = [tmp_path / "student_a", tmp_path / "student_b"]
        logs = [open(tmp_path / f"driver_{i}.log", "w") for i in range(2)]
        procs = [subprocess.Popen(_train_args(namespace, seed, out, head.gcs_address), cwd=REPO, env=head.env,
                                  stdout=log, stderr=subprocess.STDOUT)
                 for seed, (out, log) in enumerate(zip(out_dirs, logs))]
        try:
            codes = [p.wait(timeout=RUN_TIMEOUT_S) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
            for log in logs:
                log.close()
        for i, code in enumerate(codes):
            text = (tmp_path / f"driver_{i}.log").read_text()[-4000:]
            assert code == 0, f"driver {i} exited {code}:\n{text}"
        reports = [json.loads((out / "report.json").read_text()) for out in out_dirs]
        assert [r["steps"] for r in reports] == [MAX_STEPS, MAX_STEPS]

        status = _service(head, "status", namespace, "--json")
        assert status.returncode == 0, f"status failed:\n{status.stdout}\n{status.stderr}"
        per_role = json.loads(status.stdout.strip().splitlines()[-1])
        assert set(per_role) >= {"sft", "base"}
        batches_of_both_runs = 2 * MAX_STEPS * NUM_WORKERS
        for role, replicas in per_role.items():
            calls = sum(r["calls"] for r in replicas)
            assert calls >= batches_of_both_runs, (
                f"teacher role {role!r} served {calls} calls; both runs together sent {batches_of_both_runs}")
            # Each report's teacher stats are the service's running totals when that run ended.
            assert sum(r["tokens"] for r in replicas) >= max(rep["teacher_stats"]["tokens"][role] for rep in reports)

        stopped = _service(head, "stop", namespace)
        assert stopped.returncode == 0, f"stop failed:\n{stopped.stdout}\n{stopped.stderr}"
        after = _service(head, "status", namespace)
        assert after.returncode != 0 and namespace in after.stderr, (
            f"status after stop should fail naming {namespace}:\n{after.stdout}\n{after.stderr}")
