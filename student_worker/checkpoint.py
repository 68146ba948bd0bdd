"""Atomic training checkpoints: the student in HF format, optimizer + scheduler, RNG states, run state.

Layout of one checkpoint (`<out>/checkpoints/ckpt-000042/`):

    model/              student, `save_pretrained` (safetensors) + tokenizer: loadable by transformers
    optimizer.pt        {"optimizer": ..., "scheduler": ...} state dicts (torch.save; loaded weights_only)
    rng-rank<r>.json    torch / numpy / python RNG states of rank r (and CUDA when present)
    state.json          step, data cursor (= step), config hash, resolved config, metrics so far

An FSDP2 student (`training.strategy: fsdp2`) writes `sharded/` (torch.distributed.checkpoint), `scheduler.json`
and `sharding.json` in place of `model/` and `optimizer.pt` (student_worker/fsdp_checkpoint.py); the rest is
the same, and so is everything below.

A checkpoint is built in `ckpt-XXXXXX.tmp`, every file in it is fsynced (a full disk or an I/O error that the
filesystem reports late, at flush, surfaces here), and only then renamed with `os.replace`, so a directory
named `ckpt-XXXXXX` is complete by construction and a failed write never touches an earlier checkpoint (the
driver removes the partial `.tmp` and raises CheckpointWriteError); `latest_checkpoint` also checks the
files, so a copy truncated by hand is skipped. Nothing is unpickled: tensors load with `weights_only=True`, the rest
is JSON.
"""

from __future__ import annotations

import errno
import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.config import (
    RESUME_FREE,
    ConfigError,
    RunConfig,
    config_diff,
    config_from_dict,
    keys_with_policy,
    with_legacy_delta_form,
    without_retired_keys,
)

__all__ = [
    "CheckpointError",
    "CheckpointWriteError",
    "IO_ERRNOS",
    "io_error_of",
    "raise_io_error",
    "CKPT_DIR_RE",
    "checkpoint_name",
    "begin_checkpoint",
    "write_rng_state",
    "read_rng_state",
    "write_optimizer_state",
    "read_optimizer_state",
    "verify_checkpoint",
    "check_no_previous_run",
    "finalize_checkpoint",
    "list_checkpoints",
    "latest_checkpoint",
    "read_state",
    "check_resume_config",
    "RESUME_IGNORED_KEYS",
    "SHARDED_DIR",
    "SHARDING_FILE",
    "SCHEDULER_FILE",
]

CKPT_DIR_RE = re.compile(r"^ckpt-(\d{6})$")
STATE_FILE = "state.json"
MODEL_DIR = "model"
OPTIMIZER_FILE = "optimizer.pt"
# the sharded layout (student_worker/fsdp_checkpoint.py)
SHARDED_DIR = "sharded"
SHARDING_FILE = "sharding.json"
SCHEDULER_FILE = "scheduler.json"

