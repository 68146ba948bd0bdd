"""Faults survived (docs/DESIGN.md section 4), on tiny models in the session's local Ray cluster.

Every run here trains the same config on one shared, restartable teacher service (max_restarts=2,
max_task_retries=-1), and is compared with ONE uninterrupted reference run of this module: on CPU the
metrics rows (loss, parts, grad norm, lr, batch ids) and the final weights must be bit-for-bit equal.
Several faults share one run where they can (starting student workers and CLI drivers is what costs here);
each check's message names the fault it is about.

- one in-process run with three faults in turn: rank 1 raising mid-step at step 3 (after the input agreement:
  rank 0 sits in DDP's all-reduce; the driver kills the group at once and restores it from checkpoint 2), a
  student worker killed at step 5 of the restored group (restored again, from checkpoint 4; the replayed
  steps' rows replaced, not duplicated), then the base teacher killed (Ray restarts it, its calls are retried;
  no worker restart; the restart shows as the slowest step's teacher wait): same rows, every batch id once;
- one chain of stops and driver deaths, each resumed by the next (test_resume's stop/resume is its first link):
  `stop_after=3` (and a resume with another config refused, naming the key); a CLI `--resume` that crashes
  while writing checkpoint 4 (FaultPlan.crash_in_checkpoint: the previous checkpoint is intact); a CLI
  `--resume` SIGKILLed mid-run; a CLI `--resume` Ctrl-C'd mid-run (exit 130 and one message: steps reached,
  last checkpoint, the command with --resume, the traceback in error.log); a last `--resume` ends with the
  reference's rows and weights;
- a full disk while a checkpoint is written (the output dir on a real tmpfs shrunk to what it holds, when
  this process may mount one): exit 74 and one message; the previous checkpoint is intact, the partial one
  removed, and once there is space again resuming gives the same weights;
- the same faults under `training.strategy=fsdp2` (a sharded student, sharded checkpoints): one CLI run in
  which a student worker is killed (restored from a sharded checkpoint) and then the driver is SIGKILLed;
  `--resume` gives the uninterrupted fsdp2 run's rows and weights bit for bit, and that run matches the DDP
  reference within FSDP2_RTOL (a different reduction order of the same fp32 sums);
- a teacher that stays dead (LAST: it kills the shared service's base replica for good): exit code 3
  (TrainingRunError), the message naming role and batch, a checkpoint of the completed steps; once the replica
  is started again, resume completes.

Faults land at known points of runs that go at full speed: a FaultPlan hold (common/faults.py) stops every
student rank at the end of a given step of a given worker group until the test has acted and releases it.
Faults are handed to the driver, not written in the config, so the runs with them and the reference run
without are the same run for resume and comparisons. A CLI subprocess gets its plan through
tests/integration/fault_run.py.
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
from common.faults import FaultPlan, Hold, RankError
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
RANKS = 2  # make_cfg's training.num_workers
# fsdp2 vs ddp, fp32 on CPU: the same gradient sums in another order (FSDP2 reduce-scatters per layer and
# takes the clipping norm from per-shard partial sums; DDP all-reduces buckets), so each step differs by a
# few fp32 ulps, compounded by AdamW over the run's steps (measured over 8 steps: losses and grad norms within
# 1.2e-7 relative, weights within 6e-8 absolute; the bounds leave ~10x).
FSDP2_RTOL = 1e-6
FSDP2_ATOL = 1e-6
SUBPROCESS_TIMEOUT_S = 180
POLL_S = 0.1

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


def _reference_run(tiny: dict[str, Path], service: tuple[str, list[str]], out: Path, warm: Any,
                   extra: list[str] | None = None) -> dict[str, Any]:
    from student_worker.driver import run_training

    run_training(_cfg(tiny, service, out, extra), progress=False, warm=warm)
    rows = read_rows(out)
    assert [r["step"] for r in rows] == list(range(STEPS))
    return {"rows": comparable(rows), "weights": load_weights(out / "final_model"), "out": out, "extra": extra or []}


@pytest.fixture(scope="module")
def reference(tiny, service, warm_ranks, tmp_path_factory) -> dict[str, Any]:
    """The uninterrupted run every fault run must reproduce exactly."""
    return _reference_run(tiny, service, tmp_path_factory.mktemp("reference") / "run", warm_ranks)


@pytest.fixture(scope="module")
def fsdp2_reference(tiny, service, tmp_path_factory) -> dict[str, Any]:
    """The same run with a sharded student (training.strategy=fsdp2), uninterrupted."""
    return _reference_run(tiny, service, tmp_path_factory.mktemp("fsdp2-reference") / "run", None, FSDP2)


def _assert_same_as_reference(out: Path, reference: dict[str, Any], what: str,
                              origin: Callable[[int], str] | None = None) -> None:
    """Rows and final weights bit for bit. `what` names the run's faults; `origin(step)` says which part of a
    run with several faults trained that step's final row (which fault a differing row follows)."""
    rows = read_rows(out)
    assert [r["step"] for r in rows] == list(range(STEPS)), f"{what}: a step is missing or was logged twice"
    ids = sorted(b for r in rows for b in r["batch_ids"])
    assert ids == list(range(2 * STEPS)), f"{what}: batch ids not trained exactly once: {ids}"
    got = comparable(rows)
    for step, (mine, ref) in enumerate(zip(got, reference["rows"], strict=True)):
        where = f" ({origin(step)})" if origin is not None else ""
        assert mine == ref, f"{what}: step {step}{where} differs from the uninterrupted run"  # bit for bit
    weights = load_weights(out / "final_model")
    assert weights.keys() == reference["weights"].keys(), what
    for name, w in weights.items():
        assert np.array_equal(w, reference["weights"][name]), f"{what}: final weight {name}"


