"""`TeacherActor`: a thin Ray actor around one teacher engine.

Every call carries its batch id and the batch's counted rows (flat b * T + t). Results are kept in a small
LRU keyed by (call, batch id, a digest of the inputs, k, tau), so a call that is re-sent to the same live
actor returns the same result without a second forward pass (Ray's retries after a restart land on a
fresh actor, which recomputes: the engine is deterministic).

Two edges, one computation, one method each (`topk`, `gather`; `support` for RDT), the edge picked by the
call's `transport` argument (the engine returns torch tensors on its device; log-probs are cast to the
torch wire dtype once, here):
- object store (`transport="object_store"`, the default): dicts of numpy arrays in the wire dtype (bf16 as
  uint16 bits), zero-copy reads for the receiver. This is the only place the record path turns tensors into
  numpy.
- Ray Direct Transport (`transport` = the call's `.options(tensor_transport=...)`: `cuda_ipc`, `nccl`,
  `gloo`): dicts of the engine's tensors as they are (CUDA on GPUs). Only a `gloo` call with CUDA tensors
  moves them to the host first (gloo carries CPU tensors only).

A LoRA pair (`pair_base` given; teacher_service/engine_pair.py) is one actor that serves two roles, `sft` with
the adapter on and `base` with it off: every call may name its `role` (default: the actor's own), and
`pair_gather` scores the base role at this actor's own cached SFT support, so the support never leaves the
actor.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import OrderedDict
from typing import Any

import numpy as np
import ray
import torch

from common.config import ModelSpec
from common.faults import FaultPlan
from common.reproducibility import apply_compute_settings

from .engine_hf import TeacherEngine
from .record_handle import OBJECT_STORE

__all__ = ["TeacherActor", "TORCH_WIRE_DTYPES", "to_numpy_wire", "placement", "make_engine"]

TORCH_WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

Part = dict[str, torch.Tensor]


def _digest(*arrays: Any) -> str:
    """Short content hash of host inputs (numpy, or None): part of the cache key, so a reused batch id never
    aliases."""
    h = hashlib.blake2b(digest_size=12)
    for a in arrays:
        if a is None:
            h.update(b"none")
            continue
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _support_key(ids: Any) -> Any:
    """Cache-key part for a support: a digest of host ids; for a device tensor (RDT) two weighted sums,
    read with one small sync instead of copying the ids to the host."""
    if isinstance(ids, torch.Tensor):
        flat = ids.reshape(-1).long()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device)
        return (tuple(ids.shape), *torch.stack([flat.sum(), (flat * weights).sum()]).tolist())
    return _digest(np.asarray(ids))


def to_numpy_wire(x: torch.Tensor) -> np.ndarray:
    """A torch tensor -> numpy for the object store (bf16 becomes its uint16 bit pattern, the numpy wire bf16)."""
    x = x.detach().cpu()
    if x.dtype == torch.bfloat16:
        return x.contiguous().view(torch.int16).numpy().view(np.uint16)
    return x.numpy()


def make_engine(role: str, spec: ModelSpec, engine: str = "hf", device: str = "auto", dtype: str = "auto",
                chunk_tokens: int = 1024, vllm_options: dict[str, Any] | None = None, num_gpus: int = 1,
                pair_base: ModelSpec | None = None) -> Any:
    """The engine of one teacher role: TeacherEngine ("hf") or VLLMEngine ("vllm", top-k only); with
    pair_base, a PairEngine of that base and the adapter `spec` (hf only; common/lora.py refuses vllm).
    num_gpus: the GPUs the replica holds and the hf engine spreads the model over (its device map); vLLM's
    tensor_parallel_size comes in vllm_options."""
    if pair_base is not None:
        if engine != "hf":
            raise ValueError(f"teacher role {role!r}: a LoRA pair runs on the hf engine, not {engine!r}")
        from .engine_pair import PairEngine  # deferred: imports peft (only a pair needs it)

        return PairEngine(pair_base, spec, device=device, dtype=dtype, chunk_tokens=chunk_tokens, num_gpus=num_gpus)
    if engine == "vllm":
        from .engine_vllm import VLLMEngine  # deferred: optional vLLM engine (~0.13 s an hf actor never pays)

        return VLLMEngine(spec, **(vllm_options or {}))
    if engine == "hf":
        return TeacherEngine(spec, device=device, dtype=dtype, chunk_tokens=chunk_tokens, num_gpus=num_gpus)
    raise ValueError(f"teacher role {role!r}: unknown engine {engine!r} (expected 'hf' or 'vllm')")


def placement() -> dict[str, Any]:
    """Where the calling Ray worker runs: {"node_id", "gpu_ids"} (used to pick the RDT transport). GPU ids are
    kept as Ray gives them, as strings: Ray returns strings, UUIDs where CUDA_VISIBLE_DEVICES names devices
    by UUID (`gpu_id_strings`)."""
    return {"node_id": ray.get_runtime_context().get_node_id(), "gpu_ids": gpu_id_strings(ray.get_gpu_ids())}


def gpu_id_strings(ids: Any) -> list[str]:
    """Ray's GPU ids as strings ("0", "1", or "GPU-8f2e..." UUIDs), never parsed as numbers."""
    return [str(g) for g in ids]


