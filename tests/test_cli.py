"""The command line: help, a complete run directory, warm starts, defaults that depend on the
data. Bad input (one line, exit status 2, nothing written) is tests/test_bad_input.py's table."""

from __future__ import annotations

import os

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY_DATA, set_flags
from rayrec.cli import app

runner = CliRunner()


def run(*args, **kwargs):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False, **kwargs)


TINY = set_flags([*TINY_DATA, "model.hidden=16", "model.blocks=1", "model.max_len=16"])


def test_help_lists_commands():
    # Each command's own summary line, which the app's description (it names train and sweep
    # too) does not contain: a stub app with only the description fails this.
    result = run("--help")
    assert result.exit_code == 0
    summaries = {
        "train": "Train one model with the shared trainer",
        "sweep": "Tune a model with Ray Tune",
        "models": "List the registered models",
        "narrow": "Write the next stage's search space",
        "report": "Write an HTML report",
    }
    text = " ".join(result.output.split())
    for command, summary in summaries.items():
        assert f"{command} {summary}" in text.replace("│", " ").replace("  ", " "), command


def test_train_writes_a_complete_run_directory(tmp_path):
    out = tmp_path / "run"
    result = run("train", "sasrec", "--epochs", 2, "--output", out, "--no-progress", *TINY)
    assert result.exit_code == 0, result.output
    assert "SYNTHETIC dataset" in result.output
    assert "test  (once)" in result.output
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.yaml", "metrics.parquet", "summary.yaml"]
    summary = yaml.safe_load((out / "summary.yaml").read_text())
    assert summary["epochs_run"] == 2 and summary["synthetic"] is True
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["train"]["epochs"] == 2 and config["model"]["name"] == "sasrec"

    import torch

    payload = torch.load(out / "checkpoint.pt", weights_only=True)
    assert payload["meta"]["fingerprint"] == summary["fingerprint"]
    assert payload["meta"]["model"] == "sasrec" and payload["meta"]["metric"] == "val_ndcg@10"

    # The recorded config reproduces the run, and a checkpoint warm-starts a new one: with a
    # negligible learning rate, the warm-started run ends where the checkpoint was, and a run
    # without --init-from (what a stub that ignored it would do) does not.
    def weights_after_one_epoch(name, *init):
        result = run("train", "--config", out / "config.yaml", "--output", tmp_path / name, "--no-progress",
                     "--epochs", 1, "--set", "train.lr=1e-12", *init)
        assert result.exit_code == 0, result.output
        return torch.load(tmp_path / name / "checkpoint.pt", weights_only=True)["model"]

    warm = weights_after_one_epoch("again", "--init-from", out / "checkpoint.pt")
    cold = weights_after_one_epoch("cold")
    assert warm.keys() == payload["model"].keys()
    assert all(torch.allclose(warm[k], v, atol=1e-6) for k, v in payload["model"].items())
    assert not all(torch.allclose(cold[k], v, atol=1e-3) for k, v in payload["model"].items())


def test_presplit_dataset_brings_its_split_for_models_without_a_default():
    from rayrec.config import build_config

    assert build_config("pop", overrides={"data.name": "gowalla"}).data.split == "ratio"
    assert build_config("pop", overrides={"data.name": "/x/gowalla", "data.format": "lightgcn"}).data.split == "ratio"
    assert build_config("pop", overrides={"data.name": "gowalla", "data.split": "loo"}).data.split == "loo"
    assert build_config("pop").data.split == "loo"
    assert build_config("sasrec", overrides={"data.name": "ml-1m"}).data.split == "loo"


def test_every_shipped_space_has_the_workflow_stages():
    from rayrec.tune.space import load_space

    for model in ("sasrec", "bert4rec", "gru4rec", "lightgcn", "bprmf", "pop"):
        space = load_space(model, None)
        for stage in ("smoke", "quick", "medium"):
            assert space.sweep_defaults(stage)["num_samples"] >= 1


