"""Running a planned sweep on Ray: the connection, the resources, and the Tuner (new or resumed).

ray-notes §0 is the reference for every Tune call here: everything comes from `ray.tune`,
metric and mode are set once (in TuneConfig), and a local Ray is started with
address="local" so it never attaches to an unrelated cluster.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any

from rayrec.errors import UserError, first_line
from rayrec.tune.plan import Plan, SweepOptions


def connect_ray(address: str | None, verbose: int = 1) -> None:
    """Join a cluster (--address / RAY_ADDRESS), reuse an initialised Ray, or start a local one."""
    import ray

    os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    kwargs: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": verbose > 1}
    if verbose < 2:
        # Ray's notice that a local Ray enables token authentication (ray-notes §5) is about
        # Ray, not the sweep: shown with -v 2 only.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    try:
        if address:
            ray.init(address=address, **kwargs)
        else:
            # 'local' never attaches to an unrelated cluster found in /tmp/ray (ray-notes §5).
            ray.init(address="local", include_dashboard=False, **kwargs)
    except ConnectionError as exc:
        raise UserError(f"cannot connect to Ray at '{address}': {first_line(exc, typed=False)}") from None

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

def check_local_gpus(opts: SweepOptions) -> None:
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

def fit_sweep(plan: Plan, data, reuse_actors: bool = True, trial_function=None) -> tuple[Any, set[str]]:
    """Assemble the Tuner (or restore it, for --resume) and run it: Ray's ResultGrid, and the
    paths of the trials that stopped for good (fewer than all after a Ctrl-C).

    `trial_function` replaces trainable.train_trial, with the same signature (tests wrap it
    to inject failures); Tune names trials after it.
    """
    from ray import tune

    from rayrec.tune.progress import StoppedTrials
    from rayrec.tune.storage_handoff import pyarrow_filesystem
    from rayrec.tune.trainable import LostCheckpointStandIn, train_trial

    s, opts = plan.settings, plan.options
    stopped = StoppedTrials()
    trainable = tune.with_resources(
        tune.with_parameters(
            trial_function or train_trial, data=data, model=plan.model, base=plan.base,
            checkpoint_every=s.checkpoint_every, cpus_per_trial=opts.cpus_per_trial,
        ),
        {"cpu": opts.cpus_per_trial, "gpu": opts.gpus_per_trial},
    )
    param_space = tune_param_space(plan)
    fs, storage_path = pyarrow_filesystem(plan.storage)
    run_config = tune.RunConfig(
        name=plan.name,
        storage_path=storage_path,
        storage_filesystem=fs,
        checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if s.scheduler == "pbt" else 2),
        failure_config=tune.FailureConfig(max_failures=opts.max_failures),
        callbacks=[*_callbacks(plan), stopped, LostCheckpointStandIn()],
        # Ray's tables only at -v 2; by default TrialLines logs one line per trial.
        verbose=2 if opts.verbose >= 2 else 0,
    )
    # CSV/JSON logs feed ResultGrid's per-epoch frames; TensorBoard's logger only adds noise
    # ('Summary name ... is illegal' for every metric with '@').
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    if opts.verbose < 2:
        # Tune's newer console output prints its configuration table and results path even at
        # verbose=0; the classic reporter prints nothing there, and TrialLines says what matters.
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    adaptive_snapshots(min_period=0.0 if fs is None else 5.0)
    slim_trial_state()
    _hide_tuner_restore_hint()
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
        tuner = tune.Tuner(trainable, param_space=param_space, tune_config=tune_config(plan, reuse_actors), run_config=run_config)
    with _sigterm_as_ctrl_c():
        return tuner.fit(), stopped.paths


# Tune snapshots the experiment state (every trial's status, last result, running metric
# statistics and checkpoint list: about 40 KB a trial with rayrec's reports) as one JSON file.
# One snapshot costs time in proportion to the trials, so a fixed cadence costs the driver
# O(trials) per step: snapshotting after every step, as rayrec once did on local storage, took
# 45% of the trials' CPU time at 100 trials (bench/scale.py, docs/benchmarks.md). Tune's
# "auto" cadence keeps snapshots to 5% of the driver's time but never snapshots more often
# than every 10 s. rayrec keeps the 5% budget with a smaller floor: on local storage a small
# sweep is still snapshotted after (nearly) every step, so a driver killed just after a trial
# finished does not rerun it; a large one is snapshotted as often as 5% of the time allows.
# Whatever a late snapshot misses is not lost: a trial resumed after its last checkpoint
# re-reports the epochs Tune never saw and trains nothing twice (trainable.restore_trial).
SNAPSHOT_BUDGET = 0.05  # fraction of the driver's time spent writing and uploading snapshots
# An upload stuck behind a storage outage must not stretch the period for good: Ray's own
# default period for syncing the driver's files is 300 s.
MAX_SNAPSHOT_PERIOD_S = 300.0


def adaptive_snapshots(min_period: float) -> None:
    """Tune's 'auto' snapshot cadence (period = 19 x the last snapshot's duration) with
    `min_period` seconds instead of Tune's 10 s as the floor. A user's own
    TUNE_GLOBAL_CHECKPOINT_S (a fixed period in seconds) wins."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    if os.environ.get("TUNE_GLOBAL_CHECKPOINT_S", "auto") != "auto":
        return  # the user's fixed period (rayrec itself only ever sets "auto")
    os.environ["TUNE_GLOBAL_CHECKPOINT_S"] = "auto"

    def update(self, time_taken: float) -> None:
        if self._auto_checkpoint_enabled:
            # Each snapshot also starts an upload of the whole driver directory (every trial's
            # result files), in the background: it counts against the budget too.
            upload_s = getattr(getattr(self._storage, "syncer", None), "_rayrec_upload_s", 0.0)
            period = (time_taken + upload_s) * (1 / SNAPSHOT_BUDGET - 1)
            self._checkpoint_period = min(max(_ExperimentCheckpointManager._rayrec_floor, period), MAX_SNAPSHOT_PERIOD_S)

    _ExperimentCheckpointManager._rayrec_floor = min_period
    _ExperimentCheckpointManager._update_auto_checkpoint_time = update
    _time_uploads()
    # Tune also forces a snapshot, and waits for its upload, whenever any trial has written
    # `num_to_keep` checkpoints since the last one, so that the state never names a checkpoint
    # already rotated out. On a large sweep that is several O(trials) snapshots and uploads of
    # the whole driver directory a second: with it the driver cost 0.127 of the trials' CPU at
    # 1,000 trials (bench/scale.py, docs/benchmarks.md). rayrec does not need it: a trial
    # resumes from its own newest checkpoint when the one the state names is gone
    # (LostCheckpointStandIn, trainable.newest_own_state), and every checkpoint carries its
    # lineage's reports, so a lagging state loses no epoch (export._with_checkpoint_reports).
    _ExperimentCheckpointManager.on_trial_checkpoint = _no_forced_snapshot


