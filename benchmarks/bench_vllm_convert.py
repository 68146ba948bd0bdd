"""vLLM prompt log-probs -> the engine API's rows form: time per batch on outputs shaped as vLLM gives them.

vLLM cannot run here (no GPU); its outputs are built the way `vllm/logprobs.py` lays them out:
`FlatLogprobs` (flat columns per request; per position the actual token, then the top-k by rank),
requested with `SamplingParams(flat_logprobs=True)` where the installed vLLM has it: its columns are Python
lists in some releases ("flat") and numpy arrays in others ("flat_numpy"); and the older list of
`dict[token_id, Logprob]` ("dicts"). Timed: `prompt_logprobs_block` per request + `rows_topk` over the batch's
counted rows, i.e. everything the engine does between `llm.generate` returning and the tensors it hands
on (the host -> GPU copy excluded).

    target: flat form, B = 8, T = 512, k = 64 (all positions counted)  <= 10 ms per batch
    (also timed: only the second half of each sequence counted, as for responses, and K = k + 1 with the
    label forced into the support)

    python benchmarks/bench_vllm_convert.py [--smoke] [--repeats N]
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from _common import Target, base_parser, print_table, summarize, time_repeats, write_result

from teacher_service.engine_vllm import prompt_logprobs_block, rows_topk

QWEN2_VOCAB = 151_646
TARGET_S = 0.010


@dataclass
class Logprob:  # vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:  # the fields of vllm.logprobs.FlatLogprobs, Python lists as vLLM fills them
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: Any = field(default_factory=list)  # a list, or a numpy column in newer vLLM
    logprobs: Any = field(default_factory=list)
    ranks: Any = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.start_indices)


def make_outputs(batch: int, seq: int, width: int, form: str, seed: int = 0) -> tuple[list[Any], np.ndarray]:
    """One batch's prompt log-probs (every sequence `seq` tokens) and the input ids [B, T]."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, QWEN2_VOCAB, size=(batch, seq))
    outs: list[Any] = []
    n_pos = seq - 1
    for b in range(batch):
        actual = input_ids[b, 1:]
        top = (actual[:, None] + 1 + 7 * np.arange(width)) % QWEN2_VOCAB  # distinct, never the actual token
        top_lp = -np.cumsum(rng.exponential(0.3, size=(n_pos, width)), axis=1)
        act_lp = top_lp[:, -1] - rng.exponential(1.0, size=n_pos)
        ids = np.concatenate([actual[:, None], top], 1)
        lps = np.concatenate([act_lp[:, None], top_lp], 1)
        ranks = np.concatenate([np.full((n_pos, 1), width + 5), np.tile(np.arange(1, width + 1), (n_pos, 1))], 1)
        if form in ("flat", "flat_numpy"):
            f = FlatLogprobs()
            f.start_indices = [0] + list(range(0, n_pos * (width + 1), width + 1))
            f.end_indices = [0] + list(range(width + 1, n_pos * (width + 1) + 1, width + 1))
            if form == "flat":
                f.token_ids, f.logprobs = ids.ravel().tolist(), lps.ravel().tolist()
                f.ranks = ranks.ravel().tolist()
            else:  # numpy columns in the engine's dtypes (int32 ids, float32 log-probs)
                f.token_ids, f.logprobs = ids.ravel().astype(np.int32), lps.ravel().astype(np.float32)
                f.ranks = ranks.ravel().astype(np.int32)
            f.decoded_tokens = [None] * ids.size
            outs.append(f)
        else:
            plp: list[Any] = [None]
            for p in range(n_pos):
                plp.append({int(t): Logprob(float(v), int(r)) for t, v, r in zip(ids[p], lps[p], ranks[p])})
            outs.append(plp)
    return outs, input_ids


def convert(outs: list[Any], input_ids: np.ndarray, rows: np.ndarray, k: int, width: int, include: bool
            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What VLLMEngine.topk does after generate: each request converted from its first counted position."""
    seq = input_ids.shape[1]
    lengths = np.full(len(outs), seq)
    starts = np.full(len(outs), seq - 1)
    np.minimum.at(starts, rows // seq, rows % seq)
    blocks = [prompt_logprobs_block(o, input_ids[i, 1:], width, int(starts[i])) for i, o in enumerate(outs)]
    return rows_topk(blocks, rows, lengths, seq, k, include, QWEN2_VOCAB, starts)


def main(argv: list[str] | None = None) -> int:
    p = base_parser(__doc__ or "")
    args = p.parse_args(argv)
    batch, seq, k = (2, 64, 8) if args.smoke else (8, 512, 64)
    repeats = 1 if args.smoke else args.repeats
    all_rows = np.array([b * seq + t for b in range(batch) for t in range(seq - 1)])
    half_rows = np.array([b * seq + t for b in range(batch) for t in range(seq // 2, seq - 1)])
    figures: dict[str, Any] = {"batch": batch, "seq": seq, "k": k, "cells": {}}
    table = []
    for form in ("flat", "flat_numpy", "dicts"):
        for include in (False, True):
            width = k + 1 if include else k
            outs, input_ids = make_outputs(batch, seq, width, form)
            for label, rows in (("all", all_rows), ("half", half_rows)):
                times = time_repeats(functools.partial(convert, outs, input_ids, rows, k, width, include), repeats)
                name = f"{form}_{'include' if include else 'topk'}_{label}"
                figures["cells"][name] = {"seconds": summarize(times), "rows": int(len(rows))}
                table.append([form, "k+1 (label)" if include else "k", label, len(rows),
                              f"{1e3 * summarize(times)['median']:.1f}"])
    print_table(["form", "K", "rows counted", "N", "ms/batch (median)"], table,
                title=f"vLLM conversion, B={batch}, T={seq}, k={k}")
    targets = []
    for form in ("flat", "flat_numpy"):
        ms = figures["cells"][f"{form}_topk_all"]["seconds"]["median"]
        targets.append(Target(f"{form} FlatLogprobs -> rows, B=8 T=512 k=64, seconds per batch",
                              None if args.smoke else ms, "<=", TARGET_S,
                              "smoke sizes are not the target's" if args.smoke else ""))
    write_result("bench_vllm_convert", args, figures, targets,
                 notes=["outputs built as vLLM lays them out; vLLM itself not run (no GPU here)"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
