"""End to end: the README's teacher-service flow as typed, and one service shared by two student jobs.

On the session's private head (`dashboard_head`, tests/integration/conftest.py; token auth on, its own
token): the README's "teacher service, from Python" lines run as written (`.venv/bin/python` -> this
interpreter; the lines that create the token, start and stop the head are what `local_ray_head` does, and
RAY_ADDRESS stands in for the address `ray start` records on the host). `serve` from a shell without
RAY_AUTH_MODE=token must stop with exit 2 and the one message saying what to set, while `serve` (beside it)
starts the tiny teachers as detached named actors; `status` answers and the README's Python client block
runs (side by side); the README's training command (attach) and a second job with another seed run at the
same time and both finish; `status` counts the calls of both; `stop` ends the service, after which
`status` fails naming the namespace.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from tests.integration.ray_head import LocalHead
from tests.integration.side_by_side import run_together

REPO = Path(__file__).resolve().parents[2]
TINY = "deploy/configs/tiny.yaml"
MAX_STEPS = 2
NUM_WORKERS = 1  # one rank per driver keeps two concurrent drivers cheap; each step sends one batch per rank
RUN_TIMEOUT_S = 240
# What a run needs to stay short here (appended to the README's training command; never changes its meaning).
REDUCED = [f"training.max_steps={MAX_STEPS}", f"training.checkpoint_every={MAX_STEPS}", "training.batch_size=2",
           f"training.num_workers={NUM_WORKERS}", "training.warmup_steps=1", "evaluation.enabled=false",
           "output.plot=false"]
HEAD_LINES = ("ray get-auth-token", "export RAY_AUTH_MODE", "ray start", "ray stop")  # done by local_ray_head

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def readme_flow() -> tuple[list[list[str]], str]:
    """The README's service-flow shell lines (argv, comments dropped) and its Python client block."""
    text = (REPO / "docs" / "TEACHER_SERVICE.md").read_text()
    section = text[text.index("<!-- service-flow"):]
    lines = []
    for line in section.splitlines()[1:]:
        if not line.startswith("    "):
            break
        lines.append(shlex.split(line.split("#", 1)[0]))
    python = re.search(r"```python\n(.*?)```", section, re.S)
    assert lines and python, "README: the service-flow block or its Python block is missing"
    return lines, python.group(1)


def _argv(argv: list[str], namespace: str) -> list[str]:
    """README argv -> this test's: this interpreter, the test's namespace (the service is private)."""
    if argv[0] == ".venv/bin/python":
        argv = [sys.executable, *argv[1:]]
    return [*argv, "--set", f"teachers.namespace={namespace}"]


def _run(argv: list[str], env: dict[str, str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S, **kw)


def test_readme_flow_and_two_students_share_one_teacher_service(dashboard_head: LocalHead, tmp_path: Path) -> None:
    from common.config import load_config
    from common.tiny_world.build import resolve_model_paths

    resolve_model_paths(load_config(REPO / TINY))  # build (or find) the tiny models in the shared cache
    lines, python_block = readme_flow()
    typed = [a for a in lines if not any(" ".join(a).find(h) >= 0 for h in HEAD_LINES)]
    serve, status_cmd, train, stop = typed  # the README's order
    assert serve[-3:] == ["serve", "--config", TINY] and stop[-3:] == ["stop", "--config", TINY]
    assert "teachers.attach=true" in train
    namespace = f"dkd-svc-{uuid.uuid4().hex[:8]}"
    head = dashboard_head
    env = {**head.env, "RAY_ADDRESS": head.gcs_address}
    # 1. A shell without RAY_AUTH_MODE=token: one clear message, exit 2. Ray would retry the refused
    # connection 20 times, 1 s apart (RAY_NUM_REDIS_GET_RETRIES); 3 tries are refused the same way.
    # It runs beside step 2's `serve` (it cannot connect, so it changes nothing there).
    no_auth = {k: v for k, v in env.items() if k != "RAY_AUTH_MODE"} | {"RAY_NUM_REDIS_GET_RETRIES": "3"}
    refused, served = run_together([(_argv(serve, namespace), no_auth), (_argv(serve, namespace), env)],
                                   REPO, RUN_TIMEOUT_S)
    assert refused.returncode == 2, f"{refused.returncode}\n{refused.stdout}\n{refused.stderr[-3000:]}"
    err = refused.stderr.strip().splitlines()
    assert any(line.startswith(f"error: cannot connect to the Ray cluster at '{head.gcs_address}'") for line in err)
    assert "export RAY_AUTH_MODE=token" in refused.stderr and "Traceback" not in refused.stderr

    # 2. The README's lines as typed (`status` and the Python client only read the service: side by side).
    assert served.returncode == 0, f"serve failed:\n{served.stdout}\n{served.stderr}"
    assert namespace in served.stdout
    status, client = run_together([
        (_argv(status_cmd, namespace), env),
        ([sys.executable, "-c", python_block.replace('"deltakd-tiny"', repr(namespace))
          + "\nprint('shapes', ids.shape, base_logprobs.shape, record.batch_id is not None)"], env)],
        REPO, RUN_TIMEOUT_S)
    assert status.returncode == 0 and "sft: 1 replica(s)" in status.stdout, status.stdout + status.stderr
    assert client.returncode == 0 and "shapes" in client.stdout, f"{client.stdout}\n{client.stderr[-3000:]}"

    # 3. The README's training command and a second job (another seed) at once, both attached.
    out_dirs = [tmp_path / "student_a", tmp_path / "student_b"]
    cmds = [[*_argv(train, namespace), *[a for kv in REDUCED for a in ("--set", kv)],
             "--output-dir", str(out_dirs[0]), "--no-progress"],
            [*_argv(train, namespace), *[a for kv in [*REDUCED, "seed=1"] for a in ("--set", kv)],
             "--output-dir", str(out_dirs[1]), "--no-progress"]]
    logs = [open(tmp_path / f"driver_{i}.log", "w") for i in range(2)]
    procs = [subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
             for cmd, log in zip(cmds, logs)]
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

    status = _run([*_argv(status_cmd, namespace), "--json"], env)
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

    stopped = _run(_argv(stop, namespace), env)
    assert stopped.returncode == 0, f"stop failed:\n{stopped.stdout}\n{stopped.stderr}"
    after = _run(_argv(status_cmd, namespace), env)
    assert after.returncode != 0 and namespace in after.stderr, (
        f"status after stop should fail naming {namespace}:\n{after.stdout}\n{after.stderr}")


