"""The HF teacher engine in bf16 on the GPU against an fp32 CPU engine over the same checkpoint.

Tolerances come from the logits themselves, not from a guessed constant. Let d be a row's largest logit
difference |z_bf16 - z_fp32| over the vocabulary (bf16 weights, activations and logits). Then, at
temperature tau:
- every log-prob moves by at most 2 d / tau (z / tau moves by <= d / tau, and so does its log-sum-exp);
- the difference of two log-probs of one row moves by at most 2 d / tau (the log-sum-exp cancels), so two
  ids whose reference log-probs are more than 2 d / tau apart cannot swap: slot j of the top-k must hold the
  reference's id wherever the reference's gaps on both sides of slot j exceed that margin;
- the support's mass moves by a factor within exp(+-2 d / tau), which bounds the tail's change.
d itself is bounded against the row's logit scale: bf16 keeps 8 significant bits (unit roundoff
u = 2^-8 = 0.0039), and rounding enters at every weight, every activation and the logits themselves;
LOGIT_REL_TOL below is the bound, with its measurement.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from common.config import ModelSpec
from common.sparse import head_logits, sparse_topk
from common.topk import rows_from_mask
from teacher_service import TeacherEngine
from tests.tiny import make_llama, make_tokenizer

# max_row |z_bf16 - z_fp32| / max_row |z_fp32| for a 2-layer Llama (hidden 64, vocab ~1,100, logits up to
# ~15). Each bf16 rounding is <= u = 0.0039 relative; a logit sums 64 products of rounded weights and
# rounded activations after two layers of rounded matmuls and norms, and the errors add roughly in
# quadrature, about ten roundings deep (weights, matmul outputs, norms, residual adds, the logit). Measured
# 0.0086 on the CPU (dry run, bf16 CPU kernels, fp32 accumulation as on CUDA); bound 8u = 0.031.
LOGIT_REL_TOL = 8 * 2.0**-8
# The rows path (backbone -> rows -> head in chunks) against the full forward's logits at those rows, both
# bf16 on one device: only the head matmul's shape differs, so cuBLAS may pick another kernel (another
# summation order): a few bf16 ulps of the logit (ulp = 2^-7 relative). Bit-equal on the CPU.
ROWS_PATH_REL_TOL = 4 * 2.0**-7
K = 16


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine-bf16")
    tok = make_tokenizer(root / "tok", extra_words=" ".join(f"w{i}" for i in range(1024)))
    return make_llama(root / "teacher", tok, seed=1, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128)


@pytest.fixture(scope="module")
def engines(checkpoint: Path, device: torch.device) -> tuple[TeacherEngine, TeacherEngine]:
    spec = ModelSpec(path=str(checkpoint))
    ref = TeacherEngine(spec, device="cpu", dtype="float32")
    eng = TeacherEngine(spec, device=str(device), dtype="bfloat16")
    assert eng.dtype == torch.bfloat16 and eng.device.type == device.type
    assert next(eng.model.parameters()).device.type == device.type  # loaded onto the device (device_map)
    assert eng.rows_path == "hidden_states", eng.rows_path
    return ref, eng


def _batch(vocab: int, b: int = 4, t: int = 48, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """input_ids, attention_mask [B, T] (two rows right padded) and the counted rows (a prompt of 5 skipped)."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, vocab, size=(b, t)).astype(np.int32)
    mask = np.ones((b, t), dtype=np.int32)
    mask[1, 30:] = 0
    mask[3, 41:] = 0
    ids[mask == 0] = 0
    counted = mask.astype(bool)
    counted[:, :5] = False
    counted[1, 29] = counted[3, 40] = False  # the last real token predicts padding
    return ids, mask, rows_from_mask(counted)


