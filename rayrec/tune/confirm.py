"""After the search: confirm the top configs over several seeds, then test the chosen one once.

`rayrec confirm SWEEP --top 3 --seeds 5` retrains each of the top trials' configs from
scratch with N training seeds, in parallel as Ray tasks, and reports mean/std/min/max of
the validation metric (field-lessons §9). Only `train.seed` changes; the first seed is the
one the trial used, so that run also checks that tuning and training agree (§2). Written
to the sweep directory: `confirm.parquet` (one row per run) and `confirm.yaml` (per config).

`rayrec final SWEEP` retrains the chosen config (best.yaml or robust.yaml), optionally on
train + validation, and evaluates it on test exactly once (§8). The result goes to
`final.yaml`, the run (config, metrics, checkpoint) to `final/`. The test set is locked
after that: a second `final` needs `--force`, runs into `final-2/`, ..., and is appended
to `final_history` with `forced: true`; the first record is never overwritten.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

from rayrec.errors import UserError, first_line
from rayrec.experiment import (
    BEST_FILE,
    CONFIRM_FILE,
    CONFIRM_PER_USER,
    CONFIRM_SUMMARY,
    FINAL_FILE,
    ROBUST_FILE,
    SUMMARY_FILE,
    utc_timestamp,
)
from rayrec.storage import plain
from rayrec.tune.diagnostics import best_epochs
from rayrec.tune.narrow import export_robust, robust_config
from rayrec.tune.results import SweepResults, load_results, require_completed, trial_overrides

log = logging.getLogger(__name__)

# --- confirmation -----------------------------------------------------------------------
@dataclass
class ConfirmOptions:
    sweep: str
    storage: str | None = None
    top: int = 3
    seeds: int = 5
    max_std: float = 0.002  # std of the metric over seeds above this: unstable (field-lessons §9)
    tolerance: float = 0.01  # retrained mean short of the tuning figure by more: disagreement (§2)
    robust: bool = False  # also confirm the top-k averaged config
    robust_k: int = 5
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    address: str | None = None


@dataclass
class Candidate:
    name: str  # 'rank1', 'rank2', ..., 'robust'
    trial_id: str
    tuning_value: float  # the metric the sweep saw for it (NaN for the robust config)
    config: dict[str, Any]  # fully resolved config (Config.to_dict())


@dataclass
class ConfirmResult:
    runs: Any  # DataFrame: one row per (candidate, seed)
    stats: Any  # DataFrame: one row per candidate
    experiment: str


def candidates(results: SweepResults, top: int, robust: bool = False, robust_k: int = 5) -> list[Candidate]:
    """The top trials' resolved configs (as each trial trained), and optionally the robust one.

    A PBT trial's config is the one it ended with; its schedule of mutations and inherited
    weights cannot be replayed, so confirmation retrains that final config from scratch."""
    from rayrec.config import build_config

    if top < 1:
        raise UserError(f"--top must be >= 1, got {top}")
    ranked = require_completed(results, 1, "confirmation")
    base = results.spec.get("base") or {}
    out = []
    for rank, (_, row) in enumerate(ranked.head(top).iterrows(), start=1):
        cfg = build_config(results.model, base, trial_overrides(row))
        out.append(Candidate(f"rank{rank}", str(row["trial_id"]), float(row[results.value_col]), cfg.to_dict()))
    if robust:
        resolved, ids = robust_config(results, robust_k)
        out.append(Candidate("robust", "+".join(ids), float("nan"), resolved))
    return out


def seed_list(tuning_seed: int, n: int) -> list[int]:
    """The tuning seed first (reproduces the trial), then the next n-1 integers."""
    if n < 1:
        raise UserError(f"--seeds must be >= 1, got {n}")
    return [tuning_seed + i for i in range(n)]


def run_confirm(opts: ConfirmOptions, data=None) -> ConfirmResult:
    """Retrain every candidate with every seed as parallel Ray tasks; write confirm.parquet/.yaml."""
    import pandas as pd

    from rayrec.storage import write_parquet, write_yaml
    from rayrec.tune.trainable import trial_threads
    from rayrec.tune.tuner import check_resources, connect_ray

    if opts.cpus_per_trial <= 0 or opts.gpus_per_trial < 0:
        raise UserError(f"--cpus-per-trial must be > 0 and --gpus-per-trial >= 0, got {opts.cpus_per_trial}/{opts.gpus_per_trial}")
    if opts.max_std < 0 or opts.tolerance < 0:
        raise UserError(f"--max-std and --tolerance must be >= 0, got {opts.max_std}/{opts.tolerance}")
    results = load_results(opts.sweep, opts.storage)
    cands = candidates(results, opts.top, opts.robust, opts.robust_k)
    jobs = [(c, seed) for c in cands for seed in seed_list(int(c.config["train"]["seed"]), opts.seeds)]
    connect_ray(opts.address, verbose=1)
    check_resources(opts.gpus_per_trial, opts.cpus_per_trial)
    import ray

    data_refs: dict[str, Any] = {}
    if data is not None:
        data_refs[repr(sorted(cands[0].config["data"].items()))] = ray.put(data)
    task = ray.remote(_train_one).options(num_cpus=opts.cpus_per_trial, num_gpus=opts.gpus_per_trial, max_retries=0)
    threads = trial_threads(opts.cpus_per_trial)
    pending = {}
    for cand, seed in jobs:
        key = repr(sorted(cand.config["data"].items()))
        if key not in data_refs:
            data_refs[key] = ray.put(_load_data(cand.config))
        pending[task.remote(cand.config, seed, threads, data_refs[key])] = (cand, seed)
    log.info("confirm: %d configs x %d seeds = %d trainings on Ray", len(cands), opts.seeds, len(jobs))
    metric_col = f"val_{results.metric}"
    rows, per_user = [], []
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        cand, seed = pending.pop(done[0])
        row = {"candidate": cand.name, "trial_id": cand.trial_id, "seed": seed,
               "tuning_seed": seed == int(cand.config["train"]["seed"]), "tuning_value": cand.tuning_value}
        try:
            out = ray.get(done[0])
            users = pd.DataFrame(out.pop("per_user"))
            users.insert(0, "candidate", cand.name)
            users.insert(1, "seed", seed)
            per_user.append(users)
            row.update(out)
            row["error"] = ""
            log.info("confirm %s seed %d: %s %.4f (best epoch %d)", cand.name, seed, metric_col,
                     row.get(metric_col, float("nan")), row.get("best_epoch", 0))
        except ray.exceptions.RayError as exc:
            row.update({metric_col: float("nan"), "error": first_line(exc)[:300]})
            log.warning("confirm %s seed %d failed: %s", cand.name, seed, row["error"])
        rows.append(row)
    order = {c.name: i for i, c in enumerate(cands)}
    runs = pd.DataFrame(rows)
    runs = runs.sort_values(["candidate", "seed"], key=lambda s: s.map(order) if s.name == "candidate" else s).reset_index(drop=True)
    if runs[metric_col].isna().all():
        raise UserError(f"every confirmation run failed; first error: {runs['error'].iloc[0]}")
    stats = confirmation_stats(runs, metric_col, results.mode, opts.max_std, opts.tolerance)
    write_parquet(results.file(CONFIRM_FILE), runs)
    write_parquet(results.file(CONFIRM_PER_USER), pd.concat(per_user, ignore_index=True))
    write_yaml(results.file(CONFIRM_SUMMARY), plain({
        "sweep": results.experiment,
        "sweep_status": results.status.record(),  # 'partial: ...' when confirmed from an unfinished sweep
        "metric": metric_col,
        "mode": results.mode,
        "seeds": opts.seeds,
        "max_std": opts.max_std,
        "tolerance": opts.tolerance,
        "created": utc_timestamp(),
        "configs": stats.to_dict(orient="records"),
    }))
    return ConfirmResult(runs=runs, stats=stats, experiment=results.experiment)


def confirmation_stats(runs, metric_col: str, mode: str = "max", max_std: float = 0.002, tolerance: float = 0.01):
    """Per candidate: n, mean, std (sample, ddof=1), min, max of `metric_col` over seeds, and flags.

    unstable: std > max_std. disagrees: the retrained mean falls short of the tuning-time
    figure by more than `tolerance` (below it for mode max, above it for mode min).
    """
    import pandas as pd

    rows = []
    for name, group in runs.groupby("candidate", sort=False):
        values = group[metric_col].astype(float).dropna()
        tuning = float(group["tuning_value"].iloc[0]) if "tuning_value" in group else float("nan")
        mean = float(values.mean()) if len(values) else float("nan")
        std = float(values.std(ddof=1)) if len(values) >= 2 else float("nan")
        shortfall = (tuning - mean) if mode == "max" else (mean - tuning)
        unstable = bool(math.isfinite(std) and std > max_std)
        disagrees = bool(math.isfinite(tuning) and math.isfinite(mean) and shortfall > tolerance)
        flags = []
        if unstable:
            flags.append(f"unstable: std {std:.4f} > {max_std}")
        if disagrees:
            flags.append(f"tuning and training disagree: retrained mean {mean:.4f} vs tuning-time {tuning:.4f} "
                         f"(short by {shortfall:.4f} > {tolerance})")
        if len(values) < 2:
            flags.append("one seed: no spread to judge")
        if len(values) < len(group):
            flags.append(f"{len(group) - len(values)} run(s) failed")
        rows.append({
            "candidate": name, "trial_id": group["trial_id"].iloc[0], "n": int(len(values)),
            "tuning_value": tuning, "mean": mean, "std": std,
            "min": float(values.min()) if len(values) else float("nan"),
            "max": float(values.max()) if len(values) else float("nan"),
            "shortfall": shortfall, "unstable": unstable, "disagrees": disagrees, "flags": "; ".join(flags),
        })
    return pd.DataFrame(rows)


def _train_one(config: dict[str, Any], seed: int, threads: int, data) -> dict[str, Any]:
    """One confirmation run (a Ray task): the shared trainer from scratch with `train.seed = seed`."""
    import torch

    from rayrec.config import build_config
    from rayrec.train.trainer import Trainer
    from rayrec.tune.trainable import trial_device

    device, _ = trial_device()
    cfg = build_config(base=config, overrides={"train.seed": seed, "train.device": device, "train.num_threads": threads})
    torch.set_num_threads(threads)
    start = time.perf_counter()
    trainer = Trainer(cfg, data, device=device)
    fit = trainer.fit()
    seconds = time.perf_counter() - start
    out = {k: float(v) for k, v in fit.best_metrics.items() if isinstance(v, (int, float))}
    out.update({"best_epoch": int(fit.best_epoch), "epochs": int(fit.epochs_run), "stop_reason": fit.stop_reason,
                "device": device, "seconds": seconds})
    # The best weights' validation, per user (the input of paired tests between configs).
    out["per_user"] = trainer.evaluation("valid", per_user=True).per_user
    return out


def _load_data(config: dict[str, Any]):
    from rayrec.config import build_config
    from rayrec.data import load_split

    return load_split(build_config(base=config).data)


# --- the final test ---------------------------------------------------------------------
@dataclass
class FinalOptions:
    sweep: str
    storage: str | None = None
    config: str = "best"  # best | robust
    train_on_valid: bool = False
    force: bool = False
    robust_k: int = 5
    allow_partial: bool = False  # test the best of an unfinished sweep (recorded in final.yaml)


# Long: the steps of the test-once lock in order (resolve, refuse a second test, retrain,
# evaluate on test once, record); splitting them would let a caller skip the lock.
def run_final(opts: FinalOptions, data=None) -> dict[str, Any]:
    """Retrain the chosen config, evaluate on test once, and record it in final.yaml."""
    from rayrec.config import build_config
    from rayrec.storage import exists, read_yaml, write_yaml
    from rayrec.train.run import plain_sections, train_run

    if opts.config not in ("best", "robust"):
        raise UserError(f"--config '{opts.config}' is not valid; valid: best, robust")
    results = load_results(opts.sweep, opts.storage, allow_partial=opts.allow_partial,
                           refusal=", or pass --allow-partial to test its best so far")
    final_url = results.file(FINAL_FILE)
    previous = read_yaml(final_url) if exists(final_url) else None
    if previous and not opts.force:
        raise UserError(
            f"sweep '{results.experiment}' was already evaluated on test at {previous.get('timestamp')} "
            f"({previous.get('config_name')} config); the test set is used once — pass --force to evaluate "
            "again (it is recorded as forced in final.yaml)"
        )
    ranked = require_completed(results, 1, "a final test")
    if opts.config == "best":
        url = results.file(BEST_FILE)
        if not exists(url):
            raise UserError(f"sweep '{results.experiment}' has no best.yaml; it has no completed trial to retrain")
        resolved = read_yaml(url)
        source_trials = [str(ranked["trial_id"].iloc[0])]
    else:
        url = results.file(ROBUST_FILE)
        if not exists(url):
            url = export_robust(results, opts.robust_k)
        resolved = read_yaml(url)
        source_trials = [str(t) for t in ranked["trial_id"].head(opts.robust_k)]
    cfg = build_config(base=resolved)
    epochs = None
    if data is None:
        from rayrec.data import load_split

        data = load_split(cfg.data)
    if opts.train_on_valid:
        # No validation set is left for early stopping: train for the epoch count the tuning
        # run's best epoch indicated (median over the trials the config came from), on the
        # trial's learning-rate path: its schedule horizon stays, only the run stops sooner.
        found = sorted(best_epochs(results, source_trials))
        epochs = found[len(found) // 2] if found else cfg.train.epochs
        epochs = max(1, int(epochs))
        cfg = build_config(base=cfg.to_dict(), overrides={
            "train.epochs": epochs, "train.schedule_epochs": cfg.train.schedule_horizon})
        data = with_validation_in_train(data)
    # The test evaluation keeps its per-user rows (per_user.parquet in the run), for paired tests.
    cfg = build_config(base=cfg.to_dict(), overrides={"train.save_per_user": True})
    output = _unused_run_dir(results)
    start = time.perf_counter()
    run = train_run(cfg, data, output=output)
    summary = read_yaml(results.file(SUMMARY_FILE)) if exists(results.file(SUMMARY_FILE)) else {}
    record = {
        "config_name": opts.config,
        "config_file": url,
        "source_trials": source_trials,
        "train_on_valid": opts.train_on_valid,
        "epochs": epochs if epochs is not None else int(run.fit.epochs_run),
        "best_epoch": int(run.fit.best_epoch) if not opts.train_on_valid else None,
        "valid": None if opts.train_on_valid else {k.removeprefix("val_"): float(v) for k, v in run.fit.best_metrics.items()},
        **plain_sections(run.tests),  # 'test' (all users), 'test_<group>' for the dataset's test groups
        "metric": results.metric,
        "run": output,
        "seconds": round(time.perf_counter() - start, 1),
        "timestamp": utc_timestamp(),
        "forced": bool(previous),
        "sweep_status": results.status.record(),  # 'partial: ...' only with --allow-partial
        # The sweep itself may have evaluated its best checkpoint on test (summary.yaml); say so.
        "sweep_evaluated_test": bool((summary.get("best") or {}).get("test")),
        "config": resolved if not opts.train_on_valid else cfg.to_dict(),
    }
    if previous:
        previous.setdefault("final_history", []).append(plain(record))
        write_yaml(final_url, previous)
    else:
        write_yaml(final_url, plain({**record, "final_history": []}))
    return record


def with_validation_in_train(data):
    """The split with each user's validation items appended to their training items and no
    validation targets left (test keeps its own; test-time masking then covers train + valid)."""
    import dataclasses

    import numpy as np

    from rayrec.data.types import CSR

    empty = CSR(np.zeros(data.n_users + 1, dtype=np.int64), np.zeros(0, dtype=np.int64))
    return dataclasses.replace(data, train=data.train.concat(data.valid), valid=empty,
                               info={**data.info, "train_on_valid": True})


def _unused_run_dir(results: SweepResults) -> str:
    from rayrec.storage import exists

    name, n = "final", 1
    while exists(results.file(name)):
        n += 1
        name = f"final-{n}"
    return results.file(name)
