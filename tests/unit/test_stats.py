"""The comparison's bootstrap (student_worker/research/stats.py): known cases, determinism by seed, pairing, and
the verdict's wording."""

from __future__ import annotations

import math

import numpy as np
import pytest

from student_worker.research.stats import (
    Interval,
    bootstrap_mean,
    holm,
    paired_difference,
    paired_t,
    t_cdf,
    t_interval,
    t_quantile,
    t_two_sided_p,
    verdict,
)


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


# ----------------------------------------------------------------------------------------- t, Holm


@pytest.mark.parametrize("df, q975", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706),
                                      (9, 2.2622), (30, 2.0423), (120, 1.9799), (math.inf, 1.9600)])
def test_t_quantiles_match_printed_tables(df, q975):
    """Two-sided 95% critical values of Student's t as printed in standard tables (4 decimals)."""
    assert t_quantile(0.975, df) == pytest.approx(q975, abs=6e-5)
    assert t_quantile(0.025, df) == pytest.approx(-q975, abs=6e-5)
    assert t_cdf(t_quantile(0.975, df), df) == pytest.approx(0.975, abs=1e-10)


def test_t_other_levels_and_fractional_df():
    assert t_quantile(0.995, 4) == pytest.approx(4.6041, abs=6e-5)  # 99% two-sided, df 4
    assert t_quantile(0.95, 10) == pytest.approx(1.8125, abs=6e-5)  # 90% two-sided, df 10
    assert t_quantile(0.975, 5) < t_quantile(0.975, 4.5) < t_quantile(0.975, 4)  # Satterthwaite df are fractional
    assert t_two_sided_p(2.7764, 4) == pytest.approx(0.05, abs=1e-5)
    assert t_cdf(0.0, 3) == 0.5
    with pytest.raises(ValueError, match="df must be > 0"):
        t_quantile(0.9, 0)


def test_t_interval_on_seed_means_by_hand():
    # One example, seeds 0, .1, .2, .3, .4: mean .2, sd .158114, se .0707107, t(.975, 4) = 2.776445:
    # half-width .196324, p of mean = 0: 0.0474 (t = 2.8284 on 4 df)
    iv = t_interval(np.array([[0.0], [0.1], [0.2], [0.3], [0.4]]))
    assert (iv.kind, iv.df, iv.seeds, iv.examples) == ("t", 4.0, 5, 1)
    assert iv.lo == pytest.approx(0.2 - 0.196324, abs=1e-6) and iv.hi == pytest.approx(0.2 + 0.196324, abs=1e-6)
    assert iv.p_value == pytest.approx(0.04742, abs=1e-5)
    # Every example agrees within a seed: the two-way layout IS the t on the seed means, and the two-way
    # bootstrap of the same matrix is narrower (it divides by S, with normal-like quantiles)
    d = np.repeat(np.array([[0.0], [0.1], [0.2], [0.3], [0.4]]), 50, axis=1)
    wide = t_interval(d)
    assert wide.df == pytest.approx(4.0) and (wide.lo, wide.hi) == pytest.approx((iv.lo, iv.hi))
    boot = bootstrap_mean(d, replicates=5000, seed=1)
    assert (wide.hi - wide.lo) > 1.3 * (boot.hi - boot.lo)


def test_t_interval_over_examples_by_hand():
    # One seed, scores 1, 2, 3, 4: mean 2.5, sd 1.290994, se .645497, t(.975, 3) = 3.182446: half 2.054260
    iv = t_interval([1.0, 2.0, 3.0, 4.0])
    assert iv.df == 3.0 and iv.lo == pytest.approx(0.445740, abs=1e-6) and iv.hi == pytest.approx(4.554260, abs=1e-6)


