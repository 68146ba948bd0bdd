"""sparse_topk / sparse_gather against torch.log_softmax; padded vocabulary rows are cut."""

from __future__ import annotations

import pytest
import torch

from common.sparse import head_gather, head_topk, sparse_gather, sparse_topk

torch.set_num_threads(1)  # tiny tensors; see test_losses.py


def logits(b=3, t=7, v=50, pad=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(b, t, v + pad, generator=g) * 3
    z[..., v:] = 100.0  # padded embedding rows: huge, so they would win top-k if not cut
    return z.to(dtype)


@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("chunk", [1, 4, 1024])
def test_topk_matches_log_softmax(tau, chunk):
    z = logits()
    ids, lp, tail = sparse_topk(z, k=5, tau=tau, vocab_size=50, chunk_tokens=chunk)
    full = torch.log_softmax(z[..., :50].double() / tau, -1)
    want_lp, want_ids = full.topk(5, dim=-1)
    assert ids.dtype == torch.long and int(ids.max()) < 50
    torch.testing.assert_close(ids, want_ids)
    torch.testing.assert_close(lp, want_lp.float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(tail, (1 - want_lp.exp().sum(-1)).float(), rtol=0, atol=1e-5)


def test_gather_matches_log_softmax_and_full_support_tail_is_zero():
    z = logits(seed=1)
    ids = torch.stack([torch.randperm(50)[:8] for _ in range(21)]).view(3, 7, 8)
    lp, tail = sparse_gather(z, ids, tau=1.5, vocab_size=50, chunk_tokens=5)
    full = torch.log_softmax(z[..., :50].double() / 1.5, -1)
    torch.testing.assert_close(lp, full.gather(-1, ids).float(), rtol=0, atol=1e-5)
    off = full.exp().scatter(-1, ids, 0.0).sum(-1)
    torch.testing.assert_close(tail, off.float(), rtol=0, atol=1e-6)
    everything = torch.arange(50).expand(3, 7, 50)
    _, tail_all = sparse_gather(z, everything, vocab_size=50)
    assert torch.equal(tail_all, torch.zeros(3, 7))


def test_bf16_logits_are_upcast():
    z = logits(seed=2, dtype=torch.bfloat16)
    ids, lp, _ = sparse_topk(z, k=3, vocab_size=50)
    assert lp.dtype == torch.float32
    want = torch.log_softmax(z[..., :50].float(), -1).gather(-1, ids)
    torch.testing.assert_close(lp, want, rtol=0, atol=1e-5)


def test_errors():
    z = logits()
    with pytest.raises(ValueError, match="k=51 out of range"):
        sparse_topk(z, k=51, vocab_size=50)
    with pytest.raises(ValueError, match="out of range"):
        sparse_gather(z, torch.full((3, 7, 2), 50), vocab_size=50)
    with pytest.raises(ValueError, match="disagree"):
        sparse_gather(z, torch.zeros(3, 6, 2, dtype=torch.long), vocab_size=50)


def test_include_matches_the_numpy_reference_and_flat_rows_work():
    from common.topk import topk_with_include

    z = logits(seed=3).reshape(21, 56)
    forced = torch.randint(0, 50, (21,), generator=torch.Generator().manual_seed(0))
    forced[:5] = z[:5, :50].argmax(-1)  # some forced ids already in the top-k
    ids, lp, tail = sparse_topk(z, k=4, tau=1.5, vocab_size=50, chunk_tokens=4, include=forced)
    assert ids.shape == (21, 5) and lp.shape == (21, 5) and tail.shape == (21,)
    ref = torch.log_softmax(z[:, :50].double() / 1.5, -1)
    want = topk_with_include(ref.numpy(), 4, forced.numpy())
    torch.testing.assert_close(ids, torch.from_numpy(want).long())
    torch.testing.assert_close(lp, ref.gather(-1, ids).float(), rtol=0, atol=1e-5)
    torch.testing.assert_close(tail, (1 - ref.gather(-1, ids).exp().sum(-1)).float(), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="needs 51 distinct ids"):
        sparse_topk(z, k=50, vocab_size=50, include=forced)
    with pytest.raises(ValueError, match="include shape"):
        sparse_topk(z, k=3, vocab_size=50, include=forced[:3])


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_head_path_equals_logits_path_bitwise(chunk):
    """lm_head applied chunk by chunk at the rows == the full [B*T, V'] logits selected at the rows, bit for bit."""
    g = torch.Generator().manual_seed(4)
    hidden = torch.randn(40, 16, generator=g)
    weight, bias = torch.randn(56, 16, generator=g), torch.randn(56, generator=g)
    rows = torch.tensor([1, 2, 3, 7, 8, 20, 21, 22, 23, 30, 39])
    full = torch.nn.functional.linear(hidden, weight, bias)[rows]
    forced = torch.arange(11) % 50
    ids, lp, tail = head_topk(hidden[rows], weight, bias, 5, 1.5, 50, chunk, forced)
    r_ids, r_lp, r_tail = sparse_topk(full, 5, 1.5, 50, 1024, forced)
    assert torch.equal(ids, r_ids) and torch.equal(lp, r_lp) and torch.equal(tail, r_tail)
    g_lp, g_tail = head_gather(hidden[rows], weight, None, ids, 1.5, 50, chunk)
    r_glp, r_gtail = sparse_gather(torch.nn.functional.linear(hidden, weight)[rows], ids, 1.5, 50)
    assert torch.equal(g_lp, r_glp) and torch.equal(g_tail, r_gtail)
    with pytest.raises(ValueError, match=r"\[N, H\]"):
        head_topk(hidden[rows], weight[:, :8], None, 5)
