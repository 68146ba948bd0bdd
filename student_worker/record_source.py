"""Where a run's teacher records come from: one interface for the driver's loop (`teachers.source`).

    source = open_record_source(cfg, check_cache(cfg, train_set), train_set, workers, start_pool, rdt)
    handle = source.submit(step, rank, batch_id, arrays, examples)    # a RecordHandle for the rank's worker
    source.step_done(step); source.stats(); source.describe(); source.shutdown()

- `LiveSource` (live): the teacher pool scores each batch (an object-store record, or RDT parts).
- `CacheSource` (cache): one `CacheFeeder` actor per rank reads the batch from the teacher cache; no teacher
  actor is started. The ref resolves to the same rows-form TopKRecord a live batch gives.
- `AutoSource` (auto): a complete cache for this run is read like `cache`; otherwise the first epoch runs live
  and a `CacheFiller` writes each record through; once epoch 0's batches are all submitted, the build
  batches no live batch covered are scored too; the first step past epoch 0 waits for the manifest (a
  one-off pause while the last shards are written) and every later step reads the cache (the teachers this
  run started are stopped once no live step is left). A run that ends within epoch 0 keeps the finished
  shards: a later auto run, or `cache build` with the same config, continues the build.

`check_cache(cfg, train_set)` runs without Ray (the driver's preflight): it opens and checks the cache for
`cache`, and for `auto` tells whether the cache is ready or is to be filled (refusing a location that holds
another build), so every mismatch is reported before anything is written.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import numpy as np
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from common.config import RunConfig
from common.data.batching import collate
from common.roles import cache_roles
from teacher_service.cache import CacheIncompleteError, CacheMismatchError, open_for_run
from teacher_service.cache.feeder import CacheFeeder
from teacher_service.cache.filler import CacheFiller
from teacher_service.cache.fs import CacheLocation
from teacher_service.cache.identity import examples_fingerprint, run_roles
from teacher_service.cache.manifest import load_build_head
from teacher_service.cache.plan import build_head
from teacher_service.cache.writer import _head_differences
from teacher_service.record_handle import OBJECT_STORE, RDT, RecordHandle

__all__ = ["RecordSource", "LiveSource", "CacheSource", "AutoSource", "CachePlan", "check_cache",
           "open_record_source"]


class RecordSource(Protocol):
    """Where the driver's step pipeline gets each rank's teacher record (live, cache or auto)."""

    kind: str

    def submit(self, step: int, rank: int, batch_id: Any, arrays: dict[str, np.ndarray], examples: list[int] | None,
               include: np.ndarray | None = None) -> RecordHandle:
        """Start the record of rank `rank`'s batch of `step` (arrays: its collated batch; examples: its training
        example indices, None for sampled batches; include: [B, T] ids forced into the support)."""
        ...

    def warm_up(self) -> None:
        """Start one-off first-call costs (not waited for)."""
        ...

    def step_done(self, step: int) -> None:
        """Every rank finished `step`."""
        ...

    def stats(self) -> dict[str, Any] | None:
        """The teachers' figures for the report (None when no teacher worked for the run)."""
        ...

    def describe(self) -> dict[str, Any]:
        """What served the run, for the report."""
        ...

    def shutdown(self) -> None:
        """Stop what this source started (never attached teachers)."""
        ...


