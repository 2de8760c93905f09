"""What a finished sweep says: ranking, parameter importance, the next stage's space, a
robust config, and per-trial diagnostics (field-lessons §1, 4, 9). No Ray here: everything
reads the exported results (`trials.parquet`, `history.parquet`, `sweep.yaml`) from any
storage URL, so it runs on a laptop against a sweep that ran on a cluster.

Which trials count. Every trial that ran without error and reported the metric is
*completed*, pruned ones included: ASHA pruned them for ranking low at a rung, so ranking
all completed trials by their best validation metric is ASHA's own ranking (survivors,
trained longer, rank first). Counting only trials that reached max_epochs would leave one
or two trials after an ASHA stage, too few to narrow anything.

Narrowing (`narrow_space`), per searched parameter, from the top 20% of completed trials:
- numeric: [min, max] of the values the top trials used, padded on both sides by `pad`
  times that width (in log10 units for log-scaled parameters, so 1e-3..1e-2 pads by a
  tenth of a decade, not by 0.0009) and kept at least `min_share` of the original width,
  then clipped to the original bounds: a narrowed range never goes below the original
  low, so regularisation floors stay (field-lessons §3); integers: exactly the min..max
  the top trials used;
- choice: the values the top trials used, in the original order;
- one value left (the top trials agree): the parameter moves to `fixed`;
- importance below `threshold` (0.05): frozen in `fixed` at the best trial's value, but
  only when importance is conclusive (enough trials); otherwise nothing is frozen and the
  output says why.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
from dataclasses import dataclass
from typing import Any

from rayrec.errors import UserError
from rayrec.tune.space import STAGES, Param, SearchSpace, parse_space

log = logging.getLogger(__name__)

COMPLETED = ("finished", "early_stopped", "pruned")
NEXT_SPACE_FILE = "next_space.yaml"
NARROW_FILE = "narrow.yaml"
ROBUST_FILE = "robust.yaml"
DIAGNOSTICS_FILE = "diagnostics.parquet"


# --- loading ----------------------------------------------------------------------------
def resolve_experiment(sweep: str, storage: str | None = None) -> str:
    """The experiment directory of SWEEP: a path or URL, or a sweep name under the storage."""
    from rayrec.storage import exists, join
    from rayrec.tune.sweep import SPEC_FILE, _known_sweeps, default_storage

    if not sweep or not str(sweep).strip():
        raise UserError("no sweep given; pass a sweep name, directory or URL")
    sweep = str(sweep).rstrip("/")
    storage = storage or default_storage()
    plain_name = "://" not in sweep and "/" not in sweep
    candidates = [join(storage, sweep), sweep] if plain_name else [sweep]
    for candidate in candidates:
        if exists(join(candidate, SPEC_FILE)):
            return candidate
    known = _known_sweeps(storage)
    hint = f"sweeps in {storage}: {', '.join(known)}" if known else f"{storage} holds no sweeps"
    raise UserError(f"no sweep at '{sweep}' (no {SPEC_FILE} there); {hint}")


@dataclass
class SweepResults:
    """A finished sweep as read back from storage."""

    experiment: str
    spec: dict[str, Any]  # sweep.yaml
    trials: Any  # pandas DataFrame, trials.parquet
    history: Any  # pandas DataFrame, history.parquet
    space: SearchSpace

    @property
    def model(self) -> str:
        return self.spec["model"]

    @property
    def metric(self) -> str:
        return self.spec.get("settings", {}).get("metric", "ndcg@10")

    @property
    def mode(self) -> str:
        return self.spec.get("settings", {}).get("mode", "max")

    @property
    def scheduler(self) -> str:
        return self.spec.get("settings", {}).get("scheduler", "")

    @property
    def max_epochs(self) -> int:
        return int(self.spec.get("settings", {}).get("max_epochs", 0) or 0)

    @property
    def value_col(self) -> str:
        return f"best_val_{self.metric}"

    @property
    def name(self) -> str:
        return self.spec.get("name") or self.experiment.rstrip("/").rsplit("/", 1)[-1]

    def ranked(self):
        """Completed trials with a finite metric, best first (ties keep trial order)."""
        return rank_trials(self.trials, self.value_col, self.mode)

    def file(self, name: str) -> str:
        from rayrec.storage import join

        return join(self.experiment, name)


def load_results(sweep: str, storage: str | None = None) -> SweepResults:
    from rayrec.storage import exists, join, read_parquet, read_yaml
    from rayrec.tune.sweep import SPEC_FILE

    experiment = resolve_experiment(sweep, storage)
    spec = read_yaml(join(experiment, SPEC_FILE)) or {}
    trials_url = join(experiment, "trials.parquet")
    if not exists(trials_url):
        raise UserError(
            f"sweep '{experiment}' has no trials.parquet yet: it is still running or was interrupted; "
            f"finish it with `rayrec sweep --resume --name {spec.get('name', '<name>')}`"
        )
    trials = read_parquet(trials_url)
    history_url = join(experiment, "history.parquet")
    import pandas as pd

    history = read_parquet(history_url) if exists(history_url) else pd.DataFrame()
    space = parse_space(dict(spec["space"]), source=join(experiment, SPEC_FILE))
    return SweepResults(experiment=experiment, spec=spec, trials=trials, history=history, space=space)


def rank_trials(trials, value_col: str, mode: str = "max"):
    """Completed (not errored) trials with a finite `value_col`, best first."""
    import numpy as np

    if not len(trials) or value_col not in trials:
        return trials.iloc[0:0]
    ok = trials["status"].isin(COMPLETED) & np.isfinite(trials[value_col].astype(float))
    return trials[ok].sort_values(value_col, ascending=(mode == "min"), kind="stable")


def require_completed(results: SweepResults, need: int = 1, what: str = "this") -> Any:
    """The ranked trials, or a one-line error saying how many there are and why that is too few."""
    ranked = results.ranked()
    if len(ranked) >= need:
        return ranked
    counts = results.trials["status"].value_counts().to_dict() if len(results.trials) else {}
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no trials"
    first_error = ""
    if "error" in results.trials and (results.trials["status"] == "errored").any():
        first_error = str(results.trials.loc[results.trials["status"] == "errored", "error"].iloc[0])[:160]
        first_error = f"; first error: {first_error}" if first_error else ""
    raise UserError(
        f"sweep '{results.experiment}' has {len(ranked)} completed trial(s) with a {results.value_col} "
        f"({detail}); {what} needs at least {need}{first_error}"
    )


def param_values(trials, key: str) -> list[Any]:
    """Plain Python values of config/<key> (NaN and missing dropped)."""
    col = f"config/{key}"
    if col not in trials:
        return []
    return [plain(v) for v in trials[col].tolist() if not _missing(v)]


# --- importance -------------------------------------------------------------------------
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
    x = np.array([float(v) if not _missing(v) else np.nan for v in values], dtype=float)
    if np.isnan(x).any():
        x = np.where(np.isnan(x), np.nanmedian(x), x)
    return np.log10(x) if p.log else x


# --- narrowing --------------------------------------------------------------------------
@dataclass
class Narrowing:
    space: SearchSpace  # the next stage's space
    importance: Importance
    changes: dict[str, str]  # parameter -> what happened, for people
    frozen: dict[str, Any]  # parameters moved to `fixed` (narrowed to one value or unimportant)
    top_trials: list[str]
    n_trials: int
    stage: str | None  # the sweep's stage
    next_stage: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage, "next_stage": self.next_stage, "n_trials": self.n_trials,
            "top_trials": self.top_trials, "changes": self.changes, "frozen": plain(self.frozen),
            "importance": self.importance.to_dict(),
        }


def top_count(n: int, fraction: float) -> int:
    """How many trials make the top `fraction`: at least 2, so a range has two ends."""
    return min(n, max(2, math.ceil(fraction * n - 1e-9)))


def narrow_param(p: Param, used: list[Any], pad: float = 0.1, min_share: float = 0.1) -> Param | tuple[str, Any]:
    """The range of `p` the values in `used` call for, or ('fixed', value) when one value is left.

    Numbers: [min, max] of `used` widened by `pad` x its width on each side, and to at least
    `min_share` of the original width (both in log10 units on log scales), within the
    original bounds. Integers: exactly min..max of `used`. Choices: the values used."""
    if not used:
        return p
    if p.dist == "choice":
        kept = [v for v in p.values if any(_same(v, u) for u in used)]
        if len(kept) <= 1:
            return ("fixed", kept[0] if kept else used[0])
        grid = [v for v in (p.grid or []) if any(_same(v, k) for k in kept)] or ([kept[0]] if p.grid else None)
        return Param(p.key, p.dist, values=kept, grid=grid)
    if p.dist in ("int", "logint"):
        # Integers take exactly the values the top trials used: padding and rounding outward
        # would give back most of a range like 1..3.
        lo, hi = float(min(int(u) for u in used)), float(max(int(u) for u in used))
    else:
        to = math.log10 if p.log else float
        back = (lambda x: 10.0 ** x) if p.log else float
        a, b = to(min(float(u) for u in used)), to(max(float(u) for u in used))
        lo, hi = a - pad * (b - a), b + pad * (b - a)
        least = min_share * (to(p.high) - to(p.low))
        if hi - lo < least:  # a few top trials close together must not collapse the range
            mid = (a + b) / 2
            lo, hi = mid - least / 2, mid + least / 2
        lo, hi = back(lo), back(hi)
        lo, hi = _round_sig(lo, down=True), _round_sig(hi, down=False)
        if p.q:
            lo, hi = math.floor(lo / p.q) * p.q, math.ceil(hi / p.q) * p.q
    lo, hi = max(lo, p.low), min(hi, p.high)  # never outside the original range: floors kept
    if lo >= hi:
        value = min(used, key=lambda u: abs(float(u) - lo))
        return ("fixed", int(value) if p.dist in ("int", "logint") else float(value))
    grid = None
    if p.grid is not None:
        grid = [g for g in p.grid if lo <= float(g) <= hi] or [_clip(used[0], lo, hi, p)]
    return Param(p.key, p.dist, low=lo, high=hi, q=p.q, grid=grid)


def next_stage_of(stage: str | None, space: SearchSpace) -> str | None:
    """smoke -> quick -> medium; after medium (or no stage) medium again, if the space defines it."""
    if stage in STAGES and STAGES.index(stage) + 1 < len(STAGES):
        nxt = STAGES[STAGES.index(stage) + 1]
    else:
        nxt = "medium"
    return nxt if nxt in space.stages else None


def narrow_space(results: SweepResults, top_fraction: float = 0.2, threshold: float = 0.05, min_trials: int = 5,
                 pad: float = 0.1, min_share: float = 0.1, next_stage: str | None = None, min_importance_trials: int = 10,
                 seed: int = 0) -> Narrowing:
    """The next stage's search space from a finished sweep (see the module docstring)."""
    if not 0 < top_fraction <= 1:
        raise UserError(f"--top-fraction must be in (0, 1], got {top_fraction}")
    if not 0 <= threshold < 1:
        raise UserError(f"--threshold must be in [0, 1), got {threshold}")
    if pad < 0 or not 0 <= min_share <= 1:
        raise UserError(f"--pad must be >= 0 and min_share in [0, 1], got {pad}/{min_share}")
    ranked = require_completed(results, min_trials, "narrowing")
    space = results.space
    stage = (results.spec.get("options") or {}).get("stage")
    if next_stage is None:
        next_stage = next_stage_of(stage, space)
    elif next_stage not in space.stages:
        from rayrec.errors import did_you_mean

        raise UserError(f"--stage '{next_stage}' is not defined in the sweep's space; {did_you_mean(next_stage, space.stages or STAGES)}")
    k = top_count(len(ranked), top_fraction)
    top = ranked.head(k)
    best = ranked.iloc[0]
    importance = parameter_importance(ranked, space.params, results.value_col, min_importance_trials, seed)

    params: dict[str, Param] = {}
    fixed = dict(space.fixed)
    frozen: dict[str, Any] = {}
    changes: dict[str, str] = {}
    for key, p in space.params.items():
        used = param_values(top, key)
        score = importance.scores.get(key)
        if importance.conclusive and score is not None and score < threshold and f"config/{key}" in best:
            value = _typed(plain(best[f"config/{key}"]), p)
            fixed[key] = frozen[key] = value
            changes[key] = f"frozen at {_fmt(value)} (best trial's value; importance {score:.3f} < {threshold})"
            continue
        narrowed = narrow_param(p, used, pad, min_share)
        if isinstance(narrowed, tuple):
            fixed[key] = frozen[key] = _typed(narrowed[1], p)
            changes[key] = f"fixed at {_fmt(frozen[key])} (every top trial used it)"
            continue
        params[key] = narrowed
        changes[key] = f"{_describe(p)} -> {_describe(narrowed)}" if narrowed.to_dict() != p.to_dict() else f"unchanged {_describe(p)}"

    sweep = dict(space.sweep)
    if next_stage is not None:
        sweep.update(space.stages[next_stage])
    new = SearchSpace(model=space.model, params=params, fixed=fixed, sweep=sweep, stages=dict(space.stages),
                      mutate=[m for m in space.mutate if m in params], source=results.file(NEXT_SPACE_FILE))
    new = parse_space(new.to_dict(), source=results.file(NEXT_SPACE_FILE))  # the same checks a sweep makes
    return Narrowing(space=new, importance=importance, changes=changes, frozen=frozen,
                     top_trials=[str(t) for t in top["trial_id"]], n_trials=len(ranked), stage=stage,
                     next_stage=next_stage)


