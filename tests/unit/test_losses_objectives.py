"""The on-policy objectives (reverse KL, sampled token), `tail: student_base` and GKD/TRL's jsd, each
against an independent dense reference (values and gradients, both student input kinds)."""

from __future__ import annotations

import pytest
import torch
from pydantic import ValidationError

from common.config import ConfigError, LossConfig, config_from_dict
from common.losses import LossInputError, distillation_loss, generalized_jsd, targets_from_record
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
from tests.unit.loss_reference import reference_loss, trl_generalized_jsd
from tests.unit.tolerances import TOLERANCES

torch.set_num_threads(1)
OBJECTIVES = ["forward_kl", "reverse_kl", "sampled_token"]


# ----------------------------------------------------------------------------------------- GKD / TRL jsd


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.3, 0.5, 0.9, 1.0])
def test_jsd_matches_trls_formula(beta):
    """Dense (k = |V| = 50) jsd equals TRL's generalized_jsd_loss formula, values and logit gradients."""
    g = torch.Generator().manual_seed(21)
    n, v = 40, 50
    student = (torch.randn(n, v, generator=g, dtype=torch.float64) * 2).requires_grad_()
    teacher = torch.randn(n, v, generator=g, dtype=torch.float64) * 2
    want = trl_generalized_jsd(student, teacher, beta)
    (want.mean()).backward()
    lp_t, lp_s = torch.log_softmax(teacher, -1), torch.log_softmax(student.detach(), -1)
    torch.testing.assert_close(generalized_jsd(lp_t, lp_s, beta), want.detach(), rtol=1e-10, atol=1e-12)
    # through the loss: a k = |V| record of the teacher, lam = 0, one position per row
    rec = TopKRecord.from_dense(3, {"sft": lp_t.float().numpy()[None]}, v)
    z = student.detach().float()[None].clone().requires_grad_()
    labels = torch.zeros(1, n, dtype=torch.long)
    out = distillation_loss(z, targets_from_record(rec), labels, LossConfig(method="jsd", jsd_beta=beta, lam=0.0))
    (out.loss_sum / n).backward()
    # fp32 logits and log-probs against TRL's formula in fp64: ~1e-6 relative
    torch.testing.assert_close(out.loss_sum.double() / n, want.mean().detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z.grad[0].double(), student.grad, rtol=0, atol=1e-6)


def test_jsd_endpoints_are_trls():
    """beta = 0 is KL(teacher || student) (forward), beta = 1 is KL(student || teacher) (reverse)."""
    g = torch.Generator().manual_seed(22)
    s, t = (torch.log_softmax(torch.randn(8, 30, generator=g, dtype=torch.float64), -1) for _ in range(2))
    fwd = (t.exp() * (t - s)).sum(-1)
    rev = (s.exp() * (s - t)).sum(-1)
    torch.testing.assert_close(generalized_jsd(t, s, 0.0), fwd)
    torch.testing.assert_close(generalized_jsd(t, s, 1.0), rev)
    # between the endpoints the mixture formula is continuous and tends to 0 (not to KL) as beta -> 0
    assert float(generalized_jsd(t, s, 1e-6).max()) < 1e-4


