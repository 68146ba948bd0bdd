"""Reading a cache: check it against the run, then serve example records and batch records.

    reader = CacheReader(uri, run_valid_for=..., run_roles=..., roles=["sft", "base"])
    record = reader.batch([12, 7, 301], seq_len=T, batch_id=5)   # rows-form batch record
    for shard in reader.iter_shards(): ...                       # streamed, next shard read ahead

Opening checks, before any record is served: the manifest exists and is complete; every setting the run
states matches (one CacheMismatchError listing each differing key with both values); the cache has every
role the run needs (CacheRoleError naming the roles); every shard file is present (ShardError naming each
missing path and example range). Each shard's sha256 is checked when it is read, before any of its
records leaves the reader (ShardError naming path and example range).

Shards are decoded whole (one vectorised call per component) and the most recent `max_shards_in_memory`
are kept, so batches drawn from a shuffled order re-read shards only when they do not fit.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .errors import CacheRoleError, ShardError
from .fs import CacheLocation
from .manifest import Manifest, check_run, load_manifest
from .records import ExampleRecord, assemble_batch
from .shard import DecodedShard, ShardInfo, read_shard

__all__ = ["CacheReader", "check_roles", "open_for_run"]


def check_roles(manifest: Manifest, where: str, roles: Sequence[str], why: str = "") -> None:
    """Raise CacheRoleError naming every role in `roles` the cache lacks."""
    have = set(manifest.head.roles)
    missing = [r for r in roles if r not in have]
    if missing:
        reason = f" ({why})" if why else ""
        raise CacheRoleError(f"teacher cache {where} lacks role(s) {missing} that this run needs{reason}; it holds "
                             f"{sorted(have)}")


class CacheReader:
    """A checked, read-only view of one cache (module docstring)."""

    def __init__(self, uri: str, *, run_valid_for: dict[str, Any] | None = None,
                 run_roles: dict[str, dict[str, Any]] | None = None, roles: Sequence[str] | None = None,
                 roles_why: str = "", max_shards_in_memory: int = 2, verify: bool = True):
        self.loc = CacheLocation(uri)
        self.where = self.loc.display()
        self.manifest = load_manifest(self.loc)
        self.roles = list(roles) if roles is not None else list(self.manifest.head.role_names)
        if run_valid_for is not None or run_roles is not None:
            check_run(self.manifest, self.where, run_valid_for or {}, run_roles or {})
        check_roles(self.manifest, self.where, self.roles, roles_why)
        missing = [s.spec().where(self.loc) for s in self.manifest.shards if self.loc.size(s.path) is None]
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ShardError(f"teacher cache {self.where}: {len(missing)} shard(s) missing: "
                             + "; ".join(missing[:10]) + more)
        self.verify = verify
        self.max_shards = max(1, int(max_shards_in_memory))
        self._shards: OrderedDict[int, DecodedShard] = OrderedDict()
        self._lock = threading.Lock()
        self.shards_read = 0

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

    # ------------------------------------------------------------------ shards
    def _read(self, info: ShardInfo) -> DecodedShard:
        shard = read_shard(self.loc, info, self.manifest.layout, self.roles, verify=self.verify)
        self.shards_read += 1
        return shard

    def shard(self, index: int) -> DecodedShard:
        """Shard `index`, decoded (from memory when recently used)."""
        with self._lock:
            if index in self._shards:
                self._shards.move_to_end(index)
                return self._shards[index]
        shard = self._read(self.manifest.shards[index])
        with self._lock:
            self._shards[index] = shard
            while len(self._shards) > self.max_shards:
                self._shards.popitem(last=False)
        return shard

    def iter_shards(self, order: Sequence[int] | None = None, prefetch: int = 1) -> Iterator[DecodedShard]:
        """Decoded shards in `order` (default: all, in order), reading up to `prefetch` ahead in a thread."""
        indices = list(range(len(self.manifest.shards))) if order is None else list(order)
        if prefetch <= 0:
            for i in indices:
                yield self._read(self.manifest.shards[i])
            return
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-prefetch")
        pending: list[Future[DecodedShard]] = []
        try:
            nxt = 0
            for _ in indices:
                while nxt < len(indices) and len(pending) <= prefetch:
                    pending.append(pool.submit(self._read, self.manifest.shards[indices[nxt]]))
                    nxt += 1
                yield pending.pop(0).result()
        finally:
            for f in pending:
                f.cancel()
            pool.shutdown(wait=True)

    # ------------------------------------------------------------------ records
    def examples(self, indices: Sequence[int]) -> list[ExampleRecord]:
        """ExampleRecords of the given example indices, in that order (each shard is read once per call)."""
        by_shard: dict[int, list[int]] = {}
        for pos, ex in enumerate(indices):
            by_shard.setdefault(self.manifest.shard_of(int(ex)).index, []).append(pos)
        out: list[ExampleRecord | None] = [None] * len(indices)
        for index, positions in by_shard.items():
            shard = self.shard(index)
            for pos in positions:
                out[pos] = shard.record(int(indices[pos]), self.roles)
        return [r for r in out if r is not None]

    def batch(self, indices: Sequence[int], seq_len: int, batch_id: int | str,
              meta: dict[str, Any] | None = None) -> Any:
        """The rows-form batch record of these examples padded to `seq_len` (records.assemble_batch)."""
        info = {"source": "cache", "encoding": self.manifest.head.encoding, **(meta or {})}
        return assemble_batch(self.examples(indices), seq_len, batch_id, self.tau, self.vocab_size, self.roles,
                              self.tokenizer_fingerprint, info)

    def verify_all(self) -> list[str]:
        """Re-check every shard's checksum and contents; returns one message per bad shard (empty: all good)."""
        bad = []
        for info in self.manifest.shards:
            try:
                read_shard(self.loc, info, self.manifest.layout, self.roles, verify=True)
            except ShardError as exc:
                bad.append(str(exc))
        return bad


def open_for_run(uri: str, cfg: Any, *, tokenizer_fingerprint: str, vocab_size: int, examples_sha256: str,
                 num_examples: int, student_base_from_cache: bool = False, encoding: str | None = None,
                 max_shards_in_memory: int = 2) -> CacheReader:
    """A CacheReader checked against a run config (`common.config.RunConfig`): its settings and models
    (identity.run_valid_for / run_roles) and the roles its loss method reads from a cache
    (identity.cache_roles_needed; student_base only when lp_S0 is to come from the cache)."""
    from .identity import cache_roles_needed, run_roles, run_valid_for

    roles = cache_roles_needed(cfg, student_base_from_cache)
    why = f"loss.method {cfg.loss.method}" + (", lp_S0 from the cache" if student_base_from_cache else "")
    return CacheReader(uri, run_valid_for=run_valid_for(cfg, tokenizer_fingerprint=tokenizer_fingerprint,
                                                        vocab_size=vocab_size, examples_sha256=examples_sha256,
                                                        num_examples=num_examples, encoding=encoding),
                       run_roles=run_roles(cfg, roles), roles=roles, roles_why=why,
                       max_shards_in_memory=max_shards_in_memory)