# Keys that may differ between the run that wrote a checkpoint and the one resuming from it: the schema's
# RESUME_FREE fields and sections (common/config/base.py says which and why; a trailing '.' is a section).
RESUME_IGNORED_KEYS = tuple(keys_with_policy(RunConfig, RESUME_FREE))


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or belongs to another config. The message names the path."""


# OS errors that mean "the output's storage failed" (EX_IOERR territory), not a bug or bad input.
IO_ERRNOS = frozenset({errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS, errno.EFBIG})
_OS_ERROR_CODE = re.compile(r"\(os error (\d+)\)")  # how Rust libraries (safetensors) name an OS error


def io_error_of(exc: BaseException | None) -> OSError | None:
    """The storage failure behind `exc` (no space left, EIO, quota, read-only filesystem, file too large), or
    None: an OSError with one of IO_ERRNOS anywhere in the chain (Ray's `.cause`, `__cause__`, `__context__`:
    torch.save's RuntimeError has the OSError as its context), or such a code named only in a library's
    message (safetensors: `I/O error: No space left on device (os error 28)`)."""
    seen = 0
    while exc is not None and seen < 30:
        if isinstance(exc, OSError) and exc.errno in IO_ERRNOS:
            return exc
        code = _OS_ERROR_CODE.search(str(exc)) if not isinstance(exc, OSError) else None
        if code is not None and int(code.group(1)) in IO_ERRNOS:
            n = int(code.group(1))
            return OSError(n, os.strerror(n))
        exc = getattr(exc, "cause", None) or exc.__cause__ or exc.__context__
        seen += 1
    return None


def raise_io_error(exc: BaseException, path: str | Path) -> None:
    """Raise a plain OSError(errno, strerror, path) from `exc` when it is a storage failure (io_error_of), so
    it survives the trip from a worker to the driver (Ray pickles the exception, not its chain); else return."""
    found = io_error_of(exc)
    if found is not None:
        raise OSError(found.errno, found.strerror, str(path)) from exc


class CheckpointWriteError(RuntimeError):
    """Writing the checkpoint of `step` failed at the storage level (`os_error`: ENOSPC, EIO, ...). The partial
    `.tmp` directory was removed; `previous` (the last complete checkpoint, or None) is untouched."""

    def __init__(self, step: int, path: Path, previous: Path | None, os_error: OSError):
        self.step, self.path, self.previous, self.os_error = step, Path(path), previous, os_error
        name = errno.errorcode.get(os_error.errno or 0, "EIO")
        where = f" ({os_error.filename})" if os_error.filename else ""
        super().__init__(f"cannot write checkpoint {self.path.name.removesuffix('.tmp')} (step {step}) in "
                         f"{self.path.parent}: {os_error.strerror or os_error} [{name}]{where}")


def checkpoint_name(step: int) -> str:
    return f"ckpt-{step:06d}"


def begin_checkpoint(ckpt_root: str | Path, step: int) -> Path:
    """Create an empty `ckpt-XXXXXX.tmp` directory (a stale one from a crash is removed first)."""
    tmp = Path(ckpt_root) / (checkpoint_name(step) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def write_rng_state(ckpt_dir: str | Path, rank: int) -> None:
    """Save this process's torch / numpy / python (and CUDA) RNG states as JSON (no pickle)."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state().tolist(),
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
        "python": _py_state_to_json(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    (Path(ckpt_dir) / f"rng-rank{rank}.json").write_text(json.dumps(state))


def read_rng_state(ckpt_dir: str | Path, rank: int) -> None:
    """Restore the RNG states written by `write_rng_state` for `rank` into this process."""
    path = Path(ckpt_dir) / f"rng-rank{rank}.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: missing RNG state of rank {rank} (checkpoint from another world size?)")
    state = json.loads(path.read_text())
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    random.setstate(_py_state_from_json(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _py_state_to_json(state: tuple[Any, ...]) -> list[Any]:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(data: list[Any]) -> tuple[Any, ...]:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)


def write_optimizer_state(ckpt_dir: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    # Through our own file object: a full disk then leaves its OSError in the chain (torch.save on a path
    # reports only "unexpected pos ..."), which io_error_of finds.
    with open(Path(ckpt_dir) / OPTIMIZER_FILE, "wb") as f:
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, f)


def read_optimizer_state(ckpt_dir: str | Path, optimizer: torch.optim.Optimizer, scheduler: Any) -> None:
    path = Path(ckpt_dir) / OPTIMIZER_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing optimizer state")
    data = _load_tensors_only(path)
    optimizer.load_state_dict(data["optimizer"])
    scheduler.load_state_dict(data["scheduler"])


def _load_tensors_only(path: Path, mmap: bool = False) -> dict[str, Any]:
    """torch.load with weights_only=True: tensors and plain containers only, so a crafted pickle (a
    `__reduce__` that runs code) is refused instead of executed. Raises CheckpointError naming the file."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as exc:  # UnpicklingError, RuntimeError (not a zip archive), ...: all mean "refused"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{path}: refused to load (not a weights-only torch file; nothing untrusted is "
                              f"unpickled): {type(exc).__name__}: {first}") from None
    if not isinstance(data, dict) or not {"optimizer", "scheduler"} <= set(data):
        raise CheckpointError(f"{path}: expected a dict with 'optimizer' and 'scheduler' state dicts")
    return data


def verify_checkpoint(ckpt_dir: str | Path) -> None:
    """Check a checkpoint before any process loads it: state.json is JSON with a step, the weights are
    safetensors with readable headers, the optimizer file loads weights-only (memory-mapped: cheap even
    for a large optimizer state). Raises CheckpointError naming the offending file."""
    from safetensors import safe_open  # deferred: ~7 ms (measured) every worker would pay for this one use

    root = Path(ckpt_dir)
    read_state(root)
    if _is_sharded(root):
        _verify_sharded(root)
        return
    weights = sorted((root / MODEL_DIR).glob("*.safetensors"))
    if not weights:
        raise CheckpointError(f"{root / MODEL_DIR}: no safetensors weights")
    for f in weights:
        try:
            with safe_open(str(f), framework="pt") as handle:
                handle.keys()
        except Exception as exc:
            raise CheckpointError(f"{f}: not a readable safetensors file ({exc})") from None
    bins = [p.name for p in (root / MODEL_DIR).iterdir() if p.suffix in (".bin", ".pt", ".pkl", ".pth")]
    if bins:
        raise CheckpointError(f"{root / MODEL_DIR}: pickle-based weight files {bins} are not accepted")
    _load_tensors_only(root / OPTIMIZER_FILE, mmap=True)


def finalize_checkpoint(tmp_dir: str | Path, state: dict[str, Any], keep: int) -> Path:
    """Write state.json into `ckpt-XXXXXX.tmp`, rename it to `ckpt-XXXXXX` atomically, keep the last `keep`.

    state: must hold "step"; conventionally also "data_cursor", "config_hash", "config", "metrics".
    Returns the final directory.
    """
    tmp = Path(tmp_dir)
    if not tmp.name.endswith(".tmp"):
        raise CheckpointError(f"{tmp}: not a temporary checkpoint directory (expected a .tmp suffix)")
    parts = (SHARDED_DIR, SHARDING_FILE, SCHEDULER_FILE) if _is_sharded(tmp) else (MODEL_DIR, OPTIMIZER_FILE)
    missing = [p for p in parts if not (tmp / p).exists()]
    if missing:
        raise CheckpointError(f"{tmp}: incomplete checkpoint, missing {missing}")
    (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, sort_keys=True))
    _fsync_tree(tmp)  # every byte on disk before the name says "complete"
    final = tmp.with_name(tmp.name[: -len(".tmp")])
    if final.exists():  # the same step saved again (e.g. after a restore): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync(final.parent)  # the rename itself
    for old in list_checkpoints(final.parent)[:-keep]:
        shutil.rmtree(old)
    return final


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory (children first)."""
    dirs = [root]
    for path in sorted(root.rglob("*")):
        if path.is_dir():
            dirs.append(path)
        else:
            _fsync(path)
    for d in reversed(dirs):
        _fsync(d)


def _is_sharded(path: Path) -> bool:
    return (path / SHARDED_DIR).is_dir()


def _verify_sharded(root: Path) -> None:
    """The sharded layout: its JSON files parse, and DCP's `.metadata` index (a pickle) holds only DCP's
    metadata classes and torch sizes/dtypes (checked with an allow-list unpickler, nothing else constructed)."""
    for name in (SHARDING_FILE, SCHEDULER_FILE):
        try:
            json.loads((root / name).read_text())
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"{root / name}: missing or not JSON ({exc})") from None
    meta = root / SHARDED_DIR / ".metadata"
    try:
        with open(meta, "rb") as f:
            _MetadataUnpickler(f).load()
    except Exception as exc:  # OSError, UnpicklingError, ...: all mean "refused"
        raise CheckpointError(f"{meta}: refused to load (not a torch.distributed.checkpoint index of tensors; "
                              f"nothing untrusted is unpickled): {type(exc).__name__}: {exc}") from None
    if not any((root / SHARDED_DIR).glob("*.distcp")):
        raise CheckpointError(f"{root / SHARDED_DIR}: no .distcp shard files")


class _MetadataUnpickler(pickle.Unpickler):
    """Admits the globals a DCP `.metadata` of tensors names, nothing else (no callables of torch or builtins)."""

    _MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem", "torch.distributed.checkpoint._extension")
    _TORCH = {("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
              ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str) -> Any:
        dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module in self._MODULES or (module, name) in self._TORCH or dtype:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")


def _is_complete(path: Path) -> bool:
    if _is_sharded(path):
        return ((path / SHARDED_DIR / ".metadata").is_file() and (path / SHARDING_FILE).is_file()
                and (path / STATE_FILE).is_file())
    model = path / MODEL_DIR
    has_weights = model.is_dir() and any(model.glob("*.safetensors"))
    return has_weights and (path / OPTIMIZER_FILE).is_file() and (path / STATE_FILE).is_file()


def list_checkpoints(ckpt_root: str | Path) -> list[Path]:
    """Complete checkpoints under `ckpt_root`, oldest first (`.tmp` and half-copied ones are skipped)."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CKPT_DIR_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found) if _is_complete(p)]


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    done = list_checkpoints(ckpt_root)
    return done[-1] if done else None


def read_state(ckpt_dir: str | Path) -> dict[str, Any]:
    path = Path(ckpt_dir) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (incomplete checkpoint)")
    try:
        state: dict[str, Any] = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc})") from None
    if "step" not in state:
        raise CheckpointError(f"{path}: no 'step' key")
    return state


def check_resume_config(ckpt_dir: str | Path, config: dict[str, Any]) -> None:
    """Raise CheckpointError listing the config keys that differ from the checkpoint's config.

    Keys in RESUME_IGNORED_KEYS (a trailing '.' means a whole section) may legitimately differ.
    """
    saved = read_state(ckpt_dir).get("config")
    if saved is None:
        raise CheckpointError(f"{Path(ckpt_dir) / STATE_FILE}: no resolved config stored; cannot check it")
    diffs = [d for d in config_diff(_with_defaults(saved), config) if not _ignored(d.split(":", 1)[0])]
    if diffs:
        lines = "\n  ".join(diffs)
        raise CheckpointError(
            f"cannot resume from {ckpt_dir}: it was written with a different config "
            f"(checkpoint != this run):\n  {lines}"
        )


def _with_defaults(saved: dict[str, Any]) -> dict[str, Any]:
    """The saved config with the keys added to the schema since it was written at their defaults (a checkpoint
    from before `training.on_policy` existed resumes a run that leaves it off) and the sections removed since
    dropped (common.config.RETIRED_KEYS: the old `testing:` section), except loss.delta_form, which is the
    form the run trained with (`with_legacy_delta_form`: student_shift where that differs from the default);
    as saved otherwise if it no longer validates (then every differing key is listed)."""
    saved = without_retired_keys(saved)
    try:
        return config_from_dict(with_legacy_delta_form(saved)).model_dump(mode="json")
    except ConfigError:
        return saved


def _ignored(key: str) -> bool:
    return any(key == k or (k.endswith(".") and (key.startswith(k) or key == k[:-1])) for k in RESUME_IGNORED_KEYS)


def check_no_previous_run(out_dir: str | Path) -> None:
    """Raise CheckpointError if `out_dir` holds a previous run (complete checkpoints or non-empty metrics):
    a fresh run there would overwrite them. `--resume` continues such a run instead."""
    out = Path(out_dir)
    previous = list_checkpoints(out / "checkpoints")
    metrics = out / "metrics.jsonl"
    if previous or (metrics.is_file() and metrics.stat().st_size > 0):
        what = previous[-1] if previous else metrics
        raise CheckpointError(f"output directory {out} already holds a previous run ({what}); pass --resume to "
                              f"continue it, or choose another output directory (nothing was overwritten)")
