"""Planning a sweep, with no Ray: options, settings, space and base config, checked and resolved.

Everything that can be checked is checked here, before Ray starts: the space, the option
combination (SweepSettings.validate), the base config every trial starts from, the name.
`rayrec sweep` resolves its base config through the same layers as `rayrec train`
(rayrec.config.command_layers, then build_config), with the space's `fixed` values between
the config file and the `--set` overrides, and the sweep's epoch budget and metric on top.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass, field
from typing import Any

from rayrec.config import build_config, command_layers, overlay
from rayrec.errors import UserError
from rayrec.experiment import SPEC_FILE, default_storage, experiment_url, known_sweeps_hint, next_space_source, utc_timestamp
from rayrec.tune.settings import SweepSettings
from rayrec.tune.space import SearchSpace, diff_spaces, load_space, parse_space


@dataclass
class SweepOptions:
    """Everything `rayrec sweep` accepts. None means 'take it from the space's sweep/stage defaults'."""

    model: str | None = None
    name: str | None = None
    storage: str | None = None
    space: str | None = None  # search-space YAML; default rayrec/search_spaces/<model>.yaml
    stage: str | None = None  # smoke | quick | medium
    from_sweep: str | None = None  # start from this sweep's narrowed space (next_space.yaml) and base config
    config: str | None = None  # base config YAML
    data: str | None = None
    sets: list[str] = field(default_factory=list)  # key=value overrides of the base config
    search: str | None = None
    scheduler: str | None = None
    metric: str | None = None  # validation metric to optimise; default the space's `sweep: metric:` (`rayrec compare` sets one for all)
    num_samples: int | None = None
    max_epochs: int | None = None
    grace_period: int | None = None
    reduction_factor: float | None = None
    perturbation_interval: int | None = None
    quantile_fraction: float | None = None
    pbt_synch: bool = False
    checkpoint_every: int | None = None
    gpus_per_trial: float = 0.0
    cpus_per_trial: float = 1.0
    max_concurrent: int | None = None
    max_failures: int = 2
    address: str | None = None
    wandb: str | None = None  # online | offline | off; default: online with an API key, else offline
    seed: int = 0  # searcher seed
    resume: bool = False
    verbose: int = 1
    evaluate_test: bool = True
    time_budget_s: float | None = None  # wall-clock budget of the whole sweep (Tune's time_budget_s); `rayrec compare --minutes`
    tags: list[str] = field(default_factory=list)  # extra W&B tags for the trial runs (`rayrec compare` tags its sweeps)
    extra_space: dict[str, Any] = field(default_factory=dict)  # extra Tune entries (tests only)


@dataclass
class Plan:
    """A validated sweep: the resolved options, space and base config, ready for Ray."""

    model: str
    name: str
    storage: str
    experiment: str  # storage/name
    space: SearchSpace
    base: dict[str, Any]  # nested base config (config file < space's fixed < --set < epochs and metric)
    settings: SweepSettings
    options: SweepOptions


def plan_sweep(opts: SweepOptions) -> Plan:
    """Validate options, space and base config; every problem is a UserError before Ray starts."""
    space_file, from_base = opts.space, None
    if opts.from_sweep:
        if opts.space:
            raise UserError("--from and --space both name a search space; pass one of them")
        space_file, from_base = next_space_source(opts.from_sweep, opts.storage)
    space = load_space(opts.model, space_file)
    model = space.model
    flags = {key: getattr(opts, key, None) for key in SweepSettings.fields()}
    settings = SweepSettings.resolve(space, opts.stage, flags)
    base = base_config(model, space, settings, opts, from_base)

    name = opts.name or f"{model}-{opts.stage or 'sweep'}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if "/" in name or not name.strip():
        raise UserError(f"--name '{name}' must be a plain name without '/'")
    check_resource_options(opts)
    storage = opts.storage or default_storage()
    return Plan(model=model, name=name, storage=storage, experiment=experiment_url(storage, name), space=space,
                base=base, settings=settings, options=opts)


