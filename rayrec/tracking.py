"""W&B for sweeps: the only module that imports wandb (directly or through Ray's integration).

One integration, Ray's WandbLoggerCallback (subclassed here, not duplicated):

- one W&B run per trial (id = trial id), grouped by the sweep name, tagged with model,
  dataset, scheduler and search; the trial's config is logged and updated with every result,
  so a PBT mutation shows up in the run's config (`log_config=True` also charts it);
  every epoch's metrics are logged at step = epoch number;
- at the end, a `summary` run in the same group holds the best trial's config, its
  validation metric and its test metrics as summary, and a `trials` table (one row per
  trial: sampled parameters, status, best metric) for a parallel-coordinates panel; the
  group view's own parallel-coordinates panel works on the trial runs' config and summary;
- online, the sweep is also registered as a W&B sweep (`wandb.sweep`, local controller, so
  W&B proposes nothing) and every run joins it through the `sweep_id` setting, so W&B's
  Sweeps view shows it. Offline that is impossible: `wandb.sweep` is a server call, and an
  offline run carrying a sweep id that the server never issued could not be synced.

A trial's logging actor belongs to the driver, so a driver killed mid-sweep takes its actors
down with it, often before their runs are on disk (a tiny trial outruns an actor's start and
`wandb.init`), and a resume does not run again the trials that had finished. So an actor marks
its run directory complete (RUN_RECORD: the epochs it holds) once wandb has flushed it, and the
driver that completes the sweep logs every trial whose complete runs miss epochs again, from
the sweep's history, in place of its incomplete runs (`complete_trial_runs`, offline only).
The driver numbers what it hands a logging actor, which takes it in that order (`_InOrder`).

W&B never fails or hangs a sweep: setup, logging and finishing errors become one warning;
a logging actor whose `wandb.init` fails drains its queue and ends with its trial; the wait
for uploads at the end is bounded (RAYREC_WANDB_TIMEOUT_S, default 60 s) and so is the
summary run. The API key reaches the logging actors as an actor argument (in memory), not
through Ray's runtime_env as Ray's callback does, because Ray writes runtime_env values
into runtime_env_agent.log; it is never stored on the callback, which Ray pickles into the
experiment directory (tuner.pkl).
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import tempfile
from typing import Any

from rayrec.storage import error_line, write_bytes

log = logging.getLogger(__name__)

MODES = ("online", "offline", "off")
TIMEOUT_S = float(os.environ.get("RAYREC_WANDB_TIMEOUT_S", "60"))


def wandb_mode(requested: str | None) -> str:
    """online | offline | off. Default: online when an API key is configured, else offline (one warning)."""
    from rayrec.errors import UserError

    if requested is not None:
        if requested not in MODES:
            raise UserError(f"--wandb '{requested}' is not valid; valid: {', '.join(MODES)}")
        if requested == "online" and not has_api_key():
            raise UserError(
                "--wandb online needs a W&B API key: set WANDB_API_KEY or run `wandb login`; "
                "or use --wandb offline (sync later with `wandb sync`)"
            )
        return requested
    env_mode = os.environ.get("WANDB_MODE")
    if env_mode in ("offline", "dryrun"):
        return "offline"
    if env_mode == "disabled":
        return "off"
    if has_api_key():
        return "online"
    log.warning("W&B: no API key configured; logging offline (upload later with `wandb sync`, or --wandb off)")
    return "offline"


def has_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = re.sub(r"^https?://", "", os.environ.get("WANDB_BASE_URL", "api.wandb.ai")).split("/")[0]
    try:
        with open(os.path.expanduser(os.environ.get("NETRC", "~/.netrc"))) as fh:
            return host in fh.read()
    except OSError:
        return False


def project() -> str:
    return os.environ.get("WANDB_PROJECT") or "rayrec"


def wandb_dir(plan: Any) -> str:
    """Where this driver node keeps the sweep's W&B files: $WANDB_DIR, else the sweep's own directory
    (local storage) or a local staging folder published to `<experiment>/wandb/` at the end.

    Not inside the trial directories: Ray syncs those before the logging actors finish writing.
    """
    from rayrec.storage import is_local, local_path

    if os.environ.get("WANDB_DIR"):
        return os.path.abspath(os.environ["WANDB_DIR"])
    if is_local(plan.experiment):
        return os.path.abspath(local_path(plan.experiment))
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", plan.experiment.split("://", 1)[-1])
    return os.path.join(tempfile.gettempdir(), "rayrec-wandb", safe)


def _is_staging(plan: Any) -> bool:
    from rayrec.storage import is_local

    return not is_local(plan.experiment) and not os.environ.get("WANDB_DIR")


def tags(plan: Any) -> list[str]:
    dataset = str((plan.base.get("data") or {}).get("name", "synthetic"))
    extra = list(getattr(plan.options, "tags", None) or [])  # e.g. `rayrec compare`'s group
    return [plan.model, dataset, plan.settings.scheduler, plan.settings.search, *extra]


# --- per-trial runs ---------------------------------------------------------------------
def sweep_callbacks(plan: Any) -> list:
    """The W&B callback for a sweep, or none with --wandb off."""
    mode = wandb_mode(plan.options.wandb)
    if mode == "off":
        return []
    init = _trial_run_settings(plan, mode)
    staging = os.path.join(init["dir"], "wandb")
    if _is_staging(plan) and not plan.options.resume and os.path.isdir(staging):
        import shutil

        shutil.rmtree(staging, ignore_errors=True)  # an earlier sweep of the same URL; not this one's
    if mode == "online":
        sweep_id = registered_sweep(plan)
        if sweep_id:
            init["settings"] = {"sweep_id": sweep_id}
    return [_callback_class()(project=project(), group=plan.name, log_config=True, upload_checkpoints=False,
                              upload_timeout=int(TIMEOUT_S), **init)]


def _trial_run_settings(plan: Any, mode: str) -> dict[str, Any]:
    """wandb.init arguments every trial's run shares (besides project, group, id, name, config)."""
    init: dict[str, Any] = {
        "mode": mode,
        "tags": tags(plan),
        "job_type": "trial",
        "resume": "allow",  # a resumed or retried trial continues its run instead of clashing with it
    }
    if os.environ.get("WANDB_ENTITY"):
        init["entity"] = os.environ["WANDB_ENTITY"]
    # Logging actors run on this node but do not inherit the driver's environment (WANDB_DIR).
    init["dir"] = wandb_dir(plan)
    return init


