"""Which Ray Direct Transport carries a run's teacher parts (`transport.rdt_backend: auto`). No Ray here.

One transport per run, not per (teacher, worker) pair: the sft part of a batch is one RDT object that the
gathering teachers (for its support ids) and the receiving worker both read, and an RDT object has one
transport. Ray allows a transport per call, but a per-pair choice would need the sft part sent twice.

Ray 2.60's transports (ray/experimental/rdt/):
- `cuda_ipc`: one-sided, no collective group; the receiver must run on the sender's node AND hold the
  sender's GPU among its Ray-assigned GPUs (it maps the sender's memory on that device). In practice:
  actors sharing one GPU (fractional num_gpus).
- `nccl`: two-sided, a collective group; CUDA tensors; NCCL refuses two ranks of one communicator on one
  GPU, so no two members may share a GPU.
- `gloo`: two-sided, a collective group; CPU tensors only (a CUDA teacher's part is moved to the host).
"""

from __future__ import annotations

from typing import Any

from common.topk import ROLE_SFT

__all__ = ["choose_rdt_transport", "RDT_TRANSPORTS"]

RDT_TRANSPORTS = ("gloo", "nccl", "cuda_ipc")


def _on_gpu(p: dict[str, Any]) -> bool:
    return str(p.get("device", "cuda" if p.get("gpu_ids") else "cpu")).startswith("cuda")


def _ipc_reachable(sender: dict[str, Any], receiver: dict[str, Any]) -> bool:
    """cuda_ipc from sender to receiver: same node, and the receiver holds the sender's (single) GPU."""
    gpus = sender.get("gpu_ids") or []
    return (sender.get("node_id") == receiver.get("node_id") and len(gpus) >= 1
            and all(g in (receiver.get("gpu_ids") or []) for g in gpus[:1]))


def choose_rdt_transport(configured: str, teachers: list[dict[str, Any]],
                         receivers: list[dict[str, Any]] | None) -> str:
    """The run's transport.

    configured: transport.rdt_backend ("auto" or one of RDT_TRANSPORTS, returned as is).
    teachers: one placement per teacher replica: {"role", "node_id", "gpu_ids", "device"} (its `health()`).
    receivers: the receiving workers' placements {"node_id", "gpu_ids"}, or None when unknown.

    auto: gloo when any teacher or receiver has no GPU; cuda_ipc when every part can be mapped by its reader
    (every teacher -> every receiver, and every sft replica -> every gathering teacher, which reads its own
    support part: same node, reader holding the sender's GPU); else nccl, unless two members share a GPU
    (NCCL cannot), which is an error naming them. GPU ids are compared as given (strings or UUIDs).
    """
    if configured != "auto":
        if configured not in RDT_TRANSPORTS:
            raise ValueError(f"transport.rdt_backend={configured!r}: expected auto or one of {RDT_TRANSPORTS}")
        return configured
    if not teachers or not all(_on_gpu(t) for t in teachers):
        return "gloo"
    if receivers is None:  # placement unknown: the choice that works across nodes
        return "nccl"
    if not all(r.get("gpu_ids") for r in receivers):
        return "gloo"
    members = list(teachers) + list(receivers)
    gatherers = [t for t in teachers if t.get("role") != ROLE_SFT]
    # readers of a part: the receivers; of an sft part, also every gathering teacher (its support ids)
    if all(_ipc_reachable(t, r) for t in teachers
           for r in (list(receivers) + (gatherers if t.get("role") == ROLE_SFT else []))):
        return "cuda_ipc"
    seen: dict[tuple[Any, str], int] = {}
    for j, m in enumerate(members):
        for g in m.get("gpu_ids") or []:
            key = (m.get("node_id"), str(g))
            if key in seen:
                a, b = (_name(seen[key], len(teachers)), _name(j, len(teachers)))
                raise ValueError(f"transport.rdt_backend=auto: {a} and {b} share GPU {g} on one node, which NCCL "
                                 f"cannot connect, while other members are on other GPUs (so cuda_ipc cannot "
                                 f"reach them either). Give each its own GPU, put all on one GPU, or use "
                                 f"transport.kind=object_store")
            seen[key] = j
    return "nccl"


def _name(j: int, n_teachers: int) -> str:
    return f"teacher replica {j}" if j < n_teachers else f"student worker {j - n_teachers}"
