"""Tolerances of the loss tests, one table keyed by the dtype that limits precision.

Compared quantities: the per-token mean loss (loss_sum / num_tokens, values ~1-10) and the gradient of
that mean with respect to the student logits (entries ~1/N at most, N ~ 50 counted tokens), sparse
path against the fp64 dense reference. Test inputs have log-probs down to about -30.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Tol", "TOLERANCES"]


@dataclass(frozen=True)
class Tol:
    rtol: float  # relative, on the mean loss
    atol: float  # absolute, on the mean loss
    grad_atol: float  # absolute, on each gradient entry of the mean loss


TOLERANCES: dict[str, Tol] = {
    # fp32 record and logits, fp32 math vs fp64: log-probs of magnitude <= ~30 carry ~30 * 1.2e-7 = 4e-6
    # absolute rounding each; sums over ~100 atoms average it out. Measured <= 2e-6 on the loss, 1e-7 on
    # gradients; 5x to 10x margin.
    "float32": Tol(rtol=1e-6, atol=1e-5, grad_atol=1e-6),
    # fp16 wire log-probs: 10-bit mantissa, relative rounding <= 2^-11 = 4.9e-4, i.e. up to 0.015 absolute
    # at lp = -30 (but such atoms carry ~no mass); measured <= 5e-4 on the loss, 3e-5 on gradients.
    "float16": Tol(rtol=5e-4, atol=3e-3, grad_atol=2e-4),
    # bf16 wire log-probs: 7-bit mantissa, relative rounding <= 2^-8 = 3.9e-3: a log-prob of -2 moves by up
    # to 0.008, and the KL moves by about p * that per atom; measured <= 4e-3 on the loss, 2.5e-4 on
    # gradients (the tail mass travels in fp32 and is exact).
    "bfloat16": Tol(rtol=4e-3, atol=2e-2, grad_atol=2e-3),
    # bf16 *student logits* (record fp32): the reference reads the same rounded logits, so the loss keeps
    # fp32 accuracy; the gradient comes back in the logits' dtype (bf16), relative error 2^-8 on entries of
    # size <= ~0.06: 2.4e-4 measured, bound 1e-3.
    "student_bfloat16": Tol(rtol=1e-6, atol=1e-5, grad_atol=1e-3),
}
