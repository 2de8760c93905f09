"""Analysis of finished sweeps on hand-made trial tables (no Ray): narrowing, importance,
robust config, diagnostics, confirmation statistics, and the CLI's one-line errors."""

from __future__ import annotations

import math
import os

import numpy as np
import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from conftest import BASE, assert_user_error, config, ten_trials, write_sweep
from rayrec.cli import app
from rayrec.errors import UserError
from rayrec.train.trainer import lr_factor
from rayrec.tune.confirm import confirmation_stats, with_validation_in_train
from rayrec.tune.diagnostics import diagnose, pbt_lineage
from rayrec.tune.importance import parameter_importance
from rayrec.tune.narrow import export_robust, narrow_param, narrow_space, robust_params, write_narrowing
from rayrec.tune.results import load_results
from rayrec.tune.space import Param, load_space


def test_narrowing_takes_the_top_fifth_log_aware_and_keeps_floors(tmp_path):
    results = load_results(write_sweep(tmp_path, ten_trials()))
    narrowing = narrow_space(results, threshold=0.0)  # no freezing: ranges only
    p = narrowing.space.params
    assert narrowing.top_trials == ["t00", "t01"]  # 20% of 10
    # Log scale: 1e-3..1e-2 padded by a tenth of a decade on each side, not by 0.0009.
    assert p["train.lr"].low == pytest.approx(10 ** -3.1, rel=1e-3)
    assert p["train.lr"].high == pytest.approx(10 ** -1.9, rel=1e-3)
    # Linear scale: 0.2..0.4 padded by 0.02.
    assert (p["model.dropout"].low, p["model.dropout"].high) == pytest.approx((0.18, 0.42), rel=1e-3)
    # Integers: exactly what the top trials used; choices: the values they used, in order.
    assert (p["model.blocks"].low, p["model.blocks"].high) == (2, 3)
    assert p["model.loss"].values == ["ce", "bce"]
    # Weight decay 0.01..0.012 would pad below the 0.01 floor: the original low is kept.
    assert p["train.weight_decay"].low == 0.01
    assert narrowing.next_stage == "medium"
    assert narrowing.space.sweep["num_samples"] == 24 and narrowing.space.sweep["max_epochs"] == 12


def test_narrowing_without_padding_is_exactly_the_top_trials_range():
    lr = Param("train.lr", "loguniform", low=1e-5, high=1e-1)
    narrowed = narrow_param(lr, [1e-3, 3e-3, 1e-2], pad=0.0, min_share=0.0)
    assert (narrowed.low, narrowed.high) == pytest.approx((1e-3, 1e-2), rel=1e-3)
    # Top trials that agree on one choice: the parameter becomes fixed.
    assert narrow_param(Param("model.loss", "choice", values=["ce", "bce"]), ["bce", "bce"]) == ("fixed", "bce")
    # Two close values do not collapse the range: at least min_share of the original width (log units).
    close = narrow_param(lr, [1e-3, 1.01e-3], pad=0.1, min_share=0.1)
    assert math.log10(close.high / close.low) == pytest.approx(0.4, rel=1e-2)
    assert close.low < 1e-3 < 1.01e-3 < close.high


def test_narrow_freezes_unimportant_parameters_and_writes_a_loadable_space(tmp_path):
    rng = np.random.default_rng(0)
    trials = []
    for _ in range(30):
        lr = 10 ** rng.uniform(-5, -1)
        value = 0.4 - 0.04 * (math.log10(lr) + 3) ** 2
        trials.append(dict(value=value, config=config(lr, rng.uniform(0.1, 0.5), 2, "ce", 0.05)))
    path = write_sweep(tmp_path, trials)
    results = load_results(path)
    narrowing = narrow_space(results)
    best = max(trials, key=lambda t: t["value"])
    assert narrowing.importance.conclusive
    assert "model.dropout" in narrowing.frozen
    assert narrowing.space.fixed["model.dropout"] == pytest.approx(best["config"]["model.dropout"])
    assert "train.lr" in narrowing.space.params
    url = write_narrowing(results, narrowing)
    loaded = load_space("sasrec", url)  # the same validation `rayrec sweep --space` applies
    assert loaded.params.keys() == narrowing.space.params.keys()
    assert open(url).read().startswith("# Search space narrowed by `rayrec narrow`")


