"""The cache manifest: what a cache is valid for, how it is stored, and its shards with their checksums.

`manifest.json` (written atomically, last, when every shard is finished):

    {"format": "deltakd-teacher-cache", "version": 1,
     "valid_for": {tokenizer_fingerprint, vocab_size, k, tau, encoding, max_length, overlong,
                   prompt_template, context_template,
                   data: {source, split, columns, max_examples, num_examples, examples_sha256}},
     "roles": {role: {path, revision, fingerprint}},          # the model that produced each role
     "layout": {encoding, k, vocab_size, roles, build_key, storage: {role: "uq8" | "uq10 shift from sft" ...}},
     "num_examples", "shard_size",
     "shards": [{index, start, end, path, sha256, bytes, num_tokens, build_key}],
     "totals": {tokens, bytes, bytes_per_token},
     "build": {...}}                                            # informational: engine, dtypes, times, git sha

`layout.k` is the number of support ids stored per row (the loss's k, or k + 1 with a forced id).
`build.json` holds the same head (no shards) from the start of a build: a rerun resumes only a build of
the same settings. `build_key` = sha256 of that head, and ties every shard sidecar to its build.

The build order (`order`, optional): the examples in the order the build scored them, a permutation of
0 .. num_examples - 1; shard i holds the examples at positions [i * shard_size, (i + 1) * shard_size) of it.
A build that replays a run's batch plan (teacher_service/cache/plan.py) stores the plan's first epoch
there, so each shard holds whole batches of it; None means the identity (shard i: examples i * shard_size ..).
`scoring` records how the teachers scored (the plan, the per-batch size, wire dtype, LM head chunking,
engine dtype and device): it defines the contents (a resume must agree) but not what a run may use them for.
`added_roles` (manifest only): roles scored later at the cached ids (`cache add-role`), each in its own shard
files under `roles/<key>/`, e.g. a student base's lp_S0; the manifest is rewritten (atomically) with each.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from common.codec import get_encoding

from .errors import CacheError, CacheIncompleteError, CacheMismatchError
from .fs import CacheLocation
from .shard import SHARD_META_DIR, ShardInfo, ShardLayout, ShardSpec, shard_specs

__all__ = ["Manifest", "BuildHead", "AddedRole", "MANIFEST_NAME", "BUILD_NAME", "FORMAT", "VERSION", "load_manifest",
           "load_build_head", "role_differences", "valid_for_differences", "check_run"]

FORMAT = "deltakd-teacher-cache"
VERSION = 1
MANIFEST_NAME = "manifest.json"
BUILD_NAME = "build.json"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


@dataclass
class BuildHead:
    """Everything that defines a build's contents (the part of the manifest known before any shard)."""

    valid_for: dict[str, Any]
    roles: dict[str, dict[str, Any]]
    encoding: str
    k: int
    vocab_size: int
    num_examples: int
    shard_size: int
    build: dict[str, Any] = field(default_factory=dict)
    order: list[int] | None = None
    scoring: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.order is not None:
            self.order = [int(e) for e in self.order]
            if sorted(self.order) != list(range(self.num_examples)):
                raise CacheError(f"build order must be a permutation of 0..{self.num_examples - 1} "
                                 f"({len(self.order)} entries given)")

    def defining(self) -> dict[str, Any]:
        """The fields a resume must agree on (not `build`, which is informational)."""
        return {"valid_for": self.valid_for, "roles": self.roles, "encoding": self.encoding, "k": self.k,
                "vocab_size": self.vocab_size, "num_examples": self.num_examples, "shard_size": self.shard_size,
                "order": self.order, "scoring": self.scoring}

    def order_array(self) -> np.ndarray | None:
        """The build order as int64 [num_examples], or None for the identity."""
        return None if self.order is None else np.asarray(self.order, dtype=np.int64)

    def specs(self) -> list[ShardSpec]:
        return shard_specs(self.num_examples, self.shard_size, ordered=self.order is not None)

    def shard_examples(self, spec: ShardSpec) -> list[int]:
        """The example indices shard `spec` holds, in stored order."""
        if self.order is None:
            return list(range(spec.start, spec.end))
        return self.order[spec.start: spec.end]

    @property
    def build_key(self) -> str:
        return hashlib.sha256(_canonical(self.defining())).hexdigest()

    @property
    def role_names(self) -> tuple[str, ...]:
        return tuple(sorted(self.roles))

    def layout(self) -> ShardLayout:
        return ShardLayout(self.encoding, self.k, self.vocab_size, self.role_names, self.build_key)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, **self.defining(), "build": self.build}

    @classmethod
    def from_json(cls, d: dict[str, Any], where: str) -> BuildHead:
        if d.get("format") != FORMAT or d.get("version") != VERSION:
            raise CacheError(f"{where}: not a deltakd teacher cache of version {VERSION} "
                             f"(format {d.get('format')!r}, version {d.get('version')!r})")
        try:
            return cls(d["valid_for"], d["roles"], d["encoding"], int(d["k"]), int(d["vocab_size"]),
                       int(d["num_examples"]), int(d["shard_size"]), dict(d.get("build", {})), d.get("order"),
                       dict(d.get("scoring") or {}))
        except (KeyError, TypeError, ValueError) as exc:
            raise CacheError(f"{where}: malformed ({type(exc).__name__}: {exc})") from None


