"""vLLM's prompt log-probs -> the engine API's rows form, on hand-built data laid out exactly as vLLM lays
it out (vLLM cannot run here): `FlatLogprobs` (per position: the actual token with its rank, then the
top-k in rank order; `vllm/logprobs.py`) and the older list of dicts. Checked against a dense reference
at the counted rows, with and without `include` (the label forced into the support)."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

import numpy as np
import pytest

from teacher_service.engine_vllm import prompt_logprobs_block, rows_gather, rows_topk


@dataclass
class Logprob:  # the shape of vllm.logprobs.Logprob
    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:  # the fields of vllm.logprobs.FlatLogprobs that the converter reads
    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.start_indices)


def _vllm_prompt_logprobs(dense: np.ndarray, prompt: np.ndarray, width: int, flat: bool):
    """What vLLM returns for one prompt: dense [L, V] is the model's log-softmax after each token (our
    position t); vLLM's entry i+1 scores prompt token i+1 with dense[i]. Entry 0 is None."""
    out = FlatLogprobs() if flat else []
    if flat:
        out.start_indices.append(0)
        out.end_indices.append(0)
    else:
        out.append(None)
    for i in range(len(prompt) - 1):
        lp = dense[i]
        order = np.argsort(-lp, kind="stable")
        actual = int(prompt[i + 1])
        rank_actual = int(np.nonzero(order == actual)[0][0]) + 1
        pairs = [(actual, rank_actual)] + [(int(tok), r + 1) for r, tok in enumerate(order[:width])]
        if flat:  # append_fast: no de-duplication, the actual token first
            out.start_indices.append(len(out.logprobs))
            for tok, r in pairs:
                out.token_ids.append(tok)
                out.logprobs.append(float(lp[tok]))
                out.ranks.append(r)
            out.end_indices.append(len(out.logprobs))
        else:  # dict: the actual token's entry first, a repeat collapses
            out.append({tok: Logprob(float(lp[tok]), r) for tok, r in pairs})
    return out


def _case(seed: int = 0, b: int = 3, t: int = 9, v: int = 40):
    rng = np.random.default_rng(seed)
    lengths = np.array([t, t - 3, t - 1])[:b]
    input_ids = np.zeros((b, t), dtype=np.int64)
    dense = np.zeros((b, t, v))
    for i in range(b):
        input_ids[i, : lengths[i]] = rng.integers(0, v, lengths[i])
        logits = rng.normal(size=(t, v)) * 3
        dense[i] = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    # counted rows: some positions with a next token (never the last token of a sequence)
    rows = np.array(sorted([0 * t + 1, 0 * t + 4, 0 * t + t - 2, 1 * t + 0, 1 * t + lengths[1] - 2, 2 * t + 3]))
    return input_ids, lengths, dense, rows