@ray.remote(enable_tensor_transport=True)
class TeacherActor:
    """One replica of one teacher role. See the module docstring for the call protocol."""

    def __init__(self, role: str, spec: dict[str, Any], engine: str = "hf", device: str = "auto",
                 dtype: str = "auto", chunk_tokens: int = 1024, wire_dtype: str = "float32",
                 cache_size: int = 32, vllm_options: dict[str, Any] | None = None,
                 compute: dict[str, Any] | None = None, faults: FaultPlan | None = None, num_gpus: int = 1,
                 pair_base: dict[str, Any] | None = None):
        """compute: the run's reproducibility settings (None: their defaults), applied before any tensor op;
        faults: a test's FaultPlan (common/faults.py; its teacher_delay_s is a sleep in every top-k / gather
        call, counted as busy time), None in production; num_gpus: the whole GPUs this replica holds (1 for
        one GPU, a fraction of one, or none), which the hf engine spreads the model over; pair_base: the base
        teacher's spec when `spec` is a LoRA adapter of it (this actor then serves `sft` and `base`)."""
        self.compute = apply_compute_settings(compute, where=f"teacher {role}")
        model_spec = ModelSpec.model_validate(spec)
        self.faults = faults
        self.role = role
        self.wire_dtype = wire_dtype
        self.torch_wire = TORCH_WIRE_DTYPES[wire_dtype]
        self.engine_kind = engine
        self.engine: Any = make_engine(role, model_spec, engine, device, dtype, chunk_tokens, vllm_options, num_gpus,
                                       None if pair_base is None else ModelSpec.model_validate(pair_base))
        self.roles = list(getattr(self.engine, "roles", [role]))  # the roles this actor answers for
        self.cache: OrderedDict[tuple, Part] = OrderedDict()
        self.cache_size = int(cache_size)
        self.started = time.time()
        self.counters = {"calls": 0, "cache_hits": 0, "tokens": 0, "rows": 0, "busy_s": 0.0}

    # ------------------------------------------------------------------ the computation (tensors)
    def _remember(self, key: tuple, value: Part) -> Part:
        self.cache[key] = value
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return value

    def _cached(self, key: tuple) -> Part | None:
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            self.counters["cache_hits"] += 1
        return hit

    def _role(self, role: str | None) -> dict[str, Any]:
        """The engine's role keyword for a call: {} for a one-role actor (which checks the name)."""
        if role is not None and role not in self.roles:
            raise ValueError(f"teacher {self.role} ({self.engine.name}) serves roles {self.roles}, not {role!r}")
        if len(self.roles) == 1:
            return {}
        return {"role": role or self.role}

    def _count(self, attention_mask: Any, rows: Any, t0: float) -> None:
        self.counters["calls"] += 1
        self.counters["tokens"] += int(np.asarray(attention_mask).sum())  # the backbone runs over these
        self.counters["rows"] += int(len(rows))  # the head and the softmax over these
        self.counters["busy_s"] += time.perf_counter() - t0

    def _topk(self, batch_id: Any, input_ids: Any, attention_mask: Any, rows: Any, k: int, tau: float,
              include: Any, role: str | None = None) -> Part:
        """{"ids": int32 [N, K], "logprobs": fp32 [N, K], "tail": fp32 [N]} on the engine's device."""
        by_role = self._role(role)
        key = ("topk", batch_id, _digest(input_ids, attention_mask, rows, include), int(k), float(tau),
               by_role.get("role"))
        hit = self._cached(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        if self.faults is not None:
            self.faults.teacher_call()  # FaultPlan.teacher_delay_s
        ids, lps, tail = self.engine.topk(input_ids, attention_mask, rows, k, tau, include=include,
                                          batch_id=batch_id, **by_role)
        self._count(attention_mask, rows, t0)
        return self._remember(key, {"ids": torch.as_tensor(ids), "logprobs": torch.as_tensor(lps),
                                    "tail": torch.as_tensor(tail)})

    def _gather(self, batch_id: Any, input_ids: Any, attention_mask: Any, rows: Any, support: Any,
                tau: float, role: str | None = None) -> Part:
        """{"logprobs": fp32 [N, K], "tail": fp32 [N]} at the support's ids."""
        by_role = self._role(role)
        ids = support["ids"] if isinstance(support, dict) else support
        key = ("gather", batch_id, _digest(input_ids, attention_mask, rows), _support_key(ids), float(tau),
               by_role.get("role"))
        hit = self._cached(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        if self.faults is not None:
            self.faults.teacher_call()  # FaultPlan.teacher_delay_s
        lps, tail = self.engine.gather(input_ids, attention_mask, rows, ids, tau, batch_id=batch_id, **by_role)
        self._count(attention_mask, rows, t0)
        return self._remember(key, {"logprobs": torch.as_tensor(lps), "tail": torch.as_tensor(tail)})

    # ------------------------------------------------------------------ the calls: one per computation
    # `transport` says how the result leaves: "object_store" (numpy wire arrays) or the tensor transport the
    # caller set on this call with `.options(tensor_transport=...)` ("gloo", "nccl", "cuda_ipc": the engine's
    # tensors). teacher_service/chain.py makes both kinds of call.
    def topk(self, batch_id: Any, input_ids: np.ndarray, attention_mask: np.ndarray, rows: np.ndarray, k: int,
             tau: float, include: np.ndarray | None = None, wire: bool = True,
             transport: str = OBJECT_STORE, role: str | None = None) -> dict[str, Any]:
        """{"ids": int32 [N,K], "logprobs": [N,K] wire dtype (fp32 if not wire; object store only), "tail":
        fp32 [N]} at the rows: numpy for the object store, the engine's tensors for RDT.

        include: optional [N] ids forced into the support (K = k + 1; `TeacherEngine.topk`). role: which of
        this actor's roles answers (a pair serves two; default the actor's own).
        """
        out = self._topk(batch_id, input_ids, attention_mask, rows, k, tau, include, role)
        if transport != OBJECT_STORE:
            return self._for_transport(out, transport)
        lps = out["logprobs"].to(self.torch_wire) if wire else out["logprobs"]
        return {"ids": to_numpy_wire(out["ids"]), "logprobs": to_numpy_wire(lps), "tail": to_numpy_wire(out["tail"])}

    def support(self, batch_id: Any, input_ids: np.ndarray, attention_mask: np.ndarray, rows: np.ndarray,
                k: int, tau: float, include: np.ndarray | None = None, transport: str = "gloo") -> Part:
        """{"ids": [N, K]}: the support of `topk` for one gathering teacher (from the result cache), RDT only,
        so that each RDT object has one reader (teacher_service/chain.py says why; over the object store the
        top-k result itself goes to every gatherer)."""
        if transport == OBJECT_STORE:
            raise ValueError("support parts are for RDT; over the object store pass the topk result itself")
        ids = self._topk(batch_id, input_ids, attention_mask, rows, k, tau, include)["ids"]
        return {"ids": ids.cpu() if transport == "gloo" and ids.is_cuda else ids}

    def gather(self, batch_id: Any, input_ids: np.ndarray, attention_mask: np.ndarray, rows: np.ndarray,
               support: Any, tau: float, wire: bool = True, transport: str = OBJECT_STORE,
               role: str | None = None) -> dict[str, Any]:
        """{"logprobs": [N,K], "tail": fp32 [N]} at the support's ids: numpy for the object store, the engine's
        tensors for RDT. `support`: the sft result or ids [N, K] (object store), this gatherer's support part
        received as tensors (RDT: `support`)."""
        return self._leave(self._gather(batch_id, input_ids, attention_mask, rows, support, tau, role), wire,
                           transport)

    def _leave(self, out: Part, wire: bool, transport: str) -> dict[str, Any]:
        """A gathered part as it leaves: the engine's tensors for RDT, numpy wire arrays for the object store."""
        if transport != OBJECT_STORE:
            return self._for_transport(out, transport)
        lps = out["logprobs"].to(self.torch_wire) if wire else out["logprobs"]
        return {"logprobs": to_numpy_wire(lps), "tail": to_numpy_wire(out["tail"])}

    def _pair_gather(self, batch_id: Any, input_ids: Any, attention_mask: Any, rows: Any, k: int, tau: float,
                     include: Any, role: str) -> Part:
        """`role` (a pair's other role) at this actor's own SFT support of the batch: the top-k comes from the
        result cache (the chain's `topk` call ran just before on this actor), or is computed here."""
        support = self._topk(batch_id, input_ids, attention_mask, rows, k, tau, include)["ids"]
        return self._gather(batch_id, input_ids, attention_mask, rows, support, tau, role)

    def pair_gather(self, batch_id: Any, input_ids: np.ndarray, attention_mask: np.ndarray, rows: np.ndarray,
                    k: int, tau: float, include: np.ndarray | None = None, wire: bool = True,
                    transport: str = OBJECT_STORE, role: str = "base") -> dict[str, Any]:
        """A LoRA pair's `role` (default base) at its own SFT support (arguments as `topk`): `gather` without
        the support crossing the wire. {"logprobs": [N,K], "tail": fp32 [N]}; over RDT one reader (the
        receiving worker)."""
        return self._leave(self._pair_gather(batch_id, input_ids, attention_mask, rows, k, tau, include, role),
                           wire, transport)

    def _for_transport(self, out: Part, transport: str) -> Part:
        """The part as sent over RDT: log-probs in the torch wire dtype (the same cast as the object store's),
        on the engine's device; a new dict, so an fp32 wire sends the cached tensors themselves (never
        modified)."""
        sent = {**out, "logprobs": out["logprobs"].to(self.torch_wire)}
        if transport == "gloo" and any(v.is_cuda for v in sent.values()):
            return {name: v.cpu() for name, v in sent.items()}  # gloo carries CPU tensors only
        return sent

    # ------------------------------------------------------------------ service
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise with this teacher's tokenizer, right padded: (input_ids int32, attention_mask) [B, T]."""
        return self.engine.encode(texts)

    def health(self) -> dict[str, Any]:
        """Liveness plus what routing needs: node, GPUs, and whether the engine returns device tensors
        (`tensor_engine`: an engine with a torch `.device`; the RDT path requires it); `placement_group`: the
        hex id of the replica's own placement group (multi-GPU replicas), else None."""
        pg = ray.util.get_current_placement_group()
        return {"ok": True, "role": self.role, "roles": self.roles, "engine": self.engine_kind, "pid": os.getpid(),
                "placement_group": None if pg is None else pg.id.hex(),
                "wire_dtype": self.wire_dtype, "uptime_s": time.time() - self.started, **placement(),
                "tensor_engine": isinstance(getattr(self.engine, "device", None), torch.device),
                **self.engine.describe()}

    def stats(self) -> dict[str, Any]:
        """Tokens served (attended, through the backbone), rows scored, busy seconds, calls (cache hits not
        included), role and model path."""
        return {"role": self.role, "roles": self.roles, "model": self.engine.name, **self.counters}
