"""Connecting to a running Ray cluster, with Ray's authentication and connection failures turned into one
message that says what to set. Used by `python -m teacher_service` and the training driver.

What a new user meets on Ray 2.60: `ray start --head` turns token authentication on (when a token exists,
e.g. after `ray get-auth-token --generate`), and a client process without `RAY_AUTH_MODE=token` is
refused (`InvalidAuthToken`, logged by Ray's C++ client while `ray.init` retries, then a bare
`ConnectionError: Failed to connect to Ray cluster at ...`). And the head announces itself at the node's
IP (`Local node IP: 10.0.0.5`; `ray start` records `<ip>:<port>` in /tmp/ray/ray_current_cluster), which
is the address to pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import RayConnectionError

__all__ = ["connect_ray", "explain_connection_failure", "recorded_address", "token_source"]

DEFAULT_TOKEN_FILE = Path("~/.ray/auth_token")
RECORDED_ADDRESS_FILE = Path("/tmp/ray/ray_current_cluster")  # written by `ray start` (default temp dir)


def token_source(env: Mapping[str, str]) -> str | None:
    """Where Ray would read this process's auth token from (its own order), or None when nowhere."""
    if env.get("RAY_AUTH_TOKEN"):
        return "RAY_AUTH_TOKEN"
    path = env.get("RAY_AUTH_TOKEN_PATH")
    if path:
        return f"RAY_AUTH_TOKEN_PATH={path}" if Path(path).expanduser().is_file() else None
    default = Path(os.path.expanduser(str(DEFAULT_TOKEN_FILE)))
    return str(DEFAULT_TOKEN_FILE) if default.is_file() else None


def recorded_address(path: Path = RECORDED_ADDRESS_FILE) -> str | None:
    """The GCS address the last `ray start` on this host recorded (the node's IP), if any."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None


def explain_connection_failure(address: str | None, error: BaseException, env: Mapping[str, str] | None = None,
                               recorded: str | None = None) -> str:
    """One message: what failed, then what to set (auth env, the address to use)."""
    env = os.environ if env is None else env
    first = (str(error).strip().splitlines() or [type(error).__name__])[0]
    target = address if address not in (None, "", "auto") else (env.get("RAY_ADDRESS") or recorded or "auto")
    lines = [f"cannot connect to the Ray cluster at {target!r}: {type(error).__name__}: {first}"]
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


def connect_ray(address: str | None, **init_kwargs: Any) -> None:
    """`ray.init(address=address, **init_kwargs)`; Ray's connection/auth failure -> RayConnectionError."""
    import ray

    if ray.is_initialized():
        return
    try:
        ray.init(address=address, **init_kwargs)
    except (ConnectionError, TimeoutError, RuntimeError, ValueError) as exc:
        raise RayConnectionError(explain_connection_failure(address, exc, recorded=recorded_address())) from exc