def _no_forced_snapshot(self, trial) -> None:
    """Replaces _ExperimentCheckpointManager.on_trial_checkpoint (see adaptive_snapshots)."""


def _time_uploads() -> None:
    """Make Tune's experiment syncer record how long its last upload took (`_rayrec_upload_s`,
    wall seconds), for the snapshot budget."""
    import time

    from ray.train._internal.storage import _FilesystemSyncer

    if getattr(_FilesystemSyncer, "_rayrec_timed", False):
        return
    command = _FilesystemSyncer._sync_up_command

    def timed_command(self, local_path, uri, exclude=None):
        upload, kwargs = command(self, local_path=local_path, uri=uri, exclude=exclude)

        def timed(**kw):
            start = time.monotonic()
            try:
                return upload(**kw)
            finally:
                self._rayrec_upload_s = time.monotonic() - start

        return timed, kwargs

    _FilesystemSyncer._sync_up_command = timed_command
    _FilesystemSyncer._rayrec_timed = True


# Tune's per-trial state, which every snapshot writes for every trial, was about 43 KB a
# trial with rayrec's ~40 reported numbers: 19 KB of it the last 5 and 10 values of every
# metric (deques, cloudpickled and hex-encoded, for the "last-5-avg"/"last-10-avg" scopes of
# ExperimentAnalysis, which rayrec never asks for), 8 KB the full metrics of each kept
# checkpoint (rayrec reads a checkpoint's path only; a restore reads Ray's counters).
# Serialising one trial's state took 4.6 ms; without the deques 0.8 ms (bench/scale.py).
RESTORE_KEYS = ("training_iteration", "time_total_s", "timesteps_total", "episodes_total", "epoch")


def slim_trial_state() -> None:
    """Make Tune keep, per trial, no windows of recent metric values and, per checkpoint, only
    the counters a restore reads (RESTORE_KEYS). Applied to this (driver) process."""
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    if getattr(_TrainingRunMetadata, "_rayrec_slim", False):
        return
    init, register = _TrainingRunMetadata.__init__, _CheckpointManager.register_checkpoint

    def metadata_init(self, n_steps=()):
        init(self, n_steps=n_steps)

    def register_checkpoint(self, checkpoint_result):
        keep = set(RESTORE_KEYS) | {self._checkpoint_config.checkpoint_score_attribute}
        metrics = {k: v for k, v in checkpoint_result.metrics.items() if k in keep}
        return register(self, _TrainingResult(checkpoint=checkpoint_result.checkpoint, metrics=metrics))

    _TrainingRunMetadata.__init__ = metadata_init
    _CheckpointManager.register_checkpoint = register_checkpoint
    _TrainingRunMetadata._rayrec_slim = True