def __getattr__(name: str):
    # The classes below subclass Ray's and are built on first use, so importing this module
    # imports neither Ray nor wandb; unpickling them (a resumed sweep's tuner.pkl) builds them.
    if name in ("_SafeWandbCallback", "_SafeWandbActor"):
        _callback_class()
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Long because it defines the callback class inside a function, so that Ray and wandb are
# imported only when W&B logging is on; the methods are short.
def _callback_class():
    """Ray's WandbLoggerCallback, made unable to fail the sweep."""
    if "_SafeWandbCallback" in globals():
        return globals()["_SafeWandbCallback"]
    from ray.air.integrations.wandb import WandbLoggerCallback, _clean_log, _QueueItem, _WandbLoggingActor

    class _SafeWandbActor(_WandbLoggingActor):
        """Ray's logging actor, taking the trial's items in the driver's order (_InOrder); a
        failed wandb.init drains the queue instead of failing; a run that wandb finished and
        flushed, every result at a higher step than the one before, gets its RUN_RECORD."""

        def __init__(self, *args, _rayrec_api_key: str | None = None, **kwargs):
            if _rayrec_api_key:
                os.environ["WANDB_API_KEY"] = _rayrec_api_key
            super().__init__(*args, **kwargs)
            self.queue = _InOrder(self.queue)
            self._run_dir: str | None = None
            self._epochs: set[int] = set()
            self._last_step: float | None = None
            self._steps_rose = True  # every result's step above the one before: wandb kept them all

        def run(self):
            complete = False
            try:
                super().run()
                complete = True
            except Exception as exc:  # noqa: BLE001 - W&B must not fail the trial or the sweep
                logging.getLogger("rayrec.tracking").warning(
                    "W&B: run %s not logged: %s", self._trial_name, error_line(exc))
                while self.queue.get()[0] != _QueueItem.END:
                    pass
            finally:
                # wandb.finish() returns before wandb-core has written everything; Ray kills this
                # actor as soon as run() returns, so flush (and, online, upload) here.
                try:
                    self._wandb.teardown()
                except Exception:  # noqa: BLE001
                    complete = False
            if complete and self._steps_rose and self._run_dir:
                try:
                    write_run_record(self._run_dir, self.kwargs.get("id"), self.kwargs.get("group"), self._epochs)
                except OSError:  # the run counts as cut short: logged again at the end (complete_trial_runs)
                    pass

        def _handle_result(self, result):
            if self._run_dir is None and self._wandb.run is not None:
                self._run_dir = os.path.dirname(self._wandb.run.dir)  # run.dir is the run's files/
            if isinstance(result.get("epoch"), (int, float)):
                self._epochs.add(int(result["epoch"]))
            # Ray logs a result at step = its training_iteration; wandb ignores a step below the
            # run's current one and merges one equal to it into that row (a PBT exploit of a
            # donor behind): such a run does not hold its epochs as reported.
            step = result.get("training_iteration")
            if isinstance(step, (int, float)):
                self._steps_rose = self._steps_rose and (self._last_step is None or step > self._last_step)
                self._last_step = step
            return super()._handle_result(result)

    class _SafeWandbCallback(WandbLoggerCallback):
        _logger_actor_cls = _SafeWandbActor

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._failed = False
            self._numbered: dict = {}  # trial -> items handed to its current logging actor

        def setup(self, *args, **kwargs):
            # Ray's setup checks for an API key even offline unless WANDB_MODE is set in the
            # environment; rayrec checked the key already (wandb_mode).
            self.api_key_file = None

        def _put(self, trial, item, wait: bool) -> None:
            """Hand `item` to the trial's logging actor, numbered for `_InOrder`; without waiting
            unless `wait`. A trial's new logging actor counts from 0 (_start_logging_actor)."""
            queue = self._trial_queues[trial]
            number = self._numbered.get(trial, 0)
            self._numbered[trial] = number + 1
            if wait:
                queue.put((number, item))
            else:
                queue.actor.put.remote((number, item), None)

        def _signal_logging_actor_stop(self, trial):
            self._put(trial, (_QueueItem.END, None), wait=True)

        def _start_logging_actor(self, trial, exclude_results, **wandb_init_kwargs):
            if not self._remote_logger_class:
                import ray
                from ray.air.util.node import _force_on_current_node

                # As Ray does, minus runtime_env={"env_vars": {"WANDB_API_KEY": ...}} (logged by Ray),
                # and without restarts: a restarted logging actor could not get its constructor
                # arguments back (Ray logs a core_worker error saying so for every trial), and a
                # trial whose W&B logging died is a warning, not something to retry.
                self._remote_logger_class = ray.remote(
                    num_cpus=0, **_force_on_current_node(), max_restarts=0,
                )(self._logger_actor_cls)
            if self.kwargs.get("mode") == "online" and os.environ.get("WANDB_API_KEY"):
                wandb_init_kwargs["_rayrec_api_key"] = os.environ["WANDB_API_KEY"]
            self._numbered[trial] = 0
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

        def _cleanup_logging_actor(self, trial):
            self._numbered.pop(trial, None)
            super()._cleanup_logging_actor(trial)

        def _guarded(self, method: str, *args, **kwargs):
            if self._failed:
                return None
            try:
                return getattr(super(), method)(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - W&B must not fail the sweep
                self._failed = True
                log.warning("W&B: logging stopped after an error (%s); the sweep goes on", error_line(exc))
                return None

        def log_trial_start(self, trial):
            self._guarded("log_trial_start", trial)

        def log_trial_result(self, iteration, trial, result):
            # Ray's version hands the result to the trial's queue actor with Queue.put, which
            # waits (ray.get) until that actor has it: on the driver, between results, and for
            # seconds while a new trial's actors start ("on_trial_result took 1.3 s"). Submitted
            # without waiting instead, and numbered: the queue actor is asynchronous, so Ray may
            # run those calls out of order, and the logging actor takes the items in their
            # numbers' order (_InOrder), the END marker last.
            if self._failed:
                return
            try:
                if trial not in self._trial_logging_actors:
                    self.log_trial_start(trial)
                if trial not in self._trial_queues:
                    return  # log_trial_start failed and said so
                result = _clean_log(result, video_kwargs=self.video_kwargs, image_kwargs=self.image_kwargs)
                self._put(trial, (_QueueItem.RESULT, result), wait=False)
            except Exception as exc:  # noqa: BLE001 - W&B must not fail the sweep
                self._failed = True
                log.warning("W&B: logging stopped after an error (%s); the sweep goes on", error_line(exc))

        def log_trial_save(self, trial):
            self._guarded("log_trial_save", trial)

        def log_trial_end(self, trial, failed=False):
            self._guarded("log_trial_end", trial, failed=failed)

        def on_experiment_end(self, trials, **info):
            # Bounded: after upload_timeout the remaining actors are killed (Ray's code).
            try:
                super().on_experiment_end(trials, **info)
            except Exception as exc:  # noqa: BLE001
                log.warning("W&B: finishing runs failed (%s)", error_line(exc))

    for cls in (_SafeWandbActor, _SafeWandbCallback):
        cls.__qualname__ = cls.__name__  # importable by name, so pickles refer to it
        globals()[cls.__name__] = cls
    return _SafeWandbCallback


class _InOrder:
    """A trial's Ray Queue, whose items the driver numbers (`(n, item)`), handed out in the
    numbers' order. Ray's queue actor is asynchronous, so calls that the driver did not wait
    for can run out of order: a result landing after a later one is dropped by wandb (its step
    is below the run's), and one landing after the END marker is never read."""

    def __init__(self, queue) -> None:
        self.queue = queue
        self._next = 0
        self._early: dict[int, Any] = {}

    def get(self) -> Any:
        while self._next not in self._early:
            number, item = self.queue.get()
            self._early[number] = item
        self._next += 1
        return self._early.pop(self._next - 1)


# --- the sweep as one unit: W&B sweep and summary run ----------------------------------------
def wandb_sweep_config(plan: Any) -> dict[str, Any]:
    """The sweep in W&B's sweep-config format (what its Sweeps view shows); W&B proposes nothing."""
    s = plan.settings
    method = {"hyperopt": "bayes", "random": "random", "grid": "grid"}.get(s.search, "random")
    params: dict[str, Any] = {}
    for key, p in plan.space.params.items():
        if s.search == "grid":
            params[key] = {"values": p.grid_values()}
        elif p.dist == "choice":
            params[key] = {"values": list(p.values)}
        elif p.dist in ("int", "logint"):
            params[key] = {"distribution": "int_uniform", "min": int(p.low), "max": int(p.high)}
        elif p.dist in ("loguniform", "qloguniform"):
            params[key] = {"distribution": "log_uniform_values", "min": float(p.low), "max": float(p.high)}
        else:
            params[key] = {"distribution": "uniform", "min": float(p.low), "max": float(p.high)}
    return {
        "name": plan.name,
        "method": method,
        "metric": {"name": s.tune_metric, "goal": "maximize" if s.mode == "max" else "minimize"},
        "parameters": params,
        "controller": {"type": "local"},  # rayrec's Ray Tune search proposes the configs, not W&B
        "description": f"rayrec sweep {plan.name}: {plan.model}, {s.search} search, {s.scheduler} scheduler",
    }


def registered_sweep(plan: Any) -> str | None:
    """The W&B sweep id of this rayrec sweep, registering it on first use; None when W&B is unreachable."""
    from rayrec.experiment import WANDB_SWEEP_FILE
    from rayrec.storage import exists, join, read_yaml, write_yaml

    record = join(plan.experiment, WANDB_SWEEP_FILE)
    try:
        if exists(record):
            return read_yaml(record).get("sweep_id")
    except Exception:  # noqa: BLE001 - the record is a convenience
        pass

    def register() -> str:
        import wandb

        return wandb.sweep(wandb_sweep_config(plan), project=project(), entity=os.environ.get("WANDB_ENTITY"))

    sweep_id = _bounded(register, "registering the W&B sweep")
    if sweep_id:
        write_yaml(record, {"sweep_id": sweep_id, "project": project(), "entity": os.environ.get("WANDB_ENTITY")})
    return sweep_id


def log_sweep_summary(plan: Any, result: Any) -> str | None:
    """Log the best config and metrics as a `summary` run in the sweep's group; never raises.

    Runs in a Ray task on this node, so a W&B that hangs is abandoned after TIMEOUT_S and
    wandb's process-wide state never touches the driver. Trial runs that a killed driver cut
    short are logged again first (`complete_trial_runs`). Then the sweep's offline files are
    copied next to its results (`<experiment>/wandb/`) when those live in object storage.
    Returns the summary run id, or None.
    """
    try:
        mode = wandb_mode(plan.options.wandb)
    except Exception:  # noqa: BLE001 - validated before the sweep already
        return None
    if mode == "off":
        return None
    complete_trial_runs(plan, result, mode)
    run_id = None
    try:
        if result.best:
            run_id = _log_summary(plan, result, mode)
    except Exception as exc:  # noqa: BLE001 - W&B must not fail the sweep
        log.warning("W&B: summary run not logged (%s)", error_line(exc))
    publish_wandb_files(plan)
    return run_id


def _log_summary(plan: Any, result: Any, mode: str) -> str | None:

    best = result.best
    run_id = re.sub(r"[^A-Za-z0-9_-]", "-", plan.name)[:56] + "-summary"
    summary = {f"best/{best['metric']}": best["value"], "best/trial_id": best.get("trial_id"),
               "trial_count": int(len(result.trials))}  # not "trials": that key is the table
    for section in (s for s in best if s.startswith("test")):  # "test" and "test_<group>"
        summary.update({f"{section}/{k}": v for k, v in (best[section] or {}).items()})
    if len(result.trials):
        summary.update({f"status/{k}": int(v) for k, v in result.trials["status"].value_counts().items()})
    searched = set(result.searched or [])
    keep = ["trial_id", "status", "epochs"] + [c for c in result.trials.columns
                                               if c.startswith("best_") or c[7:] in searched and c.startswith("config/")]
    table = result.trials[[c for c in keep if c in result.trials.columns]]
    table = table.rename(columns=lambda c: c[7:] if c.startswith("config/") else c)
    init = {"project": project(), "group": plan.name, "id": run_id, "name": "summary", "job_type": "summary",
            "mode": mode, "tags": tags(plan) + ["summary"], "resume": "allow",
            "config": {**best["config"], "best_trial_id": best.get("trial_id")}}
    if os.environ.get("WANDB_ENTITY"):
        init["entity"] = os.environ["WANDB_ENTITY"]
    sweep_id = None
    if mode == "online":
        sweep_id = registered_sweep(plan)
        if sweep_id:
            init["settings"] = {"sweep_id": sweep_id}
    init["dir"] = wandb_dir(plan)
    api_key = os.environ.get("WANDB_API_KEY") if mode == "online" else None

    from rayrec.storage import plain

    return run_id if _await_summary_run(init, plain(summary), table.to_dict("list"), api_key, "trials") else None


def log_compare_summary(name: str, directory: str, requested: str | None, summary: dict[str, Any], table) -> str | None:
    """`rayrec compare`: one `leaderboard` run in the W&B group `name` (the group the compared
    sweeps' runs are tagged with), holding the leaderboard table and the leader's figures as its
    summary; its files under `directory`. Never raises; returns the run id or None."""
    try:
        mode = wandb_mode(requested)
        if mode == "off":
            return None

        from rayrec.storage import plain

        run_id = re.sub(r"[^A-Za-z0-9_-]", "-", name)[:52] + "-leaderboard"
        init = {"project": project(), "group": name, "id": run_id, "name": "leaderboard", "job_type": "compare",
                "mode": mode, "tags": ["compare", name], "resume": "allow", "dir": directory}
        if os.environ.get("WANDB_ENTITY"):
            init["entity"] = os.environ["WANDB_ENTITY"]
        api_key = os.environ.get("WANDB_API_KEY") if mode == "online" else None
        return run_id if _await_summary_run(init, plain(summary), plain(table.to_dict("list")), api_key,
                                            "leaderboard") else None
    except Exception as exc:  # noqa: BLE001 - W&B must not fail the comparison
        log.warning("W&B: leaderboard run not logged (%s)", error_line(exc))
        return None


def publish_wandb_files(plan: Any) -> None:
    """Copy the sweep's W&B folder next to its results when those live in object storage; never raises."""
    from rayrec.storage import join, publish_dir

    local = os.path.join(wandb_dir(plan), "wandb")
    if not _is_staging(plan) or not os.path.isdir(local):
        return
    try:
        publish_dir(local, join(plan.experiment, "wandb"))
    except Exception as exc:  # noqa: BLE001
        log.warning("W&B: offline files not copied to %s (%s); they stay in %s", plan.experiment, error_line(exc), local)


def _await_summary_run(init: dict[str, Any], summary: dict[str, Any], table: dict[str, list], api_key: str | None,
                       table_key: str) -> bool:
    """Run `_summary_run` as a Ray task on this node, waiting at most TIMEOUT_S; False if abandoned."""
    what = "summary run" if table_key == "trials" else f"{table_key} run"
    return _on_this_node(_summary_run, (init, summary, table, api_key, table_key), what)[0]


def _on_this_node(fn, args: tuple, what: str) -> tuple[bool, Any]:
    """fn(*args) as a Ray task on this node, waited for at most TIMEOUT_S: (False, None) when
    abandoned (one warning), else (True, its result); its error is raised here."""
    import ray
    from ray.air.util.node import _force_on_current_node

    task = ray.remote(num_cpus=0, max_retries=0, **_force_on_current_node())(fn)
    ref = task.remote(*args)
    done, _ = ray.wait([ref], timeout=TIMEOUT_S)
    if not done:
        ray.cancel(ref, force=True)
        log.warning("W&B: %s did not finish within %.0f s; abandoned", what, TIMEOUT_S)
        return False, None
    return True, ray.get(ref)


def _summary_run(init: dict[str, Any], summary: dict[str, Any], table: dict[str, list], api_key: str | None,
                 table_key: str = "trials") -> str:
    """Ray task: one wandb run with summary values and a table (`table_key`); returns its local directory."""
    import pandas as pd
    import wandb

    if api_key:
        os.environ["WANDB_API_KEY"] = api_key
    os.makedirs(init["dir"], exist_ok=True)
    run = wandb.init(**init)
    try:
        run.log({table_key: wandb.Table(dataframe=pd.DataFrame(table))})
        run.summary.update(summary)
    finally:
        run.finish()
        wandb.teardown()  # flush before this task returns (finish alone leaves it to process exit)
    return run.dir


# --- trial runs that a killed driver cut short -----------------------------------------------
# In a run directory, written once wandb has flushed the run: {"id", "group", "epochs"}.
RUN_RECORD = "rayrec-run.json"
# Ray names a trial's run after the trial, `<trainable>_<trial id>`; rayrec's trainable is
# rayrec.tune.trainable.train_trial.
TRIAL_RUN_NAME = "train_trial_{}"


def write_run_record(run_dir: str, run_id: str | None, group: str | None, epochs) -> None:
    """Mark a W&B run directory complete: wandb has flushed it, and it holds these epochs."""
    record = {"id": run_id, "group": group, "epochs": sorted(int(e) for e in epochs)}
    write_bytes(os.path.join(run_dir, RUN_RECORD), json.dumps(record).encode())  # atomic rename


def read_run_record(run_dir: str) -> dict[str, Any]:
    """A run directory's RUN_RECORD; {} when it has none (a run cut short, or not a trial's)."""
    try:
        with open(os.path.join(run_dir, RUN_RECORD)) as fh:
            record = json.load(fh)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def complete_trial_runs(plan: Any, result: Any, mode: str) -> list[str]:
    """Offline: every trial whose complete runs (those with a RUN_RECORD) miss some of its epochs
    is logged again, as one run holding its whole history. In the sweep's own W&B folder (not in
    $WANDB_DIR, which other sweeps share) that run replaces the trial's others, and the cut-short
    runs of the other trials go. Returns the ids of the trials logged again; never raises.

    A trial's logging actor dies with the driver. A driver killed mid-sweep leaves the runs of
    trials that Tune had recorded as finished cut short, or missing when the actor was still
    starting, and a resume does not run those trials again; a trial it resumes logs only the
    epochs after its checkpoint. The sweep's history holds every epoch of every trial.
    """
    history = getattr(result, "history", None)
    if mode != "offline" or history is None or not len(history) or "epoch" not in history:
        return []
    runs: dict[str, dict[str, set[int] | None]] = {}
    specs: list[dict[str, Any]] = []
    logged: dict[str, str] = {}
    try:
        runs = _trial_runs(os.path.join(wandb_dir(plan), "wandb"), plan.name)
        configs = _sampled_configs(result.trials)
        history = history[history["epoch"].notna()]
        for trial_id, rows in history.groupby("trial_id", sort=True):
            held = set().union(*(e for e in runs.get(str(trial_id), {}).values() if e is not None))
            if not {int(e) for e in rows["epoch"]} <= held:
                specs.append(_trial_run_spec(str(trial_id), rows, configs.get(str(trial_id), {})))
        if specs:
            init = {**_trial_run_settings(plan, mode), "project": project(), "group": plan.name}
            logged = _on_this_node(_log_trial_runs, (init, specs), f"logging {len(specs)} trial runs again")[1] or {}
    except Exception as exc:  # noqa: BLE001 - W&B must not fail the sweep
        log.warning("W&B: trial runs cut short not logged again (%s)", error_line(exc))
    if logged:
        log.info("W&B: runs of %d trials were cut short (a killed driver?); logged again from the sweep's history: %s",
                 len(logged), ", ".join(sorted(logged)))
    if not os.environ.get("WANDB_DIR"):
        import shutil

        unlogged = {spec["id"] for spec in specs} - set(logged)  # what their runs hold is all there is
        for trial_id in {str(t) for t in history["trial_id"]} - unlogged:
            new = logged.get(trial_id)
            for path, epochs in runs.get(trial_id, {}).items():
                # Logged again: that run replaces the trial's others. Else its complete runs hold
                # every epoch, and a cut-short one (maybe without even a transaction log) goes.
                superseded = os.path.realpath(path) != os.path.realpath(new) if new else epochs is None
                if superseded:
                    shutil.rmtree(path, ignore_errors=True)
    return sorted(logged)


def _trial_runs(folder: str, group: str) -> dict[str, dict[str, set[int] | None]]:
    """Run id -> {its offline run directory in `folder`: the epochs it holds, None when it was
    cut short (no RUN_RECORD of `group`)}."""
    found: dict[str, dict[str, set[int] | None]] = {}
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else []:
        parts = name.split("-", 3)  # offline-run-<YYYYMMDD_HHMMSS>-<run id>
        path = os.path.join(folder, name)
        if len(parts) < 4 or parts[:2] != ["offline", "run"] or os.path.islink(path) or not os.path.isdir(path):
            continue
        record = read_run_record(path)
        complete = record.get("id") == parts[3] and record.get("group") == group
        found.setdefault(parts[3], {})[path] = {int(e) for e in record.get("epochs") or []} if complete else None
    return found


def _sampled_configs(trials) -> dict[str, dict[str, Any]]:
    """Trial id -> its sampled config (trials.parquet's `config/` columns)."""
    from rayrec.storage import plain

    configs = {}
    for row in plain(trials.to_dict("records")) if trials is not None and "trial_id" in trials else []:
        configs[str(row["trial_id"])] = {k[len("config/"):]: v for k, v in row.items()
                                         if k.startswith("config/") and _finite_or_text(v)}
    return configs


def _trial_run_spec(trial_id: str, rows, config: dict[str, Any]) -> dict[str, Any]:
    """What `_log_trial_runs` logs for one trial: its run's id, name and config (with the keys
    Ray's logging actor puts there), and each epoch's numbers."""
    from rayrec.storage import plain

    to_config = set(_callback_class().AUTO_CONFIG_KEYS)
    records = [plain(r) for r in rows.sort_values("epoch").to_dict("records")]
    config = {**config, **{k: records[-1][k] for k in to_config if _finite_or_text(records[-1].get(k))}}
    history = [(int(r["epoch"]), {k: v for k, v in r.items() if k not in to_config and _finite_number(v)})
               for r in records]
    return {"id": trial_id, "name": TRIAL_RUN_NAME.format(trial_id), "config": config, "history": history}


def _finite_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _finite_or_text(v: Any) -> bool:
    return isinstance(v, str) or _finite_number(v)


def _log_trial_runs(init: dict[str, Any], specs: list[dict[str, Any]]) -> dict[str, str]:
    """Ray task: each spec (`_trial_run_spec`) as a new W&B run, every epoch at step = epoch,
    with its RUN_RECORD once flushed; returns {trial id: run directory}."""
    import wandb

    os.makedirs(init["dir"], exist_ok=True)
    logged: dict[str, tuple[str, list[int]]] = {}
    try:
        for spec in specs:
            run = wandb.init(**init, id=spec["id"], name=spec["name"], config=spec["config"])
            run_dir = os.path.dirname(run.dir)  # run.dir is the run's files/
            try:
                for epoch, metrics in spec["history"]:
                    run.log(metrics, step=epoch)
            finally:
                run.finish()
            logged[spec["id"]] = (run_dir, [epoch for epoch, _ in spec["history"]])
    finally:
        wandb.teardown()  # flush before this task returns (finish alone leaves it to process exit)
    for run_id, (run_dir, epochs) in logged.items():
        write_run_record(run_dir, run_id, init["group"], epochs)
    return {run_id: run_dir for run_id, (run_dir, _) in logged.items()}


def _bounded(fn, what: str, timeout: float | None = None):
    """fn() in a daemon thread; its result, or None (one warning) on error or after the timeout."""
    import threading

    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = fn()
        except BaseException as exc:  # noqa: BLE001
            out["error"] = exc

    worker = threading.Thread(target=target, name="rayrec-wandb", daemon=True)
    worker.start()
    worker.join(timeout or TIMEOUT_S)
    if worker.is_alive() or "error" in out:
        reason = error_line(out["error"]) if "error" in out else f"no answer within {timeout or TIMEOUT_S:.0f} s"
        log.warning("W&B: %s failed (%s); continuing without it", what, reason)
        return None
    return out.get("value")
