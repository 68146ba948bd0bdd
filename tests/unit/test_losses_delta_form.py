"""`loss.delta_form`: the paper's target T1 + alpha (S0 - T0) and the first form S0 + alpha (T1 - T0), each
against the dense reference (tests/unit/loss_reference.py; values and gradients, both student inputs,
k = |V| dense and k < |V| atoms, the objectives, the student-base tail), and the identities that pin the
forms: paper alpha = 0 is kd to the bit; S0 = T0 makes the paper target T1 for every alpha; alpha = 1 is
the same bits under both forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from common.config import ConfigError, LossConfig, config_from_dict
from common.losses import HiddenStates, LossInputError, distillation_loss, targets_from_record
from common.topk import TopKRecord
from tests.unit.loss_cases import (
    KINDS,
    PAIR_ROLES,
    TAILS,
    assert_match,
    cfg_for,
    forced_label_targets,
    make_case,
    run_both,
)
from tests.unit.test_config import MINIMAL
from tests.unit.tolerances import TOLERANCES

torch.set_num_threads(1)

FORMS = ["paper", "student_shift"]
DELTA_METHODS = ["delta_kd", "delta_anchor", "delta_inverse", "delta_match", "parallelogram"]
# 0: the paper's kd end; 0.35: between kd and the full shift; 1.6: beyond it (extrapolation)
ALPHAS = [0.0, 0.35, 1.6]
OBJECTIVES = ["forward_kl", "reverse_kl", "sampled_token"]


# ----------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("alpha", ALPHAS[1:])  # alpha = 0: the partial-support battery and the kd identity
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", DELTA_METHODS)
def test_full_support_equals_dense(method, form, alpha, tail, kind):
    """k = |V|: the sparse path is the dense formula of each form, values and gradients."""
    case = make_case(tau=1.5, seed=40)
    cfg = cfg_for(method, tail, tau=1.5, alpha=alpha, delta_form=form)
    assert_match(*run_both(case, cfg, kind=kind), TOLERANCES["float32"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("method", DELTA_METHODS)
def test_partial_support_equals_reference_atoms(method, form, alpha, tail, kind):
    case = make_case(k=9, seed=41)
    cfg = cfg_for(method, tail, alpha=alpha, delta_form=form)
    assert_match(*run_both(case, cfg, atoms=True, kind=kind), TOLERANCES["float32"])


@pytest.mark.parametrize("wire", ["float16", "bfloat16"])
@pytest.mark.parametrize("method", ["delta_kd", "delta_anchor", "delta_inverse"])
def test_paper_form_wire_dtypes(method, wire):
    case = make_case(wire=wire, seed=42)
    assert_match(*run_both(case, cfg_for(method, alpha=0.5)), TOLERANCES[wire])


@pytest.mark.parametrize("base_kind", ["logits", "hidden"])
@pytest.mark.parametrize("method", ["delta_kd", "delta_anchor", "delta_match"])
def test_paper_form_from_the_frozen_base_output(method, base_kind):
    case = make_case(k=10, seed=43, base_kind=base_kind)
    got = run_both(case, cfg_for(method, alpha=0.6), atoms=True, kind="hidden", base_kind=base_kind)
    assert_match(*got, TOLERANCES["float32"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_match_reference(objective, form, tail, kind):
    """The on-policy objectives score the form's target (sampled_token: A = log P(y) - log S(y))."""
    case = make_case(k=7, seed=44)
    targets = forced_label_targets(case, k=7)
    cfg = cfg_for("delta_kd", tail, objective=objective, alpha=0.4, delta_form=form)
    assert_match(*run_both(case, cfg, atoms=True, kind=kind, targets=targets), TOLERANCES["float32"])


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("alpha", [0.0, 0.45, 1.6])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_student_base_tail_paper_form_matches_reference(objective, alpha, kind):
    """The dense target: the paper move T1 + alpha (S0 - T0) - S0 per support atom, the bucket's off it."""
    case = make_case(k=9, seed=45, base_kind="logits", tau=1.5)
    cfg = cfg_for("delta_kd", "student_base", objective=objective, tau=1.5, alpha=alpha)
    assert_match(*run_both(case, cfg, kind=kind, base_kind="logits"), TOLERANCES["float32"])


