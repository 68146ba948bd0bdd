"""What a build of a run's teacher cache scores, in which batches, and the head that defines it.

Batching (why the build replays the run's batch plan): on this project's CPU, an example's teacher
log-probs differ by up to 1e-6 between being scored alone and inside a right-padded batch (attention sums
over the batch's padded length T, and the LM head's matmul depends on its row count), while an example
padded to the same T inside another batch is bitwise equal (benchmarks/bench_cache.py, batch_invariance).
So a cache is bit-identical to live teachers only for records scored in the live run's own batches. A
build therefore scores the run's epoch-0 batches exactly (BatchPlan.build_order: its per-rank batches in
step and rank order, then the examples epoch 0 drops), each padded as `collate` pads it, and `auto`'s
write-through stores the live epoch-0 records themselves: both give the same bytes (with the fp32
encoding), and a run from the cache reproduces the live run's metrics rows bit for bit over its first epoch.
Later epochs batch the examples differently; there the cache serves the epoch-0 values, which differ from
what live teachers would compute by the padding effect (max |d log p| ~1e-6 here), plus the encoding's
rounding with a compact encoding.

Shards hold whole batches: shard_size is rounded up to a multiple of the per-rank batch b, so shard i holds
build batches i * shard_size / b .. and a build stage scores one shard at a time in exactly those batches.
"""

from __future__ import annotations

import math
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from common.config import RunConfig
from common.data.batching import TokenizedExample, collate
from common.roles import teacher_role_specs
from common.topk import ROLE_STUDENT_BASE, rows_from_mask

from .identity import examples_fingerprint, run_roles, run_valid_for
from .manifest import BuildHead
from .shard import ShardSpec

__all__ = ["build_roles", "build_head", "shard_batches", "ShardInput", "batch_inputs", "git_sha"]


def build_roles(cfg: RunConfig) -> list[str]:
    """The roles a build stores: every teacher role of the config (sft first, base, extra pairs), never
    `student_base` (student-specific: `cache add-role` adds it)."""
    return [r for r in teacher_role_specs(cfg) if r != ROLE_STUDENT_BASE]


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def build_head(cfg: RunConfig, train_set: Any, encoding: str | None = None) -> BuildHead:
    """The head of the build of this run's cache (`train_set`: common.data.batching.TrainingSet).

    valid_for: the run's settings and data (identity.run_valid_for, k = loss.k); roles: each stored role's
    model identity; order: the plan's build order; scoring: the plan and how the teachers score (resume and
    `auto` write-through must agree on them).
    """
    enc = encoding or cfg.teachers.cache.encoding
    plan = train_set.plan
    b = plan.per_rank_batch
    shard_size = int(math.ceil(cfg.teachers.cache.shard_size / b) * b)
    roles = build_roles(cfg)
    t, d = cfg.teachers, cfg.data
    scoring = {
        "plan": {"batch_size": plan.global_batch_size, "num_workers": plan.num_workers, "seed": plan.seed,
                 "shuffle": plan.shuffle, "length_buckets": plan.length_buckets},
        "batch": b, "wire_dtype": t.wire_dtype, "chunk_tokens": t.score_chunk_rows, "dtype": t.dtype,
        "device": t.device, "sft_engine": t.engine,
        "compute": cfg.reproducibility.model_dump(mode="json"),
    }
    valid_for = run_valid_for(cfg, tokenizer_fingerprint=train_set.tokenizer_fingerprint,
                              vocab_size=train_set.vocab_size, examples_sha256=examples_fingerprint(train_set.examples),
                              num_examples=len(train_set.examples), encoding=enc)
    build = {"git_sha": git_sha(), "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "data_train": d.train}
    return BuildHead(valid_for, run_roles(cfg, roles), enc, int(cfg.loss.k), int(train_set.vocab_size),
                     len(train_set.examples), shard_size, build, plan.build_order(), scoring)


def shard_batches(head: BuildHead, spec: ShardSpec) -> list[list[int]]:
    """The build batches of shard `spec`: consecutive chunks of scoring["batch"] of its examples."""
    ex = head.shard_examples(spec)
    b = int(head.scoring.get("batch") or len(ex) or 1)
    return [ex[i: i + b] for i in range(0, len(ex), b)]


@dataclass
class ShardInput:
    """One shard's tokens, as a build stage receives them (flat arrays: stage rows travel as bytes).

    examples [E] int64 (stored order), lengths [E] int32, prompt_lens [E] int32, tokens [sum lengths] int32,
    batch [E // b] the build batches' sizes."""

    shard: int
    examples: np.ndarray
    lengths: np.ndarray
    prompt_lens: np.ndarray
    tokens: np.ndarray
    batches: np.ndarray

    def to_row(self) -> dict[str, Any]:
        return {"shard": self.shard, "examples": self.examples.astype(np.int64).tobytes(),
                "lengths": self.lengths.astype(np.int32).tobytes(),
                "prompt_lens": self.prompt_lens.astype(np.int32).tobytes(),
                "tokens": self.tokens.astype(np.int32).tobytes(), "batches": self.batches.astype(np.int32).tobytes()}

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> ShardInput:
        return cls(int(row["shard"]), np.frombuffer(row["examples"], np.int64), np.frombuffer(row["lengths"], np.int32),
                   np.frombuffer(row["prompt_lens"], np.int32), np.frombuffer(row["tokens"], np.int32),
                   np.frombuffer(row["batches"], np.int32))

    @classmethod
    def of(cls, head: BuildHead, spec: ShardSpec, examples: list[Any]) -> ShardInput:
        """`examples`: the tokenized training set (TokenizedExample: input_ids, prompt_len)."""
        batches = shard_batches(head, spec)
        idx = [e for batch in batches for e in batch]
        toks = [examples[i] for i in idx]
        return cls(spec.index, np.asarray(idx, np.int64), np.asarray([len(e.input_ids) for e in toks], np.int32),
                   np.asarray([e.prompt_len for e in toks], np.int32),
                   np.concatenate([np.asarray(e.input_ids, np.int32) for e in toks]) if toks else np.zeros(0, np.int32),
                   np.asarray([len(bt) for bt in batches], np.int32))


def batch_inputs(inp: ShardInput, pad_id: int) -> list[dict[str, Any]]:
    """The shard's build batches as the live pool sends them: input_ids int32, attention_mask int32 [B, T]
    (`collate`, T = the batch's longest), rows int32 [N] (rows_from_mask of the loss mask), plus examples,
    lengths and the batch shape."""
    ends = np.cumsum(inp.lengths)
    starts = ends - inp.lengths
    out, at = [], 0
    for size in inp.batches.tolist():
        sl = slice(at, at + size)
        exs = [TokenizedExample(inp.tokens[s:e].tolist(), int(p))
               for s, e, p in zip(starts[sl], ends[sl], inp.prompt_lens[sl])]
        a = collate(exs, pad_id)
        out.append({"input_ids": np.ascontiguousarray(a["input_ids"], dtype=np.int32),
                    "attention_mask": np.ascontiguousarray(a["attention_mask"], dtype=np.int32),
                    "rows": rows_from_mask(a["loss_mask"]), "shape": a["input_ids"].shape,
                    "examples": inp.examples[sl].tolist(), "lengths": inp.lengths[sl].tolist()})
        at += size
    return out
