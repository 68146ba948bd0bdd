"""Faults survived (docs/DESIGN.md section 4), on tiny models in the session's local Ray cluster.

Every run here trains the same config on one shared, restartable teacher service (max_restarts=2,
max_task_retries=-1), and is compared with ONE uninterrupted reference run of this module: on CPU the
metrics rows (loss, parts, grad norm, lr, batch ids) and the final weights must be bit-for-bit equal.

- a teacher actor killed mid-run (Ray restarts it, its calls are retried): same rows, every batch id once;
- a student worker killed mid-run: the driver restores the group from the last checkpoint; same weights,
  the replayed steps' rows replaced, not duplicated;
- the driver SIGKILLed mid-run (a CLI subprocess attached with --address): `--resume` gives the same weights;
- one rank raising mid-step (after the input agreement: the other rank sits in DDP's all-reduce): the driver
  kills the group at once and restores it from the last checkpoint; same weights, recovered in seconds;
- a crash while a checkpoint is written (FaultPlan.crash_in_checkpoint): the previous checkpoint is
  intact, and resuming from it gives the same weights;
- Ctrl-C (SIGINT to the CLI driver) mid-run: exit 130 and one message (steps reached, last checkpoint, the
  command with --resume), the traceback in error.log; resuming gives the same weights;
- a full disk while a checkpoint is written (the output dir on a real tmpfs shrunk to what it holds, when
  this process may mount one): exit 74 and one message; the previous checkpoint is intact, the partial one
  removed, and once there is space again resuming gives the same weights;
- the same faults under `training.strategy=fsdp2` (a sharded student, sharded checkpoints): a killed student
  worker and a SIGKILLed driver give the uninterrupted fsdp2 run's weights bit for bit, and that run matches
  the DDP reference within FSDP2_RTOL (a different reduction order of the same fp32 sums);
- a teacher that stays dead (LAST: it kills the shared service): exit code 3, TeacherUnavailableError naming
  role and batch on stderr, a checkpoint of the completed steps; once teachers are back, resume completes.

Kills are timed by polling metrics.jsonl; a FaultPlan's `step_delay_s` (common/faults.py) slows each step a
little so "mid-run" is reliable without sleeps in production code. Faults are handed to the driver, not
written in the config, so the runs with them and the reference run without are the same run for resume
and comparisons. A CLI subprocess gets its plan through tests/integration/fault_run.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray

from common.config import RunConfig, dump_config
from common.faults import FaultPlan, RankError
from student_worker import checkpoint as ckpt
from tests.integration.test_student_training import (
    comparable,
    load_weights,
    make_cfg,
    read_rows,
)

REPO = Path(__file__).resolve().parents[2]
STEPS = 8
RUN_OVERRIDES = [f"training.max_steps={STEPS}", "training.checkpoint_every=2", "training.keep_checkpoints=8",
                 "training.batch_size=4", "output.plot=false"]
# fsdp2 runs also evaluate the final student once (a gathered copy generates on rank 0; evaluation is
# RESUME_FREE and outside the compared rows and weights)
FSDP2 = ["training.strategy=fsdp2", "evaluation.enabled=true", "evaluation.evaluate_before=false",
         "evaluation.evaluate_teacher=false"]
DELAYED = FaultPlan(step_delay_s=0.25)
# fsdp2 vs ddp, fp32 on CPU: the same gradient sums in another order (FSDP2 reduce-scatters per layer and
# takes the clipping norm from per-shard partial sums; DDP all-reduces buckets), so each step differs by a
# few fp32 ulps, compounded by AdamW over the run's steps (measured over 8 steps: losses and grad norms within
# 1.2e-7 relative, weights within 6e-8 absolute; the bounds leave ~10x).
FSDP2_RTOL = 1e-6
FSDP2_ATOL = 1e-6
SUBPROCESS_TIMEOUT_S = 180

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def tiny(tiny_world):
    return tiny_world  # the session's tiny world (tests/integration/conftest.py)


@pytest.fixture(scope="module")
def service(session_teachers):
    """The session's restartable teacher service (tests/integration/session_teachers.py), shared by every run
    of the module: (tag, overrides that attach)."""
    return session_teachers.ensure()


def _cfg(tiny: dict[str, Path], service: tuple[str, list[str]], out: Path, extra: list[str] | None = None) -> RunConfig:
    tag, attach = service
    return make_cfg(tiny, out, attach + RUN_OVERRIDES + (extra or []), tag=tag)


def _reference_run(tiny: dict[str, Path], service: tuple[str, list[str]], out: Path,
                   extra: list[str] | None = None) -> dict[str, Any]:
    from student_worker.driver import run_training

    run_training(_cfg(tiny, service, out, extra), progress=False)
    rows = read_rows(out)
    assert [r["step"] for r in rows] == list(range(STEPS))
    return {"rows": comparable(rows), "weights": load_weights(out / "final_model"), "out": out, "extra": extra or []}


@pytest.fixture(scope="module")
def reference(tiny, service, tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted run every fault run must reproduce exactly."""
    return _reference_run(tiny, service, tmp_path_factory.mktemp("reference") / "run")


