"""EASE, SLIM and ALS: models of the user-item matrix that fit themselves (RecModel.fits_itself).

Their maths against hand-computed closed forms on tiny matrices, the trainer's contract for
them (one report for a closed form, one per iteration otherwise, early stopping, ASHA
pruning, best.yaml parity), and EASE's refusal of a catalogue too large for memory.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import yaml
from typer.testing import CliRunner

from conftest import TINY_DATA, assert_user_error, set_flags
from rayrec.cli import app
from rayrec.config import build_config
from rayrec.data.batches import interaction_matrix, item_sets
from rayrec.data.types import CSR, SplitData
from rayrec.train.trainer import Trainer

runner = CliRunner()
CPU = {"train.device": "cpu", "train.num_threads": 1}


def tiny_split(rows: list[list[int]], n_items: int) -> SplitData:
    """Training rows as given; every user's validation and test target is item 1 (unused here)."""
    one = CSR.from_lists([[1]] * len(rows))
    return SplitData("tiny", len(rows), n_items, CSR.from_lists(rows), one, one, False, "fp")


ROWS = [[1, 2, 3], [2, 3, 4], [1, 3, 5], [4, 5], [1, 2, 5, 3], [2, 4]]


def dense(rows: list[list[int]], n_items: int) -> np.ndarray:
    x = np.zeros((len(rows), n_items))
    for u, row in enumerate(rows):
        x[u, np.asarray(row, dtype=np.int64) - 1] = 1.0
    return x


def fitted(model: str, data: SplitData, epochs: int = 1, **overrides):
    cfg = build_config(model, overrides={**CPU, "train.epochs": epochs, **overrides})
    trainer = Trainer(cfg, data)
    losses = [trainer.model.fit_epoch(data, e, np.random.default_rng(e)) for e in range(epochs)]
    return trainer.model, losses


# --- inputs -------------------------------------------------------------------------------


def test_histories_are_item_sets_and_the_matrix_is_binary():
    rows = CSR.from_lists([[3, 1, 3, 2], [], [5, 5], [4]])
    assert item_sets(rows, np.arange(4)).tolist() == [[1, 2, 3], [0, 0, 0], [5, 0, 0], [4, 0, 0]]
    assert item_sets(rows, np.array([2])).tolist() == [[5]]
    assert interaction_matrix(rows, 5).toarray().tolist() == dense([[1, 2, 3], [], [5], [4]], 5).tolist()


# --- EASE ---------------------------------------------------------------------------------


def test_ease_weights_match_the_closed_form_with_a_zero_diagonal():
    lam = 2.0
    model, (loss,) = fitted("ease", tiny_split(ROWS, 5), **{"model.l2_reg": lam})
    x = dense(ROWS, 5)
    p = np.linalg.inv(x.T @ x + lam * np.eye(5))
    b = -p / np.diag(p)[None, :]  # B_ij = -P_ij / P_jj
    np.fill_diagonal(b, 0.0)
    weights = model.weights.double().numpy()
    assert np.allclose(weights[1:, 1:], b, atol=1e-6)
    assert not weights[0].any() and not weights[:, 0].any()  # padding row and column stay zero
    # The reported loss is the objective at the optimum, per user.
    objective = ((x - x @ b) ** 2).sum() + lam * (b**2).sum()
    assert loss == pytest.approx(objective / len(ROWS), rel=1e-9)
    # Scores are the history row times B, whatever the order or repeats of the history.
    scores = model.score({"items": torch.tensor([[3, 1, 0], [4, 4, 0]])}).double().numpy()
    assert np.allclose(scores[0, 1:], (x[0] - np.eye(5)[1]) @ b, atol=1e-6)  # history {1, 3}
    assert np.allclose(scores[1, 1:], b[3], atol=1e-6)  # history {4}


def test_ease_is_one_report_whatever_the_epoch_budget():
    cfg = build_config("ease", overrides={**CPU, "train.epochs": 5, **dict(s.split("=") for s in TINY_DATA)})
    from rayrec.data import load_split

    trainer = Trainer(cfg, load_split(cfg.data))
    reports = []
    fit = trainer.fit(on_epoch=lambda tr, rec: reports.append(rec["epoch"]))
    assert reports == [1] and fit.epochs_run == 1 and fit.stop_reason == "finished"
    assert trainer.optimizer is None and np.isfinite(fit.history[0]["train_loss"])


