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

W&B never fails or hangs a sweep: setup, logging and finishing errors become one warning;
a logging actor whose `wandb.init` fails drains its queue and ends with its trial; the wait
for uploads at the end is bounded (RAYREC_WANDB_TIMEOUT_S, default 60 s) and so is the
summary run. The API key reaches the logging actors as an actor argument (in memory), not
through Ray's runtime_env as Ray's callback does, because Ray writes runtime_env values
into runtime_env_agent.log; it is never stored on the callback, which Ray pickles into the
experiment directory (tuner.pkl).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from typing import Any

from rayrec.storage import error_line

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
        """Ray's logging actor; a failed wandb.init drains the trial's queue instead of failing."""

        def __init__(self, *args, _rayrec_api_key: str | None = None, **kwargs):
            if _rayrec_api_key:
                os.environ["WANDB_API_KEY"] = _rayrec_api_key
            super().__init__(*args, **kwargs)

        def run(self):
            try:
                super().run()
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
                    pass

    class _SafeWandbCallback(WandbLoggerCallback):
        _logger_actor_cls = _SafeWandbActor

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._failed = False

        def setup(self, *args, **kwargs):
            # Ray's setup checks for an API key even offline unless WANDB_MODE is set in the
            # environment; rayrec checked the key already (wandb_mode).
            self.api_key_file = None

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
            super()._start_logging_actor(trial, exclude_results, **wandb_init_kwargs)

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
            # seconds while a new trial's actors start ("on_trial_result took 1.3 s"). The
            # actor takes calls from this driver in order, so submitting without waiting keeps
            # the order and the END marker (sent with a waiting put) still comes last.
            if self._failed:
                return
            try:
                if trial not in self._trial_logging_actors:
                    self.log_trial_start(trial)
                if trial not in self._trial_queues:
                    return  # log_trial_start failed and said so
                result = _clean_log(result, video_kwargs=self.video_kwargs, image_kwargs=self.image_kwargs)
                self._trial_queues[trial].actor.put.remote((_QueueItem.RESULT, result), None)
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
    wandb's process-wide state never touches the driver. Then the sweep's offline files are
    copied next to its results (`<experiment>/wandb/`) when those live in object storage.
    Returns the summary run id, or None.
    """
    try:
        mode = wandb_mode(plan.options.wandb)
    except Exception:  # noqa: BLE001 - validated before the sweep already
        return None
    if mode == "off":
        return None
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
    import ray
    from ray.air.util.node import _force_on_current_node

    task = ray.remote(num_cpus=0, max_retries=0, **_force_on_current_node())(_summary_run)
    ref = task.remote(init, summary, table, api_key, table_key)
    done, _ = ray.wait([ref], timeout=TIMEOUT_S)
    if not done:
        ray.cancel(ref, force=True)
        log.warning("W&B: %s run did not finish within %.0f s; abandoned", "summary" if table_key == "trials"
                    else table_key, TIMEOUT_S)
        return False
    ray.get(ref)
    return True


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
