"""The two kinds of model output the loss reads, served as fp32 logit rows one chunk at a time.

- logits `[B, T, V']` (small vocabularies, tests, models whose logits the head alone cannot reproduce);
- `HiddenStates(hidden [B, T, H], weight [V', H], bias [V'] | None)`: the last hidden states (after the
  final norm) and the LM head. Logits exist only for one chunk of counted rows at a time.

A row source hands out `logits_into(rows, out)`: the fp32 logits z of the given flat rows b * T + t, cut to
the tokenizer's vocabulary (padded head rows beyond it are dropped), written into a preallocated
`[n, V]` block. When the loss needs gradients it calls `add_grad(rows, g)` with g = dL/dz for those rows
and at the end `attach(value)`, which returns the loss value connected to the inputs by the gradients
accumulated so far (formed during the forward call; nothing `[chunk, V]` is kept for backward):

    logits:  dL/dlogits[rows] = g                                  (one buffer shaped like the logits)
    hidden:  dL/dhidden[rows] = g @ W,  dL/dW += g^T @ hidden[rows],  dL/dbias += sum_rows g

The head's products run in the autocast dtype when autocast is on (bf16 on GPU, as the model's own
lm_head and its backward would), else in the wider of the hidden states' and the head's dtypes (fp32
on CPU: then with no temporaries beyond the chunk's block); logits are upcast to fp32 for the
log-softmax, and the gradients accumulate in fp32 buffers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["HiddenStates", "StudentInput", "RowSource", "row_source", "batch_shape_of"]


@dataclass
class HiddenStates:
    """A causal LM's last hidden states and the LM head that turns them into logits.

    hidden: [B, T, H] any float dtype (the student's requires grad); weight: [V', H], V' >= the
    tokenizer's vocabulary (padded rows are cut); bias: [V'] or None. logits = hidden @ weight^T + bias.
    """

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None = None


StudentInput = Tensor | HiddenStates


def batch_shape_of(x: StudentInput) -> tuple[int, int]:
    t = x.hidden if isinstance(x, HiddenStates) else x
    return int(t.shape[0]), int(t.shape[1])


class _PrecomputedGrads(torch.autograd.Function):
    """Connects `value` to `inputs` with gradients already computed in the forward pass."""

    @staticmethod
    def forward(ctx: Any, value: Tensor, grads: list[Tensor | None], *inputs: Tensor) -> Tensor:
        ctx.grads = grads
        return value.clone()

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("distillation_loss: backward ran twice through one LossOutput.loss_sum; "
                               "its gradient buffers are scaled in place, compute the loss again instead")
        ctx.grads = None  # scaled in place (no second buffer); a second backward would be wrong
        return (None, None, *[None if g is None else g.mul_(grad_out.to(g.dtype)) for g in grads])


class RowSource:
    """fp32 logits of chosen flat rows and the gradient they receive (see the module docstring)."""

    def logits_into(self, rows: Tensor, out: Tensor) -> Tensor:
        raise NotImplementedError

    def add_grad(self, rows: Tensor, g: Tensor) -> None:
        raise NotImplementedError

    def attach(self, value: Tensor) -> Tensor:
        raise NotImplementedError


class _LogitRows(RowSource):
    def __init__(self, logits: Tensor, vocab: int, need_grad: bool):
        b, t, v_pad = logits.shape
        self.logits, self.vocab = logits, vocab
        self.flat = logits.detach().reshape(b * t, v_pad)[:, :vocab]
        self.grad = torch.zeros((b * t, v_pad), dtype=logits.dtype, device=logits.device) if need_grad else None

    def logits_into(self, rows: Tensor, out: Tensor) -> Tensor:
        if self.flat.dtype == torch.float32:
            return torch.index_select(self.flat, 0, rows, out=out)
        return out.copy_(self.flat.index_select(0, rows))

    def add_grad(self, rows: Tensor, g: Tensor) -> None:
        assert self.grad is not None
        self.grad[:, : self.vocab].index_copy_(0, rows, g.to(self.grad.dtype))

    def attach(self, value: Tensor) -> Tensor:
        if self.grad is None:
            return value
        return _PrecomputedGrads.apply(value, [self.grad.view(self.logits.shape)], self.logits)


class _HeadRows(RowSource):
    def __init__(self, x: HiddenStates, vocab: int, need_grad: bool, mm_dtype: torch.dtype):
        b, t, h = x.hidden.shape
        self.x, self.vocab, self.mm_dtype = x, vocab, mm_dtype
        self.flat = x.hidden.detach().reshape(b * t, h)
        self.w_mm = x.weight.detach()[:vocab].to(mm_dtype)  # a view when the dtypes agree
        self.b_mm = None if x.bias is None else x.bias.detach()[:vocab].to(mm_dtype)
        dev = x.hidden.device
        want = [need_grad and p is not None and p.requires_grad for p in (x.hidden, x.weight, x.bias)]
        self.g_hidden = torch.zeros((b * t, h), dtype=torch.float32, device=dev) if want[0] else None
        self.g_weight = torch.zeros(tuple(x.weight.shape), dtype=torch.float32, device=dev) if want[1] else None
        self.g_bias = (torch.zeros(tuple(x.bias.shape), dtype=torch.float32, device=dev)
                       if want[2] and x.bias is not None else None)

    def logits_into(self, rows: Tensor, out: Tensor) -> Tensor:
        h = self.flat.index_select(0, rows).to(self.mm_dtype)
        if self.mm_dtype == torch.float32:
            torch.mm(h, self.w_mm.t(), out=out)
            return out if self.b_mm is None else out.add_(self.b_mm)
        return out.copy_(torch.nn.functional.linear(h, self.w_mm, self.b_mm))

    def add_grad(self, rows: Tensor, g: Tensor) -> None:
        h = self.flat.index_select(0, rows).to(self.mm_dtype)
        if self.mm_dtype == torch.float32:  # no [V, H] or [n, V] temporaries: accumulate in place
            if self.g_hidden is not None:
                self.g_hidden.index_copy_(0, rows, torch.mm(g, self.w_mm))
            if self.g_weight is not None:
                self.g_weight[: self.vocab].addmm_(g.t(), h)
        else:  # autocast: the products in its dtype (as the model's lm_head backward), accumulated in fp32
            g_mm = g.to(self.mm_dtype)
            if self.g_hidden is not None:
                self.g_hidden.index_copy_(0, rows, torch.mm(g_mm, self.w_mm).float())
            if self.g_weight is not None:
                self.g_weight[: self.vocab].add_(torch.mm(g_mm.t(), h))
        if self.g_bias is not None:
            self.g_bias[: self.vocab].add_(g.sum(0))

    def attach(self, value: Tensor) -> Tensor:
        inputs: list[Tensor] = []
        grads: list[Tensor | None] = []
        for p, g in ((self.x.hidden, self.g_hidden), (self.x.weight, self.g_weight), (self.x.bias, self.g_bias)):
            if p is not None and g is not None:
                inputs.append(p)
                grads.append(g.view(p.shape).to(p.dtype))
        if not inputs:
            return value
        return _PrecomputedGrads.apply(value, grads, *inputs)


def row_source(x: StudentInput, vocab: int, need_grad: bool, mm_dtype: torch.dtype | None = None) -> RowSource:
    """The row source for logits or HiddenStates; mm_dtype: the head product's dtype (default: the wider
    of the hidden states' and the head's dtypes)."""
    if isinstance(x, HiddenStates):
        return _HeadRows(x, vocab, need_grad, mm_dtype or torch.promote_types(x.hidden.dtype, x.weight.dtype))
    return _LogitRows(x, vocab, need_grad)
