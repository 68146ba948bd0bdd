"""Test-only instrumentation of Ray worker processes for the GPU record-path test (never on a production path).

`install()` (run from a test-made `sitecustomize.py`, like tests/integration/numpy_guard.py, whose numpy
logging it installs too) appends JSON lines to the file named by numpy_guard.LOG_ENV:

- {"call": "numpy" | "__array__", "stack"}: every torch -> numpy conversion (numpy_guard);
- {"call": "host_copy", "how", "numel", "stack"}: every copy of a device tensor with more than 16 elements
  to the host (`.cpu()`, `.to(<cpu>)`, `.tolist()`, a host tensor's `.copy_(<device tensor>)`); a
  scalar read (the one validation sync, a flag) is not a copy of a record;
- {"call": "targets_from_parts", "devices", "types"}: what reached the student worker's
  `common.losses.targets.targets_from_parts`: each part's tensors' device types and Python types.
"""

from __future__ import annotations

import json
import os
import traceback
from typing import Any

from tests.integration.numpy_guard import LOG_ENV
from tests.integration.numpy_guard import install as install_numpy_guard

SCALAR_NUMEL = 16


def _write(path: str, row: dict[str, Any]) -> None:
    row = {"pid": os.getpid(), **row}
    with open(path, "a") as fh:
        fh.write(json.dumps(row) + "\n")


def _stack() -> list[str]:
    return [frame.name for frame in traceback.extract_stack()[:-2]]


def install() -> None:
    path = os.environ.get(LOG_ENV)
    if not path:
        return
    install_numpy_guard()
    import torch

    def on_device(t: Any) -> bool:
        return isinstance(t, torch.Tensor) and t.device.type != "cpu"

    def log_copy(how: str, numel: int) -> None:
        if numel > SCALAR_NUMEL:
            _write(path, {"call": "host_copy", "how": how, "numel": numel, "stack": _stack()})

    cpu, to, tolist, copy_ = torch.Tensor.cpu, torch.Tensor.to, torch.Tensor.tolist, torch.Tensor.copy_

    def logged_cpu(self: Any, *args: Any, **kwargs: Any) -> Any:
        if on_device(self):
            log_copy("cpu", self.numel())
        return cpu(self, *args, **kwargs)

    def logged_to(self: Any, *args: Any, **kwargs: Any) -> Any:
        out = to(self, *args, **kwargs)
        if on_device(self) and not on_device(out):
            log_copy("to", self.numel())
        return out

    def logged_tolist(self: Any) -> Any:
        if on_device(self):
            log_copy("tolist", self.numel())
        return tolist(self)

    def logged_copy_(self: Any, src: Any, *args: Any, **kwargs: Any) -> Any:
        if on_device(src) and not on_device(self):
            log_copy("copy_", src.numel())
        return copy_(self, src, *args, **kwargs)

    torch.Tensor.cpu, torch.Tensor.to = logged_cpu, logged_to  # type: ignore[method-assign]
    torch.Tensor.tolist, torch.Tensor.copy_ = logged_tolist, logged_copy_  # type: ignore[method-assign]

    import common.losses.targets as targets_module

    original = targets_module.targets_from_parts

    def logged_targets_from_parts(meta: Any, roles: Any, parts: Any, *args: Any, **kwargs: Any) -> Any:
        _write(path, {"call": "targets_from_parts", "batch_id": meta.get("batch_id"),
                      "devices": [[getattr(getattr(v, "device", None), "type", None) for v in p.values()]
                                  for p in parts],
                      "types": sorted({type(v).__name__ for p in parts for v in p.values()})})
        return original(meta, roles, parts, *args, **kwargs)

    # student_worker.worker binds the name at its import, which comes after this hook
    targets_module.targets_from_parts = logged_targets_from_parts