def test_importance_ranks_the_parameter_that_matters_first():
    rng = np.random.default_rng(1)
    n = 40
    lr, dropout = 10 ** rng.uniform(-4, -2, n), rng.uniform(0.1, 0.5, n)
    value = 0.3 - 0.05 * (np.log10(lr) + 3) ** 2 + rng.normal(0, 0.002, n)
    trials = pd.DataFrame({"config/train.lr": lr, "config/model.dropout": dropout, "best_val_ndcg@10": value})
    params = {"train.lr": Param("train.lr", "loguniform", 1e-4, 1e-2),
              "model.dropout": Param("model.dropout", "uniform", 0.1, 0.5)}
    imp = parameter_importance(trials, params, "best_val_ndcg@10")
    assert imp.conclusive
    assert list(imp.scores) == ["train.lr", "model.dropout"]
    assert imp.scores["train.lr"] > 0.8 and imp.scores["model.dropout"] < 0.1
    assert sum(imp.scores.values()) == pytest.approx(1.0)


def test_importance_says_so_when_there_are_too_few_trials():
    trials = pd.DataFrame({"config/train.lr": [1e-3, 1e-2, 1e-4], "best_val_ndcg@10": [0.1, 0.2, 0.3]})
    imp = parameter_importance(trials, {"train.lr": Param("train.lr", "loguniform", 1e-5, 1e-1)}, "best_val_ndcg@10")
    assert not imp.conclusive and imp.scores == {}
    assert "3 completed trials" in imp.message and "at least 10" in imp.message


def test_robust_config_averages_the_top_trials_and_builds_like_best_yaml(tmp_path):
    lrs, dropouts, blocks = [1e-3, 1e-2, 1e-4, 1e-3, 1e-2], [0.2, 0.4, 0.3, 0.1, 0.5], [2, 3, 3, 2, 3]
    losses = ["ce", "bce", "bce", "ce", "sampled_softmax"]
    trials = [dict(value=0.5 - 0.01 * i, config=config(lrs[i], dropouts[i], blocks[i], losses[i], 0.02))
              for i in range(5)] + [dict(value=0.1, config=config(1e-1, 0.5, 4, "bce", 0.3))]
    results = load_results(write_sweep(tmp_path, trials))
    top = results.ranked().head(5)
    params = robust_params(top, results.space.params)
    assert params["train.lr"] == pytest.approx(10 ** -2.8)  # geometric mean
    assert params["model.dropout"] == pytest.approx(0.3)  # arithmetic mean
    assert params["model.blocks"] == 3 and isinstance(params["model.blocks"], int)  # 2.6 rounded
    assert params["model.loss"] == "ce"  # mode; the 2-2 tie goes to the better-ranked trial's value
    assert params["train.weight_decay"] == pytest.approx(0.02)
    url = export_robust(results, k=5)
    assert url.endswith("robust.yaml")
    from rayrec.cli import resolve_cli_config

    cfg = resolve_cli_config(None, url, None, None, [])  # what `rayrec train --config robust.yaml` resolves
    assert cfg.train.lr == pytest.approx(10 ** -2.8) and cfg.model.blocks == 3 and cfg.model.hidden == 16
    resolved = yaml.safe_load(open(url))
    assert set(resolved) == {"model", "data", "train"} and resolved["train"]["patience"] == 3


def test_diagnostics_flag_overfitting_dead_training_and_coverage_collapse(tmp_path):
    trials = [dict(trial_id="good", value=0.30, config=config(1e-3)),
              dict(trial_id="overfit", value=0.28, config=config(2e-3)),
              dict(trial_id="dead", value=0.05, status="early_stopped", epochs=2, config=config(1e-5)),
              dict(trial_id="narrow", value=0.25, config=config(5e-3))]
    rows = []
    for t in trials:
        for e in range(1, t.get("epochs", 4) + 1):
            rows.append({"trial_id": t["trial_id"], "epoch": e, "val_ndcg@10": t["value"] * e / t.get("epochs", 4),
                         "train_ndcg@10": t["value"] * e / t.get("epochs", 4) + (0.06 if t["trial_id"] == "overfit" else 0.01),
                         "val_coverage@10": 0.02 if t["trial_id"] == "narrow" else 0.6, "train_loss": 4.0 - 0.5 * e})
    results = load_results(write_sweep(tmp_path, trials, history=pd.DataFrame(rows)))
    d = diagnose(results).set_index("trial_id")
    assert d.loc["overfit", "overfitting"] and d.loc["overfit", "train_val_gap"] == pytest.approx(0.06)
    assert not d.loc["good", "overfitting"] and d.loc["good", "flags"] == ""
    assert d.loc["dead", "dead"] and "early-stopped at epoch 2" in d.loc["dead", "flags"]
    assert d.loc["narrow", "coverage_collapse"] and not d.loc["good", "coverage_collapse"]


