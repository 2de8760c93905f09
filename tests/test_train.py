"""The shared trainer and config: resolution order, schedule, early stopping, exact resume,
quality against popularity."""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest

from rayrec.config import build_config, config_from_dict
from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError
from rayrec.train.trainer import EarlyStopping, Trainer, lr_factor

TINY = {"data.synthetic_users": 150, "data.synthetic_items": 60, "data.synthetic_length": 12,
        "model.hidden": 16, "model.blocks": 1, "model.max_len": 16, "train.num_threads": 1}


def test_import_rayrec_is_light():
    code = "import sys, rayrec, rayrec.config, rayrec.cli; print(sorted(m for m in ('ray', 'wandb', 'torch') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_config_resolution_order(tmp_path):
    # dataclass default < model training defaults < file < overrides
    assert build_config("sasrec").train.lr == 1e-3
    assert build_config("lightgcn").train.grad_clip == 1.0  # graph default (field-lessons §5)
    assert build_config("lightgcn").data.split == "ratio"
    cfg = build_config("sasrec", base={"train": {"lr": 0.01, "epochs": 3}}, overrides={"train.lr": "2e-3"})
    assert cfg.train.lr == 0.002 and cfg.train.epochs == 3
    again = config_from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("overrides, message", [
    ({"train.lrr": 1}, "unknown key 'train.lrr'"),
    ({"train.epochs": "ten"}, "train.epochs must be a number"),
    ({"train.epochs": 2.5}, "train.epochs must be an integer"),
    ({"model.loss": "mse"}, "model.loss got 'mse'"),
    ({"model.heads": 3}, "must be >= 1 and divide model.hidden"),
    ({"train.metric": "ndcg@7"}, "train.metric 'ndcg@7' is not computed"),
    ({"foo.bar": 1}, "unknown key 'foo.bar'"),
    ({"data.valid_ratio": 1.5}, "data.valid_ratio must be in [0, 1)"),
])
def test_bad_config_values_are_user_errors(overrides, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        build_config("sasrec", overrides=overrides)


def test_lr_schedule_warms_up_then_decays_to_floor():
    assert lr_factor(0.5, 10, warmup_epochs=1, schedule="cosine", min_ratio=0.0) == pytest.approx(0.5)
    assert lr_factor(1.0, 10, 1, "cosine", 0.0) == pytest.approx(1.0)
    assert lr_factor(5.5, 10, 1, "cosine", 0.0) == pytest.approx(0.5)  # half-way through the cosine
    assert lr_factor(10.0, 10, 1, "cosine", 0.1) == pytest.approx(0.1)
    # Warm-up is capped at 20% of the run: a 2-epoch run warms up for 0.4 epochs.
    assert lr_factor(0.2, 2, 5, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(3.0, 10, 1, "constant", 0.0) == 1.0


def test_early_stopping_counts_patience_with_min_delta():
    stop = EarlyStopping(patience=2, min_delta=0.01)
    assert stop.update(0.10, 1) and not stop.should_stop
    assert not stop.update(0.105, 2)  # not better by more than min_delta
    assert not stop.should_stop
    assert not stop.update(0.09, 3) and stop.should_stop
    assert stop.best_epoch == 1 and stop.best == 0.10


def planted(n_users=60, n_items=20, length=10, seed=0) -> SplitData:
    """Item i is followed by i+1 (cyclic): a next-item model can learn it exactly."""
    rng = np.random.default_rng(seed)
    rows = [[(int(rng.integers(n_items)) + i) % n_items + 1 for i in range(length)] for _ in range(n_users)]
    return SplitData("planted", n_users, n_items, CSR.from_lists([r[:-2] for r in rows]),
                     CSR.from_lists([[r[-2]] for r in rows]), CSR.from_lists([[r[-1]] for r in rows]), True, "fp")


def test_trainer_restores_best_weights_and_reports_every_epoch():
    cfg = build_config("sasrec", overrides={"train.epochs": 4, "model.hidden": 16, "model.blocks": 1,
                                            "model.max_len": 12, "train.lr": 0.01, "train.num_threads": 1})
    trainer = Trainer(cfg, planted())
    seen = []
    fit = trainer.fit(on_epoch=lambda tr, rec: seen.append(rec["epoch"]))
    assert seen == [1, 2, 3, 4] and fit.epochs_run == 4
    best = max(fit.history, key=lambda r: r["val_ndcg@10"])
    assert fit.best_epoch == best["epoch"]
    # After fit the model holds the best epoch's weights: evaluating again gives its metric.
    assert trainer.evaluate("valid")["ndcg@10"] == pytest.approx(best["val_ndcg@10"], abs=1e-6)
    assert all(math.isfinite(r["lr"]) and r["lr"] > 0 for r in fit.history[:-1])


def test_an_interrupt_between_an_epochs_selection_and_its_weight_copy_drops_that_epoch():
    """Ctrl-C can land while a new best epoch's weights are being copied, after the stopper
    already named it best. The interrupted run keeps the epochs whose bookkeeping completed:
    the selected epoch is one whose weights it holds, never one whose copy was cut short."""
    cfg = build_config("sasrec", overrides={"train.epochs": 12, "model.hidden": 16, "model.blocks": 1,
                                            "model.max_len": 12, "train.lr": 0.01, "train.num_threads": 1,
                                            "train.patience": 12})
    trainer = Trainer(cfg, planted())
    copies = []
    weights = trainer._weights

    def cut_on_third_copy():
        if len(copies) == 2:
            raise KeyboardInterrupt
        copies.append(trainer.epoch)  # trainer.epoch: the epoch just ended (1-based)
        return weights()

    trainer._weights = cut_on_third_copy
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    cut_epoch = trainer.epoch
    assert trainer.stopper.best_epoch == cut_epoch  # the stopper had named it best: the race
    fit = trainer.interrupted()
    assert fit.stop_reason == "interrupted"
    assert fit.best_epoch == copies[-1] and fit.epochs_run == cut_epoch - 1
    assert [r["epoch"] for r in fit.history] == list(range(1, cut_epoch))
    best = fit.history[fit.best_epoch - 1]
    assert fit.best_metrics["val_ndcg@10"] == best["val_ndcg@10"]
    assert trainer.evaluate("valid")["ndcg@10"] == pytest.approx(best["val_ndcg@10"], abs=1e-6)


def test_an_interrupt_before_any_epoch_completed_keeps_nothing():
    cfg = build_config("sasrec", overrides={"train.epochs": 3, "model.hidden": 16, "model.blocks": 1,
                                            "model.max_len": 12, "train.num_threads": 1})
    trainer = Trainer(cfg, planted())

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    trainer._track_best = interrupt  # in the first epoch's bookkeeping, after its validation
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.history and trainer.interrupted() is None


RESUME_SCRIPT = """
import json, sys, torch
from rayrec.config import build_config
from rayrec.data import load_split
from rayrec.train.trainer import Trainer
cfg = build_config(sys.argv[3], overrides=json.loads(sys.argv[1]))
trainer = Trainer(cfg, load_split(cfg.data))
trainer.load(sys.argv[2])
fit = trainer.fit()
print(json.dumps({"history": fit.history, "test": trainer.test()}))
"""


# Models that fit themselves resume from their buffers (SLIM's warm start, ALS's factors).
RESUMED = {
    "sasrec": {**TINY, "model.dropout": 0.3},
    "slim": {**{k: v for k, v in TINY.items() if k.startswith(("data.", "train."))}, "model.max_iter": 1},
    "als": {**{k: v for k, v in TINY.items() if k.startswith(("data.", "train."))}, "model.factors": 8,
            "model.cg_steps": 3},  # CG warm-starts from the user factors: they must resume too
}


@pytest.mark.parametrize("model", list(RESUMED))
def test_save_restore_in_fresh_process_gives_identical_metrics(tmp_path, model):
    import json

    from rayrec.data import load_split

    overrides = {**RESUMED[model], "train.epochs": 4, "train.patience": 10}
    cfg = build_config(model, overrides=overrides)
    data = load_split(cfg.data)
    straight = Trainer(cfg, data)
    fit = straight.fit()
    test_straight = straight.test()

    partial = Trainer(cfg, data)
    partial.fit(on_epoch=lambda tr, rec: rec["epoch"] == 2)  # stop after 2 epochs
    assert partial.epoch == 2
    state = tmp_path / "state.pt"
    partial.save(str(state))
    out = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, json.dumps(overrides), str(state), model],
                         capture_output=True, text=True, check=True).stdout
    resumed = json.loads(out.strip().splitlines()[-1])
    keys = ("epoch", "train_loss", "val_ndcg@10", "val_hr@10", "val_coverage@10")
    assert [[r[k] for k in keys] for r in resumed["history"]] == [[r[k] for k in keys] for r in fit.history]
    assert resumed["test"] == test_straight