@pytest.fixture(scope="module")
def fsdp2_reference(tiny, service, tmp_path_factory) -> dict[str, Any]:
    """The same run with a sharded student (training.strategy=fsdp2), uninterrupted."""
    return _reference_run(tiny, service, tmp_path_factory.mktemp("fsdp2-reference") / "run", FSDP2)


@pytest.fixture(params=["ddp", "fsdp2"])
def strategy_reference(request) -> dict[str, Any]:
    """The uninterrupted run of the strategy a parametrised fault test runs with."""
    return request.getfixturevalue("reference" if request.param == "ddp" else "fsdp2_reference")


def _assert_same_as_reference(out: Path, reference: dict[str, Any]) -> None:
    rows = read_rows(out)
    assert [r["step"] for r in rows] == list(range(STEPS)), "a step is missing or was logged twice"
    ids = sorted(b for r in rows for b in r["batch_ids"])
    assert ids == list(range(2 * STEPS)), f"batch ids not trained exactly once: {ids}"
    assert comparable(rows) == reference["rows"]  # loss trajectory, grad norms, lr: bit for bit
    weights = load_weights(out / "final_model")
    assert weights.keys() == reference["weights"].keys()
    for name, w in weights.items():
        assert np.array_equal(w, reference["weights"][name]), name


