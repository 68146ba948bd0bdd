"""Connecting to a running Ray cluster, with Ray's authentication and connection failures turned into one
message that says what to set. Used by `python -m teacher_service`, the client and the training driver.

What a new user meets on Ray 2.60: `ray start --head` turns token authentication on (when a token exists,
e.g. after `ray get-auth-token --generate`), and a client process without `RAY_AUTH_MODE=token` is
refused (`InvalidAuthToken`, logged by Ray's C++ client while `ray.init` retries, then a bare
`ConnectionError: Failed to connect to Ray cluster at ...`). And the head announces itself at the node's
IP (`Local node IP: 10.0.0.5`; `ray start` records `<ip>:<port>` in /tmp/ray/ray_current_cluster), which
is the address to pass.

A dead head: `ray start` records its address on the host and nothing removes the record when the head dies
without `ray stop` (a crash, an OOM kill, a kill by PID). `ray.init()` then retries that address for ever
(`Failed to connect to GCS ...` every ~40 s). So before `ray.init` every connection to an existing cluster
first checks that its head answers (`probe_head`: a TCP connect, then one gRPC call to the GCS) within
`connect_timeout_s()` seconds (`$DELTAKD_RAY_CONNECT_TIMEOUT_S`, default 10), and otherwise raises one
RayConnectionError naming the address, where it came from (--address, RAY_ADDRESS, the host's record file)
and what to do.
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import RayConnectionError

# Ray is imported inside the functions below: it costs ~3 s at import (measured on the loaded 2-core dev host)
# and `python -m teacher_service.cache status|verify` imports this module without needing Ray.

__all__ = ["ClusterAddress", "connect_ray", "connect_timeout_s", "explain_connection_failure", "explain_unreachable",
           "probe_head", "recorded_address", "recorded_address_file", "resolve_address", "token_source",
           "CONNECT_TIMEOUT_ENV", "DEFAULT_CONNECT_TIMEOUT_S"]

DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
RECORDED = "the address an earlier `ray start` on this host recorded"  # a ClusterAddress.source
CONNECT_TIMEOUT_ENV = "DELTAKD_RAY_CONNECT_TIMEOUT_S"
DEFAULT_CONNECT_TIMEOUT_S = 10.0  # a live head answers in milliseconds; a loaded one well within seconds
_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[^:/\s]+):(?P<port>\d{1,5})$")


def recorded_address_file() -> Path:
    """Where `ray start` records its head's address and `ray.init()` reads it: Ray's own rule
    ($RAY_TMPDIR/ray, else $TMPDIR/ray on Linux, else /tmp/ray; file ray_current_cluster)."""
    # deferred: Ray (above); Ray's own function, so both always agree
    from ray._common.utils import get_ray_address_file

    return Path(get_ray_address_file(None))


def token_source(env: Mapping[str, str]) -> str | None:
    """Where Ray would read this process's auth token from (its own order), or None when nowhere."""
    if env.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if Path(path).expanduser().is_file() else None
    default = Path(os.path.expanduser(str(DEFAULT_TOKEN_FILE)))
    return str(DEFAULT_TOKEN_FILE) if default.is_file() else None


def recorded_address(path: Path | None = None) -> str | None:
    """The GCS address the last `ray start` on this host recorded (the node's IP), if any."""
    try:
        text = (recorded_address_file() if path is None else path).read_text().strip()
    except OSError:
        return None
    return text or None


def connect_timeout_s(value: float | None = None, env: Mapping[str, str] | None = None) -> float:
    """The bound on waiting for a head to answer: `value`, else $DELTAKD_RAY_CONNECT_TIMEOUT_S, else 10 s."""
    env = os.environ if env is None else env
    if value is None:
        raw = env.get(CONNECT_TIMEOUT_ENV, "").strip()
        try:
            value = float(raw) if raw else DEFAULT_CONNECT_TIMEOUT_S
        except ValueError:
            raise RayConnectionError(f"{CONNECT_TIMEOUT_ENV}={raw!r} is not a number of seconds") from None
    if not value > 0:
        raise RayConnectionError(f"the Ray connect timeout must be > 0 seconds, got {value}")
    return float(value)


