"""`python -m teacher_service.cache build|add-role|status|verify ...`: the teacher cache's command line.

build:    python -m teacher_service.cache build --config X --out DIR_OR_URI [--set a.b=v] [--encoding E]
          scores the config's training set with its teachers (a Ray Data pipeline on the Ray cluster: the
          same address rules as the trainer) in the batches of its plan's first epoch, and writes the cache;
          an interrupted build resumes when rerun (finished shards are kept, the manifest is written last).
add-role: python -m teacher_service.cache add-role student_base --cache DIR_OR_URI --student PATH [--config X]
          scores a student base at the cached ids once (teachers.student_base_source: cache); the config
          gives the data (default: the embedded tiny run's), --student the model (default its student).
status:   what the cache is valid for, its roles and storage, shards present and missing, sizes; for an
          unfinished build, how many shards are written. Exit 0 when complete and every shard file exists.
verify:   status, then re-reads every shard and checks its sha256 and contents. Exit 0 only when all pass.
Exit codes: 0 good, 1 problems found (each named with path and range), 2 no cache there / bad input,
3 the build failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from common.config import DEFAULT_CONFIG, ConfigError, ModelSpec, load_config
from common.faults import FaultPlan
from teacher_service.errors import RayConnectionError

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
        "verified": verify, "problems": problems, "build": head.build, "scoring": head.scoring,
        "added_roles": [{"role": a.role, "key": a.key, **a.identity} for a in manifest.added_roles],
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
        for a in status["added_roles"]:
            fp = a.get("fingerprint")
            print(f"  role {a['role']:13s} {'added (' + a['key'] + ')':20s} {a.get('path')}"
                  + (f"  weights {fp[:12]}..." if fp else "  weights unknown"))
        plan = (status.get("scoring") or {}).get("plan")
        if plan:
            print(f"  scored in the batches of plan {plan} (per-rank batch {status['scoring'].get('batch')})")
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


def _load(config: str | None, overrides: list[str]) -> Any:
    # deferred: teacher_service.cli imports Ray (~3 s measured); status and verify need none
    from teacher_service.cli import resolve_paths

    return resolve_paths(load_config(config or str(DEFAULT_CONFIG), overrides))


def _build(args: argparse.Namespace, faults: FaultPlan | None = None) -> int:
    # deferred: .build imports Ray Data (~9 s measured), ray_connect ~2.5 ms; status and verify need neither
    from teacher_service.ray_connect import connect_ray

    from .build import add_role, build_cache

    cfg = _load(args.config, args.set)
    connect_ray(args.address or None, logging_level="ERROR")
    if args.command == "build":
        manifest, stats = build_cache(cfg, args.out, encoding=args.encoding, progress=not args.no_progress,
                                      faults=faults)
    else:
        student = ModelSpec(path=args.student) if args.student else None
        manifest, stats = add_role(cfg, args.cache, args.role, student, progress=not args.no_progress,
                                   faults=faults)
    if args.json:
        print(json.dumps({"stats": stats, "totals": manifest.to_json()["totals"]}, indent=1))
    return 0


def main(argv: list[str] | None = None, faults: FaultPlan | None = None) -> int:
    """The CLI. `faults`: a test's FaultPlan (common/faults.py) for build / add-role; the CLI has none."""
    p = argparse.ArgumentParser(prog="python -m teacher_service.cache", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("status", "verify"):
        q = sub.add_parser(name)
        q.add_argument("--cache", required=True, help="cache folder or pyarrow file system URI (file://, s3://, ...)")
        q.add_argument("--json", action="store_true", help="print the status as JSON")
    for name in ("build", "add-role"):
        q = sub.add_parser(name)
        if name == "build":
            q.add_argument("--out", required=True, help="where to write the cache: a folder or pyarrow URI")
            q.add_argument("--encoding", help="storage encoding (default: the config's teachers.cache.encoding)")
        else:
            q.add_argument("role", choices=["student_base"])
            q.add_argument("--cache", required=True, help="the finished cache: a folder or pyarrow URI")
            q.add_argument("--student", help="the student base to score (default: the config's student base)")
        q.add_argument("--config", help="run config YAML (default: the embedded tiny run)")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
        q.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS / the last `ray start`, else local)")
        q.add_argument("--no-progress", action="store_true", help="no progress bars")
        q.add_argument("--json", action="store_true", help="print the build's figures as JSON at the end")
    args = p.parse_args(argv)
    if args.command in ("build", "add-role"):
        try:
            return _build(args, faults)
        except (ConfigError, RayConnectionError, CacheError, ValueError) as exc:  # bad input: nothing scored
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 2 if not isinstance(exc, ShardError) else 3
        except Exception as exc:  # the pipeline failed (a teacher error, a lost node): rerun to resume
            print(f"error: the build failed ({type(exc).__name__}: {exc}); finished shards are kept, rerun the "
                  "same command to resume", file=sys.stderr)
            return 3
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