def test_identical_metrics_across_trials_are_dead_training(tmp_path):
    trials = [dict(value=0.123, config=config(10 ** -(2 + i))) for i in range(3)]
    d = diagnose(load_results(write_sweep(tmp_path, trials)))
    assert d["dead"].all() and d["flags"].str.contains("same metric").all()


def test_pbt_lineage_finds_the_donor_and_the_config_change():
    history = pd.DataFrame([
        {"trial_id": "a", "epoch": 1, "weights_checksum": 1.0, "restored_epoch": 0, "restored_checksum": np.nan, "config_lr": 1e-3},
        {"trial_id": "a", "epoch": 2, "weights_checksum": 2.0, "restored_epoch": np.nan, "restored_checksum": np.nan, "config_lr": 1e-3},
        {"trial_id": "b", "epoch": 1, "weights_checksum": 5.0, "restored_epoch": 0, "restored_checksum": np.nan, "config_lr": 1e-2},
        {"trial_id": "b", "epoch": 2, "weights_checksum": 6.0, "restored_epoch": np.nan, "restored_checksum": np.nan, "config_lr": 1e-2},
        # b clones a's epoch-2 weights, then trains on with a perturbed lr.
        {"trial_id": "b", "epoch": 3, "weights_checksum": 2.5, "restored_epoch": 2, "restored_checksum": 2.0, "config_lr": 1.2e-3},
    ])
    lineage = pbt_lineage(history)
    assert lineage.to_dict("records") == [{"epoch": 2, "trial_id": "b", "donor": "a", "changes": "lr 0.001->0.0012"}]


def test_confirmation_statistics_on_known_numbers():
    runs = pd.DataFrame({
        "candidate": ["rank1"] * 3 + ["rank2"] * 3,
        "trial_id": ["t1"] * 3 + ["t2"] * 3,
        "tuning_value": [0.33] * 3 + [0.252] * 3,
        "val_ndcg@10": [0.30, 0.31, 0.32, 0.250, 0.251, 0.252],
    })
    stats = confirmation_stats(runs, "val_ndcg@10").set_index("candidate")
    r1, r2 = stats.loc["rank1"], stats.loc["rank2"]
    assert (r1["mean"], r1["std"], r1["min"], r1["max"]) == pytest.approx((0.31, 0.01, 0.30, 0.32))
    assert r1["unstable"] and r1["disagrees"] and r1["shortfall"] == pytest.approx(0.02)
    assert "unstable" in r1["flags"] and "tuning and training disagree" in r1["flags"]
    assert r2["std"] == pytest.approx(0.001) and not r2["unstable"] and not r2["disagrees"] and r2["flags"] == ""
    # Thresholds are options; for a metric to minimise, falling short means coming out higher.
    loose = confirmation_stats(runs, "val_ndcg@10", max_std=0.02, tolerance=0.05).set_index("candidate")
    assert not loose["unstable"].any() and not loose["disagrees"].any()
    assert confirmation_stats(runs, "val_ndcg@10", mode="min").set_index("candidate").loc["rank1", "shortfall"] == pytest.approx(-0.02)


def test_train_on_valid_moves_validation_items_into_training():
    from rayrec.data.types import CSR, SplitData

    data = SplitData(name="t", n_users=2, n_items=6, train=CSR.from_lists([[1, 2], [3]]),
                     valid=CSR.from_lists([[4], [5]]), test=CSR.from_lists([[6], [1]]), ordered=True, fingerprint="f")
    merged = with_validation_in_train(data)
    assert merged.train.row(0).tolist() == [1, 2, 4] and merged.train.row(1).tolist() == [3, 5]
    assert merged.valid.nnz == 0 and merged.test.row(0).tolist() == [6]
    assert merged.history("test").row(0).tolist() == [1, 2, 4]


runner = CliRunner()