@contextlib.contextmanager
def _sigterm_as_ctrl_c():
    """While Tune runs, SIGTERM (`kill`, a scheduler's preemption) stops the sweep as Ctrl-C
    does: Tune saves its state and the sweep is exported as partial, instead of dying with
    nothing exported."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: signal.raise_signal(signal.SIGINT))
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)

def _hide_tuner_restore_hint() -> None:
    """After Ctrl-C Tune logs 'Resume experiment with: Tuner.restore(...)', Python a rayrec
    user cannot run; `rayrec sweep` prints its own `--resume` command instead."""
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _NoRestoreHint) for f in tune_log.filters):
        tune_log.addFilter(_NoRestoreHint())


class _NoRestoreHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Tuner.restore(" not in record.getMessage()


def tune_param_space(plan: Plan) -> dict[str, Any]:
    return {**plan.space.tune_domains(plan.settings.search), **plan.options.extra_space}


def tune_num_samples(plan: Plan) -> int:
    """Tune's num_samples: repeats of the whole space (a grid is covered exactly once)."""
    return 1 if plan.settings.search == "grid" else plan.settings.num_samples


def planned_trials(plan: Plan) -> int:
    """How many trials Tune will create: num_samples times every grid's size."""
    grids = [len(v["grid_search"]) for v in tune_param_space(plan).values() if isinstance(v, dict) and "grid_search" in v]
    return tune_num_samples(plan) * math.prod(grids)


def tune_config(plan: Plan, reuse_actors: bool = True):
    """Scheduler, searcher and budget as Ray's TuneConfig (metric and mode set here only: ray-notes §0.5)."""
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, PopulationBasedTraining
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    s, opts = plan.settings, plan.options
    metric = s.tune_metric
    if s.scheduler == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=s.max_epochs, grace_period=s.grace_period,
                                  reduction_factor=s.reduction_factor)
    elif s.scheduler == "pbt":
        scheduler = PopulationBasedTraining(
            time_attr="epoch", perturbation_interval=s.perturbation_interval,
            hyperparam_mutations=plan.space.pbt_mutations(), quantile_fraction=s.quantile_fraction,
            resample_probability=0.25, synch=s.pbt_synch,
        )
    else:
        scheduler = FIFOScheduler()
    max_concurrent = opts.max_concurrent
    num_samples = tune_num_samples(plan)
    if s.search == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        # TPE starts with random points; with a small budget the default 20 would be all of it.
        searcher = HyperOptSearch(n_initial_points=max(2, min(20, num_samples // 3)), random_state_seed=opts.seed)
        searcher = ConcurrencyLimiter(searcher, max_concurrent=max_concurrent or _slots(opts))
        max_concurrent = None
    else:
        if opts.time_budget_s and not max_concurrent:
            # Under a clock, Tune would otherwise create up to 1,000 pending trials at once, and
            # those the clock never reaches would each leave a directory and an empty result.
            max_concurrent = math.ceil(_slots(opts))
        # Tune ignores max_concurrent_trials when given a generator instance; it takes its own limit.
        searcher = BasicVariantGenerator(random_state=opts.seed, max_concurrent=max_concurrent or 0)
        max_concurrent = None
    # Reusing worker processes saves each trial a process start and imports (~5 s on a small
    # machine, bench/sweep_overhead.py); the trainable frees its GPU memory at the end.
    return tune.TuneConfig(metric=metric, mode=s.mode, num_samples=num_samples, search_alg=searcher,
                           scheduler=scheduler, max_concurrent_trials=max_concurrent,
                           reuse_actors=reuse_actors, time_budget_s=opts.time_budget_s or None)

def _slots(opts: SweepOptions) -> int:
    import ray

    resources = ray.cluster_resources()
    slots = resources.get("CPU", 1) / opts.cpus_per_trial
    if opts.gpus_per_trial > 0:
        slots = min(slots, resources.get("GPU", 0) / opts.gpus_per_trial)
    return max(1, int(slots))

def _callbacks(plan: Plan) -> list:
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from rayrec.tracking import sweep_callbacks
    from rayrec.tune.progress import TrialLines

    s = plan.settings
    total = None if s.search == "grid" else s.num_samples

    loggers = [CSVLoggerCallback(), JsonLoggerCallback()]
    lines = [TrialLines(s.tune_metric, s.mode, s.max_epochs, total)] if plan.options.verbose >= 1 else []
    return loggers + lines + sweep_callbacks(plan)
