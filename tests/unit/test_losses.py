"""common.losses against the naive dense reference (tests/unit/loss_reference.py): values and gradients,
k = |V| equals dense, atoms at k < |V|, wire dtypes, identities, all-masked batches, a hand-computed case."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import LossConfig
from common.losses import (
    LossInputError,
    distillation_loss,
    generalized_jsd,
    reverse_kl,
    targets_from_record,
)
from common.topk import TopKRecord
from tests.unit.loss_reference import reference_loss
from tests.unit.tolerances import TOLERANCES, Tol

METHODS = ["kd", "rkl", "jsd", "delta_kd", "delta_anchor", "delta_inverse", "delta_match", "parallelogram"]
TAILS = ["bucket", "drop"]
ROLES = ["sft", "base", "student_base"]
PAIR_ROLES = ROLES + ["sft_1", "base_1"]
# Tiny tensors: one intra-op thread is ~100x faster than two on a loaded 2-core machine (spin-waits).
torch.set_num_threads(1)

PARALLELOGRAM = {"delta_kd": 0.4, "kd": 0.2, "delta_match": 0.1, "jsd": 0.1, "delta_anchor": 0.1,
                 "delta_inverse": 0.05, "rkl": 0.05}


def make_case(b=3, t=17, v=101, k=None, roles=ROLES, tau=1.0, wire="float32", seed=0, pad=3, scale=3.0):
    """Random dense teacher log-probs (fp32, at tau), their sparse record as SparseTargets, labels, mask."""
    g = torch.Generator().manual_seed(seed)
    dense = {r: torch.log_softmax(torch.randn(b, t, v, generator=g, dtype=torch.float64) * scale / tau, -1)
             .float() for r in roles}
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :3] = -100
    mask = torch.rand(b, t, generator=g) > 0.15
    rec = TopKRecord.from_dense(7, {r: d.numpy() for r, d in dense.items()}, k or v, mask.numpy(), tau,
                                wire_dtype=wire)
    rec.validate(required_roles=roles)
    # student logits with padded vocabulary rows full of large junk: they must be cut
    z = torch.randn(b, t, v + pad, generator=g) * scale
    z[..., v:] = 50.0
    return dense, targets_from_record(rec), labels, mask, z


def cfg_for(method, tail="bucket", **kw):
    base = dict(method=method, tail=tail, lam=0.25, jsd_beta=0.3, chunk_tokens=8, weights=PARALLELOGRAM)
    base.update(kw)
    return LossConfig(**base)


def run_both(z, dense, targets, labels, mask, cfg, alphas=None, atoms=False, student_dtype=torch.float32):
    """(sparse mean loss, its grad, reference mean loss, its grad)."""
    zs = z.detach().to(student_dtype).clone().requires_grad_()
    out = distillation_loss(zs, targets, labels, cfg, pair_alphas=alphas)
    assert out.num_tokens > 0
    (out.loss_sum / out.num_tokens).backward()
    zr = z.detach().to(student_dtype).double().requires_grad_()
    ref, n = reference_loss(zr, {r: d.double() for r, d in dense.items()}, labels, mask, cfg, alphas,
                            ids=targets.ids if atoms else None)
    (ref / n).backward()
    assert n == out.num_tokens
    return out.loss_sum.detach().double() / n, zs.grad.double(), ref.detach() / n, zr.grad


def assert_match(got, got_grad, want, want_grad, tol: Tol):
    torch.testing.assert_close(got, want, rtol=tol.rtol, atol=tol.atol)
    torch.testing.assert_close(got_grad, want_grad, rtol=0.0, atol=tol.grad_atol)
    assert torch.isfinite(got_grad).all()


# ----------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", METHODS)
def test_full_support_equals_dense(method, tail):
    """k = |V|: the sparse path (either tail mode) is the dense formula, values and gradients."""
    dense, targets, labels, mask, z = make_case(tau=1.5)
    cfg = cfg_for(method, tail, tau=1.5)
    assert_match(*run_both(z, dense, targets, labels, mask, cfg), TOLERANCES["float32"])


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", METHODS)
def test_partial_support_equals_reference_atoms(method, tail):
    """k < |V|: equals the reference's atoms built from dense probabilities (bucket / renormalised)."""
    dense, targets, labels, mask, z = make_case(k=9, seed=1)
    cfg = cfg_for(method, tail)
    assert_match(*run_both(z, dense, targets, labels, mask, cfg, atoms=True), TOLERANCES["float32"])


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", METHODS)
def test_wire_dtypes_match_dense(method, tail, wire):
    dense, targets, labels, mask, z = make_case(wire=wire, seed=2)
    cfg = cfg_for(method, tail)
    assert_match(*run_both(z, dense, targets, labels, mask, cfg), TOLERANCES[wire])