def _wait_for_step(out: Path, step: int, alive: Callable[[], bool], what: str) -> None:
    """Poll metrics.jsonl until a row with `step` or more is logged (the run must still be alive)."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while time.monotonic() < deadline:
        if (out / "metrics.jsonl").is_file():
            rows = [r for r in read_rows(out) if r["step"] >= step]
            if rows:
                return
        assert alive(), f"{what} ended before step {step} was logged"
        time.sleep(0.05)
    raise AssertionError(f"{what}: step {step} not logged within {SUBPROCESS_TIMEOUT_S} s")


def _in_thread(cfg: RunConfig, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    from student_worker.driver import run_training

    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["report"] = run_training(cfg, progress=False, **kwargs)
        except BaseException as exc:  # handed to the test thread, which asserts on it
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _train_cli(cfg: RunConfig, tmp: Path, ray_cluster: dict, *args: str, log_name: str = "driver.log",
               faults: FaultPlan | None = None) -> tuple[subprocess.Popen, Path]:
    """`python -m student_worker.train` on this config, attached to the session cluster with --address; with
    `faults`, the same entry through tests/integration/fault_run.py."""
    config_path = tmp / f"{log_name}.yaml"
    dump_config(cfg, config_path)
    env = dict(os.environ)
    log = tmp / log_name
    entry = ["student_worker.train"] if faults is None else [
        "tests.integration.fault_run", "--faults", faults.to_json(), "train"]
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", *entry, "--config", str(config_path),
                                 "--address", ray_cluster["gcs_address"], "--no-progress", *args],
                                cwd=REPO, env=env, stdout=f, stderr=subprocess.PIPE, text=True)
    return proc, log


def _student_worker_names(cfg: RunConfig) -> list[str]:
    prefix = f"{cfg.run_name}-student-"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == cfg.teachers.namespace and a["name"].startswith(prefix))


def test_killed_teacher_is_restarted_and_the_run_equals_the_uninterrupted_one(
        tiny, service, reference, tmp_path) -> None:
    from student_worker.worker import STEP_PARTS
    from teacher_service.naming import replica_name

    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out)
    sft = ray.get_actor(replica_name(cfg.teachers.name_prefix, "sft", 0), namespace=cfg.teachers.namespace)
    pid_before = ray.get(sft.health.remote())["pid"]
    thread, box = _in_thread(cfg, faults=DELAYED)
    _wait_for_step(out, 2, thread.is_alive, "the run")
    ray.kill(sft, no_restart=False)  # Ray restarts it; calls in flight are retried on the new process
    thread.join()
    assert "error" not in box, box.get("error")
    assert ray.get(sft.health.remote())["pid"] != pid_before, "the sft teacher was not restarted"
    assert box["report"]["worker_restarts"] == 0
    _assert_same_as_reference(out, reference)
    # The time adds up: every row's named parts sum to its step time, and the restart shows up as teacher
    # wait: in the slowest step (the one that waited for the restarted teacher) the wait is the largest part.
    rows = read_rows(out)
    for r in rows:
        assert set(r["step_parts"]) == set(STEP_PARTS)
        assert sum(r["step_parts"].values()) == pytest.approx(r["step_s"], rel=1e-9, abs=1e-9)
        assert r["teacher_wait_s"] == r["step_parts"]["record_wait_s"]
    slowest = max(rows, key=lambda r: r["step_s"])
    parts = slowest["step_parts"]
    assert max(parts, key=parts.get) == "record_wait_s", slowest


def test_rank_raising_mid_step_kills_the_group_and_restores_it_at_once(tiny, service, reference, tmp_path) -> None:
    """Rank 1 raises after the input agreement at step 5 (rank 0 goes on into DDP's all-reduce and would wait
    there for the collective timeout): the driver kills both at once and replays from checkpoint 4."""
    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out, ["training.collective_timeout_s=600"])
    from student_worker.driver import run_training

    report = run_training(cfg, progress=False, faults=FaultPlan(rank_error=RankError(rank=1, step=5)))
    assert report["worker_restarts"] == 1
    (recovery,) = report["recoveries"]
    assert recovery["step"] == 5 and recovery["rank"] == 1 and recovery["restored_step"] == 4
    assert "InjectedRankError" in recovery["cause"] and "raised mid-step" in recovery["cause"]
    print(f"\nrank error at step 5: worker group killed and restored in {recovery['seconds']:.1f} s")
    assert _student_worker_names(cfg) == [], "workers of the run left behind"
    _assert_same_as_reference(out, reference)


def test_killed_student_worker_is_restored_from_the_last_checkpoint(
        tiny, service, strategy_reference, tmp_path) -> None:
    reference = strategy_reference
    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out, reference["extra"])
    thread, box = _in_thread(cfg, faults=DELAYED)
    _wait_for_step(out, 3, thread.is_alive, "the run")  # checkpoint 2 exists, step 3 is done
    names = _student_worker_names(cfg)
    assert len(names) == 2 and names[1].startswith(f"{cfg.run_name}-student-1-"), names
    ray.kill(ray.get_actor(names[1], namespace=cfg.teachers.namespace), no_restart=True)
    thread.join()
    assert "error" not in box, box.get("error")
    assert box["report"]["worker_restarts"] == 1
    after = _student_worker_names(cfg)
    assert after == [], f"workers of the run left behind: {after}"
    _assert_same_as_reference(out, reference)  # rows of the replayed steps replaced, not duplicated


def test_sigkilled_driver_resumes_with_the_same_weights(tiny, service, strategy_reference, ray_cluster,
                                                         tmp_path, capsys) -> None:
    reference = strategy_reference
    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out, reference["extra"])
    proc, _ = _train_cli(cfg, tmp_path, ray_cluster, log_name="a.log", faults=DELAYED)
    try:
        _wait_for_step(out, 3, lambda: proc.poll() is None, "the CLI driver")
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert (out / "final_model").exists() is False
    assert ckpt.latest_checkpoint(out / "checkpoints") is not None

    # `--resume` through the CLI's main() in this process, with the config file the killed driver ran (on the
    # session cluster: no second interpreter start-up to pay; the killed driver was the real CLI process)
    from student_worker.train import main

    capsys.readouterr()
    code = main(["--config", str(tmp_path / "a.log.yaml"), "--resume", "--no-progress"])
    assert code == 0, f"--resume failed:\n{capsys.readouterr().err[-3000:]}"
    _assert_same_as_reference(out, reference)


def test_fsdp2_matches_ddp(reference, fsdp2_reference) -> None:
    """The sharded student trains the same run as the DDP one: losses, grad norms and final weights within
    FSDP2_RTOL / FSDP2_ATOL (fp32 on CPU, the same sums in another order), lr and batch ids exactly; its
    checkpoints are sharded (DCP) and its final_model/ an HF safetensors model like DDP's."""
    ddp_rows, fsdp_rows = reference["rows"], fsdp2_reference["rows"]
    for key in ("step", "lr", "batch_ids", "tokens"):
        assert [r[key] for r in fsdp_rows] == [r[key] for r in ddp_rows], key
    worst: dict[str, float] = {}
    for key in ("loss", "grad_norm"):
        a, b = np.array([r[key] for r in fsdp_rows]), np.array([r[key] for r in ddp_rows])
        worst[key] = float(np.max(np.abs(a - b) / np.abs(b)))
        np.testing.assert_allclose(a, b, rtol=FSDP2_RTOL, err_msg=key)
    w_ddp, w_fsdp = reference["weights"], fsdp2_reference["weights"]
    assert w_fsdp.keys() == w_ddp.keys()
    worst["weights_abs"] = max(float(np.max(np.abs(w_fsdp[k] - w_ddp[k]))) for k in w_ddp)
    for name in w_ddp:
        np.testing.assert_allclose(w_fsdp[name], w_ddp[name], rtol=FSDP2_RTOL, atol=FSDP2_ATOL, err_msg=name)
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(fsdp2_reference["out"] / "final_model")
    for name, tensor in loaded.state_dict().items():
        if name in w_fsdp:
            assert np.array_equal(tensor.numpy(), w_fsdp[name]), name
    print(f"\nfsdp2 vs ddp over {STEPS} steps: max relative diff {worst}")
    report = json.loads((fsdp2_reference["out"] / "report.json").read_text())
    assert 0.0 <= report["rouge"]["student_after"]["rougeL"] <= 1.0, report["rouge"]
    latest = ckpt.latest_checkpoint(fsdp2_reference["out"] / "checkpoints")
    assert latest is not None and (latest / ckpt.SHARDED_DIR / ".metadata").is_file()
    assert sorted(p.name for p in (latest / ckpt.SHARDED_DIR).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (latest / ckpt.MODEL_DIR).exists() and not (latest / ckpt.OPTIMIZER_FILE).exists()
    ckpt.verify_checkpoint(latest)


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(
        tiny, service, reference, ray_cluster, tmp_path) -> None:
    from student_worker.driver import run_training

    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out)  # the resume below runs without the fault
    proc, log = _train_cli(cfg, tmp_path, ray_cluster, faults=FaultPlan(crash_in_checkpoint=4))
    _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 1, f"expected the fault's exit 1:\n{log.read_text()[-3000:]}\n{stderr[-3000:]}"
    root = out / "checkpoints"
    assert (root / "ckpt-000004.tmp" / "state.json").read_text() == '{"step": ', "no half-written checkpoint"
    previous = ckpt.latest_checkpoint(root)
    assert previous is not None and previous.name == "ckpt-000002"
    ckpt.verify_checkpoint(previous)  # intact: JSON state, safetensors, weights-only optimizer state
    intact = {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()}

    report = run_training(cfg, resume=True, progress=False)
    assert report["steps"] == STEPS
    assert {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()} == intact
    assert not (root / "ckpt-000004.tmp").exists() and (root / "ckpt-000004").is_dir()
    _assert_same_as_reference(out, reference)