def _wait_until(cond: Callable[[], bool], alive: Callable[[], bool], what: str) -> None:
    """Poll `cond` until it holds; the run must stay alive meanwhile."""
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not cond():
        assert alive(), f"the run ended before {what}"
        assert time.monotonic() < deadline, f"{what}: not within {SUBPROCESS_TIMEOUT_S} s"
        time.sleep(POLL_S)


def _latest_is(out: Path, step: int) -> Callable[[], bool]:
    """True once the newest complete checkpoint is the one of `step` completed steps."""
    def check() -> bool:
        latest = ckpt.latest_checkpoint(out / "checkpoints")
        return latest is not None and latest.name == ckpt.checkpoint_name(step)
    return check


def _at_hold(plan: FaultPlan, hold: Hold, alive: Callable[[], bool], what: str) -> None:
    """Wait until every rank waits at `hold` (the run is stopped there until `plan.release(hold)`)."""
    _wait_until(lambda: plan.held(hold, RANKS), alive, f"{what}: every rank at step {hold.step} "
                                                       f"(worker group {hold.generation})")


def _holding(tmp: Path, *holds: Hold, **faults: Any) -> FaultPlan:
    hold_dir = tmp / "holds"
    hold_dir.mkdir(parents=True)
    return FaultPlan(holds=holds, hold_dir=str(hold_dir), **faults)


