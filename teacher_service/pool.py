"""`TeacherPool`: routes each batch through the teacher roles and yields one `RecordHandle` per batch.

For a batch the SFT teacher picks the support (top-k at the counted positions); its result ref goes, as a
direct argument, to every gathering role (base, student_base, extra pairs), and the assembler actor
receives all role refs nested in a list and returns the validated record (object store: the handle holds
its ref), or the handle holds the role refs for the driver to pass to the receiving worker (RDT): one
`submit(..., transport=)` either way. The driver never `ray.get`s intermediate arrays.

Routing: each call goes to the replica of its role with the fewest calls in flight; a replica holds at most
`teachers.max_inflight_per_replica`; when all are full the pool waits (`ray.wait`) for one to finish, which
is the backpressure that keeps queues bounded.

A LoRA pair (models.sft_teacher an adapter of models.base_teacher; common/lora.py): the replicas of one pair
actor serve `sft` and `base` from one copy of the base weights. Both roles map to the same handles, the base
role's call of a batch goes to the replica that did its top-k (`call_chain(paired=...)`), and the two roles
share one in-flight count per replica.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np
import ray

from common.config import RunConfig
from common.data.tokenizer_check import check_tokenizers
from common.faults import FaultPlan
from common.lora import lora_pair_base
from common.roles import teacher_role_specs
from common.topk import ROLE_BASE, ROLE_SFT, rows_from_mask

from .actor import TeacherActor
from .assemble import RecordAssembler, record_meta
from .chain import call_chain, warmup_inputs
from .naming import replica_name
from .placement import (
    RESERVE_MIN_S,
    PlacementError,
    check_layout,
    cluster_nodes,
    engine_gpus,
    find_group,
    group_name,
    group_options,
    needs_group,
    remove_groups,
    replica_bundle,
    reserve_groups,
)
from .record_handle import OBJECT_STORE, TRANSPORTS, RecordHandle
from .transport import choose_rdt_transport

__all__ = ["TeacherPool", "vllm_options", "check_teacher_layout"]


def vllm_options(cfg: RunConfig) -> dict[str, Any]:
    """The VLLMEngine options of the sft role (teachers.engine: vllm) from the run config."""
    t = cfg.teachers
    return {"max_logprobs": t.vllm.max_logprobs or cfg.loss.k + 1,  # + 1: the label (include)
            "gpu_memory_utilization": t.vllm.gpu_memory_utilization,
            "max_num_batched_tokens": t.vllm.max_num_batched_tokens,
            "max_model_len": t.vllm.max_model_len, "dtype": t.dtype}


def actor_roles(cfg: RunConfig, paired: bool = False) -> list[str]:
    """The roles that get actors of their own: every teacher role, less the base of a LoRA pair (`paired`:
    `common.lora.lora_pair_base(cfg)` found one; its sft replicas answer for the base role)."""
    return [r for r in teacher_role_specs(cfg) if not (paired and r == ROLE_BASE)]


def check_teacher_layout(cfg: RunConfig, nodes: list[dict[str, float]], paired: bool = False) -> None:
    """Refuse (PlacementError, naming the numbers) a teacher layout these nodes cannot hold at once: every
    replica of every role `TeacherPool.start` would create, each on one node (`placement.check_layout`);
    paired: the SFT teacher is a LoRA adapter of the base (no base replicas of their own)."""
    t = cfg.teachers
    replicas = sum(t.replicas.get(role, 1) for role in actor_roles(cfg, paired))
    check_layout(replicas, replica_bundle(t.num_gpus, t.num_cpus, t.resources), nodes)


_ASSEMBLER: dict[str, Any] = {}  # this process's RecordAssembler and the Ray job it belongs to


def shared_assembler() -> Any:
    """This process's RecordAssembler, one for every pool of the process (an experiment's runs, or a test
    session's, each attach to the same teachers): each pool starting its own cost a process (~2 CPU-s, mostly
    torch's import) per run. Started on the first object-store record of a Ray session (ray.init again: a new
    one); it lives as long as this driver (Ray ends the actors a driver owns when it exits)."""
    job = ray.get_runtime_context().get_job_id()
    if _ASSEMBLER.get("job") != job:
        _ASSEMBLER.update(job=job, actor=RecordAssembler.remote())
    return _ASSEMBLER["actor"]


class TeacherPool:
    """Handles of every role's replicas plus the routing state. Build with `start` or `attach`."""

    def __init__(self, cfg: RunConfig, handles: dict[str, list[Any]], owned: bool, groups: list[Any] | None = None):
        self.cfg = cfg
        self.handles = handles
        self.owned = owned
        self.groups = list(groups or [])  # placement groups of multi-GPU replicas (removed with the actors)
        self.roles = list(handles)  # chain order: sft first
        if not self.roles or self.roles[0] != ROLE_SFT:
            raise ValueError(f"a teacher pool needs the 'sft' role first, got roles {self.roles}")
        self.inflight: dict[str, list[list[ray.ObjectRef]]] = {r: [[] for _ in hs] for r, hs in handles.items()}
        self.submitted = 0
        self._rdt_transport: str | None = None  # fixed by the first rdt_backend(receivers) call
        health = {r: ray.get([h.health.remote() for h in hs]) for r, hs in handles.items()}
        info = health[ROLE_SFT][0]
        # roles the sft replicas answer themselves (a LoRA pair's base): same handles, one in-flight count
        self.paired = [r for r in info.get("roles", [ROLE_SFT]) if r != ROLE_SFT and r in handles]
        for r in self.paired:
            self.handles[r], self.inflight[r] = handles[ROLE_SFT], self.inflight[ROLE_SFT]
        # node, GPUs and device of every replica
        self.placements = [h for r, hs in health.items() if r not in self.paired for h in hs]
        if cfg.transport.kind == "rdt" and cfg.loss.method != "sft":
            plain = [f"{h['role']} ({h['engine']})" for h in self.placements if not h.get("tensor_engine")]
            if plain:
                raise ValueError(f"transport.kind=rdt needs teacher engines that return torch tensors on a device; "
                                 f"{', '.join(plain)} do not: use transport.kind=object_store")
        self.vocab_size = int(info["vocab_size"])
        self.fingerprint = str(info["fingerprint"])
        if not 0 < cfg.loss.k <= self.vocab_size:
            raise ValueError(f"loss.k={cfg.loss.k} out of range: must be in 1..{self.vocab_size} "
                             f"(vocabulary of the sft teacher {info['model']})")

    # ------------------------------------------------------------------ construction
    @classmethod
    def start(cls, cfg: RunConfig, detached: bool = False, faults: FaultPlan | None = None) -> TeacherPool:
        """Check tokenizers (no weights loaded yet), create every role's named actors, wait until ready.
        faults: a test's FaultPlan (common/faults.py) handed to every actor; None in production."""
        check_tokenizers(cfg)
        t = cfg.teachers
        pair_base = lora_pair_base(cfg)  # the base teacher, when the SFT teacher is a LoRA adapter of it
        try:
            check_teacher_layout(cfg, cluster_nodes(), paired=pair_base is not None)
        except PlacementError as err:
            if t.placement_wait_s <= 0:
                raise
            print(f"WARNING: {err} now; starting anyway (teachers.placement_wait_s={t.placement_wait_s:g}): "
                  "waiting for an autoscaler to add nodes", flush=True)
        handles: dict[str, list[Any]] = {}
        names = {role: [replica_name(t.name_prefix, role, i) for i in range(t.replicas.get(role, 1))]
                 for role in actor_roles(cfg, pair_base is not None)}
        groups: list[Any] = []
        if needs_group(t.num_gpus):  # every replica's group reserved before any model loads
            groups = reserve_groups([group_name(n) for ns in names.values() for n in ns],
                                    replica_bundle(t.num_gpus, t.num_cpus, t.resources), detached,
                                    max(t.placement_wait_s, RESERVE_MIN_S))
        by_name = dict(zip([n for ns in names.values() for n in ns], groups))
        try:
            for role, spec in teacher_role_specs(cfg).items():
                if pair_base is not None and role == ROLE_BASE:
                    handles[role] = handles[ROLE_SFT]  # the pair answers for base: no second copy of the weights
                    continue
                pair = pair_base.model_dump() if pair_base is not None and role == ROLE_SFT else None
                handles[role] = [cls._create(cfg, role, spec.model_dump(), i, detached, faults, by_name.get(n), pair)
                                 for i, n in enumerate(names[role])]
                if not handles[role]:
                    raise ValueError(f"teachers.replicas.{role}=0: every role needs at least one replica")
            for role, hs in handles.items():
                for i, h in enumerate(hs):
                    try:
                        ray.get(h.health.remote())
                    except Exception as err:
                        raise RuntimeError(f"teacher {replica_name(t.name_prefix, role, i)} "
                                           f"({teacher_role_specs(cfg)[role].path}) failed to start: {err}") from err
            pool = cls(cfg, handles, owned=True, groups=groups)
        except BaseException:
            # nothing half-started is left behind (a pair's base role shares the sft list: each actor once)
            for hs in {id(hs): hs for hs in handles.values()}.values():
                for h in hs:
                    ray.kill(h, no_restart=True)
            remove_groups(groups)
            raise
        return pool

    @staticmethod
    def _create(cfg: RunConfig, role: str, spec: dict[str, Any], i: int, detached: bool,
                faults: FaultPlan | None = None, group: Any = None, pair_base: dict[str, Any] | None = None) -> Any:
        """Replica i of a role as a named actor with the configured resources and restart policy; `group`: its
        own placement group (a replica of more than one GPU), whose only bundle it takes; pair_base: the base
        teacher's spec, when this sft replica is a LoRA pair."""
        t = cfg.teachers
        engine = t.engine if role == ROLE_SFT else "hf"  # vLLM cannot gather: only the sft role may use it
        gpus = engine_gpus(t.num_gpus)  # the GPUs the engine spreads over
        options = {**vllm_options(cfg), "tensor_parallel_size": gpus}
        name = replica_name(t.name_prefix, role, i)
        opts: dict[str, Any] = dict(name=name, namespace=t.namespace, num_cpus=t.num_cpus, num_gpus=t.num_gpus,
                                    max_restarts=t.max_restarts, max_task_retries=t.max_task_retries)
        if t.resources:  # custom resources pin teachers to their node type (e.g. teacher_gpu in cluster.yaml)
            opts["resources"] = dict(t.resources)
        if detached:
            opts["lifetime"] = "detached"
        if group is not None:
            opts.update(group_options(group))
        try:
            return TeacherActor.options(**opts).remote(
                role, spec, engine, t.device, t.dtype, t.score_chunk_rows, t.wire_dtype,
                max(32, 4 * t.max_inflight_per_replica), options if engine == "vllm" else None,
                compute=cfg.reproducibility.model_dump(), faults=faults, num_gpus=gpus, pair_base=pair_base)
        except ValueError as err:  # a named actor of that name already exists
            raise ValueError(f"cannot start teacher {name!r} in namespace {t.namespace!r}: {err} "
                             f"(attach to it with teachers.attach=true, or stop it first)") from err

    @classmethod
    def attach(cls, cfg: RunConfig) -> TeacherPool:
        """Find the running named actors `{prefix}-{role}-{i}` of every role the config asks for."""
        t = cfg.teachers
        handles: dict[str, list[Any]] = {}
        groups: list[Any] = []
        for role in teacher_role_specs(cfg):
            if role != ROLE_SFT and role in ray.get(handles[ROLE_SFT][0].health.remote()).get("roles", ()):
                handles[role] = handles[ROLE_SFT]  # a LoRA pair answers for this role
                continue
            found = []
            while True:
                try:
                    found.append(ray.get_actor(replica_name(t.name_prefix, role, len(found)), namespace=t.namespace))
                except ValueError:
                    break
            if not found:
                raise ValueError(f"no running teacher for role {role!r}: actor "
                                 f"{replica_name(t.name_prefix, role, 0)!r} not found in namespace {t.namespace!r} "
                                 f"(start one with `python -m teacher_service serve --config ...`)")
            handles[role] = found
            groups += [pg for i in range(len(found))
                       if (pg := find_group(group_name(replica_name(t.name_prefix, role, i)))) is not None]
        return cls(cfg, handles, owned=False, groups=groups)

    # ------------------------------------------------------------------ routing
    def _route(self, role: str) -> tuple[int, Any]:
        """Index and handle of the least busy replica of a role; waits while all are full (backpressure)."""
        slots = self.inflight[role]
        cap = self.cfg.teachers.max_inflight_per_replica
        while True:
            for i, refs in enumerate(slots):
                if refs:
                    _, slots[i] = ray.wait(refs, num_returns=len(refs), timeout=0, fetch_local=False)
            i = min(range(len(slots)), key=lambda j: len(slots[j]))
            if len(slots[i]) < cap:
                return i, self.handles[role][i]
            ray.wait([r for refs in slots for r in refs], num_returns=1, fetch_local=False)

    def _inputs(self, batch_id: Any, input_ids: np.ndarray, attention_mask: np.ndarray, loss_mask: np.ndarray,
                include: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        """(input_ids int32, attention_mask int32, loss_mask bool) [B, T] and the forced ids at the counted
        positions ([N] int64, or None)."""
        ids = np.ascontiguousarray(input_ids, dtype=np.int32)
        am = np.ascontiguousarray(attention_mask, dtype=np.int32)
        lm = np.ascontiguousarray(loss_mask, dtype=bool)
        if ids.ndim != 2 or am.shape != ids.shape or lm.shape != ids.shape:
            raise ValueError(f"batch {batch_id}: input_ids {ids.shape}, attention_mask {am.shape} and loss_mask "
                             f"{lm.shape} must all be the same [B, T]")
        forced = None
        if include is not None:
            inc = np.asarray(include)
            if inc.shape != ids.shape or not np.issubdtype(inc.dtype, np.integer):
                raise ValueError(f"batch {batch_id}: include must be integer token ids [B, T] = {ids.shape}, got "
                                 f"{inc.dtype} {inc.shape}")
            forced = np.ascontiguousarray(inc[lm], dtype=np.int64)
        return ids, am, lm, forced

    def submit(self, batch_id: int, input_ids: np.ndarray, attention_mask: np.ndarray, loss_mask: np.ndarray,
               include: np.ndarray | None = None, transport: str = OBJECT_STORE) -> RecordHandle:
        """Chain sft -> gathering roles; returns the batch's RecordHandle (teacher_service/record_handle.py).

        input_ids, attention_mask, loss_mask: [B, T] (right padded). The record holds the counted positions
        only (rows = the flat indices where loss_mask is true): ids [N, k] with k = loss.k, log-probs at
        tau = loss.tau in teachers.wire_dtype. include: optional [B, T] token ids; the value at each counted
        position is forced into that position's support (K = k + 1; on-policy batches pass the labels).

        transport "object_store": the assembler actor validates the record; the handle's `.ref` is the ref
        of that TopKRecord. "rdt": the handle holds (meta, roles) and one part ref per role, each an RDT dict
        of the engines' torch tensors, for `common.losses.targets.targets_from_parts` in the receiving
        worker. Only the process that created the collective group (the driver) may pass RDT refs on, as
        direct arguments to an actor call of a receiving actor in the group. The tensor transport is the
        run's (`rdt_backend`), the same for every part: the sft part feeds the gathering teachers as well as
        the worker, and one RDT object has one transport.
        """
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown record transport {transport!r}: one of {TRANSPORTS}")
        inputs = self._inputs(batch_id, input_ids, attention_mask, loss_mask, include)
        self.submitted += 1
        if transport == OBJECT_STORE:
            return RecordHandle.object_store(self._record(batch_id, *inputs))
        ids, am, lm, forced = inputs
        meta = self._meta(batch_id, lm)
        refs = self._chain(batch_id, ids, am, meta["rows"], forced, tensor_transport=self.rdt_backend())
        return RecordHandle.rdt(meta, list(self.roles), refs)

    def _record(self, batch_id: Any, ids: np.ndarray, am: np.ndarray, lm: np.ndarray,
                forced: np.ndarray | None = None) -> ray.ObjectRef:
        meta = self._meta(batch_id, lm)
        # one copy of each input in the object store, shared by every role
        refs = self._chain(batch_id, ray.put(ids), ray.put(am), ray.put(meta["rows"]), forced)
        return shared_assembler().assemble.remote(meta, self.roles, refs)

    def _meta(self, batch_id: Any, loss_mask: np.ndarray) -> dict[str, Any]:
        return record_meta(batch_id, loss_mask, self.cfg.loss.tau, self.vocab_size, self.fingerprint,
                           self.cfg.teachers.wire_dtype)

    def _chain(self, batch_id: Any, ids: Any, am: Any, rows: Any, forced: np.ndarray | None = None,
               tensor_transport: str | None = None) -> list[ray.ObjectRef]:
        """The role calls of one batch (routed; each counted in flight on its replica), in chain order."""
        calls = call_chain(self.roles, self._route, batch_id, ids, am, rows, self.cfg.loss.k, self.cfg.loss.tau,
                           include=forced, tensor_transport=tensor_transport, paired=self.paired)
        for role, i, ref in calls:
            self.inflight[role][i].append(ref)
        return [ref for _, _, ref in calls]

    def warm_up(self, assemble: bool = True) -> list[ray.ObjectRef]:
        """Send one tiny batch through every role (and the assembler); returns the refs (do not wait).

        The first call of an engine pays one-off costs (allocator and kernel warm-up; for `assemble`, the
        assembler actor's process start, about 1 s on 2 cores), which the first training batch would otherwise
        wait for. The driver calls this right after the pool is up, so the cost overlaps with the student
        workers' set-up. assemble=False (the RDT path, which needs no assembler) warms the teachers only,
        through their object-store methods (the RDT collective group does not exist yet). Not counted in
        `submitted`.
        """
        batch_id, (ids, am, lm) = f"warmup-{uuid.uuid4().hex[:8]}", warmup_inputs()
        if assemble:
            return [self._record(batch_id, ids, am, lm)]
        return self._chain(batch_id, ray.put(ids), ray.put(am), ray.put(rows_from_mask(lm)))

    def rdt_backend(self, receivers: list[Any] | None = None) -> str:
        """The run's RDT tensor transport: transport.rdt_backend, or for "auto" `choose_rdt_transport` over the
        teachers' placements and (when given) the receiving workers' (actor handles with a `placement()`
        method, or placement dicts). The first call that passes receivers fixes the choice for the run.

        "gloo" and "nccl" need a collective group of the teachers and the receivers (the caller creates it
        with this backend); "cuda_ipc" is one-sided and needs none.
        """
        if self._rdt_transport is not None:
            return self._rdt_transport
        configured = self.cfg.transport.rdt_backend
        if receivers is None:
            return choose_rdt_transport(configured, self.placements, None)
        asked = [r if isinstance(r, dict) else r.placement.remote() for r in receivers]
        refs = [a for a in asked if not isinstance(a, dict)]
        got = iter(ray.get(refs))
        where: list[dict[str, Any]] = [a if isinstance(a, dict) else next(got) for a in asked]
        self._rdt_transport = choose_rdt_transport(configured, self.placements, where)
        return self._rdt_transport

    # ------------------------------------------------------------------ service
    def actors(self) -> list[Any]:
        """Every replica handle, roles in chain order (for the driver's collective group)."""
        return [h for role in self.roles if role not in self.paired for h in self.handles[role]]

    def stats(self) -> dict[str, Any]:
        """Per-replica actor stats plus totals: {"submitted", "roles": {role: [stats...]}, "tokens", "busy_s"}."""
        per_role = {r: ray.get([h.stats.remote() for h in hs]) for r, hs in self.handles.items()
                    if r not in self.paired}  # a pair's counts are its sft role's (both roles' work)
        inflight = {r: [len(s) for s in slots] for r, slots in self.inflight.items()}
        return {"submitted": self.submitted, "roles": per_role, "inflight": inflight,
                "tokens": {r: sum(s["tokens"] for s in ss) for r, ss in per_role.items()},
                "busy_s": {r: sum(s["busy_s"] for s in ss) for r, ss in per_role.items()}}

    def health(self) -> dict[str, list[dict[str, Any]]]:
        return {r: ray.get([h.health.remote() for h in hs]) for r, hs in self.handles.items() if r not in self.paired}

    def shutdown(self, force: bool = False) -> None:
        """Kill the actors this pool started (attached ones only with force=True, e.g. `stop`)."""
        if not (self.owned or force):
            return
        for r, hs in self.handles.items():
            for h in hs if r not in self.paired else ():
                ray.kill(h, no_restart=True)
        self.handles = {r: [] for r in self.handles}
        remove_groups(self.groups)  # after their actors: a group removed first would kill them anyway
        self.groups = []