@pytest.mark.parametrize("method", ["kd", "delta_kd", "jsd", "delta_match"])
def test_bf16_student_logits(method):
    dense, targets, labels, mask, z = make_case(seed=3)
    got = run_both(z, dense, targets, labels, mask, cfg_for(method), student_dtype=torch.bfloat16)
    assert_match(*got, TOLERANCES["student_bfloat16"])


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", ["delta_kd", "delta_inverse", "delta_match", "parallelogram"])
def test_several_pairs_match_reference(method, tail):
    dense, targets, labels, mask, z = make_case(k=11, roles=PAIR_ROLES, seed=4)
    got = run_both(z, dense, targets, labels, mask, cfg_for(method, tail), alphas=[0.7, -0.4], atoms=True)
    assert_match(*got, TOLERANCES["float32"])


def test_sft_is_cross_entropy():
    _, _, labels, _, z = make_case(pad=0)
    zs = z.clone().requires_grad_()
    out = distillation_loss(zs, None, labels, LossConfig(method="sft"))
    want = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss_sum, want.float(), rtol=1e-6, atol=1e-4)
    assert out.num_tokens == int((labels != -100).sum())
    out.loss_sum.backward()
    zr = z.clone().requires_grad_()
    torch.nn.functional.cross_entropy(zr.reshape(-1, z.shape[-1]), labels.reshape(-1), reduction="sum").backward()
    torch.testing.assert_close(zs.grad, zr.grad, rtol=0, atol=1e-6)


@settings(max_examples=12, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 6), v=st.integers(2, 40), data=st.data())
def test_random_shapes(b, t, v, data):
    k = data.draw(st.integers(1, v))
    method = data.draw(st.sampled_from(METHODS))
    tail = data.draw(st.sampled_from(TAILS))
    chunk = data.draw(st.integers(1, 7))
    dense, targets, labels, mask, z = make_case(b, t, v, k=k, seed=v, pad=data.draw(st.integers(0, 2)))
    labels[0, :3] = 0  # keep at least one counted token
    mask[0, 0] = True
    targets.mask[0, 0] = True
    cfg = cfg_for(method, tail, chunk_tokens=chunk)
    assert_match(*run_both(z, dense, targets, labels, mask, cfg, atoms=k < v), TOLERANCES["float32"])


# ----------------------------------------------------------------------------------------- identities


def _mean_loss(z, targets, labels, cfg, alphas=None):
    zs = z.clone().requires_grad_()
    out = distillation_loss(zs, targets, labels, cfg, pair_alphas=alphas)
    (out.loss_sum / out.num_tokens).backward()
    return out.loss_sum.detach() / out.num_tokens, zs.grad


@pytest.mark.parametrize("tail", TAILS)
def test_delta_kd_is_kd_when_student_base_is_base(tail):
    dense, _, labels, mask, z = make_case(k=13, seed=5)
    dense["student_base"] = dense["base"]
    rec = TopKRecord.from_dense(0, {r: d.numpy() for r, d in dense.items()}, 13, mask.numpy())
    targets = targets_from_record(rec)
    got = _mean_loss(z, targets, labels, cfg_for("delta_kd", tail, alpha=1.0))
    want = _mean_loss(z, targets, labels, cfg_for("kd", tail))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail", TAILS)
def test_alpha_zero_targets_the_student_base(tail):
    dense, targets, labels, _, z = make_case(k=13, seed=6)
    got = _mean_loss(z, targets, labels, cfg_for("delta_kd", tail, alpha=0.0))
    as_sft = targets.with_role("sft", targets.logprobs["student_base"], targets.tail["student_base"])
    want = _mean_loss(z, as_sft, labels, cfg_for("kd", tail))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail", TAILS)
