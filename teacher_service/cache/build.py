"""Building a run's teacher cache, and adding a role to a finished one, as Ray Data pipelines.

    manifest = build_cache(cfg, "s3://bucket/cache")           # python -m teacher_service.cache build
    manifest = add_role(cfg, uri, student=ModelSpec(path=...))  # ... add-role student_base --student PATH

`build_cache`: one input row per shard still to write (plan.ShardInput; finished shards of an interrupted
build are kept), through an actor pool of the SFT teacher (top-k), one actor pool per gathering role (base,
extra pairs: gather at those ids) and a write task per shard (stages.py). Each pool has the role's
`teachers.replicas` actors with `teachers.num_gpus` / `num_cpus` / `resources` each; Ray Data's streaming
executor provides the backpressure between stages and retries a shard whose actor died (its actors restart;
a shard is a pure function of its inputs, so a retry writes the same bytes). The manifest is written last.

`add_role`: the same for one role scored at a finished cache's ids (read from its shards): today the
student base's lp_S0 (`teachers.student_base_source: cache`), in its own shard files under roles/<key>/,
then the manifest is rewritten with the role listed. The scoring runs in the student's dtype (fp32 unless
models.student.dtype says otherwise), as the worker's frozen copy would.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import ray.data  # at the top: only the build / add-role commands import this module (cache/cli.py defers it)

from common.config import ModelSpec, RunConfig
from common.data.batching import load_training_set
from common.data.model_loading import student_dtype
from common.data.tokenizer_check import check_tokenizers, tokenizer_fingerprint
from common.faults import FaultPlan
from common.lora import lora_pair_base
from common.roles import teacher_role_specs
from common.topk import ROLE_BASE, ROLE_SFT, ROLE_STUDENT_BASE
from teacher_service.placement import engine_gpus
from teacher_service.pool import vllm_options

from .errors import CacheError
from .fs import CacheLocation
from .identity import examples_fingerprint, model_identity
from .manifest import AddedRole, BuildHead, Manifest, load_manifest
from .plan import ShardInput, build_head, build_roles
from .shard import ShardInfo, ShardLayout, ShardSpec
from .stages import CachedIds, GatherStage, TopKStage, WriteShard
from .writer import CacheWriter, finished_shard

__all__ = ["build_cache", "add_role", "ADDABLE_ROLES"]

ADDABLE_ROLES = (ROLE_STUDENT_BASE,)

Progress = Callable[[str], None]


def _data_context(progress: bool) -> None:
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    ctx.print_on_execution_start = progress


def _stage_args(cfg: RunConfig, role: str) -> dict[str, Any]:
    """Actor options of a role's stage: its replicas, CPUs, GPUs and custom resources from `teachers`."""
    t = cfg.teachers
    opts: dict[str, Any] = {"compute": ray.data.ActorPoolStrategy(size=max(1, t.replicas.get(role, 1))),
                            "num_cpus": t.num_cpus, "num_gpus": t.num_gpus}
    if t.resources:
        opts["resources"] = dict(t.resources)
    return opts


def _one() -> Any:
    return ray.data.ActorPoolStrategy(size=1)


def _run(ds: Any, total: int, say: Progress) -> list[ShardInfo]:
    infos, tokens, t0 = [], 0, time.perf_counter()
    for row in ds.iter_rows():
        info = ShardInfo.from_json(json.loads(row["info"]))
        infos.append(info)
        tokens += info.num_tokens
        rate = tokens / max(time.perf_counter() - t0, 1e-9)
        say(f"shard {info.index} written ({len(infos)}/{total}; {tokens} counted tokens, {rate:.0f} tokens/s)")
    return infos


def _inputs(head: BuildHead, specs: list[ShardSpec], examples: list[Any]) -> Any:
    rows = [ShardInput.of(head, s, examples).to_row() for s in specs]
    return ray.data.from_items(rows, override_num_blocks=len(rows))  # one block (and one stage call) per shard


