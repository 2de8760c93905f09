"""Rating prediction: ratings through loading and splitting, the random k-fold split, RMSE and
MAE against hand-computed values, `mode: min` in early stopping and sweeps, the mean
baselines, and SVD++ (its SGD step against Koren's update rules; trained, swept and pruned
by ASHA on tiny synthetic data, beating the global mean)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import TINY_DATA, set_flags
from rayrec.cli import app
from rayrec.config import build_config
from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError
from rayrec.train.trainer import EarlyStopping, Trainer

runner = CliRunner()
CPU = {"train.device": "cpu", "train.num_threads": 1}


def rated_split() -> SplitData:
    """Three users, four items; ratings hand-picked for the expected figures below.

    train: u0 {1: 5, 2: 3}, u1 {1: 4}, u2 {3: 2, 4: 4}   mu = 18 / 5 = 3.6
    valid: u0 {3: 2}, u1 {2: 5}
    test:  u0 {4: 4}, u2 {1: 1}
    """
    def part(rows):
        users = [u for u, row in enumerate(rows) for _ in row]
        items = [i for row in rows for i, _ in row]
        ratings = [r for row in rows for _, r in row]
        return CSR.from_pairs(np.array(users, dtype=np.int64), np.array(items), 3, np.array(ratings, dtype=np.float32))

    train = part([[(1, 5), (2, 3)], [(1, 4)], [(3, 2), (4, 4)]])
    valid = part([[(3, 2)], [(2, 5)], []])
    test = part([[(4, 4)], [], [(1, 1)]])
    return SplitData("rated", 3, 4, train, valid, test, False, "fp")


# --- metrics --------------------------------------------------------------------------------


def test_rating_errors_skip_padding():
    from rayrec.train.metrics import rating_errors

    predicted = torch.tensor([[3.0, 4.0], [2.5, 9.0]])
    truth = torch.tensor([[5.0, 4.0], [1.0, 0.0]])
    real = torch.tensor([[True, True], [True, False]])  # user 1 has one rating; its second slot is padding
    errors = rating_errors(predicted, truth, real)
    assert errors["se"].tolist() == [4.0, 2.25] and errors["ae"].tolist() == [2.0, 1.5]
    assert errors["n"].tolist() == [2.0, 1.0]


@pytest.mark.parametrize("by, valid, test", [
    # global: predict mu = 3.6.  valid errors: 2 - 3.6, 5 - 3.6;  test: 4 - 3.6, 1 - 3.6
    ("global", (math.sqrt((1.6**2 + 1.4**2) / 2), (1.6 + 1.4) / 2), (math.sqrt((0.4**2 + 2.6**2) / 2), (0.4 + 2.6) / 2)),
    # user means: u0 4, u1 4, u2 3.  valid: 2 - 4, 5 - 4;  test: 4 - 4, 1 - 3
    ("user", (math.sqrt((4 + 1) / 2), 1.5), (math.sqrt(4 / 2), 1.0)),
    # item means: i1 4.5, i2 3, i3 2, i4 4.  valid: 2 - 2, 5 - 3;  test: 4 - 4, 1 - 4.5
    ("item", (math.sqrt(4 / 2), 1.0), (math.sqrt(3.5**2 / 2), 3.5 / 2)),
])
def test_rmse_and_mae_of_the_mean_baselines_match_hand_computed_values(by, valid, test):
    data = rated_split()
    trainer = Trainer(build_config("mean", overrides={**CPU, "model.by": by}), data)
    fit = trainer.fit()
    assert fit.epochs_run == 1 and fit.selection == "best val_rmse"
    assert (fit.best_metrics["val_rmse"], fit.best_metrics["val_mae"]) == pytest.approx(valid, abs=1e-6)
    metrics = trainer.test()
    assert (metrics["rmse"], metrics["mae"]) == pytest.approx(test, abs=1e-6)
    assert metrics["n_ratings"] == 2 and metrics["n_users"] == 2


def test_predictions_are_clamped_to_the_training_rating_range():
    data = rated_split()
    model = Trainer(build_config("svdpp", overrides=CPU), data).model
    with torch.no_grad():
        model.item_bias[1] = 10.0
        model.item_bias[2] = -10.0
        scores = model.score(model_inputs(model, data.train, np.arange(3)))
    assert scores[:, 1].tolist() == [5.0] * 3 and scores[:, 2].tolist() == [2.0] * 3  # training ratings span 2..5


def model_inputs(model, history, users):
    from rayrec.train.evaluate import batch_to_device

    return batch_to_device(model.eval_inputs(history, users), "cpu")


# --- data -----------------------------------------------------------------------------------


def test_ratings_survive_reading_splitting_and_the_cache(tmp_path):
    from rayrec.data import load_split

    table = tmp_path / "ratings.csv"
    rows = [(u, i, (u * 7 + i) % 5 + 1) for u in range(20) for i in range(1, 9)]
    table.write_text("user,item,rating\n" + "".join(f"{u},{i},{r}\n" for u, i, r in rows))
    truth = {(u, i): r for u, i, r in rows}
    cfg = build_config("svdpp", overrides={"data.name": str(table), "data.format": "csv",
                                           "data.cache_dir": str(tmp_path / "cache")})
    for attempt in ("built", "cached"):
        split = load_split(cfg.data)
        assert split.has_ratings, attempt
        for part in (split.train, split.valid, split.test):
            # Item ids are re-indexed 1..8 from raw ids 1..8 and users 0..19 from 0..19: unchanged.
            got = {(u, i): r for u, i, r in zip(part.rows(), part.items, part.ratings)}
            assert all(truth[key] == value for key, value in got.items()), attempt


def test_random_split_folds_partition_every_rating_and_are_reproducible():
    from rayrec.data.preprocess import Interactions
    from rayrec.data.splits import TEST, TRAIN, VALID, random_split

    n = 103
    data = Interactions(user=np.arange(n) % 7, item=np.arange(n) % 11 + 1, timestamp=None, n_users=7, n_items=11)
    parts = [random_split(data, False, seed=3, valid_ratio=0.1, test_ratio=0.2, folds=5, fold=f)[0] for f in range(5)]
    test = np.stack([p == TEST for p in parts])
    assert (test.sum(0) == 1).all()  # every rating is in exactly one test fold
    assert sorted(test.sum(1).tolist()) == [20, 20, 21, 21, 21]  # np.array_split's fold sizes
    for p in parts:
        assert (p == VALID).sum() == 10 and (p == TRAIN).sum() == n - 10 - (p == TEST).sum()
    again = random_split(data, False, seed=3, valid_ratio=0.1, test_ratio=0.2, folds=5, fold=2)[0]
    assert (again == parts[2]).all()
    other = random_split(data, False, seed=4, valid_ratio=0.1, test_ratio=0.2, folds=5, fold=2)[0]
    assert not (other == parts[2]).all()
    single = random_split(data, False, seed=3, valid_ratio=0.1, test_ratio=0.2)[0]  # folds = 1: the ratios
    assert ((single == TEST).sum(), (single == VALID).sum()) == (21, 10)


def test_fold_settings_are_checked():
    with pytest.raises(UserError, match="data.folds=5 is not valid; valid: 1, or k >= 2 with data.split=random"):
        build_config("sasrec", overrides={"data.folds": 5})
    with pytest.raises(UserError, match=r"data.fold=5 is not valid; valid: 0 .. 4 \(data.folds=5\)"):
        build_config("svdpp", overrides={"data.fold": 5})
    cfg = build_config("svdpp")
    assert (cfg.data.split, cfg.data.folds, cfg.data.fold, cfg.data.user_core) == ("random", 5, 0, 0)
    assert (cfg.train.metric, build_config("mean").train.metric) == ("rmse", "rmse")


# --- mode min -------------------------------------------------------------------------------


def test_early_stopping_under_mode_min_keeps_the_lowest_error():
    stopper = EarlyStopping(patience=2, min_delta=0.0, mode="min")
    improved = [stopper.update(v, e) for e, v in enumerate([1.0, 0.9, 0.95, 0.8, 0.85, 0.81], start=1)]
    assert improved == [True, True, False, True, False, False]
    assert (stopper.best, stopper.best_epoch, stopper.should_stop) == (0.8, 4, True)


def test_sweep_mode_follows_the_metric_and_a_contradiction_is_refused():
    from rayrec.tune.settings import SweepSettings
    from rayrec.tune.space import load_space

    space = load_space("svdpp")
    assert SweepSettings.resolve(space, None, {}).mode == "min"
    space.sweep.pop("mode")  # unsaid: derived from the metric
    assert SweepSettings.resolve(space, None, {}).mode == "min"
    with pytest.raises(UserError, match="sweep mode 'max' does not suit metric rmse; valid: mode min"):
        SweepSettings.resolve(space, None, {"mode": "max"})


# --- SVD++ ----------------------------------------------------------------------------------


def test_one_svdpp_sgd_step_is_korens_update():
    data = rated_split()
    lr, reg = 0.05, 0.1
    trainer = Trainer(build_config("svdpp", overrides={**CPU, "model.factors": 3, "model.reg": reg, "train.lr": lr}),
                      data)
    model = trainer.model
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    # One rating: user 0 rated item 2 with 3; N(0) = {1, 2}.
    batch = {"users": np.array([0]), "inverse": np.array([0]), "items": np.array([2]),
             "ratings": np.array([3.0], dtype=np.float32)}
    batch["bag"], batch["offsets"], batch["owner"] = np.array([1, 2]), np.array([0]), np.array([0, 0])
    from rayrec.train.evaluate import batch_to_device

    trainer._step(batch_to_device(batch, "cpu"))
    bu, bi, p, q, y = (before[k] for k in ("user_bias", "item_bias", "p", "q", "y"))
    norm = 2 ** -0.5
    implicit = norm * (y[1] + y[2])
    err = 3.0 - (3.6 + bu[0] + bi[2] + q[2] @ (p[0] + implicit))
    expected = {  # Koren (2008) / Surprise's SVDpp, one rating
        ("user_bias", 0): bu[0] + lr * (err - reg * bu[0]),
        ("item_bias", 2): bi[2] + lr * (err - reg * bi[2]),
        ("p", 0): p[0] + lr * (err * q[2] - reg * p[0]),
        ("q", 2): q[2] + lr * (err * (p[0] + implicit) - reg * q[2]),
        ("y", 1): y[1] + lr * (err * norm * q[2] - reg * y[1]),
        ("y", 2): y[2] + lr * (err * norm * q[2] - reg * y[2]),
    }
    after = dict(model.named_parameters())
    for (name, row), value in expected.items():
        assert torch.allclose(after[name][row], value, atol=1e-6), name
    assert torch.equal(after["q"][1], q[1]) and torch.equal(after["y"][3], y[3])  # untouched rows stay


def test_svdpp_without_implicit_terms_is_biased_mf():
    data = rated_split()
    model = Trainer(build_config("svdpp", overrides={**CPU, "model.implicit": False}), data).model
    scores = model.score(model_inputs(model, data.train, np.arange(3)))
    expected = (3.6 + model.user_bias[:, None] + model.item_bias[None, :] + model.p @ model.q.T).clamp(2, 5)
    assert torch.allclose(scores, expected)


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


RATING_TINY = [*TINY_DATA, "train.eval_batch_size=256"]


def test_svdpp_trains_through_rayrec_train_and_beats_the_global_mean(tmp_path):
    results = {}
    for model, extra in (("mean", ["model.by=global"]), ("mean", ["model.by=user"]), ("svdpp", ["train.epochs=30"])):
        out = tmp_path / f"{model}-{len(results)}"
        result = run("train", model, "--output", out, "--no-progress", *set_flags([*RATING_TINY, *extra]))
        assert result.exit_code == 0, result.output
        assert "rmse" in result.output and "mae" in result.output
        summary = yaml.safe_load((out / "summary.yaml").read_text())
        assert summary["selection"] == "best val_rmse" and summary["test"]["n_ratings"] > 0
        results[extra[0]] = summary
    fingerprints = {s["fingerprint"] for s in results.values()}
    assert len(fingerprints) == 1  # one split for the baselines and the model
    glob, user, svdpp = (results[k] for k in ("model.by=global", "model.by=user", "train.epochs=30"))
    assert svdpp["test"]["rmse"] < 0.9 * glob["test"]["rmse"], (svdpp["test"], glob["test"])
    assert svdpp["test"]["rmse"] < user["test"]["rmse"] and svdpp["valid"]["rmse"] < glob["valid"]["rmse"]
    assert svdpp["best_epoch"] > 1


@pytest.mark.ray
def test_svdpp_and_mean_sweep_through_rayrec_sweep_with_their_shipped_spaces(ray_session, tmp_path):
    from rayrec.storage import read_parquet

    for model in ("svdpp", "mean"):
        storage = tmp_path / model
        result = run("sweep", model, "--name", "smoke", "--storage", storage, "--stage", "smoke", "--cpus-per-trial", 0.5,
                     "--wandb", "off", "--verbose", 0, *set_flags(RATING_TINY))
        assert result.exit_code == 0, result.output
        trials = read_parquet(str(storage / "smoke" / "trials.parquet"))
        # The smoke stage runs ASHA: a trial may be pruned, none may fail.
        assert trials["status"].isin(["finished", "pruned"]).all() and len(trials) == (2 if model == "svdpp" else 3)
        summary = yaml.safe_load((storage / "smoke" / "summary.yaml").read_text())
        assert summary["best"]["metric"] == "val_rmse" and summary["mode"] == "min"
        # The best trial is the lowest RMSE.
        assert summary["best"]["value"] == pytest.approx(trials["best_val_rmse"].min())
        assert "rmse" in summary["best"]["test"]


@pytest.mark.ray
def test_svdpp_sweep_minimises_rmse_asha_prunes_and_its_best_yaml_reproduces(ray_session, tmp_path):
    from rayrec.config import config_from_dict, load_yaml
    from rayrec.data import load_split
    from rayrec.storage import read_parquet
    from rayrec.train.run import train_run
    from rayrec.tune.sweep import SweepOptions, run_sweep

    # A long patience keeps early stopping out of the way, so only ASHA ends trials early.
    sets = [*RATING_TINY, "model.factors=8", "train.patience=50"]
    data = load_split(build_config("svdpp", overrides=dict(s.split("=") for s in TINY_DATA)).data)
    result = run_sweep(SweepOptions(model="svdpp", storage=str(tmp_path / "sweeps"), name="asha", sets=sets, wandb="off",
                                    cpus_per_trial=0.5, verbose=0, search="random", scheduler="asha", num_samples=9,
                                    max_epochs=6, grace_period=1, reduction_factor=3, seed=3), data=data)
    assert result.mode == "min"
    history = read_parquet(os.path.join(result.experiment, "history.parquet"))
    epochs = history.groupby("trial_id")["epoch"].max()
    assert len(epochs) == 9 and (epochs < 6).any() and (epochs == 6).any(), epochs.to_dict()
    # Under mode min the best trial has the lowest validation RMSE of all.
    assert result.best["value"] == pytest.approx(history["val_rmse"].min())
    summary = yaml.safe_load(open(os.path.join(result.experiment, "summary.yaml")))
    assert summary["best"]["value"] == pytest.approx(result.best["value"])
    # `rayrec train --config best.yaml` repeats the best trial exactly.
    cfg = config_from_dict(load_yaml(os.path.join(result.experiment, "best.yaml")))
    run_ = train_run(cfg, data, output=str(tmp_path / "retrain"))
    assert run_.fit.best_metrics["val_rmse"] == pytest.approx(result.best["value"], abs=1e-6)
    assert result.best["test"]["rmse"] == pytest.approx(run_.test_metrics["rmse"], abs=1e-6)
