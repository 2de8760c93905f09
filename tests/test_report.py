"""`rayrec report` on hand-made sweep tables (no Ray): every figure is a real PNG the HTML
references, PBT lineage and confirmation appear when their data exist, any storage URL works."""

from __future__ import annotations

import os
import re

import numpy as np
import pandas as pd
import yaml
from typer.testing import CliRunner

from conftest import assert_user_error, config, ten_trials, write_sweep
from rayrec.cli import app
from rayrec.report import build_report

PNG = b"\x89PNG\r\n\x1a\n"
runner = CliRunner()


def asha_trials():
    """12 trials: most pruned at epoch 1 or 2, three reach epoch 4 (max)."""
    rng = np.random.default_rng(0)
    trials, rows = [], []
    for i in range(12):
        epochs = 4 if i < 3 else (2 if i < 6 else 1)
        status = "finished" if epochs == 4 else "pruned"
        curve = [0.1 + 0.05 * e + 0.02 * (12 - i) / 12 for e in range(1, epochs + 1)]
        tid = f"a{i:02d}"
        trials.append(dict(trial_id=tid, value=max(curve), status=status, epochs=epochs,
                           config=config(10 ** rng.uniform(-4, -2), rng.uniform(0.1, 0.5), 1 + i % 3,
                                         ["ce", "bce", "sampled_softmax"][i % 3], 0.02)))
        rows += [{"trial_id": tid, "epoch": e, "val_ndcg@10": v, "train_ndcg@10": v + 0.01, "val_coverage@10": 0.5,
                  "train_loss": 3.0 - 0.2 * e} for e, v in enumerate(curve, start=1)]
    return trials, pd.DataFrame(rows)


def check_report(output: str, html: str) -> list[str]:
    """Every image the HTML references exists and is a non-empty PNG, and every PNG is referenced."""
    sources = re.findall(r"<img src='([^']+)'", html)
    assert sources, "no figures in the report"
    for name in sources:
        data = open(os.path.join(output, name), "rb").read()
        assert data.startswith(PNG) and len(data) > 5000, name
    on_disk = sorted(f for f in os.listdir(output) if f.endswith(".png"))
    assert sorted(sources) == on_disk
    return sources


def test_report_of_an_asha_sweep_with_confirmation_and_final(tmp_path):
    trials, history = asha_trials()
    path = write_sweep(tmp_path, trials, history=history, scheduler="asha")
    pd.DataFrame({"candidate": ["rank1"] * 3 + ["rank2"] * 3, "trial_id": ["a00"] * 3 + ["a01"] * 3,
                  "seed": [42, 43, 44] * 2, "tuning_value": [0.32] * 3 + [0.31] * 3,
                  "val_ndcg@10": [0.31, 0.315, 0.32, 0.30, 0.29, 0.305]}).to_parquet(os.path.join(path, "confirm.parquet"))
    with open(os.path.join(path, "final.yaml"), "w") as fh:
        yaml.safe_dump({"config_name": "best", "test": {"ndcg@10": 0.3, "hr@10": 0.5}, "timestamp": "now",
                        "final_history": [{"config_name": "robust", "test": {"ndcg@10": 0.29}, "forced": True}]}, fh)
    result = runner.invoke(app, ["report", path])
    assert result.exit_code == 0, result.output
    output = os.path.join(path, "report")
    html = open(os.path.join(output, "index.html")).read()
    sources = check_report(output, html)
    assert set(sources) == {"learning_curves.png", "rung_survival.png", "parallel_coordinates.png",
                            "importance.png", "confirmation.png"}
    assert "Diagnostics" in html and "a00" in html and "Evaluated on test again with --force" in html
    assert pd.read_parquet(os.path.join(output, "diagnostics.parquet"))["trial_id"].nunique() == 12


def test_report_of_a_pbt_sweep_draws_the_lineage_and_says_when_importance_is_unknown(tmp_path):
    rows = []
    for tid, lr, checksums in (("p0", 1e-3, [1.0, 2.0, 3.0, 4.0]), ("p1", 1e-2, [5.0, 6.0, 2.5, 2.7])):
        for e, c in enumerate(checksums, start=1):
            rows.append({"trial_id": tid, "epoch": e, "val_ndcg@10": 0.1 * e, "weights_checksum": c,
                         "restored_epoch": 0 if e == 1 else np.nan, "restored_checksum": np.nan, "config_lr": lr})
    rows[6].update(restored_epoch=2, restored_checksum=2.0, config_lr=1.2e-3)  # p1 clones p0 at epoch 2
    trials = [dict(trial_id="p0", value=0.4, config=config(1e-3)), dict(trial_id="p1", value=0.4, config=config(1.2e-3))]
    path = write_sweep(tmp_path, trials, history=pd.DataFrame(rows), scheduler="pbt")
    out = tmp_path / "elsewhere"
    report = build_report(path, output=str(out))
    html = open(report.index).read()
    sources = check_report(str(out), html)
    assert "pbt_lineage.png" in sources and "importance.png" not in sources
    assert "p0" in html and "lr 0.001-&gt;0.0012" in html  # the lineage table: donor p0, its lr perturbed
    assert "not computed: 2 completed trials" in html


def test_report_reads_and_writes_any_storage_url(tmp_path):
    import fsspec

    local = write_sweep(tmp_path, ten_trials())
    fs = fsspec.filesystem("memory")
    for name in os.listdir(local):
        fs.put_file(os.path.join(local, name), f"/bucket/sweeps/hand/{name}")
    result = runner.invoke(app, ["report", "hand", "--storage", "memory://bucket/sweeps"])
    assert result.exit_code == 0, result.output
    assert fs.cat_file("/bucket/sweeps/hand/report/index.html").startswith(b"<!DOCTYPE html>")
    assert fs.cat_file("/bucket/sweeps/hand/report/learning_curves.png").startswith(PNG)
    fs.rm("/bucket", recursive=True)


def test_report_of_a_sweep_without_completed_trials_is_a_assert_user_error(tmp_path):
    trials = [dict(value=float("nan"), status="errored", error="RuntimeError: boom", config=config(1e-3))] * 3
    path = write_sweep(tmp_path, trials, history=pd.DataFrame({"trial_id": [], "epoch": []}))
    line = assert_user_error(runner.invoke(app, ["report", path]))
    assert "0 completed trial(s)" in line and "errored 3" in line and "boom" in line
    assert not os.path.exists(os.path.join(path, "report"))
