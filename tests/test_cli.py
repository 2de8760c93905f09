"""The command line: bad input is one line on stderr, exit status 2, no traceback, nothing written."""

from __future__ import annotations

import os

import pytest
import yaml
from typer.testing import CliRunner

from conftest import TINY_DATA, assert_user_error, set_flags
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


def _nothing_written(tmp_path, out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".run.partial")]


@pytest.mark.parametrize("args, fragments", [
    (["train", "nosuchmodel"], ["unknown model 'nosuchmodel'", "sasrec"]),
    (["train", "sasrec", "--set", "train.lrr=1"], ["unknown key 'train.lrr'", "train.lr"]),
    (["train", "sasrec", "--set", "train.epochs=many"], ["train.epochs must be a number"]),
    (["train", "sasrec", "--set", "noequals"], ["--set expects key=value"]),
    (["train", "sasrec", "--data", "no-such-dataset"], ["unknown dataset 'no-such-dataset'", "synthetic"]),
    (["train", "sasrec", "--data", "/nonexistent/ratings.csv", "--format", "csv"], ["/nonexistent/ratings.csv"]),
    (["train", "sasrec", "--config", "/nonexistent/best.yaml"], ["config file not found"]),
    (["sweep", "nosuchmodel"], ["unknown model 'nosuchmodel'"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, fragments):
    out = tmp_path / "run"
    result = run(*args, "--output" if args[0] == "train" else "--storage", out)
    assert_user_error(result, *fragments)
    assert not out.exists()


def test_bad_data_files(tmp_path):
    out = tmp_path / "run"
    garbled = tmp_path / "garbled.csv"
    garbled.write_bytes(b"\x00\x01\x02 not a table")
    assert_user_error(run("train", "sasrec", "--data", garbled, "--format", "pairs", "--output", out), "pairs")
    table = tmp_path / "ratings.csv"
    table.write_text("uid,iid,ts\n1,2,3\n")
    result = run("train", "sasrec", "--data", table, "--format", "csv", "--set", "data.columns={user: uid, item: item_id, timestamp: ts}", "--output", out)
    assert_user_error(result, "item_id")
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("user,item,timestamp\n1,1,1\n1,2,2\n2,1,3\n")
    result = run("train", "sasrec", "--data", tiny, "--format", "csv",
                 "--set", "data.columns={user: user, item: item, timestamp: timestamp}", "--output", out)
    assert_user_error(result, "user_core")
    assert not out.exists()


def test_unwritable_cache_and_output(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    result = run("train", "sasrec", "--set", f"data.cache_dir={blocker}/cache", "--output", tmp_path / "run")
    assert_user_error(result, "cache")
    result = run("train", "sasrec", "--output", blocker / "run", *TINY)
    assert_user_error(result, "cannot write")


def test_sequential_model_on_unordered_data_is_refused(tmp_path):
    table = tmp_path / "ratings.csv"
    rows = ["user,item"] + [f"{u},{i}" for u in range(30) for i in range(1, 12)]
    table.write_text("\n".join(rows) + "\n")
    result = run("train", "sasrec", "--data", table, "--format", "csv",
                 "--set", "data.columns={user: user, item: item}", "--output", tmp_path / "run")
    assert_user_error(result, "sequential", "time order")


@pytest.mark.parametrize("space, fragments", [
    ({"model": "sasrec", "params": {"train.lr": {"dist": "loguniform", "low": 0.0, "high": 0.1}}}, ["log-scaled", "low=0"]),
    ({"model": "sasrec", "params": {"train.lr": {"dist": "uniform", "low": 0.1, "high": 0.01}}}, ["low >= high"]),
    ({"model": "sasrec", "params": {"train.lr": {"dist": "gaussian", "low": 0.1, "high": 0.2}}}, ["unknown dist 'gaussian'"]),
    ({"model": "sasrec", "params": {"model.loss": {"dist": "choice", "values": []}}}, ["choice with no values"]),
    ({"model": "sasrec", "params": {"train.lrr": {"dist": "uniform", "low": 0.1, "high": 0.2}}}, ["unknown key 'train.lrr'"]),
    ({"model": "sasrec", "bogus": 1, "params": {}}, ["unknown key 'bogus'"]),
    ({"model": "sasrec", "params": {"model.hidden": {"dist": "choice", "values": [16, 32]}},
      "pbt": {"mutate": ["model.hidden"]}}, ["changes the model's parameter shapes"]),
])
def test_search_space_schema_errors(tmp_path, space, fragments):
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    storage = tmp_path / "sweeps"
    assert_user_error(run("sweep", "sasrec", "--space", path, "--storage", storage), *fragments)
    assert not storage.exists()


def test_sweep_option_errors_before_ray_starts(tmp_path):
    storage = tmp_path / "sweeps"
    assert_user_error(run("sweep", "sasrec", "--scheduler", "pbt", "--search", "hyperopt", "--storage", storage),
                      "pbt", "hyperopt")
    assert_user_error(run("sweep", "sasrec", "--scheduler", "median", "--storage", storage), "median", "asha")
    assert_user_error(run("sweep", "sasrec", "--resume", "--name", "ghost", "--storage", storage), "ghost")
    assert not storage.exists() or not any(storage.iterdir())


def test_gpu_request_without_gpus_fails_at_start(tmp_path):
    import subprocess
    import sys

    storage = tmp_path / "sweeps"
    proc = subprocess.run([sys.executable, "-m", "rayrec", "sweep", "sasrec", "--gpus-per-trial", "0.5",
                           "--storage", str(storage)], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "CUDA_VISIBLE_DEVICES": ""})
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "no GPU" in proc.stderr and "Traceback" not in proc.stderr
    assert not storage.exists() or not any(storage.iterdir())


def test_sweep_takes_format_and_stage_errors_name_the_space(tmp_path):
    storage = tmp_path / "sweeps"
    table = tmp_path / "events.txt"
    table.write_text("1 2\n")
    # --format reaches the data reader (refused before Ray starts: no such reader).
    assert_user_error(run("sweep", "sasrec", "--data", table, "--format", "bogus", "--storage", storage),
                      "data.format 'bogus'")
    no_stages = tmp_path / "space.yaml"
    no_stages.write_text(yaml.safe_dump({"model": "sasrec", "params": {}}))
    assert_user_error(run("sweep", "sasrec", "--space", no_stages, "--stage", "quick", "--storage", storage),
                      "has no stages", "drop --stage")
    assert not storage.exists() or not any(storage.iterdir())


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


def test_sweep_without_validation_users_is_refused_before_ray_starts(tmp_path, monkeypatch):
    from rayrec.tune import sweep

    def no_ray(*args, **kwargs):  # whether or not an earlier test started the shared Ray
        raise AssertionError("the sweep reached connect_ray before refusing")

    monkeypatch.setattr(sweep, "connect_ray", no_ray)
    storage = tmp_path / "sweeps"
    result = run("sweep", "bprmf", "--stage", "smoke", "--name", "nv", "--storage", storage, "--wandb", "off",
                 *NO_VALIDATION)
    assert_user_error(result, "no validation users", "data.valid_ratio")
    assert not (storage / "nv").exists()
