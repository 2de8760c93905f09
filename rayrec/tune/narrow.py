"""`rayrec narrow`: the next stage's search space and the robust config from a finished sweep.

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

The robust config (`robust_config`): the top-k trials' parameters averaged, in the same
resolved form as best.yaml.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rayrec.errors import UserError
from rayrec.experiment import BEST_FILE, NARROW_FILE, NEXT_SPACE_FILE, ROBUST_FILE, utc_timestamp
from rayrec.storage import plain
from rayrec.tune.importance import Importance, parameter_importance
from rayrec.tune.results import (
    SweepResults,
    format_value,
    param_values,
    require_completed,
    same_value,
    trial_overrides,
)
from rayrec.tune.space import STAGES, Param, SearchSpace, parse_space


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
        kept = [v for v in p.values if any(same_value(v, u) for u in used)]
        if len(kept) <= 1:
            return ("fixed", kept[0] if kept else used[0])
        grid = [v for v in (p.grid or []) if any(same_value(v, k) for k in kept)] or ([kept[0]] if p.grid else None)
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
            changes[key] = f"frozen at {format_value(value)} (best trial's value; importance {score:.3f} < {threshold})"
            continue
        narrowed = narrow_param(p, used, pad, min_share)
        if isinstance(narrowed, tuple):
            fixed[key] = frozen[key] = _typed(narrowed[1], p)
            changes[key] = f"fixed at {format_value(frozen[key])} (every top trial used it)"
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
        f"# on {utc_timestamp()}: {narrowing.n_trials} completed trials, "
        f"top {len(narrowing.top_trials)} by {results.value_col}.",
        f"# Next stage: {narrowing.next_stage or '(the space defines no stages)'}; run it with "
        f"`rayrec sweep {results.model} --from {results.experiment}`.",
    ]
    if results.status.partial:
        lines.append(f"# PARTIAL: narrowed from an unfinished sweep ({results.status.describe()}).")
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
    write_yaml(results.file(NARROW_FILE), plain({"source": results.experiment, "source_status": results.status.record(),
                                                     "next_space": url, **narrowing.to_dict()}))
    return url

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
    best_url = results.file(BEST_FILE)
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

def _typed(value: Any, p: Param) -> Any:
    if p.dist == "choice":
        return next((v for v in p.values if same_value(v, value)), value)
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
    return f"{p.dist} {format_value(p.low)}..{format_value(p.high)}"
