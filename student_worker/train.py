"""`python -m student_worker.train [--config X] [--set a.b=v ...] [--output-dir D] [--resume] [--address A]`

Without --config it runs the embedded default, deploy/configs/tiny.yaml (tiny models built on the spot).

Which Ray cluster: `--address A`, else $RAY_ADDRESS; else, with teachers.attach=true, the cluster that the last
`ray start` on this host recorded (the teachers' cluster); else a new private local cluster for this run only
(never a recorded address: a head that died leaves its record behind). Before joining an existing cluster
the run checks that its head answers within --connect-timeout seconds ($DELTAKD_RAY_CONNECT_TIMEOUT_S,
default 10), else exits 2 saying which address, from where, and what to do.

Exit codes:
   0  done (also --stop-after N: stopped on purpose with a checkpoint)
   2  bad input, nothing trained (config / arguments / unwritable output dir / data rows / tokenizers / k /
      a checkpoint that does not match or is refused / an output dir holding a previous run without
      --resume), also when the Ray cluster cannot be reached (the message says what to set: RAY_AUTH_MODE,
      the token, the address) or a student worker cannot see output.dir (checked before any model loads;
      only config.yaml and an empty metrics.jsonl exist then, and the same command may be rerun)
   3  the run failed (e.g. a teacher stayed unavailable: a checkpoint of the completed steps is written first)
  74  an I/O error writing the run's outputs (EX_IOERR: no space left on device, EIO, quota, read-only
      filesystem), e.g. during a checkpoint: the partial checkpoint is removed, the previous one is intact
 130  interrupted (Ctrl-C / SIGINT)
Every error goes to stderr as one `error: ...` message naming the culprit. An interrupted run and an I/O
error also say the step reached, the last complete checkpoint and the command that continues (`--resume`);
their traceback goes to <output dir>/error.log (--traceback or DELTAKD_TRACEBACK=1 also prints it).
"""

from __future__ import annotations

import argparse
import errno
import os
import shlex
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.config import DEFAULT_CONFIG, ConfigError, load_config
from common.faults import FaultPlan

if TYPE_CHECKING:  # deferred at run time: torch and Ray (see _main)
    from student_worker.worker_group import WarmRanks

__all__ = ["DEFAULT_CONFIG", "EXIT_BAD_INPUT", "EXIT_INTERRUPTED", "EXIT_IO_ERROR", "EXIT_RUN_FAILED", "main",
           "parse_args", "check_output_dir", "init_ray", "resume_command"]

