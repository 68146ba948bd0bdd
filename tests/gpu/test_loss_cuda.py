"""`distillation_loss` on the GPU with bf16 inputs against the fp64 dense reference on the CPU.

The cases, the reference (tests/unit/loss_reference.py) and the tolerance table (tests/unit/tolerances.py)
are the unit tier's own (tests/unit/loss_cases.py); here only the side that runs production moves to the
device: the targets, the labels and the student's input (logits, or hidden states + LM head) go there,
the loss runs there, and its value and gradients come back to be compared with the CPU reference.

Three input forms, each what a GPU step can hand the loss:
- bf16 logits (`loss.fused: off`);
- bf16 hidden states with the fp32 head (fused path, no autocast): products in fp32 from rounded inputs;
- fp32 hidden states and head under bf16 autocast (fused path as the GPU worker runs it: the head's
  products in bf16, like the model's own lm_head), with the frozen student base given as hidden states
  too (its lp_S0 scored by the loss, chunked).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch

loss_cases = pytest.importorskip("tests.unit.loss_cases", reason="needs the fused loss entry point (h-loss)")

from common.losses import HiddenStates, SparseTargets, distillation_loss  # noqa: E402
from tests.unit.loss_reference import reference_loss  # noqa: E402
from tests.unit.tolerances import TOLERANCES, Tol  # noqa: E402

Case = loss_cases.Case
make_case, cfg_for, assert_match = loss_cases.make_case, loss_cases.cfg_for, loss_cases.assert_match

METHODS = ["kd", "delta_kd", "parallelogram"]  # parallelogram: every component (rkl, jsd, delta_*) at once


def _on(targets: SparseTargets, device: torch.device) -> SparseTargets:
    return dataclasses.replace(targets, ids=targets.ids.to(device), rows=targets.rows.to(device),
                               logprobs={r: x.to(device) for r, x in targets.logprobs.items()},
                               tail={r: x.to(device) for r, x in targets.tail.items()})


def _leaf(x: torch.Tensor, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    return x.detach().to(device=device, dtype=dtype or x.dtype).clone().requires_grad_()


def _run_on_device(case: Case, cfg: Any, form: str, device: torch.device,
                   ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """(mean loss, grads, the leaves as given) of the production loss on `device`; results in fp64 on the CPU."""
    base = None
    if case.base_head is not None:
        h0, w0, b0 = (x.to(device) for x in case.base_head)
        base = HiddenStates(h0, w0, b0)
    if form == "logits_bf16":
        leaves = [_leaf(case.z, device, torch.bfloat16)]
        student: Any = leaves[0]
    else:
        dtype = torch.bfloat16 if form == "hidden_bf16" else torch.float32
        leaves = [_leaf(case.hidden, device, dtype), _leaf(case.weight, device), _leaf(case.bias, device)]
        student = HiddenStates(*leaves)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=form == "hidden_autocast"):
        out = distillation_loss(student, _on(case.targets, device), case.labels.to(device), cfg, student_base=base)
    assert out.loss_sum.device.type == device.type and out.num_tokens > 0
    (out.loss_sum / out.num_tokens).backward()
    grads = [p.grad.double().cpu() for p in leaves]
    assert all(p.grad.device.type == device.type for p in leaves)
    return out.loss_sum.detach().double().cpu() / out.num_tokens, grads, leaves


def _rounded(p: torch.Tensor) -> torch.Tensor:
    """p's value rounded to bf16, its gradient passed straight through to p."""
    return p.detach().to(torch.bfloat16).double() + (p - p.detach())