def write_narrowing(results: SweepResults, narrowing: Narrowing) -> str:
    """next_space.yaml (a search space, with a comment header saying where it came from) and narrow.yaml."""
    import yaml

    from rayrec.storage import write_bytes, write_yaml

    imp = narrowing.importance
    lines = [
        f"# Search space narrowed by `rayrec narrow` from sweep {results.experiment}",
        f"# on {dt.datetime.now(dt.timezone.utc).isoformat(timespec='seconds')}: {narrowing.n_trials} completed trials, "
        f"top {len(narrowing.top_trials)} by {results.value_col}.",
        f"# Next stage: {narrowing.next_stage or '(the space defines no stages)'}; run it with "
        f"`rayrec sweep {results.model} --from {results.experiment}`.",
    ]
    if imp.conclusive:
        lines.append("# Importance (" + imp.method + "; sums to 1): "
                     + ", ".join(f"{k} {v:.2f}" for k, v in imp.scores.items()))
    else:
        lines.append(f"# Importance {imp.message}; no parameter was frozen for low importance.")
    lines.append("# Changes:")
    lines += [f"#   {k}: {v}" for k, v in narrowing.changes.items()]
    body = yaml.safe_dump(plain(narrowing.space.to_dict()), sort_keys=False, default_flow_style=None)
    url = results.file(NEXT_SPACE_FILE)
    write_bytes(url, ("\n".join(lines) + "\n" + body).encode())
    write_yaml(results.file(NARROW_FILE), plain({"source": results.experiment, "next_space": url, **narrowing.to_dict()}))
    return url