class LiveSource:
    kind = "live"

    def __init__(self, pool: Any, rdt: bool):
        self.pool, self.rdt = pool, rdt
        self._stats: dict[str, Any] | None = None

    def submit(self, step: int, rank: int, batch_id: Any, arrays: dict[str, np.ndarray], examples: list[int] | None,
               include: np.ndarray | None = None) -> RecordHandle:
        """include: [B, T] ids forced into each counted position's support (on-policy batches, the
        sampled_token objective)."""
        return self.pool.submit(batch_id, arrays["input_ids"], arrays["attention_mask"], arrays["loss_mask"],
                                include=include, transport=RDT if self.rdt else OBJECT_STORE)

    def warm_up(self) -> None:
        self.pool.warm_up(assemble=not self.rdt)

    def step_done(self, step: int) -> None:
        pass

    def stats(self) -> dict[str, Any] | None:
        return self._stats if self.pool is None else self.pool.stats()

    def describe(self) -> dict[str, Any]:
        return {"source": "live"}

    def shutdown(self) -> None:
        """Keep the pool's last stats and kill the actors it started (not attached ones). A teacher that died
        (the run is stopping because of it) has no stats to give: the error being raised stays the run's."""
        if self.pool is not None:
            try:
                self._stats = self.pool.stats()
            except ray.exceptions.RayError:
                self._stats = None
            self.pool.shutdown()
            self.pool = None


class CachePlan:
    """The outcome of `check_cache`: `reader` (a checked CacheReader) when the cache serves the run, else the
    `head` of the build the run fills (auto); `run_roles`: the run's model identity per role read."""

    def __init__(self, uri: str, reader: Any = None, head: Any = None, run_roles: dict[str, Any] | None = None,
                 roles: list[str] | None = None):
        self.uri, self.reader, self.head, self.run_roles, self.roles = uri, reader, head, run_roles or {}, roles or []


def check_cache(cfg: RunConfig, train_set: Any) -> CachePlan | None:
    """None for a live run; else a CachePlan. Raises the cache's typed errors (CacheMismatchError listing
    each differing key, CacheRoleError, ShardError for a missing shard, CacheIncompleteError for source
    cache without a finished cache), all naming the cache."""
    t = cfg.teachers
    if t.source == "live" or cfg.loss.method == "sft":
        return None
    assert t.cache.uri is not None  # the config requires it
    from_cache = t.student_base_source == "cache"
    roles = cache_roles(cfg, from_cache)
    try:
        reader = open_for_run(t.cache.uri, cfg, tokenizer_fingerprint=train_set.tokenizer_fingerprint,
                              vocab_size=train_set.vocab_size, examples_sha256=examples_fingerprint(train_set.examples),
                              num_examples=len(train_set.examples), student_base_from_cache=from_cache,
                              max_bytes_in_memory=t.cache.memory_mb << 20)
        return CachePlan(t.cache.uri, reader=reader, run_roles=run_roles(cfg, roles), roles=roles)
    except CacheIncompleteError:
        if t.source == "cache":
            raise
    head = build_head(cfg, train_set)
    loc = CacheLocation(t.cache.uri)
    existing = load_build_head(loc)
    if existing is not None and existing.defining() != head.defining():
        raise CacheMismatchError(loc.display(), _head_differences(existing, head) + [
            "(teachers.source=auto would continue this unfinished build, which is for other settings: finish it "
            "with `python -m teacher_service.cache build` and its config, or use another teachers.cache)"])
    return CachePlan(t.cache.uri, head=head)


