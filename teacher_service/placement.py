"""Where teacher replicas go: the layout check against the cluster's nodes, and one placement group per
multi-GPU replica.

A replica asks for `teachers.num_gpus` GPUs, `teachers.num_cpus` CPUs and `teachers.resources`. With more
than one GPU it gets its own placement group of ONE bundle holding all of them (strategy STRICT_PACK, so one
node) and the actor takes the whole bundle: Ray then sets CUDA_VISIBLE_DEVICES in the actor to exactly the
replica's GPUs, which the HF engine spreads the model over (a device map) and the vLLM engine hands to its
tensor-parallel workers (engine_vllm.vllm_parallel_options says why vLLM's "mp" executor and not its Ray
executor). The group reserves the GPUs before the actor starts, keeps a restarted actor on the same node, and
is removed when the pool shuts down. A replica with one GPU or a fraction of one is a plain actor, as before.

`check_layout` is pure (node resources in, a `PlacementError` naming the numbers out), so its refusals are
unit-tested without Ray; `cluster_nodes` and `reserve_groups` are the Ray side.
"""

from __future__ import annotations

import math
import time
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

__all__ = ["PlacementError", "RESERVE_MIN_S", "replica_bundle", "needs_group", "engine_gpus", "check_layout", "cluster_nodes", "group_name",
           "reserve_groups", "group_options", "find_group", "remove_groups"]

_EPS = 1e-9
RESERVE_MIN_S = 30.0  # the shortest wait for a layout the nodes can hold to be reserved


class PlacementError(ValueError):
    """The teacher layout cannot be placed on this cluster; the message names the numbers."""


def needs_group(num_gpus: float) -> bool:
    """A replica of more than one GPU gets its own placement group."""
    return num_gpus > 1


def engine_gpus(num_gpus: float) -> int:
    """The GPUs a replica's engine spreads over (hf device map, vLLM tensor_parallel_size): teachers.num_gpus
    when it is more than one, else 1 (one GPU, a share of one, or the CPU)."""
    return int(num_gpus) if needs_group(num_gpus) else 1


def replica_bundle(num_gpus: float, num_cpus: float, resources: dict[str, float] | None = None) -> dict[str, float]:
    """What one replica reserves: {"CPU", "GPU", custom...}, zero entries left out (Ray refuses empty bundles
    and a zero resource says nothing)."""
    want = {"CPU": float(num_cpus), "GPU": float(num_gpus), **{k: float(v) for k, v in (resources or {}).items()}}
    return {k: v for k, v in want.items() if v > 0}


def _fits(node: dict[str, float], bundle: dict[str, float]) -> int:
    """How many replicas of `bundle` one node holds (its total resources, not what is free now)."""
    if not bundle:
        return 1 << 30
    return min(int(math.floor(node.get(k, 0.0) / v + _EPS)) for k, v in bundle.items())


def check_layout(replicas: int, bundle: dict[str, float], nodes: list[dict[str, float]]) -> None:
    """Refuse (PlacementError) when `replicas` copies of `bundle` cannot all be placed on `nodes` at once.

    nodes: each alive node's total resources ({"CPU": 16, "GPU": 8, "teacher_gpu": 8, ...}). A replica lives
    on one node (a multi-GPU replica's placement group is STRICT_PACK; a single actor never spans nodes), so
    the check is per node: the largest node must hold one replica, and the nodes together all of them.
    """
    if replicas <= 0 or not bundle:
        return
    gpus = bundle.get("GPU", 0.0)
    per_node = [_fits(n, bundle) for n in nodes]
    if not any(per_node):
        if gpus > 0 and max((n.get("GPU", 0.0) for n in nodes), default=0.0) + _EPS < gpus:
            largest = max((n.get("GPU", 0.0) for n in nodes), default=0.0)
            raise PlacementError(f"teachers.num_gpus={gpus:g} per replica but the largest node has {largest:g} "
                                 "GPUs: a replica runs on one node")
        raise PlacementError(f"no node holds one teacher replica {bundle} (nodes: {_describe(nodes, bundle)})")
    total_gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if gpus > 0 and replicas * gpus > total_gpus + _EPS:
        raise PlacementError(f"teachers: replicas x num_gpus = {replicas} x {gpus:g} = {replicas * gpus:g} > "
                             f"{total_gpus:g} GPUs in the cluster")
    if sum(per_node) < replicas:
        raise PlacementError(f"teachers: {replicas} replicas of {bundle} do not fit: the nodes hold "
                             f"{sum(per_node)} at once ({_describe(nodes, bundle)}); a replica runs on one node")


def _describe(nodes: list[dict[str, float]], bundle: dict[str, float]) -> str:
    keys = list(bundle)
    return "; ".join(", ".join(f"{k} {n.get(k, 0.0):g}" for k in keys) for n in nodes) or "none"


def cluster_nodes() -> list[dict[str, float]]:
    """Total resources of every alive node of the connected cluster."""
    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def group_name(replica: str) -> str:
    """The placement group of a replica is named after its actor (so `stop` finds a served replica's group)."""
    return f"{replica}-pg"


def reserve_groups(names: list[str], bundle: dict[str, float], detached: bool, wait_s: float) -> list[PlacementGroup]:
    """Create one placement group (one bundle, STRICT_PACK) per name, all at once, and wait until Ray has
    reserved every one: an autoscaler sees the whole demand together and adds the nodes in one go.

    wait_s: how long to wait (the pool waits at least RESERVE_MIN_S even on a cluster with room: the
    reservation itself takes a moment, longer on a loaded machine; longer for an autoscaler to add nodes). If
    not all are placed in time, removes them all and raises PlacementError saying how many were placed."""
    groups = [placement_group([bundle], strategy="STRICT_PACK", name=name, lifetime="detached" if detached else None)
              for name in names]
    t0 = time.monotonic()
    ready, _ = ray.wait([pg.ready() for pg in groups], num_returns=len(groups), timeout=wait_s)
    if len(ready) < len(groups):
        remove_groups(groups)
        raise PlacementError(f"{len(ready)} of {len(groups)} teacher placement groups of {bundle} (STRICT_PACK: one "
                             f"node each) were placed in {time.monotonic() - t0:.0f} s: the nodes lack free room "
                             "(other actors hold it?); on an autoscaling cluster raise teachers.placement_wait_s")
    return groups


def group_options(pg: PlacementGroup) -> dict[str, Any]:
    """Actor options that put the replica into the group's only bundle. Child tasks are not captured: the
    engine starts no Ray work of its own (vLLM's workers are its own processes, see engine_vllm)."""
    return {"scheduling_strategy": PlacementGroupSchedulingStrategy(
        placement_group=pg, placement_group_bundle_index=0, placement_group_capture_child_tasks=False)}


def find_group(name: str) -> PlacementGroup | None:
    """A named placement group of this namespace, or None."""
    try:
        return ray.util.get_placement_group(name)
    except ValueError:
        return None


def remove_groups(groups: list[PlacementGroup]) -> None:
    """Remove placement groups (kill their actors first). Removing one that is already gone is a no-op in Ray."""
    for pg in groups:
        remove_placement_group(pg)
