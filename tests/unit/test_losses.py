"""common.losses against the naive dense reference (tests/unit/loss_reference.py): values and gradients
through both student inputs (logits; hidden states + LM head), k = |V| equals dense, atoms at k < |V|,
wire dtypes, identities, all-masked batches, a hand-computed case, errors and metrics."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.config import LossConfig
from common.losses import HiddenStates, LossInputError, distillation_loss, targets_from_record
from common.topk import TopKRecord
from tests.unit.loss_cases import (
    KINDS,
    METHODS,
    PAIR_ROLES,
    PARALLELOGRAM,
    ROLES,
    TAILS,
    assert_match,
    cfg_for,
    make_case,
    run_both,
)
from tests.unit.loss_reference import reference_loss
from tests.unit.tolerances import TOLERANCES

# Tiny tensors: one intra-op thread is ~100x faster than two on a loaded 2-core machine (spin-waits).
torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", METHODS)
def test_full_support_equals_dense(method, tail, kind):
    """k = |V|: the sparse path (either tail mode) is the dense formula, values and gradients."""
    case = make_case(tau=1.5)
    assert_match(*run_both(case, cfg_for(method, tail, tau=1.5), kind=kind), TOLERANCES["float32"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", METHODS)
def test_partial_support_equals_reference_atoms(method, tail, kind):
    """k < |V|: equals the reference's atoms built from dense probabilities (bucket / renormalised)."""
    case = make_case(k=9, seed=1)
    assert_match(*run_both(case, cfg_for(method, tail), atoms=True, kind=kind), TOLERANCES["float32"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", METHODS)
def test_wire_dtypes_match_dense(method, tail, wire, kind):
    case = make_case(wire=wire, seed=2)
    assert_match(*run_both(case, cfg_for(method, tail), kind=kind), TOLERANCES[wire])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("method", ["kd", "delta_kd", "jsd", "delta_match"])
def test_bf16_student(method, kind):
    """bf16 student logits, or bf16 hidden states with an fp32 head (autocast's master weights)."""
    case = make_case(seed=3)
    got = run_both(case, cfg_for(method), kind=kind, student_dtype=torch.bfloat16)
    assert_match(*got, TOLERANCES["student_bfloat16"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", ["delta_kd", "delta_inverse", "delta_match", "parallelogram"])
def test_several_pairs_match_reference(method, tail, kind):
    """Several teacher pairs: the student_shift form's sum_j alpha_j (T1_j - T0_j) (the paper form refuses them)."""
    case = make_case(k=11, roles=PAIR_ROLES, seed=4)
    got = run_both(case, cfg_for(method, tail, delta_form="student_shift"), alphas=[0.7, -0.4], atoms=True,
                   kind=kind)
    assert_match(*got, TOLERANCES["float32"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("base_kind", ["logits", "hidden"])
@pytest.mark.parametrize("method", ["delta_kd", "delta_anchor", "delta_match", "parallelogram"])
def test_frozen_base_output_supplies_student_base(method, base_kind, kind):
    """lp_S0 from the frozen base's logits or hidden states + head (not a role of the record)."""
    case = make_case(k=10, seed=15, base_kind=base_kind)
    assert "student_base" not in case.targets.roles
    got = run_both(case, cfg_for(method), atoms=True, kind=kind, base_kind=base_kind)
    assert_match(*got, TOLERANCES["float32"])


@pytest.mark.parametrize("kind", KINDS)
def test_sft_is_cross_entropy(kind):
    case = make_case(pad=0, tau=1.0)
    got = run_both(case, LossConfig(method="sft"), kind=kind)
    assert_match(*got, TOLERANCES["float32"])
    z = case.z.clone().requires_grad_()
    out = distillation_loss(z, None, case.labels, LossConfig(method="sft"))
    want = torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), case.labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(out.loss_sum, want.float(), rtol=1e-6, atol=1e-4)
    assert out.num_tokens == int((case.labels != -100).sum())


@settings(max_examples=16, deadline=None)
@given(b=st.integers(1, 3), t=st.integers(1, 6), v=st.integers(2, 40), data=st.data())
def test_random_shapes(b, t, v, data):
    k = data.draw(st.integers(1, v))
    method = data.draw(st.sampled_from(METHODS))
    tail = data.draw(st.sampled_from(TAILS))
    kind = data.draw(st.sampled_from(KINDS))
    chunk = data.draw(st.integers(1, 7))
    case = make_case(b, t, v, k=k, seed=v, pad=data.draw(st.integers(0, 2)), h=data.draw(st.integers(1, 9)))
    if not bool((case.labels != -100).any()):  # keep at least one counted token
        case = make_case(b, t, v, k=k, seed=v + 1000, pad=0)
    if not bool((case.labels != -100).any()):
        return
    cfg = cfg_for(method, tail, loss_chunk_rows=chunk)
    # The float32 tolerances assume ~40 counted tokens (gradient entries of the mean ~1/N); here N may be 1,
    # so the gradients' absolute bounds scale with 40 / N.
    scale = max(1.0, 40 / int((case.labels != -100).sum()))
    tol = TOLERANCES["float32"]
    tol = dataclasses.replace(tol, grad_atol=tol.grad_atol * scale, head_grad_atol=tol.head_grad_atol * scale)
    assert_match(*run_both(case, cfg, atoms=k < v, kind=kind), tol)


# ----------------------------------------------------------------------------------------- identities


def _mean_loss(z, targets, labels, cfg, alphas=None):
    zs = z.clone().requires_grad_()
    out = distillation_loss(zs, targets, labels, cfg, pair_alphas=alphas)
    (out.loss_sum / out.num_tokens).backward()
    return out.loss_sum.detach() / out.num_tokens, zs.grad


@pytest.mark.parametrize("tail", TAILS)
def test_delta_kd_is_kd_when_student_base_is_base(tail):
    case = make_case(k=13, seed=5)
    dense = dict(case.dense, student_base=case.dense["base"])
    rec = TopKRecord.from_dense(0, {r: d.numpy() for r, d in dense.items()}, 13, (case.labels != -100).numpy())
    targets = targets_from_record(rec)
    got = _mean_loss(case.z, targets, case.labels, cfg_for("delta_kd", tail, alpha=1.0))
    want = _mean_loss(case.z, targets, case.labels, cfg_for("kd", tail))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail", TAILS)
def test_alpha_zero_targets_the_student_base(tail):
    """student_shift form: alpha = 0 leaves S0 (the paper form's alpha = 0 is kd: test_losses_delta_form)."""
    case = make_case(k=13, seed=6)
    t = case.targets
    got = _mean_loss(case.z, t, case.labels, cfg_for("delta_kd", tail, alpha=0.0, delta_form="student_shift"))
    as_sft = t.with_role("sft", t.logprobs["student_base"], t.tail["student_base"])
    want = _mean_loss(case.z, as_sft, case.labels, cfg_for("kd", tail))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tail", TAILS)
def test_jsd_endpoints(tail):
    """GKD/TRL convention: beta = 0 is forward KL (kd), beta = 1 is reverse KL (rkl)."""
    case = make_case(k=10, seed=7)
    for beta, other in [(0.0, "kd"), (1.0, "rkl")]:
        got = _mean_loss(case.z, case.targets, case.labels, cfg_for("jsd", tail, jsd_beta=beta))
        want = _mean_loss(case.z, case.targets, case.labels, cfg_for(other, tail))
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("method", ["delta_kd", "delta_inverse", "delta_match"])
def test_zero_weighted_extra_pair_is_one_pair(method):
    case = make_case(k=12, roles=PAIR_ROLES, seed=8)
    cfg = cfg_for(method, delta_form="student_shift")  # several pairs: the student_shift form only
    got = _mean_loss(case.z, case.targets, case.labels, cfg, alphas=[0.8, 0.0])
    want = _mean_loss(case.z, case.targets, case.labels, cfg.model_copy(update={"alpha": 0.8}))
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def _no_rows(case):
    """The case with every position uncounted: labels all -100, targets with N = 0 rows."""
    labels = torch.full_like(case.labels, -100)
    rec = TopKRecord.from_dense(7, {r: d.numpy() for r, d in case.dense.items()}, 5, np.zeros(labels.shape, bool))
    return labels, targets_from_record(rec)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", METHODS + ["sft"])
def test_all_masked_batch_is_zero_with_finite_grads(method, tail, kind):
    case = make_case(k=5, seed=9)
    labels, targets = _no_rows(case)
    assert targets.shape == (0, 5)
    if kind == "logits":
        params = [case.z.clone().requires_grad_()]
        student = params[0]
    else:
        params = [x.clone().requires_grad_() for x in (case.hidden, case.weight, case.bias)]
        student = HiddenStates(*params)
    out = distillation_loss(student, None if method == "sft" else targets, labels, cfg_for(method, tail))
    out.loss_sum.backward()
    assert out.num_tokens == 0 and float(out.loss_sum.detach()) == 0.0
    for p in params:
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))
    assert out.metrics and all(v == 0.0 for v in out.metrics.values())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", METHODS)
def test_chunking_invariance(method, tail, kind):
    case = make_case(k=6, seed=10)
    one = run_both(case, cfg_for(method, tail, loss_chunk_rows=1), kind=kind)
    big = run_both(case, cfg_for(method, tail, loss_chunk_rows=4096), kind=kind)
    torch.testing.assert_close(one[0], big[0], rtol=1e-6, atol=1e-6)
    for a, b in zip(one[1], big[1]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


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
    # the same through hidden states + head: hidden 0, W = I (logits = hidden); dL/dhidden = dL/dz W = S - T1,
    # dL/dW = (dL/dz)^T hidden = 0 at hidden 0
    hid = torch.zeros(1, 1, 3, requires_grad=True)
    w = torch.eye(3, requires_grad=True)
    out = distillation_loss(HiddenStates(hid, w), targets, labels, LossConfig(method="kd", tail="bucket"))
    assert math.isclose(out.loss_sum.item(), 0.0689593, abs_tol=1e-6)
    out.loss_sum.backward()
    torch.testing.assert_close(hid.grad[0, 0], torch.tensor([-1 / 6, 1 / 30, 2 / 15]), rtol=0, atol=1e-6)
    torch.testing.assert_close(w.grad, torch.zeros(3, 3), rtol=0, atol=0)
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
    case = make_case(k=4, roles=["sft", "base"], seed=11)
    t, z, labels = case.targets, case.z, case.labels
    with pytest.raises(LossInputError, match="'delta_kd' needs role 'student_base'.*|batch 7.*student_base"):
        distillation_loss(z, t, labels, cfg_for("delta_kd"))
    with pytest.raises(LossInputError, match="sft_1"):
        distillation_loss(z, t.with_role("student_base", t.logprobs["base"], t.tail["base"]),
                          labels, cfg_for("delta_kd", delta_form="student_shift"), pair_alphas=[1.0, 0.5])
    with pytest.raises(LossInputError, match="needs teacher targets"):
        distillation_loss(z, None, labels, cfg_for("kd"))


def test_bad_inputs_are_named():
    case = make_case(k=4, seed=12)
    t, z, labels = case.targets, case.z, case.labels
    bad = labels.clone()
    bad[t.rows[3] // labels.shape[1], t.rows[3] % labels.shape[1]] = 500
    with pytest.raises(LossInputError, match="labels out of range"):
        distillation_loss(z, t, bad, cfg_for("kd"))
    with pytest.raises(LossInputError, match="vocabulary rows"):
        distillation_loss(z[..., :50], t, labels, cfg_for("kd"))
    with pytest.raises(LossInputError, match="tau"):
        distillation_loss(z, t, labels, cfg_for("kd", tau=2.0))
    with pytest.raises(LossInputError, match="role 'x'"):
        t.with_role("x", t.logprobs["sft"][:, :2], t.tail["sft"])
    with pytest.raises(LossInputError, match=r"\[B, T\]"):
        distillation_loss(z[:2], t, labels[:2], cfg_for("kd"))
    with pytest.raises(LossInputError, match="do not fit"):
        distillation_loss(HiddenStates(case.hidden, case.weight[:, :3]), t, labels, cfg_for("kd"))


def test_rows_must_be_the_labelled_positions():
    """Every counted row has a label and every label has a row, else an error naming the batch."""
    case = make_case(k=4, seed=16)
    t, z = case.targets, case.z
    extra = case.labels.clone()
    free = (extra.reshape(-1) == -100).nonzero()[0, 0]
    extra.view(-1)[free] = 1  # a label where the teachers have no row
    with pytest.raises(LossInputError, match=rf"batch 7: .*labelled positions without a row.*{int(free)}"):
        distillation_loss(z, t, extra, cfg_for("kd"))
    fewer = case.labels.clone()
    fewer.view(-1)[t.rows[0]] = -100  # a teacher row whose label is ignored
    with pytest.raises(LossInputError, match=rf"batch 7: .*rows without a label.*{int(t.rows[0])}"):
        distillation_loss(z, t, fewer, cfg_for("kd"))


def test_neg_inf_teacher_logprobs_stay_finite():
    case = make_case(k=8, seed=13)
    rec = TopKRecord.from_dense(0, {r: d.numpy() for r, d in case.dense.items()}, 8,
                                (case.labels != -100).numpy())
    rec.logprobs["base"][..., -1] = -np.inf
    targets = targets_from_record(rec.validate())
    for method in ["rkl", "delta_kd", "delta_anchor", "delta_match", "jsd"]:
        zs = case.z.clone().requires_grad_()
        out = distillation_loss(zs, targets, case.labels, cfg_for(method))
        out.loss_sum.backward()
        assert torch.isfinite(out.loss_sum) and torch.isfinite(zs.grad).all(), method


def test_metrics():
    case = make_case(k=9, seed=14)
    t, z = case.targets, case.z
    out = distillation_loss(z, t, case.labels, cfg_for("parallelogram"))
    for role in ROLES:
        want = float(t.logprobs[role].exp().sum(-1).mean())
        assert out.metrics[f"topk_mass_{role}"] == pytest.approx(want, rel=1e-5)
    weighted = sum(w * out.metrics[f"loss_{c}"] for c, w in PARALLELOGRAM.items())
    assert out.metrics["distill"] == pytest.approx(weighted, rel=1e-5)
    kd = distillation_loss(z, t, case.labels, cfg_for("kd"))
    t1 = torch.cat([t.logprobs["sft"].exp(), t.tail["sft"][:, None]], -1)
    t1 = t1 / t1.sum(-1, keepdim=True)
    assert kd.metrics["target_entropy"] == pytest.approx(float(-(t1 * t1.log()).sum(-1).mean()), rel=1e-5)
    assert not z.requires_grad and not kd.loss_sum.requires_grad
    assert set(kd.metrics) == {"ce", "distill", "target_entropy", "topk_mass_sft", "topk_mass_base",
                               "topk_mass_student_base"}


def test_autocast_runs_the_head_products_in_its_dtype():
    """Under autocast (bf16 on GPU; here the CPU's bf16 autocast) the head's products run in bf16 like
    the model's own lm_head: equal to the reference on bf16-rounded inputs and logits, within bf16."""
    case = make_case(k=9, seed=17)
    cfg = cfg_for("delta_kd")
    params = [x.clone().requires_grad_() for x in (case.hidden, case.weight, case.bias)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = distillation_loss(HiddenStates(*params), case.targets, case.labels, cfg)
    (out.loss_sum / out.num_tokens).backward()
    ref_params = [x.to(torch.bfloat16).double().requires_grad_() for x in (case.hidden, case.weight, case.bias)]
    z = ref_params[0] @ ref_params[1].T + ref_params[2]
    z = z + (z.to(torch.bfloat16).double() - z).detach()  # a bf16 linear's output rounding, gradient 1
    ref, n = reference_loss(z, {r: d.double() for r, d in case.dense.items()}, case.labels, cfg,
                            ids=case.targets.ids)
    (ref / n).backward()
    fp32 = distillation_loss(case.z, case.targets, case.labels, cfg).loss_sum / n
    got = out.loss_sum.detach().double() / n
    assert abs(float(got) - float(fp32)) > 1e-5  # the bf16 products did run
    # bf16 logits (8-bit mantissa, |z| ~ 3-10: ~0.02 each) are the reference's too: fp32 agreement on the
    # loss; the gradient products in bf16 (g rounded to 2^-8 relative, entries <= ~0.1): measured <= 3.3e-4.
    torch.testing.assert_close(got, ref.detach() / n, rtol=1e-5, atol=1e-5)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=0, atol=1e-3)
