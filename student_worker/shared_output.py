"""Is `output.dir` one directory for the driver and every student worker?

The driver writes metrics, the report and each checkpoint's `state.json`; student rank 0 writes the weights,
the optimizer state and `final_model/`; every rank writes its RNG state. On several nodes these only make one
usable checkpoint when `output.dir` is a file system all of them share (NFS/EFS, see docs/CLUSTER.md). Without
one, the run would train to the end and leave checkpoints that `--resume` cannot read, the weights on a worker
node and the state on the head. So before any model is loaded the driver writes a probe file with a random
token into `output.dir` and each worker reads it back at the same absolute path.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import ray

from student_worker.distributed import node_ip

__all__ = ["OutputDirNotSharedError", "write_probe", "read_probe", "check_probe_replies", "not_shared_message",
           "check_shared_output"]

PROBE_PREFIX = ".deltakd-probe-"


class OutputDirNotSharedError(RuntimeError):
    """A student worker cannot see the driver's `output.dir`. The message names rank, nodes and the fix."""


def write_probe(out_dir: Path) -> tuple[Path, str]:
    """Create `out_dir/.deltakd-probe-<token>` holding the token; returns (its absolute path, the token)."""
    token = uuid.uuid4().hex
    path = out_dir.resolve() / f"{PROBE_PREFIX}{token}"
    path.write_text(token)
    return path, token


def read_probe(path: str) -> dict[str, Any]:
    """What this process sees at `path`: {"node", "pid", "content" (None when absent/unreadable), "error"}."""
    reply: dict[str, Any] = {"node": node_ip(), "pid": os.getpid(), "content": None, "error": None}
    try:
        reply["content"] = Path(path).read_text()
    except OSError as exc:
        reply["error"] = f"{type(exc).__name__}: {exc.strerror or exc}"
    return reply


def check_probe_replies(token: str, driver_node: str, replies: list[dict[str, Any]]) -> list[str]:
    """One line per rank that did not read `token` back (empty when every rank shares the directory)."""
    problems = []
    for rank, reply in enumerate(replies):
        if reply.get("content") == token:
            continue
        seen = reply.get("error") or f"a different file (content {str(reply.get('content'))[:40]!r})"
        problems.append(f"student rank {rank} on node {reply.get('node')} (driver on node {driver_node}): {seen}")
    return problems


def not_shared_message(out_dir: Path, problems: list[str]) -> str:
    return (f"output.dir {str(out_dir)!r} is not one directory for the driver and the student workers:\n  "
            + "\n  ".join(problems)
            + "\nThe driver writes the report and checkpoint state there and the workers write the weights, so on "
              "several nodes it must be a shared file system mounted at the same path on every node (NFS/EFS; "
              "see docs/CLUSTER.md section 6), and an absolute path. Set output.require_shared_dir=false "
              "to run anyway: the weights and final_model/ then stay on the workers' nodes and --resume cannot "
              "work.")


def check_shared_output(out_dir: Path, workers: list[Any], required: bool) -> None:
    """Ask every worker actor to read a fresh probe in `out_dir` back; raise (or warn when not `required`)."""
    path, token = write_probe(out_dir)
    try:
        replies = ray.get([w.read_probe.remote(str(path)) for w in workers])
    finally:
        path.unlink(missing_ok=True)
    problems = check_probe_replies(token, ray.util.get_node_ip_address(), replies)
    if problems and required:
        raise OutputDirNotSharedError(not_shared_message(out_dir.resolve(), problems))
    if problems:
        print("WARNING: " + not_shared_message(out_dir.resolve(), problems), flush=True)
