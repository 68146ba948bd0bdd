"""Sharded checkpoints of an FSDP2 student (`training.strategy: fsdp2`), with torch.distributed.checkpoint.

Layout of one checkpoint (the DDP layout is in student_worker/checkpoint.py; both are built in a `.tmp`
directory, fsynced and renamed the same way by `checkpoint.finalize_checkpoint`):

    sharded/            torch.distributed.checkpoint of {"model", "optimizer"}: every rank writes its own
                        shards (`__<rank>_0.distcp`), rank 0 the `.metadata` index
    scheduler.json      the LR scheduler's state dict (JSON)
    sharding.json       {"strategy": "fsdp2", "world_size": W}
    rng-rank<r>.json    as in the DDP layout (checkpoint.write_rng_state)
    state.json          as in the DDP layout (written by the driver)

No full copy of the student is gathered to save or load one: each rank reads and writes 1/W of the weights
and AdamW state. A resume must use the same number of ranks: the data position and RNG states are per rank
(DCP itself could reshard the tensors, but the batches a rank trains would not be the ones it would have
trained), so `load_sharded` refuses another world size naming both (the config check, which compares
`training.num_workers`, refuses it first when the config is checked).

Trust: DCP's `.metadata` index is a pickle (torch's format); `checkpoint.verify_checkpoint` reads it with an
unpickler that admits only DCP's metadata classes and torch dtypes/sizes before any rank loads it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from student_worker.checkpoint import SCHEDULER_FILE, SHARDED_DIR, SHARDING_FILE, CheckpointError

__all__ = ["save_sharded", "load_sharded", "read_sharding"]


def save_sharded(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 rank: int, world_size: int) -> None:
    """Write this rank's shards of the model and optimizer (a collective: every rank calls it), and on rank 0
    the scheduler state and `sharding.json`."""
    root = Path(ckpt_dir)
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(root / SHARDED_DIR))
    if rank == 0:
        (root / SCHEDULER_FILE).write_text(json.dumps(scheduler.state_dict()))
        (root / SHARDING_FILE).write_text(json.dumps({"strategy": "fsdp2", "world_size": world_size}))


def read_sharding(ckpt_dir: str | Path) -> dict[str, Any]:
    """`sharding.json` of a sharded checkpoint; CheckpointError naming the file when it is missing or bad."""
    path = Path(ckpt_dir) / SHARDING_FILE
    try:
        info: dict[str, Any] = json.loads(path.read_text())
        int(info["world_size"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: missing or unreadable sharding record ({exc})") from None
    return info


def load_sharded(ckpt_dir: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                 world_size: int) -> None:
    """Load this rank's shards of a checkpoint written by `save_sharded` on `world_size` ranks (a collective).

    Raises CheckpointError when the checkpoint is not a sharded one (a DDP checkpoint: model/ + optimizer.pt)
    or was written by another number of ranks (the message names both)."""
    root = Path(ckpt_dir)
    if not (root / SHARDED_DIR / ".metadata").is_file():
        raise CheckpointError(f"{root}: not a sharded (training.strategy=fsdp2) checkpoint: no "
                              f"{SHARDED_DIR}/.metadata (a DDP checkpoint resumes with training.strategy=ddp)")
    saved = int(read_sharding(root)["world_size"])
    if saved != world_size:
        raise CheckpointError(f"{root}: written by {saved} student ranks, this run has {world_size}; a sharded "
                              f"checkpoint resumes on the same number of ranks (training.num_workers={saved}): "
                              "each rank's data position and RNG states are its own")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(root / SHARDED_DIR))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    try:
        scheduler.load_state_dict(json.loads((root / SCHEDULER_FILE).read_text()))
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{root / SCHEDULER_FILE}: missing or unreadable scheduler state ({exc})") from None