def _in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[threading.Thread, dict[str, Any]]:
    """fn(*args, **kwargs) in a thread: box["result"], or box["error"] with what it raised."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["result"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the test thread, which asserts on it
            box["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    return thread, box


def _train_cli(config_path: Path, log: Path, ray_cluster: dict, *args: str,
               faults: FaultPlan | None = None) -> subprocess.Popen:
    """`python -m student_worker.train --config config_path`, attached to the session cluster with --address;
    with `faults`, the same entry through tests/integration/fault_run.py. stdout goes to `log`."""
    entry = ["student_worker.train"] if faults is None else [
        "tests.integration.fault_run", "--faults", faults.to_json(), "train"]
    with open(log, "w") as f:
        return subprocess.Popen([sys.executable, "-m", *entry, "--config", str(config_path),
                                 "--address", ray_cluster["gcs_address"], "--no-progress", *args],
                                cwd=REPO, env=dict(os.environ), stdout=f, stderr=subprocess.PIPE, text=True)


def _resume_cli_until(config_path: Path, log: Path, ray_cluster: dict, out: Path, hold: Hold, checkpoint: int,
                      tmp: Path, what: str) -> subprocess.Popen:
    """`--resume` through the CLI, waited for until every rank waits at `hold` and checkpoint `checkpoint` is
    written: the moment the test signals the driver. The process is ended if it never gets there."""
    plan = _holding(tmp, hold)
    proc = _train_cli(config_path, log, ray_cluster, "--resume", faults=plan)
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        _at_hold(plan, hold, alive, what)
        _wait_until(_latest_is(out, checkpoint), alive, f"{what}: checkpoint {checkpoint}")
    except BaseException:
        _end(proc)
        raise
    return proc


def _end(proc: subprocess.Popen) -> str:
    """Make sure the CLI process is gone; its stderr."""
    if proc.poll() is None:
        proc.kill()
    _, stderr = proc.communicate(timeout=60)
    return stderr


def _student_worker_names(cfg: RunConfig) -> list[str]:
    prefix = f"{cfg.run_name}-student-"
    return sorted(a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                  if a["namespace"] == cfg.teachers.namespace and a["name"].startswith(prefix))


def _no_workers_left(cfg: RunConfig, what: str) -> None:
    deadline = time.monotonic() + 60
    while _student_worker_names(cfg):  # a driver kills its workers on the way out (Ray those of a dead one)
        assert time.monotonic() < deadline, f"{what}: workers left behind: {_student_worker_names(cfg)}"
        time.sleep(POLL_S)


def _warm_run_ranks(warm: Any) -> list[str]:
    """The names of the ranks a run on `warm` (WarmRanks) holds now, in rank order: its namespace's live ranks
    that are not idle (a rank started for a WarmRanks is named student-<n>-<uid>, n counting up in rank order)."""
    idle = set(warm.idle_names())
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if a["namespace"] == warm.namespace and a["name"] not in idle]
    return sorted(names, key=lambda name: int(name.split("-")[1]))


def _kill_rank(cfg: RunConfig, rank: int, what: str, warm: Any = None) -> None:
    """Kill student rank `rank` of the run of `cfg` (on `warm`'s ranks when it runs on a WarmRanks)."""
    if warm is None:
        names, namespace = _student_worker_names(cfg), cfg.teachers.namespace
        assert len(names) == RANKS and names[rank].startswith(f"{cfg.run_name}-student-{rank}-"), f"{what}: {names}"
    else:
        names, namespace = _warm_run_ranks(warm), warm.namespace
        assert len(names) == RANKS, f"{what}: {names}"
    ray.kill(ray.get_actor(names[rank], namespace=namespace), no_restart=True)


def _files(directory: Path) -> dict[Path, bytes]:
    return {p.relative_to(directory): p.read_bytes() for p in directory.rglob("*") if p.is_file()}


def test_rank_error_killed_worker_and_killed_teacher_in_one_run_equal_the_uninterrupted_one(
        tiny, service, reference, tmp_path, warm_ranks) -> None:
    """Three faults in turn, each in its own worker group (FaultPlan holds stop the ranks where one lands):
    1. rank 1 raises at step 3 after the input agreement (rank 0 goes on into DDP's all-reduce and would wait
       there for the collective timeout): the driver kills both at once, restores from checkpoint 2;
    2. rank 1 of the restored group is killed at the end of step 5: restored again, from checkpoint 4;
    3. the base teacher is killed at the end of step 4 of the third group: Ray restarts it, its calls are
       retried, no worker restarts; the steps after it wait for the restarted teacher.
    The first group takes the session's warm ranks (the rank error kills them); the third, which ends the run
    cleanly, hands its ranks back for the module's later in-process runs."""
    from student_worker.driver import run_training
    from student_worker.worker import STEP_PARTS
    from teacher_service.naming import replica_name

    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out, ["training.collective_timeout_s=600"])
    killed_worker, killed_teacher = Hold(step=5, generation=1), Hold(step=4, generation=2)
    plan = _holding(tmp_path, killed_worker, killed_teacher, rank_error=RankError(rank=1, step=3))
    base = ray.get_actor(replica_name(cfg.teachers.name_prefix, "base", 0), namespace=cfg.teachers.namespace)
    pid_before = ray.get(base.health.remote())["pid"]
    thread, box = _in_thread(run_training, cfg, progress=False, faults=plan, warm=warm_ranks)
    try:
        # (1) happens on its own; (2): checkpoint 4 is complete before rank 1 is killed
        _at_hold(plan, killed_worker, thread.is_alive, "after the rank error's restore")
        _wait_until(_latest_is(out, 4), thread.is_alive, "killed worker: checkpoint 4")
        _kill_rank(cfg, 1, "killed worker", warm_ranks)
        plan.release(killed_worker)
        # (3)
        _at_hold(plan, killed_teacher, thread.is_alive, "after the killed worker's restore")
        last_group = _warm_run_ranks(warm_ranks)
        ray.kill(base, no_restart=False)  # Ray restarts it; calls in flight are retried on the new process
        plan.release(killed_teacher)
    finally:
        for hold in plan.holds:  # whatever failed above: never leave the run waiting
            plan.release(hold)
        thread.join()
    assert "error" not in box, box.get("error")
    report = box["result"]

    rank_error, worker = report["recoveries"]  # exactly two restores: the killed teacher caused none
    print(f"\nrank error at step 3: worker group killed and restored in {rank_error['seconds']:.1f} s; "
          f"killed worker at step 5: restored in {worker['seconds']:.1f} s")
    assert (rank_error["step"], rank_error["rank"], rank_error["restored_step"]) == (3, 1, 2), f"rank error: {rank_error}"
    assert "InjectedRankError" in rank_error["cause"] and "raised mid-step" in rank_error["cause"], rank_error
    assert (worker["step"], worker["rank"], worker["restored_step"]) == (5, 1, 4), f"killed worker: {worker}"
    assert "student worker rank 1 died" in worker["cause"], f"killed worker: {worker}"
    assert report["worker_restarts"] == 2, f"killed teacher: a worker restart too many: {report['recoveries']}"
    assert ray.get(base.health.remote())["pid"] != pid_before, "killed teacher: the base teacher was not restarted"
    assert _student_worker_names(cfg) == [] and _warm_run_ranks(warm_ranks) == [], "workers of the run left behind"
    assert len(last_group) == RANKS and set(last_group) <= set(warm_ranks.idle_names()), \
        f"the last group's ranks {last_group} not handed back: idle {warm_ranks.idle_names()}"
    origin = {0: "before any fault", 1: "before any fault", 2: "replayed after the rank error",
              3: "replayed after the rank error"}
    _assert_same_as_reference(out, reference, "rank error, killed worker, killed teacher",
                              lambda s: origin.get(s, "replayed after the killed worker; the teacher killed after step 4"))
    # The time adds up: every row's named parts sum to its step time, and the teacher's restart shows up as
    # teacher wait: in the slowest step (one that waited for the restarted teacher) the wait is the largest part.
    rows = read_rows(out)
    for r in rows:
        assert set(r["step_parts"]) == set(STEP_PARTS)
        assert sum(r["step_parts"].values()) == pytest.approx(r["step_s"], rel=1e-9, abs=1e-9)
        assert r["teacher_wait_s"] == r["step_parts"]["record_wait_s"]
    slowest = max(rows, key=lambda r: r["step_s"])
    parts = slowest["step_parts"]
    assert slowest["step"] > 4 and max(parts, key=parts.get) == "record_wait_s", f"killed teacher: {slowest}"


