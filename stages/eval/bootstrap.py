"""Hierarchical bootstrap: a mean over seeds and its percentile interval.

    est = bootstrap_mean([seed0_values, seed1_values, ...], key="default/kd/exact_match")
    est.mean, est.lo, est.hi                     # 95% interval by default

Each entry of `values` is one seed's numbers: its per-example values (exact
match hits, ROUGE-L per example) or a single corpus-level value (perplexity,
KL, ...). The estimate is the mean over seeds of each seed's mean (every seed
weighs the same). A bootstrap replicate draws S seeds with replacement and,
for each draw, that seed's examples with replacement (a one-value seed stays
itself), and averages; the interval is the replicates' percentiles. For a
difference between two models paired by seed and example, pass the
per-example differences (`paired_difference`).

Deterministic: the generator is seeded by SEED and a hash of `key` (a cell's
name), so one cell's interval does not change when other cells are added.
With few seeds the percentile interval of the seed level is narrow (three
seeds: it cannot reach beyond their range); the report says so.

The interval above is for the *mean* over seeds. Where one new run will land
(another seed, or the same seed on another CPU kind, whose rounding sends
training down another path) is a wider question: `prediction_interval` gives
the normal-theory interval for one new draw from the seeds' values,

    mean ± t(1 - (1 - level) / 2, n - 1) · sd · sqrt(1 + 1/n)

(sd the seeds' sample standard deviation, t Student's quantile with n - 1
degrees of freedom: 2.776 for five seeds, 2.262 for ten), so it widens with
few seeds instead of trusting their spread.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

SEED = 20240811  # fixed: the report is a pure function of the runs' results
SAMPLES = 2000
LEVEL = 0.95


@dataclass(frozen=True)
class Estimate:
    mean: float
    lo: float
    hi: float
    seeds: int
    examples: int  # values per seed (the largest); 1 = corpus-level, resampled over seeds only

    def as_dict(self) -> dict:
        return {"mean": self.mean, "lo": self.lo, "hi": self.hi, "seeds": self.seeds, "examples": self.examples}


def generator(key: str, seed: int = SEED) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def bootstrap_mean(values: Sequence[Sequence[float]], *, key: str = "", samples: int = SAMPLES,
                   level: float = LEVEL, seed: int = SEED) -> Estimate | None:
    """Mean over seeds and its `level` percentile interval (None when no seed has a value)."""
    groups = _groups(values)
    if not groups:
        return None
    lo, hi = np.quantile(replicates(groups, samples, generator(key, seed)), [(1 - level) / 2, (1 + level) / 2])
    mean = float(np.mean([g.mean() for g in groups]))
    return Estimate(mean, float(lo), float(hi), len(groups), max(g.size for g in groups))


def _groups(values: Sequence[Sequence[float]]) -> list[np.ndarray]:
    """Each seed's finite values as float64 (a seed with none is left out)."""
    groups = [np.asarray(v, dtype=np.float64).ravel() for v in values]
    return [g for g in groups if g.size and np.isfinite(g).all()]


def replicates(groups: list[np.ndarray], samples: int, rng: np.random.Generator) -> np.ndarray:
    """`samples` bootstrap means: draw len(groups) seeds with replacement, then each draw's values."""
    n_seeds = len(groups)
    pick = rng.integers(0, n_seeds, size=(samples, n_seeds))  # which seed fills slot j of replicate b
    total = np.zeros(samples)
    for slot in range(n_seeds):
        means = np.empty(samples)
        for s, g in enumerate(groups):
            rows = np.flatnonzero(pick[:, slot] == s)
            if rows.size:
                means[rows] = g[rng.integers(0, g.size, size=(rows.size, g.size))].mean(axis=1)
        total += means
    return total / n_seeds


def paired_difference(a: Sequence[Sequence[float]], b: Sequence[Sequence[float]], **kwargs) -> Estimate | None:
    """bootstrap_mean of a - b, seed by seed and example by example (same seeds, same examples, same order)."""
    diffs = []
    for x, y in zip(a, b):
        x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
        if x.size != y.size:
            raise ValueError(f"paired values differ in length ({x.size} vs {y.size}): not the same examples")
        diffs.append(x - y)
    return bootstrap_mean(diffs, **kwargs)


def prediction_interval(values: Sequence[float], level: float = LEVEL) -> Estimate | None:
    """Where one new run's value lands with probability `level` (module doc), from the seeds' values.

    None with fewer than two finite values (no spread to go on)."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=np.float64)
    if x.size < 2:
        return None
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    half = t_quantile(1 - (1 - level) / 2, x.size - 1) * sd * math.sqrt(1 + 1 / x.size)
    return Estimate(mean, mean - half, mean + half, int(x.size), 1)


def t_cdf(t: float, df: int) -> float:
    """Student's t distribution function for integer `df` >= 1 (Abramowitz & Stegun 26.7.3/26.7.4)."""
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2:  # odd: 2/pi (theta + sin cos (1 + 2/3 cos^2 + 2*4/(3*5) cos^4 + ...))
        term, total = 1.0, 1.0 if df > 1 else 0.0
        for k in range(1, (df - 1) // 2):
            term *= 2 * k / (2 * k + 1) * c2
            total += term
        a = 2 / math.pi * (theta + s * math.cos(theta) * total)
    else:  # even: sin (1 + 1/2 cos^2 + 1*3/(2*4) cos^4 + ...)
        term, total = 1.0, 1.0
        for k in range(1, df // 2):
            term *= (2 * k - 1) / (2 * k) * c2
            total += term
        a = s * total
    return 0.5 + a / 2


def t_quantile(p: float, df: int) -> float:
    """The t value with t_cdf(t, df) = p (bisection to float precision)."""
    if not 0 < p < 1:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    lo, hi = -1e6, 1e6
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf(mid, df) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * max(1.0, abs(mid)):
            break
    return (lo + hi) / 2
