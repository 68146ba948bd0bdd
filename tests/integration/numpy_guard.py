"""Test-only instrumentation: log every torch -> numpy conversion in a Ray worker process.

Installed through `runtime_env={"worker_process_setup_hook": "tests.integration.numpy_guard.install",
"env_vars": {LOG_ENV: path}}` on the actors a test creates (never on a production path). Each call of
`Tensor.numpy` / `Tensor.__array__` appends one JSON line to the file: the process id, the call and the
function names on the stack, so a test can tell which code path converted a tensor.
"""

from __future__ import annotations

import json
import os
import traceback
from pathlib import Path
from typing import Any

LOG_ENV = "DELTAKD_TEST_NUMPY_LOG"


def install() -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    import torch

    for name in ("numpy", "__array__"):
        original = getattr(torch.Tensor, name)

        def logged(self: Any, *args: Any, _original: Any = original, _name: str = name, **kwargs: Any) -> Any:
            stack = [frame.name for frame in traceback.extract_stack()[:-1]]
            with open(path, "a") as fh:
                fh.write(json.dumps({"pid": os.getpid(), "call": _name, "stack": stack}) + "\n")
            return _original(self, *args, **kwargs)

        setattr(torch.Tensor, name, logged)


def read(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    return [json.loads(line) for line in p.read_text().splitlines()] if p.exists() else []