def test_stop_crash_sigkill_and_ctrl_c_each_resume_to_the_uninterrupted_run(
        tiny, service, reference, ray_cluster, tmp_path, capsys, warm_ranks) -> None:
    """One run stopped or killed four times, each time resumed by the next link, the last resume compared:
    1. stop_after=3 (in process), and a resume with another config refused, naming the differing key;
    2. CLI --resume (from 3) crashing while it writes checkpoint 4: exit 1, half a state.json in
       ckpt-000004.tmp, checkpoint 3 intact (and still byte for byte at the end);
    3. CLI --resume (from 3, past the stale .tmp) SIGKILLed at the end of step 5 (checkpoint 4 written);
    4. CLI --resume (from 4) Ctrl-C'd at the end of step 6: exit 130, one message, the traceback in error.log,
       its workers gone;
    5. the CLI's main() --resume (from 6) in this process, of the config file the CLI drivers ran, on the
       session's warm ranks (main(warm=)), ends with the reference's rows and weights."""
    from student_worker.checkpoint import CheckpointError
    from student_worker.driver import run_training
    from student_worker.train import main

    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out)
    config_path = tmp_path / "run.yaml"
    dump_config(cfg, config_path)
    root = out / "checkpoints"

    # 1. stop after 3 steps: a checkpoint of 3, no final model; another config must not resume from it
    stopped = run_training(cfg, stop_after=3, progress=False, warm=warm_ranks)
    assert stopped["stopped_at"] == 3 and not (out / "final_model").exists(), f"stop_after: {stopped}"
    assert len(read_rows(out)) == 3, "stop_after: rows"
    with pytest.raises(CheckpointError, match="loss.alpha"):  # the error lists the differing keys
        run_training(_cfg(tiny, service, out, ["loss.alpha=0.5"]), resume=True, progress=False, warm=warm_ranks)

    # 2. a crash while checkpoint 4 is written
    proc = _train_cli(config_path, tmp_path / "crash.log", ray_cluster, "--resume",
                      faults=FaultPlan(crash_in_checkpoint=4))
    _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 1, (f"crash in checkpoint: expected the fault's exit 1:\n"
                                  f"{(tmp_path / 'crash.log').read_text()[-3000:]}\n{stderr[-3000:]}")
    assert (root / "ckpt-000004.tmp" / "state.json").read_text() == '{"step": ', "crash: no half-written checkpoint"
    previous = ckpt.latest_checkpoint(root)
    assert previous is not None and previous.name == "ckpt-000003", f"crash: latest is {previous}"
    ckpt.verify_checkpoint(previous)  # intact: JSON state, safetensors, weights-only optimizer state
    intact = _files(previous)

    # 3. the driver SIGKILLed mid-run
    proc = _resume_cli_until(config_path, tmp_path / "sigkill.log", ray_cluster, out, Hold(step=5), 4,
                             tmp_path / "sigkill", "SIGKILL")
    try:
        proc.send_signal(signal.SIGKILL)
    finally:
        stderr = _end(proc)
    assert proc.returncode == -signal.SIGKILL, f"SIGKILL: exit {proc.returncode}:\n{stderr[-3000:]}"
    assert not (out / "final_model").exists(), "SIGKILL: a final model"
    assert _latest_is(out, 4)(), f"SIGKILL: latest checkpoint {ckpt.latest_checkpoint(root)}"

    # 4. Ctrl-C mid-run
    proc = _resume_cli_until(config_path, tmp_path / "ctrl_c.log", ray_cluster, out, Hold(step=6), 6,
                             tmp_path / "ctrl_c", "Ctrl-C")
    try:
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)  # what Ctrl-C sends
        _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        ended_s = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            _end(proc)
    log = (tmp_path / "ctrl_c.log").read_text()
    assert proc.returncode == 130, f"Ctrl-C: exit {proc.returncode}:\n{log[-3000:]}\n{stderr[-3000:]}"
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, f"Ctrl-C:\n{stderr[-3000:]}"
    lines = _message(stderr, "interrupted (Ctrl-C) ")
    assert len(lines) == 4, lines  # the message ends stderr: what happened, checkpoint, command, traceback
    reached = re.fullmatch(rf"interrupted \(Ctrl-C\) after (\d+) of {STEPS} steps", lines[0])
    assert reached and int(reached[1]) == 6 == len(read_rows(out)), f"Ctrl-C: {lines}"
    _assert_resume_message(lines, out, config_path)
    assert "KeyboardInterrupt" in (out / "error.log").read_text(), "Ctrl-C: error.log"
    print(f"\nSIGINT at step {reached[1]}: exit 130 after {ended_s:.1f} s")
    _no_workers_left(cfg, "Ctrl-C")  # the driver killed its workers on the way out

    # 5. `--resume` through the CLI's main() in this process, with the config file the CLI drivers ran (on the
    # session cluster and its warm ranks: no interpreter start-up and no rank start-up to pay)
    capsys.readouterr()
    code = main(["--config", str(config_path), "--resume", "--no-progress"], warm=warm_ranks)
    assert code == 0, f"last --resume failed:\n{capsys.readouterr().err[-3000:]}"
    assert _files(previous) == intact, "crash: checkpoint 3 changed after the crash"
    assert not (root / "ckpt-000004.tmp").exists() and (root / "ckpt-000004").is_dir(), "crash: checkpoint 4"
    origin = {0: "before the stop", 1: "before the stop", 2: "before the stop", 3: "after the crash",
              4: "after the SIGKILL", 5: "after the SIGKILL"}
    _assert_same_as_reference(out, reference, "stop, crash, SIGKILL, Ctrl-C",
                              lambda s: origin.get(s, "after the Ctrl-C"))


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


