"""stages.eval.bootstrap: known answers (exact enumeration, closed-form spread) and determinism."""

import itertools
import math

import numpy as np
import pytest

from stages.eval.bootstrap import (bootstrap_mean, generator, paired_difference, prediction_interval, replicates, t_cdf,
                              t_quantile)


def test_constant_values_give_a_point_interval():
    est = bootstrap_mean([[0.5, 0.5, 0.5], [0.5, 0.5]], key="c")
    assert (est.mean, est.lo, est.hi, est.seeds, est.examples) == (0.5, 0.5, 0.5, 2, 3)


def test_seed_level_only_matches_exact_enumeration():
    """Two corpus-level seeds 0 and 1: replicate means are 0, .5, 1 with probability 1/4, 1/2, 1/4."""
    est = bootstrap_mean([[0.0], [1.0]], key="two-seeds", samples=4000)
    assert est.mean == 0.5 and est.lo == 0.0 and est.hi == 1.0
    est = bootstrap_mean([[0.0], [1.0]], key="two-seeds", samples=4000, level=0.4)  # inner 40%: the 0.5 atom
    assert est.lo == est.hi == 0.5


def _exact_distribution(groups):
    """Every equally likely hierarchical resample, enumerated: replicate means (float64 reference)."""
    means = []
    for seeds in itertools.product(range(len(groups)), repeat=len(groups)):
        per_slot = [[np.mean([groups[s][i] for i in draw]) for draw in
                     itertools.product(range(len(groups[s])), repeat=len(groups[s]))] for s in seeds]
        means += [np.mean(combo) for combo in itertools.product(*per_slot)]
    return np.asarray(means, dtype=np.float64)


def test_hierarchical_resampling_matches_enumeration():
    groups = [[0.0, 1.0, 1.0], [0.0, 0.0, 1.0]]  # 2 seeds x 3 examples: 4 x 27 x 27 resamples, enumerable
    exact = _exact_distribution(groups)
    # the reference itself: Var = (variance between seed means + mean within-seed variance / n) / S
    between = np.var([np.mean(g) for g in groups])
    within = np.mean([np.var(g) / len(g) for g in groups])
    assert exact.var() == pytest.approx((between + within) / len(groups))

    reps = replicates([np.asarray(g) for g in groups], 40000, generator("enum"))
    assert reps.mean() == pytest.approx(exact.mean(), abs=0.005)
    assert reps.var() == pytest.approx(exact.var(), rel=0.03)
    # replicate means are multiples of 1/6; these levels' quantiles lie well inside one atom each
    for level, (lo, hi) in ((0.5, (2 / 6, 4 / 6)), (0.8, (1 / 6, 5 / 6))):
        assert tuple(np.quantile(exact, [(1 - level) / 2, (1 + level) / 2])) == pytest.approx((lo, hi))
        est = bootstrap_mean(groups, key="enum", samples=40000, level=level)
        assert (est.mean, est.lo, est.hi) == pytest.approx((0.5, lo, hi))


def test_interval_width_follows_the_binomial_standard_error():
    rng = np.random.default_rng(1)
    hits = (rng.random(400) < 0.3).astype(float)  # one seed, 400 examples
    est = bootstrap_mean([hits], key="binomial")
    p = hits.mean()
    se = np.sqrt(p * (1 - p) / hits.size)
    assert est.hi - est.lo == pytest.approx(2 * 1.96 * se, rel=0.1)


def test_deterministic_and_keyed():
    values = [np.linspace(0, 1, 50), np.linspace(0.2, 0.9, 50), np.linspace(0.1, 0.7, 50)]
    a, b = bootstrap_mean(values, key="x"), bootstrap_mean(values, key="x")
    assert a == b
    assert bootstrap_mean(values, key="y") != a  # another cell draws its own replicates


def test_paired_difference_cancels_shared_example_difficulty():
    rng = np.random.default_rng(0)
    difficulty = rng.random(200)
    a = [difficulty + 0.05, difficulty + 0.04]
    b = [difficulty, difficulty]
    diff = paired_difference(a, b, key="d")
    assert diff.mean == pytest.approx(0.045)
    assert diff.lo >= 0.04 - 1e-12 and diff.hi <= 0.05 + 1e-12  # unpaired, the interval would span ~±0.08
    with pytest.raises(ValueError, match="not the same examples"):
        paired_difference([[1.0, 2.0]], [[1.0]])


def test_no_values_is_none():
    assert bootstrap_mean([[], []]) is None


# ---------------------------------------------------------------- one new run


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 9, 30])
def test_t_cdf_matches_the_integrated_density(df):
    """Dense float64 reference: the t density integrated numerically (trapezoids on a fine grid)."""
    log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    for t in (-3.0, -0.7, 0.0, 0.4, 1.5, 2.776, 6.0):
        x = np.linspace(0.0, abs(t), 200_001)
        density = np.exp(log_c - (df + 1) / 2 * np.log1p(x ** 2 / df))
        half = float(np.sum((density[1:] + density[:-1]) / 2 * np.diff(x)))
        assert t_cdf(t, df) == pytest.approx(0.5 + math.copysign(half, t), abs=1e-9)


def test_t_quantile_matches_the_tables():
    table = {1: 12.706, 2: 4.303, 4: 2.776, 9: 2.262, 29: 2.045}  # two-sided 95%, any statistics table
    for df, value in table.items():
        assert t_quantile(0.975, df) == pytest.approx(value, abs=5e-4)
        assert t_quantile(0.025, df) == pytest.approx(-value, abs=5e-4)
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        t_quantile(1.0, 3)


def test_prediction_interval_formula_and_coverage():
    est = prediction_interval([0.40, 0.45, 0.50, 0.47, 0.43])
    sd = np.std([0.40, 0.45, 0.50, 0.47, 0.43], ddof=1)
    half = 2.7764451 * sd * math.sqrt(1.2)
    assert est.mean == pytest.approx(0.45) and est.seeds == 5
    assert (est.lo, est.hi) == (pytest.approx(0.45 - half, abs=1e-6), pytest.approx(0.45 + half, abs=1e-6))
    assert prediction_interval([0.5]) is None and prediction_interval([0.5, None, float("nan")]) is None
    rng = np.random.default_rng(0)  # a new normal draw lands inside the interval of five earlier ones 95% of the time
    hits = 0
    for _ in range(4000):
        x = rng.normal(0.45, 0.03, size=6)
        est = prediction_interval(x[:5])
        hits += est.lo <= x[5] <= est.hi
    assert abs(hits / 4000 - 0.95) < 0.012
