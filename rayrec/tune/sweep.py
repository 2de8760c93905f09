"""`rayrec sweep`: plan, run (or resume) and export a Ray Tune sweep of the shared trainer.

The steps live in their own modules, in the order a sweep takes them:

    rayrec.tune.plan      options, settings, space, base config: checked before Ray starts
    rayrec.tune.tuner     the Ray connection, resources and the Tuner (new or resumed)
    rayrec.tune.trainable the function every trial runs
    rayrec.tune.export    trials.parquet, history.parquet, best.yaml, summary.yaml; test once
    rayrec.experiment     the experiment directory's layout (`<storage>/<name>/`)
"""

from __future__ import annotations

import logging
import time

from rayrec.errors import UserError
from rayrec.experiment import SPEC_FILE, SUMMARY_FILE, TRIALS_FILE, export_status
from rayrec.tune.export import SweepResult, summary_table
from rayrec.tune.plan import Plan, SweepOptions, plan_resume, plan_sweep, require_validation, spec_record
from rayrec.tune.tuner import check_local_gpus, check_resources, connect_ray, fit_sweep, planned_trials

__all__ = ["REUSE_ACTORS", "Plan", "SweepOptions", "SweepResult", "connect_ray", "plan_sweep", "run_sweep", "summary_table"]

log = logging.getLogger(__name__)

# Tune's reuse_actors. Module-level so bench/sweep_overhead.py can measure the alternative.
REUSE_ACTORS = True


def run_sweep(opts: SweepOptions, data=None, trial_function=None) -> SweepResult:
    """Plan, run (or resume) and export a sweep. `data` may be passed to skip loading;
    `trial_function` replaces the trainable (tests only, see tuner.fit_sweep)."""
    from rayrec.config import build_config
    from rayrec.data import load_split
    from rayrec.models import check_model_data
    from rayrec.storage import check_writable, exists, join, write_yaml
    from rayrec.tracking import log_sweep_summary, wandb_mode
    from rayrec.tune.export import export_results

    plan = plan_resume(opts) if opts.resume else plan_sweep(opts)
    if opts.resume:
        status = export_status(plan.experiment)
        if status is not None and not status.partial:
            return completed_result(plan, status)  # nothing to resume: nothing runs, nothing is rewritten
    plan.options.wandb = wandb_mode(plan.options.wandb)  # resolved once, before Ray: bad values exit 2 here
    check_writable(plan.storage)  # resumes too: the sweep keeps writing there
    if not opts.resume and exists(join(plan.experiment, SPEC_FILE)):
        raise UserError(f"a sweep named '{plan.name}' already exists in {plan.storage}; use --resume or another --name")
    cfg = build_config(plan.model, plan.base)
    check_local_gpus(opts)
    if data is None:
        data = load_split(cfg.data)
    check_model_data(plan.model, data)  # e.g. a sequential model on unordered data: refuse before Ray starts
    require_validation(data, plan.settings.metric)
    log.info(data.summary())
    connect_ray(opts.address, opts.verbose)
    check_resources(opts.gpus_per_trial, opts.cpus_per_trial)
    if not opts.resume:
        write_yaml(join(plan.experiment, SPEC_FILE), spec_record(plan, data))
    started = time.monotonic()
    results, stopped = fit_sweep(plan, data, reuse_actors=REUSE_ACTORS, trial_function=trial_function)
    planned = planned_trials(plan)
    if opts.time_budget_s and time.monotonic() - started >= opts.time_budget_s:
        # The time budget ended it: Tune stopped the trials still running (not an interrupt),
        # and the trials it made are all there will be.
        # Trials it created but never started reported nothing: they are not part of the sweep.
        results = [r for r in results if r.error is not None or r.metrics]
        stopped, planned = {r.path for r in results}, len(results)
    result = export_results(plan, results, data, stopped, planned)
    if not result.status.partial:
        log_sweep_summary(plan, result)  # W&B: best config and metrics as the sweep's summary run; never raises
    return result


def completed_result(plan: Plan, status) -> SweepResult:
    """A complete sweep as its export left it: its trials and best, read back, nothing written."""
    from rayrec.storage import join, read_parquet, read_yaml

    summary = read_yaml(join(plan.experiment, SUMMARY_FILE)) or {}
    trials = read_parquet(join(plan.experiment, TRIALS_FILE))
    return SweepResult(experiment=plan.experiment, trials=trials, history=None, best=summary.get("best") or {},
                       searched=list(plan.space.params), mode=plan.settings.mode, metric=plan.settings.metric,
                       status=status, already_complete=True)
