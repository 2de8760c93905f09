"""W&B tracking, tested offline and read back from wandb's own files (the run's .wandb log)."""

from __future__ import annotations

import glob
import json
import logging
import os
import shutil
import time

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY, tiny_space
from rayrec.cli import app
from rayrec.errors import UserError
from rayrec.tracking import RUN_RECORD, complete_trial_runs, read_run_record, sweep_callbacks, wandb_mode, wandb_sweep_config
from rayrec.tune.plan import plan_resume
from rayrec.tune.sweep import SweepOptions, plan_sweep, run_sweep
from wandb_offline import read_offline_run

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"


SPACE_PARAMS = {"train.lr": {"dist": "loguniform", "low": 1e-3, "high": 3e-2},
                "model.dropout": {"dist": "uniform", "low": 0.1, "high": 0.3}}


@pytest.fixture
def no_wandb_env(monkeypatch, tmp_path):
    for key in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))


def test_mode_defaults_to_online_with_a_key_and_offline_without(no_wandb_env, monkeypatch, caplog):
    with caplog.at_level(logging.WARNING, logger="rayrec.tracking"):
        assert wandb_mode(None) == "offline"
    assert len(caplog.records) == 1 and "no API key" in caplog.records[0].getMessage()
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    assert wandb_mode(None) == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode(None) == "off"
    assert wandb_mode("offline") == "offline"


def test_bad_wandb_options_exit_2_in_one_line(no_wandb_env, tmp_path):
    with pytest.raises(UserError, match="needs a W&B API key"):
        wandb_mode("online")
    for value, expected in (("bogus", "--wandb 'bogus' is not valid; valid: online, offline, off"),
                            ("online", "--wandb online needs a W&B API key")):
        result = CliRunner().invoke(app, ["sweep", "sasrec", "--space", tiny_space(tmp_path, SPACE_PARAMS), "--wandb", value,
                                          "--storage", str(tmp_path / "s"), "--max-epochs", "1", "--grace-period", "1"])
        assert result.exit_code == 2, result.output
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert lines == [f"error: {lines[0][7:]}"] and expected in lines[0]


def test_online_sweep_is_registered_once_as_a_wandb_sweep_and_runs_join_it(no_wandb_env, monkeypatch, tmp_path):
    """The W&B Sweeps view: rayrec registers the sweep (local controller) and passes its id to every run."""
    import wandb

    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    calls = []
    monkeypatch.setattr(wandb, "sweep", lambda config, project=None, entity=None: calls.append(config) or "sw3ep1d")
    plan = plan_sweep(SweepOptions(model="sasrec", space=tiny_space(tmp_path, SPACE_PARAMS), name="wb", storage=str(tmp_path / "s"),
                                   sets=list(TINY), search="hyperopt", scheduler="asha", wandb="online",
                                   max_epochs=4, grace_period=1))
    config = wandb_sweep_config(plan)
    assert config["controller"] == {"type": "local"} and config["method"] == "bayes"
    assert config["metric"] == {"name": "val_ndcg@10", "goal": "maximize"}
    assert config["parameters"]["train.lr"] == {"distribution": "log_uniform_values", "min": 1e-3, "max": 3e-2}
    assert config["parameters"]["model.dropout"]["distribution"] == "uniform"
    (callback,) = sweep_callbacks(plan)
    assert callback.kwargs["settings"] == {"sweep_id": "sw3ep1d"} and callback.kwargs["mode"] == "online"
    assert callback.group == "wb" and callback.log_config
    assert set(callback.kwargs["tags"]) == {"sasrec", "synthetic", "asha", "hyperopt"}
    # The API key is never stored on the callback (Ray pickles it into tuner.pkl).
    import ray.cloudpickle as cloudpickle

    assert FAKE_KEY.encode() not in cloudpickle.dumps(callback)
    sweep_callbacks(plan)  # a resume joins the recorded sweep instead of registering another
    assert len(calls) == 1
    assert yaml.safe_load(open(tmp_path / "s" / "wb" / "wandb_sweep.yaml"))["sweep_id"] == "sw3ep1d"


