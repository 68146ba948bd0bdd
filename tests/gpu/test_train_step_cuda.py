"""The student's training step on the GPU as the worker runs it: fp32 master weights, bf16 autocast, a frozen
base copy for lp_S0; and a checkpoint's RNG file carrying the CUDA generator.

The tiny models, batch and teacher record are the unit tier's (tests/unit/test_train_step.py); the fp32
CPU step there is the reference.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import torch

import student_worker.train_step as ts
from common.config import LossConfig
from common.losses import targets_from_record
from student_worker import checkpoint as ckpt

# `models` is the unit tier's module fixture (tiny student, teachers, tokenizer), shared as is
from tests.unit.test_train_step import _batch, _record, _torch, models  # noqa: F401

# bf16 autocast vs the fp32 step, whole tiny model (2 layers, hidden 16): every matmul's operands rounded
# to bf16 (u = 2^-8 relative) through attention, MLP and head, accumulated in fp32; the errors add roughly
# in quadrature and average over the ~25 counted tokens. Loss: measured <= 1.9e-4 relative on the CPU (dry
# run, bf16 CPU kernels); bound 5e-3. Gradients: relative L2 error per parameter tensor, measured <= 1.05e-2
# on the CPU (a small tensor such as a norm weight sums few, correlated terms); bound 5e-2.
LOSS_RTOL = 5e-3
GRAD_REL_L2 = 5e-2
# lp_S0 from a bf16 copy vs the student's own under autocast (logits ~10): measured 0.028 on the CPU.
BF16_COPY_LP_ATOL = 0.1


def _module(lm: torch.nn.Module, cfg: LossConfig) -> torch.nn.Module:
    """What the worker trains: the fused path's HiddenStatesLM where the loss entry point has one."""
    wrap = getattr(ts, "loss_forward_module", None)  # absent before the fused loss (h-loss) landed
    return lm if wrap is None else wrap(lm, cfg, "student")