def test_t_interval_two_way_by_hand():
    # d = [[1, 2, 6], [3, 5, 7]]: mean 4, row means 3, 5, column means 2, 3.5, 6.5.
    # MS_seed = 3 * (1 + 1) / 1 = 6; MS_ex = 2 * (4 + .25 + 6.25) / 2 = 10.5; residuals (0, -.5, .5; 0, .5, -.5),
    # MS_err = 1 / (1 * 2) = .5. Var(mean) = (6 + 10.5 - .5) / 6 = 2.666667, se = 1.632993;
    # Satterthwaite df = 16^2 / (6^2 / 1 + 10.5^2 / 2 + .5^2 / 2) = 256 / 91.25 = 2.805479.
    iv = t_interval(np.array([[1.0, 2.0, 6.0], [3.0, 5.0, 7.0]]))
    assert iv.mean == 4.0 and iv.df == pytest.approx(2.805479, abs=1e-6)
    assert (iv.hi - iv.lo) / 2 / t_quantile(0.975, iv.df) == pytest.approx(1.632993, abs=1e-6)
    assert iv.p_value == pytest.approx(t_two_sided_p(4.0 / 1.632993, 2.805479), rel=1e-6)
    # Components below the interaction are truncated at 0. Rows (0, 1, 0), (1, 0, 1): MS_seed = 3 * 2 *
    # (1/6)^2 = 1/6, MS_ex = 0 (equal column means), MS_err = (4/3) / 2 = 2/3: both truncate, the residual
    # term alone is left, Var = MS_err / (S N) = 1/9, df (S - 1)(N - 1) = 2.
    flat = t_interval(np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]))
    assert flat.df == pytest.approx(2.0)
    assert (flat.hi - flat.lo) / 2 / t_quantile(0.975, 2.0) == pytest.approx(1 / 3, abs=1e-9)
    # No interaction: rows (0, 0, 1), (1, 1, 2), mean 5/6: MS_seed = 3 * 2 * (1/2)^2 = 1.5, MS_ex = 2 * (2 *
    # (1/3)^2 + (2/3)^2) / 2 = 2/3, MS_err = 0: Var = (1.5 + 2/3 - 0) / 6
    both = t_interval(np.array([[0.0, 0.0, 1.0], [1.0, 1.0, 2.0]]))
    assert (both.hi - both.lo) / 2 / t_quantile(0.975, both.df) == pytest.approx(((1.5 + 2 / 3) / 6) ** 0.5, abs=1e-9)


def test_t_interval_edge_cases_and_p_agrees_with_the_interval():
    point = t_interval(np.full((3, 4), 0.25))
    assert point.lo == point.hi == 0.25 and point.p_value == 0.0 and point.df is None
    assert "t with" not in verdict("a", "b", point)
    with pytest.raises(ValueError, match="one score"):
        t_interval([0.5])
    rng = np.random.default_rng(5)
    for _ in range(20):
        iv = t_interval(rng.normal(0.02, 0.2, size=(4, 60)) + rng.normal(0, 0.03, size=(4, 1)))
        assert (iv.p_value < 0.05) == (not iv.covers_zero())
    with pytest.raises(ValueError, match="same"):
        paired_t(np.zeros((2, 3)), np.zeros((3, 3)))


def test_holm_by_hand():
    # p = .01, .03, .04 over m = 3: adjusted 3 * .01 = .03, max(.03, 2 * .03) = .06, max(.06, 1 * .04) = .06
    got = holm({"a": 0.01, "b": 0.04, "c": 0.03})
    assert {k: v["p_adjusted"] for k, v in got.items()} == pytest.approx({"a": 0.03, "b": 0.06, "c": 0.06})
    assert [got[k]["reject"] for k in "abc"] == [True, False, False]
    assert holm({"x": 0.7, "y": 0.6})["x"]["p_adjusted"] == 1.0  # capped at 1
    assert holm({}) == {}


def test_comparison_reports_t_intervals_holm_and_the_bootstrap():
    from student_worker.research.outputs import comparison, comparison_lines

    rng = np.random.default_rng(3)
    base = rng.uniform(0, 1, size=(3, 40))
    runs = [_run("kd", s, list(base[s])) for s in range(3)]
    shifts = {"a": 0.05, "b": 0.01, "c": 0.0}
    for name, shift in shifts.items():
        runs += [_run(name, s, list(base[s] + shift + rng.normal(0, 0.05, 40))) for s in range(3)]
    exp = {"runs": runs, "aggregates": {m: {} for m in ["kd", *shifts]}, "references": {}}
    comp = comparison(exp, "kd", replicates=300)
    assert comp["interval"] == "t" and comp["methods"]["kd"]["kind"] == "t"
    for name, d in comp["differences"].items():
        assert d["holm"]["family"] == 3 and d["holm"]["p_adjusted"] >= d["p_value"]
        assert d["bootstrap"]["replicates"] == 300 and d["bootstrap"]["lo"] <= d["bootstrap"]["hi"]
        assert d["verdict"].startswith(f"{name} - kd = ") and " df, 3 seeds x 40 examples)" in d["verdict"]
        assert d["holm_verdict"].startswith("Holm over 3 comparisons: ")
    assert "a higher" in comp["differences"]["a"]["holm_verdict"]
    lines = comparison_lines(comp)
    assert lines[0].startswith("rougeL: mean [95% CI], t-interval")
    assert sum("Holm over 3 comparisons" in line and "two-way bootstrap [" in line for line in lines) == 3