def _message(stderr: str, first: str) -> list[str]:
    """The CLI's closing message: the lines of stderr from the one starting with `first` (it must be last)."""
    lines = stderr.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(first)]
    assert starts, f"no line starting with {first!r} in stderr:\n{stderr[-3000:]}"
    return lines[starts[-1]:]


def _assert_resume_message(lines: list[str], out: Path, config_path: Path) -> None:
    """The message names the last complete checkpoint (and its step) and the command that continues."""
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert latest is not None
    assert f"  last complete checkpoint: {latest} (step {ckpt.read_state(latest)['step']})" in lines, lines
    (cont,) = [line for line in lines if line.startswith("  continue with: ")]
    assert cont.split().count("--resume") == 1 and f"--config {config_path}" in cont, cont
    assert "-m student_worker.train" in cont, cont
    assert f"  traceback: {out / 'error.log'}" in lines, lines


def test_ctrl_c_ends_with_one_message_and_resume_continues_exactly(
        tiny, service, reference, ray_cluster, tmp_path) -> None:
    from student_worker.driver import run_training

    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out)
    proc, log = _train_cli(cfg, tmp_path, ray_cluster, log_name="a.log", faults=DELAYED)
    try:
        _wait_for_step(out, 3, lambda: proc.poll() is None, "the CLI driver")  # checkpoint 2 exists
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        ended_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == 130, f"exit {proc.returncode}:\n{log.read_text()[-3000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    lines = _message(stderr, "interrupted (Ctrl-C) ")
    assert len(lines) == 4, lines  # the message ends stderr: what happened, checkpoint, command, traceback
    reached = re.fullmatch(rf"interrupted \(Ctrl-C\) after (\d+) of {STEPS} steps", lines[0])
    assert reached and 3 <= int(reached[1]) < STEPS and int(reached[1]) == len(read_rows(out)), lines
    _assert_resume_message(lines, out, tmp_path / "a.log.yaml")
    assert "KeyboardInterrupt" in (out / "error.log").read_text()
    print(f"\nSIGINT at step {reached[1]}: exit 130 after {ended_s:.1f} s")
    deadline = time.monotonic() + 60
    while _student_worker_names(cfg):  # the driver killed its workers on the way out
        assert time.monotonic() < deadline, f"workers left behind: {_student_worker_names(cfg)}"
        time.sleep(0.1)

    report = run_training(cfg, resume=True, progress=False)
    assert report["steps"] == STEPS
    _assert_same_as_reference(out, reference)


