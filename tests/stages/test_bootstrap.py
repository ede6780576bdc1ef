"""stages.bootstrap: known answers (exact enumeration, closed-form spread) and determinism."""

import itertools

import numpy as np
import pytest

from stages.bootstrap import bootstrap_mean, generator, paired_difference, replicates


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