def next_space_source(sweep: str, storage: str | None = None) -> tuple[str, dict[str, Any]]:
    """For `rayrec sweep --from SWEEP`: (URL of its next_space.yaml, its base config)."""
    from rayrec.storage import exists, join, read_yaml
    from rayrec.tune.sweep import SPEC_FILE

    experiment = resolve_experiment(sweep, storage)
    url = join(experiment, NEXT_SPACE_FILE)
    if not exists(url):
        raise UserError(f"sweep '{experiment}' has no {NEXT_SPACE_FILE}; run `rayrec narrow {sweep}` first")
    return url, read_yaml(join(experiment, SPEC_FILE)).get("base") or {}


# --- robust config ----------------------------------------------------------------------
def robust_params(top, params: dict[str, Param]) -> dict[str, Any]:
    """Average of the top trials' parameters: geometric mean on log scales, arithmetic mean
    otherwise, rounded for integers (and to q for quantised ones), mode for choices (a tie
    goes to the value of the better-ranked trial). `top` is ordered best first."""
    out: dict[str, Any] = {}
    for key, p in params.items():
        used = param_values(top, key)
        if not used:
            continue
        if p.dist == "choice":
            counts: dict[str, list] = {}
            for v in used:  # best first, so the first value to reach the top count wins a tie
                counts.setdefault(repr(v), [v, 0])[1] += 1
            most = max(c for _, c in counts.values())
            out[key] = next(v for v, c in counts.values() if c == most)
            continue
        xs = [float(v) for v in used]
        value = math.exp(sum(math.log(x) for x in xs) / len(xs)) if p.log else sum(xs) / len(xs)
        if p.q:
            value = round(value / p.q) * p.q
        value = min(max(value, p.low), p.high)
        out[key] = int(round(value)) if p.dist in ("int", "logint") else float(value)
    return out


