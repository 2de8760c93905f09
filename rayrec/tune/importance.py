"""Parameter importance: the share of the metric's variation each searched parameter explains."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rayrec.storage import plain
from rayrec.tune.results import is_missing
from rayrec.tune.space import Param


@dataclass
class Importance:
    """Share of the metric's variation each searched parameter explains (sums to 1).

    `scores` is empty when `conclusive` is False; `message` says why, so nobody reads a
    number into noise.
    """

    scores: dict[str, float]
    n_trials: int
    conclusive: bool
    message: str
    method: str = "random forest (scikit-learn), permutation importance"
    oob_r2: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"conclusive": self.conclusive, "n_trials": self.n_trials, "method": self.method,
                "message": self.message, "oob_r2": self.oob_r2,
                "scores": {k: round(v, 4) for k, v in self.scores.items()}}

def parameter_importance(trials, params: dict[str, Param], value_col: str, min_trials: int = 10,
                         seed: int = 0) -> Importance:
    """Permutation importance of each parameter in a random forest fitted to (config -> metric).

    Features: log10 of log-scaled parameters, the value of other numbers, the index of a
    choice in its `values` list. A parameter every trial shared gets 0. Negative
    permutation scores (noise) count as 0; the rest are normalised to sum 1.
    """
    import numpy as np

    n = len(trials)
    if n < min_trials:
        return Importance({}, n, False, f"not computed: {n} completed trials; importance needs at least {min_trials}")
    y = trials[value_col].astype(float).to_numpy()
    if np.ptp(y) == 0:
        return Importance({}, n, False, f"not computed: every one of the {n} trials has the same {value_col}")
    columns, names = [], []
    constant = []
    for key, p in params.items():
        x = _feature(trials, key, p)
        if x is None:
            continue
        if np.ptp(x) == 0:
            constant.append(key)
            continue
        columns.append(x)
        names.append(key)
    if not names:
        return Importance({}, n, False, "not computed: no searched parameter varied across the trials")
    from sklearn.ensemble import RandomForestRegressor
    from sklearn.inspection import permutation_importance

    X = np.column_stack(columns)
    forest = RandomForestRegressor(n_estimators=100, min_samples_leaf=2, oob_score=True, random_state=seed, n_jobs=1)
    forest.fit(X, y)
    perm = permutation_importance(forest, X, y, n_repeats=5, random_state=seed, n_jobs=1)
    raw = np.clip(perm.importances_mean, 0.0, None)
    oob = float(forest.oob_score_) if hasattr(forest, "oob_score_") else None
    if raw.sum() <= 0:
        return Importance({}, n, False, f"not computed: no parameter explains {value_col} across {n} trials", oob_r2=oob)
    share = raw / raw.sum()
    scores = {k: float(v) for k, v in zip(names, share)}
    scores.update({k: 0.0 for k in constant})
    scores = dict(sorted(scores.items(), key=lambda kv: -kv[1]))
    note = f"from {n} completed trials"
    if oob is not None and oob < 0:
        note += f"; the forest predicts the metric poorly (out-of-bag R² {oob:.2f}), so treat the ranking as weak"
    return Importance(scores, n, True, note, oob_r2=oob)

def _feature(trials, key: str, p: Param):
    import numpy as np

    col = f"config/{key}"
    if col not in trials:
        return None
    values = [plain(v) for v in trials[col].tolist()]
    if p.dist == "choice":
        index = {repr(v): i for i, v in enumerate(p.values)}
        return np.array([index.get(repr(v), -1) for v in values], dtype=float)
    x = np.array([float(v) if not is_missing(v) else np.nan for v in values], dtype=float)
    if np.isnan(x).any():
        x = np.where(np.isnan(x), np.nanmedian(x), x)
    return np.log10(x) if p.log else x