def test_a_logging_actor_takes_the_drivers_items_in_their_order():
    """Ray's queue actor is asynchronous: results the driver handed over without waiting can
    land out of order (wandb then drops a step below the run's) and after the END marker."""
    from rayrec.tracking import _InOrder

    class Landed:  # the driver's numbered items, in the order the queue actor ran its calls
        def __init__(self, items: list) -> None:
            self.items = items

        def get(self):
            return self.items.pop(0)

    queue = _InOrder(Landed([(2, "epoch 3"), (3, "end"), (0, "epoch 1"), (1, "epoch 2")]))
    assert [queue.get() for _ in range(4)] == ["epoch 1", "epoch 2", "epoch 3", "end"]


@pytest.mark.ray
def test_offline_sweep_logs_one_run_per_trial_and_a_summary_run(ray_session, no_wandb_env, monkeypatch, tmp_path):
    # A key in the driver's environment must not reach Ray's logs (Ray's own callback puts it in runtime_env).
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    result = run_sweep(SweepOptions(
        model="sasrec", space=tiny_space(tmp_path, SPACE_PARAMS), name="wbsweep", storage=str(tmp_path / "sweeps"), sets=list(TINY),
        search="random", scheduler="fifo", num_samples=2, max_epochs=2, cpus_per_trial=0.5, wandb="offline",
        verbose=0))
    history = result.history
    for trial_id, group in history.groupby("trial_id"):
        (run_dir,) = glob.glob(f"{result.experiment}/wandb/offline-run-*-{trial_id}")
        run = read_offline_run(run_dir)
        assert run["id"] == trial_id and run["group"] == "wbsweep" and run["job_type"] == "trial"
        assert set(run["tags"]) == {"sasrec", "synthetic", "fifo", "random"}
        sampled = result.trials.set_index("trial_id").loc[trial_id]
        assert run["config"]["train.lr"] == pytest.approx(sampled["config/train.lr"])
        assert run["config"]["model.dropout"] == pytest.approx(sampled["config/model.dropout"])
        assert run["config_updates"] >= 2, "config is not re-logged with every result (PBT mutations)"
        logged = {row["epoch"]: row for row in run["history"] if "epoch" in row}
        assert sorted(logged) == [1, 2]
        for _, row in group.iterrows():
            assert logged[row["epoch"]]["val_ndcg@10"] == pytest.approx(row["val_ndcg@10"])
            assert logged[row["epoch"]]["_step"] == row["training_iteration"]
        assert {"train_loss", "val_hr@10", "lr"} <= set(logged[2])
        assert not [k for k in logged[2] if k.startswith("test")]
        assert read_run_record(run_dir) == {"id": trial_id, "group": "wbsweep", "epochs": [1, 2]}  # flushed

    (summary_dir,) = glob.glob(f"{result.experiment}/wandb/offline-run-*-wbsweep-summary")
    summary = read_offline_run(summary_dir)
    best = result.best
    assert summary["group"] == "wbsweep" and summary["job_type"] == "summary"
    assert summary["config"]["train.lr"] == pytest.approx(best["config"]["train.lr"])
    assert summary["config"]["best_trial_id"] == best["trial_id"]
    assert summary["summary"]["best/val_ndcg@10"] == pytest.approx(best["value"])
    assert summary["summary"]["test/ndcg@10"] == pytest.approx(best["test"]["ndcg@10"])
    assert summary["summary"]["trial_count"] == 2 and summary["summary"]["status/finished"] == 2
    # The trials table (parallel coordinates of parameters against the metric): summary entry and file.
    assert summary["summary"]["trials/_type"] == "table-file"  # nested keys read back as "a/b"
    table = json.load(open(os.path.join(summary_dir, "files", summary["summary"]["trials/path"])))
    assert {"trial_id", "train.lr", "model.dropout", "best_val_ndcg@10"} <= set(table["columns"])
    assert len(table["data"]) == 2

    _check_runs_cut_short_are_logged_again(result, tmp_path)

    import ray

    session = ray._private.worker._global_node.get_session_dir_path()
    leaks = [p for p in glob.glob(f"{session}/logs/*") + glob.glob(f"{result.experiment}/**/*", recursive=True)
             if os.path.isfile(p) and FAKE_KEY.encode() in open(p, "rb").read()]
    assert not leaks, leaks


