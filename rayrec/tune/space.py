"""Search spaces: commented YAML in rayrec/search_spaces/<model>.yaml, validated, turned into Tune domains.

Layout (every key optional except model and params):

    model: sasrec
    sweep:   {metric: ndcg@10, mode: max, num_samples: 16, max_epochs: 20, grace_period: 2,
              reduction_factor: 3, search: hyperopt, scheduler: asha}
    stages:  {smoke: {num_samples: 2, max_epochs: 2}, quick: {...}, medium: {...}}
    fixed:   {train.patience: 5}              # dotted config keys every trial uses
    params:
      train.lr: {dist: loguniform, low: 1.0e-4, high: 1.0e-2}
      model.hidden: {dist: choice, values: [32, 64, 128]}
      model.blocks: {dist: int, low: 1, high: 3}            # inclusive bounds
      model.dropout: {dist: uniform, low: 0.1, high: 0.5, grid: [0.1, 0.3]}
    pbt:
      mutate: [train.lr, train.weight_decay, model.dropout]  # never shape parameters

This module does not import Ray until a Tune domain is requested, so validation is cheap.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any

from rayrec.errors import UserError, did_you_mean

DISTS = ("loguniform", "uniform", "quniform", "qloguniform", "int", "logint", "choice")
TOP_KEYS = ("model", "sweep", "stages", "fixed", "params", "pbt")
SWEEP_KEYS = (
    "metric", "mode", "num_samples", "max_epochs", "grace_period", "reduction_factor",
    "search", "scheduler", "perturbation_interval", "quantile_fraction", "checkpoint_every",
)
STAGES = ("smoke", "quick", "medium")
SEARCHES = ("hyperopt", "random", "grid")
SCHEDULERS = ("asha", "pbt", "fifo")

# Shipped inside the package (package data), so an installed wheel finds them as a source checkout does.
SPACES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "search_spaces")


@dataclass
class Param:
    key: str
    dist: str
    low: float | None = None
    high: float | None = None
    q: float | None = None
    values: list[Any] | None = None
    grid: list[Any] | None = None

    @property
    def log(self) -> bool:
        return self.dist in ("loguniform", "qloguniform", "logint")

    def grid_values(self) -> list[Any]:
        if self.grid is not None:
            return list(self.grid)
        if self.dist == "choice":
            return list(self.values)
        if self.dist in ("int", "logint") and self.high - self.low <= 10:
            return list(range(int(self.low), int(self.high) + 1))
        raise UserError(
            f"parameter '{self.key}' ({self.dist}) has no grid; add 'grid: [...]' to it in the space, "
            "or use --search random/hyperopt"
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"dist": self.dist}
        for name in ("low", "high", "q", "values", "grid"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out


@dataclass
class SearchSpace:
    model: str
    params: dict[str, Param]
    fixed: dict[str, Any] = field(default_factory=dict)
    sweep: dict[str, Any] = field(default_factory=dict)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    mutate: list[str] = field(default_factory=list)
    source: str = ""

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"model": self.model}
        if self.sweep:
            out["sweep"] = dict(self.sweep)
        if self.stages:
            out["stages"] = copy.deepcopy(self.stages)
        if self.fixed:
            out["fixed"] = dict(self.fixed)
        out["params"] = {k: p.to_dict() for k, p in self.params.items()}
        if self.mutate:
            out["pbt"] = {"mutate": list(self.mutate)}
        return out

    def fingerprint(self) -> str:
        """What must not change between a sweep and its resume: params, fixed values, mutations."""
        core = {"model": self.model, "fixed": self.fixed, "mutate": self.mutate,
                "params": {k: p.to_dict() for k, p in self.params.items()}}
        return hashlib.sha256(json.dumps(core, sort_keys=True, default=str).encode()).hexdigest()

    def sweep_defaults(self, stage: str | None = None) -> dict[str, Any]:
        out = dict(self.sweep)
        if stage is not None:
            if not self.stages:
                raise UserError(f"stage '{stage}' is not defined: {self.source or 'the space'} has no stages; "
                                "drop --stage to use its sweep: defaults")
            if stage not in self.stages:
                raise UserError(f"stage '{stage}' is not defined in {self.source or 'the space'}; {did_you_mean(stage, self.stages or STAGES)}")
            out.update(self.stages[stage])
        return out

    # --- Ray Tune domains (imports Ray) ---------------------------------------------------
    def tune_domains(self, search: str) -> dict[str, Any]:
        """Flat dotted keys -> Tune domains (or grid_search).

        Fixed values are not here: the sweep merges them into every trial's base config,
        below the user's --set overrides, so `--set` wins over the space's `fixed`.
        """
        from ray import tune

        space: dict[str, Any] = {}
        for key, p in self.params.items():
            if search == "grid":
                space[key] = tune.grid_search(p.grid_values())
            else:
                space[key] = _domain(p)
        return space

    def pbt_mutations(self) -> dict[str, Any]:
        return {key: _domain(self.params[key]) for key in self.mutate}


def _domain(p: Param):
    from ray import tune

    if p.dist == "loguniform":
        return tune.loguniform(p.low, p.high)
    if p.dist == "uniform":
        return tune.uniform(p.low, p.high)
    if p.dist == "quniform":
        return tune.quniform(p.low, p.high, p.q)
    if p.dist == "qloguniform":
        return tune.qloguniform(p.low, p.high, p.q)
    if p.dist == "int":
        return tune.randint(int(p.low), int(p.high) + 1)  # YAML bounds are inclusive
    if p.dist == "logint":
        return tune.lograndint(int(p.low), int(p.high) + 1)
    return tune.choice(list(p.values))


def space_path(model: str) -> str:
    return os.path.join(SPACES_DIR, f"{model}.yaml")


def load_space(model: str | None, path: str | None = None) -> SearchSpace:
    """The search space for `model`: `path` if given, else the shipped rayrec/search_spaces/<model>.yaml."""
    from rayrec.config import load_yaml

    if path is None:
        if model is None:
            raise UserError("no model given; pass one (e.g. `rayrec sweep sasrec`) or --space FILE.yaml")
        from rayrec.models import get_model_spec

        get_model_spec(model)  # unknown model -> clear error before looking for a file
        path = space_path(model)
        if not os.path.exists(path):
            raise UserError(f"no search space for model '{model}' at {path}; pass one with --space FILE.yaml")
    raw = load_yaml(path, what="search space", keys=", ".join(f"{k}:" for k in TOP_KEYS))
    space = parse_space(raw, source=path)
    if model is not None and space.model != model:
        raise UserError(f"search space {path} is for model '{space.model}', not '{model}'")
    return space


def parse_space(raw: dict[str, Any], source: str = "<space>") -> SearchSpace:
    """Validate a search-space mapping; every error names the key and what would be valid."""
    from rayrec.config import build_config

    where = source
    unknown = [k for k in raw if k not in TOP_KEYS]
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}'; {did_you_mean(unknown[0], TOP_KEYS)}")
    model = raw.get("model")
    if not isinstance(model, str):
        raise UserError(f"{where}: 'model' must name a model, e.g. model: sasrec")
    params_raw = raw.get("params") or {}
    if not isinstance(params_raw, dict):
        raise UserError(f"{where}: 'params' must map config keys (e.g. train.lr) to distributions")
    params = {key: _parse_param(key, spec, where) for key, spec in params_raw.items()}

    fixed = raw.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise UserError(f"{where}: 'fixed' must map config keys to values")
    both = set(fixed) & set(params)
    if both:
        raise UserError(f"{where}: '{sorted(both)[0]}' is both fixed and searched; keep it in one place")

    sweep = raw.get("sweep") or {}
    _check_keys(sweep, SWEEP_KEYS, f"{where}: sweep")
    stages = raw.get("stages") or {}
    if not isinstance(stages, dict):
        raise UserError(f"{where}: 'stages' must map stage names ({', '.join(STAGES)}) to sweep settings")
    for name, settings in stages.items():
        if name not in STAGES:
            raise UserError(f"{where}: unknown stage '{name}'; {did_you_mean(name, STAGES)}")
        _check_keys(settings or {}, SWEEP_KEYS, f"{where}: stages.{name}")
        stages[name] = dict(settings or {})

    pbt = raw.get("pbt") or {}
    _check_keys(pbt, ("mutate",), f"{where}: pbt")
    mutate = list(pbt.get("mutate") or [])
    for key in mutate:
        if key not in params:
            raise UserError(f"{where}: pbt.mutate names '{key}', which is not in params; {did_you_mean(key, params)}")

    # Every key must be a real config field with a value its type accepts: build a config
    # at each parameter's bounds. This also catches a range that the model itself rejects.
    for probe in _probes(params) if params else [{}]:
        try:
            build_config(model, overrides={**fixed, **probe})
        except UserError as exc:  # say where: the same key is fine elsewhere (a --set, a config file)
            raise UserError(f"{where}: {exc}") from None
    space = SearchSpace(model=model, params=params, fixed=dict(fixed), sweep=dict(sweep), stages=stages,
                        mutate=mutate, source=source)
    _check_mutations_keep_shapes(space)
    return space


def _parse_param(key: str, spec: Any, where: str) -> Param:
    if not isinstance(spec, dict):
        raise UserError(f"{where}: params.{key} must be a mapping like {{dist: loguniform, low: 1.0e-4, high: 1.0e-2}}")
    _check_keys(spec, ("dist", "low", "high", "q", "values", "grid"), f"{where}: params.{key}")
    dist = spec.get("dist")
    if dist not in DISTS:
        raise UserError(f"{where}: params.{key} has unknown dist '{dist}'; {did_you_mean(str(dist), DISTS)}")
    grid = spec.get("grid")
    if grid is not None and (not isinstance(grid, list) or not grid):
        raise UserError(f"{where}: params.{key}.grid must be a non-empty list")
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise UserError(f"{where}: params.{key} is a choice with no values; give values: [a, b, ...]")
        return Param(key, dist, values=values, grid=grid)
    low, high = spec.get("low"), spec.get("high")
    for name, v in (("low", low), ("high", high)):
        if isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                pass
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise UserError(f"{where}: params.{key}.{name} must be a number, got {spec.get(name)!r}")
    low, high = float(low), float(high)
    if low >= high:
        raise UserError(f"{where}: params.{key} has low >= high ({low:g} >= {high:g})")
    if dist in ("loguniform", "qloguniform", "logint") and low <= 0:
        raise UserError(f"{where}: params.{key} is log-scaled but low={low:g}; a log range must start above 0")
    q = spec.get("q")
    if dist in ("quniform", "qloguniform"):
        if not isinstance(q, (int, float)) or q <= 0:
            raise UserError(f"{where}: params.{key} ({dist}) needs q > 0, got {q!r}")
    if dist in ("int", "logint"):
        if low != int(low) or high != int(high):
            raise UserError(f"{where}: params.{key} ({dist}) needs integer bounds, got {low:g}..{high:g}")
    return Param(key, dist, low=low, high=high, q=q, grid=grid)


def _check_keys(mapping: Any, valid: tuple[str, ...], where: str) -> None:
    if not isinstance(mapping, dict):
        raise UserError(f"{where} must be a mapping")
    for k in mapping:
        if k not in valid:
            raise UserError(f"{where}: unknown key '{k}'; {did_you_mean(k, valid)}")


def _probes(params: dict[str, Param]) -> list[dict[str, Any]]:
    """Two configs covering every parameter's extremes (lows together, highs together)."""
    lows, highs = {}, {}
    for key, p in params.items():
        if p.dist == "choice":
            lows[key], highs[key] = p.values[0], p.values[-1]
        elif p.dist in ("int", "logint"):
            lows[key], highs[key] = int(p.low), int(p.high)
        else:
            lows[key], highs[key] = p.low, p.high
        if p.grid is not None:
            lows[key] = p.grid[0]
    return [lows, highs]