class CacheSource:
    kind = "cache"

    def __init__(self, cfg: RunConfig, plan: CachePlan, batch_plan: Any, workers: list[Any]):
        t = cfg.teachers
        self.uri, self.plan, self.batch_plan = plan.uri, plan, batch_plan
        self.on_error = t.cache.on_error
        live = {"namespace": t.namespace, "name_prefix": t.name_prefix, "k": cfg.loss.k, "tau": cfg.loss.tau,
                "wire_dtype": t.wire_dtype}
        # next to each rank's worker on a multi-node cluster (waits for the workers' processes); on one node the
        # feeders start at once, while the workers start
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        where = ray.get([w.placement.remote() for w in workers]) if workers and len(nodes) > 1 else []
        self.feeders = []
        for rank in range(cfg.training.num_workers):
            opts: dict[str, Any] = {}
            if rank < len(where):  # next to its worker: the record crosses no network
                opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(where[rank]["node_id"], soft=True)
            self.feeders.append(CacheFeeder.options(**opts).remote(
                plan.uri, plan.roles, plan.run_roles, t.cache.memory_mb << 20, t.cache.on_error, live,
                cfg.reproducibility.model_dump()))

    def submit(self, step: int, rank: int, batch_id: Any, arrays: dict[str, np.ndarray], examples: list[int] | None,
               include: np.ndarray | None = None) -> RecordHandle:
        _no_forced_ids(include, examples)
        upcoming = [self.batch_plan.step_indices(s)[rank] for s in (step + 1, step + 2)]
        inputs = ({k: arrays[k] for k in ("input_ids", "attention_mask", "loss_mask")}
                  if self.on_error == "live" else None)
        return RecordHandle.object_store(self.feeders[rank].batch.remote(
            batch_id, examples, int(arrays["input_ids"].shape[1]), upcoming, inputs))

    def warm_up(self, start_step: int = 0) -> None:
        """Each feeder starts reading the shards of its rank's first two steps (not waited for)."""
        for rank, f in enumerate(self.feeders):
            f.warm_up.remote([self.batch_plan.step_indices(s)[rank] for s in (start_step, start_step + 1)])

    def step_done(self, step: int) -> None:
        pass

    def stats(self) -> dict[str, Any] | None:
        return None  # no teacher worked for this run (the feeders' figures are in describe())

    def describe(self) -> dict[str, Any]:
        """The cache and how it was scored, and per rank what its feeder served (batches, rows, seconds,
        shards read, batches recomputed live)."""
        head = self.plan.reader.manifest.head
        return {"source": "cache", "cache": self.uri, "encoding": head.encoding, "scoring": head.scoring,
                "feeders": ray.get([f.stats.remote() for f in self.feeders])}

    def shutdown(self) -> None:
        for f in self.feeders:
            ray.kill(f, no_restart=True)
        self.feeders = []


