"""`rayrec sweep`: assemble and run a Ray Tune sweep of the shared trainer, then export results.

Experiment directory (`<storage>/<name>/`), beside Ray's own files:

    sweep.yaml       what was asked: model, search space, base config, options (resume reads it)
    trials.parquet   one row per trial: id, status, resolved config, best/last validation metrics,
                     epochs run, why it stopped (pruned / early_stopped / finished / errored)
    history.parquet  every reported epoch of every trial
    best.yaml        the best trial's fully resolved config: `rayrec train --config best.yaml`
    summary.yaml     best trial, its validation metric, and its checkpoint evaluated once on test

Everything that can be checked is checked before Ray starts: the space, the option
combination, the storage (a write probe), the data, and GPU availability.
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from rayrec.config import build_config, flatten, load_yaml, parse_overrides, unflatten
from rayrec.errors import UserError, did_you_mean, first_line
from rayrec.experiment import (
    BEST_FILE,
    HISTORY_FILE,
    SPEC_FILE,
    SUMMARY_FILE,
    TRIALS_FILE,
    default_storage,
    known_sweeps_hint,
    next_space_source,
)
from rayrec.tune.space import SCHEDULERS, SEARCHES, SearchSpace, diff_spaces, load_space, parse_space

log = logging.getLogger(__name__)

DEFAULTS = {
    "metric": "ndcg@10", "mode": "max", "num_samples": 8, "max_epochs": 10, "grace_period": 2,
    "reduction_factor": 3, "search": "hyperopt", "scheduler": "asha", "perturbation_interval": 2,
    "quantile_fraction": 0.25, "checkpoint_every": 1,
}
REUSE_ACTORS = True  # module-level so bench/sweep_overhead.py can measure the alternative


@dataclass
class SweepOptions:
    """Everything `rayrec sweep` accepts. None means 'take it from the space's sweep/stage defaults'."""

    model: str | None = None
    name: str | None = None
    storage: str | None = None
    space: str | None = None  # search-space YAML; default search_spaces/<model>.yaml
    stage: str | None = None  # smoke | quick | medium
    from_sweep: str | None = None  # start from this sweep's narrowed space (next_space.yaml) and base config
    config: str | None = None  # base config YAML
    data: str | None = None
    sets: list[str] = field(default_factory=list)  # key=value overrides of the base config
    search: str | None = None
    scheduler: str | None = None
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
    extra_space: dict[str, Any] = field(default_factory=dict)  # extra Tune entries (tests only)


@dataclass
class Plan:
    """A validated sweep: the resolved options, space and base config, ready for Ray."""

    model: str
    name: str
    storage: str
    experiment: str  # storage/name
    space: SearchSpace
    base: dict[str, Any]  # nested base config (config file + overrides + fixed + train.epochs)
    settings: dict[str, Any]  # metric, mode, num_samples, max_epochs, search, scheduler, ...
    options: SweepOptions


@dataclass
class SweepResult:
    experiment: str
    trials: Any  # pandas DataFrame
    history: Any
    best: dict[str, Any]
    searched: list[str] | None = None  # the space's parameter keys (for the summary table)
    mode: str = "max"  # the sweep's mode: the summary table ranks the best trial first under it