def _reference(case: Case, cfg: Any, form: str, atoms: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """fp64 on the CPU, from the same rounded inputs the device received (bf16 where they were bf16)."""
    dense = {r: d.double() for r, d in case.dense.items()}
    if form == "logits_bf16":
        params = [case.z.to(torch.bfloat16).double().requires_grad_()]
        z = params[0]
    else:
        h = case.hidden.to(torch.bfloat16) if form == "hidden_bf16" else case.hidden
        params = [h.double().requires_grad_(), case.weight.double().requires_grad_(),
                  case.bias.double().requires_grad_()]
        if form == "hidden_autocast":  # autocast rounds the operands and the linear's output to bf16
            hh, w, b = (_rounded(p) for p in params)
            z = hh @ w.T + b
            z = z + (z.to(torch.bfloat16).double() - z).detach()
        else:
            z = params[0] @ params[1].T + params[2]
    if case.base_head is not None:  # lp_S0 from the base's head: the reference's student_base row
        h0, w0, b0 = case.base_head
        z0 = h0.double() @ w0.double().T + b0.double()
        if form == "hidden_autocast":
            z0 = (h0.to(torch.bfloat16).double() @ w0.to(torch.bfloat16).double().T
                  + b0.to(torch.bfloat16).double()).to(torch.bfloat16).double()
        dense["student_base"] = torch.log_softmax(z0[..., : case.targets.vocab_size] / cfg.tau, -1)
    ref, n = reference_loss(z, dense, case.labels, cfg, ids=case.targets.ids if atoms else None)
    (ref / n).backward()
    return ref.detach() / n, [p.grad for p in params]


def _autocast_tol(case: Case) -> Tol:
    """bf16 autocast: the reference rounds the head's operands and output to bf16 like the device does, but
    the device's fp32 accumulation (another summation order than the CPU's fp64) can land a logit on the
    other side of a bf16 rounding boundary: one bf16 ulp (2^-7 relative of |z| <= max|z|) on a few
    logits, each moving its token's loss by at most 2 ulp; allow 4 such flips in the mean. Gradients:
    the products run in bf16 (g rounded to 2^-8 relative, entries <= ~0.1): measured <= 3.3e-4 on the
    CPU (tests/unit test_autocast_runs_the_head_products_in_its_dtype), bound 2e-3."""
    zmax = float(case.z[..., : case.targets.vocab_size].abs().max())
    n = int((case.labels != -100).sum())
    flip = 4 * 2 * 2.0**-7 * zmax / n
    return Tol(rtol=1e-5, atol=max(1e-5, flip), grad_atol=2e-3, head_grad_atol=2e-3)


FORMS = {
    # bf16 logits / hidden states, fp32 record: the reference reads the same rounded inputs, so the unit
    # tier's bound holds (fp32 math on the device is as accurate as on the CPU; no TF32: torch's default
    # float32 matmul precision is "highest").
    "logits_bf16": lambda case: TOLERANCES["student_bfloat16"],
    "hidden_bf16": lambda case: TOLERANCES["student_bfloat16"],
    "hidden_autocast": _autocast_tol,
}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("method", METHODS)
def test_loss_on_device_matches_the_cpu_reference(method: str, form: str, device: torch.device, fact) -> None:
    case = make_case(k=16, seed=21)
    cfg = cfg_for(method)
    got, got_grads, _ = _run_on_device(case, cfg, form, device)
    want, want_grads = _reference(case, cfg, form, atoms=True)
    tol = FORMS[form](case)
    fact("loss_vs_fp64_reference", method=method, form=form, loss_err=float((got - want).abs()),
         grad_err=[float((a - b).abs().max()) for a, b in zip(got_grads, want_grads)])
    assert_match(got, got_grads, want, want_grads, tol)


@pytest.mark.parametrize("form", list(FORMS))
def test_full_support_on_device_equals_the_dense_formula(form: str, device: torch.device) -> None:
    """k = |V|: the sparse loss on the device equals the dense formula (the central identity)."""
    case = make_case(seed=22)  # k = V
    cfg = cfg_for("delta_kd")
    got, got_grads, _ = _run_on_device(case, cfg, form, device)
    want, want_grads = _reference(case, cfg, form, atoms=False)
    assert_match(got, got_grads, want, want_grads, FORMS[form](case))


@pytest.mark.parametrize("method", ["delta_kd", "parallelogram"])
def test_frozen_base_hidden_states_under_autocast(method: str, device: torch.device) -> None:
    """lp_S0 from the frozen base's hidden states + head on the device, under autocast (the GPU worker's
    frozen copy on the fused path), against the reference with the base's logits rounded the same way."""
    case = make_case(k=10, seed=23, base_kind="hidden")
    assert "student_base" not in case.targets.roles
    cfg = cfg_for(method)
    got, got_grads, _ = _run_on_device(case, cfg, "hidden_autocast", device)
    want, want_grads = _reference(case, cfg, "hidden_autocast", atoms=True)
    tol = _autocast_tol(case)
    # the base's logits round like the student's: double the flip allowance on the value
    assert_match(got, got_grads, want, want_grads, dataclasses.replace(tol, atol=2 * tol.atol))
