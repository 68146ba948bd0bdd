"""`TeacherActor`: a thin Ray actor around one teacher engine.

Every call carries its batch id. Results are kept in a small LRU keyed by (call, batch id, a hash of the inputs, k, tau), so a
call that is re-sent to the same live actor returns the same arrays without a second forward pass (Ray's
retries after a restart land on a fresh actor, which recomputes: the engine is deterministic).

Object-store methods (`topk`, `gather`) return dicts of numpy arrays in the wire dtype (zero-copy reads for
the receiver). RDT methods (`topk_tensors`, `gather_tensors`) return dicts of torch tensors that Ray Direct
Transport moves through a collective group (gloo on CPU, nccl on GPU) instead of the object store.
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
from common.reproducibility import apply_compute_settings
from common.topk import to_wire_dtype

__all__ = ["TeacherActor", "TORCH_WIRE_DTYPES"]

TORCH_WIRE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _digest(*arrays: np.ndarray) -> str:
    """Short content hash of the inputs: part of the cache key, so a reused batch id never aliases."""
    h = hashlib.blake2b(digest_size=12)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype.str, a.shape)).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _support_ids(support: Any) -> np.ndarray:
    """The [B, T, k] ids of a support: an sft result dict (numpy or torch) or a bare array."""
    ids = support["ids"] if isinstance(support, dict) else support
    if isinstance(ids, torch.Tensor):
        ids = ids.cpu().numpy()
    return np.asarray(ids)


@ray.remote(enable_tensor_transport=True)
class TeacherActor:
    """One replica of one teacher role. See the module docstring for the call protocol."""

    def __init__(self, role: str, spec: dict[str, Any], engine: str = "hf", device: str = "auto",
                 dtype: str = "auto", chunk_tokens: int = 1024, wire_dtype: str = "float32",
                 cache_size: int = 32, vllm_options: dict[str, Any] | None = None,
                 compute: dict[str, Any] | None = None):
        # First, before any tensor op: threads and kernel set (reproducibility config; None: its defaults).
        self.compute = apply_compute_settings(compute, where=f"teacher {role}")
        model_spec = ModelSpec.model_validate(spec)
        self.role = role
        self.wire_dtype = wire_dtype
        self.engine_kind = engine
        if engine == "vllm":
            from .engine_vllm import VLLMEngine

            self.engine: Any = VLLMEngine(model_spec, **(vllm_options or {}))
        elif engine == "hf":
            from .engine_hf import TeacherEngine

            self.engine = TeacherEngine(model_spec, device=device, dtype=dtype, chunk_tokens=chunk_tokens)
        else:
            raise ValueError(f"teacher role {role!r}: unknown engine {engine!r} (expected 'hf' or 'vllm')")
        self.cache: OrderedDict[tuple, dict[str, np.ndarray]] = OrderedDict()
        self.cache_size = int(cache_size)
        self.started = time.time()
        self.counters = {"calls": 0, "cache_hits": 0, "tokens": 0, "busy_s": 0.0}

    # ------------------------------------------------------------------ bookkeeping
    def _cached(self, key: tuple) -> dict[str, np.ndarray] | None:
        hit = self.cache.get(key)
        if hit is not None:
            self.cache.move_to_end(key)
            self.counters["cache_hits"] += 1
        return hit

    def _remember(self, key: tuple, value: dict[str, np.ndarray]) -> None:
        self.cache[key] = value
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)

    def _count(self, attention_mask: np.ndarray, t0: float) -> None:
        self.counters["calls"] += 1
        self.counters["tokens"] += int(np.asarray(attention_mask).sum())
        self.counters["busy_s"] += time.perf_counter() - t0

    # ------------------------------------------------------------------ object-store calls
    def topk(self, batch_id: Any, input_ids: np.ndarray, attention_mask: np.ndarray, k: int, tau: float,
             wire: bool = True) -> dict[str, np.ndarray]:
        """{"ids": int32 [B,T,k], "logprobs": [B,T,k] wire dtype (fp32 if not wire), "tail": fp32 [B,T]}."""
        key = ("topk", batch_id, _digest(input_ids, attention_mask), int(k), float(tau), wire)
        hit = self._cached(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        ids, lps, tail = self.engine.topk(input_ids, attention_mask, k, tau, batch_id=batch_id)
        out = {"ids": ids, "logprobs": to_wire_dtype(lps, self.wire_dtype) if wire else lps, "tail": tail}
        self._count(attention_mask, t0)
        self._remember(key, out)
        return out

    def gather(self, batch_id: Any, input_ids: np.ndarray, attention_mask: np.ndarray, support: Any,
               tau: float, wire: bool = True) -> dict[str, np.ndarray]:
        """{"logprobs": [B,T,k] at the support's ids, "tail": fp32 [B,T]}. `support`: sft result or ids."""
        ids = _support_ids(support)
        key = ("gather", batch_id, _digest(input_ids, attention_mask, ids), float(tau), wire)
        hit = self._cached(key)
        if hit is not None:
            return hit
        t0 = time.perf_counter()
        lps, tail = self.engine.gather(input_ids, attention_mask, ids, tau, batch_id=batch_id)
        out = {"logprobs": to_wire_dtype(lps, self.wire_dtype) if wire else lps, "tail": tail}
        self._count(attention_mask, t0)
        self._remember(key, out)
        return out

    # ------------------------------------------------------------------ RDT calls (torch tensors)
    def _tensors(self, out: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        dev = getattr(self.engine, "device", torch.device("cpu"))
        res = {"logprobs": torch.from_numpy(np.array(out["logprobs"])).to(dev, TORCH_WIRE_DTYPES[self.wire_dtype]),
               "tail": torch.from_numpy(np.array(out["tail"])).to(dev)}
        if "ids" in out:
            res["ids"] = torch.from_numpy(np.array(out["ids"])).to(dev)
        return res

    @ray.method(tensor_transport="gloo")
    def topk_tensors(self, batch_id: Any, input_ids: np.ndarray, attention_mask: np.ndarray, k: int,
                     tau: float) -> dict[str, torch.Tensor]:
        """`topk` as torch tensors for Ray Direct Transport (logprobs in the torch wire dtype)."""
        return self._tensors(self.topk(batch_id, input_ids, attention_mask, k, tau, wire=False))

    @ray.method(tensor_transport="gloo")
    def gather_tensors(self, batch_id: Any, input_ids: np.ndarray, attention_mask: np.ndarray, support: Any,
                       tau: float) -> dict[str, torch.Tensor]:
        """`gather` as torch tensors for Ray Direct Transport; `support` is the sft part (tensors)."""
        return self._tensors(self.gather(batch_id, input_ids, attention_mask, support, tau, wire=False))

    # ------------------------------------------------------------------ service
    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """Tokenise with this teacher's tokenizer, right padded: (input_ids int32, attention_mask) [B, T]."""
        return self.engine.encode(texts)

    def health(self) -> dict[str, Any]:
        return {"ok": True, "role": self.role, "engine": self.engine_kind, "pid": os.getpid(),
                "wire_dtype": self.wire_dtype, "uptime_s": time.time() - self.started, **self.engine.describe()}

    def stats(self) -> dict[str, Any]:
        """Tokens served, busy seconds, calls (cache hits not included), role and model path."""
        return {"role": self.role, "model": self.engine.name, **self.counters}
