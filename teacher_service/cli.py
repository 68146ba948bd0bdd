"""`python -m teacher_service serve|status|stop --config X [--set a.b=v] [--address A]`.

serve:  start the config's teacher roles as detached named actors on a running Ray cluster and print how
        to connect; status: each role's replicas, health and stats; stop: kill them.

Exit 2 with one message when the cluster cannot be reached: no cluster recorded, a head that does not answer
within --connect-timeout seconds (a dead head whose address `ray start` left recorded), or auth settings.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import ray

from common.config import ConfigError, RunConfig, load_config

from .errors import RayConnectionError
from .pool import TeacherPool
from .ray_connect import connect_ray

__all__ = ["main", "resolve_paths"]


def resolve_paths(cfg: RunConfig) -> RunConfig:
    """Replace `embedded:<role>` model paths by the locally built tiny models (student_worker builds them)."""
    specs = [cfg.models.base_teacher, cfg.models.sft_teacher, cfg.models.student, cfg.models.student_base,
             *[s for p in cfg.models.extra_pairs for s in (p.base, p.sft)]]
    if not any(s is not None and s.path.startswith("embedded:") for s in specs):
        return cfg
    # deferred: ~0.18 s (safetensors, tokenizers; measured) that a config of hub / local models never needs
    from common.tiny_world.build import resolve_model_paths

    return resolve_model_paths(cfg)


def _connect(cfg: RunConfig, address: str, timeout_s: float | None = None) -> None:
    """Join the running cluster (its head must answer within timeout_s: ray_connect.connect_ray)."""
    connect_ray(address, timeout_s, namespace=cfg.teachers.namespace, logging_level="ERROR")


def _serve(cfg: RunConfig, address: str, timeout_s: float | None = None) -> None:
    cfg = resolve_paths(cfg)
    _connect(cfg, address, timeout_s)
    pool = TeacherPool.start(cfg, detached=True)
    ray.get(pool.warm_up(assemble=False))  # the first real call then pays no one-off costs (the service outlives us)
    t = cfg.teachers
    gcs = ray.get_runtime_context().gcs_address
    print(f"teacher service up: namespace={t.namespace!r} name_prefix={t.name_prefix!r} address={gcs}")
    for role, hs in pool.handles.items():
        print(f"  {role}: {len(hs)} replica(s)")
    print("connect from Python:\n"
          "    from teacher_service import TeacherClient\n"
          f"    client = TeacherClient(namespace={t.namespace!r}, address={gcs!r}, name_prefix={t.name_prefix!r})\n"
          f"    ids, logprobs, tail = client.topk(['some text'], k={cfg.loss.k}, tau={cfg.loss.tau})")
    print("or from a training config: teachers.attach=true with the same namespace and name_prefix")


def _status(cfg: RunConfig, address: str, timeout_s: float | None = None) -> dict[str, Any]:
    _connect(cfg, address, timeout_s)
    pool = TeacherPool.attach(cfg)
    health, stats = pool.health(), pool.stats()
    out: dict[str, Any] = {}
    for role in (r for r in pool.roles if r not in pool.paired):  # a LoRA pair's base role is its sft replicas
        out[role] = [{**h, **s} for h, s in zip(health[role], stats["roles"][role])]
        print(f"{role}: {len(out[role])} replica(s)")
        for i, r in enumerate(out[role]):
            rate = r["tokens"] / r["busy_s"] if r["busy_s"] > 0 else 0.0
            print(f"  [{i}] ok={r['ok']} model={r['model']} device={r['device']} calls={r['calls']} "
                  f"tokens={r['tokens']} busy_s={r['busy_s']:.2f} tokens/s={rate:.0f}")
    return out


def _stop(cfg: RunConfig, address: str, timeout_s: float | None = None) -> None:
    _connect(cfg, address, timeout_s)
    pool = TeacherPool.attach(cfg)
    names = {r: len(hs) for r, hs in pool.handles.items()}
    pool.shutdown(force=True)
    print(f"stopped teachers in namespace {cfg.teachers.namespace!r}: {names}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m teacher_service", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("command", choices=["serve", "status", "stop"])
    ap.add_argument("--config", required=True, help="run config YAML (its models and teachers sections)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--address", default="auto",
                    help="Ray cluster address <head node IP>:<port> (default: auto = $RAY_ADDRESS, else the last "
                         "`ray start` on this host). Token auth: RAY_AUTH_MODE=token in the environment")
    ap.add_argument("--connect-timeout", type=float, metavar="S",
                    help="seconds the cluster's head has to answer before this stops with exit 2 (default: "
                         "$DELTAKD_RAY_CONNECT_TIMEOUT_S or 10)")
    ap.add_argument("--json", action="store_true", help="status: also print the full status as JSON")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.command == "serve":
            _serve(cfg, args.address, args.connect_timeout)
        elif args.command == "status":
            out = _status(cfg, args.address, args.connect_timeout)
            if args.json:
                print(json.dumps(out, default=str))
        else:
            _stop(cfg, args.address, args.connect_timeout)
    except (ConfigError, RayConnectionError) as exc:  # bad input or no cluster: one message, exit 2
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
