"""The whole workflow on a tiny real sweep (shared Ray instance): sweep -> narrow -> confirm
over seeds -> final test, locked -> report."""

from __future__ import annotations

import os
import re

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

import conftest
from conftest import assert_user_error
from rayrec.cli import app
from rayrec.tune.sweep import SweepOptions, run_sweep

pytestmark = pytest.mark.ray

TINY = [
    *conftest.TINY,
    "train.train_eval_users=40",  # logs train_* metrics: the diagnostics' train/validation gap
]
SPACE = {
    "model": "sasrec",
    "stages": {"quick": {"num_samples": 6, "max_epochs": 2}, "medium": {"num_samples": 4, "max_epochs": 3}},
    "params": {
        "train.lr": {"dist": "loguniform", "low": 1e-4, "high": 3e-2},
        "model.dropout": {"dist": "uniform", "low": 0.1, "high": 0.5},
        "model.loss": {"dist": "choice", "values": ["ce", "bce"]},
    },
}
runner = CliRunner()


def invoke(*args: str):
    result = runner.invoke(app, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_sweep_narrow_confirm_final_report(ray_session, tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    storage = str(tmp_path / "sweeps")
    result = run_sweep(SweepOptions(model="sasrec", name="quick", space=str(space), stage="quick", sets=list(TINY),
                                    search="random", scheduler="fifo", num_samples=6, max_epochs=2, wandb="off",
                                    cpus_per_trial=0.5, storage=storage, verbose=0, evaluate_test=False))
    sweep = result.experiment
    assert (result.trials["status"] == "finished").sum() == 6

    out = invoke("narrow", "quick", "--storage", storage)
    assert "importance not computed: 6 completed trials" in out  # said, not made up
    next_space = yaml.safe_load(open(os.path.join(sweep, "next_space.yaml")))
    assert next_space["sweep"]["num_samples"] == 4 and set(next_space["params"]) <= set(SPACE["params"])
    assert os.path.exists(os.path.join(sweep, "robust.yaml"))

    out = invoke("confirm", sweep, "--top", "2", "--seeds", "2", "--cpus-per-trial", "0.5")
    runs = pd.read_parquet(os.path.join(sweep, "confirm.parquet"))
    assert len(runs) == 4 and runs["error"].eq("").all()
    assert sorted(runs.groupby("candidate")["seed"].apply(list).tolist()) == [[42, 43], [42, 43]]
    summary = yaml.safe_load(open(os.path.join(sweep, "confirm.yaml")))
    top = summary["configs"][0]
    assert top["candidate"] == "rank1" and top["n"] == 2
    # Same seed, same config, same trainer: the retrained figure matches the tuning-time one (§2).
    same_seed = runs[(runs["candidate"] == "rank1") & runs["tuning_seed"]]["val_ndcg@10"].iloc[0]
    assert same_seed == pytest.approx(top["tuning_value"], abs=1e-6)
    assert "rank1" in out and "mean" in out
    # Per-user validation rows of every confirmation run: their mean is the run's figure.
    per_user = pd.read_parquet(os.path.join(sweep, "confirm_per_user.parquet"))
    means = per_user.groupby(["candidate", "seed"])["ndcg@10"].mean()
    for _, run in runs.iterrows():
        assert means[(run["candidate"], run["seed"])] == pytest.approx(run["val_ndcg@10"], abs=1e-6)

    out = invoke("final", sweep)
    first = yaml.safe_load(open(os.path.join(sweep, "final.yaml")))
    assert first["forced"] is False and first["final_history"] == [] and "ndcg@10" in first["test"]
    assert os.path.exists(os.path.join(sweep, "final", "checkpoint.pt"))
    final_users = pd.read_parquet(os.path.join(sweep, "final", "per_user.parquet"))  # final keeps per-user test rows
    test_rows = final_users[final_users["split"] == "test"]
    assert len(test_rows) == first["test"]["n_users"]
    assert test_rows["ndcg@10"].mean() == pytest.approx(first["test"]["ndcg@10"], abs=1e-6)
    # The test set is locked: a second evaluation needs --force and is recorded as such.
    line = assert_user_error(runner.invoke(app, ["final", sweep, "--config", "robust"]))
    assert "already evaluated on test" in line and "--force" in line
    invoke("final", sweep, "--config", "robust", "--train-on-valid", "--force")
    record = yaml.safe_load(open(os.path.join(sweep, "final.yaml")))
    assert record["test"] == first["test"] and record["timestamp"] == first["timestamp"]  # the first is kept
    [forced] = record["final_history"]
    assert forced["forced"] is True and forced["config_name"] == "robust" and forced["train_on_valid"] is True
    assert forced["valid"] is None and 1 <= forced["epochs"] <= 2
    assert os.path.exists(os.path.join(sweep, "final-2", "checkpoint.pt"))

    invoke("report", sweep)
    html = open(os.path.join(sweep, "report", "index.html")).read()
    sources = re.findall(r"<img src='([^']+)'", html)
    assert {"learning_curves.png", "rung_survival.png", "parallel_coordinates.png", "confirmation.png"} <= set(sources)
    for name in sources:
        data = open(os.path.join(sweep, "report", name), "rb").read()
        assert data.startswith(b"\x89PNG") and len(data) > 5000
    diagnostics = pd.read_parquet(os.path.join(sweep, "report", "diagnostics.parquet"))
    assert diagnostics["train_val_gap"].notna().all()  # train_* metrics were logged