def robust_config(results: SweepResults, k: int = 5) -> tuple[dict[str, Any], list[str]]:
    """(fully resolved config of the top-k average, ids of the trials averaged)."""
    from rayrec.config import build_config
    from rayrec.storage import exists, read_yaml

    if k < 1:
        raise UserError(f"--top-k must be >= 1, got {k}")
    ranked = require_completed(results, 1, "a robust config")
    top = ranked.head(k)
    overrides = trial_overrides(top.iloc[0])  # fixed values and anything else the trials shared
    overrides.update(robust_params(top, results.space.params))
    best_url = results.file("best.yaml")
    if exists(best_url):
        # Same device and threads as the best trial recorded, so the two configs differ only in parameters.
        train = (read_yaml(best_url) or {}).get("train", {})
        for key in ("device", "num_threads"):
            if key in train:
                overrides[f"train.{key}"] = train[key]
    try:
        cfg = build_config(results.model, results.spec.get("base") or {}, overrides)
    except UserError as exc:
        raise UserError(f"the averaged top-{k} parameters do not form a valid config: {exc}") from None
    return cfg.to_dict(), [str(t) for t in top["trial_id"]]


def export_robust(results: SweepResults, k: int = 5) -> str:
    from rayrec.storage import write_yaml

    resolved, _ = robust_config(results, k)
    url = results.file(ROBUST_FILE)
    write_yaml(url, plain(resolved))
    return url