# --- planning (no Ray) ------------------------------------------------------------------
def plan_sweep(opts: SweepOptions) -> Plan:
    """Validate options, space and base config; every problem is a UserError before Ray starts."""
    from rayrec.storage import join

    space_file, from_base = opts.space, None
    if opts.from_sweep:
        if opts.space:
            raise UserError("--from and --space both name a search space; pass one of them")
        space_file, from_base = next_space_source(opts.from_sweep, opts.storage)
    space = load_space(opts.model, space_file)
    model = space.model
    settings = {**DEFAULTS, **space.sweep_defaults(opts.stage)}
    explicit = {k: getattr(opts, k) for k in DEFAULTS if getattr(opts, k, None) is not None}
    settings.update(explicit)
    settings["pbt_synch"] = opts.pbt_synch
    if "grace_period" not in explicit and isinstance(settings["max_epochs"], int):
        settings["grace_period"] = min(settings["grace_period"], settings["max_epochs"])
    _check_settings(settings, space, search_explicit="search" in explicit)

    base = load_yaml(opts.config) if opts.config else (from_base or {})
    overrides = parse_overrides(opts.sets)
    if opts.data is not None:
        overrides["data.name"] = opts.data
    overrides["train.epochs"] = settings["max_epochs"]
    overrides["train.metric"] = settings["metric"]
    merged = _merge(base, unflatten({**space.fixed, **overrides}))
    probe = build_config(model, merged)  # validates the base config as every trial will see it
    merged.setdefault("model", {})["name"] = model
    base = {k: v for k, v in merged.items() if k in ("model", "data", "train")}
    base["model"] = {k: v for k, v in base["model"].items()}
    if settings["metric"] != probe.train.metric:
        raise UserError(f"sweep metric {settings['metric']} disagrees with train.metric {probe.train.metric}")

    name = opts.name or f"{model}-{opts.stage or 'sweep'}-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    if "/" in name or not name.strip():
        raise UserError(f"--name '{name}' must be a plain name without '/'")
    storage = opts.storage or default_storage()
    if opts.gpus_per_trial < 0 or opts.cpus_per_trial <= 0:
        raise UserError(f"--gpus-per-trial must be >= 0 and --cpus-per-trial > 0, got {opts.gpus_per_trial}/{opts.cpus_per_trial}")
    if opts.gpus_per_trial > 1 and opts.gpus_per_trial != int(opts.gpus_per_trial):
        raise UserError(f"--gpus-per-trial above 1 must be a whole number, got {opts.gpus_per_trial}")
    if opts.max_concurrent is not None and opts.max_concurrent < 1:
        raise UserError(f"--max-concurrent must be >= 1, got {opts.max_concurrent}")
    return Plan(model=model, name=name, storage=storage, experiment=join(storage, name), space=space,
                base=base, settings=settings, options=opts)


def _check_settings(s: dict[str, Any], space: SearchSpace, search_explicit: bool) -> None:
    if s["search"] not in SEARCHES:
        raise UserError(f"--search '{s['search']}' is not valid; {did_you_mean(s['search'], SEARCHES)}")
    if s["scheduler"] not in SCHEDULERS:
        raise UserError(f"--scheduler '{s['scheduler']}' is not valid; {did_you_mean(s['scheduler'], SCHEDULERS)}")
    if s["mode"] not in ("max", "min"):
        raise UserError(f"sweep mode '{s['mode']}' is not valid; valid: max, min")
    if s["scheduler"] == "pbt":
        if s["search"] == "hyperopt":
            if search_explicit:
                raise UserError(
                    "--scheduler pbt cannot be combined with --search hyperopt: PBT chooses configs itself "
                    "(Ray refuses a searcher with PBT); use --search random or grid with pbt"
                )
            s["search"] = "random"
        if not space.mutate:
            raise UserError(f"--scheduler pbt needs 'pbt: mutate: [...]' in the search space {space.source}")
    for key in ("num_samples", "max_epochs", "grace_period", "perturbation_interval", "checkpoint_every"):
        if not isinstance(s[key], int) or s[key] < 1:
            raise UserError(f"sweep {key} must be an integer >= 1, got {s[key]!r}")
    if s["grace_period"] > s["max_epochs"]:
        raise UserError(f"grace period {s['grace_period']} exceeds max epochs {s['max_epochs']}")
    if not s["reduction_factor"] > 1:
        raise UserError(f"reduction factor must be > 1, got {s['reduction_factor']}")
    if not 0 < s["quantile_fraction"] <= 0.5:
        raise UserError(f"PBT quantile fraction must be in (0, 0.5], got {s['quantile_fraction']}")
    if s["scheduler"] == "pbt":
        # PBT exploits checkpoints: perturb exactly when a checkpoint exists.
        s["checkpoint_every"] = s["perturbation_interval"]


def _merge(a: dict, b: dict) -> dict:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in a.items()}
    for k, v in b.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "columns":
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