def _check_mutations_keep_shapes(space: SearchSpace) -> None:
    """PBT copies a donor's weights into a trial with a mutated config, so a mutation that
    changes any parameter's shape (hidden size, layers, max_len) would break loading."""
    if not space.mutate:
        return
    import numpy as np

    from rayrec.config import build_config
    from rayrec.data.types import CSR, SplitData
    from rayrec.models import build_model

    def rated(rows):  # ratings too, so rating models (svdpp) build on it
        csr = CSR.from_lists(rows)
        return CSR(csr.indptr, csr.items, np.full(csr.nnz, 3.0, dtype=np.float32))

    tiny = SplitData(
        name="shape-probe", n_users=3, n_items=6,
        train=rated([[1, 2, 3], [2, 3, 4], [4, 5, 6]]),
        valid=rated([[4], [5], [1]]), test=rated([[5], [6], [2]]),
        ordered=True, fingerprint="probe",
    )
    lows, highs = _probes(space.params)
    base = {**space.fixed, **lows}

    def shapes(overrides):
        cfg = build_config(space.model, overrides=overrides)
        return {k: tuple(v.shape) for k, v in build_model(cfg.model_name, cfg.model, tiny).state_dict().items()}

    reference = shapes(base)
    for key in space.mutate:
        if shapes({**base, key: highs[key]}) != reference:
            raise UserError(
                f"{space.source}: pbt.mutate includes '{key}', which changes the model's parameter shapes; "
                "PBT may only mutate optimiser and regularisation values (lr, weight_decay, dropout, ...)"
            )


def diff_spaces(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Human-readable differences between two `SearchSpace.to_dict()` forms (params, fixed, pbt)."""
    changes = []
    for section in ("params", "fixed"):
        a, b = old.get(section) or {}, new.get(section) or {}
        for key in sorted(set(a) | set(b)):
            if key not in b:
                changes.append(f"{section}.{key} removed")
            elif key not in a:
                changes.append(f"{section}.{key} added")
            elif a[key] != b[key]:
                changes.append(f"{section}.{key}: {a[key]} -> {b[key]}")
    if (old.get("pbt") or {}) != (new.get("pbt") or {}):
        changes.append(f"pbt: {old.get('pbt')} -> {new.get('pbt')}")
    if old.get("model") != new.get("model"):
        changes.append(f"model: {old.get('model')} -> {new.get('model')}")
    return changes
