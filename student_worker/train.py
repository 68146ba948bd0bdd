"""`python -m student_worker.train [--config X] [--set a.b=v ...] [--output-dir D] [--resume] [--address A]`

Without --config it runs the embedded default, deploy/configs/tiny.yaml (tiny models built on the spot).
Exit codes: 0 done, 2 bad input, nothing written (config / arguments / unwritable output dir / data rows /
tokenizers / k / a checkpoint that does not match or is refused / an output dir holding a previous run
without --resume), also 2 when the Ray cluster cannot be reached (the message says what to set: RAY_AUTH_MODE,
the token, the address) or a student worker cannot see output.dir (checked before any model loads;
only config.yaml and an empty metrics.jsonl exist then, and the same command may be rerun), 3 the run
failed (e.g. a teacher stayed unavailable: a checkpoint of the completed steps is written first). Every
error goes to stderr as one `error: ...` message naming the culprit.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from common.config import DEFAULT_CONFIG
from common.faults import FaultPlan

__all__ = ["DEFAULT_CONFIG", "main", "parse_args", "check_output_dir", "init_ray"]



def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m student_worker.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="run config YAML (default: the tiny embedded run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set loss.method=kd (repeatable)")
    p.add_argument("--output-dir", help="output directory (overrides output.dir)")
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS / the last `ray start`, else local)")
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


def init_ray(address: str | None) -> None:
    """Connect to --address if given; else plain `ray.init()`: RAY_ADDRESS (set under `ray job submit`) or
    the cluster of the last `ray start` on this node, and with neither, a local cluster for this process.

    Not address="auto": that also probes any GCS process found on the host (another user's cluster on a
    shared machine) and fails there instead of starting a local one.
    """
    from teacher_service.ray_connect import connect_ray  # auth/connection failures -> RayConnectionError

    connect_ray(address or None)


def main(argv: list[str] | None = None, faults: FaultPlan | None = None) -> int:
    """The CLI. `faults`: a test's FaultPlan (common/faults.py) handed to the driver; the command line has
    no fault flag (tests run tests/integration/fault_run.py to get one into a subprocess)."""
    from common.config import ConfigError, load_config

    args = parse_args(argv)
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"output.dir={args.output_dir}")
    try:
        cfg = load_config(args.config, overrides)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        check_output_dir(cfg.output_dir)
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from common.tiny_world.build import resolve_model_paths
    from student_worker.checkpoint import CheckpointError
    from student_worker.driver import Driver, InputError, TrainingRunError
    from student_worker.report import rouge_table
    from student_worker.shared_output import OutputDirNotSharedError

    cfg = resolve_model_paths(cfg)
    driver = Driver(cfg, resume=args.resume, stop_after=args.stop_after, progress=not args.no_progress,
                    faults=faults)
    try:
        driver.preflight()  # data, tokenizers, k, resume checkpoint: before Ray starts, nothing written
    except (InputError, CheckpointError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from teacher_service.errors import RayConnectionError

    try:
        init_ray(args.address)
    except RayConnectionError as exc:  # no model loaded, nothing but config checks done: like bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
    try:
        report = driver.run()
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except TrainingRunError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except OutputDirNotSharedError as exc:  # found before any model loaded: a set-up problem, like bad input
        print(f"error: {exc}", file=sys.stderr)
        return 2
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