def build_cache(cfg: RunConfig, uri: str, *, encoding: str | None = None, progress: bool = True,
                say: Progress = print, faults: FaultPlan | None = None) -> tuple[Manifest, dict[str, Any]]:
    """Build (or finish) the teacher cache of `cfg` at `uri` on the connected Ray cluster.

    Returns (manifest, stats: shards written, tokens, seconds, tokens_per_s). A location holding a finished
    cache or a build of other settings is refused (CacheError); model paths must be resolved
    (`embedded:` paths built) before. faults: a test's FaultPlan (common/faults.py) for the engine stages."""
    check_tokenizers(cfg)  # tokenizer files only: no weights loaded yet
    ts = load_training_set(cfg)
    head = build_head(cfg, ts, encoding)
    writer = CacheWriter.open(uri, head)
    pending = writer.pending()
    say(f"teacher cache {writer.loc.display()}: {len(writer.specs) - len(pending)} of {len(writer.specs)} shards "
        f"already written; scoring {sum(s.end - s.start for s in pending)} examples in batches of "
        f"{head.scoring['batch']} (roles {list(head.role_names)}, encoding {head.encoding})")
    t0 = time.perf_counter()
    infos: list[ShardInfo] = []
    if pending:
        _data_context(progress)
        specs = teacher_role_specs(cfg)
        roles = build_roles(cfg)
        pair_base = lora_pair_base(cfg)  # a LoRA pair: the top-k stage scores base too, from the same weights
        paired = [ROLE_BASE] if pair_base is not None else []
        # a stage actor of teachers.num_gpus > 1 holds those GPUs (Ray Data places one actor on one node) and
        # its engine spreads over them, as a pool replica's does
        gpus = engine_gpus(cfg.teachers.num_gpus)
        common = dict(scoring=head.scoring, k=cfg.loss.k, tau=cfg.loss.tau, pad_id=ts.pad_id,
                      faults=faults, num_gpus=gpus)
        ds = _inputs(head, pending, ts.examples)
        ds = ds.map_batches(TopKStage, batch_size=1, batch_format="numpy", **_stage_args(cfg, ROLE_SFT),
                            fn_constructor_kwargs=dict(role=ROLE_SFT, spec=specs[ROLE_SFT].model_dump(),
                                                       engine=cfg.teachers.engine,
                                                       vllm_options={**vllm_options(cfg),
                                                                     "tensor_parallel_size": gpus}, paired=paired,
                                                       pair_base=None if pair_base is None else pair_base.model_dump(),
                                                       **common))
        for role in (r for r in roles[1:] if r not in paired):
            ds = ds.map_batches(GatherStage, batch_size=1, batch_format="numpy", **_stage_args(cfg, role),
                                fn_constructor_kwargs=dict(role=role, spec=specs[role].model_dump(), **common))
        ds = ds.map_batches(WriteShard, batch_size=1, batch_format="numpy", num_cpus=0.5, compute=_one(),
                            fn_constructor_kwargs=dict(uri=uri, layout=asdict(head.layout()), order=head.order,
                                                       shard_size=head.shard_size, num_examples=head.num_examples,
                                                       pad_id=ts.pad_id, wire_dtype=cfg.teachers.wire_dtype))
        infos = _run(ds, len(pending), say)
    seconds = time.perf_counter() - t0
    manifest = writer.finalize()
    tokens = sum(i.num_tokens for i in infos)
    stats = {"shards_written": len(infos), "tokens": tokens, "seconds": seconds,
             "tokens_per_s": tokens / seconds if infos and seconds > 0 else None}
    say(f"teacher cache {writer.loc.display()} complete: {manifest.num_tokens} counted tokens, "
        f"{manifest.num_bytes / max(manifest.num_tokens, 1):.1f} bytes/token on disk")
    return manifest, stats


def _role_key(role: str, identity: dict[str, Any], head: BuildHead) -> tuple[str, str]:
    """(folder key, build key) of an added role: the key names the model; the build key also ties it to this
    cache's build."""
    ident = json.dumps(identity, sort_keys=True)
    tag = (identity.get("fingerprint") or hashlib.sha256(ident.encode()).hexdigest())[:12]
    build_key = hashlib.sha256(f"{head.build_key}\0{role}\0{ident}".encode()).hexdigest()
    return f"{role}-{tag}", build_key