def test_fsdp2_killed_worker_then_sigkilled_driver_resume_to_the_uninterrupted_run(
        tiny, service, fsdp2_reference, ray_cluster, tmp_path, capsys) -> None:
    """training.strategy=fsdp2, one CLI run: rank 1 killed at the end of step 3 (the group is restored from the
    sharded checkpoint 2), then the driver SIGKILLed at the end of step 5 of the restored group (checkpoint 4
    written); the CLI's main() --resume in this process ends with the uninterrupted fsdp2 run's rows and
    weights bit for bit. (The ddp side of both faults: the tests above.)"""
    from student_worker.train import main

    reference = fsdp2_reference
    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out, reference["extra"])
    config_path = tmp_path / "run.yaml"
    dump_config(cfg, config_path)
    killed_worker, killed_driver = Hold(step=3), Hold(step=5, generation=1)
    plan = _holding(tmp_path, killed_worker, killed_driver)
    log = tmp_path / "driver.log"
    proc = _train_cli(config_path, log, ray_cluster, faults=plan)
    try:
        alive = lambda: proc.poll() is None  # noqa: E731
        _at_hold(plan, killed_worker, alive, "killed worker")
        _wait_until(_latest_is(out, 2), alive, "killed worker: checkpoint 2")
        _kill_rank(cfg, 1, "killed worker")
        plan.release(killed_worker)
        _at_hold(plan, killed_driver, alive, "SIGKILL after the killed worker's restore")
        _wait_until(_latest_is(out, 4), alive, "SIGKILL: checkpoint 4")
        proc.send_signal(signal.SIGKILL)
    finally:
        stderr = _end(proc)
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}:\n{log.read_text()[-3000:]}\n{stderr[-3000:]}"
    restores = re.findall(r"worker group restored at step (\d+)", log.read_text())
    assert restores == ["2"], f"killed worker: expected one restore, from checkpoint 2:\n{log.read_text()[-3000:]}"
    assert not (out / "final_model").exists(), "SIGKILL: a final model"
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert latest is not None and latest.name == "ckpt-000004", f"SIGKILL: latest checkpoint {latest}"
    assert (latest / ckpt.SHARDED_DIR / ".metadata").is_file(), "the fsdp2 checkpoint is not sharded"

    capsys.readouterr()
    code = main(["--config", str(config_path), "--resume", "--no-progress"])
    assert code == 0, f"--resume failed:\n{capsys.readouterr().err[-3000:]}"
    _no_workers_left(cfg, "fsdp2 killed worker and driver")
    _assert_same_as_reference(out, reference, "fsdp2: killed worker, SIGKILLed driver",
                              lambda s: "before any fault" if s < 2 else
                              "replayed after the killed worker" if s < 4 else "resumed after the SIGKILL")


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
        tiny, service, reference, tmp_path, capsys, warm_ranks) -> None:
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
        report = run_training(cfg, resume=True, progress=False, warm=warm_ranks)
        assert report["steps"] == STEPS
        _assert_same_as_reference(out, reference, "full disk",
                                  lambda s: "the reference's, from its checkpoint 4" if s < 4 else "resumed")


