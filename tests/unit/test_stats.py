"""The comparison's bootstrap (student_worker/research/stats.py): known cases, determinism by seed, pairing, and
the verdict's wording."""

from __future__ import annotations

import math

import numpy as np
import pytest

from student_worker.research.stats import Interval, bootstrap_mean, paired_difference, verdict


def test_constant_differences_give_a_point_interval() -> None:
    iv = bootstrap_mean(np.full((5, 40), 0.125), replicates=500)
    assert iv.mean == iv.lo == iv.hi == 0.125
    assert (iv.seeds, iv.examples, iv.replicates) == (5, 40, 500)


def test_one_seed_matches_the_normal_approximation_of_a_mean() -> None:
    # 0/1 scores, p = 0.3 over N = 1000 examples: the mean's standard error is sqrt(p (1 - p) / N) =
    # 0.0145, so the 95% interval is about +- 1.96 * 0.0145 = +- 0.0284. The percentile bootstrap of
    # 20,000 replicates lands within 0.003 of each end (its own Monte Carlo error is ~0.0005, the rest is
    # the discreteness of a 0/1 mean).
    n, p = 1000, 0.3
    scores = np.zeros(n)
    scores[: int(p * n)] = 1.0
    iv = bootstrap_mean(scores, replicates=20_000, seed=3)
    half = 1.96 * math.sqrt(p * (1 - p) / n)
    assert iv.mean == pytest.approx(p)
    assert iv.lo == pytest.approx(p - half, abs=0.003) and iv.hi == pytest.approx(p + half, abs=0.003)


def test_seed_resampling_widens_the_interval_when_seeds_disagree() -> None:
    # Every example agrees within a seed, seeds disagree: resampling examples alone would give a point;
    # the two-way bootstrap gives the spread of the seed means.
    d = np.repeat(np.array([[0.0], [0.1], [0.2], [0.3], [0.4]]), 50, axis=1)
    iv = bootstrap_mean(d, replicates=5000, seed=1)
    assert iv.mean == pytest.approx(0.2)
    assert iv.lo < 0.12 and iv.hi > 0.28
    assert 0.0 <= iv.lo and iv.hi <= 0.4  # a mean of resampled seeds never leaves their range


def test_same_seed_same_interval_other_seed_other_interval() -> None:
    rng = np.random.default_rng(7)
    d = rng.normal(0.01, 0.2, size=(5, 300))
    a = bootstrap_mean(d, replicates=2000, seed=11)
    assert bootstrap_mean(d, replicates=2000, seed=11) == a
    b = bootstrap_mean(d, replicates=2000, seed=12)
    assert (b.lo, b.hi) != (a.lo, a.hi) and b.mean == a.mean
    # More replicates than one chunk (1000) gives the same kind of answer.
    assert abs(bootstrap_mean(d, replicates=2500, seed=11).lo - a.lo) < 0.01


def test_paired_difference_pairs_by_seed_and_example() -> None:
    # Example difficulty dominates the scores but is shared by both methods: the paired interval is
    # tight around +0.02 and excludes 0, though the methods' own intervals overlap widely.
    rng = np.random.default_rng(0)
    difficulty = rng.uniform(0, 1, size=400)
    base = np.tile(difficulty, (5, 1)) + rng.normal(0, 0.005, size=(5, 400))
    method = base + 0.02
    diff = paired_difference(method, base, replicates=3000)
    assert diff.mean == pytest.approx(0.02) and diff.lo == pytest.approx(0.02) and diff.hi == pytest.approx(0.02)
    own_b, own_m = bootstrap_mean(base, 3000), bootstrap_mean(method, 3000)
    assert own_m.lo < own_b.hi  # unpaired, they overlap
    with pytest.raises(ValueError, match=r"same \[seeds, examples\] shape: \(5, 400\) vs \(4, 400\)"):
        paired_difference(method, base[:4])


@pytest.mark.parametrize("bad, match", [(np.zeros((0, 3)), "at least one"), (np.array([[np.nan, 1.0]]), "non-finite")])
def test_bad_scores_are_errors(bad: np.ndarray, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        bootstrap_mean(bad)
    with pytest.raises(ValueError, match="level"):
        bootstrap_mean(np.ones(3), level=1.0)


def _iv(mean: float, lo: float, hi: float) -> Interval:
    return Interval(mean=mean, lo=lo, hi=hi, level=0.95, seeds=5, examples=500, replicates=10_000)


def test_verdict_wording() -> None:
    assert verdict("delta_kd", "kd", _iv(0.012, -0.004, 0.028)) == (
        "delta_kd - kd = +0.0120 [-0.0040, +0.0280]: not distinguishable (ROUGE-L, 95% CI, 5 seeds x 500 examples)")
    assert verdict("delta_kd", "kd", _iv(0.031, 0.012, 0.05)).split(": ")[1].startswith("delta_kd higher")
    assert verdict("sft", "kd", _iv(-0.031, -0.05, -0.012)).startswith("sft - kd = -0.0310 [-0.0500, -0.0120]: sft lower")
    assert "not distinguishable" in verdict("rkl", "kd", _iv(0.0, 0.0, 0.02))  # an end at exactly 0 covers 0


def _run(method: str, seed: int, scores: list[float] | None) -> dict:
    after = {"rougeL": float(np.mean(scores)) if scores else 0.0}
    if scores is not None:
        after["per_example"] = {"rougeL": scores}
    return {"method": method, "seed": seed, "report": {"rouge": {"student_after": after}}}


def test_comparison_pairs_common_seeds_and_lists_runs_without_per_example_scores() -> None:
    from student_worker.research.outputs import comparison, comparison_lines

    runs = [_run("kd", 0, [0.1, 0.2, 0.3]), _run("kd", 1, [0.2, 0.2, 0.2]),
            _run("delta_kd", 1, [0.3, 0.3, 0.3]), _run("delta_kd", 0, [0.2, 0.3, 0.4]),  # seed order differs
            _run("sft", 0, None)]
    exp = {"runs": runs, "aggregates": {"kd": {}, "delta_kd": {}, "sft": {}},
           "references": {"sft_teacher": {"per_example": {"rougeL": [0.9, 0.8, 1.0]}}}}
    comp = comparison(exp, "kd", replicates=500)
    assert comp["missing"] == ["sft"] and set(comp["methods"]) == {"kd", "delta_kd"}
    diff = comp["differences"]["delta_kd"]
    assert diff["mean"] == pytest.approx(0.1) and diff["lo"] == pytest.approx(0.1) and diff["hi"] == pytest.approx(0.1)
    assert diff["verdict"].startswith("delta_kd - kd = +0.1000 [+0.1000, +0.1000]: delta_kd higher")
    assert comp["references"]["sft_teacher"]["seeds"] == 1
    lines = comparison_lines(comp)
    assert any("SFT teacher" in line and "(1 seed x 3 examples)" in line for line in lines)
    assert lines[-1] == "no per-example scores (runs made before they were kept): sft"
    assert "no differences" in comparison_lines(comparison(exp, "rkl", replicates=10))[-2]