def _logits_at_rows(engine: TeacherEngine, ids: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> torch.Tensor:
    """The engine's own full-forward logits at the rows, vocabulary cut, as fp64 on the CPU: [N, V]."""
    z = engine.full_logits(ids, mask)
    return z.reshape(-1, z.shape[-1])[torch.as_tensor(rows, device=z.device)][:, :engine.vocab_size].double().cpu()


def _sorted_gaps(lp: torch.Tensor, k: int) -> torch.Tensor:
    """[N, k] bool: slot j of the reference's top-k is separated from slots j-1 and j+1 by its gaps."""
    top = torch.sort(lp, dim=-1, descending=True).values[:, : k + 1]
    gap = top[:, :-1] - top[:, 1:]  # gap[j] = lp_(j) - lp_(j+1), j = 0..k-1
    before = torch.cat([torch.full_like(gap[:, :1], float("inf")), gap[:, :-1]], dim=1)
    return torch.stack([before, gap], dim=0).amin(0)


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_bf16_topk_and_gather_match_the_fp32_reference(engines: tuple[TeacherEngine, TeacherEngine], tau: float,
                                                       fact) -> None:
    ref, eng = engines
    ids, mask, rows = _batch(ref.vocab_size)
    z_ref, z_eng = _logits_at_rows(ref, ids, mask, rows), _logits_at_rows(eng, ids, mask, rows)
    d = (z_eng - z_ref).abs().amax(-1)  # [N] each row's largest logit error
    rel = float((d / z_ref.abs().amax(-1)).max())
    assert rel <= LOGIT_REL_TOL, f"bf16 logits off by {rel:.4g} of the row's scale (bound {LOGIT_REL_TOL:.4g})"
    lp_ref = torch.log_softmax(z_ref / tau, dim=-1)
    margin = (2 * d / tau)[:, None]  # [N, 1]

    got_ids, got_lp, got_tail = eng.topk(ids, mask, rows, K, tau=tau, batch_id=1)
    assert got_ids.device.type == eng.device.type and got_lp.device.type == eng.device.type  # no host copy
    got_ids, got_lp, got_tail = got_ids.long().cpu(), got_lp.double().cpu(), got_tail.double().cpu()
    # log-probs and tails at the engine's own ids: valid everywhere, whichever ids it chose
    lp_at = lp_ref.gather(-1, got_ids)
    assert torch.all((got_lp - lp_at).abs() <= margin + 1e-6), float((got_lp - lp_at).abs().max())
    mass_ref = lp_at.exp().sum(-1)
    tail_bound = mass_ref * (torch.exp(2 * d / tau) - 1) + 1e-6
    assert torch.all((got_tail - (1 - mass_ref)).abs() <= tail_bound)
    # ids: wherever the reference's order is decided by more than the bf16 noise
    want_ids = torch.sort(lp_ref, dim=-1, descending=True).indices[:, :K]
    decided = _sorted_gaps(lp_ref, K) > margin
    assert torch.equal(got_ids[decided], want_ids[decided])
    frac = float(decided.float().mean())
    # the margin is each row's worst logit error, so lower slots of flat rows go unchecked: 29% of the
    # 2,600 slots are decided on the CPU; fewer than 100 would make the check vacuous
    assert int(decided.sum()) >= 100, f"only {frac:.0%} of the top-k slots are decided beyond bf16 noise"
    # gather in bf16 at the reference's support (what the base teacher does with the sft teacher's ids)
    g_lp, g_tail = eng.gather(ids, mask, rows, want_ids.int(), tau=tau, batch_id=1)
    g_lp = g_lp.double().cpu()
    assert torch.all((g_lp - lp_ref.gather(-1, want_ids)).abs() <= margin + 1e-6)
    fact("engine_bf16_vs_fp32", tau=tau, logit_rel_err=rel, max_logit_err=float(d.max()),
         max_lp_err_topk=float((got_lp - lp_at).abs().max()), slots_decided=frac,
         max_tail_err=float((got_tail - (1 - mass_ref)).abs().max()))


def test_bf16_include_forces_the_label_into_distinct_support(engines: tuple[TeacherEngine, TeacherEngine]) -> None:
    _, eng = engines
    ids, mask, rows = _batch(eng.vocab_size, seed=3)
    labels = np.roll(ids, -1, axis=1).reshape(-1)[rows]
    got, lp, tail = eng.topk(ids, mask, rows, K, include=labels, batch_id=2)
    assert got.shape == (len(rows), K + 1) and got.device.type == eng.device.type
    got = got.long().cpu()
    assert torch.all((got == torch.as_tensor(labels)[:, None]).any(-1))
    assert torch.all(torch.sort(got, -1).values.diff(dim=-1) != 0)  # all K ids of a row distinct
    assert bool(torch.isfinite(lp).all()) and bool(((tail >= -1e-6) & (tail <= 1 + 1e-6)).all())


def test_bf16_rows_path_equals_the_full_forward_within_rounding(engines: tuple[TeacherEngine, TeacherEngine],
                                                                fact) -> None:
    """The engine scores counted rows from the backbone's hidden states; on the device that must agree with
    the model's own full forward at those rows to within the head matmul's rounding."""
    _, eng = engines
    ids, mask, rows = _batch(eng.vocab_size, seed=4)
    full = _logits_at_rows(eng, ids, mask, rows)
    with torch.inference_mode():
        x = eng._at_rows(*eng._inputs(ids, mask, rows))
        mine = head_logits(x, eng.head.weight, eng.head.bias)[:, : eng.vocab_size].double().cpu()
    rel = float(((mine - full).abs().amax(-1) / full.abs().amax(-1)).max())
    assert rel <= ROWS_PATH_REL_TOL, rel
    if eng.device.type == "cpu":
        assert rel == 0.0  # the CPU twin: bit for bit (the unit tier checks this in fp32 too)
    got_ids, _, _ = eng.topk(ids, mask, rows, K, batch_id=3)
    want_ids, _, _ = sparse_topk(full, K, vocab_size=eng.vocab_size)
    agree = float((got_ids.long().cpu() == want_ids).float().mean())
    fact("engine_rows_path_vs_full_forward", logit_rel_diff=rel, topk_slot_agreement=agree)
