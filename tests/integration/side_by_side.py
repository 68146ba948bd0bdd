"""Independent commands run at once: each is a fresh interpreter importing torch and Ray, and on 2 cores two of
them side by side take about the time of one."""

from __future__ import annotations

import subprocess
from pathlib import Path

__all__ = ["run_together"]


def run_together(commands: list[tuple[list[str], dict[str, str]]], cwd: Path,
                 timeout_s: float) -> list[subprocess.CompletedProcess]:
    """Start every (argv, env) at once in `cwd`; their results (stdout and stderr as text) in the given order.
    Each has `timeout_s` to end; any still running when this returns or raises is killed."""
    procs = [subprocess.Popen(argv, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, env in commands]
    done = []
    try:
        for (argv, _), proc in zip(commands, procs):
            out, err = proc.communicate(timeout=timeout_s)
            done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return done
