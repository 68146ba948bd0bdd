"""vLLM prompt-logprob conversion on hand-built data shaped as vLLM documents it (vLLM cannot run here)."""

from __future__ import annotations

import sys
from dataclasses import dataclass

import numpy as np
import pytest

from teacher_service.engine_vllm import prompt_logprobs_to_topk


@dataclass
class Logprob:  # the shape of vllm.sequence.Logprob
    logprob: float
    rank: int
    decoded_token: str | None = None


def _dist(rng: np.random.Generator, v: int) -> np.ndarray:
    return np.log(rng.dirichlet(np.full(v, 0.3)))


def _vllm_entry(lp: np.ndarray, k: int, actual: int) -> dict[int, Logprob]:
    order = np.argsort(-lp, kind="stable")
    entry = {int(tok): Logprob(float(lp[tok]), r + 1) for r, tok in enumerate(order[:k])}
    rank_actual = int(np.nonzero(order == actual)[0][0]) + 1
    entry.setdefault(actual, Logprob(float(lp[actual]), rank_actual))  # the extra actual-token entry
    return entry


def test_conversion_matches_dense_topk_and_drops_actual_token() -> None:
    rng = np.random.default_rng(0)
    v, k, t = 30, 5, 6
    dense = np.stack([_dist(rng, v) for _ in range(t)])
    actual = np.argsort(dense, axis=-1)[:, 0]  # the least likely token: always outside the top-k
    positions = [_vllm_entry(dense[i], k, int(actual[i])) for i in range(t)]
    assert all(len(p) == k + 1 for p in positions)
    positions = [dict(reversed(list(p.items()))) for p in positions]  # dict order must not matter
    ids, lps, tail = prompt_logprobs_to_topk(positions, k, 1.0, vocab_size=v)
    ref_ids = np.argsort(-dense, axis=-1, kind="stable")[:, :k]
    np.testing.assert_array_equal(ids, ref_ids)
    np.testing.assert_allclose(lps, np.take_along_axis(dense, ref_ids, -1), atol=1e-6)
    np.testing.assert_allclose(tail, 1 - np.exp(np.take_along_axis(dense, ref_ids, -1)).sum(-1), atol=1e-6)
    assert ids.dtype == np.int32 and lps.dtype == np.float32 and tail.dtype == np.float32


def test_conversion_errors_are_clear() -> None:
    rng = np.random.default_rng(1)
    entry = _vllm_entry(_dist(rng, 10), 3, 0)
    with pytest.raises(ValueError, match="tau=1 only"):
        prompt_logprobs_to_topk([entry], 3, 2.0)
    with pytest.raises(ValueError, match="position 0: no logprobs"):
        prompt_logprobs_to_topk([None, entry], 3)
    with pytest.raises(ValueError, match="max_logprobs"):
        prompt_logprobs_to_topk([entry], 9)
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        prompt_logprobs_to_topk([{12: Logprob(-0.1, 1)}], 1, vocab_size=10)


def test_vllm_is_not_imported_by_the_package() -> None:
    import teacher_service  # noqa: F401
    import teacher_service.engine_vllm  # noqa: F401

    assert "vllm" not in sys.modules
