"""`rayrec compare`: equal-budget sweeps, multi-seed retraining, test once, paired statistics.

The end-to-end test runs the real chain on tiny synthetic data in the shared Ray session;
the others check the planning rules without Ray.
"""

from __future__ import annotations

import glob
import os

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY_DATA, set_flags
from rayrec.cli import app
from rayrec.errors import UserError
from rayrec.tune.compare import model_overrides, shared_split_problem

TINY_MODELS = ["--set", "sasrec:model.hidden=16", "--set", "sasrec:model.max_len=16", "--set", "sasrec:model.blocks=1",
               "--set", "gru4rec:model.hidden=16", "--set", "gru4rec:model.max_len=16"]


def test_compare_sasrec_gru4rec_pop_end_to_end(ray_session, tmp_path, monkeypatch):
    from rayrec.config import build_config, parse_overrides
    from rayrec.data import load_split

    monkeypatch.chdir(tmp_path)
    storage = tmp_path / "sweeps"
    args = ["compare", "sasrec", "gru4rec", "--name", "cmp", "--storage", str(storage), "--stage", "smoke",
            "--trials", "2", "--max-epochs", "1", "--seeds", "2", "--wandb", "offline", "--set", "train.patience=1",
            *set_flags(TINY_DATA), *TINY_MODELS]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "leader (chosen on validation)" in result.output
    root = storage / "cmp"
    frame = pd.read_parquet(root / "compare.parquet")
    runs, models = frame[frame["row"] == "run"], frame[frame["row"] == "model"]
    assert sorted(runs["model"].unique()) == ["gru4rec", "pop", "sasrec"] and len(runs) == 6
    assert len(models) == 3 and models["leader"].sum() == 1
    # Test was evaluated exactly once per retrained run (the trainer's own count, in the worker) ...
    assert (runs["test_evaluations"] == 1).all() and (runs["test_sections"] == 1).all()
    # ... and never by the searches: every sweep ran without its test look.
    for model in ("sasrec", "gru4rec"):
        summary = yaml.safe_load((root / "sweeps" / model / "summary.yaml").read_text())
        assert summary["status"] == "complete" and summary["trials"] == 2
        assert not any(k.startswith("test") for k in summary["best"]), summary["best"]
    # Per-user rows: one per evaluated user, per split, per run.
    data = load_split(build_config("sasrec", {}, parse_overrides(TINY_DATA)).data)
    n_valid, n_test = len(data.eval_users("valid")), len(data.eval_users("test"))
    users = pd.read_parquet(root / "compare_per_user.parquet")
    for (model, seed), group in users.groupby(["model", "seed"]):
        assert (group["split"] == "valid").sum() == n_valid and (group["split"] == "test").sum() == n_test, (model, seed)
        assert group.loc[group["split"] == "test", "user"].is_unique
    # Seed means and per-user means agree: the statistics read the same runs the table shows.
    test_means = runs.groupby("model")["test_ndcg@10"].mean()
    per_user_means = users[users["split"] == "test"].groupby("model")["ndcg@10"].mean()
    assert test_means.to_dict() == pytest.approx(per_user_means.to_dict(), abs=1e-5)
    others = models[~models["leader"].astype(bool)]
    assert others["wilcoxon_p_holm"].between(0, 1).all() and (others["wilcoxon_p_holm"] >= others["wilcoxon_p"]).all()
    assert (models["ci_low"] <= models["ci_high"]).all()
    # Cost columns from the trials' own reports.
    tuned = models.set_index("model").loc[["sasrec", "gru4rec"]]
    assert (tuned["tune_trials"] == 2).all() and (tuned["tune_peak_rss_mb"] > 50).all()
    assert (tuned["tune_trial_seconds"] > 0).all() and (tuned["tune_wall_seconds"] > 0).all()
    assert models.set_index("model").loc["pop", "tune_trials"] == 0 and (runs["peak_rss_mb"] > 50).all()
    tuning = pd.read_parquet(root / "tuning.parquet")
    assert set(tuning["model"]) == {"sasrec", "gru4rec"}
    report = root / "report"
    assert {"index.html", "leaderboard.png", "pvalues.png", "tuning_curves.png"} <= set(os.listdir(report))
    record = yaml.safe_load((root / "compare.yaml").read_text())
    assert record["status"] == "complete" and record["leader"] in ("sasrec", "gru4rec", "pop")
    assert set(record["test_evaluations"].values()) == {1}
    # W&B (offline): the leaderboard run in the comparison's group, and the sweeps' runs tagged with it.
    assert record["wandb_run"] == "cmp-leaderboard"
    from wandb_offline import read_offline_run

    (run_dir,) = glob.glob(str(root / "wandb" / "offline-run-*-cmp-leaderboard"))
    run = read_offline_run(run_dir)
    assert run["group"] == "cmp" and run["name"] == "leaderboard" and "compare" in run["tags"]
    assert run["summary"]["leader"] == record["leader"]
    assert run["summary"]["leaderboard/_type"] == "table-file"  # the table, as W&B stores it (nested key "a/b")
    sweep_spec = yaml.safe_load((root / "sweeps" / "sasrec" / "sweep.yaml").read_text())
    assert sweep_spec["options"]["tags"] == ["compare", "cmp"]

    # A resume of a complete comparison reruns and rewrites nothing (the test lock holds).
    before = {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "wandb" not in p.parts}
    again = CliRunner().invoke(app, ["compare", "--resume", "--name", "cmp", "--storage", str(storage)])
    assert again.exit_code == 0, again.output
    assert "already complete" in again.output
    assert before == {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file() and "wandb" not in p.parts}


