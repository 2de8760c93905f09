"""The model zoo end to end: every registered model trains through `rayrec train`, sweeps
through `rayrec sweep` with its shipped search space, beats popularity on the synthetic
data, logs catalogue coverage, and graph models share a leave-one-out split with SASRec.
Tiny synthetic data throughout; the sweeps share the session's one Ray instance."""

from __future__ import annotations

import logging

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY_DATA, assert_user_error, set_flags
from rayrec.cli import app
from rayrec.config import build_config
from rayrec.models import MODELS, get_model_spec
from rayrec.storage import read_parquet

runner = CliRunner()

# Small enough that a run takes a second; every registered model must appear here.
TINY_MODEL = {
    "sasrec": ["model.hidden=16", "model.blocks=1", "model.max_len=16"],
    "bert4rec": ["model.hidden=16", "model.blocks=1", "model.heads=1", "model.max_len=16"],
    "gru4rec": ["model.embedding=16", "model.hidden=16", "model.max_len=16"],
    "lightgcn": ["model.hidden=16", "model.layers=2"],
    "bprmf": ["model.hidden=16"],
    "ncf": ["model.embedding_dim=16", "model.hidden_layers=2"],
    "gcnii": ["model.hidden=16", "model.layers=2"],
    "layergcn": ["model.hidden=16", "model.layers=2"],
    "svdgcn": ["model.hidden=16", "model.rank=16"],
    "dgrec": ["model.hidden=16", "model.layers=2", "model.neighbours=5"],
    "pop": [],
    "ease": [],
    "slim": ["model.max_iter=5"],
    "als": ["model.factors=8"],
}
KS = (5, 10, 20)