def test_ease_on_a_catalogue_too_large_for_memory_is_one_line_and_writes_nothing(tmp_path, monkeypatch):
    import rayrec.models.ease as ease

    # 61 items need 2 x 8 x 60^2 + 4 x 61^2 bytes, about 72 kB: a 10 kB limit refuses them.
    monkeypatch.setattr(ease, "MEMORY_LIMIT_BYTES", 10_000)
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "ease", "--output", str(out), "--no-progress", *set_flags(TINY_DATA)])
    assert_user_error(result, "model 'ease' needs", "item-item", "GiB is available")
    assert not out.exists()
    storage = tmp_path / "sweeps"
    result = runner.invoke(app, ["sweep", "ease", "--storage", str(storage), "--wandb", "off", *set_flags(TINY_DATA)])
    assert_user_error(result, "model 'ease' needs")
    assert not storage.exists() or not any(storage.iterdir())


def test_ease_refuses_a_real_catalogue_larger_than_this_machine(tmp_path):
    # 150,000 items need 2 x 8 x 150,000^2 bytes, about 335 GiB: more than any machine this runs on.
    table = tmp_path / "wide.csv"
    items = np.arange(1, 150_001)
    table.write_text("user,item\n" + "".join(f"{i % 3},{i}\n" for i in items))
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", "ease", "--data", str(table), "--format", "csv", "--output", str(out),
                                 "--no-progress", *set_flags(["data.columns={user: user, item: item}",
                                                              "data.user_core=0", "data.item_core=0"])])
    assert_user_error(result, "150,000 x 150,000", "GiB is available")
    assert not out.exists()


# --- SLIM ---------------------------------------------------------------------------------


def test_slim_weights_are_non_negative_with_a_zero_diagonal_and_solve_each_items_elastic_net():
    from sklearn.linear_model import ElasticNet

    l1, l2 = 0.1, 0.5
    model, _ = fitted("slim", tiny_split(ROWS, 5), **{"model.l1_reg": l1, "model.l2_reg": l2,
                                                       "model.max_iter": 10_000, "model.tol": 1e-10})
    w = model.weights.double().numpy()[1:, 1:]
    assert (w >= 0).all() and not np.diag(w).any() and w.any()
    # Column j is the elastic net of item j on the other items: the paper's objective is
    # sklearn's times the number of users.
    x = dense(ROWS, 5)
    for j in range(5):
        others = x.copy()
        others[:, j] = 0.0
        enet = ElasticNet(alpha=(l1 + l2) / len(ROWS), l1_ratio=l1 / (l1 + l2), positive=True, fit_intercept=False,
                          max_iter=10_000, tol=1e-10).fit(others, x[:, j])
        assert np.allclose(w[:, j], enet.coef_, atol=1e-5), j
        objective = 0.5 * ((x[:, j] - others @ w[:, j]) ** 2).sum() + l1 * w[:, j].sum() + 0.5 * l2 * w[:, j] @ w[:, j]
        assert objective < 0.5 * (x[:, j] ** 2).sum()  # better than W = 0: the regularisers leave it room


def test_slim_epochs_continue_its_coordinate_descent_and_early_stopping_ends_it():
    from rayrec.data import load_split

    overrides = {**CPU, **dict(s.split("=") for s in TINY_DATA), "model.max_iter": 1, "model.tol": 1e-6,
                 "train.epochs": 30, "train.patience": 2}
    cfg = build_config("slim", overrides=overrides)
    trainer = Trainer(cfg, load_split(cfg.data))
    fit = trainer.fit()
    losses = [r["train_loss"] for r in fit.history]
    assert losses[1] < losses[0]  # the second pass improves on the first: warm-started, not restarted
    assert all(b <= a + 1e-12 for a, b in zip(losses, losses[1:])), losses
    assert fit.stop_reason == "early_stopped" and fit.epochs_run < 30


# --- ALS ----------------------------------------------------------------------------------


def test_als_user_solve_is_the_weighted_least_squares_of_hu_koren_volinsky():
    from rayrec.models.als import solve_rows

    rng = np.random.default_rng(0)
    y = rng.normal(size=(6, 3))  # 5 items, row 0 = padding
    y[0] = 0.0
    reg, alpha = 0.1, 4.0
    history = [1, 3, 4]
    # Direct form: x = (Y^T C Y + reg I)^-1 Y^T C p with c = 1 + alpha p over every item.
    p = np.zeros(5)
    p[np.array(history) - 1] = 1.0
    c = 1.0 + alpha * p
    yy = y[1:]
    expected = np.linalg.solve(yy.T @ (c[:, None] * yy) + reg * np.eye(3), yy.T @ (c * p))
    table = torch.from_numpy(y)
    got = solve_rows(table, table.T @ table, torch.tensor([history + [0]]), reg, alpha)
    assert np.allclose(got.numpy()[0], expected, atol=1e-10)