@pytest.mark.parametrize("form", FORMS)
def test_student_base_tail_delta_inverse_both_forms(form):
    case = make_case(k=9, seed=46, base_kind="hidden")
    cfg = cfg_for("delta_inverse", "student_base", alpha=0.3, delta_form=form)
    assert_match(*run_both(case, cfg, kind="hidden", base_kind="hidden"), TOLERANCES["float32"])


@pytest.mark.parametrize("method", ["delta_kd", "delta_inverse"])
def test_student_base_tail_at_full_support_is_the_bucket_loss(method):
    """k = |V|, paper form: no token is off the support, so the dense target is the bucket loss's."""
    case = make_case(seed=47, base_kind="logits")
    bucket = run_both(case, cfg_for(method, "bucket", alpha=0.4), base_kind="logits")
    dense = run_both(case, cfg_for(method, "student_base", alpha=0.4), base_kind="logits")
    torch.testing.assert_close(dense[0], bucket[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dense[1][0], bucket[1][0], rtol=0, atol=1e-7)


# ----------------------------------------------------------------------------------------- identities


def _loss_and_grad(case, cfg, targets=None, base=None):
    zs = case.z.clone().requires_grad_()
    out = distillation_loss(zs, case.targets if targets is None else targets, case.labels, cfg, student_base=base)
    out.loss_sum.backward()
    return out, zs.grad


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_paper_alpha_zero_is_kd_exactly(objective, tail):
    """alpha = 0 in the paper form is kd: the same loss, gradient and target entropy, bit for bit."""
    case = make_case(k=7, seed=48)
    targets = forced_label_targets(case, k=7)
    got, g_got = _loss_and_grad(case, cfg_for("delta_kd", tail, objective=objective, alpha=0.0), targets)
    want, g_want = _loss_and_grad(case, cfg_for("kd", tail, objective=objective), targets)
    assert torch.equal(got.loss_sum, want.loss_sum) and torch.equal(g_got, g_want)
    for key in ("distill", "target_entropy", "advantage"):
        assert got.metrics.get(key) == want.metrics.get(key)


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", ["delta_kd", "delta_anchor"])
@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0, 2.5])
def test_paper_target_is_t1_when_the_student_base_is_the_base_teacher(alpha, method, tail):
    """S0 = T0: T1 + alpha (S0 - T0) = T1 for every alpha, so delta_kd and delta_anchor are kd. (Not so for
    delta_kd in the student_shift form, where alpha != 1 leaves S0 + alpha (T1 - T0) between T0 and T1.)"""
    case = make_case(k=13, seed=49)
    dense = dict(case.dense, student_base=case.dense["base"])
    rec = TopKRecord.from_dense(0, {r: d.numpy() for r, d in dense.items()}, 13, (case.labels != -100).numpy())
    targets = targets_from_record(rec)
    got, g_got = _loss_and_grad(case, cfg_for(method, tail, alpha=alpha), targets)
    want, g_want = _loss_and_grad(case, cfg_for("kd", tail), targets)
    # S0 - T0 is exactly 0 here; what remains is a second log_softmax of already normalised atoms (T1's;
    # delta_anchor: the student's) and, at alpha = 1, the rounding of T0 + (T1 - T0): a few fp32 ulps of
    # the loss and of the gradient of loss_sum (entries up to ~1, ulp 1.2e-7; measured <= 2.4e-7).
    torch.testing.assert_close(got.loss_sum, want.loss_sum, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(g_got, g_want, rtol=0, atol=1e-6)
    if alpha != 1.0 and method == "delta_kd":
        other, _ = _loss_and_grad(case, cfg_for(method, tail, alpha=alpha, delta_form="student_shift"), targets)
        assert abs(float(other.loss_sum.detach() - want.loss_sum.detach())) > 1e-3  # the first form is not kd


@pytest.mark.parametrize("method, tail", [(m, t) for m in DELTA_METHODS for t in TAILS]
                         + [("delta_kd", "student_base"), ("delta_inverse", "student_base")])
def test_alpha_one_is_the_same_bits_in_both_forms(method, tail):
    """At alpha = 1 the paper form computes S0 + (T1 - T0) exactly as student_shift does: the README's
    default table cannot move."""
    base_kind = "logits" if tail == "student_base" else None
    case = make_case(k=9, seed=50, base_kind=base_kind)
    base = None if case.base_head is None else HiddenStates(*case.base_head)
    paper, g_paper = _loss_and_grad(case, cfg_for(method, tail, alpha=1.0), base=base)
    first, g_first = _loss_and_grad(case, cfg_for(method, tail, alpha=1.0, delta_form="student_shift"), base=base)
    assert torch.equal(paper.loss_sum, first.loss_sum) and torch.equal(g_paper, g_first)
    assert paper.metrics == first.metrics


@pytest.mark.parametrize("tail", TAILS + ["student_base"])
@pytest.mark.parametrize("objective", ["reverse_kl", "sampled_token"])
def test_alpha_one_objectives_are_the_same_bits_in_both_forms(objective, tail):
    base_kind = "logits" if tail == "student_base" else None
    case = make_case(k=7, seed=55, base_kind=base_kind)
    targets = forced_label_targets(case, k=7)
    base = None if case.base_head is None else HiddenStates(*case.base_head)
    cfgs = [cfg_for("delta_kd", tail, objective=objective, delta_form=form) for form in FORMS]
    (paper, g_paper), (first, g_first) = (_loss_and_grad(case, c, targets, base) for c in cfgs)
    assert torch.equal(paper.loss_sum, first.loss_sum) and torch.equal(g_paper, g_first)
    assert paper.metrics == first.metrics


@pytest.mark.parametrize("method", ["delta_kd", "delta_anchor", "delta_inverse", "delta_match"])
def test_the_forms_differ_off_alpha_one(method):
    case = make_case(k=9, seed=51)
    paper, _ = _loss_and_grad(case, cfg_for(method, alpha=0.5))
    first, _ = _loss_and_grad(case, cfg_for(method, alpha=0.5, delta_form="student_shift"))
    assert abs(float(paper.loss_sum.detach() - first.loss_sum.detach())) > 1e-3


@pytest.mark.parametrize("method", ["delta_kd", "delta_anchor", "delta_inverse", "delta_match", "parallelogram"])
def test_all_masked_batch_is_zero_in_the_paper_form(method):
    case = make_case(k=5, seed=52)
    labels = torch.full_like(case.labels, -100)
    rec = TopKRecord.from_dense(7, {r: d.numpy() for r, d in case.dense.items()}, 5, np.zeros(labels.shape, bool))
    z = case.z.clone().requires_grad_()
    out = distillation_loss(z, targets_from_record(rec), labels, cfg_for(method, alpha=0.5))
    out.loss_sum.backward()
    assert out.num_tokens == 0 and float(out.loss_sum.detach()) == 0.0
    assert torch.equal(z.grad, torch.zeros_like(z))


@pytest.mark.parametrize("form", FORMS)
def test_chunking_invariance(form):
    case = make_case(k=6, seed=53)
    one = run_both(case, cfg_for("parallelogram", alpha=0.7, delta_form=form, loss_chunk_rows=1))
    big = run_both(case, cfg_for("parallelogram", alpha=0.7, delta_form=form, loss_chunk_rows=4096))
    torch.testing.assert_close(one[0], big[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(one[1][0], big[1][0], rtol=1e-6, atol=1e-6)


def test_hand_computed_paper_and_student_shift_at_alpha_half():
    """V = 3, support {0, 1}, tail bucket {2}: T1 = (.5, .3, .2), T0 = (.4, .4, .2), S0 = (.2, .5, .3);
    student logits 0 (uniform S)."""
    probs = {"sft": [0.5, 0.3, 0.2], "base": [0.4, 0.4, 0.2], "student_base": [0.2, 0.5, 0.3]}
    dense = {r: np.log(np.array(p, dtype=np.float32))[None, None, :] for r, p in probs.items()}
    targets = targets_from_record(TopKRecord.from_dense(0, dense, 2))
    labels = torch.tensor([[2]])
    # paper: P ~ T1 sqrt(S0 / T0) = (.5 sqrt .5, .3 sqrt 1.25, .2 sqrt 1.5) = (0.353553, 0.335410, 0.244949),
    # Z = 0.933913, P = (0.378572, 0.359145, 0.262283); KL(P || uniform) = sum p ln 3p = 0.0120905;
    # dKL/dz = S - P = (-0.045239, -0.025812, +0.071051)
    z = torch.zeros(1, 1, 3, requires_grad=True)
    out = distillation_loss(z, targets, labels, LossConfig(method="delta_kd", alpha=0.5))
    assert math.isclose(out.loss_sum.item(), 0.0120905, abs_tol=1e-6)
    out.loss_sum.backward()
    torch.testing.assert_close(z.grad[0, 0], torch.tensor([-0.045239, -0.025812, 0.071051]), rtol=0, atol=2e-6)
    # student_shift: P ~ S0 sqrt(T1 / T0) = (.2 sqrt 1.25, .5 sqrt .75, .3) = (0.223607, 0.433013, 0.3),
    # Z = 0.956619, P = (0.233747, 0.452649, 0.313604); KL(P || uniform) = 0.0364076
    out = distillation_loss(z, targets, labels, LossConfig(method="delta_kd", alpha=0.5, delta_form="student_shift"))
    assert math.isclose(out.loss_sum.item(), 0.0364076, abs_tol=1e-6)


# ----------------------------------------------------------------------------------------- config, errors


def test_config_default_is_the_paper_form_and_refuses_extra_pairs_there():
    assert LossConfig().delta_form == "paper"
    with pytest.raises(ValidationError, match="delta_form"):
        LossConfig(delta_form="paper_form")
    pair = {"base": {"path": "b1"}, "sft": {"path": "s1"}, "alpha": 0.5}
    models = {**MINIMAL["models"], "extra_pairs": [pair]}
    for method in ("delta_kd", "delta_inverse", "delta_match", "parallelogram"):
        with pytest.raises(ConfigError, match=r"models.extra_pairs \(1\) with loss.delta_form='paper'.*"
                                              r"loss.delta_form='student_shift'"):
            config_from_dict({**MINIMAL, "models": models, "loss": {"method": method}})
    ok = config_from_dict({**MINIMAL, "models": models, "loss": {"delta_form": "student_shift"}})
    assert ok.loss.delta_form == "student_shift"
    # methods that do not read the pairs' shift: the extra pairs are unused, as before
    for method in ("kd", "delta_anchor"):
        assert config_from_dict({**MINIMAL, "models": models, "loss": {"method": method}}).loss.method == method
    assert not LossConfig(method="delta_kd").delta_form_matters
    assert LossConfig(method="delta_anchor", alpha=0.5).delta_form_matters
    assert not LossConfig(method="kd", alpha=0.5).delta_form_matters


def test_the_loss_refuses_several_pairs_in_the_paper_form():
    case = make_case(k=6, seed=54, roles=PAIR_ROLES)
    with pytest.raises(LossInputError, match="loss.delta_form='paper' with loss.method='delta_kd' takes one"):
        distillation_loss(case.z, case.targets, case.labels, cfg_for("delta_kd"), pair_alphas=[1.0, 0.5])
    out = distillation_loss(case.z, case.targets, case.labels, cfg_for("kd"), pair_alphas=[1.0, 0.5])
    assert out.num_tokens > 0  # kd reads no shift: extra alphas are unused