def run(*args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def tiny(model: str) -> list[str]:
    return set_flags([*TINY_DATA, *TINY_MODEL[model], "train.eval_batch_size=256"])


# Regulariser ranges start at the floors practitioners use (field-lessons §3).
FLOORS = {"model.dropout": 0.1, "train.weight_decay": 0.01, "model.mask_prob": 0.15}


# Rating models (mean, svdpp) are trained, swept and compared with the global mean in test_models_rating.py.
RATING = {name for name in MODELS if get_model_spec(name).model_cls.task == "rating"}


def test_every_registered_model_has_a_shipped_search_space_with_floors():
    from rayrec.tune.space import STAGES, load_space

    assert set(TINY_MODEL) == set(MODELS) - RATING
    for name in MODELS:
        space = load_space(name)  # validated: keys, bounds, PBT mutations that keep shapes
        assert space.model == name
        for key, floor in FLOORS.items():
            if key in space.params:
                assert space.params[key].low >= floor, (name, key)
        assert set(space.stages) == set(STAGES), name
        if not get_model_spec(name).model_cls.closed_form:  # a closed form has one epoch: nothing to mutate
            assert space.mutate, name
    # Graph models: the LightGCN protocol's metric, a log lr range and an L2 range above 0.
    for name in ("lightgcn", "bprmf", "gcnii", "layergcn", "svdgcn", "dgrec"):
        params = load_space(name).params
        assert load_space(name).sweep["metric"] == "recall@20"
        # SVD-GCN's one learned matrix takes a larger lr (its reference trains it with SGD at lr ~7).
        lr_range = (1e-3, 1e-1) if name == "svdgcn" else (1e-4, 1e-2)
        assert (params["train.lr"].dist, params["train.lr"].low, params["train.lr"].high) == ("loguniform", *lr_range)
        assert params["model.reg"].dist == "loguniform" and params["model.reg"].low > 0
        assert params["model.hidden"].dist == "choice"
    layers = load_space("lightgcn").params["model.layers"]
    assert (layers.dist, layers.low, layers.high) == ("int", 1, 4)
    # NCF: the practitioners' starting ranges (issue 13).
    ncf = load_space("ncf").params
    assert (ncf["train.lr"].dist, ncf["train.lr"].low, ncf["train.lr"].high) == ("loguniform", 1e-4, 5e-3)
    assert (min(ncf["model.embedding_dim"].values), max(ncf["model.embedding_dim"].values)) == (32, 256)
    assert (ncf["model.dropout"].low, ncf["model.dropout"].high) == (0.1, 0.5)


# --- rayrec train ------------------------------------------------------------------------


@pytest.mark.parametrize("model", list(TINY_MODEL))
def test_every_model_trains_through_rayrec_train_and_logs_coverage(tmp_path, model):
    out = tmp_path / "run"
    result = run("train", model, "--epochs", 2, "--output", out, "--no-progress", *tiny(model))
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC dataset" in result.output and "test  (once)" in result.output
    summary = yaml.safe_load((out / "summary.yaml").read_text())
    assert summary["model"] == model
    assert summary["epochs_run"] == (1 if get_model_spec(model).model_cls.closed_form else 2)
    metric = build_config(model).train.metric  # ndcg@10 for sequential models, recall@20 for graph ones
    assert 0.0 <= summary["valid"][metric] <= 1.0 and 0.0 <= summary["test"][metric] <= 1.0
    if metric == "recall@20":  # graph models: the summary lines show accuracy and coverage at 20
        assert "test  (once):       recall@20" in result.output and "coverage@20" in result.output
    epochs = read_parquet(str(out / "metrics.parquet"))
    assert len(epochs) == summary["epochs_run"]
    for k in KS:  # catalogue coverage is in every epoch record, for every model
        coverage = epochs[f"val_coverage@{k}"]
        assert ((coverage > 0) & (coverage <= 1)).all(), coverage.tolist()
    assert 0 < summary["test"]["coverage@10"] <= 1


# --- rayrec sweep ------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize("model", list(TINY_MODEL))
def test_every_model_sweeps_through_rayrec_sweep_with_its_shipped_space(ray_session, tmp_path, model):
    storage = tmp_path / "sweeps"
    # The shipped space (rayrec/search_spaces/<model>.yaml) is sampled; --set values it does not search stay.
    result = run("sweep", model, "--name", "smoke", "--storage", storage, "--search", "random", "--scheduler", "fifo",
                 "--num-samples", 1, "--max-epochs", 1, "--cpus-per-trial", 0.5, "--wandb", "off", "--verbose", 0,
                 *tiny(model))
    assert result.exit_code == 0, result.output
    experiment = storage / "smoke"
    trials = read_parquet(str(experiment / "trials.parquet"))
    assert len(trials) == 1 and (trials["status"] == "finished").all(), trials.to_dict("records")
    history = read_parquet(str(experiment / "history.parquet"))
    assert (history["val_coverage@10"] > 0).all()
    assert not [c for c in history.columns if c.startswith("test")]
    best = yaml.safe_load((experiment / "best.yaml").read_text())
    assert best["model"]["name"] == model
    summary = yaml.safe_load((experiment / "summary.yaml").read_text())
    assert summary["best"]["metric"] == f"val_{build_config(model).train.metric}"
    assert "test" in summary["best"]  # the best checkpoint, evaluated once on test after the sweep


# --- degeneracy guards -------------------------------------------------------------------

# The synthetic data (rayrec/data/synthetic.py) plant item-to-item transitions, item
# clusters and long-tailed popularity. Settings that learn them in a few seconds of CPU.
GUARD_DATA = {"data.synthetic_users": 500, "data.synthetic_items": 300, "data.synthetic_length": 20}
GUARD_TRAIN = {"train.epochs": 10, "train.warmup_epochs": 0, "train.device": "cpu", "train.num_threads": 1}
SEQ = {"model.max_len": 20, "train.lr": 1e-2, "train.batch_size": 32}
GRAPH = {"model.hidden": 32, "train.lr": 1e-2, "train.batch_size": 256}
GUARD_MODELS = {
    # model: (split, selection metric, overrides, required factor over popularity)
    "sasrec": ("loo", "ndcg@10", {**SEQ, "model.hidden": 32, "model.blocks": 1}, 1.5),
    "bert4rec": ("loo", "ndcg@10", {**SEQ, "model.hidden": 32, "model.blocks": 1, "model.heads": 1}, 1.5),
    "gru4rec": ("loo", "ndcg@10", {**SEQ, "model.embedding": 32, "model.hidden": 32}, 1.5),
    # Graph models ignore order: judge them on their own protocol (ratio split, Recall@20).
    "lightgcn": ("ratio", "recall@20", {**GRAPH, "model.layers": 2}, 1.2),
    "bprmf": ("ratio", "recall@20", GRAPH, 1.2),
    "ncf": ("ratio", "recall@20", {"model.embedding_dim": 32, "train.lr": 5e-3, "train.batch_size": 256}, 1.2),
    "gcnii": ("ratio", "recall@20", {**GRAPH, "model.layers": 4}, 1.2),
    "layergcn": ("ratio", "recall@20", {**GRAPH, "model.layers": 2}, 1.2),
    "svdgcn": ("ratio", "recall@20", {**GRAPH, "model.rank": 32}, 1.2),
    "dgrec": ("ratio", "recall@20", {**GRAPH, "model.layers": 2, "model.neighbours": 10}, 1.2),
    # Models of the user-item matrix read a history as a set: one on each protocol.
    "ease": ("loo", "ndcg@10", {"model.l2_reg": 50.0}, 1.2),
    "slim": ("ratio", "recall@20", {"model.l1_reg": 0.01, "model.l2_reg": 0.1, "model.max_iter": 2}, 1.2),
    "als": ("ratio", "recall@20", {"model.factors": 32}, 1.2),
}


def _fit(model: str, split: str, metric: str, overrides: dict):
    from rayrec.data import load_split
    from rayrec.train.trainer import Trainer

    cfg = build_config(model, overrides={**GUARD_DATA, **GUARD_TRAIN, "data.split": split, "train.metric": metric,
                                         **overrides})
    trainer = Trainer(cfg, load_split(cfg.data))
    return trainer, trainer.fit()


def test_every_trainable_model_beats_popularity_and_models_differ():
    assert set(GUARD_MODELS) == set(MODELS) - {"pop"} - RATING
    pop = {split: _fit("pop", split, metric, {})[1].best_metrics[f"val_{metric}"]
           for split, metric in (("loo", "ndcg@10"), ("ratio", "recall@20"))}
    scores, fingerprints = {}, {}
    for model, (split, metric, overrides, factor) in GUARD_MODELS.items():
        trainer, fit = _fit(model, split, metric, overrides)
        value = fit.best_metrics[f"val_{metric}"]
        assert value >= factor * pop[split], f"{model}: val {metric} {value:.4f} vs popularity {pop[split]:.4f}"
        # Alive, not collapsed onto the popular items (field-lessons §4).
        assert fit.history[-1]["val_coverage@10"] > 0.05, (model, fit.history[-1]["val_coverage@10"])
        if len(fit.history) > 1:  # a closed form (EASE) has one epoch
            assert fit.history[-1]["train_loss"] < fit.history[0]["train_loss"], model
        scores[model] = (fit.best_metrics["val_ndcg@10"], fit.best_metrics["val_recall@20"])
        fingerprints.setdefault(split, set()).add(trainer.data.fingerprint)
    assert all(len(fps) == 1 for fps in fingerprints.values())  # one split per protocol
    # Identical metrics across models is the signature of dead training (e.g. stale graph embeddings).
    values = list(scores.values())
    assert len({tuple(round(x, 6) for x in v) for v in values}) == len(values), scores


# --- graph models under the sequential protocol --------------------------------------------


def test_lightgcn_and_sasrec_share_one_leave_one_out_split(tmp_path):
    summaries = {}
    for model, extra in (("sasrec", []), ("lightgcn", set_flags(["data.split=loo"]))):
        out = tmp_path / model
        result = run("train", model, "--epochs", 1, "--output", out, "--no-progress", *tiny(model), *extra)
        assert result.exit_code == 0, result.output
        summaries[model] = yaml.safe_load((out / "summary.yaml").read_text())
    sasrec, lightgcn = summaries["sasrec"], summaries["lightgcn"]
    assert sasrec["fingerprint"] == lightgcn["fingerprint"]
    for key in ("ndcg@10", "hr@10", "recall@20", "coverage@10", "n_users"):
        assert key in sasrec["test"] and key in lightgcn["test"], key
    # Both ranked the same users' held-out items on validation and test.
    assert sasrec["test"]["n_users"] == lightgcn["test"]["n_users"] > 0
    assert sasrec["valid"]["n_users"] == lightgcn["valid"]["n_users"] > 0
    # The default graph protocol is a different (ratio) split, hence a different fingerprint.
    out = tmp_path / "ratio"
    assert run("train", "lightgcn", "--epochs", 1, "--output", out, "--no-progress", *tiny("lightgcn")).exit_code == 0
    assert yaml.safe_load((out / "summary.yaml").read_text())["fingerprint"] != sasrec["fingerprint"]


# --- bad input ----------------------------------------------------------------------------


def _unordered_csv(tmp_path):
    # No timestamp column: rows carry no time order (test_cli covers `rayrec train sasrec` on it).
    table = tmp_path / "ratings.csv"
    table.write_text("\n".join(["user,item"] + [f"{u},{i}" for u in range(30) for i in range(1, 12)]) + "\n")
    return table, set_flags(["data.columns={user: user, item: item}"])


@pytest.mark.parametrize("model", ["bert4rec", "gru4rec"])
def test_sequential_sweep_on_unordered_data_fails_before_ray(tmp_path, model):
    table, columns = _unordered_csv(tmp_path)
    storage = tmp_path / "sweeps"
    # `rayrec sweep` has no --format option; data.format is set like any other config key.
    result = run("sweep", model, "--data", table, *set_flags(["data.format=csv"]), *columns, "--storage", storage,
                 "--wandb", "off")
    assert_user_error(result, f"model '{model}' is sequential", "time order", "timestamp")
    assert not storage.exists() or not any(storage.iterdir())


def test_graph_models_accept_the_same_unordered_data(tmp_path):
    table, columns = _unordered_csv(tmp_path)
    result = run("train", "bprmf", "--data", table, "--format", "csv", *columns, "--epochs", 1,
                 "--output", tmp_path / "run", "--no-progress")
    assert result.exit_code == 0, result.output
    summary = yaml.safe_load((tmp_path / "run" / "summary.yaml").read_text())
    assert summary["epochs_run"] == 1 and summary["model"] == "bprmf"
    assert 0.0 <= summary["valid"]["ndcg@10"] <= 1.0 and summary["test"]["n_users"] > 0


def test_ratio_split_keeps_every_user_with_a_training_item_and_reports_short_users(tmp_path):
    from rayrec.data import load_split

    # Users 0..5 have 1..6 interactions; generous held-out shares would empty short users' training rows.
    table = tmp_path / "short.csv"
    table.write_text("\n".join(["user,item"] + [f"{u},{i}" for u in range(6) for i in range(1, u + 2)]) + "\n")
    cfg = build_config("lightgcn", overrides={
        "data.name": str(table), "data.format": "csv", "data.columns": {"user": "user", "item": "item"},
        "data.user_core": 0, "data.item_core": 0, "data.valid_ratio": 0.3, "data.test_ratio": 0.4,
    })
    split = load_split(cfg.data)
    assert cfg.data.split == "ratio" and split.n_users == 6  # nobody dropped
    assert (split.train.lengths() >= 1).all()
    assert (split.train.lengths() + split.valid.lengths() + split.test.lengths()).tolist() == [1, 2, 3, 4, 5, 6]
    info = split.info["split"]
    assert info["users_without_train"] == 0
    assert info["users_without_test"] == int((split.test.lengths() == 0).sum()) >= 1
    assert info["users_without_valid"] == int((split.valid.lengths() == 0).sum()) >= 1


def test_presplit_graph_data_with_users_without_training_items_is_reported(tmp_path, caplog):
    from rayrec.data import load_split

    folder = tmp_path / "graph"
    folder.mkdir()
    # LightGCN layout: user 2 has test items but an empty training line.
    (folder / "train.txt").write_text("0 0 1 2 3\n1 1 2 3 4\n2\n3 0 4\n")
    (folder / "test.txt").write_text("0 4\n1 0\n2 1 3\n3 2\n")
    cfg = build_config("lightgcn", overrides={"data.name": str(folder), "data.format": "lightgcn"})
    with caplog.at_level(logging.WARNING):
        split = load_split(cfg.data)
    assert split.n_users == 4 and split.train.lengths()[2] == 0 and split.test.row(2).tolist() == [2, 4]
    assert "1 user(s) have no training interactions" in caplog.text