# ----------------------------------------------------------------------------------------- objectives


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("method", ["kd", "delta_kd"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_objectives_match_reference(objective, method, tail, kind):
    """Support = top-k plus the label (K = k + 1), as on-policy records are built."""
    case = make_case(k=7, seed=23)
    targets = forced_label_targets(case, k=7)
    assert targets.shape[1] == 8
    cfg = cfg_for(method, tail, objective=objective)
    assert_match(*run_both(case, cfg, atoms=True, kind=kind, targets=targets), TOLERANCES["float32"])


def test_objectives_identities():
    case = make_case(k=7, seed=24)
    targets = forced_label_targets(case, k=7)
    z, labels = case.z, case.labels

    def loss(cfg):
        return float(distillation_loss(z, targets, labels, cfg).loss_sum)

    assert loss(cfg_for("kd", objective="reverse_kl")) == pytest.approx(loss(cfg_for("rkl")), rel=1e-6)
    assert loss(cfg_for("kd", objective="forward_kl")) == pytest.approx(loss(cfg_for("kd")), rel=1e-6)


def test_sampled_token_reports_the_mean_advantage_and_needs_the_label_in_the_support():
    case = make_case(k=7, seed=25)
    targets = forced_label_targets(case, k=7)
    out = distillation_loss(case.z, targets, case.labels, cfg_for("delta_kd", objective="sampled_token", lam=0.0))
    zr = case.z.double()
    ref, n = reference_loss(zr, {r: d.double() for r, d in case.dense.items()}, case.labels,
                            cfg_for("delta_kd", objective="sampled_token", lam=0.0), ids=targets.ids)
    assert out.metrics["distill"] == pytest.approx(float(ref) / n, rel=1e-5)
    # A = log P(y) - log S(y) on the bucket atoms, P = softmax(S0 + T1 - T0), recomputed densely here
    counted = case.labels != -100
    ids, y = targets.ids, case.labels[counted]

    def atoms(lp):  # dense log-probs [N, V] -> bucket atom probabilities [N, K + 1]
        p = lp.double().exp()
        sup = p.gather(-1, ids)
        return torch.cat([sup, (p.sum(-1) - sup.sum(-1))[:, None]], -1)

    a = {r: atoms(case.dense[r][counted]) for r in ("sft", "base", "student_base")}
    target = a["student_base"] * a["sft"] / a["base"]
    target = target / target.sum(-1, keepdim=True)
    j = (ids == y[:, None]).int().argmax(-1, keepdim=True)
    q = atoms(torch.log_softmax(zr[counted][:, : case.dense["sft"].shape[-1]], -1))  # padded rows cut
    adv = (target.gather(-1, j) / q.gather(-1, j)).log()
    assert out.metrics["advantage"] == pytest.approx(float(adv.mean()), rel=1e-4, abs=1e-6)
    with pytest.raises(LossInputError, match=r"batch 7: loss.objective='sampled_token' needs each label"):
        distillation_loss(case.z, case.targets, case.labels, cfg_for("kd", objective="sampled_token"))


# ----------------------------------------------------------------------------------------- tail: student_base


@pytest.mark.parametrize("base_kind", ["logits", "hidden"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_student_base_tail_delta_kd_matches_reference(objective, kind, base_kind):
    case = make_case(k=9, seed=26, base_kind=base_kind, tau=1.5)
    cfg = cfg_for("delta_kd", "student_base", objective=objective, tau=1.5)
    got = run_both(case, cfg, kind=kind, base_kind=base_kind)
    assert_match(*got, TOLERANCES["float32"])


@pytest.mark.parametrize("kind", KINDS)
def test_student_base_tail_delta_inverse_matches_reference(kind):
    case = make_case(k=9, seed=27, base_kind="logits")
    assert_match(*run_both(case, cfg_for("delta_inverse", "student_base"), kind=kind, base_kind="logits"),
                 TOLERANCES["float32"])


@pytest.mark.parametrize("method", ["delta_kd", "delta_inverse"])
def test_student_base_tail_several_pairs(method):
    case = make_case(k=9, seed=28, roles=PAIR_ROLES, base_kind="hidden")
    cfg = cfg_for(method, "student_base", delta_form="student_shift")  # several pairs: student_shift only
    got = run_both(case, cfg, alphas=[0.6, 0.5], kind="hidden", base_kind="hidden")
    assert_match(*got, TOLERANCES["float32"])


@pytest.mark.parametrize("method", ["delta_kd", "delta_inverse"])
def test_student_base_tail_at_full_support_is_the_bucket_loss(method):
    """k = |V|: no token is off the support, so the dense target is softmax(S0 + delta) on all of V."""
    case = make_case(seed=29, base_kind="logits")
    bucket = run_both(case, cfg_for(method, "bucket"), base_kind="logits")
    dense = run_both(case, cfg_for(method, "student_base"), base_kind="logits")
    torch.testing.assert_close(dense[0], bucket[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(dense[1][0], bucket[1][0], rtol=0, atol=1e-7)


def test_student_base_tail_keeps_the_base_shape_off_the_support():
    """Off the support the target is S0 times one factor: the off-support tokens keep S0's ratios."""
    g = torch.Generator().manual_seed(30)
    dense = {r: torch.log_softmax(torch.randn(1, 2, 12, generator=g) * 2, -1) for r in ("sft", "base")}
    lp_s0 = torch.log_softmax(torch.randn(1, 2, 12, generator=g) * 2, -1)
    targets = targets_from_record(TopKRecord.from_dense(1, {r: d.numpy() for r, d in dense.items()}, 3))
    labels = torch.full((1, 2), 5)
    zs = lp_s0.clone().requires_grad_()  # the student at its base: q = S0
    out = distillation_loss(zs, targets, labels, cfg_for("delta_kd", "student_base", lam=0.0), student_base=lp_s0)
    out.loss_sum.backward()
    for pos in range(2):  # dL/dz = q - p = S0 - p; off the support p = c * S0, so the gradient is (1 - c) S0
        off = torch.ones(12, dtype=torch.bool)
        off[targets.ids[pos]] = False
        ratio = zs.grad[0, pos][off].double() / lp_s0[0, pos].double().exp()[off]
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio), rtol=1e-5, atol=0)
        assert abs(float(ratio[0])) > 1e-2  # the shift did move the off-support mass
        assert float(zs.grad[0, pos].sum()) == pytest.approx(0.0, abs=1e-6)


def test_student_base_tail_errors_are_named():
    case = make_case(k=5, seed=31, base_kind="logits")
    cfg = cfg_for("delta_kd", "student_base")
    with pytest.raises(LossInputError, match="batch 7: loss.tail='student_base' needs the student base's full row"):
        distillation_loss(case.z, case.targets, case.labels, cfg)
    t = case.targets.with_role("student_base", case.targets.logprobs["base"], case.targets.tail["base"])
    with pytest.raises(LossInputError, match="lp_S0 given twice"):
        distillation_loss(case.z, t, case.labels, cfg, student_base=case.z)


def test_config_refuses_what_does_not_apply():
    with pytest.raises(ValidationError, match="loss.objective='reverse_kl' applies to"):
        LossConfig(method="rkl", objective="reverse_kl")
    with pytest.raises(ValidationError, match="loss.tail='student_base' applies to"):
        LossConfig(method="kd", tail="student_base")
    with pytest.raises(ValidationError, match="delta_inverse"):
        LossConfig(method="delta_inverse", tail="student_base", objective="reverse_kl")
    models = {"base_teacher": {"path": "a"}, "sft_teacher": {"path": "b"}, "student": {"path": "c"}}
    with pytest.raises(ConfigError, match="teachers.student_base_source='worker'"):
        config_from_dict({"models": models, "loss": {"tail": "student_base"},
                          "teachers": {"student_base_source": "teacher"}})
    assert config_from_dict({"models": models, "loss": {"tail": "student_base", "objective": "sampled_token"}})