@dataclass
class AddedRole:
    """A role scored after the build at the cached ids (`cache add-role`), stored in its own shard files
    (`roles/<key>/shard-NNNNN.parquet`, one per main shard, same examples). identity: the model that
    produced it ({path, revision, fingerprint}); build_key ties its shard sidecars to it."""

    role: str
    key: str
    identity: dict[str, Any]
    shards: list[ShardInfo]
    build: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"role": self.role, "key": self.key, "identity": self.identity,
                "shards": [s.to_json() for s in self.shards], "build": self.build}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> AddedRole:
        return cls(str(d["role"]), str(d["key"]), dict(d["identity"]), [ShardInfo.from_json(s) for s in d["shards"]],
                   dict(d.get("build", {})))


@dataclass
class Manifest:
    head: BuildHead
    shards: list[ShardInfo]
    added_roles: list[AddedRole] = field(default_factory=list)
    _positions: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def layout(self) -> ShardLayout:
        return self.head.layout()

    @property
    def num_tokens(self) -> int:
        return int(sum(s.num_tokens for s in self.shards))

    @property
    def num_bytes(self) -> int:
        return int(sum(s.bytes for s in self.shards))

    def to_json(self) -> dict[str, Any]:
        head = self.head.to_json()
        build = head.pop("build")
        layout = {"encoding": self.head.encoding, "k": self.head.k, "vocab_size": self.head.vocab_size,
                  "roles": list(self.head.role_names), "build_key": self.head.build_key,
                  "storage": get_encoding(self.head.encoding).describe(self.head.role_names)}
        tokens = self.num_tokens
        return {**head, "layout": layout, "shards": [s.to_json() for s in self.shards],
                "added_roles": [a.to_json() for a in self.added_roles],
                "totals": {"examples": self.head.num_examples, "tokens": tokens, "bytes": self.num_bytes,
                           "bytes_per_token": self.num_bytes / tokens if tokens else None},
                "build": build}

    def write(self, loc: CacheLocation) -> None:
        loc.write_atomic(MANIFEST_NAME, json.dumps(self.to_json(), indent=1, ensure_ascii=False).encode("utf-8"))

    def position(self, example: int) -> int:
        """Where an example sits in the build order."""
        if not 0 <= example < self.head.num_examples:
            raise CacheError(f"example {example} is out of range: the cache holds examples "
                             f"0..{self.head.num_examples - 1}")
        order = self.head.order_array()
        if order is None:
            return int(example)
        if self._positions is None:
            pos = np.empty_like(order)
            pos[order] = np.arange(order.size)
            self._positions = pos
        return int(self._positions[example])

    def shard_of(self, example: int) -> ShardInfo:
        return self.shards[self.position(example) // self.head.shard_size]

    def roles_with_added(self) -> list[str]:
        return sorted(set(self.head.roles) | {a.role for a in self.added_roles})


def _load_json(loc: CacheLocation, rel: str) -> dict[str, Any]:
    try:
        doc = json.loads(loc.read_bytes(rel))
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise CacheError(f"{loc.display(rel)}: unreadable ({exc})") from None
    if not isinstance(doc, dict):
        raise CacheError(f"{loc.display(rel)}: expected a JSON object")
    return doc


def load_build_head(loc: CacheLocation) -> BuildHead | None:
    """The head of a build in progress (build.json), or None when there is none."""
    if not loc.exists(BUILD_NAME):
        return None
    return BuildHead.from_json(_load_json(loc, BUILD_NAME), loc.display(BUILD_NAME))


def load_manifest(loc: CacheLocation) -> Manifest:
    """Read manifest.json. A location without one raises CacheIncompleteError saying what is there."""
    if not loc.exists(MANIFEST_NAME):
        head = load_build_head(loc) if loc.exists(BUILD_NAME) else None
        if head is None:
            raise CacheIncompleteError(f"no teacher cache at {loc.display()}: {MANIFEST_NAME} not found")
        done = len([n for n in loc.listdir(SHARD_META_DIR) if n.endswith(".json") and not n.startswith(".")])
        total = -(-head.num_examples // head.shard_size)
        raise CacheIncompleteError(f"teacher cache {loc.display()} is an unfinished build: {done} of {total} shards "
                                   f"written, no {MANIFEST_NAME} yet (rerun the build to finish it)")
    where = loc.display(MANIFEST_NAME)
    doc = _load_json(loc, MANIFEST_NAME)
    head = BuildHead.from_json(doc, where)
    try:
        shards = [ShardInfo.from_json(s) for s in doc["shards"]]
        added = [AddedRole.from_json(a) for a in doc.get("added_roles", [])]
    except (KeyError, TypeError) as exc:
        raise CacheError(f"{where}: malformed shard list ({exc})") from None
    expected = -(-head.num_examples // head.shard_size)
    for what, listed in [("shards", shards), *((f"added role {a.key} shards", a.shards) for a in added)]:
        if [s.index for s in listed] != list(range(expected)):
            raise CacheError(f"{where}: lists {what} {[s.index for s in listed][:5]}..., expected 0..{expected - 1}")
    return Manifest(head, shards, added)


# ----------------------------------------------------------------------------------------------------
# Checking a cache against a run


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 80 else s[:77] + "..."


def valid_for_differences(cache: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """'key: cache X, run Y' for every key the run states (dotted) whose cached value differs."""
    flat_cache, flat_run = _flatten(cache), _flatten(run)
    return [f"{k}: cache {_short(flat_cache.get(k, '<absent>'))}, run {_short(v)}"
            for k, v in sorted(flat_run.items()) if flat_cache.get(k, "<absent>") != v]


def role_differences(cache_roles: dict[str, dict[str, Any]], run_roles: dict[str, dict[str, Any]]) -> list[str]:
    """Model identity per role the run needs and the cache has.

    Two identities match when both weight fingerprints are known and equal (the same weights at another
    path or under a hub id match); when either is unknown, path and revision must match.
    """
    out = []
    for role, want in sorted(run_roles.items()):
        have = cache_roles.get(role)
        if have is None:
            continue  # a missing role is reported by the role check, with what the method needs
        fa, fb = have.get("fingerprint"), want.get("fingerprint")
        if fa and fb and fa == fb:
            continue
        keys = ("path", "revision", "fingerprint") if fa and fb else ("path", "revision")
        out += [f"roles.{role}.{k}: cache {_short(have.get(k))}, run {_short(want.get(k))}"
                for k in keys if have.get(k) != want.get(k)]
    return out


def check_run(manifest: Manifest, where: str, run_valid_for: dict[str, Any],
              run_roles: dict[str, dict[str, Any]]) -> None:
    """Raise CacheMismatchError listing every difference between the cache and the run."""
    diffs = valid_for_differences(manifest.head.valid_for, run_valid_for)
    diffs += role_differences(manifest.head.roles, run_roles)
    if diffs:
        raise CacheMismatchError(where, diffs)
