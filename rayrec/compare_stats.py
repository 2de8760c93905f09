"""The statistics of `rayrec compare`: is the leader's lead real? No Ray, no torch.

Every figure comes from per-user test metrics of retrained runs (several seeds per model):

- a model's per-user value is the mean over its seeds for that user, so the paired tests
  compare the models, not one lucky seed;
- paired tests between the leader (chosen on validation) and every other model on the
  users both evaluated: SciPy's Wilcoxon signed-rank test (`scipy.stats.wilcoxon`, zero
  differences dropped, exact p-values for small samples without ties) and the paired
  t-test (`scipy.stats.ttest_rel`);
- Holm's step-down correction across the comparisons (`holm`: SciPy has none, so it is
  written here, as in Holm, Scand. J. Statist. 1979);
- a bootstrap confidence interval over users for every model's mean (`scipy.stats.bootstrap`,
  BCa);
- seed-level mean and standard deviation, and whether that spread exceeds the gap to the leader.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


def holm(pvalues) -> np.ndarray:
    """Holm-adjusted p-values, in the input order. Sorted ascending, the i-th smallest of m
    (i from 0) becomes max over j <= i of (m - j) p_(j), capped at 1; a hypothesis is rejected
    at level alpha when its adjusted p-value is <= alpha. NaN values are left out of m and stay NaN.
    (SciPy has no Holm correction; statsmodels' multipletests('holm') gives the same figures.)"""
    p = np.asarray(pvalues, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = np.flatnonzero(np.isfinite(p))
    m = len(ok)
    if m == 0:
        return out
    order = ok[np.argsort(p[ok], kind="stable")]
    scaled = (m - np.arange(m)) * p[order]
    out[order] = np.minimum(1.0, np.maximum.accumulate(scaled))
    return out


@dataclass
class PairedTest:
    n_users: int  # users both models evaluated
    mean_diff: float  # mean of (a - b) over those users
    wilcoxon_stat: float
    wilcoxon_p: float
    ttest_stat: float
    ttest_p: float


def paired_tests(a, b) -> PairedTest:
    """Wilcoxon signed-rank and paired t-test of a against b (two-sided), per-user pairs.

    Identical samples (every difference zero) give p = 1: there is nothing to tell apart,
    where SciPy would raise or return NaN.
    """
    from scipy import stats

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = a - b
    n = int(len(diff))
    if n == 0:
        return PairedTest(0, math.nan, math.nan, math.nan, math.nan, math.nan)
    if not np.any(diff != 0):
        return PairedTest(n, 0.0, 0.0, 1.0, 0.0, 1.0)
    w = stats.wilcoxon(a, b)
    if n >= 2 and np.std(diff) > 0:
        t = stats.ttest_rel(a, b)
        t_stat, t_p = float(t.statistic), float(t.pvalue)
    else:  # a constant nonzero difference: the t statistic is infinite
        t_stat, t_p = math.copysign(math.inf, float(diff.mean())), 0.0 if n >= 2 else math.nan
    return PairedTest(n, float(diff.mean()), float(w.statistic), float(w.pvalue), t_stat, t_p)


def bootstrap_ci(values, confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """BCa bootstrap interval of the mean over users (`scipy.stats.bootstrap`, seeded).
    A constant sample (or one value) has the degenerate interval (v, v)."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan
    if len(x) < 2 or np.all(x == x[0]):
        return float(x.mean()), float(x.mean())
    res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                          method="BCa", random_state=np.random.default_rng(seed))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):  # BCa undefined (e.g. a two-valued sample): percentile
        res = stats.bootstrap((x,), np.mean, confidence_level=confidence, n_resamples=n_resamples,
                              method="percentile", random_state=np.random.default_rng(seed))
        low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return low, high


def seed_spread(values) -> tuple[float, float]:
    """(mean, sample std with ddof=1) over seeds; std is NaN with one seed."""
    x = np.asarray(values, dtype=float)
    x = x[np.isfinite(x)]
    if len(x) == 0:
        return math.nan, math.nan
    return float(x.mean()), float(x.std(ddof=1)) if len(x) >= 2 else math.nan


def per_user_means(per_user, metric: str, split: str = "test") -> dict[str, Any]:
    """model -> Series of `metric` per user on `split`, averaged over the model's seeds
    (per_user: columns model, seed, split, user, metric)."""
    rows = per_user[per_user["split"] == split]
    return {model: group.groupby("user")[metric].mean() for model, group in rows.groupby("model", sort=False)}


def leaderboard(runs, per_user, metric: str, mode: str = "max", alpha: float = 0.05,
                confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0):
    """One row per model, best first on validation: seed mean/std on validation and test,
    the bootstrap interval of the test mean over users, and the paired tests against the
    leader with Holm-adjusted p-values (the leader's own row has none).

    runs: one row per (model, seed) with `val_<metric>` and `test_<metric>`.
    The leader is the best validation mean: test figures never choose it.
    """
    import pandas as pd

    val_col, test_col = f"val_{metric}", f"test_{metric}"
    users = per_user_means(per_user, metric)
    rows = []
    for model, group in runs.groupby("model", sort=False):
        val_mean, val_std = seed_spread(group[val_col])
        test_mean, test_std = seed_spread(group[test_col])
        low, high = bootstrap_ci(users[model].to_numpy(), confidence, n_resamples, seed) if model in users else (math.nan, math.nan)
        rows.append({"model": model, "n_seeds": int(group[val_col].notna().sum()), "val_mean": val_mean,
                     "val_std": val_std, "test_mean": test_mean, "test_std": test_std,
                     "test_user_mean": float(users[model].mean()) if model in users else math.nan,
                     "ci_low": low, "ci_high": high, "n_users": int(len(users.get(model, [])))})
    table = pd.DataFrame(rows)
    table = table.sort_values("val_mean", ascending=(mode == "min"), kind="stable", na_position="last")
    table = table.reset_index(drop=True)
    leader = str(table["model"].iloc[0])
    table["leader"] = table["model"] == leader
    tests = {}
    for model in table["model"]:
        if model == leader or model not in users or leader not in users:
            continue
        a, b = users[leader].align(users[model], join="inner")
        tests[model] = paired_tests(a.to_numpy(), b.to_numpy())
    names = list(tests)
    w_holm = dict(zip(names, holm([tests[m].wilcoxon_p for m in names])))
    t_holm = dict(zip(names, holm([tests[m].ttest_p for m in names])))
    leader_std = float(table.loc[0, "test_std"])
    extra = []
    for _, r in table.iterrows():
        m = r["model"]
        test = tests.get(m)
        gap = float(table.loc[0, "test_mean"] - r["test_mean"]) if m != leader else math.nan
        spread = np.nanmax([leader_std, r["test_std"]]) if m != leader and not (
            math.isnan(leader_std) and math.isnan(r["test_std"])) else math.nan
        extra.append({
            "gap": gap,
            "n_paired": test.n_users if test else 0,
            "wilcoxon_stat": test.wilcoxon_stat if test else math.nan,
            "wilcoxon_p": test.wilcoxon_p if test else math.nan,
            "wilcoxon_p_holm": float(w_holm.get(m, math.nan)),
            "ttest_stat": test.ttest_stat if test else math.nan,
            "ttest_p": test.ttest_p if test else math.nan,
            "ttest_p_holm": float(t_holm.get(m, math.nan)),
            "significant": bool(test is not None and w_holm.get(m, math.nan) <= alpha),
            "spread_exceeds_gap": bool(math.isfinite(spread) and math.isfinite(gap) and spread > abs(gap)),
        })
    return pd.concat([table, pd.DataFrame(extra)], axis=1)


def pvalue_matrix(per_user, metric: str):
    """Wilcoxon p-values between every pair of models (per-user test means over seeds),
    Holm-adjusted over all pairs; a symmetric DataFrame with NaN on the diagonal."""
    import pandas as pd

    users = per_user_means(per_user, metric)
    names = list(users)
    pairs = [(i, j) for i in range(len(names)) for j in range(i + 1, len(names))]
    raw = []
    for i, j in pairs:
        a, b = users[names[i]].align(users[names[j]], join="inner")
        raw.append(paired_tests(a.to_numpy(), b.to_numpy()).wilcoxon_p)
    adjusted = holm(raw)
    matrix = pd.DataFrame(np.nan, index=names, columns=names)
    for (i, j), p in zip(pairs, adjusted):
        matrix.iloc[i, j] = matrix.iloc[j, i] = p
    return matrix
