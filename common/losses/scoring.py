"""Score a model's output (logits or hidden states + head) at the targets' rows and support, chunked.

What the loss does for a `student_base` input, as a standalone function: used where lp_S0 is wanted as a
role of the targets (`student_worker.train_step.add_student_base`, diagnostics). No grad.
"""

from __future__ import annotations

import torch
from torch import Tensor

from common.losses.atoms import row_support
from common.losses.inputs import StudentInput, batch_shape_of, row_source

__all__ = ["support_logprobs"]


@torch.no_grad()
def support_logprobs(output: StudentInput, rows: Tensor, ids: Tensor, tau: float, vocab_size: int,
                     chunk_tokens: int = 256) -> tuple[Tensor, Tensor]:
    """log_softmax(logits / tau) at `ids` and the mass off them, at the flat rows b * T + t.

    output: logits [B, T, V'] or HiddenStates; rows: [N]; ids: [N, K]. Returns (logprobs [N, K] fp32,
    tail [N] fp32); padded vocabulary rows beyond vocab_size are cut. Never forms more than
    [chunk_tokens, V] logits at a time.
    """
    b, t = batch_shape_of(output)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= b * t):
        raise ValueError(f"rows out of range [0, {b * t})")
    device = ids.device
    dev_type = device.type
    mm_dtype = torch.get_autocast_dtype(dev_type) if torch.is_autocast_enabled(dev_type) else None
    n, k = ids.shape
    lps = torch.empty((n, k), dtype=torch.float32, device=device)
    tails = torch.empty(n, dtype=torch.float32, device=device)
    with torch.autocast(dev_type, enabled=False):
        src = row_source(output, vocab_size, False, mm_dtype)
        width = min(chunk_tokens, n)
        block = torch.empty((width, vocab_size), dtype=torch.float32, device=device)
        tmp = torch.empty_like(block)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            x = src.logits_into(rows[s:e].to(device), block[: e - s])
            if tau != 1.0:
                x.div_(tau)
            sup = row_support(x, ids[s:e], tmp[: e - s])
            lps[s:e] = sup["s_sup"] - sup["lse"][:, None]
            tails[s:e] = torch.exp(sup["lse_off"] - sup["lse"]).clamp_(0.0, 1.0)
    return lps, tails