def add_role(cfg: RunConfig, uri: str, role: str = ROLE_STUDENT_BASE, student: ModelSpec | None = None, *,
             progress: bool = True, say: Progress = print,
             faults: FaultPlan | None = None) -> tuple[Manifest, dict[str, Any]]:
    """Score `role` (the student base: `student`, default models.student_base or models.student) at the ids of
    the finished cache at `uri`, write its shards and list it in the manifest. A cache may hold the role
    for several models (students of different sizes); adding one it holds already is a no-op."""
    if role not in ADDABLE_ROLES:
        raise CacheError(f"cannot add role {role!r}: only {list(ADDABLE_ROLES)} can be added to a cache")
    spec = student or cfg.models.student_base or cfg.models.student
    loc = CacheLocation(uri)
    manifest = load_manifest(loc)
    head = manifest.head
    if role in head.roles:
        raise CacheError(f"teacher cache {loc.display()} already stores role {role!r} in its shards")
    fp = tokenizer_fingerprint(spec)
    if fp != head.valid_for.get("tokenizer_fingerprint"):
        raise CacheError(f"model {spec.path}: its tokenizer differs from the cache's (fingerprint {fp[:12]}..., the "
                         f"cache's {str(head.valid_for.get('tokenizer_fingerprint'))[:12]}...)")
    identity = model_identity(spec)
    key, build_key = _role_key(role, identity, head)
    if any(a.key == key for a in manifest.added_roles):
        say(f"teacher cache {loc.display()} already holds role {role} of {spec.path} ({key})")
        return manifest, {"shards_written": 0, "tokens": 0, "seconds": 0.0, "tokens_per_s": None}
    ts = load_training_set(cfg)
    if examples_fingerprint(ts.examples) != head.valid_for["data"]["examples_sha256"]:
        raise CacheError(f"the config's tokenized training set differs from the one cache {loc.display()} was built "
                         "from (data.examples_sha256): use the config it was built with")
    folder = f"roles/{key}"
    specs = [ShardSpec(s.index, s.start, s.end, head.order is not None, folder) for s in head.specs()]
    pending = [s for s in specs if finished_shard(loc, s, build_key) is None]
    say(f"adding role {role} of {spec.path} to {loc.display()}: {len(specs) - len(pending)} of {len(specs)} "
        f"shards already written")
    t0 = time.perf_counter()
    infos: list[ShardInfo] = []
    scoring = dict(head.scoring, dtype=str(student_dtype(spec)).replace("torch.", ""))
    if pending:
        _data_context(progress)
        layout = ShardLayout(head.encoding, head.k, head.vocab_size, (role,), build_key)
        ds = _inputs(head, pending, ts.examples)
        ds = ds.map_batches(CachedIds, batch_size=1, batch_format="numpy", num_cpus=0.5, compute=_one(),
                            fn_constructor_kwargs=dict(uri=uri))
        ds = ds.map_batches(GatherStage, batch_size=1, batch_format="numpy", **_stage_args(cfg, ROLE_SFT),
                            fn_constructor_kwargs=dict(role=role, spec=spec.model_dump(), scoring=scoring,
                                                       k=head.k, tau=float(head.valid_for.get("tau", 1.0)),
                                                       pad_id=ts.pad_id, faults=faults,
                                                       num_gpus=engine_gpus(cfg.teachers.num_gpus)))
        ds = ds.map_batches(WriteShard, batch_size=1, batch_format="numpy", num_cpus=0.5, compute=_one(),
                            fn_constructor_kwargs=dict(uri=uri, layout=asdict(layout), order=head.order,
                                                       shard_size=head.shard_size, num_examples=head.num_examples,
                                                       pad_id=ts.pad_id, wire_dtype="float32", folder=folder,
                                                       components=[f"lp.{role}", f"tail.{role}"]))
        infos = _run(ds, len(pending), say)
    seconds = time.perf_counter() - t0
    done = [finished_shard(loc, s, build_key, verify=False) for s in specs]
    if any(d is None for d in done):
        raise CacheError(f"adding role {role} to {loc.display()}: shards {[s.index for s, d in zip(specs, done) if d is None]} "
                         "were not written")
    manifest = load_manifest(loc)  # reread: another add-role may have finished meanwhile
    manifest.added_roles = [a for a in manifest.added_roles if a.key != key] + [
        AddedRole(role, key, identity, [d for d in done if d is not None],
                  {"scoring_dtype": scoring["dtype"], "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})]
    manifest.write(loc)
    tokens = sum(i.num_tokens for i in infos)
    say(f"role {role} of {spec.path} added to {loc.display()} as {key}")
    return manifest, {"shards_written": len(infos), "tokens": tokens, "seconds": seconds,
                      "tokens_per_s": tokens / seconds if infos and seconds > 0 else None}