def base_config(model: str, space: SearchSpace, settings: SweepSettings, opts: SweepOptions,
                from_base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The nested base config every trial resolves from, validated as every trial will see it.

    Layers, as for `rayrec train`: the --config file (or the --from sweep's base) < the
    space's `fixed` values < --data and --set < the sweep's epochs and metric.
    """
    file_base, flag_overrides = command_layers(opts.config, opts.data, None, opts.sets)
    # The sweep owns the epoch budget and the metric: a --set that disagrees would be overridden unseen.
    for key, value, owner in (("train.epochs", settings.max_epochs, "--max-epochs or the space's stage"),
                              ("train.metric", settings.metric, "the space's `sweep: metric:`")):
        if key in flag_overrides and str(flag_overrides[key]) != str(value):
            raise UserError(f"--set {key}={flag_overrides[key]} conflicts with the sweep's {key.split('.')[1]} "
                            f"{value}; a sweep sets it with {owner}")
    # The sweep's budget and metric are its settings (--max-epochs, the space's metric), above any --set.
    overrides = {**space.fixed, **flag_overrides, "train.epochs": settings.max_epochs, "train.metric": settings.metric}
    base = overlay(file_base if opts.config else (from_base or {}), overrides)
    probe = build_config(model, base)
    if settings.metric != probe.train.metric:
        raise UserError(f"sweep metric {settings.metric} disagrees with train.metric {probe.train.metric}")
    base["model"]["name"] = model
    return base


def check_resource_options(opts: SweepOptions) -> None:
    if opts.gpus_per_trial < 0 or opts.cpus_per_trial <= 0:
        raise UserError(f"--gpus-per-trial must be >= 0 and --cpus-per-trial > 0, got {opts.gpus_per_trial}/{opts.cpus_per_trial}")
    if opts.gpus_per_trial > 1 and opts.gpus_per_trial != int(opts.gpus_per_trial):
        raise UserError(f"--gpus-per-trial above 1 must be a whole number, got {opts.gpus_per_trial}")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {opts.max_concurrent}")


def plan_resume(opts: SweepOptions) -> Plan:
    """Rebuild the plan of an existing sweep from its sweep.yaml; refuse a changed space."""
    from rayrec.storage import exists, join, read_yaml

    if not opts.name:
        raise UserError("--resume needs --name NAME of the sweep to continue")
    storage = opts.storage or default_storage()
    experiment = experiment_url(storage, opts.name)
    if not exists(join(experiment, SPEC_FILE)):
        raise UserError(f"no sweep named '{opts.name}' to resume; {known_sweeps_hint(storage)}")
    spec = read_yaml(join(experiment, SPEC_FILE))
    space = parse_space(spec["space"], source=f"{experiment}/{SPEC_FILE}")
    if opts.space is not None or opts.model is not None:
        given = load_space(opts.model or spec["model"], opts.space)
        changes = diff_spaces(spec["space"], given.to_dict())
        if changes:
            raise UserError(
                f"cannot resume '{opts.name}' with a changed search space ({'; '.join(changes)}); "
                "resume without --space, or start a new sweep with --name"
            )
    saved = SweepOptions(**{k: v for k, v in spec["options"].items() if k in SweepOptions.__dataclass_fields__})
    # Resources and connection may differ on resume (another machine, more GPUs); the search may not.
    for key in ("address", "gpus_per_trial", "cpus_per_trial", "max_concurrent", "verbose", "wandb", "max_failures"):
        setattr(saved, key, getattr(opts, key))
    saved.resume, saved.storage, saved.name = True, storage, opts.name
    saved.extra_space = opts.extra_space
    return Plan(model=spec["model"], name=opts.name, storage=storage, experiment=experiment, space=space,
                base=spec["base"], settings=SweepSettings.from_dict(spec["settings"]), options=saved)


def spec_record(plan: Plan, data) -> dict[str, Any]:
    """sweep.yaml: what was asked, so that a resume, the analysis commands and W&B read the same."""
    opts = asdict(plan.options)
    opts.pop("extra_space", None)
    return {
        "model": plan.model,
        "name": plan.name,
        "created": utc_timestamp(),
        "space": plan.space.to_dict(),
        "space_fingerprint": plan.space.fingerprint(),
        "base": plan.base,
        "settings": plan.settings.to_dict(),
        "options": opts,
        "dataset": {"name": data.name, "fingerprint": data.fingerprint},
    }


def require_validation(data, metric: str) -> None:
    """Trials are ranked, pruned and early-stopped on validation metrics: refuse data without validation users."""
    if len(data.eval_users("valid")) == 0:
        raise UserError(
            f"dataset '{data.name}' has no validation users, so a sweep cannot rank trials on val_{metric}; "
            "give it a validation split (e.g. --set data.valid_ratio=0.1 with a ratio or temporal split), "
            "or train one config without selection with `rayrec train`"
        )