@dataclass(frozen=True)
class ClusterAddress:
    """The cluster a process will connect to: `address` host:port (None: a new private local cluster) and
    where that address came from, for messages (`--address`, `RAY_ADDRESS`, the host's record file)."""

    address: str | None
    source: str


def resolve_address(address: str | None, flag: str = "--address", env: Mapping[str, str] | None = None,
                    record_file: Path | None = None) -> ClusterAddress:
    """Ray's own resolution of `ray.init(address)` (ray._private.services.get_ray_address_from_environment),
    spelled out to say where the address came from: an explicit address wins; for None or "auto":
    $RAY_ADDRESS, else the address the last `ray start` on this host recorded; else None (for None Ray
    starts a local cluster; for "auto" Ray would look for any GCS process on the host, connect_ray stops).
    "local" is a new cluster (address None)."""
    env = os.environ if env is None else env
    if address not in (None, "", "auto"):
        return ClusterAddress(None if address == "local" else address, flag)
    env_address = env.get("RAY_ADDRESS", "")
    if env_address:
        return ClusterAddress(None if env_address == "local" else env_address, "RAY_ADDRESS")
    path = recorded_address_file() if record_file is None else record_file
    recorded = recorded_address(path)
    if recorded:
        return ClusterAddress(recorded, f"{RECORDED} in {path}")
    return ClusterAddress(None, "nothing recorded on this host")


def probe_head(address: str, timeout_s: float) -> str | None:
    """None when a Ray head's GCS at `host:port` answers within `timeout_s`; else one line saying why not.

    A TCP connect (a dead head: refused at once), then one gRPC call, GetClusterId, with a deadline (a
    hung or stopped head accepts the connection but never answers). An answer that refuses this process's
    auth token counts as an answer: `ray.init` then says what to set. Runs in a daemon thread joined with
    the same bound, so not even a hanging DNS lookup outlasts it. Addresses with a scheme (ray://, http://)
    are not probed."""
    match = _HOST_PORT.match(address.strip())
    if match is None:
        return None
    host, port = match["host"].strip("[]"), int(match["port"])
    # deferred like Ray (above), and imported here, outside the bound: grpc (Ray's own dependency, the GCS is
    # a gRPC server) alone costs ~0.6 s
    import grpc
    from ray._private.ray_constants import GLOBAL_GRPC_OPTIONS
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    def call(target: str, timeout: float) -> None:
        channel = grpc.insecure_channel(target, options=list(GLOBAL_GRPC_OPTIONS))
        try:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                gcs_service_pb2.GetClusterIdRequest(), timeout=timeout)
        finally:
            channel.close()

    result: list[str | None] = []
    thread = threading.Thread(target=lambda: result.append(_probe(host, port, timeout_s, call, grpc)),
                              daemon=True, name="deltakd-probe-head")
    thread.start()
    thread.join(timeout_s + 1.0)
    if not result:
        return f"no answer within {timeout_s:g} s (looking up {host!r} or connecting did not finish)"
    return result[0]


def _probe(host: str, port: int, timeout_s: float, call: Callable[[str, float], None], grpc: Any) -> str | None:
    deadline = time.monotonic() + timeout_s
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except TimeoutError:
        return f"no TCP answer within {timeout_s:g} s (the head's host is down or unreachable)"
    except socket.gaierror as exc:
        return f"cannot resolve the host name {host!r} ({exc.strerror or exc})"
    except OSError as exc:
        return f"{exc.strerror or exc} (no Ray head listens there: it has stopped or died)"
    try:
        call(f"[{host}]:{port}" if ":" in host else f"{host}:{port}", max(0.05, deadline - time.monotonic()))
    except grpc.RpcError as exc:
        code = exc.code()
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return None  # a live GCS that wants a token: ray.init's own failure says what to set
        if code in (grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.UNAVAILABLE):
            return (f"the port accepts connections but no Ray GCS answered within {timeout_s:g} s (a hung, "
                    f"stopped or overloaded head, or another program)")
        return f"the program listening there is not a Ray GCS (gRPC {code.name}: {exc.details()})"
    return None