# --- running (Ray) ----------------------------------------------------------------------
def connect_ray(address: str | None, verbose: int = 1) -> None:
    """Join a cluster (--address / RAY_ADDRESS), reuse an initialised Ray, or start a local one."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": verbose > 1}
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # 'local' never attaches to an unrelated cluster found in /tmp/ray (ray-notes §5).
            ray.init(address="local", include_dashboard=False, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"cannot connect to Ray at '{address}': {str(exc).splitlines()[0]}") from None


def check_resources(gpus_per_trial: float, cpus_per_trial: float) -> dict[str, float]:
    import ray

    resources = ray.cluster_resources()
    gpus, cpus = resources.get("GPU", 0.0), resources.get("CPU", 0.0)
    if gpus_per_trial > 0 and gpus == 0:
        raise UserError(
            f"--gpus-per-trial {gpus_per_trial} but the Ray cluster has no GPUs "
            f"(resources: {cpus:g} CPU); use --gpus-per-trial 0, or join a GPU cluster with --address"
        )
    if gpus_per_trial > gpus > 0:
        raise UserError(f"--gpus-per-trial {gpus_per_trial} exceeds the cluster's {gpus:g} GPUs")
    if cpus_per_trial > max(cpus, 0) and cpus > 0 and not _autoscaling():
        raise UserError(f"--cpus-per-trial {cpus_per_trial} exceeds the cluster's {cpus:g} CPUs")
    return resources


def _check_local_gpus(opts: SweepOptions) -> None:
    """Without a cluster to join, GPUs must be on this machine: fail before Ray starts."""
    import ray

    if opts.gpus_per_trial <= 0 or opts.address or os.environ.get("RAY_ADDRESS") or ray.is_initialized():
        return
    import torch

    if torch.cuda.device_count() == 0:
        raise UserError(
            f"--gpus-per-trial {opts.gpus_per_trial} but this machine has no GPU visible to torch; "
            "use --gpus-per-trial 0, or join a GPU cluster with --address"
        )


def _autoscaling() -> bool:
    return bool(os.environ.get("RAYREC_AUTOSCALING"))


def run_sweep(opts: SweepOptions, data=None) -> SweepResult:
    """Plan, run (or resume) and export a sweep. `data` may be passed to skip loading."""
    if opts.resume:
        plan = plan_resume(opts)
    else:
        plan = plan_sweep(opts)
    from rayrec.data import load_split
    from rayrec.models import check_model_data
    from rayrec.storage import check_writable, exists, join, write_yaml
    from rayrec.tracking import wandb_mode

    plan.options.wandb = wandb_mode(plan.options.wandb)  # resolved once, before Ray: bad values exit 2 here
    check_writable(plan.storage)  # resumes too: the sweep keeps writing there
    if not opts.resume:
        if exists(join(plan.experiment, SPEC_FILE)):
            raise UserError(f"a sweep named '{plan.name}' already exists in {plan.storage}; use --resume or another --name")
    cfg = build_config(plan.model, plan.base)
    _check_local_gpus(opts)
    if data is None:
        data = load_split(cfg.data)
    check_model_data(plan.model, data)  # e.g. a sequential model on unordered data: refuse before Ray starts
    require_validation(data, plan.settings["metric"])
    log.info(data.summary())
    connect_ray(opts.address, opts.verbose)
    check_resources(opts.gpus_per_trial, opts.cpus_per_trial)
    if not opts.resume:
        write_yaml(join(plan.experiment, SPEC_FILE), spec_record(plan, data))
    results = _fit(plan, data)
    result = export_results(plan, results, data)
    from rayrec.tracking import log_sweep_summary

    log_sweep_summary(plan, result)  # W&B: best config and metrics as the sweep's summary run; never raises
    return result


def require_validation(data, metric: str) -> None:
    """Trials are ranked, pruned and early-stopped on validation metrics: refuse data without validation users."""
    if len(data.eval_users("valid")) == 0:
        raise UserError(
            f"dataset '{data.name}' has no validation users, so a sweep cannot rank trials on val_{metric}; "
            "give it a validation split (e.g. --set data.valid_ratio=0.1 with a ratio or temporal split), "
            "or train one config without selection with `rayrec train`"
        )


def spec_record(plan: Plan, data) -> dict[str, Any]:
    opts = asdict(plan.options)
    opts.pop("extra_space", None)
    return {
        "model": plan.model,
        "name": plan.name,
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "space": plan.space.to_dict(),
        "space_fingerprint": plan.space.fingerprint(),
        "base": plan.base,
        "settings": plan.settings,
        "options": opts,
        "dataset": {"name": data.name, "fingerprint": data.fingerprint},
    }


def plan_resume(opts: SweepOptions) -> Plan:
    """Rebuild the plan of an existing sweep from its sweep.yaml; refuse a changed space."""
    from rayrec.storage import exists, join, read_yaml

    if not opts.name:
        raise UserError("--resume needs --name NAME of the sweep to continue")
    storage = opts.storage or default_storage()
    experiment = join(storage, opts.name)
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
                base=spec["base"], settings=spec["settings"], options=saved)


def _fit(plan: Plan, data):
    from ray import tune

    from rayrec.tune.storage_handoff import pyarrow_filesystem
    from rayrec.tune.trainable import train_trial

    s, opts = plan.settings, plan.options
    trainable = tune.with_resources(
        tune.with_parameters(
            train_trial, data=data, model=plan.model, base=plan.base,
            checkpoint_every=s["checkpoint_every"], cpus_per_trial=opts.cpus_per_trial,
        ),
        {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
    )
    param_space = {**plan.space.tune_domains(s["search"]), **opts.extra_space}
    fs, storage_path = pyarrow_filesystem(plan.storage)
    run_config = tune.RunConfig(
        name=plan.name,
        storage_path=storage_path,
        storage_filesystem=fs,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if s["scheduler"] == "pbt" else 2),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        callbacks=_callbacks(plan),
        # Ray's tables only at -v 2; by default TrialLines logs one line per trial.
        verbose=2 if opts.verbose >= 2 else 0,
    )
    # CSV/JSON logs feed ResultGrid's per-epoch frames; TensorBoard's logger only adds noise
    # ('Summary name ... is illegal' for every metric with '@').
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    # Snapshot the experiment state after every controller step on local storage (cheap), so
    # a driver killed right after a trial finished does not resume and rerun that trial; on
    # object stores every snapshot is an upload, so at most every 5 s there.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "0" if fs is None else "5")
    if opts.resume:
        if not tune.Tuner.can_restore(f"{storage_path}/{plan.name}", storage_filesystem=fs):
            raise UserError(f"sweep '{plan.name}' has no Ray experiment state to resume in {plan.storage}")
        tuner = tune.Tuner.restore(
            f"{storage_path}/{plan.name}", trainable=trainable, param_space=param_space,
            resume_unfinished=True, resume_errored=True, storage_filesystem=fs,
        )
        if getattr(tuner, "_local_tuner", None) is not None:
            # Ray restores the callbacks pickled with the sweep; this run's --wandb/-v apply instead.
            tuner._local_tuner.get_run_config().callbacks = run_config.callbacks
    else:
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=_tune_config(plan), run_config=run_config)
    return tuner.fit()


def _tune_config(plan: Plan):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    s, opts = plan.settings, plan.options
    metric = f"val_{s['metric']}"
    if s["scheduler"] == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=s["max_epochs"], grace_period=s["grace_period"],
                                  reduction_factor=s["reduction_factor"])
    elif s["scheduler"] == "pbt":
        scheduler = PopulationBasedTraining(
            time_attr="epoch", perturbation_interval=s["perturbation_interval"],
            hyperparam_mutations=plan.space.pbt_mutations(), quantile_fraction=s["quantile_fraction"],
            resample_probability=0.25, synch=s["pbt_synch"],
        )
    else:
        scheduler = FIFOScheduler()
    max_concurrent = opts.max_concurrent
    num_samples = s["num_samples"]
    if s["search"] == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        # TPE starts with random points; with a small budget the default 20 would be all of it.
        searcher = HyperOptSearch(n_initial_points=max(2, min(20, num_samples // 3)), random_state_seed=opts.seed)
        searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent or _slots(opts))
        max_concurrent = None
    else:
        # Tune ignores max_concurrent_trials when given a generator instance; it takes its own limit.
        searcher = BasicVariantGenerator(random_state=opts.seed, max_concurrent=max_concurrent or 0)
        max_concurrent = None
        if s["search"] == "grid":
            num_samples = 1  # a grid is covered exactly once
    # Reusing worker processes saves each trial a process start and imports (~5 s on a small
    # machine, bench/sweep_overhead.py); the trainable frees its GPU memory at the end.
    return tune.TuneConfig(metric=metric, mode=s["mode"], num_samples=num_samples, search_alg=searcher,
                           scheduler=scheduler, max_concurrent_trials=max_concurrent,
                           reuse_actors=REUSE_ACTORS)


def _slots(opts: SweepOptions) -> int:
    import ray

    resources = ray.cluster_resources()
    slots = resources.get("CPU", 1) / opts.cpus_per_trial
    if opts.gpus_per_trial > 0:
        slots = min(slots, resources.get("GPU", 0) / opts.gpus_per_trial)
    return max(1, int(slots))


def _callbacks(plan: Plan) -> list:
    from rayrec.tracking import sweep_callbacks
    from rayrec.tune.progress import TrialLines

    s = plan.settings
    total = None if s["search"] == "grid" else s["num_samples"]
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    loggers = [CSVLoggerCallback(), JsonLoggerCallback()]
    lines = [TrialLines(f"val_{s['metric']}", s["mode"], s["max_epochs"], total)] if plan.options.verbose >= 1 else []
    return loggers + lines + sweep_callbacks(plan)


# --- results ----------------------------------------------------------------------------
def export_results(plan: Plan, results, data) -> SweepResult:
    import pandas as pd

    from rayrec.storage import join, plain, to_url, write_parquet, write_yaml
    from rayrec.tune.results import classify
    from rayrec.tune.trainable import evaluate_checkpoint_on_test, resolve_trial_config

    s = plan.settings
    metric = f"val_{s['metric']}"
    better = max if s["mode"] == "max" else min
    rows, history = [], []
    best_result, best_value = None, None
    for result in results:
        frame = result.metrics_dataframe
        last = dict(result.metrics or {})
        # A PBT exploit copies the donor's last result into the trial, so take the id from the
        # trial's own per-epoch log rather than from result.metrics.
        if frame is not None and len(frame) and "trial_id" in frame:
            trial_id = str(frame["trial_id"].iloc[0])
        else:
            trial_id = last.get("trial_id") or os.path.basename(result.path or "")
        frame = _with_checkpoint_reports(frame, result.checkpoint, trial_id)
        if frame is not None and len(frame):
            frame = frame.copy()
            frame["trial_id"] = trial_id
            history.append(frame)
            last = {**last, **frame.iloc[-1].to_dict(), "trial_id": trial_id}
        values = [v for v in (frame[metric].tolist() if frame is not None and metric in frame else []) if _finite(v)]
        best = better(values) if values else float("nan")
        sampled = {k: v for k, v in (result.config or {}).items() if not k.startswith("_")}
        row = {
            "trial_id": trial_id,
            "status": classify(last, result.error is not None, s["max_epochs"]),
            "epochs": int(last.get("epoch", 0) or 0),
            f"best_{metric}": best,
            f"last_{metric}": last.get(metric, float("nan")),
            "error": first_line(result.error)[:300] if result.error is not None else "",
            # Starts from a checkpoint: retries after a failure, sweep resumes, PBT exploits.
            "restores": int((frame["restored_epoch"] > 0).sum()) if frame is not None and "restored_epoch" in frame else 0,
            **{f"config/{k}": v for k, v in sampled.items()},
        }
        for key in ("val_hr@10", "val_ndcg@10", "val_coverage@10", "train_loss"):
            if key in last and key != metric:
                row[f"last_{key}"] = last[key]
        rows.append(row)
        if values and (best_value is None or better(best, best_value) == best and best != best_value):
            best_result, best_value = result, best
    trials = pd.DataFrame(rows)
    history_frame = pd.concat(history, ignore_index=True) if history else pd.DataFrame()
    history_frame = _clean_history(history_frame)
    write_parquet(join(plan.experiment, TRIALS_FILE), trials)
    write_parquet(join(plan.experiment, HISTORY_FILE), history_frame)

    best: dict[str, Any] = {}
    if best_result is not None:
        last = best_result.metrics or {}
        threads = max(1, int(math.ceil(plan.options.cpus_per_trial)))
        resolved = resolve_trial_config(plan.model, plan.base, best_result.config, threads, last.get("device", "cpu"))
        resolved_dict = resolved.to_dict()
        if plan.settings["scheduler"] == "pbt":
            resolved_dict["train"]["device"] = last.get("device", "cpu")
        write_yaml(join(plan.experiment, BEST_FILE), resolved_dict)
        best = {
            "trial_id": last.get("trial_id"),
            "metric": metric,
            "value": float(best_value),
            "config": flatten(resolved_dict),
        }
        if best_result.checkpoint is not None:
            # Its URL, for `rayrec train --init-from <sweep>` (path as Ray reports it, scheme restored).
            best["checkpoint"] = to_url(plan.storage, best_result.checkpoint.path)
        if plan.options.evaluate_test and best_result.checkpoint is not None:
            with best_result.checkpoint.as_directory() as d:
                best.update(evaluate_checkpoint_on_test(d, resolved_dict, data))  # "test", "test_<group>"
    summary = {
        "name": plan.name,
        "model": plan.model,
        "dataset": data.name,
        "synthetic": bool(data.info.get("synthetic", False)),
        "fingerprint": data.fingerprint,
        "search": s["search"],
        "scheduler": s["scheduler"],
        "trials": len(trials),
        "status_counts": trials["status"].value_counts().to_dict() if len(trials) else {},
        "best": plain(best),
        "exported": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
    write_yaml(join(plan.experiment, SUMMARY_FILE), summary)
    return SweepResult(experiment=plan.experiment, trials=trials, history=history_frame, best=best,
                       searched=list(plan.space.params), mode=s["mode"])


def _with_checkpoint_reports(frame, checkpoint, trial_id: str):
    """The trial's per-epoch frame plus the epochs only its checkpoint still knows.

    Every checkpoint carries the reports of its lineage (trainable.REPORTS_FILE). Ray's
    result files can miss epochs (a restore that copied back a stale result.json after a
    storage outage); those rows come back from the latest checkpoint, marked
    from_checkpoint=1. Only epochs this trial trained itself count, not a PBT donor's.
    """
    import pandas as pd

    from rayrec.tune.trainable import checkpoint_reports

    if checkpoint is None:
        return frame
    known = set(frame["epoch"].dropna().astype(int)) if frame is not None and "epoch" in frame else set()
    missing = [r for r in checkpoint_reports(checkpoint.filesystem, checkpoint.path)
               if r.get("trained_by") == trial_id and int(r["epoch"]) not in known]
    if not missing:
        return frame
    recovered = pd.DataFrame([{**r, "trial_id": trial_id, "from_checkpoint": 1} for r in missing])
    merged = pd.concat([f for f in (frame, recovered) if f is not None and len(f)], ignore_index=True)
    return merged.sort_values("epoch", kind="stable").reset_index(drop=True)


def _clean_history(frame):
    """Per-epoch rows as the trials finally ran them.

    A trial that restarts from an earlier checkpoint (after a killed driver, or a PBT
    exploit of a donor behind it) reports some epochs again; the later report replaces the
    earlier one, so each (trial, epoch) appears once and curves follow the final lineage.
    """
    if not len(frame):
        return frame
    frame = frame.drop_duplicates(subset=["trial_id", "epoch"], keep="last").sort_values(["trial_id", "epoch"])
    frame = frame.reset_index(drop=True)
    keep = [c for c in frame.columns if not c.startswith("config/") and c not in ("date", "done", "should_checkpoint")]
    frame = frame[keep]
    # Parquet needs one type per column; mixed object columns become strings.
    for c in frame.columns:
        if frame[c].dtype == object:
            frame[c] = frame[c].astype(str)
    return frame


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def summary_table(result: SweepResult, metric: str, top: int = 10) -> str:
    """The `top` trials, best first under the sweep's mode, then the status counts."""
    from rayrec.tune.results import format_value

    trials = result.trials
    if not len(trials):
        return "no trials"
    col = f"best_val_{metric}"
    ordered = trials.sort_values(col, ascending=result.mode == "min", na_position="last").head(top)
    searched = set(result.searched) if result.searched is not None else None
    cfg_cols = [c for c in ordered.columns if c.startswith("config/") and (searched is None or c[7:] in searched)]
    header = f"{'trial':<14}{'status':<14}{'epochs':>6}  {metric:>10}  " + "  ".join(c.split('/', 1)[1] for c in cfg_cols)
    lines = [header]
    for _, r in ordered.iterrows():
        params = "  ".join(format_value(r[c], digits=3, quote=False) for c in cfg_cols)
        lines.append(f"{str(r['trial_id']):<14}{r['status']:<14}{int(r['epochs']):>6}  {r[col]:>10.4f}  {params}")
    counts = trials["status"].value_counts().to_dict()
    lines.append("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