@pytest.mark.slow
def test_sasrec_beats_popularity_twice_on_synthetic():
    from rayrec.data import load_split

    sasrec = build_config("sasrec", overrides={"train.epochs": 10, "model.max_len": 50, "train.num_threads": 2})
    data = load_split(sasrec.data)
    assert data.info["synthetic"]
    trainer = Trainer(sasrec, data)
    trainer.fit()
    pop = Trainer(build_config("pop"), data)
    pop.fit()
    s, p = trainer.test()["ndcg@10"], pop.test()["ndcg@10"]
    assert s >= 2 * p, (s, p)


def test_run_without_validation_users_trains_its_whole_budget_and_keeps_the_last_weights(tmp_path):
    import torch
    import yaml

    from rayrec.train.run import train_run
    from rayrec.train.trainer import NO_SELECTION

    full = planted()
    no_valid = SplitData("planted", full.n_users, full.n_items, full.train, CSR.from_lists([[]] * full.n_users),
                         full.test, True, "fp")
    cfg = build_config("sasrec", overrides={"train.epochs": 5, "train.patience": 2, "model.hidden": 16,
                                            "model.blocks": 1, "model.max_len": 12, "train.num_threads": 1})
    seen = {}
    run = train_run(cfg, no_valid, output=str(tmp_path / "run"),
                    on_epoch=lambda tr, rec: seen.update(trainer=tr, last=tr._weights()))
    fit = run.fit
    assert fit.epochs_run == 5 and [r["epoch"] for r in fit.history] == [1, 2, 3, 4, 5]  # patience 2 never stops it
    assert fit.stop_reason == "finished" and fit.best_epoch == 5
    assert fit.selection == NO_SELECTION and fit.best_metrics == {}
    assert all(math.isnan(r["val_ndcg@10"]) for r in fit.history)
    # The model keeps the final epoch's weights (test is evaluated on them).
    kept = seen["trainer"].model.state_dict()
    assert all(torch.equal(kept[k], v) for k, v in seen["last"].items())
    summary = yaml.safe_load(open(tmp_path / "run" / "summary.yaml"))
    assert summary["selection"] == "none (no validation users)" and summary["best_epoch"] == 5
    assert summary["epochs_run"] == 5 and summary["valid"] == {}
    assert math.isfinite(summary["test"]["ndcg@10"])
