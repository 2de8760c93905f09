"""`rayrec compare`'s statistics against values worked out by hand (no Ray, no training)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from rayrec.compare_stats import bootstrap_ci, holm, leaderboard, paired_tests, pvalue_matrix, seed_spread


def test_wilcoxon_statistic_and_exact_p_value_by_enumeration():
    # Differences 1, 2, 3, 4, 5, -6: no ties, no zeros, so ranks are 1..6 and the exact
    # null distribution is every sign pattern of the ranks with probability 1/64.
    b = np.array([10.0, 10.0, 10.0, 10.0, 10.0, 10.0])
    a = b + np.array([1, 2, 3, 4, 5, -6])
    w_plus, w_minus = 1 + 2 + 3 + 4 + 5, 6
    statistic = min(w_plus, w_minus)  # the two-sided statistic
    sums = [sum(r for r, s in zip(range(1, 7), signs) if s) for signs in itertools.product((0, 1), repeat=6)]
    assert len(sums) == 64 and sum(s <= statistic for s in sums) == 14  # sums 0..6: 1+1+1+2+2+3+4
    p_exact = min(1.0, 2 * 14 / 64)
    assert p_exact == 0.4375
    test = paired_tests(a, b)
    assert test.wilcoxon_stat == statistic == 6
    assert test.wilcoxon_p == pytest.approx(p_exact, abs=1e-12)
    # The paired t-test by hand: mean d = 9/6, sample sd of d, t = mean / (sd / sqrt(n)).
    d = np.array([1, 2, 3, 4, 5, -6], dtype=float)
    sd = math.sqrt(sum((x - 1.5) ** 2 for x in d) / 5)
    assert test.ttest_stat == pytest.approx(1.5 / (sd / math.sqrt(6)))
    assert test.mean_diff == 1.5 and test.n_users == 6


def test_identical_samples_are_not_different():
    x = np.array([0.1, 0.0, 0.5])
    test = paired_tests(x, x)
    assert test.wilcoxon_p == 1.0 and test.ttest_p == 1.0


def test_holm_on_a_known_vector():
    # Sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    out = holm([0.02, float("nan"), 0.01])  # NaN stays out of m
    assert out[0] == pytest.approx(0.02) and math.isnan(out[1]) and out[2] == pytest.approx(0.02)


def test_bootstrap_interval_covers_the_true_mean_near_its_nominal_rate():
    rng = np.random.default_rng(7)
    trials, covered = 200, 0
    for i in range(trials):
        sample = rng.exponential(1.0, size=60)  # skewed, like per-user NDCG; true mean 1
        low, high = bootstrap_ci(sample, 0.9, n_resamples=400, seed=i)
        covered += low <= 1.0 <= high
    # Nominal 90%: with 200 trials the binomial sd is ~2.1 points; BCa runs slightly under nominal at n=60.
    assert 0.82 <= covered / trials <= 0.97, covered / trials


def test_bootstrap_of_a_constant_sample_is_a_point():
    assert bootstrap_ci([0.25, 0.25, 0.25]) == (0.25, 0.25)


def test_seed_spread():
    assert seed_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, std = seed_spread([0.4])
    assert mean == 0.4 and math.isnan(std)


def _fixture(n_users=80, seeds=3):
    """Three models: 'good' clearly ahead of 'pop', 'close' level with 'good'."""
    rng = np.random.default_rng(0)
    base = rng.uniform(0, 1, n_users)
    rows, runs = [], []
    for model, shift in (("pop", -0.3), ("good", 0.0), ("close", -0.001)):
        for seed in range(seeds):
            values = np.clip(base + shift + rng.normal(0, 0.02, n_users), 0, 1)
            rows += [{"model": model, "seed": seed, "split": "test", "user": u, "ndcg@10": v}
                     for u, v in enumerate(values)]
            runs.append({"model": model, "seed": seed, "val_ndcg@10": 0.5 + shift + 0.001 * seed,
                         "test_ndcg@10": float(values.mean())})
    return pd.DataFrame(runs), pd.DataFrame(rows)


def test_leaderboard_picks_on_validation_and_flags_what_is_significant():
    runs, per_user = _fixture()
    table = leaderboard(runs, per_user, "ndcg@10", alpha=0.05, n_resamples=300)
    assert list(table["model"]) == ["good", "close", "pop"]
    assert table["leader"].tolist() == [True, False, False]
    pop = table.set_index("model").loc["pop"]
    assert pop["significant"] and pop["wilcoxon_p_holm"] <= 0.05 and pop["n_paired"] == 80
    assert pop["wilcoxon_p_holm"] >= pop["wilcoxon_p"]
    assert pop["ci_low"] <= pop["test_user_mean"] <= pop["ci_high"]
    close = table.set_index("model").loc["close"]
    assert close["gap"] == pytest.approx(table.loc[0, "test_mean"] - close["test_mean"])
    assert math.isnan(table.loc[0, "wilcoxon_p"])
    matrix = pvalue_matrix(per_user, "ndcg@10")
    assert matrix.shape == (3, 3) and matrix.loc["good", "pop"] == matrix.loc["pop", "good"] <= 0.05
    assert math.isnan(matrix.loc["pop", "pop"])