@contextmanager
def _small_tmpfs(path: Path) -> Iterator[Path]:
    """A real tmpfs at `path` (64 MiB), unmounted at the end; skips the test where mounting is not allowed."""
    path.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=0700", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root / CAP_SYS_ADMIN): {done.stderr.strip()}")
    try:
        yield path
    finally:
        if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(path)], check=True)  # a straggler still holds a file


def _resize_tmpfs(path: Path, size_bytes: int) -> None:
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(path)], check=True, capture_output=True)


def test_full_disk_while_writing_a_checkpoint_keeps_the_previous_one(
        tiny, service, reference, tmp_path, capsys) -> None:
    """The output dir on a real tmpfs holding the reference run's first two checkpoints (2 and 4: what a run
    stopped after 4 steps leaves), shrunk to what it holds plus half a checkpoint, so the resumed run's
    checkpoint 6 cannot be written (ENOSPC from the real writes: safetensors, torch.save, JSON). Then the
    space comes back and --resume finishes the run. The CLI's main() runs in this process (on the session
    cluster: no interpreter start-up to pay)."""
    from student_worker.driver import run_training
    from student_worker.train import main

    with _small_tmpfs(tmp_path / "small") as mnt:
        out = mnt / "run"
        cfg = _cfg(tiny, service, out)
        for name in ("ckpt-000002", "ckpt-000004"):
            shutil.copytree(reference["out"] / "checkpoints" / name, out / "checkpoints" / name)
        previous = out / "checkpoints" / "ckpt-000004"
        intact = {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()}
        one_checkpoint = sum(len(b) for b in intact.values())
        fs = os.statvfs(mnt)
        used = (fs.f_blocks - fs.f_bfree) * fs.f_frsize
        _resize_tmpfs(mnt, used + one_checkpoint // 2)

        config_path = tmp_path / "run.yaml"
        dump_config(cfg, config_path)
        capsys.readouterr()
        code = main(["--config", str(config_path), "--resume", "--no-progress"])
        stderr = capsys.readouterr().err
        assert code == 74, f"exit {code}:\n{stderr[-3000:]}"
        assert "Traceback" not in stderr, stderr[-3000:]
        lines = _message(stderr, "error: I/O error [ENOSPC] ")
        assert len(lines) == 6, lines  # what failed, partial removed, free space, checkpoint, command, traceback
        assert lines[0].startswith(f"error: I/O error [ENOSPC] after 6 of {STEPS} steps: cannot write checkpoint "
                                   "ckpt-000006 (step 6)"), lines
        assert "No space left on device" in lines[0] and "  the partial checkpoint was removed" in lines, lines
        _assert_resume_message(lines, out, config_path)
        assert "No space left on device" in (out / "error.log").read_text()
        root = out / "checkpoints"
        assert sorted(p.name for p in root.iterdir()) == ["ckpt-000002", "ckpt-000004"]  # no .tmp left
        assert {p.relative_to(previous): p.read_bytes() for p in previous.rglob("*") if p.is_file()} == intact
        ckpt.verify_checkpoint(previous)

        _resize_tmpfs(mnt, 64 << 20)  # space again: the command from the message continues the run
        report = run_training(cfg, resume=True, progress=False)
        assert report["steps"] == STEPS
        _assert_same_as_reference(out, reference)


def test_teacher_dead_past_retries_stops_with_a_checkpoint_then_resumes(
        tiny, service, reference, ray_cluster, session_teachers, tmp_path) -> None:
    """Runs LAST: kills the module's teacher service for good, then starts it again for the resume (and for
    the service's later users: it is the session's, tests/integration/session_teachers.py)."""
    from student_worker.driver import run_training
    from teacher_service.naming import replica_name

    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out)
    ns, prefix = cfg.teachers.namespace, cfg.teachers.name_prefix
    proc, log = _train_cli(cfg, tmp_path, ray_cluster, faults=DELAYED)
    try:
        _wait_for_step(out, 2, lambda: proc.poll() is None, "the CLI driver")
        ray.kill(ray.get_actor(replica_name(prefix, "base", 0), namespace=ns), no_restart=True)
        _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == 3, f"exit {proc.returncode}:\n{log.read_text()[-3000:]}\n{stderr[-3000:]}"
    assert "TeacherUnavailableError: teacher role 'base' unavailable for batch" in stderr, stderr[-3000:]
    done = len(read_rows(out))
    assert 0 < done < STEPS
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert latest is not None and ckpt.read_state(latest)["step"] == done  # every completed step kept

    # The service comes back (same names): stop what is left of it (the sft replica), wait until the names
    # are released, start it again (SessionTeachers.restart), resume.
    assert session_teachers.restart() == service
    report = run_training(cfg, resume=True, progress=False)
    assert report["steps"] == STEPS
    _assert_same_as_reference(out, reference)