def trial_overrides(row) -> dict[str, Any]:
    """A trial's sampled and fixed values as dotted overrides (`config/<key>` columns)."""
    return {c[len("config/"):]: plain(v) for c, v in row.items()
            if c.startswith("config/") and not c[len("config/"):].startswith("_") and not _missing(v)}


# --- diagnostics ------------------------------------------------------------------------
@dataclass
class DiagnosticThresholds:
    gap: float = 0.02  # train - validation metric above this: over-fitting (field-lessons §4)
    dead_epoch: int = 2  # early-stopped at or before this epoch: training that did nothing
    coverage_floor: float = 0.05  # coverage@10 below this: recommendations collapsed to few items
    coverage_ratio: float = 0.25  # ... or below this fraction of the best trial's coverage


def diagnose(results: SweepResults, thresholds: DiagnosticThresholds | None = None):
    """One row per trial: train/validation gap, dead training, coverage collapse, and flags."""
    import numpy as np
    import pandas as pd

    th = thresholds or DiagnosticThresholds()
    trials, history = results.trials, results.history
    value_col = results.value_col
    metric_col = f"val_{results.metric}"
    train_col = f"train_{results.metric}"
    ranked = results.ranked()
    best_id = ranked["trial_id"].iloc[0] if len(ranked) else None
    per_trial = {tid: frame.sort_values("epoch") for tid, frame in history.groupby("trial_id")} if len(history) and "trial_id" in history else {}

    rows = []
    for _, t in trials.iterrows():
        tid = t["trial_id"]
        frame = per_trial.get(tid)
        at_best = _best_row(frame, metric_col, results.mode)
        gap = float("nan")
        if at_best is not None and train_col in at_best and not _missing(at_best[train_col]):
            gap = float(at_best[train_col]) - float(at_best[metric_col])
        coverage = float(at_best["val_coverage@10"]) if at_best is not None and "val_coverage@10" in at_best and not _missing(at_best["val_coverage@10"]) else float(t.get("last_val_coverage@10", float("nan")))
        loss_moved = float("nan")
        if frame is not None and "train_loss" in frame and len(frame) >= 2:
            losses = frame["train_loss"].astype(float).dropna()
            if len(losses) >= 2 and losses.iloc[0] != 0:
                loss_moved = abs(losses.iloc[-1] - losses.iloc[0]) / abs(losses.iloc[0])
        rows.append({
            "trial_id": tid, "status": t["status"], "epochs": int(t.get("epochs", 0) or 0),
            value_col: float(t.get(value_col, float("nan"))),
            "best_epoch": int(at_best["epoch"]) if at_best is not None else 0,
            "train_val_gap": gap, "coverage@10": coverage, "loss_change": loss_moved,
        })
    frame = pd.DataFrame(rows)
    if not len(frame):
        return frame
    best_cov = frame.loc[frame["trial_id"] == best_id, "coverage@10"]
    best_cov = float(best_cov.iloc[0]) if len(best_cov) else float("nan")
    values = frame.loc[frame["status"].isin(COMPLETED), value_col].dropna()
    identical = len(values) >= 2 and float(values.max() - values.min()) == 0.0
    flags_all, over, dead, collapse = [], [], [], []
    for _, r in frame.iterrows():
        flags = []
        is_over = bool(np.isfinite(r["train_val_gap"]) and r["train_val_gap"] > th.gap)
        if is_over:
            flags.append(f"overfitting: train-valid gap {r['train_val_gap']:.3f} > {th.gap}")
        is_dead = False
        if r["status"] == "early_stopped" and r["epochs"] <= th.dead_epoch:
            is_dead = True
            flags.append(f"dead training: early-stopped at epoch {r['epochs']}")
        if identical and r["status"] in COMPLETED:
            is_dead = True
            flags.append("dead training: every trial has the same metric")
        if np.isfinite(r["loss_change"]) and r["loss_change"] < 1e-4:
            is_dead = True
            flags.append("dead training: training loss did not move")
        is_collapse = False
        if np.isfinite(r["coverage@10"]):
            if r["coverage@10"] < th.coverage_floor:
                is_collapse = True
                flags.append(f"coverage collapse: coverage@10 {r['coverage@10']:.3f} < {th.coverage_floor}")
            elif np.isfinite(best_cov) and r["coverage@10"] < th.coverage_ratio * best_cov:
                is_collapse = True
                flags.append(f"coverage collapse: coverage@10 {r['coverage@10']:.3f} < {th.coverage_ratio:g} x best trial's {best_cov:.3f}")
        if r["status"] == "errored":
            flags.append("errored")
        over.append(is_over)
        dead.append(is_dead)
        collapse.append(is_collapse)
        flags_all.append("; ".join(flags))
    frame["overfitting"] = over
    frame["dead"] = dead
    frame["coverage_collapse"] = collapse
    frame["flags"] = flags_all
    return frame


