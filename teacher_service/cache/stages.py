"""The stages of a cache build's Ray Data pipeline (teacher_service/cache/build.py); each gets one shard per call.

A row is one shard (plan.ShardInput's fields, as bytes) and gains columns stage by stage, all flat fp32 /
int32 bytes over the shard's rows in stored order (example by example, positions ascending, which is also
the concatenation of its build batches' rows):

    TopKStage    (actor pool of the SFT role)      + ids, lp.sft, tail.sft (+ lp.base, tail.base: a LoRA pair)
    CachedIds    (task; `add-role`)                + ids, read from the finished cache's shard
    GatherStage  (actor pool per gathering role)   + lp.<role>, tail.<role> at those ids
    WriteShard   (task)                            -> shard, info (the ShardInfo as JSON), tokens

Each stage actor builds its engine as a teacher actor does (same device, dtype, LM head chunking and compute
settings) and calls it with the arrays the live pool sends, so a batch scored here equals the live record.
Log-probs are rounded to the run's wire dtype, as the live path does. A stage holds no state between
shards: Ray Data may retry a shard on a restarted actor and gets the same bytes.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from common.config import ModelSpec
from common.faults import FaultPlan
from common.reproducibility import apply_compute_settings
from common.topk import MASS_EPS
from teacher_service.actor import TORCH_WIRE_DTYPES, make_engine

from .encoded import read_shard
from .fs import CacheLocation
from .manifest import load_manifest
from .plan import ShardInput, batch_inputs
from .records import split_batch
from .shard import ShardLayout, ShardSpec, write_shard

__all__ = ["TopKStage", "GatherStage", "CachedIds", "WriteShard", "INPUT_FIELDS"]

INPUT_FIELDS = ("shard", "examples", "lengths", "prompt_lens", "tokens", "batches")


def _rows(batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Ray Data's numpy batch -> one dict per row."""
    n = len(batch["shard"])
    return [{k: v[i] for k, v in batch.items()} for i in range(n)]