@pytest.mark.parametrize("flat", [True, False], ids=["flat", "dicts"])
@pytest.mark.parametrize("include", [False, True], ids=["topk", "include-label"])
@pytest.mark.parametrize("from_first_row", [False, True], ids=["all-positions", "from-first-counted"])
def test_rows_topk_equals_dense_reference(flat: bool, include: bool, from_first_row: bool) -> None:
    input_ids, lengths, dense, rows = _case()
    b_, t_ = input_ids.shape
    v, k = dense.shape[-1], 5
    width = k + 1 if include else k
    starts = np.zeros(b_, dtype=np.int64)
    if from_first_row:  # what the engine does: convert each request from its first counted position on
        starts = np.array([min(r % t_ for r in rows if r // t_ == i) for i in range(b_)])
        assert starts.max() > 0
    blocks = [prompt_logprobs_block(_vllm_prompt_logprobs(dense[i], input_ids[i, : lengths[i]], width, flat),
                                    input_ids[i, 1: lengths[i]], width, int(starts[i])) for i in range(b_)]
    ids, lps, tail = rows_topk(blocks, rows, lengths, t_, k, include, v, starts)
    assert ids.dtype == np.int32 and lps.dtype == np.float32 and tail.dtype == np.float32
    assert ids.shape == (len(rows), width) and tail.shape == (len(rows),)
    bb, tt = np.divmod(rows, t_)
    ref = dense[bb, tt]                                   # [N, V]
    order = np.argsort(-ref, axis=-1, kind="stable")
    np.testing.assert_array_equal(ids[:, :k], order[:, :k])
    if include:
        label = input_ids[bb, tt + 1]
        in_top = (order[:, :k] == label[:, None]).any(1)
        np.testing.assert_array_equal(ids[:, k], np.where(in_top, order[:, k], label))
        assert (ids == label[:, None]).any(1).all()                                  # label always in the support
        assert all(len(set(r)) == width for r in ids.tolist())                       # K distinct ids
    np.testing.assert_allclose(lps, np.take_along_axis(ref, ids.astype(np.int64), -1), atol=1e-6)
    np.testing.assert_allclose(tail, 1 - np.exp(np.take_along_axis(ref, ids.astype(np.int64), -1)).sum(-1),
                               atol=1e-6)


def test_include_covers_label_inside_and_outside_the_topk() -> None:
    input_ids, lengths, dense, rows = _case(seed=3)
    bb, tt = np.divmod(rows, input_ids.shape[1])
    label = input_ids[bb, tt + 1]
    dense[bb[0], tt[0], label[0]] = -1e-3  # make row 0's label the top-1 (log-probs need not renormalise here)
    dense[bb[1], tt[1], label[1]] = -50.0  # and row 1's far outside the top-k
    blocks = [prompt_logprobs_block(_vllm_prompt_logprobs(dense[i], input_ids[i, : lengths[i]], 4, True),
                                    input_ids[i, 1: lengths[i]], 4) for i in range(len(lengths))]
    ids, _, _ = rows_topk(blocks, rows, lengths, input_ids.shape[1], 3, True, dense.shape[-1])
    assert ids[0, 0] == label[0] and ids[0, 3] != label[0]  # inside: the 4th slot is the 4th best id
    assert ids[1, 3] == label[1]                             # outside: the 4th slot is the label


def test_conversion_errors_are_clear() -> None:
    input_ids, lengths, dense, rows = _case()
    t_ = input_ids.shape[1]
    plp = _vllm_prompt_logprobs(dense[0], input_ids[0], 3, True)
    with pytest.raises(ValueError, match=r"position 0: 4 entries, expected 6.*max_logprobs"):
        prompt_logprobs_block(plp, input_ids[0, 1:], 5)
    dicts = _vllm_prompt_logprobs(dense[0], input_ids[0], 3, False)
    dicts[2] = None
    with pytest.raises(ValueError, match="position 1: no log-probs"):
        prompt_logprobs_block(dicts, input_ids[0, 1:], 3)
    blocks = [prompt_logprobs_block(_vllm_prompt_logprobs(dense[i], input_ids[i, : lengths[i]], 3, True),
                                    input_ids[i, 1: lengths[i]], 3) for i in range(3)]
    last = np.array([1 * t_ + lengths[1] - 1])  # the last token of a sequence has no next token
    with pytest.raises(ValueError, match=r"row .* has no next token"):
        rows_topk(blocks, last, lengths, t_, 3, False, dense.shape[-1])
    with pytest.raises(ValueError, match=r"outside the tokenizer's vocabulary \[0, 10\).*vocab_cut"):
        rows_topk(blocks, rows, lengths, t_, 3, False, 10)  # ids of padded rows: the checkpoint was not cut


def test_rows_gather_at_given_ids() -> None:
    input_ids, lengths, dense, rows = _case(seed=5)
    t_ = input_ids.shape[1]
    bb, tt = np.divmod(rows, t_)
    rng = np.random.default_rng(1)
    want = rng.integers(0, dense.shape[-1], size=(len(rows), 6))
    want[0, 1] = want[0, 0]  # a repeated id counts once in the tail
    scored = []
    for i in range(len(lengths)):  # vLLM's answer: per position, the actual token + the requested ids
        n_pos = lengths[i] - 1
        e_ids = np.full((n_pos, 7), -1)
        e_lps = np.zeros((n_pos, 7), dtype=np.float32)
        for n in np.nonzero(bb == i)[0]:
            ent = [int(input_ids[i, tt[n] + 1]), *[int(x) for x in want[n][::-1]]]  # any order
            e_ids[tt[n], : len(ent)] = ent
            e_lps[tt[n], : len(ent)] = dense[i, tt[n], ent]
        scored.append((e_ids, e_lps))
    lps, tail = rows_gather(scored, rows, lengths, t_, want)
    np.testing.assert_allclose(lps, dense[bb[:, None], tt[:, None], want], atol=1e-6)
    for n in range(len(rows)):
        expect = 1 - np.exp(dense[bb[n], tt[n], np.unique(want[n])]).sum()
        assert abs(tail[n] - expect) < 1e-6
    missing = want.copy()
    missing[2, 3] = -7
    with pytest.raises(ValueError, match=rf"row {rows[2]}: id -7 was not scored"):
        rows_gather(scored, rows, lengths, t_, missing)


def test_vllm_is_not_imported_by_the_package() -> None:
    import teacher_service  # noqa: F401
    import teacher_service.engine_vllm  # noqa: F401

    assert "vllm" not in sys.modules