def _best_row(frame, metric_col: str, mode: str):
    if frame is None or metric_col not in frame or not len(frame):
        return None
    values = frame[metric_col].astype(float)
    if values.isna().all():
        return frame.iloc[-1]
    return frame.loc[values.idxmax() if mode == "max" else values.idxmin()]


def write_diagnostics(results: SweepResults, url: str | None = None):
    from rayrec.storage import write_parquet

    frame = diagnose(results)
    write_parquet(url or results.file(DIAGNOSTICS_FILE), frame)
    return frame


def best_epochs(results: SweepResults, trial_ids: list[str]) -> list[int]:
    """Each trial's best epoch by the sweep metric (from history)."""
    metric_col = f"val_{results.metric}"
    out = []
    for tid in trial_ids:
        frame = results.history[results.history["trial_id"] == tid] if len(results.history) else None
        row = _best_row(frame, metric_col, results.mode)
        if row is not None:
            out.append(int(row["epoch"]))
    return out


# --- small helpers ----------------------------------------------------------------------
def plain(obj: Any) -> Any:
    """YAML-safe copy: numpy scalars and arrays to Python values."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return plain(obj.tolist())
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except (ValueError, AttributeError):
            return obj
    return obj


def _missing(v: Any) -> bool:
    import numbers

    if v is None:
        return True
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isnan(v)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def _typed(value: Any, p: Param) -> Any:
    if p.dist == "choice":
        return next((v for v in p.values if _same(v, value)), value)
    if p.dist in ("int", "logint"):
        return int(round(float(value)))
    return float(value)


def _clip(value: Any, lo: float, hi: float, p: Param) -> Any:
    v = min(max(float(value), lo), hi)
    return int(round(v)) if p.dist in ("int", "logint") else v


def _round_sig(x: float, down: bool, digits: int = 4) -> float:
    """x to `digits` significant digits, rounded outward so a narrowed range never shrinks."""
    if x == 0 or not math.isfinite(x):
        return x
    r = float(f"{x:.{digits}g}")
    if (down and r > x) or (not down and r < x):
        step = 10 ** (math.floor(math.log10(abs(r))) - digits + 1)
        r = float(f"{(r - step) if down else (r + step):.{digits}g}")
    return r


def _describe(p: Param) -> str:
    if p.dist == "choice":
        return f"choice {p.values}"
    return f"{p.dist} {_fmt(p.low)}..{_fmt(p.high)}"


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return repr(v) if isinstance(v, str) else str(v)


# --- PBT lineage ------------------------------------------------------------------------
def pbt_lineage(history, atol: float = 1e-6):
    """Who cloned whom: one row per exploit (a report with restored_epoch > 0 whose restored
    weights match another trial's weights_checksum at that epoch), with the config changes.

    A restore that matches the trial's own weights (a retry or a resume) is not an exploit.
    """
    import numpy as np
    import pandas as pd

    columns = ["epoch", "trial_id", "donor", "changes"]
    needed = {"restored_epoch", "restored_checksum", "weights_checksum", "trial_id", "epoch"}
    if not len(history) or not needed <= set(history.columns):
        return pd.DataFrame(columns=columns)
    tracked = [c for c in history.columns if c.startswith(("config_", "config/"))]
    restores = history[(history["restored_epoch"].fillna(0) > 0) & history["restored_checksum"].notna()]
    rows = []
    for _, r in restores.iterrows():
        at = history[(history["epoch"] == r["restored_epoch"]) & (history["trial_id"] != r["trial_id"])]
        match = at[np.isclose(at["weights_checksum"].astype(float), float(r["restored_checksum"]), rtol=0, atol=atol)]
        if not len(match):
            continue
        donor = match.iloc[0]
        changes = []
        for c in tracked:
            a, b = donor[c], r[c]
            if _missing(a) or _missing(b):
                continue
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                if not math.isclose(float(a), float(b), rel_tol=1e-9):
                    changes.append(f"{c.split('/', 1)[-1].removeprefix('config_')} {float(a):.3g}->{float(b):.3g}")
            elif a != b:
                changes.append(f"{c.split('/', 1)[-1].removeprefix('config_')} {a}->{b}")
        rows.append({"epoch": int(r["restored_epoch"]), "trial_id": str(r["trial_id"]), "donor": str(donor["trial_id"]),
                     "changes": ", ".join(changes)})
    return pd.DataFrame(rows, columns=columns)