def explain_connection_failure(address: str | None, error: BaseException, env: Mapping[str, str] | None = None,
                               recorded: str | None = None, source: str | None = None) -> str:
    """One message: what failed, then what to set (auth env, the address to use)."""
    env = os.environ if env is None else env
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    target = address if address not in (None, "", "auto") else (env.get("RAY_ADDRESS") or recorded or "auto")
    where = f" (from {source})" if source else ""
    lines = [f"cannot connect to the Ray cluster at {target!r}{where}: {type(error).__name__}: {first}"]
    mode = env.get("RAY_AUTH_MODE")
    source = token_source(env)
    if mode != "token":
        lines.append(f"  - this process has RAY_AUTH_MODE={mode or '(unset)'}; Ray 2.60 clusters use token "
                     "authentication: `export RAY_AUTH_MODE=token` in this shell")
    if source is None:
        lines.append("  - no auth token found: the head's token must be in ~/.ray/auth_token, or named by "
                     "RAY_AUTH_TOKEN_PATH, or in RAY_AUTH_TOKEN (`ray get-auth-token` on the head prints it)")
    elif mode == "token":
        lines.append(f"  - the token comes from {source}: it must be the head's (`ray get-auth-token` on the head)")
    if recorded and target != recorded:
        lines.append(f"  - the last `ray start` on this host listens at {recorded}: use --address {recorded} "
                     "(the head's node IP, not 127.0.0.1 or localhost)")
    elif not recorded and target in (None, "auto"):
        lines.append("  - no running cluster recorded on this host: start one (`ray start --head`) or pass "
                     "--address <head node IP>:<port> as `ray start` printed it")
    return "\n".join(lines)


def explain_unreachable(target: ClusterAddress, why: str, timeout_s: float, hint: str | None = None) -> str:
    """One message for a head that does not answer: the address, where it came from, why, what to do
    (`hint`: one more line from the caller)."""
    lines = [f"cannot connect to the Ray cluster at {target.address!r} (from {target.source}): no Ray head "
             f"answers there: {why}"]
    if target.source == "RAY_ADDRESS":
        lines.append("  - RAY_ADDRESS names a head that is gone: point it at a running head (its address is what "
                     "`ray start --head` printed), or `unset RAY_ADDRESS`")
    elif target.source.startswith(RECORDED):
        lines.append("  - the head that `ray start` recorded is gone (it died without `ray stop`): start the cluster "
                     "again with `ray start --head` (which records its new address), or pass --address <head node "
                     "IP>:<port> of a running head")
    else:
        lines.append(f"  - check {target.source} {target.address}: is that head still running? (`ray start --head` "
                     "printed its address)")
    if hint:
        lines.append(f"  - {hint}")
    lines.append(f"  - a head has {timeout_s:g} s to answer; {CONNECT_TIMEOUT_ENV}=<seconds> (or --connect-timeout) "
                 "changes that")
    return "\n".join(lines)


def connect_ray(address: str | None, timeout_s: float | None = None, flag: str = "--address",
                hint: str | None = None, **init_kwargs: Any) -> None:
    """`ray.init(address=address, **init_kwargs)` after checking that the head of the cluster it would join
    answers (`probe_head`, bounded by `connect_timeout_s(timeout_s)`); a head that does not, and Ray's
    connection/auth failures, raise RayConnectionError with one message. `flag` names where an explicit
    address came from (the CLI's --address, a client's address= argument); `hint` adds a line to the message
    of a head that does not answer. "local" starts a new cluster.

    "auto" with neither RAY_ADDRESS nor a recorded address stops here too: Ray would fall back to any GCS
    process it finds on the host (another user's cluster on a shared machine, possibly a hung one)."""
    import ray  # deferred: Ray's import cost (note at the top)

    if ray.is_initialized():
        return
    bound = connect_timeout_s(timeout_s)
    target = resolve_address(address, flag)
    if target.address is not None:
        why = probe_head(target.address, bound)
        if why is not None:
            raise RayConnectionError(explain_unreachable(target, why, bound, hint))
    elif address == "auto":
        missing = ConnectionError(f"no RAY_ADDRESS, and no address recorded in {recorded_address_file()}")
        raise RayConnectionError(explain_connection_failure("auto", missing, recorded=None))
    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        source = None if target.address is None else target.source
        raise RayConnectionError(explain_connection_failure(address, exc, recorded=recorded_address(),
                                                            source=source)) from exc
