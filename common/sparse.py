"""Full logits -> sparse (support log-probs, tail mass), chunked over tokens. Pure torch.

Used by the teacher engines (top-k for the SFT teacher, gather for every other role) and by the student
worker's frozen base copy. The log-softmax is taken in fp32 at temperature tau, at most `chunk_tokens`
positions at a time, so a long batch never holds a full fp32 `[B, T, V]` block.
"""

from __future__ import annotations

import torch

__all__ = ["sparse_topk", "sparse_gather"]


def _chunks(n: int, size: int) -> range:
    return range(0, n, max(1, size))


def _tail(scaled: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mass off the support: exp(logsumexp(off-support) - logsumexp(all)); exactly 0 when k = V."""
    off = scaled.scatter(-1, idx, float("-inf"))
    return torch.exp(torch.logsumexp(off, dim=-1) - lse)


@torch.no_grad()
def sparse_topk(
    logits: torch.Tensor, k: int, tau: float = 1.0, vocab_size: int | None = None, chunk_tokens: int = 1024
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(logits / tau).

    logits: [B, T, V'] (any float dtype; V' >= vocab_size, padded embedding rows beyond vocab_size are cut)
    returns ids [B, T, k] int64 (descending log-prob), logprobs [B, T, k] fp32, tail [B, T] fp32.
    """
    v = logits.shape[-1] if vocab_size is None else vocab_size
    if not 0 < k <= v:
        raise ValueError(f"k={k} out of range (1..vocab_size={v})")
    b, t = logits.shape[:2]
    flat = logits.reshape(b * t, logits.shape[-1])
    ids = torch.empty(b * t, k, dtype=torch.long, device=logits.device)
    lps = torch.empty(b * t, k, dtype=torch.float32, device=logits.device)
    tails = torch.empty(b * t, dtype=torch.float32, device=logits.device)
    for s in _chunks(b * t, chunk_tokens):
        scaled = flat[s : s + chunk_tokens, :v].float() / tau
        lse = torch.logsumexp(scaled, dim=-1)
        top, idx = torch.topk(scaled, k, dim=-1)
        ids[s : s + chunk_tokens] = idx
        lps[s : s + chunk_tokens] = top - lse[:, None]
        tails[s : s + chunk_tokens] = _tail(scaled, lse, idx)
    return ids.view(b, t, k), lps.view(b, t, k), tails.clamp_(0.0, 1.0).view(b, t)


@torch.no_grad()
def sparse_gather(
    logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0, vocab_size: int | None = None,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits / tau) at given ids, and the mass off those ids.

    logits: [B, T, V'], ids: [B, T, k] (any int dtype, values < vocab_size)
    returns logprobs [B, T, k] fp32, tail [B, T] fp32.
    """
    v = logits.shape[-1] if vocab_size is None else vocab_size
    b, t, k = ids.shape
    if logits.shape[:2] != (b, t):
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree on [B, T]")
    flat = logits.reshape(b * t, logits.shape[-1])
    idx_all = ids.reshape(b * t, k).to(device=logits.device, dtype=torch.long)
    if idx_all.numel() and (int(idx_all.min()) < 0 or int(idx_all.max()) >= v):
        raise ValueError(f"support ids out of range [0, {v}): min {int(idx_all.min())}, max {int(idx_all.max())}")
    lps = torch.empty(b * t, k, dtype=torch.float32, device=logits.device)
    tails = torch.empty(b * t, dtype=torch.float32, device=logits.device)
    for s in _chunks(b * t, chunk_tokens):
        scaled = flat[s : s + chunk_tokens, :v].float() / tau
        lse = torch.logsumexp(scaled, dim=-1)
        idx = idx_all[s : s + chunk_tokens]
        lps[s : s + chunk_tokens] = scaled.gather(-1, idx) - lse[:, None]
        tails[s : s + chunk_tokens] = _tail(scaled, lse, idx)
    return lps.view(b, t, k), tails.clamp_(0.0, 1.0).view(b, t)
