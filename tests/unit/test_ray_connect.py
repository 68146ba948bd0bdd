"""The one message a failed Ray connection becomes (teacher_service.ray_connect), for the cases a new user
meets: no RAY_AUTH_MODE=token, no token, 127.0.0.1 where the head listens on its node IP, no cluster."""

from __future__ import annotations

from pathlib import Path

from teacher_service.ray_connect import explain_connection_failure, recorded_address, token_source

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