def test_als_conjugate_gradient_reaches_the_exact_solve():
    from rayrec.models.als import conjugate_gradient_rows, solve_rows

    rng = np.random.default_rng(1)
    table = torch.from_numpy(rng.normal(size=(8, 4)))
    table[0] = 0.0
    ids = torch.tensor([[1, 3, 4, 0], [2, 5, 6, 7]])
    gram = table.T @ table
    exact = solve_rows(table, gram, ids, 0.1, 4.0)
    start = torch.from_numpy(rng.normal(size=(2, 4)))
    # CG is exact after f steps in exact arithmetic; a few more absorb rounding.
    assert torch.allclose(conjugate_gradient_rows(table, gram, ids, 0.1, 4.0, start, 8), exact, atol=1e-8)
    far = (conjugate_gradient_rows(table, gram, ids, 0.1, 4.0, start, 1) - exact).norm()
    assert far > 1e-3 and far < (start - exact).norm()  # one step: closer, not there


@pytest.mark.parametrize("cg_steps", [0, 3])
def test_als_objective_decreases_every_sweep_and_matches_its_definition(cg_steps):
    data = tiny_split(ROWS, 5)
    model, losses = fitted("als", data, epochs=6, **{"model.factors": 3, "model.reg": 0.1, "model.alpha": 4.0,
                                                      "model.cg_steps": cg_steps})
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    x, y = model.user_factors.double().numpy()[1:], model.item_factors.double().numpy()[1:]
    p = dense(ROWS, 5)
    direct = ((1 + 4.0 * p) * (p - x @ y.T) ** 2).sum() + 0.1 * ((x**2).sum() + (y**2).sum())
    assert losses[-1] == pytest.approx(direct / p.sum(), rel=1e-4)


def test_als_scores_fold_the_given_history_in():
    data = tiny_split(ROWS, 5)
    model, _ = fitted("als", data, epochs=3, **{"model.factors": 3, "model.cg_steps": 0})
    # Right after a sweep the item factors moved, but a user's fold-in on its training row is
    # the user half-sweep's solution against the current item factors.
    from rayrec.models.als import solve_all, training_rows

    by_user, _ = training_rows(data)
    users = solve_all(model.item_factors, by_user, model.cfg.reg, model.cfg.alpha)
    scores = model.score({"items": torch.from_numpy(item_sets(data.train, np.arange(6)))})
    assert torch.allclose(scores, users @ model.item_factors.T, atol=1e-5)


# --- the three on real runs: parity of a sweep's best.yaml, ASHA pruning ------------------


@pytest.mark.ray
def test_als_sweep_is_pruned_by_asha_and_its_best_yaml_reproduces(ray_session, tmp_path):
    from rayrec.config import config_from_dict, load_yaml
    from rayrec.data import load_split
    from rayrec.storage import read_parquet
    from rayrec.train.run import train_run
    from rayrec.tune.sweep import SweepOptions, run_sweep

    # ALS converges within a few sweeps on tiny data: a long patience keeps early stopping out of the way, so
    # only ASHA ends trials early.
    sets = [*TINY_DATA, "model.factors=8", "train.eval_batch_size=256", "train.patience=50"]
    data = load_split(build_config("als", overrides=dict(s.split("=") for s in TINY_DATA)).data)
    result = run_sweep(SweepOptions(model="als", storage=str(tmp_path / "sweeps"), name="asha", sets=sets, wandb="off",
                                    cpus_per_trial=0.5, verbose=0, search="random", scheduler="asha", num_samples=9,
                                    max_epochs=6, grace_period=1, reduction_factor=3, seed=3), data=data)
    history = read_parquet(os.path.join(result.experiment, "history.parquet"))
    epochs = history.groupby("trial_id")["epoch"].max()
    assert len(epochs) == 9 and (epochs < 6).any() and (epochs == 6).any(), epochs.to_dict()
    # `rayrec train --config best.yaml` repeats the best trial exactly.
    cfg = config_from_dict(load_yaml(os.path.join(result.experiment, "best.yaml")))
    run = train_run(cfg, data, output=str(tmp_path / "retrain"))
    assert run.fit.best_metrics["val_ndcg@10"] == pytest.approx(result.best["value"], abs=1e-6)
    assert result.best["test"]["ndcg@10"] == pytest.approx(run.test_metrics["ndcg@10"], abs=1e-6)


@pytest.mark.parametrize("model", ["ease", "slim", "als"])
def test_matrix_models_run_on_both_protocols(tmp_path, model):
    # Leave-one-out (sequential datasets) and the per-user ratio split (graph datasets).
    for split, metric in (("loo", "ndcg@10"), ("ratio", "recall@20")):
        out = tmp_path / split
        result = runner.invoke(app, ["train", model, "--epochs", "2", "--output", str(out), "--no-progress",
                                     *set_flags([*TINY_DATA, f"data.split={split}", f"train.metric={metric}"])])
        assert result.exit_code == 0, result.output
        summary = yaml.safe_load((out / "summary.yaml").read_text())
        assert summary["epochs_run"] == (1 if model == "ease" else 2)
        assert 0 < summary["test"][metric] <= 1 and summary["test"]["n_users"] > 0
