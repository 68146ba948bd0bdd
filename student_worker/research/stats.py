"""Statistics of the method comparison: bootstrap confidence intervals over seeds and evaluation examples,
and the plain verdict printed for each method's difference from a baseline (kd by default).

Scores come as a matrix `[S, N]`: one row per seed, one column per evaluation example (every run of a
comparison scores the same N examples, so column i is the same question in every row). A method's
difference from the baseline pairs them twice: by seed (both trained from the same seed, so the same data
order) and by example: `D[s, i] = method[s, i] - baseline[s, i]`.

The interval is a percentile bootstrap that resamples BOTH seeds and examples (a two-way bootstrap): a
replicate draws S seeds and N examples with replacement and takes the mean of D over that grid. It
covers the two sources of variation a reader cares about: another training run (seed) and another draw
of test questions (example). With one seed it is the usual per-example paired bootstrap. Seeds are few
(5), so the seed part of the interval is coarse: the interval is approximate, say so when it is close.

A replicate's mean over the resampled grid is `c_s @ D @ c_i / (S * N)` with c_s, c_i the multinomial
counts of each seed and each example, so replicates cost one matrix product, not an [S, N] copy each.
Pure numpy.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

__all__ = ["Interval", "bootstrap_mean", "paired_difference", "verdict", "sizes", "DEFAULT_REPLICATES"]

DEFAULT_REPLICATES = 10_000
_CHUNK = 1_000  # replicates per matrix product: bounds memory at S*N*_CHUNK counts


@dataclass(frozen=True)
class Interval:
    """A mean and its bootstrap confidence interval [lo, hi] at `level` (e.g. 0.95)."""

    mean: float
    lo: float
    hi: float
    level: float
    seeds: int
    examples: int
    replicates: int

    def covers_zero(self) -> bool:
        return self.lo <= 0.0 <= self.hi

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def bootstrap_mean(scores: Any, replicates: int = DEFAULT_REPLICATES, seed: int = 0,
                   level: float = 0.95) -> Interval:
    """Mean of `scores` [S, N] (or [N]: one seed) and its two-way percentile bootstrap interval.

    Deterministic for a given `seed`. Raises ValueError on an empty matrix, non-finite scores, a level
    outside (0, 1) or fewer than 1 replicate."""
    d = np.asarray(scores, dtype=np.float64)
    if d.ndim == 1:
        d = d[None, :]
    if d.ndim != 2 or d.size == 0:
        raise ValueError(f"scores must be [seeds, examples] with at least one of each, got shape {d.shape}")
    if not np.isfinite(d).all():
        raise ValueError("scores hold non-finite values")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
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


def verdict(method: str, baseline: str, diff: Interval, metric: str = "ROUGE-L") -> str:
    """One line, e.g. `delta_kd - kd = +0.0120 [-0.0040, +0.0280]: not distinguishable (ROUGE-L, 95% CI,
    5 seeds x 500 examples)` when the interval covers 0, else `...: delta_kd higher (...)` / `lower`."""
    if diff.covers_zero():
        word = "not distinguishable"
    elif diff.lo > 0:
        word = f"{method} higher"
    else:
        word = f"{method} lower"
    pct = f"{100 * diff.level:g}%"
    return (f"{method} - {baseline} = {diff.mean:+.4f} [{diff.lo:+.4f}, {diff.hi:+.4f}]: {word} "
            f"({metric}, {pct} CI, {sizes(diff)})")


def sizes(iv: Interval) -> str:
    """'5 seeds x 500 examples' (singular for one)."""
    return (f"{iv.seeds} seed{'s' if iv.seeds != 1 else ''} x "
            f"{iv.examples} example{'s' if iv.examples != 1 else ''}")
