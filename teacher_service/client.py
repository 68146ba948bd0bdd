"""`TeacherClient`: teacher distributions from a running teacher service, from any Ray-connected process.

    from teacher_service import TeacherClient
    client = TeacherClient(namespace="deltakd", address="auto")
    ids, logprobs, tail = client.topk(["the quick brown fox"], k=64, tau=1.0)
    logprobs_base, tail_base = client.gather(["the quick brown fox"], ids, tau=1.0)
    record = client.record(["the quick brown fox"], k=64, tau=1.0)
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import numpy as np
import ray

from common.topk import ROLE_BASE, ROLE_SFT, ROLE_STUDENT_BASE, TopKRecord, pair_roles

from .assemble import assemble_task, record_meta
from .chain import call_chain
from .roles import replica_name

__all__ = ["TeacherClient"]

Inputs = list[str] | np.ndarray


class TeacherClient:
    """Finds the service's named actors (`{name_prefix}-{role}-{i}`) in a namespace; returns numpy arrays."""

    def __init__(self, namespace: str = "deltakd", address: str = "auto", name_prefix: str = "teacher"):
        if not ray.is_initialized():  # auth/connection failures -> RayConnectionError saying what to set
            from .ray_connect import connect_ray

            connect_ray(address, namespace=namespace, logging_level="ERROR")
        self.namespace, self.name_prefix = namespace, name_prefix
        self.handles: dict[str, list[Any]] = {}
        candidates = [ROLE_SFT, ROLE_BASE, ROLE_STUDENT_BASE]
        for j in itertools.count(1):
            candidates.extend(pair_roles(j))
            if not self._find(pair_roles(j)[0]):
                candidates = candidates[:-2]
                break
        for role in candidates:
            found = self._find(role)
            if found:
                self.handles[role] = found
        if ROLE_SFT not in self.handles:
            raise ValueError(f"no teacher service found: actor {replica_name(name_prefix, ROLE_SFT, 0)!r} is not "
                             f"running in namespace {namespace!r} (start it with `python -m teacher_service serve`)")
        info = ray.get(self.handles[ROLE_SFT][0].health.remote())
        self.vocab_size, self.fingerprint = int(info["vocab_size"]), str(info["fingerprint"])
        self._turn = itertools.count()

    def _find(self, role: str) -> list[Any]:
        found = []
        while True:
            try:
                found.append(ray.get_actor(replica_name(self.name_prefix, role, len(found)), namespace=self.namespace))
            except ValueError:
                return found

    @property
    def roles(self) -> list[str]:
        return list(self.handles)

    def _pick(self, role: str) -> Any:
        if role not in self.handles:
            raise ValueError(f"the teacher service has no role {role!r}; it serves {self.roles}")
        hs = self.handles[role]
        return hs[next(self._turn) % len(hs)]  # round robin: the client holds no in-flight state

    def _inputs(self, inputs: Inputs, attention_mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """Texts are tokenised by the service's own tokenizer (right padded); ids pass through."""
        if isinstance(inputs, list | tuple) and all(isinstance(t, str) for t in inputs):
            return ray.get(self.handles[ROLE_SFT][0].encode.remote(list(inputs)))
        ids = np.ascontiguousarray(inputs, dtype=np.int32)
        am = np.ones_like(ids) if attention_mask is None else np.ascontiguousarray(attention_mask, dtype=np.int32)
        return ids, am

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int32, attention_mask) [B, T] from the service's tokenizer, right padded."""
        return self._inputs(texts, None)

    def topk(self, inputs: Inputs, k: int, tau: float = 1.0, attention_mask: np.ndarray | None = None,
             role: str = ROLE_SFT) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids int32 [B,T,k], logprobs fp32 [B,T,k], tail fp32 [B,T]) of a role (default the SFT teacher)."""
        ids, am = self._inputs(inputs, attention_mask)
        out = ray.get(self._pick(role).topk.remote(f"client-{uuid.uuid4().hex}", ids, am, k, tau, False))
        return out["ids"], out["logprobs"], out["tail"]

    def gather(self, inputs: Inputs, ids: np.ndarray, tau: float = 1.0, attention_mask: np.ndarray | None = None,
               role: str = ROLE_BASE) -> tuple[np.ndarray, np.ndarray]:
        """(logprobs fp32 [B,T,k], tail fp32 [B,T]) of a role (default the base teacher) at ids [B,T,k]."""
        input_ids, am = self._inputs(inputs, attention_mask)
        out = ray.get(self._pick(role).gather.remote(f"client-{uuid.uuid4().hex}", input_ids, am,
                                                     np.asarray(ids, dtype=np.int32), tau, False))
        return out["logprobs"], out["tail"]

    def record(self, inputs: Inputs, k: int, tau: float = 1.0, attention_mask: np.ndarray | None = None,
               loss_mask: np.ndarray | None = None, wire_dtype: str = "float32") -> TopKRecord:
        """A validated TopKRecord over every role the service runs (mask defaults to the attention mask)."""
        ids, am = self._inputs(inputs, attention_mask)
        lm = am.astype(bool) if loss_mask is None else np.asarray(loss_mask, dtype=bool)
        batch_id = f"client-{uuid.uuid4().hex}"
        calls = call_chain(self.roles, lambda role: (0, self._pick(role)), batch_id, ids, am, k, tau, wire=False)
        refs = [ref for _, _, ref in calls]
        meta = record_meta(batch_id, lm, tau, self.vocab_size, self.fingerprint, "float32")
        rec: TopKRecord = ray.get(assemble_task.remote(meta, self.roles, refs))
        if wire_dtype == "float32":
            return rec
        out = TopKRecord(rec.batch_id, rec.ids, {}, {}, rec.mask, rec.tau, rec.vocab_size, rec.tokenizer_fingerprint,
                         wire_dtype)
        for role in rec.roles:
            out = out.with_role(role, rec.role_logprobs(role), rec.tail[role])
        return out

    def health(self) -> dict[str, list[dict[str, Any]]]:
        return {r: ray.get([h.health.remote() for h in hs]) for r, hs in self.handles.items()}

    def stats(self) -> dict[str, list[dict[str, Any]]]:
        return {r: ray.get([h.stats.remote() for h in hs]) for r, hs in self.handles.items()}