def _batch(rows: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    keys = list(rows[0])
    out: dict[str, np.ndarray] = {}
    for k in keys:
        vals = [r[k] for r in rows]
        out[k] = np.array(vals, dtype=object) if isinstance(vals[0], bytes | bytearray) else np.asarray(vals)
    return out


def _wire_fp32(lp: Any, wire_dtype: str) -> np.ndarray:
    """fp32 log-probs as the live record carries them: rounded to the wire dtype and back (exact)."""
    return lp.to(TORCH_WIRE_DTYPES[wire_dtype]).float().cpu().numpy()


class _EngineStage:
    """Shared set-up: compute settings, then the role's engine (teacher_service.actor.make_engine)."""

    def __init__(self, role: str, spec: dict[str, Any], scoring: dict[str, Any], k: int, tau: float, pad_id: int,
                 engine: str = "hf", vllm_options: dict[str, Any] | None = None, faults: FaultPlan | None = None,
                 pair_base: dict[str, Any] | None = None, paired: list[str] | tuple[str, ...] = (),
                 num_gpus: int = 1):
        apply_compute_settings(scoring.get("compute"), where=f"cache build {role}")
        self.role, self.k, self.tau, self.pad_id = role, int(k), float(tau), int(pad_id)
        self.wire = str(scoring.get("wire_dtype", "float32"))
        self.faults = faults  # a test's FaultPlan (common/faults.py): teacher_delay_s per batch, the stage hold
        self.engine = make_engine(role, ModelSpec.model_validate(spec), engine, str(scoring.get("device", "auto")),
                                  str(scoring.get("dtype", "auto")), int(scoring.get("chunk_tokens", 1024)),
                                  vllm_options, num_gpus,
                                  None if pair_base is None else ModelSpec.model_validate(pair_base))
        self.paired = list(paired)  # TopKStage of a LoRA pair: roles it scores itself at its own support
        self.scored = 0  # shards this actor has started scoring (a FaultPlan's stage hold counts them)

    def _sleep(self) -> None:
        if self.faults is not None:
            self.faults.teacher_call()


class TopKStage(_EngineStage):
    """The SFT role's top-k of every build batch of the shard (and, for a LoRA pair, its `paired` roles at
    that support, from the same engine: the pool's `pair_gather`)."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for row in _rows(batch):
            inp = ShardInput.from_row(row)
            if self.faults is not None:
                self.faults.shard_start(self.scored)
            self.scored += 1
            ids: list[np.ndarray] = []
            lps: dict[str, list[np.ndarray]] = {r: [] for r in [self.role, *self.paired]}
            tails: dict[str, list[np.ndarray]] = {r: [] for r in lps}
            for j, b in enumerate(batch_inputs(inp, self.pad_id)):
                self._sleep()
                batch_id = f"cache-shard-{inp.shard}-batch-{j}"
                i_t, lp_t, tail_t = self.engine.topk(b["input_ids"], b["attention_mask"], b["rows"], self.k, self.tau,
                                                     batch_id=batch_id)
                parts = {self.role: (lp_t, tail_t)}
                for r in self.paired:
                    parts[r] = self.engine.gather(b["input_ids"], b["attention_mask"], b["rows"], i_t, self.tau,
                                                  batch_id=batch_id, role=r)
                ids.append(np.asarray(i_t.cpu().numpy(), dtype=np.int32))
                for r, (lp_r, tail_r) in parts.items():
                    lps[r].append(_wire_fp32(lp_r, self.wire))
                    tails[r].append(tail_r.float().cpu().numpy())
            width = ids[0].shape[1] if ids else self.k
            cols = {f"{c}.{r}": np.concatenate(v[r]).astype(np.float32).tobytes()
                    for c, v in (("lp", lps), ("tail", tails)) for r in lps}
            out.append({**row, "width": width, "ids": np.concatenate(ids).astype(np.int32).tobytes(), **cols})
        return _batch(out)


class GatherStage(_EngineStage):
    """A gathering role (base, base_j, sft_j, student_base) at the support of every build batch."""

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for row in _rows(batch):
            inp = ShardInput.from_row(row)
            width = int(row["width"])
            ids = np.frombuffer(row["ids"], np.int32).reshape(-1, width)
            lps, tails, at = [], [], 0
            for j, b in enumerate(batch_inputs(inp, self.pad_id)):
                n = int(b["rows"].size)
                self._sleep()
                lp_t, tail_t = self.engine.gather(b["input_ids"], b["attention_mask"], b["rows"],
                                                  np.ascontiguousarray(ids[at: at + n]), self.tau,
                                                  batch_id=f"cache-shard-{inp.shard}-batch-{j}")
                lps.append(_wire_fp32(lp_t, self.wire))
                tails.append(tail_t.float().cpu().numpy())
                at += n
            if at != ids.shape[0]:
                raise ValueError(f"shard {inp.shard}: the batches have {at} counted rows, the support {ids.shape[0]}")
            out.append({**row, f"lp.{self.role}": np.concatenate(lps).astype(np.float32).tobytes(),
                        f"tail.{self.role}": np.concatenate(tails).astype(np.float32).tobytes()})
        return _batch(out)


class CachedIds:
    """`add-role`: the support ids of each shard, read (and checked) from the finished cache."""

    def __init__(self, uri: str):
        self.loc = CacheLocation(uri)
        self.manifest = load_manifest(self.loc)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        head = self.manifest.head
        out = []
        for row in _rows(batch):
            info = self.manifest.shards[int(row["shard"])]
            spec = info.spec(head.order is not None)
            shard = read_shard(self.loc, info, head.layout(), roles=[], expected=head.shard_examples(spec),
                               ordered=head.order is not None)
            out.append({**row, "width": int(shard.ids.shape[1]), "ids": shard.ids.astype(np.int32).tobytes()})
        return _batch(out)


class WriteShard:
    """Cut each shard's rows into ExampleRecords (mass checked at the wire dtype's tolerance) and write it.

    layout: the roles this file stores (an added role's: that role alone, components without "ids");
    folder: "" for the main shards, "roles/<key>" for an added role."""

    def __init__(self, uri: str, layout: dict[str, Any], order: list[int] | None, shard_size: int, num_examples: int,
                 pad_id: int, wire_dtype: str, folder: str = "", components: list[str] | None = None):
        self.loc = CacheLocation(uri)
        self.layout = ShardLayout(layout["encoding"], int(layout["k"]), int(layout["vocab_size"]),
                                  tuple(layout["roles"]), layout["build_key"])
        self.order, self.shard_size, self.num_examples = order, int(shard_size), int(num_examples)
        self.pad_id, self.mass_eps = int(pad_id), MASS_EPS[wire_dtype]
        self.folder, self.components = folder, components

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = []
        for row in _rows(batch):
            inp = ShardInput.from_row(row)
            width = int(row["width"])
            ids = np.frombuffer(row["ids"], np.int32).reshape(-1, width)
            lps = {r: np.frombuffer(row[f"lp.{r}"], np.float32).reshape(-1, width) for r in self.layout.roles}
            tails = {r: np.frombuffer(row[f"tail.{r}"], np.float32) for r in self.layout.roles}
            records, at = [], 0
            for b in batch_inputs(inp, self.pad_id):
                s = slice(at, at + int(b["rows"].size))
                records += split_batch(b["examples"], b["lengths"], b["rows"], b["shape"], ids[s],
                                       {r: v[s] for r, v in lps.items()}, {r: v[s] for r, v in tails.items()})
                at = s.stop
            for rec in records:
                rec.check(mass_eps=self.mass_eps)
            start = inp.shard * self.shard_size
            spec = ShardSpec(inp.shard, start, min(start + self.shard_size, self.num_examples),
                             self.order is not None, self.folder)
            info = write_shard(self.loc, spec, records, self.layout, inp.examples.tolist(), self.components)
            out.append({"shard": inp.shard, "info": json.dumps(info.to_json()), "tokens": info.num_tokens})
        return _batch(out)
