"""A private local Ray head WITH a dashboard (job API), started as `ray start --head --block` in a subprocess.

The session fixture `ray_cluster` has no dashboard, so job-submission tests start their own head here:
every port is picked free (so heads of other people on this host are not disturbed), the temp dir is a
short private one (Ray's socket paths have a length limit), token authentication is on with a token of
its own (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN_PATH: the user's ~/.ray/auth_token is neither read nor
written), and the head is ended by killing its own process group, never by `ray stop`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LocalHead", "RayHeadError", "local_ray_head", "local_ray_nodes", "ray_cli", "free_ports", "client_env",
           "job_status"]

VENV_BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 120.0  # `ray start` + dashboard + job agent take ~10-20 s on 2 shared cores


class RayHeadError(RuntimeError):
    """The private head did not come up, or died; the message carries the tail of its log."""


def ray_cli() -> Path:
    """The `ray` executable of this interpreter's environment (never a `ray` found on PATH)."""
    path = VENV_BIN / "ray"
    if not path.is_file():
        raise RayHeadError(f"no ray CLI beside {sys.executable} (expected {path})")
    return path


def free_ports(n: int) -> list[int]:
    """n distinct free TCP ports on 127.0.0.1 (all sockets held open until every port is picked)."""
    with ExitStack() as stack:
        ports = []
        for _ in range(n):
            s = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(s.getsockname()[1])
        return ports


def client_env(token_path: Path, base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for any process that talks to the head: token auth on, this head's token file.

    RAY_ADDRESS and RAY_AUTH_TOKEN are removed so nothing from the caller's shell points elsewhere.
    """
    env = dict(os.environ if base is None else base)
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN", None)
    env["RAY_AUTH_MODE"] = "token"
    env["RAY_AUTH_TOKEN_PATH"] = str(token_path)
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


@dataclass
class LocalHead:
    """A running private head. `gcs_address` is for `--address` of drivers; `dashboard_url` for jobs."""

    proc: subprocess.Popen
    temp_dir: Path
    token_path: Path
    gcs_address: str
    dashboard_url: str
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)

    @property
    def token(self) -> str:
        return self.token_path.read_text().strip()

    def log_tail(self, n_chars: int = 4000) -> str:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return text[-n_chars:]

    def api_get(self, path: str, with_token: bool = True, timeout: float = 10.0) -> tuple[int, str]:
        """GET `dashboard_url + path`; returns (HTTP status, body). Auth errors come back as statuses."""
        req = urllib.request.Request(self.dashboard_url + path)
        if with_token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, resp.read().decode(errors="replace")
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(errors="replace")

    def stop(self) -> None:
        """End the head and everything it started: SIGTERM to its process group, then SIGKILL."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        # Ray's daemons (raylet, GCS, dashboard) share the group; a straggler gets SIGKILL.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _wait_ready(head: LocalHead, deadline: float) -> None:
    """Poll the job API (with the token) until it answers 200; raise with the head's log if it dies."""
    last = "no answer yet"
    while time.monotonic() < deadline:
        if head.proc.poll() is not None:
            raise RayHeadError(f"ray head exited with {head.proc.returncode}:\n{head.log_tail()}")
        try:
            status, body = head.api_get("/api/jobs/", timeout=5.0)
            if status == 200:
                return
            last = f"HTTP {status}: {body[:200]}"
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError) as exc:
            last = repr(exc)
        time.sleep(0.5)
    raise RayHeadError(f"job API at {head.dashboard_url} not ready after {READY_TIMEOUT_S:.0f} s "
                       f"({last}):\n{head.log_tail()}")


@contextmanager
def local_ray_head(num_cpus: int = 8, extra_env: dict[str, str] | None = None,
                   resources: dict[str, float] | None = None) -> Iterator[LocalHead]:
    """Start `ray start --head --block` with a dashboard on 127.0.0.1, token auth on; yield; end it.

    `extra_env` reaches the head and therefore every job driver and actor it starts (e.g. DELTAKD_CACHE).
    """
    temp_dir = Path(tempfile.mkdtemp(prefix="dkh-", dir="/tmp"))
    token_path = temp_dir / "auth_token"
    token_path.write_text(secrets.token_hex(32))
    token_path.chmod(0o600)
    env = client_env(token_path)
    env.update(extra_env or {})
    gcs, dash, agent_http, agent_grpc, metrics, client, runtime_env, node_mgr, obj_mgr = free_ports(9)
    cmd = [
        str(ray_cli()), "start", "--head", "--block",
        "--node-ip-address", "127.0.0.1",
        "--port", str(gcs),
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash), "--include-dashboard", "true",
        "--dashboard-agent-listen-port", str(agent_http), "--dashboard-agent-grpc-port", str(agent_grpc),
        "--metrics-export-port", str(metrics), "--ray-client-server-port", str(client),
        "--runtime-env-agent-port", str(runtime_env), "--node-manager-port", str(node_mgr),
        "--object-manager-port", str(obj_mgr),
        "--num-cpus", str(num_cpus), "--num-gpus", "0",
        "--temp-dir", str(temp_dir / "ray"), "--disable-usage-stats",
        *(["--resources", json.dumps(resources)] if resources else []),
    ]
    log_path = temp_dir / "head.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    head = LocalHead(proc=proc, temp_dir=temp_dir, token_path=token_path,
                     gcs_address=f"127.0.0.1:{gcs}", dashboard_url=f"http://127.0.0.1:{dash}",
                     log_path=log_path, env=env)
    try:
        _wait_ready(head, time.monotonic() + READY_TIMEOUT_S)
        yield head
    finally:
        head.stop()
        shutil.rmtree(temp_dir, ignore_errors=True)