EXIT_BAD_INPUT, EXIT_RUN_FAILED = 2, 3
EXIT_IO_ERROR = 74  # EX_IOERR (sysexits.h)
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C
ERROR_LOG = "error.log"



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m student_worker.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: the tiny embedded run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loss.method=kd (repeatable)")
    p.add_argument("--output-dir", help="output directory (overrides output.dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--address", help="Ray cluster address <head node IP>:<port> (default: $RAY_ADDRESS; else with "
                   "teachers.attach=true the last `ray start` on this host; else a new private local cluster)")
    p.add_argument("--connect-timeout", type=float, metavar="S",
                   help="seconds an existing cluster's head has to answer (default: $DELTAKD_RAY_CONNECT_TIMEOUT_S "
                        "or 10)")
    p.add_argument("--traceback", action="store_true",
                   help="after an interrupt or I/O error, also print the traceback (always in <output dir>/error.log)")
    p.add_argument("--stop-after", type=int, metavar="N",
                   help="stop after N completed steps with a checkpoint, as if interrupted (resume later)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def check_output_dir(out: Path) -> None:
    """Create `out` if needed and prove it is writable, before anything starts. Raises OSError naming it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise OSError(f"output directory {out} is not writable: {exc.strerror or exc}") from None


def init_ray(address: str | None, attach: bool = False, timeout_s: float | None = None) -> None:
    """Join or start the run's Ray cluster (module docstring: which one). A run that attaches to teachers and
    names no address joins the cluster recorded by the last `ray start` on this host; any other run without
    --address / $RAY_ADDRESS starts a private local one ("local"), so a stale record never matters to it.
    Joining checks first that the head answers (teacher_service.ray_connect.connect_ray); raises
    RayConnectionError with one message otherwise."""
    # deferred: importing teacher_service loads torch (~3-6 s measured on the loaded 2-core host); --help and a
    # config error exit without it. connect_ray: auth/connection failures -> RayConnectionError
    from teacher_service.ray_connect import connect_ray

    if address:
        connect_ray(address, timeout_s, flag="--address", hint=_NO_CLUSTER_NEEDED if not attach else None)
    elif os.environ.get("RAY_ADDRESS"):  # set by `ray job submit` for the job's driver, or by the user
        connect_ray(None, timeout_s, hint=_NO_CLUSTER_NEEDED if not attach else None)
    elif attach:
        connect_ray("auto", timeout_s, hint="teachers.attach=true needs the cluster where `python -m "
                    "teacher_service serve` started the teachers")
    else:
        connect_ray("local", timeout_s)


_NO_CLUSTER_NEEDED = ("this run (no teachers.attach) needs no shared cluster: without --address and RAY_ADDRESS it "
                      "starts its own")


def resume_command(argv: list[str]) -> str:
    """The command line that continues this run: the same arguments with --resume (the interpreter as a
    path relative to the working directory when it lies below it, e.g. .venv/bin/python)."""
    python = sys.executable
    rel = os.path.relpath(python)
    if not rel.startswith(".."):
        python = rel
    args = list(argv) + ([] if "--resume" in argv else ["--resume"])
    return shlex.join([python, "-m", "student_worker.train", *args])


def _save_traceback(out: Path | None, exc: BaseException, argv: list[str]) -> str:
    """Append the traceback to <out>/error.log; returns a line saying where it went (or why it did not)."""
    if out is None:
        return "  (--traceback shows the traceback)"
    path = out / ERROR_LOG
    try:
        with open(path, "a") as f:
            f.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(['student_worker.train', *argv])}\n")
            f.write("".join(traceback.format_exception(exc)))
    except OSError as err:
        return f"  traceback not saved ({path}: {err.strerror or err}); --traceback shows it"
    return f"  traceback: {path}"


def _ended(exc: BaseException, code: int, args: argparse.Namespace, argv: list[str], run: dict[str, Any]) -> int:
    """The one message of an interrupted run or an I/O error: what happened, the step reached, the last
    complete checkpoint and the command that continues. Returns the exit code."""
    from student_worker import checkpoint as ckpt  # deferred: torch (see _main)

    driver, out = run.get("driver"), run.get("out")
    if run.get("own_ray"):  # end this process's Ray now: the worker output it still forwards comes before the
        # message, not after it (at exit); only when main connected (in-process callers keep theirs).
        import ray  # deferred: Ray (see _main)

        try:
            ray.shutdown()
        except Exception as err:  # the message matters more than a clean disconnect
            print(f"(ray.shutdown: {type(err).__name__}: {err})", file=sys.stderr)
    if args.traceback or os.environ.get("DELTAKD_TRACEBACK") == "1":
        traceback.print_exception(exc, file=sys.stderr)
    reached = ("before training started" if driver is None
               else f"after {driver.steps_done} of {driver.cfg.training.max_steps} steps")
    latest = None if out is None else ckpt.latest_checkpoint(Path(out).resolve() / "checkpoints")
    kept = "none yet" if latest is None else f"{latest} (step {int(ckpt.read_state(latest)['step'])})"
    if code == EXIT_INTERRUPTED:
        lines = [f"interrupted (Ctrl-C) {reached}"]
    else:
        os_error = ckpt.io_error_of(exc)
        name = errno.errorcode.get(os_error.errno or 0, "EIO") if os_error is not None else "EIO"
        what = str(exc) if isinstance(exc, ckpt.CheckpointWriteError) else f"{os_error}"
        lines = [f"error: I/O error [{name}] {reached}: {what}"]
        if isinstance(exc, ckpt.CheckpointWriteError):
            lines.append("  the partial checkpoint was removed")
        if name in ("ENOSPC", "EDQUOT") and out is not None:
            lines.append(f"  free space where {out} lives, then continue")
    lines.append(f"  last complete checkpoint: {kept}")
    lines.append(f"  continue with: {resume_command(argv)}")
    lines.append(_save_traceback(out, exc, argv))
    print("\n".join(lines), file=sys.stderr, flush=True)
    return code


def main(argv: list[str] | None = None, faults: FaultPlan | None = None, warm: WarmRanks | None = None) -> int:
    """The CLI. `faults`: a test's FaultPlan (common/faults.py) handed to the driver; the command line has
    no fault flag (tests run tests/integration/fault_run.py to get one into a subprocess). `warm`: an in-process
    caller's student ranks shared between its runs (student_worker/worker_group.py WarmRanks, e.g. the benchmark
    smokes'); None starts this run's own."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    run: dict[str, Any] = {}  # the driver and output dir once known, for the message of an interrupted run
    try:
        return _main(args, run, faults, warm)
    except KeyboardInterrupt as exc:  # Ctrl-C: the driver's `finally` has already stopped its actors
        return _ended(exc, EXIT_INTERRUPTED, args, argv, run)
    except Exception as exc:
        from student_worker.checkpoint import io_error_of  # deferred: torch (see _main)

        if io_error_of(exc) is None:
            raise
        return _ended(exc, EXIT_IO_ERROR, args, argv, run)


def _main(args: argparse.Namespace, run: dict[str, Any], faults: FaultPlan | None, warm: WarmRanks | None) -> int:
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output.dir={args.output_dir}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        check_output_dir(cfg.output_dir)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run["out"] = cfg.output_dir

    # deferred: these load torch and Ray (~6 s measured on the loaded 2-core host: 1230 modules against this
    # module's 355), which --help, a config error and an unwritable output dir exit without
    from common.tiny_world.build import resolve_model_paths
    from student_worker.checkpoint import CheckpointError
    from student_worker.driver import Driver, InputError, TrainingRunError
    from student_worker.report import rouge_table  # alone ~2 ms (measured), also only needed past this point
    from student_worker.shared_output import OutputDirNotSharedError

    cfg = resolve_model_paths(cfg)
    driver = Driver(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                    faults=faults, warm=warm)
    try:
        driver.preflight()  # data, tokenizers, k, resume checkpoint: before Ray starts, nothing written
    except (InputError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    import ray  # deferred, as above

    from teacher_service.errors import RayConnectionError

    run["own_ray"] = not ray.is_initialized()
    try:
        init_ray(args.address, cfg.teachers.attach, args.connect_timeout)
    except RayConnectionError as exc:  # no model loaded, nothing but config checks done: like bad input
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    run["driver"] = driver
    try:
        report = driver.run()
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_RUN_FAILED
    except OutputDirNotSharedError as exc:  # found before any model loaded: a set-up problem, like bad input
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if "stopped_at" in report:
        print(f"stopped after {report['stopped_at']} steps; checkpoint {report['checkpoint']} (use --resume)")
        return 0
    print()
    print(rouge_table(report))
    print()
    print(f"steps/s {report['steps_per_s']:.3f}  tokens/s {report['tokens_per_s']:.1f}  "
          f"teacher wait {100 * report['teacher_wait_fraction']:.1f}%")
    for name, path in report["paths"].items():
        print(f"{name:>12}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