def _on(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


def _step(student: torch.nn.Module, base: torch.nn.Module | None, batch: dict[str, Any], targets: Any,
          cfg: LossConfig, n: int, autocast: bool) -> tuple[float, dict[str, Any], dict[str, torch.Tensor]]:
    device = next(student.parameters()).device
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss, metrics = ts.train_step(_module(student, cfg), None if base is None else _module(base, cfg), batch,
                                      targets, cfg, None, n, 1)
    loss.backward()
    grads = {name: p.grad.detach().double().cpu() for name, p in student.named_parameters() if p.grad is not None}
    return float(loss.detach()), metrics, grads


@pytest.mark.parametrize("method", ["sft", "kd", "delta_kd"])
def test_autocast_step_on_device_matches_the_fp32_cpu_step(models, device, method, fact) -> None:  # noqa: F811
    ms, tok = models
    b = _batch(tok)
    n = int(b["loss_mask"].sum())
    cfg = LossConfig(method=method, k=8)
    rec = None if method == "sft" else _record(models, b)
    ref_student = copy.deepcopy(ms["student"]).train()
    want, _, want_grads = _step(ref_student, ms["student"], _torch(b), None if rec is None else targets_from_record(rec),
                                cfg, n, autocast=False)
    student = copy.deepcopy(ms["student"]).to(device).train()
    base = copy.deepcopy(ms["student"]).to(device).eval().requires_grad_(False)  # the master's dtype
    targets = None if rec is None else targets_from_record(rec, device)
    assert targets is None or targets.ids.device.type == device.type
    got, metrics, grads = _step(student, base, _on(_torch(b), device), targets, cfg, n, autocast=True)
    assert metrics["tokens"] == n
    assert all(p.dtype == torch.float32 for p in student.parameters())  # master weights stay fp32
    rel = {name: float((g - want_grads[name]).norm() / want_grads[name].norm().clamp_min(1e-30))
           for name, g in grads.items()}
    assert set(grads) == set(want_grads)
    fact("train_step_autocast_vs_fp32", method=method, loss=got, loss_rel_err=abs(got - want) / abs(want),
         grad_rel_l2_max=max(rel.values()))
    assert abs(got - want) <= LOSS_RTOL * abs(want), (got, want)
    worst = max(rel, key=rel.__getitem__)
    assert rel[worst] <= GRAD_REL_L2, (worst, rel[worst])


def test_frozen_base_in_the_master_dtype_gives_s0_equal_to_s_under_autocast(models, device, fact) -> None:  # noqa: F811
    """At step 0 the frozen copy IS the student: lp_S0 must equal the student's own log-probs bit for bit when
    the copy has the master weights' dtype and runs under the same autocast. A bf16 copy (half the memory)
    differs: its norms, embeddings and residual stream are bf16 where the master's are fp32; the figure is
    recorded and bounded by bf16's reach."""
    ms, tok = models
    b = _batch(tok)
    cfg = LossConfig(method="delta_kd", k=8)
    targets = targets_from_record(_record(models, b), device)
    batch = _on(_torch(b), device)
    student = copy.deepcopy(ms["student"]).to(device).train()
    copies = {"master_dtype": copy.deepcopy(ms["student"]).to(device),
              "bfloat16": copy.deepcopy(ms["student"]).to(device, torch.bfloat16)}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        own = ts.add_student_base(_module(student, cfg), batch, targets, cfg.loss_chunk_rows).logprobs["student_base"]
        lp = {name: ts.add_student_base(_module(m.eval().requires_grad_(False), cfg), batch, targets,
                                        cfg.loss_chunk_rows).logprobs["student_base"] for name, m in copies.items()}
    assert own.device.type == device.type and own.dtype == torch.float32
    assert torch.equal(lp["master_dtype"], own)
    diff = float((lp["bfloat16"] - own).abs().max())
    fact("frozen_base_bf16_copy_vs_student", max_abs_lp_diff=diff)
    assert diff < BF16_COPY_LP_ATOL


@pytest.mark.parametrize("base_dtype", ["master", "bfloat16"])
def test_optimizer_steps_on_device_lower_the_loss(models, device, base_dtype) -> None:  # noqa: F811
    """Four AdamW steps under autocast with the frozen copy in the master's dtype (the worker's) or in bf16
    (half its memory)."""
    ms, tok = models
    b = _batch(tok)
    n = int(b["loss_mask"].sum())
    cfg = LossConfig(method="delta_kd", k=8)
    targets = targets_from_record(_record(models, b), device)
    batch = _on(_torch(b), device)
    student = copy.deepcopy(ms["student"]).to(device).train()
    base = copy.deepcopy(ms["student"]).to(device, torch.bfloat16 if base_dtype == "bfloat16" else None)
    base = base.eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    losses = []
    for _ in range(4):
        opt.zero_grad(set_to_none=True)
        loss, _, _ = _step(student, base, batch, targets, cfg, n, autocast=True)
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        losses.append(loss)
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert losses[-1] < losses[0], losses


def test_checkpoint_rng_file_carries_the_device_generator(tmp_path, device: torch.device) -> None:
    """write_rng_state / read_rng_state (student_worker/checkpoint.py): after a restore, the CPU and the
    device generators continue exactly where the checkpoint left them."""
    torch.manual_seed(1)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(2)
        torch.rand(3, device=device)  # CUDA initialised, its generator moved on
    ckpt.write_rng_state(tmp_path, 0)
    state = json.loads((tmp_path / "rng-rank0.json").read_text())
    assert ("cuda" in state) == (device.type == "cuda")
    want = (torch.rand(4), torch.rand(4, device=device), torch.randn(2, 3, device=device))
    torch.manual_seed(99)
    if device.type == "cuda":
        torch.cuda.manual_seed_all(99)
    other = torch.rand(4, device=device)
    assert not torch.equal(other, want[1])  # the generators were really moved elsewhere
    ckpt.read_rng_state(tmp_path, 0)
    got = (torch.rand(4), torch.rand(4, device=device), torch.randn(2, 3, device=device))
    for a, b in zip(got, want):
        assert torch.equal(a, b)
