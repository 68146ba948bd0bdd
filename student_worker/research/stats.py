"""Statistics of the method comparison: confidence intervals over seeds and evaluation examples, the
plain verdict printed for each method's difference from a baseline (kd by default), and Holm's correction
for a table of many such differences.

Scores come as a matrix `[S, N]`: one row per seed, one column per evaluation example (every run of a
comparison scores the same N examples, so column i is the same question in every row). A method's
difference from the baseline pairs them twice: by seed (both trained from the same seed, so the same data
order) and by example: `D[s, i] = method[s, i] - baseline[s, i]`.

**The interval the verdicts use: `t_interval`.** Its variance is that of the grand mean of a two-way
crossed layout (seed effect a_s, example effect b_i, interaction e_si):

    Var(mean D) = sigma_a^2 / S + sigma_b^2 / N + sigma_e^2 / (S N)

estimated from the mean squares MS_seed = N var(row means), MS_ex = S var(column means) and the residual
MS_err (negative components truncated at 0, as usual), with a t quantile on Satterthwaite's degrees of
freedom. Why this and not the two-way bootstrap alone: seeds are few (3 to 10), and a percentile bootstrap
of 5 seed means is too narrow (it divides by S instead of S - 1 and uses normal-like quantiles: about 0.63
times the t half-width at S = 5). A t-interval on the per-seed mean differences alone is exact for the seed
part but misses the other source a reader cares about: every seed scores the same N questions, so another
draw of questions does not show in the seed means. The crossed-layout variance keeps both; when the seed
part dominates its df falls to ~S - 1 and it *is* the t-interval on seed means (with one example: exactly),
when the examples dominate its df is large and it is the paired t over examples (with one seed: exactly).
The same statistic gives a two-sided p-value (the interval excludes 0 exactly when p < 1 - level), which
`holm` adjusts over a table of comparisons. scipy-free: the t distribution is computed here from the
regularised incomplete beta function (checked against printed t tables in tests/unit/test_stats.py).

`bootstrap_mean` (kept beside it, also in experiment.json) is a percentile bootstrap that resamples BOTH
seeds and examples: a replicate draws S seeds and N examples with replacement and takes the mean of D over
that grid, `c_s @ D @ c_i / (S * N)` with c_s, c_i the multinomial counts (one matrix product per chunk of
replicates). With one seed it is the usual per-example paired bootstrap. Pure numpy and the stdlib.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Any

import numpy as np

__all__ = ["Interval", "bootstrap_mean", "paired_difference", "t_interval", "paired_t", "t_cdf", "t_quantile",
           "t_two_sided_p", "holm", "verdict", "holm_verdict", "sizes", "DEFAULT_REPLICATES"]

DEFAULT_REPLICATES = 10_000
_CHUNK = 1_000  # replicates per matrix product: bounds memory at S*N*_CHUNK counts


@dataclass(frozen=True)
class Interval:
    """A mean and its confidence interval [lo, hi] at `level` (e.g. 0.95): `kind` "bootstrap" (two-way
    percentile, `replicates` of them) or "t" (`t_interval`: df its degrees of freedom, p_value the two-sided
    p of mean = 0)."""

    mean: float
    lo: float
    hi: float
    level: float
    seeds: int
    examples: int
    replicates: int
    kind: str = "bootstrap"
    df: float | None = None
    p_value: float | None = None

    def covers_zero(self) -> bool:
        return self.lo <= 0.0 <= self.hi

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _matrix(scores: Any, level: float) -> np.ndarray:
    """scores as a finite [S, N] float64 matrix ([N] is one seed); checks the level too."""
    d = np.asarray(scores, dtype=np.float64)
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"scores must be [seeds, examples] with at least one of each, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("scores hold non-finite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return d


def bootstrap_mean(scores: Any, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                   level: float = 0.95) -> Interval:
    """Mean of `scores` [S, N] (or [N]: one seed) and its two-way percentile bootstrap interval.

    Deterministic for a given `seed`. Raises ValueError on an empty matrix, non-finite scores, a level
    outside (0, 1) or fewer than 1 replicate."""
    d = _matrix(scores, level)
    if replicates < 1:
        raise ValueError(f"replicates must be >= 1, got {replicates}")
    s, n = d.shape
    rng = np.random.Generator(np.random.PCG64(seed))
    stats = np.empty(replicates, dtype=np.float64)
    for start in range(0, replicates, _CHUNK):
        b = min(_CHUNK, replicates - start)
        c_seed = rng.multinomial(s, np.full(s, 1.0 / s), size=b).astype(np.float64)  # [b, S]
        c_ex = rng.multinomial(n, np.full(n, 1.0 / n), size=b).astype(np.float64)  # [b, N]
        stats[start:start + b] = np.einsum("bs,sn,bn->b", c_seed, d, c_ex) / (s * n)
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(stats, [alpha, 1.0 - alpha])
    return Interval(mean=float(d.mean()), lo=float(lo), hi=float(hi), level=level, seeds=s, examples=n,
                    replicates=replicates)


def paired_difference(method: Any, baseline: Any, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                      level: float = 0.95) -> Interval:
    """`bootstrap_mean(method - baseline)` for two [S, N] score matrices paired by seed (row) and example
    (column). Raises ValueError naming both shapes when they differ."""
    m, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if m.shape != b.shape:
        raise ValueError(f"paired scores must have the same [seeds, examples] shape: {m.shape} vs {b.shape}")
    return bootstrap_mean(m - b, replicates, seed, level)


# ---------------------------------------------------------------------------------------- the t distribution


def _betacf(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 10_000):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function, for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df > 0 degrees of freedom (df = inf: the normal)."""
    if math.isinf(df):
        return 2.0 * NormalDist().cdf(-abs(t))
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df > 0 degrees of freedom (df = inf: the normal)."""
    half = 0.5 * t_two_sided_p(t, df)
    return 1.0 - half if t > 0 else half


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t (df > 0, not necessarily whole; df = inf: the normal), by bisection on
    `t_cdf` to ~1e-12."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df}")
    if math.isinf(df):
        return NormalDist().inv_cdf(p)
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, hi):
            break
    return 0.5 * (lo + hi)


def t_interval(scores: Any, level: float = 0.95) -> Interval:
    """Mean of `scores` [S, N] (or [N]: one seed) and its t-interval over seeds and examples (module
    docstring: two-way crossed variance, Satterthwaite df), with the two-sided p of mean = 0.

    S = 1: the t-interval over examples (df N - 1); N = 1: over seeds (df S - 1). All scores equal: a
    point interval (df None). Raises ValueError for a single score (no spread to measure), an empty matrix,
    non-finite scores or a level outside (0, 1)."""
    d = _matrix(scores, level)
    s, n = d.shape
    if s * n < 2:
        raise ValueError("one score has no spread: an interval needs at least two seeds or examples")
    mean = float(d.mean())
    row, col = d.mean(axis=1), d.mean(axis=0)
    ms_seed = n * float(((row - mean) ** 2).sum()) / (s - 1) if s > 1 else 0.0
    ms_ex = s * float(((col - mean) ** 2).sum()) / (n - 1) if n > 1 else 0.0
    if s > 1 and n > 1:
        ms_err = float(((d - row[:, None] - col[None, :] + mean) ** 2).sum()) / ((s - 1) * (n - 1))
        # variance components truncated at 0: a seed (example) part only where MS_seed (MS_ex) > MS_err
        terms = [(m, df) for m, df in ((ms_seed, s - 1), (ms_ex, n - 1)) if m > ms_err]
        if len(terms) == 2:
            terms.append((-ms_err, (s - 1) * (n - 1)))
        elif not terms:
            terms = [(ms_err, (s - 1) * (n - 1))]
    else:
        terms = [(ms_seed, s - 1)] if s > 1 else [(ms_ex, n - 1)]
    total = sum(m for m, _ in terms)
    var = max(total, 0.0) / (s * n)
    if var <= 0.0:  # all scores equal: no spread, no df (None: experiment.json stays standard JSON)
        return Interval(mean, mean, mean, level, s, n, 0, "t", None, 0.0 if mean != 0.0 else 1.0)
    df = total**2 / sum(m * m / k for m, k in terms)
    half = t_quantile(0.5 + level / 2.0, df) * math.sqrt(var)
    return Interval(mean, mean - half, mean + half, level, s, n, 0, "t", df,
                    t_two_sided_p(mean / math.sqrt(var), df))


def paired_t(method: Any, baseline: Any, level: float = 0.95) -> Interval:
    """`t_interval(method - baseline)` for two [S, N] score matrices paired by seed and example."""
    m, b = np.asarray(method, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if m.shape != b.shape:
        raise ValueError(f"paired scores must have the same [seeds, examples] shape: {m.shape} vs {b.shape}")
    return t_interval(m - b, level)


def holm(p_values: dict[str, float], alpha: float = 0.05) -> dict[str, dict[str, Any]]:
    """Holm's step-down correction of a family of comparisons: name -> {"p_adjusted", "reject"}.

    Sorted p_(1) <= ... <= p_(m): p_adj_(i) = max_{j <= i} min(1, (m - j + 1) p_(j)); a comparison is
    rejected (distinguishable) when p_adj < alpha. Controls the chance of any false "higher"/"lower" in
    the table at alpha, under any dependence between the comparisons."""
    order = sorted(p_values, key=lambda name: p_values[name])
    m, running, out = len(order), 0.0, {}
    for i, name in enumerate(order):
        running = max(running, min(1.0, (m - i) * p_values[name]))
        out[name] = {"p_adjusted": running, "reject": running < alpha}
    return out


def holm_verdict(method: str, diff: Interval, adjusted: dict[str, Any], family: int) -> str:
    """The corrected verdict beside the raw one, e.g. `Holm over 6 comparisons: not distinguishable
    (p 0.031, adjusted 0.19)`."""
    word = "not distinguishable"
    if adjusted["reject"]:
        word = f"{method} higher" if diff.mean > 0 else f"{method} lower"
    return (f"Holm over {family} comparison{'s' if family != 1 else ''}: {word} "
            f"(p {diff.p_value:.2g}, adjusted {adjusted['p_adjusted']:.2g})")


def verdict(method: str, baseline: str, diff: Interval, metric: str = "ROUGE-L") -> str:
    """One line, e.g. `delta_kd - kd = +0.0120 [-0.0040, +0.0280]: not distinguishable (ROUGE-L, 95% CI,
    5 seeds x 500 examples)` when the interval covers 0, else `...: delta_kd higher (...)` / `lower`; a
    t-interval adds its df (`95% CI, t with 4.2 df`)."""
    if diff.covers_zero():
        word = "not distinguishable"
    elif diff.lo > 0:
        word = f"{method} higher"
    else:
        word = f"{method} lower"
    pct = f"{100 * diff.level:g}%"
    how = f", t with {diff.df:.1f} df" if diff.kind == "t" and diff.df is not None else ""
    return (f"{method} - {baseline} = {diff.mean:+.4f} [{diff.lo:+.4f}, {diff.hi:+.4f}]: {word} "
            f"({metric}, {pct} CI{how}, {sizes(diff)})")


def sizes(iv: Interval) -> str:
    """'5 seeds x 500 examples' (singular for one)."""
    return (f"{iv.seeds} seed{'s' if iv.seeds != 1 else ''} x "
            f"{iv.examples} example{'s' if iv.examples != 1 else ''}")
