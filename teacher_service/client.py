"""`TeacherClient`: teacher distributions from a running teacher service, from any Ray-connected process.

    from teacher_service import TeacherClient
    client = TeacherClient(namespace="deltakd", address="auto")
    ids, logprobs, tail = client.topk(["the quick brown fox"], k=64, tau=1.0)   # [B, T, 64] per position
    logprobs_base, tail_base = client.gather(["the quick brown fox"], ids, tau=1.0)
    record = client.record(["the quick brown fox"], k=64, tau=1.0)   # counted rows only: record.rows
"""

from __future__ import annotations

import itertools
import uuid
from typing import Any

import numpy as np
import ray

from common.topk import (
    ROLE_BASE,
    ROLE_SFT,
    ROLE_STUDENT_BASE,
    TopKRecord,
    pair_roles,
    rows_from_mask,
    scatter_rows,
)

from .assemble import assemble_task, record_meta
from .chain import call_chain
from .naming import replica_name

__all__ = ["TeacherClient"]

Inputs = list[str] | np.ndarray


class TeacherClient:
    """Finds the service's named actors (`{name_prefix}-{role}-{i}`) in a namespace; returns numpy arrays
    per text and position ([B, T, ...]), or a rows-form TopKRecord from `record`."""

    def __init__(self, namespace: str = "deltakd", address: str = "auto", name_prefix: str = "teacher",
                 connect_timeout_s: float | None = None):
        if not ray.is_initialized():  # a head that does not answer within connect_timeout_s (default
            # $DELTAKD_RAY_CONNECT_TIMEOUT_S or 10 s), auth/connection failures -> RayConnectionError
            # deferred: ~2.5 ms (measured) the driver, which imports this module and connects itself, never needs
            from .ray_connect import connect_ray

            connect_ray(address, connect_timeout_s, flag="address=", namespace=namespace, logging_level="ERROR")
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
        # a LoRA pair: the sft replicas answer for base too (adapter off); the roles keep their usual order
        self.paired = [r for r in info.get("roles", [ROLE_SFT]) if r != ROLE_SFT and r not in self.handles]
        if self.paired:
            found = dict(self.handles)
            self.handles = {r: found.get(r, found[ROLE_SFT]) for r in candidates if r in found or r in self.paired}
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

    @staticmethod
    def _rows(am: np.ndarray, positions: np.ndarray | None) -> np.ndarray:
        mask = am.astype(bool) if positions is None else np.asarray(positions, dtype=bool)
        if mask.shape != am.shape:
            raise ValueError(f"positions shape {mask.shape} != the batch's [B, T] {am.shape}")
        return rows_from_mask(mask)

    def encode(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        """(input_ids int32, attention_mask) [B, T] from the service's tokenizer, right padded."""
        return self._inputs(texts, None)

    def topk(self, inputs: Inputs, k: int, tau: float = 1.0, attention_mask: np.ndarray | None = None,
             role: str = ROLE_SFT, positions: np.ndarray | None = None, include: np.ndarray | None = None,
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A role's top-k (default the SFT teacher) per text and position: ids int32 [B, T, K], logprobs fp32
        [B, T, K], tail fp32 [B, T].

        Position t holds the distribution over token t+1. Scored positions: `positions` [B, T] bool, default
        every attended one; elsewhere ids are -1 and logprobs/tail NaN. include: optional [B, T] ids forced
        into the support at the scored positions (K = k + 1).
        """
        ids, am = self._inputs(inputs, attention_mask)
        rows = self._rows(am, positions)
        forced = None if include is None else np.asarray(include).reshape(-1)[rows].astype(np.int64)
        out = ray.get(self._pick(role).topk.remote(f"client-{uuid.uuid4().hex}", ids, am, rows, k, tau,
                                                   include=forced, wire=False, role=role))
        shape = ids.shape
        return (scatter_rows(out["ids"], rows, shape, -1), scatter_rows(out["logprobs"], rows, shape, np.nan),
                scatter_rows(out["tail"], rows, shape, np.nan))

    def gather(self, inputs: Inputs, ids: np.ndarray, tau: float = 1.0, attention_mask: np.ndarray | None = None,
               role: str = ROLE_BASE, positions: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """A role's log-probs (default the base teacher) at ids [B, T, K] per position: logprobs fp32 [B, T, K],
        tail fp32 [B, T]; scored positions as in `topk` (NaN elsewhere; ids there are not read)."""
        input_ids, am = self._inputs(inputs, attention_mask)
        rows = self._rows(am, positions)
        support = np.asarray(ids)
        if support.ndim != 3 or support.shape[:2] != am.shape:
            raise ValueError(f"ids must be [B, T, K] with [B, T] = {am.shape}, got shape {support.shape}")
        at_rows = np.ascontiguousarray(support.reshape(-1, support.shape[2])[rows], dtype=np.int32)
        out = ray.get(self._pick(role).gather.remote(f"client-{uuid.uuid4().hex}", input_ids, am, rows, at_rows,
                                                     tau, wire=False, role=role))
        return (scatter_rows(out["logprobs"], rows, am.shape, np.nan),
                scatter_rows(out["tail"], rows, am.shape, np.nan))

    def record(self, inputs: Inputs, k: int, tau: float = 1.0, attention_mask: np.ndarray | None = None,
               loss_mask: np.ndarray | None = None, wire_dtype: str = "float32",
               include: np.ndarray | None = None) -> TopKRecord:
        """A validated TopKRecord over every role the service runs, at the counted positions (loss_mask [B, T],
        default the attention mask): `record.rows` are their flat indices, `record.scatter(x, fill)` puts a
        per-row array back on [B, T]. include: optional [B, T] ids forced into the support (K = k + 1)."""
        ids, am = self._inputs(inputs, attention_mask)
        lm = am.astype(bool) if loss_mask is None else np.asarray(loss_mask, dtype=bool)
        meta = record_meta(f"client-{uuid.uuid4().hex}", lm, tau, self.vocab_size, self.fingerprint, "float32")
        forced = None if include is None else np.asarray(include)[lm].astype(np.int64)
        calls = call_chain(self.roles, lambda role: (0, self._pick(role)), meta["batch_id"], ids, am, meta["rows"],
                           k, tau, include=forced, wire=False, paired=self.paired)
        rec: TopKRecord = ray.get(assemble_task.remote(meta, self.roles, [ref for _, _, ref in calls]))
        if wire_dtype == "float32":
            return rec
        out = TopKRecord(rec.batch_id, rec.ids, {}, {}, rec.rows, rec.batch_shape, rec.tau, rec.vocab_size,
                         rec.tokenizer_fingerprint, wire_dtype)
        for role in rec.roles:
            out = out.with_role(role, rec.role_logprobs(role), rec.tail[role])
        return out

    def health(self) -> dict[str, list[dict[str, Any]]]:
        return {r: ray.get([h.health.remote() for h in hs]) for r, hs in self.handles.items()}

    def stats(self) -> dict[str, list[dict[str, Any]]]:
        return {r: ray.get([h.stats.remote() for h in hs]) for r, hs in self.handles.items()}
