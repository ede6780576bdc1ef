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
"""

from __future__ import annotations

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