NODE_START_ATTEMPTS = 3  # `ray start` gives a raylet a fixed 30 s to register with the GCS (ray/_private/node.py)
_REGISTER_TIMEOUT = "The current node timed out during startup"


def _launch_node(head: LocalHead, node_dir: Path, num_cpus: int, resources: dict[str, float]) -> subprocess.Popen:
    """One `ray start --address --block` with its own ports and temp dir (not waited for: `_await_node`)."""
    node_mgr, obj_mgr, metrics, agent_http, agent_grpc, runtime_env = free_ports(6)
    cmd = [
        str(ray_cli()), "start", "--address", head.gcs_address, "--block",
        "--node-ip-address", "127.0.0.1",
        "--node-manager-port", str(node_mgr), "--object-manager-port", str(obj_mgr),
        "--metrics-export-port", str(metrics), "--dashboard-agent-listen-port", str(agent_http),
        "--dashboard-agent-grpc-port", str(agent_grpc), "--runtime-env-agent-port", str(runtime_env),
        "--num-cpus", str(num_cpus), "--num-gpus", "0", "--resources", json.dumps(resources),
        "--temp-dir", str(node_dir / "ray"), "--disable-usage-stats",
    ]
    with open(node_dir / "node.log", "wb") as log:
        return subprocess.Popen(cmd, env=head.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def _await_node(head: LocalHead, proc: subprocess.Popen, node_dir: Path, name: str,
                resources: dict[str, float]) -> None:
    """Until the head's node list has the node's resources; RayHeadError (its log's tail) if it exits or is
    not listed within READY_TIMEOUT_S (then its process group is ended)."""
    log_path = node_dir / "node.log"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RayHeadError(f"ray node {name} exited with {proc.returncode}:\n"
                               f"{log_path.read_text(errors='replace')[-4000:]}")
        try:  # the state API: live nodes and resources (a busy dashboard may drop a request: ask again)
            status, body = head.api_get("/api/v0/nodes", timeout=10.0)
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            status, body = 0, ""
        if status == 200 and all(f'"{k}"' in body for k in resources):
            return
        time.sleep(0.5)
    _end_group(proc)
    raise RayHeadError(f"ray node {name} not in the head's node list after {READY_TIMEOUT_S:.0f} s:\n"
                       f"{log_path.read_text(errors='replace')[-4000:]}")


def _end_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            continue


@contextmanager
def local_ray_nodes(head: LocalHead, nodes: dict[str, tuple[int, dict[str, float]]]) -> Iterator[list[int]]:
    """Join more raylets ("nodes") to the head on this host, all started at once: `ray start --address --block`
    per name, each with its CPUs, custom resources, ports and temp dir; yields their pids; ends each by
    killing its own process group.

    On a loaded host a raylet can miss `ray start`'s fixed 30 s registration window; that start (and only
    that failure) is tried again, up to NODE_START_ATTEMPTS times."""
    procs: dict[str, subprocess.Popen] = {}

    def launch(name: str, attempt: int) -> Path:
        node_dir = head.temp_dir / f"node-{name}-{attempt}"
        node_dir.mkdir()
        cpus, resources = nodes[name]
        procs[name] = _launch_node(head, node_dir, cpus, resources)
        return node_dir

    try:
        dirs = {name: launch(name, 1) for name in nodes}
        for name, (_, resources) in nodes.items():
            for attempt in range(1, NODE_START_ATTEMPTS + 1):
                try:
                    _await_node(head, procs[name], dirs[name], name, resources)
                    break
                except RayHeadError as err:
                    if _REGISTER_TIMEOUT not in str(err) or attempt == NODE_START_ATTEMPTS:
                        raise
                    dirs[name] = launch(name, attempt + 1)
        yield [proc.pid for proc in procs.values()]
    finally:
        for proc in procs.values():
            _end_group(proc)


def job_status(head: LocalHead, job_id: str) -> dict:
    """The job API's record of one job (status, message, entrypoint, ...)."""
    status, body = head.api_get(f"/api/jobs/{job_id}")
    if status != 200:
        raise RayHeadError(f"job {job_id}: HTTP {status} from {head.dashboard_url}: {body[:300]}")
    return json.loads(body)
