"""`rayrec compare MODEL [MODEL ...]`: which model is best on this data, and is the lead real?

The chain, each step the one the single-model workflow already has:

1. plan (no Ray): models known, one task and one split for all of them, budgets valid,
   `--from` sweeps on one dataset; a bad input is one line and nothing is written;
2. every model's search with the same budget (`--trials N --max-epochs E`, or `--minutes M`
   of wall-clock per model), as a sweep under `<compare>/sweeps/<model>` that never looks
   at test (`--no-test`); or its finished sweep given with `--from`. A model with nothing
   to tune (popularity, always included) skips the search;
3. each model's best config retrained from scratch with `--seeds N` training seeds, as Ray
   tasks; every retrained run evaluates the best weights on validation, then on test exactly
   once, and its record (`runs/<model>-seed<s>.yaml`) is the lock: a resumed comparison never
   retrains or re-tests a run that has one;
4. the leader is the best validation mean over seeds (test figures never choose it); paired
   tests, Holm, bootstrap intervals and seed spread (rayrec.compare_stats) on the per-user
   test metrics; compare.parquet, compare_per_user.parquet, compare.yaml, the report page
   and a W&B leaderboard run.

`<storage>/<name>/`:

    compare.yaml              what was asked (models, budgets, data), then the leaderboard,
                              the p-value matrix and `status: complete`
    sweeps/<model>/           each model's sweep (a plain rayrec sweep: narrow/report work on it)
    runs/<model>-seed<s>.yaml one retrained run: validation and test metrics, test_evaluations,
                              seconds, peak memory; runs/<model>-seed<s>.parquet its per-user rows
    compare.parquet           one row per (model, seed) (`row: run`) and one per model (`row: model`)
    compare_per_user.parquet  every run's per-user validation and test rows
    tuning.parquet            each model's tuning curve: best validation metric after each trial
    report/index.html         dot-and-interval plot, p-value matrix, tuning curves, tables
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from rayrec.config import DEFAULT_METRIC
from rayrec.errors import UserError, first_line
from rayrec.experiment import BEST_FILE, HISTORY_FILE, SPEC_FILE, TRIALS_FILE, default_storage, utc_timestamp

log = logging.getLogger(__name__)

COMPARE_FILE = "compare.yaml"
COMPARE_TABLE = "compare.parquet"
COMPARE_PER_USER = "compare_per_user.parquet"
TUNING_FILE = "tuning.parquet"
SWEEPS_DIR = "sweeps"
RUNS_DIR = "runs"
BASELINE = "pop"  # always in the table: the figure every model must beat
DEFAULT_TRIALS, DEFAULT_EPOCHS = 12, 8  # the quick stage's budget
UNLIMITED_TRIALS = 10_000  # with --minutes only: the clock ends the search


@dataclass
class CompareOptions:
    models: list[str]
    data: str | None = None
    sets: list[str] = field(default_factory=list)  # key=value for every model; MODEL:key=value for one
    name: str | None = None
    storage: str | None = None
    stage: str = "quick"  # the space's stage for everything but the budget (grace period, search, scheduler)
    trials: int | None = None  # per model; default 12 (unlimited with --minutes)
    max_epochs: int | None = None  # per trial; default 8
    minutes: float | None = None  # wall-clock search budget per model
    from_sweeps: list[str] = field(default_factory=list)  # one finished sweep per tuned model
    seeds: int = 5
    metric: str = DEFAULT_METRIC
    alpha: float = 0.05
    confidence: float = 0.95
    bootstrap_resamples: int = 2000
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int | None = None
    address: str | None = None
    wandb: str | None = None
    seed: int = 0  # searcher seed
    resume: bool = False
    verbose: int = 1


@dataclass
class ComparePlan:
    options: CompareOptions
    models: list[str]  # in the order given, popularity added last when missing
    name: str
    experiment: str
    tuned: dict[str, str]  # model -> its sweep directory (to run, or given with --from)
    untuned: list[str]  # models with nothing to tune: their config is the base config
    model_sets: dict[str, dict[str, Any]]  # model -> dotted overrides (--set, MODEL:--set)
    data_config: dict[str, Any]  # the one data config every model uses
    budget: dict[str, Any]


@dataclass
class CompareResult:
    experiment: str
    table: Any  # the leaderboard: one row per model
    runs: Any  # one row per (model, seed)
    pvalues: Any  # model x model Wilcoxon p-values, Holm-adjusted
    metric: str
    interrupted: str = ""  # the model whose sweep was interrupted (exit 130)
    already_complete: bool = False


# --- planning (no Ray) -------------------------------------------------------------------
def default_name() -> str:
    return f"compare-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def model_overrides(models: list[str], sets: list[str]) -> dict[str, dict[str, Any]]:
    """--set items per model: `key=value` for all, `MODEL:key=value` for that model only."""
    from rayrec.config import parse_overrides

    common, own = [], {m: [] for m in models}
    for item in sets:
        head, sep, rest = item.partition(":")
        if sep and "=" not in head and "." not in head:
            if head not in own:
                raise UserError(f"--set {item} names model '{head}', which is not compared; valid: {', '.join(models)}")
            own[head].append(rest)
        else:
            common.append(item)
    return {m: {**parse_overrides(common), **parse_overrides(own[m])} for m in models}


def model_task(model: str) -> str:
    """What a model predicts: 'ranking' (every model so far) or what its spec declares (a rating
    model says `task = "rating"`); models of different tasks cannot share a split or metric."""
    from rayrec.models import get_model_spec

    return str(getattr(get_model_spec(model).model_cls, "task", "ranking"))


def shared_split_problem(tasks: dict[str, str], data_configs: dict[str, dict[str, Any]]) -> str | None:
    """Why these models cannot be compared on one split, or None. Different tasks never can;
    different data configs (e.g. the sequential models' leave-one-out beside the graph models'
    ratio split) cannot until the user puts them on one protocol."""
    models = list(tasks)
    first = models[0]
    for m in models[1:]:
        if tasks[m] != tasks[first]:
            return (f"models that cannot share a split: '{first}' is a {tasks[first]} model, '{m}' a {tasks[m]} model; "
                    "compare models of one task")
    for m in models[1:]:
        for key in sorted(data_configs[first]):
            a, b = data_configs[first][key], data_configs[m].get(key)
            if a != b:
                return (f"models that cannot share a split: '{first}' uses data.{key}={a}, '{m}' data.{key}={b}; "
                        f"put them on one protocol, e.g. --set data.{key}={a}")
    return None


def plan_compare(opts: CompareOptions) -> ComparePlan:
    """Every check that needs no Ray and no data: a UserError before anything is written."""
    from rayrec.config import build_config
    from rayrec.models import get_model_spec
    from rayrec.storage import exists, join, read_yaml
    from rayrec.tune.space import load_space

    if opts.resume:
        return plan_resume_compare(opts)
    if not opts.models:
        raise UserError("no model given; pass one or more (e.g. `rayrec compare sasrec gru4rec`)")
    models = list(dict.fromkeys(opts.models))
    for m in models:
        get_model_spec(m)  # unknown model: one line listing the valid ones
    rating = [m for m in models if model_task(m) != "ranking"]
    if rating:  # before any config is built, whose metric check would name only one side
        ranking = [m for m in models if m not in rating]
        if ranking:
            raise UserError(shared_split_problem({ranking[0]: "ranking", rating[0]: model_task(rating[0])}, {}))
        raise UserError(f"rayrec compare ranks ranking models; '{rating[0]}' predicts ratings: compare rating models "
                        "with `rayrec sweep` and `rayrec confirm` on rmse or mae")
    if BASELINE not in models:
        models.append(BASELINE)
    if opts.seeds < 1:
        raise UserError(f"--seeds must be >= 1, got {opts.seeds}")
    if not 0 < opts.alpha < 1 or not 0 < opts.confidence < 1:
        raise UserError(f"--alpha and --confidence must be in (0, 1), got {opts.alpha}/{opts.confidence}")
    for flag, value in (("--trials", opts.trials), ("--max-epochs", opts.max_epochs)):
        if value is not None and value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    if opts.minutes is not None and not opts.minutes > 0:
        raise UserError(f"--minutes must be > 0, got {opts.minutes}")
    name = opts.name or default_name()
    if "/" in name or not name.strip():
        raise UserError(f"--name '{name}' must be a plain name without '/'")
    storage = opts.storage or default_storage()
    experiment = join(storage, name)
    if exists(join(experiment, COMPARE_FILE)):
        raise UserError(f"a comparison named '{name}' already exists in {storage}; use --resume or another --name")
    sets = model_overrides(models, opts.sets)
    if opts.data is not None:
        for m in models:
            sets[m].setdefault("data.name", opts.data)
    untuned = [m for m in models if not load_space(m).params]
    tuned = {m: join(experiment, SWEEPS_DIR, m) for m in models if m not in untuned}
    from_data = None
    if opts.from_sweeps:
        given, from_data = from_sweeps(opts.from_sweeps, opts.storage)
        missing = [m for m in tuned if m not in given]
        extra = [m for m in given if m not in tuned]
        if extra:
            raise UserError(f"--from sweep of model '{extra[0]}', which is not compared (models: {', '.join(models)})")
        if missing:
            raise UserError(f"--from gives no sweep for '{missing[0]}'; give one finished sweep per tuned model "
                            f"({', '.join(tuned)})")
        tuned = {m: given[m][0] for m in tuned}
    configs = {}
    for m in models:
        base = {"data": dict(from_data)} if from_data is not None else {}
        configs[m] = build_config(m, base, {**sets[m], "train.metric": opts.metric})
    problem = shared_split_problem({m: model_task(m) for m in models}, {m: asdict(c.data) for m, c in configs.items()})
    if problem:
        raise UserError(problem)
    if from_data is not None:  # each sweep's own metric must be the comparison's
        for sweep in tuned.values():
            metric = (read_yaml(join(sweep, SPEC_FILE)).get("settings") or {}).get("metric", DEFAULT_METRIC)
            if metric != opts.metric:
                raise UserError(f"--from sweep '{sweep}' optimised {metric}, the comparison ranks on {opts.metric}; "
                                f"pass --metric {metric} or sweeps on one metric")
    budget = {"minutes": opts.minutes, "max_epochs": opts.max_epochs or DEFAULT_EPOCHS,
              "trials": opts.trials or (UNLIMITED_TRIALS if opts.minutes else DEFAULT_TRIALS)}
    if opts.from_sweeps:
        budget = {"from": {m: s for m, s in tuned.items()}}
    return ComparePlan(options=opts, models=models, name=name, experiment=experiment, tuned=tuned, untuned=untuned,
                       model_sets=sets, data_config=asdict(configs[models[0]].data), budget=budget)


def from_sweeps(sweeps: list[str], storage: str | None) -> tuple[dict[str, tuple[str, dict]], dict[str, Any]]:
    """model -> (experiment, sweep.yaml) of the finished --from sweeps, all on one dataset; and
    that dataset's data config (from the first sweep's best.yaml)."""
    from rayrec.experiment import export_status, resolve_experiment
    from rayrec.storage import exists, join, read_yaml

    given: dict[str, tuple[str, dict]] = {}
    for sweep in sweeps:
        experiment = resolve_experiment(sweep, storage)
        spec = read_yaml(join(experiment, SPEC_FILE)) or {}
        model = spec["model"]
        if model in given:
            raise UserError(f"--from gives two sweeps of '{model}': {given[model][0]} and {experiment}; give one per model")
        given[model] = (experiment, spec)
    datasets = {m: (s.get("dataset") or {}) for m, (_, s) in given.items()}
    first = next(iter(datasets))
    for m, d in datasets.items():
        if d.get("fingerprint") != datasets[first].get("fingerprint"):
            raise UserError(
                f"--from sweeps on different datasets: '{first}' ran on {datasets[first].get('name')} "
                f"(fingerprint {str(datasets[first].get('fingerprint'))[:12]}), '{m}' on {d.get('name')} "
                f"(fingerprint {str(d.get('fingerprint'))[:12]}); compare sweeps of one dataset and split")
    for m, (experiment, spec) in given.items():
        status = export_status(experiment)
        if status is None or status.partial or not exists(join(experiment, BEST_FILE)):
            raise UserError(f"--from sweep '{experiment}' is not finished (no complete export with a best.yaml); "
                            f"finish it with `rayrec sweep --resume --name {spec.get('name', m)}`")
    data = (read_yaml(join(given[first][0], BEST_FILE)) or {}).get("data") or {}
    return given, data


def plan_resume_compare(opts: CompareOptions) -> ComparePlan:
    from rayrec.storage import exists, join, read_yaml

    if not opts.name:
        raise UserError("--resume needs --name NAME of the comparison to continue")
    storage = opts.storage or default_storage()
    experiment = join(storage, opts.name)
    if not exists(join(experiment, COMPARE_FILE)):
        raise UserError(f"no comparison named '{opts.name}' to resume in {storage}")
    record = read_yaml(join(experiment, COMPARE_FILE))
    saved = CompareOptions(**{k: v for k, v in record["options"].items() if k in CompareOptions.__dataclass_fields__})
    for key in ("address", "gpus_per_trial", "cpus_per_trial", "max_concurrent", "verbose", "wandb"):
        setattr(saved, key, getattr(opts, key))
    saved.resume, saved.storage, saved.name = True, storage, opts.name
    return ComparePlan(options=saved, models=record["models"], name=opts.name, experiment=experiment,
                       tuned=record["tuned"], untuned=record["untuned"], model_sets=record["model_sets"],
                       data_config=record["data_config"], budget=record["budget"])


# --- running -----------------------------------------------------------------------------
def run_compare(opts: CompareOptions, data=None) -> CompareResult:
    """Plan, search (or read --from sweeps), retrain with seeds, test each run once, rank, write."""
    from rayrec.config import build_config
    from rayrec.data import load_split
    from rayrec.models import check_model_data
    from rayrec.storage import check_writable, join, plain, read_yaml, write_yaml
    from rayrec.tracking import wandb_mode
    from rayrec.tune.plan import require_validation

    plan = plan_compare(opts)
    opts = plan.options
    record_url = join(plan.experiment, COMPARE_FILE)
    if opts.resume and (read_yaml(record_url) or {}).get("status") == "complete":
        return completed_compare(plan)
    opts.wandb = wandb_mode(opts.wandb)
    check_writable(plan.experiment)
    if data is None:
        data = load_split(build_config(plan.models[0], {"data": plan.data_config}).data)
    for m in plan.models:
        check_model_data(m, data)
    require_validation(data, opts.metric)
    for sweep in plan.tuned.values() if opts.from_sweeps else ():
        tuned_on = (read_yaml(join(sweep, SPEC_FILE)).get("dataset") or {}).get("fingerprint")
        if tuned_on != data.fingerprint:
            raise UserError(f"--from sweep '{sweep}' was tuned on dataset fingerprint {str(tuned_on)[:12]}, but its "
                            f"best config's data loads as {data.fingerprint[:12]}; rerun the sweep on this data")
    if not opts.resume:
        write_yaml(record_url, plain({
            "status": "running", "name": plan.name, "created": utc_timestamp(), "models": plan.models,
            "tuned": plan.tuned, "untuned": plan.untuned, "model_sets": plan.model_sets,
            "data_config": plan.data_config, "dataset": {"name": data.name, "fingerprint": data.fingerprint},
            "budget": plan.budget, "options": asdict(opts)}))
    from rayrec.tune.tuner import check_resources, connect_ray

    connect_ray(opts.address, opts.verbose)
    check_resources(opts.gpus_per_trial, opts.cpus_per_trial)
    configs: dict[str, dict[str, Any]] = {}
    for m in plan.models:
        if m in plan.untuned:
            configs[m] = build_config(m, {"data": plan.data_config},
                                      {**plan.model_sets[m], "train.metric": opts.metric}).to_dict()
            continue
        if not opts.from_sweeps:
            interrupted = search_model(plan, m, data)
            if interrupted:
                return CompareResult(experiment=plan.experiment, table=None, runs=None, pvalues=None,
                                     metric=opts.metric, interrupted=m)
        configs[m] = read_yaml(join(plan.tuned[m], BEST_FILE))
        configs[m].pop("sweep", None)  # provenance, not configuration
    retrain_all(plan, configs, data)
    return finish(plan, data)


def search_model(plan: ComparePlan, model: str, data) -> bool:
    """Run (or resume) one model's sweep with the comparison's budget; True when it was interrupted."""
    from rayrec.storage import exists, join
    from rayrec.tune.plan import SweepOptions
    from rayrec.tune.sweep import run_sweep

    opts, budget = plan.options, plan.budget
    storage = join(plan.experiment, SWEEPS_DIR)
    sets = [f"{k}={_yaml_value(v)}" for k, v in plan.model_sets[model].items()]
    resume = exists(join(storage, model, SPEC_FILE))
    sweep = SweepOptions(
        model=model, name=model, storage=storage, stage=opts.stage, sets=sets, metric=opts.metric,
        num_samples=budget["trials"], max_epochs=budget["max_epochs"],
        time_budget_s=budget["minutes"] * 60 if budget.get("minutes") else None,
        gpus_per_trial=opts.gpus_per_trial, cpus_per_trial=opts.cpus_per_trial, max_concurrent=opts.max_concurrent,
        address=opts.address, wandb=opts.wandb, seed=opts.seed, resume=resume, verbose=opts.verbose,
        evaluate_test=False,  # the comparison looks at test once per retrained run, nowhere else
        tags=["compare", plan.name],
    )
    log.info("compare: searching %s (%s)", model, describe_budget(budget))
    result = run_sweep(sweep, data=data)
    return bool(result.status.partial)


def _yaml_value(value: Any) -> str:
    import yaml

    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def describe_budget(budget: dict[str, Any]) -> str:
    if "from" in budget:
        return "finished sweeps given with --from"
    trials = "unlimited trials" if budget["trials"] >= UNLIMITED_TRIALS else f"{budget['trials']} trials"
    clock = f", {budget['minutes']:g} min" if budget.get("minutes") else ""
    return f"{trials} x <= {budget['max_epochs']} epochs{clock} per model"


def run_url(plan: ComparePlan, model: str, seed: int, ext: str) -> str:
    from rayrec.storage import join

    return join(plan.experiment, RUNS_DIR, f"{model}-seed{seed}.{ext}")


def retrain_all(plan: ComparePlan, configs: dict[str, dict[str, Any]], data) -> None:
    """Every model's best config with every seed as parallel Ray tasks; each finished run's
    record and per-user rows are written at once, so a resume skips it (and never tests it again)."""
    import pandas as pd
    import ray

    from rayrec.storage import exists, plain, write_parquet, write_yaml
    from rayrec.tune.confirm import seed_list
    from rayrec.tune.trainable import trial_threads

    opts = plan.options
    jobs = [(m, s) for m in plan.models for s in seed_list(int(configs[m]["train"]["seed"]), opts.seeds)
            if not exists(run_url(plan, m, s, "yaml"))]
    if not jobs:
        return
    data_ref = ray.put(data)
    task = ray.remote(retrain_and_test).options(num_cpus=opts.cpus_per_trial, num_gpus=opts.gpus_per_trial,
                                                 max_retries=0)
    threads = trial_threads(opts.cpus_per_trial)
    pending = {task.remote(configs[m], s, threads, data_ref): (m, s) for m, s in jobs}
    log.info("compare: retraining %d runs (%d models x %d seeds) on Ray", len(jobs), len(plan.models), opts.seeds)
    failed = []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        model, seed = pending.pop(done[0])
        try:
            out = ray.get(done[0])
        except ray.exceptions.RayError as exc:
            failed.append(f"{model} seed {seed}: {first_line(exc)[:200]}")
            log.warning("compare: %s seed %d failed: %s", model, seed, failed[-1])
            continue
        users = pd.DataFrame(out.pop("per_user"))
        users.insert(0, "model", model)
        users.insert(1, "seed", seed)
        write_parquet(run_url(plan, model, seed, "parquet"), users)
        write_yaml(run_url(plan, model, seed, "yaml"), plain({"model": model, "seed": seed, **out,
                                                               "tested_at": utc_timestamp()}))
        log.info("compare: %s seed %d: val_%s %.4f", model, seed, opts.metric, out.get(f"val_{opts.metric}", math.nan))
    if failed:
        raise UserError(f"{len(failed)} retrained run(s) failed, first: {failed[0]}; fix it and continue with "
                        f"`rayrec compare --resume --name {plan.name}` (finished runs are kept)")


def retrain_and_test(config: dict[str, Any], seed: int, threads: int, data) -> dict[str, Any]:
    """One retrained run (a Ray task): train from scratch with `train.seed = seed`, evaluate the
    best weights on validation, then on test exactly once. Nothing here chooses between models:
    the leader is picked later from the validation figures alone."""
    import torch

    from rayrec.config import build_config
    from rayrec.train.run import per_user_frame
    from rayrec.train.trainer import Trainer, peak_memory_mb
    from rayrec.tune.trainable import trial_device

    device, _ = trial_device()
    cfg = build_config(base=config, overrides={"train.seed": seed, "train.device": device, "train.num_threads": threads})
    torch.set_num_threads(threads)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    trainer = Trainer(cfg, data, device=device)
    fit = trainer.fit()
    valid = trainer.evaluation("valid", per_user=True)
    tests = trainer.test_rankings(per_user=True)  # the run's one look at test
    out: dict[str, Any] = {f"val_{k}": float(v) for k, v in valid.metrics.items()}
    for section, ranking in tests.items():
        out.update({f"{section}_{k}": float(v) for k, v in ranking.metrics.items()})
    out.update({"best_epoch": int(fit.best_epoch), "epochs": int(fit.epochs_run), "stop_reason": fit.stop_reason,
                "device": device, "seconds": time.perf_counter() - start,
                # full test evaluations this run made: one per test section (all users, each declared group)
                "test_evaluations": int(trainer.evaluations.get("test", 0)), "test_sections": len(tests),
                **peak_memory_mb(device)})
    out["per_user"] = per_user_frame(valid, tests["test"], data).to_dict("list")
    return out


# --- results -----------------------------------------------------------------------------
def sweep_cost(experiment: str, metric: str, mode: str = "max") -> tuple[dict[str, Any], Any]:
    """(tuning cost, tuning curve) of a finished sweep from its own files: trials, epochs,
    trial-seconds (every reported epoch's seconds), wall-clock (first trial start to last
    report), peak memory per trial (the largest any trial reported); and the best validation
    metric after each finished trial, against trials and seconds since the sweep started."""
    import pandas as pd

    from rayrec.storage import exists, join, read_parquet

    trials = read_parquet(join(experiment, TRIALS_FILE))
    history = read_parquet(join(experiment, HISTORY_FILE)) if exists(join(experiment, HISTORY_FILE)) else pd.DataFrame()
    value = f"val_{metric}"

    def col(name):
        return pd.to_numeric(history[name], errors="coerce") if name in history else pd.Series(dtype=float)

    start, reported = col("trial_started"), col("reported_at")
    cost = {"tune_trials": int(len(trials)), "tune_epochs": int(pd.to_numeric(trials["epochs"]).sum()) if len(trials) else 0,
            "tune_trial_seconds": float(col("epoch_seconds").sum()),
            "tune_wall_seconds": float(reported.max() - start.min()) if len(start.dropna()) and len(reported.dropna()) else math.nan,
            "tune_peak_rss_mb": float(col("peak_rss_mb").max()) if "peak_rss_mb" in history else math.nan,
            "tune_peak_gpu_mb": float(col("peak_gpu_mb").max()) if "peak_gpu_mb" in history else math.nan}
    curve = pd.DataFrame(columns=["trial_index", "seconds", "best"])
    if len(history) and value in history and "reported_at" in history:
        h = history.assign(_v=col(value), _t=reported)
        per_trial = h.groupby("trial_id").agg(best=("_v", "max" if mode == "max" else "min"), end=("_t", "max"))
        per_trial = per_trial.sort_values("end")
        best = per_trial["best"].cummax() if mode == "max" else per_trial["best"].cummin()
        curve = pd.DataFrame({"trial_index": range(1, len(per_trial) + 1),
                              "seconds": (per_trial["end"] - start.min()).to_numpy(), "best": best.to_numpy()})
    return cost, curve


def finish(plan: ComparePlan, data) -> CompareResult:
    """Read every run back, rank on validation, test the differences, write the files and the report."""
    import pandas as pd

    from rayrec.compare_stats import leaderboard, pvalue_matrix
    from rayrec.storage import join, plain, read_parquet, read_yaml, write_parquet, write_yaml
    from rayrec.tracking import log_compare_summary

    opts = plan.options
    records, users = [], []
    for m in plan.models:
        seeds = [int(u.rsplit("seed", 1)[1].split(".")[0]) for u in _run_files(plan, m)]
        for s in sorted(seeds)[:opts.seeds]:
            records.append(read_yaml(run_url(plan, m, s, "yaml")))
            users.append(read_parquet(run_url(plan, m, s, "parquet")))
    runs = pd.DataFrame(records)
    per_user = pd.concat(users, ignore_index=True)
    table = leaderboard(runs, per_user, opts.metric, alpha=opts.alpha, confidence=opts.confidence,
                        n_resamples=opts.bootstrap_resamples, seed=opts.seed)
    pvalues = pvalue_matrix(per_user, opts.metric)
    costs, curves = {}, []
    for m in plan.models:
        if m in plan.tuned:
            cost, curve = sweep_cost(plan.tuned[m], opts.metric)
            curves.append(curve.assign(model=m))
        else:
            cost = {"tune_trials": 0, "tune_epochs": 0, "tune_trial_seconds": 0.0, "tune_wall_seconds": 0.0,
                    "tune_peak_rss_mb": math.nan, "tune_peak_gpu_mb": math.nan}
        group = runs[runs["model"] == m]
        cost["retrain_seconds"] = float(group["seconds"].sum())
        cost["retrain_peak_rss_mb"] = float(group["peak_rss_mb"].max())
        cost["retrain_peak_gpu_mb"] = float(group["peak_gpu_mb"].max())
        costs[m] = cost
    table = table.join(pd.DataFrame.from_dict(costs, orient="index"), on="model")
    frame = pd.concat([runs.assign(row="run"), table.assign(row="model")], ignore_index=True, sort=False)
    frame = frame[["row", "model", "seed", *[c for c in frame.columns if c not in ("row", "model", "seed")]]]
    write_parquet(join(plan.experiment, COMPARE_TABLE), frame)
    write_parquet(join(plan.experiment, COMPARE_PER_USER), per_user)
    tuning = pd.concat(curves, ignore_index=True) if curves else pd.DataFrame(columns=["model", "trial_index", "seconds", "best"])
    write_parquet(join(plan.experiment, TUNING_FILE), tuning)
    from rayrec.report_compare import build_compare_report

    report = build_compare_report(plan.experiment, table, runs, pvalues, tuning, opts.metric, opts.alpha, plan.name)
    record = read_yaml(join(plan.experiment, COMPARE_FILE))
    leader = str(table["model"].iloc[0])
    record.update(plain({
        "status": "complete", "finished": utc_timestamp(), "metric": opts.metric, "leader": leader,
        "alpha": opts.alpha, "confidence": opts.confidence, "report": report,
        "leaderboard": table.to_dict(orient="records"),
        "pvalues": {a: {b: pvalues.loc[a, b] for b in pvalues.columns} for a in pvalues.index},
        "test_evaluations": {f"{r['model']}-seed{int(r['seed'])}": int(r["test_evaluations"]) for _, r in runs.iterrows()},
    }))
    summary = {"leader": leader, f"leader/test_{opts.metric}": float(table["test_mean"].iloc[0]),
               f"leader/val_{opts.metric}": float(table["val_mean"].iloc[0]),
               "significant": ",".join(table.loc[table["significant"], "model"])}
    record["wandb_run"] = log_compare_summary(plan.name, _wandb_dir(plan), opts.wandb, summary, table)
    write_yaml(join(plan.experiment, COMPARE_FILE), record)  # last: `status: complete` is the record
    return CompareResult(experiment=plan.experiment, table=table, runs=runs, pvalues=pvalues, metric=opts.metric)


def _wandb_dir(plan: ComparePlan) -> str:
    import os
    import tempfile

    from rayrec.storage import is_local, local_path

    if os.environ.get("WANDB_DIR"):
        return os.path.abspath(os.environ["WANDB_DIR"])
    if is_local(plan.experiment):
        return os.path.abspath(local_path(plan.experiment))
    return os.path.join(tempfile.gettempdir(), "rayrec-wandb", plan.name)


def _run_files(plan: ComparePlan, model: str) -> list[str]:
    from rayrec.storage import join, split_url

    fs, path = split_url(join(plan.experiment, RUNS_DIR))
    try:
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
    except FileNotFoundError:
        return []
    return [n for n in names if n.startswith(f"{model}-seed") and n.endswith(".yaml")]


def completed_compare(plan: ComparePlan) -> CompareResult:
    """A complete comparison as it was written: nothing runs, nothing is rewritten."""
    import pandas as pd

    from rayrec.storage import join, read_parquet, read_yaml

    frame = read_parquet(join(plan.experiment, COMPARE_TABLE))
    record = read_yaml(join(plan.experiment, COMPARE_FILE))
    pvalues = pd.DataFrame(record.get("pvalues") or {})
    table = frame[frame["row"] == "model"].reset_index(drop=True)
    runs = frame[frame["row"] == "run"].reset_index(drop=True)
    return CompareResult(experiment=plan.experiment, table=table, runs=runs, pvalues=pvalues,
                         metric=record.get("metric", DEFAULT_METRIC), already_complete=True)


def leaderboard_text(result: CompareResult, alpha: float = 0.05) -> str:
    """The table printed at the end of `rayrec compare`."""
    t = result.table
    m = result.metric
    head = (f"{'model':<10}{'val ' + m:>14}{'test ' + m:>15}{'95% CI (users)':>18}{'p (Holm)':>10}  "
            f"{'trials':>6}{'epochs':>7}{'wall s':>8}{'peak MB':>8}  verdict  (tuning cost: trials, epochs, wall-clock, peak RSS)")
    lines = [head]
    for _, r in t.iterrows():
        pm = "+-"
        val = f"{r['val_mean']:.4f}{pm}{_f(r['val_std'])}"
        test = f"{r['test_mean']:.4f}{pm}{_f(r['test_std'])}"
        ci = f"[{r['ci_low']:.4f}, {r['ci_high']:.4f}]"
        if r["leader"]:
            p, verdict = "", "leader (chosen on validation)"
        else:
            p = f"{r['wilcoxon_p_holm']:.3g}"
            verdict = "significantly behind" if r["significant"] else f"not significant at {alpha:g}"
            if r["spread_exceeds_gap"]:
                verdict += "; seed spread exceeds the gap"
        lines.append(f"{r['model']:<10}{val:>14}{test:>15}{ci:>18}{p:>10}  {int(r['tune_trials']):>6}"
                     f"{int(r['tune_epochs']):>7}{_f(r['tune_wall_seconds'], 0):>8}{_f(r['tune_peak_rss_mb'], 0):>8}  {verdict}")
    return "\n".join(lines)


def _f(v, digits: int = 4) -> str:
    try:
        return "-" if v is None or math.isnan(float(v)) else f"{float(v):.{digits}f}"
    except (TypeError, ValueError):
        return "-"