def test_narrowing_with_too_few_trials_is_a_assert_user_error(tmp_path):
    trials = [dict(value=0.1 * i, config=config(10 ** -(2 + i))) for i in range(1, 4)]
    trials += [dict(value=float("nan"), status="errored", error="CUDA out of memory", config=config(1e-3))] * 2
    write_sweep(tmp_path, trials)
    line = assert_user_error(runner.invoke(app, ["narrow", "hand", "--storage", str(tmp_path)]))
    assert "3 completed trial(s)" in line and "at least 5" in line
    with pytest.raises(UserError):
        narrow_space(load_results(os.path.join(tmp_path, "hand")))


def test_narrow_command_writes_next_space_robust_and_diagnostics(tmp_path):
    path = write_sweep(tmp_path, ten_trials())
    result = runner.invoke(app, ["narrow", path])
    assert result.exit_code == 0, result.output
    assert "importance" in result.output and "--from" in result.output
    for name in ("next_space.yaml", "narrow.yaml", "robust.yaml", "diagnostics.parquet"):
        assert os.path.getsize(os.path.join(path, name)) > 0, name
    assert yaml.safe_load(open(os.path.join(path, "narrow.yaml")))["next_stage"] == "medium"


def test_sweep_from_uses_the_narrowed_space_and_the_sweeps_base(tmp_path):
    from rayrec.tune.sweep import SweepOptions, plan_sweep

    path = write_sweep(tmp_path, ten_trials())
    results = load_results(path)
    write_narrowing(results, narrow_space(results, threshold=0.0))
    plan = plan_sweep(SweepOptions(model="sasrec", from_sweep="hand", storage=str(tmp_path)))
    assert plan.space.params["model.loss"].values == ["ce", "bce"]
    assert plan.settings.num_samples == 24 and plan.settings.max_epochs == 12  # the medium stage
    assert plan.base["model"]["hidden"] == 16 and plan.base["data"]["synthetic_users"] == 150
    assert plan.base["train"]["epochs"] == 12
    with pytest.raises(UserError, match="--from and --space"):
        plan_sweep(SweepOptions(model="sasrec", from_sweep=path, space=path + "/next_space.yaml"))


def test_summary_table_ranks_best_first_under_the_sweeps_mode():
    from rayrec.tune.sweep import SweepResult, summary_table

    trials = pd.DataFrame({"trial_id": ["low", "high", "mid", "nan"], "status": ["finished"] * 4, "epochs": [2] * 4,
                           "best_val_avg_rank": [3.0, 9.0, 5.0, float("nan")], "config/train.lr": [1e-3] * 4})

    def order(mode: str) -> list[str]:
        table = summary_table(SweepResult("x", trials, None, {}, ["train.lr"], mode=mode), "avg_rank")
        return [line.split()[0] for line in table.splitlines()[1:-1]]

    assert order("min") == ["low", "mid", "high", "nan"]
    assert order("max") == ["high", "mid", "low", "nan"]


def test_first_line_is_the_first_line_of_the_original_exception():
    from ray.exceptions import RayTaskError

    from rayrec.errors import first_line

    assert first_line(ValueError("bad value\n  detail\nlast words")) == "ValueError: bad value"
    assert first_line(KeyError()) == "KeyError"
    # What a failed trial or Ray task hands back: the worker's traceback around the cause.
    wrapped = RayTaskError("train", "Traceback (most recent call last):\n  File x\nRuntimeError: boom",
                           RuntimeError("injected failure at epoch 2\nsecond line")).as_instanceof_cause()
    assert first_line(wrapped) == "RuntimeError: injected failure at epoch 2"
    assert first_line(ValueError("bad value\n  detail"), typed=False) == "bad value"


def test_error_line_masks_storage_secrets(monkeypatch):
    from rayrec.storage import error_line

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s3cr3t-value")
    assert error_line(OSError("denied with s3cr3t-value\nmore")) == "OSError: denied with $AWS_SECRET_ACCESS_KEY"


