"""Run a CLI entry with a FaultPlan, in a subprocess a test can SIGKILL (the CLIs themselves take no faults).

    python -m tests.integration.fault_run --faults '<FaultPlan JSON>' train <student_worker.train arguments>
    python -m tests.integration.fault_run --faults '<FaultPlan JSON>' cache <teacher_service.cache arguments>

e.g. `--faults '{"step_delay_s": 0.25}' train --config run.yaml --address ADDR --no-progress`. The plan is
built with `FaultPlan.from_json` (common/faults.py) and handed to the same `main` the CLI runs. Run it from the
repository root (the tests' cwd): `tests` is imported from there, by this process only; the plan that reaches
the Ray actors is a `common.faults.FaultPlan`, which every worker imports from the installed package.
"""

from __future__ import annotations

import argparse
import signal
import sys

from common.faults import FaultPlan

ENTRIES = ("train", "cache")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.integration.fault_run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--faults", required=True, help="the FaultPlan as JSON, e.g. '{\"step_delay_s\": 0.25}'")
    p.add_argument("entry", choices=ENTRIES, help="train: student_worker.train; cache: teacher_service.cache")
    p.add_argument("args", nargs=argparse.REMAINDER, help="the entry's own command line")
    args = p.parse_args(argv)
    # Ctrl-C as a terminal delivers it: a suite started in the background by a non-interactive shell (`cmd &`)
    # hands its children SIGINT ignored, which Python keeps, and the Ctrl-C test's SIGINT would do nothing.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        faults = FaultPlan.from_json(args.faults)
    except (ValueError, TypeError) as exc:  # json.JSONDecodeError is a ValueError
        print(f"error: --faults: {exc}", file=sys.stderr)
        return 2
    if args.entry == "train":
        from student_worker.train import main as train_main

        return train_main(args.args, faults=faults)
    from teacher_service.cache.cli import main as cache_main

    return cache_main(args.args, faults=faults)


if __name__ == "__main__":
    sys.exit(main())
