"""The teacher call chain of one batch: the SFT teacher's top-k, then every gathering role at its support.

Shared by `TeacherPool` (routed, object store or RDT) and `TeacherClient.record` (round robin), so a change to
the chain is made once. The support ids travel teacher to teacher as direct arguments; the caller never fetches
them. Object store: the sft result ref itself goes to each gathering role (an object-store object may have any
number of readers). RDT: each gathering role gets its own support part from the sft actor (`support`,
served from the actor's result cache), so every RDT object has exactly one reader: the sft part is read by the
student worker alone. (A cuda_ipc object read twice is never freed: Ray sends its IPC handle to every reader,
while PyTorch's IPC reference count expects one release, so the sender keeps every such part alive.)

A LoRA pair (`paired`: roles the SFT actor serves itself, e.g. base with the adapter off) short-circuits the
gather: the role's call goes to the same replica as the top-k (`pair_gather`), which scores it at its own
cached support; no support is sent at all.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import numpy as np
import ray

from common.roles import gather_roles
from common.topk import ROLE_SFT

__all__ = ["call_chain", "warmup_inputs"]

Pick = Callable[[str], tuple[int, Any]]  # role -> (replica index, actor handle)


def call_chain(roles: list[str], pick: Pick, batch_id: Any, input_ids: Any, attention_mask: Any, rows: Any, k: int,
               tau: float, *, include: Any = None, wire: bool = True, tensor_transport: str | None = None,
               paired: Collection[str] = (), ) -> list[tuple[str, int, ray.ObjectRef]]:
    """Submit sft top-k and the gathers of `gather_roles(roles)`; returns (role, replica, ref) in chain order.

    input_ids / attention_mask: [B, T] arrays or object refs to them; rows: [N] flat b * T + t (or a ref);
    include: optional [N] ids forced into the sft support (K = k + 1). wire=False asks for fp32 log-probs
    (object-store calls only). tensor_transport ("gloo", "nccl", "cuda_ipc") makes every call an RDT call
    (the same actor methods with `.options(tensor_transport=...)` and `transport=`): every part goes with that
    transport, and each RDT object (the sft part, each gatherer's support part) has
    exactly one reader. paired: the gathering roles the sft replica answers itself (a LoRA pair's base).
    """
    def call(handle: Any, method: str, *args: Any, **kwargs: Any) -> ray.ObjectRef:
        if tensor_transport is None:
            return getattr(handle, method).remote(*args, wire=wire, **kwargs)
        return getattr(handle, method).options(tensor_transport=tensor_transport).remote(
            *args, transport=tensor_transport, **kwargs)

    i_sft, sft = pick(ROLE_SFT)
    sft_ref = call(sft, "topk", batch_id, input_ids, attention_mask, rows, k, tau, include=include)
    calls = [(ROLE_SFT, i_sft, sft_ref)]
    for role in gather_roles(roles):
        if role in paired:  # the same replica, at its own support: nothing crosses the wire
            calls.append((role, i_sft, call(sft, "pair_gather", batch_id, input_ids, attention_mask, rows, k, tau,
                                             include=include, role=role)))
            continue
        support = sft_ref if tensor_transport is None else call(sft, "support", batch_id, input_ids, attention_mask,
                                                                rows, k, tau, include=include)
        i, h = pick(role)
        calls.append((role, i, call(h, "gather", batch_id, input_ids, attention_mask, rows, support, tau)))
    return calls


def warmup_inputs(seq_len: int = 8) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A one-row batch of token id 0 with every position real: (input_ids, attention_mask, loss_mask)."""
    ids = np.zeros((1, seq_len), dtype=np.int32)
    return ids, np.ones_like(ids), np.ones((1, seq_len), dtype=bool)
