"""Writing a cache: plan the shards, skip the finished ones on a rerun, write the manifest last.

    writer = CacheWriter.open(uri, head)          # new build, or resume one with the same settings
    for spec in writer.pending():                 # finished shards (sidecar + matching sha256) are kept
        writer.write(spec, example_records)       # or `write_shard(loc, spec, records, head.layout(), ...)`
    manifest = writer.finalize()                  #   in a Ray Data stage; the manifest only lists sidecars

A location that already holds a finished cache or a build for other settings is refused with an error
listing the differences: nothing written is ever overwritten by another build.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence

from .errors import CacheError, CacheMismatchError, ShardError
from .fs import CacheLocation
from .manifest import (
    BUILD_NAME,
    MANIFEST_NAME,
    BuildHead,
    Manifest,
    load_build_head,
    load_manifest,
    valid_for_differences,
)
from .records import ExampleRecord
from .shard import SHARD_DIR, SHARD_META_DIR, ShardInfo, ShardSpec, write_shard

__all__ = ["CacheWriter", "finished_shard"]


def finished_shard(loc: CacheLocation, spec: ShardSpec, build_key: str, verify: bool = True) -> ShardInfo | None:
    """The shard's ShardInfo when its sidecar and data file exist, agree with `spec` and this build, and
    (verify) the data's sha256 matches; else None (the shard is to be written again)."""
    if not loc.exists(spec.meta_path) or not loc.exists(spec.path):
        return None
    try:
        info = ShardInfo.from_json(json.loads(loc.read_bytes(spec.meta_path)))
    except (OSError, ValueError, KeyError, TypeError):
        return None  # a torn or foreign sidecar: redo the shard
    if (info.index, info.start, info.end, info.path, info.build_key) != (
            spec.index, spec.start, spec.end, spec.path, build_key):
        return None
    if verify:
        data = loc.read_bytes(spec.path)
        if len(data) != info.bytes or hashlib.sha256(data).hexdigest() != info.sha256:
            return None
    return info


class CacheWriter:
    """Builds one cache at a location (see the module docstring)."""

    def __init__(self, loc: CacheLocation, head: BuildHead):
        self.loc = loc
        self.head = head
        self.specs = head.specs()

    @classmethod
    def open(cls, uri: str, head: BuildHead) -> CacheWriter:
        """Start a build at `uri`, or resume the unfinished build of the same settings found there."""
        if head.num_examples <= 0:
            raise CacheError(f"cache {uri}: nothing to build (num_examples = {head.num_examples})")
        loc = CacheLocation(uri)
        where = loc.display()
        if loc.exists(MANIFEST_NAME):
            done = load_manifest(loc)
            if done.head.defining() == head.defining():
                raise CacheError(f"teacher cache {where} is already complete for these settings; nothing to build")
            raise CacheMismatchError(where, _head_differences(done.head, head) +
                                     ["(a finished cache is never overwritten: use another output location)"])
        existing = load_build_head(loc)
        if existing is not None and existing.defining() != head.defining():
            raise CacheMismatchError(where, _head_differences(existing, head) +
                                     ["(the location holds an unfinished build for other settings: "
                                      "use another output location or delete it)"])
        loc.makedirs()
        if existing is None:
            loc.write_atomic(BUILD_NAME, json.dumps(head.to_json(), indent=1, ensure_ascii=False).encode("utf-8"))
        return cls(loc, head)

    def pending(self, verify: bool = True) -> list[ShardSpec]:
        """Shards still to write; removes the temporary files an interrupted writer left behind."""
        self.loc.remove_temporaries(SHARD_DIR)
        self.loc.remove_temporaries(SHARD_META_DIR)
        key = self.head.build_key
        return [s for s in self.specs if finished_shard(self.loc, s, key, verify) is None]

    def write(self, spec: ShardSpec, examples: Sequence[ExampleRecord]) -> ShardInfo:
        """Write shard `spec`; `examples`: its examples in stored order (head.shard_examples(spec))."""
        return write_shard(self.loc, spec, examples, self.head.layout(), self.head.shard_examples(spec))

    def finalize(self) -> Manifest:
        """Write manifest.json (atomically) once every shard is finished. Raises ShardError naming the
        shards that are not."""
        infos, missing = [], []
        for spec in self.specs:
            info = finished_shard(self.loc, spec, self.head.build_key, verify=False)
            if info is None:
                missing.append(spec.where(self.loc))
            else:
                infos.append(info)
        if missing:
            more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
            raise ShardError(f"cannot finish cache {self.loc.display()}: {len(missing)} shard(s) not written: "
                             + "; ".join(missing[:10]) + more)
        manifest = Manifest(self.head, infos)
        manifest.write(self.loc)
        return manifest


def _head_differences(have: BuildHead, want: BuildHead) -> list[str]:
    a, b = have.defining(), want.defining()
    diffs = valid_for_differences({k: v for k, v in a.items() if k != "roles"},
                                  {k: v for k, v in b.items() if k != "roles"})
    for role in sorted(set(a["roles"]) | set(b["roles"])):
        if a["roles"].get(role) != b["roles"].get(role):
            diffs.append(f"roles.{role}: cache {a['roles'].get(role)!r}, build {b['roles'].get(role)!r}")
    return [d.replace(", run ", ", build ") for d in diffs]
