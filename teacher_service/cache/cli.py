"""`python -m teacher_service.cache status|verify --cache DIR_OR_URI [--json]`.

status: what the cache is valid for, its roles and storage, shards present and missing, sizes; for an
        unfinished build, how many shards are written. Exit 0 when complete and every shard file exists.
verify: status, then re-reads every shard and checks its sha256 and contents. Exit 0 only when all pass.
Exit codes: 0 good, 1 problems found (each named with path and example range), 2 no cache there.
(`build` comes with the Ray Data pipeline.)
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from .encoded import read_shard
from .errors import CacheError, CacheIncompleteError, ShardError
from .fs import CacheLocation
from .manifest import load_build_head, load_manifest
from .writer import finished_shard

__all__ = ["main", "cache_status"]


def cache_status(uri: str, verify: bool = False) -> dict[str, Any]:
    """A JSON-able summary of the cache at `uri`; `problems` lists what is wrong (empty: all good)."""
    loc = CacheLocation(uri)
    try:
        manifest = load_manifest(loc)
    except CacheIncompleteError as exc:
        head = load_build_head(loc)
        if head is None:
            raise
        specs = head.specs()
        done = [s.index for s in specs if finished_shard(loc, s, head.build_key, verify=verify) is not None]
        return {"cache": loc.display(), "complete": False, "encoding": head.encoding, "k": head.k,
                "roles": head.roles, "num_examples": head.num_examples, "shards_total": len(specs),
                "shards_finished": len(done),
                "shards_to_write": [s.where(loc) for s in specs if s.index not in set(done)],
                "problems": [str(exc)]}
    head = manifest.head
    problems = []
    ordered = head.order is not None
    for info in [*manifest.shards, *(s for a in manifest.added_roles for s in a.shards)]:
        spec = info.spec(ordered)
        if loc.size(info.path) is None:
            problems.append(f"shard {spec.where(loc)} is missing")
        elif verify:
            try:
                read_shard(loc, info, manifest.layout, roles=[], verify=True, ordered=ordered,
                           expected=head.shard_examples(spec))
            except ShardError as exc:
                problems.append(str(exc))
    tokens = manifest.num_tokens
    return {
        "cache": loc.display(), "complete": True, "valid_for": head.valid_for, "roles": head.roles,
        "storage": manifest.to_json()["layout"]["storage"], "encoding": head.encoding, "k": head.k,
        "vocab_size": head.vocab_size, "num_examples": head.num_examples, "num_tokens": tokens,
        "shards_total": len(manifest.shards), "bytes": manifest.num_bytes,
        "file_bytes_per_token": manifest.num_bytes / tokens if tokens else None,
        "verified": verify, "problems": problems, "build": head.build,
    }


def _print(status: dict[str, Any]) -> None:
    print(f"teacher cache {status['cache']}: " + ("complete" if status["complete"] else "UNFINISHED build"))
    if status["complete"]:
        vf = status["valid_for"]
        print(f"  examples {status['num_examples']}, counted tokens {status['num_tokens']}, "
              f"{status['shards_total']} shards, {status['bytes'] / 2**20:.1f} MiB "
              f"({status['file_bytes_per_token'] or 0:.1f} bytes/token on disk)")
        print(f"  encoding {status['encoding']}, K {status['k']}, vocab {status['vocab_size']}, "
              f"tau {vf.get('tau')}, max_length {vf.get('max_length')}")
        data = vf.get("data", {})
        print(f"  data {data.get('source')}[{data.get('split')}] sha256 {str(data.get('examples_sha256'))[:16]}...")
        for role, ident in sorted(status["roles"].items()):
            fp = ident.get("fingerprint")
            print(f"  role {role:13s} {status['storage'].get(role, '?'):20s} {ident.get('path')}"
                  + (f"@{ident['revision']}" if ident.get("revision") else "")
                  + (f"  weights {fp[:12]}..." if fp else "  weights unknown"))
    else:
        print(f"  {status['shards_finished']} of {status['shards_total']} shards finished; encoding "
              f"{status['encoding']}, roles {sorted(status['roles'])}")
        for where in status["shards_to_write"][:10]:
            print(f"  to write: {where}")
    if status["complete"]:
        label = "verified (every checksum re-read)" if status["verified"] else "shard files present"
        print(f"  {label}: " + ("all good" if not status["problems"] else f"{len(status['problems'])} problem(s)"))
        for p in status["problems"]:
            print(f"  PROBLEM: {p}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m teacher_service.cache", description=__doc__.splitlines()[0])
    p.add_argument("command", choices=["status", "verify"])
    p.add_argument("--cache", required=True, help="cache folder or pyarrow file system URI (file://, s3://, ...)")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    args = p.parse_args(argv)
    try:
        status = cache_status(args.cache, verify=args.command == "verify")
    except CacheIncompleteError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except CacheError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(status, indent=1))
    else:
        _print(status)
    return 0 if status["complete"] and not status["problems"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
