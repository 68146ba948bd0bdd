"""teacher_service.cache.records: a batch's rows-form teacher output split into per-example records and
assembled back into any batching (rows = b * T + t, docs/ARCHITECTURE.md)."""

from __future__ import annotations

import numpy as np
import pytest

from common.topk import TopKRecord
from teacher_service.cache import CacheError, ExampleRecord, assemble_batch, encoding_mass_eps, split_batch


def batch_output(lengths, prompt_lens, vocab=40, k=6, roles=("sft", "base"), seed=0, pad_to=None):
    """A batch padded to T with its counted rows (response positions) and teacher output at those rows,
    built from random dense log-probs: the SFT role's top-k, every role gathered there, tails the rest."""
    rng = np.random.default_rng(seed)
    bsz, seq = len(lengths), pad_to or max(lengths)
    mask = np.zeros((bsz, seq), dtype=bool)
    for b, (n, p) in enumerate(zip(lengths, prompt_lens)):
        mask[b, p - 1: n - 1] = True  # position t predicts token t + 1, a response token
    rows = np.flatnonzero(mask).astype(np.int32)
    dense = {}
    for r in roles:
        x = rng.normal(size=(rows.size, vocab)) * 3
        dense[r] = (x - np.log(np.exp(x).sum(-1, keepdims=True))).astype(np.float32)
    ids = np.argsort(-dense["sft"], axis=-1, kind="stable")[:, :k].astype(np.int32)
    lp = {r: np.take_along_axis(d, ids, -1) for r, d in dense.items()}
    tail = {r: np.clip(1 - np.exp(lp[r].astype(np.float64)).sum(-1), 0, 1).astype(np.float32) for r in roles}
    return rows, (bsz, seq), ids, lp, tail


def make_examples(num, vocab=40, k=6, roles=("sft", "base"), seed=0, first=0):
    """`num` ExampleRecords (examples first .. first + num - 1) of random lengths 5..19."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(5, 20, size=num).tolist()
    prompt_lens = [int(rng.integers(2, n - 1)) for n in lengths]
    rows, shape, ids, lp, tail = batch_output(lengths, prompt_lens, vocab, k, roles, seed)
    return split_batch(list(range(first, first + num)), lengths, rows, shape, ids, lp, tail)


def test_split_gives_each_example_its_own_positions():
    lengths, prompts = [7, 12, 5], [3, 4, 2]
    rows, shape, ids, lp, tail = batch_output(lengths, prompts)
    exs = split_batch([10, 11, 12], lengths, rows, shape, ids, lp, tail)
    assert [e.example for e in exs] == [10, 11, 12]
    for e, n, p in zip(exs, lengths, prompts):
        np.testing.assert_array_equal(e.t, np.arange(p - 1, n - 1))
        assert e.length == n and e.ids.shape == (n - p, 6)


@pytest.mark.parametrize("pad_to", [None, 25])
def test_split_then_assemble_is_the_identity(pad_to):
    lengths, prompts = [7, 12, 5, 9], [3, 4, 2, 8]
    rows, shape, ids, lp, tail = batch_output(lengths, prompts, pad_to=pad_to)
    exs = split_batch([4, 5, 6, 7], lengths, rows, shape, ids, lp, tail)
    rec = assemble_batch(exs, shape[1], batch_id="b1", tau=1.0, vocab_size=40)
    assert isinstance(rec, TopKRecord)
    rec.validate(["sft", "base"])
    np.testing.assert_array_equal(rec.rows, rows)
    assert rec.batch_shape == shape and rec.rows.dtype == np.int32
    np.testing.assert_array_equal(rec.ids, ids)
    for r in lp:
        assert rec.logprobs[r].tobytes() == lp[r].tobytes() and rec.tail[r].tobytes() == tail[r].tobytes()


def test_assemble_in_another_batching_and_order():
    exs = make_examples(6, seed=1)
    chosen = [exs[4], exs[0], exs[2]]
    seq = max(e.length for e in chosen) + 3
    rec = assemble_batch(chosen, seq, batch_id=9, tau=2.0, vocab_size=40, roles=["sft"])
    assert list(rec.logprobs) == ["sft"] and rec.tau == 2.0
    assert (np.diff(rec.rows) > 0).all()
    expect = np.concatenate([b * seq + e.t for b, e in enumerate(chosen)])
    np.testing.assert_array_equal(rec.rows, expect)
    np.testing.assert_array_equal(rec.ids, np.concatenate([e.ids for e in chosen]))
    assert rec.mask.sum() == rec.rows.size and rec.mask.shape == (3, seq)  # the derived [B, T] mask


def test_assemble_errors_name_the_example():
    exs = make_examples(3, seed=2)
    too_short = int(exs[1].t[-1])  # exs[1]'s last position does not fit
    with pytest.raises(CacheError, match=f"batch 1: example {exs[1].example} has a counted position"):
        assemble_batch([exs[1]], too_short, batch_id=1, tau=1.0, vocab_size=40)
    with pytest.raises(CacheError, match=r"example 0 lacks roles \['student_base'\]"):
        assemble_batch(exs, 30, batch_id=1, tau=1.0, vocab_size=40, roles=["sft", "student_base"])
    with pytest.raises(CacheError, match="no examples"):
        assemble_batch([], 30, batch_id=1, tau=1.0, vocab_size=40)


def test_bad_records_are_refused():
    ex = make_examples(1)[0]
    bad = ExampleRecord(ex.example, ex.length, ex.t[::-1].copy(), ex.ids, ex.logprobs, ex.tail)
    with pytest.raises(CacheError, match="strictly increasing"):
        bad.check()
    rows, shape, ids, lp, tail = batch_output([6, 6], [2, 2])
    with pytest.raises(CacheError, match="2 example indices"):
        split_batch([1, 2], [6, 6, 6], rows, shape, ids, lp, tail)


def test_mass_check_at_write_and_the_encodings_tolerance():
    ex = make_examples(1)[0]
    ex.check(mass_eps=1e-3)
    lp = dict(ex.logprobs, base=ex.logprobs["base"] + np.float32(0.3))  # mass e^0.3 ~ 1.35
    with pytest.raises(CacheError, match="role 'base': probability mass"):
        ExampleRecord(ex.example, ex.length, ex.t, ex.ids, lp, ex.tail).check(mass_eps=1e-3)
    # the decode tolerance grows with the rounding: lossless < 16-bit < 10-bit < 8-bit (+ a shift on top)
    eps = {e: encoding_mass_eps(e, ["sft", "base"]) for e in ("fp32", "fp16", "q8", "q8d10")}
    assert eps["fp32"] == pytest.approx(1e-3) and eps["fp32"] < eps["fp16"] < 2e-2 < eps["q8"] < eps["q8d10"] < 0.25