def test_final_train_on_valid_follows_the_trials_learning_rate_path_and_reports_test_groups(tmp_path):
    from rayrec.config import build_config
    from rayrec.data import load_split
    from rayrec.train.trainer import Trainer
    from rayrec.tune.confirm import FinalOptions, run_final

    # One 4-epoch trial whose validation metric peaked at epoch 2: the retrain stops there.
    trial = config(3e-3)
    history = pd.DataFrame({"trial_id": "t00", "epoch": [1, 2, 3, 4], "val_ndcg@10": [0.1, 0.3, 0.2, 0.25]})
    path = write_sweep(tmp_path, [dict(value=0.3, config=trial)], history=history)
    tiny = {"model.blocks": 1, "model.dropout": 0.1, "data.synthetic_users": 60, "data.synthetic_items": 40,
            "data.synthetic_length": 10, "train.num_threads": 1, "train.warmup_epochs": 1.0}
    cfg = build_config("sasrec", BASE, {**trial, **tiny})
    with open(os.path.join(path, "best.yaml"), "w") as fh:
        yaml.safe_dump(cfg.to_dict(), fh)

    data = load_split(cfg.data)
    data.test_groups = {"first": np.arange(10)}  # a declared test group is reported beside all users
    record = run_final(FinalOptions(sweep=path, train_on_valid=True), data=data)
    assert record["epochs"] == 2 and record["config"]["train"]["schedule_epochs"] == 4
    assert record["test"]["n_users"] == 60 and record["test_first"]["n_users"] == 10
    final_lrs = pd.read_parquet(os.path.join(record["run"], "metrics.parquet"))["lr"].tolist()
    trial_run = Trainer(cfg, data)
    trial_run.fit(on_epoch=lambda tr, rec: rec["epoch"] == 2)  # the trial's first two epochs
    assert len(final_lrs) == 2
    assert final_lrs == pytest.approx([r["lr"] for r in trial_run.history], rel=1e-12)
    # Not the path of a 2-epoch schedule (the retrain used to follow it), which ends at 0.
    assert lr_factor(2.0, 2, 1.0, "cosine", 0.0) == 0.0 < final_lrs[-1]


def test_a_partial_sweep_is_refused_by_final_and_labelled_by_every_other_reader(tmp_path, caplog):
    """An interrupted sweep's export (summary.yaml `status: partial`): `final` will not spend
    the test set on it without --allow-partial; narrow, confirm, report and a partial
    best.yaml as --config go on, each saying so."""
    import logging

    from rayrec.config import build_config, command_layers
    from rayrec.storage import write_yaml

    path = write_sweep(tmp_path, ten_trials(), status="partial")
    best = os.path.join(path, "best.yaml")
    write_yaml(best, {"sweep": {"name": "hand", "status": "partial", "trials_finished": 1, "trials_planned": 10},
                      **build_config("sasrec", BASE).to_dict()}, header="PARTIAL: the best of an unfinished sweep")

    line = assert_user_error(runner.invoke(app, ["final", path]))
    assert "is unfinished (1 of 10 trials finished)" in line and "--resume --name hand" in line
    assert "--allow-partial" in line
    assert sorted(os.listdir(path)) == ["best.yaml", "history.parquet", "summary.yaml", "sweep.yaml", "trials.parquet"]

    with caplog.at_level(logging.WARNING):
        result = runner.invoke(app, ["narrow", path])
    assert result.exit_code == 0, result.output
    assert "sweep '" + path + "' is unfinished (1 of 10 trials finished)" in caplog.text
    assert yaml.safe_load(open(os.path.join(path, "narrow.yaml")))["source_status"] == "partial (1 of 10 trials finished)"
    assert "# PARTIAL: narrowed from an unfinished sweep" in open(os.path.join(path, "next_space.yaml")).read()

    result = runner.invoke(app, ["report", path])
    assert result.exit_code == 0, result.output
    page = open(os.path.join(path, "report", "index.html")).read()
    assert "PARTIAL: an unfinished sweep (1 of 10 trials finished)" in page

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        base, _ = command_layers(best)
    assert "is the best config of an unfinished sweep (1 of 10 trials finished)" in caplog.text
    assert build_config(base=base).to_dict() == build_config("sasrec", BASE).to_dict()  # `sweep:` is not config

    # A summary.yaml of an older rayrec (no status) is a complete sweep; trials without a
    # summary.yaml are an export that was cut off.
    summary = yaml.safe_load(open(os.path.join(path, "summary.yaml")))
    del summary["status"]
    write_yaml(os.path.join(path, "summary.yaml"), summary)
    assert not load_results(path).status.partial
    os.remove(os.path.join(path, "summary.yaml"))
    line = assert_user_error(runner.invoke(app, ["final", path]))
    assert "unfinished (its export was cut off)" in line