def test_jsd_endpoints(tail):
    """beta = 1 is forward KL (kd), beta = 0 is reverse KL (rkl); near the endpoints it is continuous."""
    _, targets, labels, _, z = make_case(k=10, seed=7)
    for beta, other in [(1.0, "kd"), (0.0, "rkl")]:
        got = _mean_loss(z, targets, labels, cfg_for("jsd", tail, jsd_beta=beta))
        torch.testing.assert_close(got, _mean_loss(z, targets, labels, cfg_for(other, tail)), rtol=1e-6, atol=1e-6)
    p = torch.log_softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    q = torch.log_softmax(torch.randn(4, 6, dtype=torch.float64), -1)
    torch.testing.assert_close(generalized_jsd(p, q, 1e-7), reverse_kl(p, q), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["delta_kd", "delta_inverse", "delta_match"])
def test_zero_weighted_extra_pair_is_one_pair(method):
    _, targets, labels, _, z = make_case(k=12, roles=PAIR_ROLES, seed=8)
    got = _mean_loss(z, targets, labels, cfg_for(method), alphas=[0.8, 0.0])
    want = _mean_loss(z, targets, labels, cfg_for(method, alpha=0.8))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", METHODS + ["sft"])
def test_all_masked_batch_is_zero_with_finite_grads(method, tail):
    _, targets, labels, _, z = make_case(k=5, seed=9)
    targets.mask[:] = False
    if method == "sft":
        labels[:] = -100
    zs = z.clone().requires_grad_()
    out = distillation_loss(zs, None if method == "sft" else targets, labels, cfg_for(method, tail))
    out.loss_sum.backward()
    assert out.num_tokens == 0 and float(out.loss_sum.detach()) == 0.0
    assert zs.grad is not None and torch.equal(zs.grad, torch.zeros_like(z))
    assert out.metrics and all(v == 0.0 for v in out.metrics.values())


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", METHODS)
def test_chunking_invariance(method, tail):
    _, targets, labels, _, z = make_case(k=6, seed=10)
    one = _mean_loss(z, targets, labels, cfg_for(method, tail, chunk_tokens=1))
    big = _mean_loss(z, targets, labels, cfg_for(method, tail, chunk_tokens=4096))
    torch.testing.assert_close(one, big, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------------------- by hand


def _hand_targets(k_ids):
    """V = 3, support {0, 1}. T1 = (.5, .3, .2), T0 = (.4, .4, .2), S0 = (.2, .5, .3); student logits 0."""
    probs = {"sft": [0.5, 0.3, 0.2], "base": [0.4, 0.4, 0.2], "student_base": [0.2, 0.5, 0.3]}
    dense = {r: np.log(np.array(p, dtype=np.float32))[None, None, :] for r, p in probs.items()}
    return targets_from_record(TopKRecord.from_dense(0, dense, k_ids))


def test_hand_computed_kd_and_delta_kd():
    targets = _hand_targets(2)
    labels = torch.tensor([[2]])
    z = torch.zeros(1, 1, 3, requires_grad=True)
    # kd, bucket: atoms {0}, {1}, tail {2}: T1 = (.5, .3, .2), S = (1/3, 1/3, 1/3)
    # KL = .5 ln 1.5 + .3 ln .9 + .2 ln .6 = 0.2027326 - 0.0316082 - 0.1021651 = 0.0689593
    out = distillation_loss(z, targets, labels, LossConfig(method="kd", tail="bucket"))
    assert math.isclose(out.loss_sum.item(), 0.0689593, abs_tol=1e-6)
    out.loss_sum.backward()  # dKL/dz = S - T1 = (-1/6, 1/30, 2/15)
    torch.testing.assert_close(z.grad[0, 0], torch.tensor([-1 / 6, 1 / 30, 2 / 15]), rtol=0, atol=1e-6)
    # kd, drop: T1 over {0, 1} = (.625, .375), S = (.5, .5): .625 ln 1.25 + .375 ln .75 = 0.0315840
    z.grad = None
    out = distillation_loss(z, targets, labels, LossConfig(method="kd", tail="drop"))
    assert math.isclose(out.loss_sum.item(), 0.0315840, abs_tol=1e-6)
    out.loss_sum.backward()  # S - T1 on the support, 0 off it
    torch.testing.assert_close(z.grad[0, 0], torch.tensor([-0.125, 0.125, 0.0]), rtol=0, atol=1e-6)
    # delta_kd, bucket, alpha 1: target ~ S0 * T1 / T0 = (.25, .375, .3) / .925
    #   = (0.270270, 0.405405, 0.324324); KL(target || uniform) = sum t ln(3 t)
    #   = 0.270270 * -0.209721 + 0.405405 * 0.195745 + 0.324324 * -0.027399
    #   = -0.056681 + 0.079356 - 0.008886 = 0.013789
    out = distillation_loss(z, targets, labels, LossConfig(method="delta_kd", tail="bucket"))
    assert math.isclose(out.loss_sum.item(), 0.0137885, abs_tol=2e-6)
    # lam = 1: only CE of label 2 under uniform = ln 3
    out = distillation_loss(z, targets, labels, LossConfig(method="delta_kd", lam=1.0))
    assert math.isclose(out.loss_sum.item(), math.log(3), abs_tol=1e-6)
    # top-k mass of T1 on {0, 1}
    assert out.metrics["topk_mass_sft"] == pytest.approx(0.8, abs=1e-6)


# ----------------------------------------------------------------------------------------- errors, metrics


def test_missing_role_is_named():
    _, targets, labels, _, z = make_case(k=4, roles=["sft", "base"], seed=11)
    with pytest.raises(LossInputError, match="'delta_kd' needs role 'student_base'.*batch 7|batch 7.*student_base"):
        distillation_loss(z, targets, labels, cfg_for("delta_kd"))
    with pytest.raises(LossInputError, match="sft_1"):
        distillation_loss(z, targets.with_role("student_base", targets.logprobs["base"], targets.tail["base"]),
                          labels, cfg_for("delta_kd"), pair_alphas=[1.0, 0.5])
    with pytest.raises(LossInputError, match="needs teacher targets"):
        distillation_loss(z, None, labels, cfg_for("kd"))


def test_bad_inputs_are_named():
    _, targets, labels, _, z = make_case(k=4, seed=12)
    bad = labels.clone()
    bad[1, 1] = 500
    targets.mask[1, 1] = True
    with pytest.raises(LossInputError, match="labels out of range"):
        distillation_loss(z, targets, bad, cfg_for("kd"))
    with pytest.raises(LossInputError, match="vocabulary rows"):
        distillation_loss(z[..., :50], targets, labels, cfg_for("kd"))
    with pytest.raises(LossInputError, match="tau"):
        distillation_loss(z, targets, labels, cfg_for("kd", tau=2.0))
    with pytest.raises(LossInputError, match="role 'x'"):
        targets.with_role("x", targets.logprobs["sft"][:, :, :2], targets.tail["sft"])


def test_neg_inf_teacher_logprobs_stay_finite():
    dense, _, labels, mask, z = make_case(k=8, seed=13)
    rec = TopKRecord.from_dense(0, {r: d.numpy() for r, d in dense.items()}, 8, mask.numpy())
    rec.logprobs["base"][..., -1] = -np.inf
    targets = targets_from_record(rec.validate())
    for method in ["rkl", "delta_kd", "delta_anchor", "delta_match", "jsd"]:
        zs = z.clone().requires_grad_()
        out = distillation_loss(zs, targets, labels, cfg_for(method))
        out.loss_sum.backward()
        assert torch.isfinite(out.loss_sum) and torch.isfinite(zs.grad).all(), method


def test_metrics():
    dense, targets, labels, mask, z = make_case(k=9, seed=14)
    out = distillation_loss(z, targets, labels, cfg_for("parallelogram"))
    counted = (labels != -100) & mask
    for role in ROLES:
        want = float(targets.logprobs[role][counted].exp().sum(-1).mean())
        assert out.metrics[f"topk_mass_{role}"] == pytest.approx(want, rel=1e-5)
    weighted = sum(w * out.metrics[f"loss_{c}"] for c, w in PARALLELOGRAM.items())
    assert out.metrics["distill"] == pytest.approx(weighted, rel=1e-5)
    kd = distillation_loss(z, targets, labels, cfg_for("kd"))
    t1 = torch.cat([targets.logprobs["sft"][counted].exp(), targets.tail["sft"][counted][:, None]], -1)
    t1 = t1 / t1.sum(-1, keepdim=True)
    assert kd.metrics["target_entropy"] == pytest.approx(float(-(t1 * t1.log()).sum(-1).mean()), rel=1e-5)
    assert not z.requires_grad and not kd.loss_sum.requires_grad