class AutoSource:
    kind = "auto"

    def __init__(self, cfg: RunConfig, plan: CachePlan, train_set: Any, live: LiveSource, workers: list[Any]):
        self.cfg, self.plan, self.ts, self.live, self.workers = cfg, plan, train_set, live, workers
        self.head = plan.head
        self.filler = CacheFiller.remote(plan.uri, self.head.to_json())
        status = ray.get(self.filler.status.remote())  # raises now if the location is refused
        self.pending_examples = self._pending(status)
        self.forwarded: set[int] = set()
        self.adds: list[Any] = []  # the filler's answers (shards written), checked when the manifest is due
        self.cache: CacheSource | None = None
        self.finish_ref: Any = None
        self.failed = False
        self.last_live_step = -1
        self.fill_batches = 0
        self.note = ""

    def _pending(self, status: dict[str, Any]) -> set[int]:
        """The examples of the shards still to write (finished shards of an earlier run are kept)."""
        order = self.head.order or list(range(self.head.num_examples))
        return {order[p] for p in ray.get(self.filler.missing.remote())}

    def submit(self, step: int, rank: int, batch_id: Any, arrays: dict[str, np.ndarray], examples: list[int] | None,
               include: np.ndarray | None = None) -> RecordHandle:
        _no_forced_ids(include, examples)
        spe = self.ts.plan.steps_per_epoch
        if step >= spe and self.cache is None and not self.failed:
            if self.finish_ref is None:
                self._complete()
            self._switch()  # the first step past epoch 0 waits for the manifest: later steps read the cache
        if self.cache is not None:
            return self.cache.submit(step, rank, batch_id, arrays, examples)
        handle = self.live.submit(step, rank, batch_id, arrays, examples)
        self.last_live_step = max(self.last_live_step, step)
        if step < spe and self.finish_ref is None and self.pending_examples.intersection(examples):
            lengths = [len(self.ts.examples[e].input_ids) for e in examples]
            self.adds.append(self.filler.add.remote(list(examples), lengths, [handle.ref]))
            self.forwarded.update(examples)
        if step == spe - 1 and rank == self.ts.plan.num_workers - 1 and self.finish_ref is None:
            self._complete()
        return handle

    def _complete(self) -> None:
        """Score the build batches that hold examples no live batch brought, then write the manifest (queued
        behind the filler's adds)."""
        missing = self.pending_examples - self.forwarded
        order = self.head.order or list(range(self.head.num_examples))
        b = int(self.head.scoring.get("batch", 1))
        for j in range(0, len(order), b):
            batch = order[j: j + b]
            if not missing.intersection(batch):
                continue
            arrays = collate([self.ts.examples[e] for e in batch], self.ts.pad_id)
            ref = self.live.pool.submit(f"cache-fill-{j // b}", arrays["input_ids"], arrays["attention_mask"],
                                        arrays["loss_mask"]).ref
            self.adds.append(self.filler.add.remote(batch, [len(self.ts.examples[e].input_ids) for e in batch], [ref]))
            self.fill_batches += 1
        self.finish_ref = self.filler.finish.remote()

    def _switch(self) -> None:
        """Wait for the write-through to finish and open the cache; on failure, stay live (warned once)."""
        try:
            ray.get(self.finish_ref)
            plan = check_cache(self.cfg, self.ts)
            assert plan is not None and plan.reader is not None
            self.cache = CacheSource(self.cfg, plan, self.ts.plan, self.workers)
            self.note = f"cache complete after epoch 0 (last live step {self.last_live_step}); later steps read it"
        except Exception as exc:  # noqa: BLE001 - the run goes on live; the user is told why the cache is not used
            self.failed = True
            self.note = f"write-through failed, training continues live: {type(exc).__name__}: {exc}"
            warnings.warn(f"teachers.source=auto: {self.note}", stacklevel=2)

    def warm_up(self) -> None:
        self.live.warm_up()

    def step_done(self, step: int) -> None:
        if self.cache is not None and step >= self.last_live_step and self.live.pool is not None:
            self.live.shutdown()  # no live record is in flight any more: free the teachers

    def stats(self) -> dict[str, Any] | None:
        return self.live.stats()

    def describe(self) -> dict[str, Any]:
        return {"source": "auto", "cache": self.plan.uri, "encoding": self.head.encoding,
                "last_live_step": self.last_live_step, "fill_batches": self.fill_batches,
                "reading_cache": self.cache is not None, "note": self.note,
                "feeders": self.cache.describe()["feeders"] if self.cache is not None else []}

    def shutdown(self) -> None:
        """Let the filler write what it was given (the records of trained steps are all computed), then stop."""
        if self.cache is None and not self.failed:
            try:
                ray.get(self.adds + ([self.finish_ref] if self.finish_ref is not None else []), timeout=600)
            except Exception as exc:  # noqa: BLE001 - the run's own result stands; the cache stays unfinished
                warnings.warn(f"teachers.source=auto: the write-through did not finish: {type(exc).__name__}: {exc}; "
                              "finished shards are kept (a later auto run or `cache build` continues)", stacklevel=2)
        if self.cache is not None:
            self.cache.shutdown()
        self.live.shutdown()
        ray.kill(self.filler, no_restart=True)


def _no_forced_ids(include: np.ndarray | None, examples: list[int] | None) -> None:
    """A cache holds the teachers' records of the training set as it is: it cannot score sampled tokens or
    force labels into the support (common.config refuses those settings with teachers.source cache/auto)."""
    if include is not None or examples is None:
        raise ValueError("the teacher cache serves training-set batches only (no on-policy samples, no forced "
                         "ids): use teachers.source=live with training.on_policy or loss.objective=sampled_token")


def open_record_source(cfg: RunConfig, plan: CachePlan | None, train_set: Any, workers: list[Any], start_pool: Any,
                       rdt: bool) -> RecordSource | None:
    """The run's source (None for method sft). start_pool(): the live TeacherPool (started or attached)."""
    if cfg.loss.method == "sft":
        return None
    if plan is not None and plan.reader is not None:
        return CacheSource(cfg, plan, train_set.plan, workers)
    live = LiveSource(start_pool(), rdt and plan is None)
    if plan is None:
        return live
    return AutoSource(cfg, plan, train_set, live, workers)
