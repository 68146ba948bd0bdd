"""mypy over common/ (the typed core), run beside the tests instead of before them.

The test command used to run `mypy common` on its own before pytest: about 50 s of one core on the 2-core
machine. tests/conftest.py starts it here when the session has collected tests/unit/test_type_check.py, at
a lower CPU priority (nice 10), so it takes the cycles the Ray tests leave idle; that test waits for it and
fails with mypy's report. Whatever is still running when the session ends is killed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COMMAND = [sys.executable, "-m", "mypy", "common"]
TIMEOUT_S = 900.0

_proc: subprocess.Popen | None = None
_log: tempfile._TemporaryFileWrapper | None = None


def start() -> None:
    global _proc, _log
    if _proc is not None:
        return
    _log = tempfile.NamedTemporaryFile("w+", prefix="mypy-", suffix=".log")
    _proc = subprocess.Popen(COMMAND, cwd=REPO, stdout=_log, stderr=subprocess.STDOUT, text=True,
                             preexec_fn=lambda: os.nice(10))


def result() -> tuple[int, str]:
    """mypy's exit code and report (started now if the session did not start it)."""
    start()
    assert _proc is not None and _log is not None
    code = _proc.wait(timeout=TIMEOUT_S)
    _log.seek(0)
    return code, _log.read()


def stop() -> None:
    if _proc is not None and _proc.poll() is None:
        _proc.kill()
        _proc.wait()
