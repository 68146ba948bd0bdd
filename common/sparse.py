"""Logits (or hidden states + LM head) -> sparse (support log-probs, tail mass), chunked over rows. Pure torch.

Used by the teacher engines (top-k for the SFT teacher, gather for every other role) and by the student
worker's frozen base copy. The log-softmax is taken in fp32 at temperature tau, at most `chunk_tokens`
rows at a time, so a long batch never holds a full fp32 `[rows, V]` block.

Two sources of logits:
- `sparse_topk` / `sparse_gather` take logits `[..., V']` (any leading shape: `[B, T, V']` or `[N, V']`).
- `head_topk` / `head_gather` take hidden states `[N, H]` (a model's last hidden state at the N rows that
  matter) and the LM head (weight `[V', H]`, optional bias `[V']`); each chunk's logits are formed, used
  and dropped, so no `[N, V']` (let alone `[B, T, V']`) block ever exists.
Both give the same numbers for the same rows (the head path reproduces `lm_head(hidden)` chunk by chunk).

Padded vocabulary rows (V' > vocab_size, e.g. 152,064 vs 151,936) are cut before the softmax.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = ["sparse_topk", "sparse_gather", "head_topk", "head_gather", "head_logits"]

# A CPU BLAS multiplies 1-3 rows with a matrix-vector kernel whose summation order differs from its
# matrix-matrix kernel (measured: fp32 logits of one row differ by ~1e-6 between M = 1..3 and M >= 4 on
# this project's CPUs). Padding small head chunks to this many rows keeps a row's logits independent of
# how many rows share its chunk, so the head path equals the full forward bit for bit on CPU (tested).
_MIN_HEAD_ROWS = 8

LogitsOf = Callable[[int, int], torch.Tensor]  # (start, stop) -> logits [stop - start, V'] of those rows


def head_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """lm_head(hidden) = hidden @ weight.T + bias for hidden [n, H], in the weight's dtype ([n, V'])."""
    n = hidden.shape[0]
    if 0 < n < _MIN_HEAD_ROWS:
        pad = hidden.new_zeros((_MIN_HEAD_ROWS - n, hidden.shape[1]))
        return F.linear(torch.cat([hidden, pad]), weight, bias)[:n]
    return F.linear(hidden, weight, bias)


def _check_vocab(v_model: int, vocab_size: int | None) -> int:
    v = v_model if vocab_size is None else int(vocab_size)
    if v > v_model:
        raise ValueError(f"vocab_size={v} exceeds the logits' {v_model} rows")
    return v


def _tail(scaled: torch.Tensor, lse: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Mass off the support: exp(logsumexp(off-support) - logsumexp(all)); exactly 0 when k = V."""
    off = scaled.scatter(-1, idx, float("-inf"))
    return torch.exp(torch.logsumexp(off, dim=-1) - lse)


def _check_ids(ids: torch.Tensor, v: int, what: str) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
        raise ValueError(f"{what} out of range [0, {v}): min {int(ids.min())}, max {int(ids.max())}")