def test_teacher_dead_past_retries_stops_with_a_checkpoint_then_resumes(
        tiny, service, reference, session_teachers, tmp_path, capsys, warm_ranks) -> None:
    """Runs LAST: kills the shared service's base replica for good (the session's service,
    tests/integration/session_teachers.py), then starts that replica again for the resume (and for the
    service's later users). The CLI's main() runs in this process (in a thread: the test kills the teacher
    while the run is held after step 2): exit 3 is its TrainingRunError, whose message names role and batch."""
    from student_worker.driver import run_training
    from student_worker.train import main
    from teacher_service.naming import replica_name

    out = tmp_path / "run"
    cfg = _cfg(tiny, service, out)
    config_path = tmp_path / "run.yaml"
    dump_config(cfg, config_path)
    ns, prefix = cfg.teachers.namespace, cfg.teachers.name_prefix
    dies = Hold(step=2)
    plan = _holding(tmp_path, dies)
    capsys.readouterr()
    thread, box = _in_thread(main, ["--config", str(config_path), "--no-progress"], faults=plan)
    try:
        _at_hold(plan, dies, thread.is_alive, "the dead teacher")
        ray.kill(ray.get_actor(replica_name(prefix, "base", 0), namespace=ns), no_restart=True)
    finally:
        plan.release(dies)
        thread.join()
    stderr = capsys.readouterr().err
    assert box.get("result") == 3, f"exit {box}:\n{stderr[-3000:]}"  # EXIT_RUN_FAILED: a TrainingRunError
    (line,) = [ln for ln in stderr.splitlines() if ln.startswith("error: step ")]
    assert "TeacherUnavailableError: teacher role 'base' unavailable for batch" in line, stderr[-3000:]
    done = len(read_rows(out))
    assert 0 < done < STEPS and f"step {done} failed" in line, (done, line)
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    assert latest is not None and ckpt.read_state(latest)["step"] == done  # every completed step kept

    # The replica comes back (same name): once its name is released, it alone is started again; resume.
    assert session_teachers.revive() == service
    report = run_training(cfg, resume=True, progress=False, warm=warm_ranks)
    assert report["steps"] == STEPS
    _assert_same_as_reference(out, reference, "a dead teacher, resumed",
                              lambda s: "before the teacher died" if s < done else "resumed")