def _check_runs_cut_short_are_logged_again(result, tmp_path) -> None:
    """What a driver killed mid-sweep leaves (its logging actors die with it): one trial without
    a run (its actor was still starting), another whose run was never flushed (no RUN_RECORD).
    The driver that completes the sweep logs both again from the history, in their place."""
    history = result.history
    runs = {t: glob.glob(f"{result.experiment}/wandb/offline-run-*-{t}")[0] for t in sorted(set(history["trial_id"]))}
    names = {t: read_offline_run(d)["name"] for t, d in runs.items()}
    missing, unflushed = sorted(runs)
    shutil.rmtree(runs[missing])
    os.remove(os.path.join(runs[unflushed], RUN_RECORD))
    plan = plan_resume(SweepOptions(name="wbsweep", storage=str(tmp_path / "sweeps"), resume=True, wandb="offline"))
    assert complete_trial_runs(plan, result, "offline") == [missing, unflushed]
    for trial_id, group in history.groupby("trial_id"):
        (run_dir,) = glob.glob(f"{result.experiment}/wandb/offline-run-*-{trial_id}")  # in place of the old one
        run = read_offline_run(run_dir)
        assert (run["id"], run["name"], run["group"], run["job_type"]) == (trial_id, names[trial_id], "wbsweep", "trial")
        assert set(run["tags"]) == {"sasrec", "synthetic", "fifo", "random"}
        sampled = result.trials.set_index("trial_id").loc[trial_id]
        assert run["config"]["train.lr"] == pytest.approx(sampled["config/train.lr"])
        logged = {row["epoch"]: row for row in run["history"] if "epoch" in row}
        assert sorted(logged) == [1, 2]
        for _, row in group.iterrows():
            assert logged[row["epoch"]]["val_ndcg@10"] == pytest.approx(row["val_ndcg@10"])
            assert logged[row["epoch"]]["_step"] == row["epoch"]
        assert read_run_record(run_dir)["epochs"] == [1, 2]
    # A trial run again from scratch after the kill holds every epoch in its new run; what its
    # killed actor left (here: killed in wandb.init, before the run's log existed) goes.
    leftover = os.path.join(result.experiment, "wandb", f"offline-run-20000101_000000-{missing}")
    os.makedirs(os.path.join(leftover, "logs"))
    assert complete_trial_runs(plan, result, "offline") == []  # complete now: nothing logged again
    assert not os.path.exists(leftover)


@pytest.mark.ray
def test_a_failing_wandb_does_not_fail_the_sweep(ray_session, no_wandb_env, monkeypatch, tmp_path, caplog):
    """wandb.init raises in every logging actor (an invalid project name); the sweep completes regardless."""
    monkeypatch.setenv("WANDB_PROJECT", "not/a/valid/project")
    started = time.time()
    with caplog.at_level(logging.WARNING, logger="rayrec.tracking"):
        result = run_sweep(SweepOptions(
            model="sasrec", space=tiny_space(tmp_path, SPACE_PARAMS), name="wbfail", storage=str(tmp_path / "sweeps"),
            sets=list(TINY), search="random", scheduler="fifo", num_samples=2, max_epochs=2, cpus_per_trial=0.5,
            wandb="offline", verbose=0))
    assert len(result.trials) == 2 and (result.trials["status"] == "finished").all()
    assert "test" in result.best
    assert not glob.glob(f"{result.experiment}/**/offline-run-*", recursive=True)
    assert any("summary run not logged" in r.getMessage() for r in caplog.records)
    assert time.time() - started < 120
