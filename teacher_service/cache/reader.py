"""Reading a cache: check it against the run, then serve example records and batch records.

    reader = CacheReader(uri, run_valid_for=..., run_roles=..., roles=["sft", "base"])
    record = reader.batch([12, 7, 301], seq_len=T, batch_id=5)   # rows-form TopKRecord
    reader.prefetch([[4, 9], [77, 3]])                           # read the shards of coming batches ahead
    for shard in reader.iter_shards(): ...                       # whole shards decoded, next one read ahead

Opening checks, before any record is served: the manifest exists and is complete; every setting the run
states matches (one CacheMismatchError listing each differing key with both values); the cache has every
role the run needs (CacheRoleError naming the roles; a role added later with `cache add-role`, such as
`student_base`, must come from the run's model: a cache may hold it for several students); every shard file
is present (ShardError naming each missing path and range). Each shard's sha256 is checked when it is read,
before any of its records leaves the reader (ShardError naming path and range).

Shards stay in memory encoded, most recently used first, up to `max_bytes_in_memory` (about the file size
each); a batch decodes only its own examples (encoded.EncodedShard), so batches drawn from a shuffled epoch,
which touch every shard, cost memory in proportion to the encoded cache, not to the decoded one.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from common.roles import cache_roles

from .encoded import EncodedShard
from .errors import CacheRoleError, ShardError
from .fs import CacheLocation
from .identity import run_roles, run_valid_for
from .manifest import AddedRole, Manifest, check_run, load_manifest, role_differences
from .records import ExampleRecord, assemble_batch, encoding_mass_eps
from .shard import DecodedShard, read_shard_table

__all__ = ["CacheReader", "check_roles", "open_for_run", "DEFAULT_MEMORY_BYTES"]

DEFAULT_MEMORY_BYTES = 1 << 30


def _added_for(manifest: Manifest, role: str, identity: dict[str, Any] | None) -> AddedRole | None:
    """The added-role entry for `role` whose model matches `identity` (any, when identity is None)."""
    for entry in manifest.added_roles:
        if entry.role == role and (identity is None or not role_differences({role: entry.identity},
                                                                            {role: identity})):
            return entry
    return None


def check_roles(manifest: Manifest, where: str, roles: Sequence[str], why: str = "",
                identities: dict[str, dict[str, Any]] | None = None) -> dict[str, AddedRole]:
    """Raise CacheRoleError naming every role in `roles` the cache lacks; returns the added-role entries
    that serve roles outside the main build (chosen by model identity when `identities` has the role)."""
    have = set(manifest.head.roles)
    added: dict[str, AddedRole] = {}
    missing = []
    for r in roles:
        if r in have:
            continue
        entry = _added_for(manifest, r, (identities or {}).get(r))
        if entry is None:
            missing.append(r)
        else:
            added[r] = entry
    if missing:
        reason = f" ({why})" if why else ""
        held = [f"{a.role} of {a.identity.get('path')}" for a in manifest.added_roles if a.role in missing]
        extra = f"; added roles it holds are for other models: {held}" if held else ""
        hint = (f"; score it once with `python -m teacher_service.cache add-role student_base --cache {where} "
                f"--student <path>`" if "student_base" in missing else "")
        raise CacheRoleError(f"teacher cache {where} lacks role(s) {missing} that this run needs{reason}; it holds "
                             f"{sorted(have)}{extra}{hint}")
    return added


class CacheReader:
    """A checked, read-only view of one cache (module docstring). Thread-safe."""

    def __init__(self, uri: str, *, run_valid_for: dict[str, Any] | None = None,
                 run_roles: dict[str, dict[str, Any]] | None = None, roles: Sequence[str] | None = None,
                 roles_why: str = "", max_bytes_in_memory: int = DEFAULT_MEMORY_BYTES, verify: bool = True):
        self.loc = CacheLocation(uri)
        self.where = self.loc.display()
        self.manifest = load_manifest(self.loc)
        head = self.manifest.head
        self.roles = list(roles) if roles is not None else list(head.role_names)
        if run_valid_for is not None or run_roles is not None:
            check_run(self.manifest, self.where, run_valid_for or {}, run_roles or {})
        self.added = check_roles(self.manifest, self.where, self.roles, roles_why, run_roles)
        self.ordered = head.order is not None
        infos = [*self.manifest.shards, *(s for a in self.added.values() for s in a.shards)]
        missing = [s.spec(self.ordered).where(self.loc) for s in infos if self.loc.size(s.path) is None]
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ShardError(f"teacher cache {self.where}: {len(missing)} shard(s) missing: "
                             + "; ".join(missing[:10]) + more)
        self.verify = verify
        self.max_bytes = max(1, int(max_bytes_in_memory))
        self._shards: OrderedDict[int, EncodedShard] = OrderedDict()
        self._lock = threading.Lock()
        self._reading: dict[int, Future[EncodedShard]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self.shards_read = 0
        self.mass_eps = encoding_mass_eps(head.encoding, self.manifest.roles_with_added())

    # ------------------------------------------------------------------ properties
    @property
    def num_examples(self) -> int:
        return self.manifest.head.num_examples

    @property
    def tau(self) -> float:
        return float(self.manifest.head.valid_for.get("tau", 1.0))

    @property
    def vocab_size(self) -> int:
        return self.manifest.head.vocab_size

    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.manifest.head.valid_for.get("tokenizer_fingerprint", ""))

    @property
    def bytes_in_memory(self) -> int:
        with self._lock:
            return sum(s.nbytes for s in self._shards.values())

    # ------------------------------------------------------------------ shards
    def _read(self, index: int) -> EncodedShard:
        """Read and check shard `index` (its file and those of the added roles this reader serves)."""
        head = self.manifest.head
        info = self.manifest.shards[index]
        expected = head.shard_examples(info.spec(self.ordered))
        table, where = read_shard_table(self.loc, info, head.layout(), expected, self.ordered, self.verify)
        shard = EncodedShard.from_table(table, head.layout(), where, info.start)
        for role, entry in self.added.items():
            ainfo = entry.shards[index]
            atable, awhere = read_shard_table(self.loc, ainfo, head.layout(), expected, self.ordered, self.verify)
            shard.add_role(atable, role, awhere)
        with self._lock:
            self.shards_read += 1
        return shard

    def shard(self, index: int) -> EncodedShard:
        """Shard `index`, encoded (from memory when recently used; joins a read already under way)."""
        with self._lock:
            if index in self._shards:
                self._shards.move_to_end(index)
                return self._shards[index]
            pending = self._reading.get(index)
        shard = pending.result() if pending is not None else self._read(index)
        with self._lock:
            self._reading.pop(index, None)
            self._shards[index] = shard
            self._shards.move_to_end(index)
            while len(self._shards) > 1 and sum(s.nbytes for s in self._shards.values()) > self.max_bytes:
                self._shards.popitem(last=False)
        return shard

    def prefetch(self, batches: Iterable[Sequence[int]]) -> None:
        """Start reading, in a background thread, the shards the given batches (example indices) need and
        that are not in memory. Errors surface when a batch asks for the shard."""
        wanted = []
        for batch in batches:
            for ex in batch:
                idx = self.manifest.shard_of(int(ex)).index
                if idx not in wanted:
                    wanted.append(idx)
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-prefetch")
            for idx in wanted:
                if idx not in self._shards and idx not in self._reading:
                    self._reading[idx] = self._pool.submit(self._read, idx)

    def iter_shards(self, order: Sequence[int] | None = None, prefetch: int = 1) -> Iterator[DecodedShard]:
        """Whole decoded shards in `order` (default: all, in order), reading up to `prefetch` ahead in a thread
        (bypasses the in-memory set: for verification and streaming consumers)."""
        indices = list(range(len(self.manifest.shards))) if order is None else list(order)
        if prefetch <= 0:
            for i in indices:
                yield self._read(i).decode_all(self.roles)
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-stream")
        pending: list[Future[EncodedShard]] = []
        try:
            nxt = 0
            for _ in indices:
                while nxt < len(indices) and len(pending) <= prefetch:
                    pending.append(pool.submit(self._read, indices[nxt]))
                    nxt += 1
                yield pending.pop(0).result().decode_all(self.roles)
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
            self._shards.clear()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # ------------------------------------------------------------------ records
    def examples(self, indices: Sequence[int]) -> list[ExampleRecord]:
        """ExampleRecords of the given example indices, in that order (each shard decoded once per call)."""
        by_shard: dict[int, list[int]] = {}
        for pos, ex in enumerate(indices):
            by_shard.setdefault(self.manifest.shard_of(int(ex)).index, []).append(pos)
        out: list[ExampleRecord | None] = [None] * len(indices)
        for index, positions in by_shard.items():
            recs = self.shard(index).records([int(indices[p]) for p in positions], self.roles)
            for pos, rec in zip(positions, recs):
                out[pos] = rec
        return [r for r in out if r is not None]

    def batch(self, indices: Sequence[int], seq_len: int, batch_id: int | str,
              meta: dict[str, Any] | None = None) -> Any:
        """The rows-form TopKRecord of these examples padded to `seq_len` (records.assemble_batch). Its
        meta says where it came from and, for TopKRecord.validate, the encoding's mass tolerance."""
        info = {"source": "cache", "encoding": self.manifest.head.encoding, "mass_eps": self.mass_eps,
                **(meta or {})}
        return assemble_batch(self.examples(indices), seq_len, batch_id, self.tau, self.vocab_size, self.roles,
                              self.tokenizer_fingerprint, info)

    def verify_all(self) -> list[str]:
        """Re-check every shard's checksum and contents; returns one message per bad shard (empty: all good)."""
        bad = []
        for index in range(len(self.manifest.shards)):
            try:
                self._read(index).decode_all(self.roles)
            except ShardError as exc:
                bad.append(str(exc))
        return bad


def open_for_run(uri: str, cfg: Any, *, tokenizer_fingerprint: str, vocab_size: int, examples_sha256: str,
                 num_examples: int, student_base_from_cache: bool = False, encoding: str | None = None,
                 max_bytes_in_memory: int = DEFAULT_MEMORY_BYTES) -> CacheReader:
    """A CacheReader checked against a run config (`common.config.RunConfig`): its settings and models
    (identity.run_valid_for / run_roles) and the roles its loss method reads from a cache
    (common.roles.cache_roles; student_base only when lp_S0 is to come from the cache)."""
    roles = cache_roles(cfg, student_base_from_cache)
    why = f"loss.method {cfg.loss.method}" + (", lp_S0 from the cache" if student_base_from_cache else "")
    return CacheReader(uri, run_valid_for=run_valid_for(cfg, tokenizer_fingerprint=tokenizer_fingerprint,
                                                        vocab_size=vocab_size, examples_sha256=examples_sha256,
                                                        num_examples=num_examples, encoding=encoding),
                       run_roles=run_roles(cfg, roles), roles=roles, roles_why=why,
                       max_bytes_in_memory=max_bytes_in_memory)