def _topk_rows(logits_of: LogitsOf, n: int, k: int, tau: float, v: int, chunk: int, device: torch.device,
               include: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = k if include is None else k + 1
    if not 0 < k <= v or width > v:
        raise ValueError(f"k={k} out of range (1..vocab_size={v})" if not 0 < k <= v else
                         f"k={k} plus a forced id needs {width} distinct ids > vocab_size={v}")
    ids = torch.empty(n, width, dtype=torch.long, device=device)
    lps = torch.empty(n, width, dtype=torch.float32, device=device)
    tails = torch.empty(n, dtype=torch.float32, device=device)
    for s in range(0, n, max(1, chunk)):
        e = min(n, s + max(1, chunk))
        scaled = logits_of(s, e)[:, :v].float() / tau
        lse = torch.logsumexp(scaled, dim=-1)
        top, idx = torch.topk(scaled, width, dim=-1)
        if include is None:
            lp = top - lse[:, None]
        else:
            # Top-k plus the forced id: slot k keeps the (k+1)-th best id when the forced one is in the top-k.
            forced = include[s:e]
            in_top = (idx[:, :k] == forced[:, None]).any(-1)
            idx[:, k] = torch.where(in_top, idx[:, k], forced)
            lp = scaled.gather(-1, idx) - lse[:, None]
        ids[s:e], lps[s:e] = idx, lp
        tails[s:e] = _tail(scaled, lse, idx)
    return ids, lps, tails.clamp_(0.0, 1.0)


def _gather_rows(logits_of: LogitsOf, idx_all: torch.Tensor, tau: float, v: int, chunk: int,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    n, k = idx_all.shape
    lps = torch.empty(n, k, dtype=torch.float32, device=idx_all.device)
    tails = torch.empty(n, dtype=torch.float32, device=idx_all.device)
    for s in range(0, n, max(1, chunk)):
        e = min(n, s + max(1, chunk))
        scaled = logits_of(s, e)[:, :v].float() / tau
        lse = torch.logsumexp(scaled, dim=-1)
        idx = idx_all[s:e]
        lps[s:e] = scaled.gather(-1, idx) - lse[:, None]
        tails[s:e] = _tail(scaled, lse, idx)
    return lps, tails.clamp_(0.0, 1.0)


def _include(include: torch.Tensor | None, lead: tuple[int, ...], v: int, device: torch.device,
             ) -> torch.Tensor | None:
    if include is None:
        return None
    if tuple(include.shape) != lead:
        raise ValueError(f"include shape {tuple(include.shape)} != the rows' shape {lead}")
    forced = include.reshape(-1).to(device=device, dtype=torch.long)
    _check_ids(forced, v, "forced (include) ids")
    return forced


@torch.no_grad()
def sparse_topk(
    logits: torch.Tensor, k: int, tau: float = 1.0, vocab_size: int | None = None, chunk_tokens: int = 1024,
    include: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k of log_softmax(logits / tau) per row.

    logits: [..., V'] (any float dtype; V' >= vocab_size, padded embedding rows beyond vocab_size are cut)
    include: optional [...] ids forced into the support (K = k + 1; see common.topk.topk_with_include)
    returns ids [..., K] int64 (top-k descending, then the forced slot), logprobs [..., K] fp32, tail [...] fp32.
    """
    lead = tuple(logits.shape[:-1])
    v = _check_vocab(logits.shape[-1], vocab_size)
    flat = logits.reshape(-1, logits.shape[-1])
    forced = _include(include, lead, v, logits.device)
    ids, lps, tail = _topk_rows(lambda s, e: flat[s:e], flat.shape[0], k, tau, v, chunk_tokens, logits.device,
                                forced)
    width = ids.shape[-1]
    return ids.view(*lead, width), lps.view(*lead, width), tail.view(lead)


@torch.no_grad()
def sparse_gather(
    logits: torch.Tensor, ids: torch.Tensor, tau: float = 1.0, vocab_size: int | None = None,
    chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """log_softmax(logits / tau) at given ids, and the mass off those ids.

    logits: [..., V'], ids: [..., k] (any int dtype, values < vocab_size)
    returns logprobs [..., k] fp32, tail [...] fp32.
    """
    lead = tuple(logits.shape[:-1])
    v = _check_vocab(logits.shape[-1], vocab_size)
    if tuple(ids.shape[:-1]) != lead:
        raise ValueError(f"logits {tuple(logits.shape)} and ids {tuple(ids.shape)} disagree on the rows {lead}")
    k = ids.shape[-1]
    flat = logits.reshape(-1, logits.shape[-1])
    idx_all = ids.reshape(-1, k).to(device=logits.device, dtype=torch.long)
    _check_ids(idx_all, v, "support ids")
    lps, tail = _gather_rows(lambda s, e: flat[s:e], idx_all, tau, v, chunk_tokens)
    return lps.view(*lead, k), tail.view(lead)


def _check_head(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} must be [N, H] and weight {tuple(weight.shape)} [V', H]")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias {tuple(bias.shape)} must be [V'] = ({weight.shape[0]},)")


@torch.no_grad()
def head_topk(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, k: int, tau: float = 1.0,
    vocab_size: int | None = None, chunk_tokens: int = 1024, include: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sparse_topk` of lm_head(hidden), formed `chunk_tokens` rows at a time.

    hidden: [N, H]; weight: [V', H]; bias: [V'] or None; include: optional [N] forced ids (K = k + 1).
    returns ids [N, K] int64, logprobs [N, K] fp32, tail [N] fp32.
    """
    _check_head(hidden, weight, bias)
    v = _check_vocab(weight.shape[0], vocab_size)
    forced = _include(include, (hidden.shape[0],), v, hidden.device)
    return _topk_rows(lambda s, e: head_logits(hidden[s:e], weight, bias), hidden.shape[0], k, tau, v,
                      chunk_tokens, hidden.device, forced)


@torch.no_grad()
def head_gather(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids: torch.Tensor, tau: float = 1.0,
    vocab_size: int | None = None, chunk_tokens: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`sparse_gather` of lm_head(hidden) at ids [N, k], formed `chunk_tokens` rows at a time.

    returns logprobs [N, k] fp32, tail [N] fp32.
    """
    _check_head(hidden, weight, bias)
    v = _check_vocab(weight.shape[0], vocab_size)
    if ids.ndim != 2 or ids.shape[0] != hidden.shape[0]:
        raise ValueError(f"ids {tuple(ids.shape)} must be [N, k] with N = {hidden.shape[0]} hidden rows")
    idx_all = ids.to(device=hidden.device, dtype=torch.long)
    _check_ids(idx_all, v, "support ids")
    return _gather_rows(lambda s, e: head_logits(hidden[s:e], weight, bias), idx_all, tau, v, chunk_tokens)
