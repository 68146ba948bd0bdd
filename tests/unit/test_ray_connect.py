"""The one message a failed Ray connection becomes (teacher_service.ray_connect), for the cases a new user
meets: no RAY_AUTH_MODE=token, no token, 127.0.0.1 where the head listens on its node IP, no cluster; and
(issue 22) a dead or hung head at a recorded address: where the address came from, a bounded probe."""

from __future__ import annotations

import socket
import time
from pathlib import Path

import pytest

from teacher_service.errors import RayConnectionError
from teacher_service.ray_connect import (
    CONNECT_TIMEOUT_ENV,
    DEFAULT_CONNECT_TIMEOUT_S,
    ClusterAddress,
    connect_timeout_s,
    explain_connection_failure,
    explain_unreachable,
    probe_head,
    recorded_address,
    recorded_address_file,
    resolve_address,
    token_source,
)

ERR = ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379\nmore")


def test_missing_auth_mode_and_wrong_host(tmp_path: Path) -> None:
    tok = tmp_path / "tok"
    tok.write_text("x")
    env = {"RAY_AUTH_TOKEN_PATH": str(tok)}
    msg = explain_connection_failure("127.0.0.1:6379", ERR, env=env, recorded="10.0.0.5:6379")
    assert msg.splitlines()[0] == ("cannot connect to the Ray cluster at '127.0.0.1:6379': ConnectionError: "
                                   "Failed to connect to Ray cluster at 127.0.0.1:6379")
    assert "RAY_AUTH_MODE=(unset)" in msg and "export RAY_AUTH_MODE=token" in msg
    assert "use --address 10.0.0.5:6379" in msg
    assert "no auth token" not in msg  # the token file exists


def test_auth_mode_set_but_no_token(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token
    env = {"RAY_AUTH_MODE": "token"}
    assert token_source(env) is None
    msg = explain_connection_failure("10.0.0.5:6379", ERR, env=env, recorded="10.0.0.5:6379")
    assert "no auth token found" in msg and "RAY_AUTH_MODE" not in msg.splitlines()[1]
    assert "--address" not in msg  # the address is the recorded one


def test_no_cluster_at_all(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("x")
    msg = explain_connection_failure("auto", ConnectionError("Could not find any running Ray instance."),
                                     env={"RAY_AUTH_MODE": "token"}, recorded=None)
    assert "the token comes from ~/.ray/auth_token" in msg
    assert "start one (`ray start --head`)" in msg
    assert recorded_address(tmp_path / "nothing") is None


# ---- a dead or hung head (issue 22): where the address came from, and a probe that cannot hang

def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed when the socket is: nothing listens there, as after a killed head


def test_resolve_address_names_where_it_came_from(tmp_path: Path) -> None:
    record = tmp_path / "ray_current_cluster"
    record.write_text("10.0.0.5:6379\n")
    assert resolve_address("1.2.3.4:6379", env={"RAY_ADDRESS": "x:1"}, record_file=record) == \
        ClusterAddress("1.2.3.4:6379", "--address")  # explicit wins, as in Ray
    assert resolve_address("local", env={"RAY_ADDRESS": "x:1"}, record_file=record).address is None
    assert resolve_address("auto", env={"RAY_ADDRESS": "x:1"}, record_file=record) == ClusterAddress("x:1", "RAY_ADDRESS")
    by_record = resolve_address(None, env={}, record_file=record)
    assert by_record.address == "10.0.0.5:6379" and str(record) in by_record.source
    assert resolve_address(None, env={}, record_file=tmp_path / "none") == ClusterAddress(None, "nothing recorded on "
                                                                                              "this host")


def test_recorded_address_file_follows_ray_tmpdir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # Ray's own rule: $RAY_TMPDIR/ray/ray_current_cluster
    assert recorded_address_file() == tmp_path / "ray" / "ray_current_cluster"
    assert recorded_address() is None
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text("127.0.0.1:6379")
    assert recorded_address() == "127.0.0.1:6379"


def test_probe_of_a_dead_head_is_refused_at_once() -> None:
    t0 = time.monotonic()
    why = probe_head(f"127.0.0.1:{_closed_port()}", timeout_s=5.0)
    assert why is not None and "refused" in why
    assert time.monotonic() - t0 < 5.0


def test_probe_of_a_hung_head_gives_up_after_the_bound() -> None:
    with socket.socket() as hung:  # accepts connections (the kernel's backlog) and never answers: a stopped head
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)
        t0 = time.monotonic()
        why = probe_head(f"127.0.0.1:{hung.getsockname()[1]}", timeout_s=1.0)
        took = time.monotonic() - t0
    assert why is not None and "no Ray GCS answered within 1 s" in why
    assert 0.9 < took < 3.0, took  # the bound (grpc is imported before the clock of the probe starts)


def test_unreachable_message_names_address_source_and_what_to_do(tmp_path: Path) -> None:
    record = tmp_path / "ray_current_cluster"
    record.write_text("10.0.0.5:6379")
    target = resolve_address(None, env={}, record_file=record)
    msg = explain_unreachable(target, "Connection refused", 10.0, hint="a run without attach starts its own")
    lines = msg.splitlines()
    assert lines[0] == (f"cannot connect to the Ray cluster at '10.0.0.5:6379' (from the address an earlier `ray "
                        f"start` on this host recorded in {record}): no Ray head answers there: Connection refused")
    assert "ray start --head" in lines[1] and lines[2] == "  - a run without attach starts its own"
    assert "DELTAKD_RAY_CONNECT_TIMEOUT_S" in lines[3]
    env_msg = explain_unreachable(ClusterAddress("x:1", "RAY_ADDRESS"), "why", 2.0)
    assert "(from RAY_ADDRESS)" in env_msg.splitlines()[0] and "unset RAY_ADDRESS" in env_msg


def test_connect_timeout_knob() -> None:
    assert connect_timeout_s(env={}) == DEFAULT_CONNECT_TIMEOUT_S
    assert connect_timeout_s(env={CONNECT_TIMEOUT_ENV: "2.5"}) == 2.5
    assert connect_timeout_s(3.0, env={CONNECT_TIMEOUT_ENV: "2.5"}) == 3.0
    with pytest.raises(RayConnectionError, match=CONNECT_TIMEOUT_ENV):
        connect_timeout_s(env={CONNECT_TIMEOUT_ENV: "soon"})
    with pytest.raises(RayConnectionError, match="> 0"):
        connect_timeout_s(0.0)