NO_VALIDATION = ["--set", "data.split=ratio", "--set", "data.valid_ratio=0", "--set", "data.synthetic_users=100",
                 "--set", "data.synthetic_items=50", "--set", "data.synthetic_length=10", "--set", "model.hidden=8"]


def test_train_without_validation_users_says_it_selected_nothing(tmp_path):
    result = run("train", "bprmf", "--epochs", 3, "--set", "train.patience=1", "--output", tmp_path / "run",
                 "--no-progress", *NO_VALIDATION)
    assert result.exit_code == 0, result.output
    assert "stopped: finished after 3 epochs; selected: none (no validation users)" in result.output
    assert "valid (best epoch)" not in result.output
    assert "val none" in result.output and "nan" not in result.output  # epoch lines say so, not "recall@20 nan"


def _train_until(tmp_path, marker: str, *flags: str):
    """`rayrec train` in a process of its own, sent Ctrl-C (SIGINT) once its standard output
    shows `marker`; returns (exit status, standard output, standard error)."""
    import signal
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "rayrec", "train", "sasrec", "--output", str(tmp_path / "run"), "--no-progress", *flags]

    def ctrl_c_acts():
        # A test run started in the background by a non-interactive shell has SIGINT ignored,
        # and a Python started with it ignored installs no KeyboardInterrupt handler.
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    with open(tmp_path / "stderr.txt", "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, preexec_fn=ctrl_c_acts)
        lines = []
        try:
            for line in proc.stdout:
                lines.append(line)
                if marker in line:
                    proc.send_signal(signal.SIGINT)
                    break
            lines += proc.stdout.readlines()
            proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
    return proc.returncode, "".join(lines), (tmp_path / "stderr.txt").read_text()


def test_ctrl_c_during_train_keeps_a_run_of_the_epochs_that_ended(tmp_path):
    import pandas as pd
    import torch

    from rayrec.config import config_from_dict
    from rayrec.data import load_split
    from rayrec.train.trainer import Trainer

    code, output, errors = _train_until(tmp_path, "epoch   3/", "--epochs", "500", "--set", "train.patience=500", *TINY)
    assert code == 130, output + errors
    assert "interrupted after" in output and "test  (once)" in output and "Traceback" not in errors
    out = tmp_path / "run"
    assert sorted(os.listdir(out)) == ["checkpoint.pt", "config.yaml", "metrics.parquet", "summary.yaml"]
    summary = yaml.safe_load((out / "summary.yaml").read_text())
    history = pd.read_parquet(out / "metrics.parquet")
    assert summary["stop_reason"] == "interrupted" and 3 <= summary["epochs_run"] < 500
    assert list(history["epoch"]) == list(range(1, summary["epochs_run"] + 1))
    best = history.loc[history["val_ndcg@10"].idxmax()]
    assert summary["best_epoch"] == best["epoch"] and summary["valid"]["ndcg@10"] == pytest.approx(best["val_ndcg@10"])
    # The checkpoint holds the best epoch's weights, and they are what test measured once.
    cfg = config_from_dict(yaml.safe_load((out / "config.yaml").read_text()))
    trainer = Trainer(cfg, load_split(cfg.data), device="cpu")
    trainer.model.load_state_dict(torch.load(out / "checkpoint.pt", weights_only=True)["model"])
    assert trainer.evaluate("valid")["ndcg@10"] == pytest.approx(best["val_ndcg@10"], abs=1e-6)
    assert trainer.evaluate("test")["ndcg@10"] == pytest.approx(summary["test"]["ndcg@10"], abs=1e-6)


def test_ctrl_c_before_the_first_epoch_ends_writes_nothing(tmp_path):
    # A first epoch of several seconds: Ctrl-C arrives once the data is loaded, before it ends.
    code, output, errors = _train_until(tmp_path, "SYNTHETIC dataset", "--set", "data.synthetic_users=40000",
                                        "--set", "data.synthetic_length=60", "--set", "model.max_len=60")
    assert code == 130, output + errors
    assert errors.strip().splitlines() == ["error: interrupted before a run could be kept; nothing was written"]
    assert not (tmp_path / "run").exists()