def test_set_items_apply_to_all_models_or_to_one():
    sets = model_overrides(["sasrec", "pop"], ["train.lr=0.01", "sasrec:model.hidden=16"])
    assert sets == {"sasrec": {"train.lr": 0.01, "model.hidden": 16}, "pop": {"train.lr": 0.01}}
    with pytest.raises(UserError, match="names model 'gru4rec', which is not compared"):
        model_overrides(["sasrec"], ["gru4rec:model.hidden=16"])


def test_models_of_another_task_or_split_cannot_share_one():
    loo = {"split": "loo", "name": "synthetic"}
    # A rating model (the registry's `task`) beside ranking models: refused whatever the split.
    problem = shared_split_problem({"sasrec": "ranking", "svdpp": "rating"}, {"sasrec": loo, "svdpp": loo})
    assert problem.startswith("models that cannot share a split: 'sasrec' is a ranking model, 'svdpp' a rating model")
    problem = shared_split_problem({"sasrec": "ranking", "lightgcn": "ranking"},
                                   {"sasrec": loo, "lightgcn": {**loo, "split": "ratio"}})
    assert "data.split=loo" in problem and "data.split=ratio" in problem
    assert shared_split_problem({"sasrec": "ranking", "pop": "ranking"}, {"sasrec": loo, "pop": dict(loo)}) is None


def test_finish_ranks_tests_and_reports_from_run_records(tmp_path):
    """The last step alone, without Ray or training: hand-made run records and a hand-made sweep."""
    import numpy as np

    from conftest import ten_trials, write_sweep
    from rayrec.tune.compare import COMPARE_FILE, CompareOptions, ComparePlan, finish, leaderboard_text, run_url

    root = tmp_path / "cmp"
    sweep = write_sweep(root / "sweeps", ten_trials(), name="sasrec")
    history = pd.read_parquet(os.path.join(sweep, "history.parquet"))
    history = history.assign(reported_at=1000.0 + np.arange(len(history)), trial_started=1000.0, epoch_seconds=1.0,
                             peak_rss_mb=300.0)
    history.to_parquet(os.path.join(sweep, "history.parquet"))
    opts = CompareOptions(models=["sasrec"], seeds=2, wandb="off", bootstrap_resamples=200)
    plan = ComparePlan(options=opts, models=["sasrec", "pop"], name="cmp", experiment=str(root),
                       tuned={"sasrec": sweep}, untuned=["pop"], model_sets={}, data_config={}, budget={})
    (root / COMPARE_FILE).write_text("status: running\n")
    rng = np.random.default_rng(0)
    os.makedirs(root / "runs")
    for model, shift in (("sasrec", 0.1), ("pop", 0.0)):
        for seed in (42, 43):
            values = np.clip(rng.uniform(0, 0.5, 50) + shift, 0, 1)
            pd.DataFrame({"model": model, "seed": seed, "split": ["valid"] * 50 + ["test"] * 50,
                          "user": list(range(50)) * 2, "ndcg@10": np.r_[values, values]}).to_parquet(
                run_url(plan, model, seed, "parquet"))
            with open(run_url(plan, model, seed, "yaml"), "w") as fh:
                yaml.safe_dump({"model": model, "seed": seed, "val_ndcg@10": float(values.mean()),
                                "test_ndcg@10": float(values.mean()), "seconds": 2.0, "test_evaluations": 1,
                                "peak_rss_mb": 400.0, "peak_gpu_mb": float("nan")}, fh)
    result = finish(plan, None)
    table = result.table.set_index("model")
    assert table.loc["sasrec", "leader"] and table.loc["pop", "significant"]
    assert table.loc["sasrec", "tune_trials"] == 10 and table.loc["sasrec", "tune_wall_seconds"] == 39.0
    assert table.loc["pop", "tune_trials"] == 0
    text = leaderboard_text(result)
    assert "leader (chosen on validation)" in text and "significantly behind" in text
    assert {"index.html", "leaderboard.png", "pvalues.png", "tuning_curves.png"} <= set(os.listdir(root / "report"))
    curve = pd.read_parquet(root / "tuning.parquet")
    assert list(curve["trial_index"]) == list(range(1, 11)) and curve["best"].is_monotonic_increasing
    assert yaml.safe_load((root / COMPARE_FILE).read_text())["status"] == "complete"
