"""`rayrec train`: one run of the shared trainer, written to a run directory.

The run directory is built in a local temporary folder and published only when the run
has finished, so a bad input or a crash never leaves a half-written run behind:

    config.yaml      fully resolved config (defaults included); `--config` it to reproduce
    metrics.parquet  one row per epoch: train loss, lr, validation metrics, timings
    checkpoint.pt    best weights + metadata (model, config, dataset fingerprint, metric, time, version)
    summary.yaml     best validation metrics, test metrics (evaluated once), epochs, stop reason
    per_user.parquet with train.save_per_user: one row per (split, user) of the best weights'
                     validation and test evaluation (`per_user_frame`)
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import tempfile
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch

import rayrec
from rayrec.config import Config
from rayrec.data.types import SplitData
from rayrec.errors import UserError, first_line
from rayrec.experiment import utc_timestamp
from rayrec.train.evaluate import Ranking
from rayrec.train.trainer import FitResult, Trainer, load_state, save_state

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    output: str
    fit: FitResult
    tests: dict[str, dict[str, float]]  # Trainer.test_report(): 'test' (all users), 'test_<group>' ...
    config: Config

    @property
    def test_metrics(self) -> dict[str, float]:
        """Test metrics on all users."""
        return self.tests["test"]


def checkpoint_payload(trainer: Trainer, fit: FitResult) -> dict[str, Any]:
    """Best weights with the metadata that makes a saved model self-describing (field-lessons §11)."""
    cfg = trainer.cfg
    metric = f"val_{cfg.train.metric}"
    return {
        "model": {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()},
        "meta": {
            "model": cfg.model_name,
            "config": cfg.to_dict(),
            "dataset": trainer.data.name,
            "fingerprint": trainer.data.fingerprint,
            "metric": metric,
            "metric_value": float(fit.best_metrics.get(metric, float("nan"))),
            "best_epoch": fit.best_epoch,
            "time": utc_timestamp(),
            "rayrec_version": rayrec.__version__,
            "torch_version": str(torch.__version__),
        },
    }


def load_checkpoint(url: str) -> dict[str, Any]:
    """Read a checkpoint.pt, or a sweep's best checkpoint given the sweep's directory (path or URL)."""
    from rayrec.experiment import is_sweep_dir

    if is_sweep_dir(url):
        return sweep_best_checkpoint(url)
    payload = load_state(url)
    if not isinstance(payload, dict) or "model" not in payload or "meta" not in payload:
        raise UserError(f"{url} is not a rayrec checkpoint (expected keys 'model' and 'meta')")
    return payload


def sweep_best_checkpoint(url: str) -> dict[str, Any]:
    """The best trial's best weights from a finished sweep, with the sweep's model and dataset as metadata."""
    from rayrec.config import unflatten
    from rayrec.experiment import STATE_FILE, SUMMARY_FILE, warn_if_unfinished
    from rayrec.storage import join, read_yaml

    warn_if_unfinished(url)  # the best so far of an interrupted sweep still warm-starts, said so
    summary = read_yaml(join(url, SUMMARY_FILE))
    best = summary.get("best") or {}
    if not best.get("checkpoint"):
        raise UserError(f"sweep {url} recorded no best checkpoint in summary.yaml (no trial reported a checkpoint)")
    state = load_state(join(best["checkpoint"], STATE_FILE))
    meta = {"model": summary["model"], "fingerprint": summary["fingerprint"], "config": unflatten(best["config"]),
            "dataset": summary.get("dataset"), "metric": best.get("metric"), "metric_value": best.get("value"),
            "trial_id": best.get("trial_id")}
    return {"model": state.get("best_model") or state["model"], "meta": meta}


def warm_start_checkpoint(url: str, model_name: str) -> dict[str, Any]:
    """The checkpoint `--init-from` names, read and checked against the run's model: done
    before the data is loaded, so a wrong path or model fails at once."""
    payload = load_checkpoint(url)
    if payload["meta"]["model"] != model_name:
        raise UserError(f"--init-from checkpoint is a '{payload['meta']['model']}' model, not '{model_name}'")
    return payload


def init_from_checkpoint(trainer: Trainer, payload: dict[str, Any]) -> None:
    """Warm-start a trainer's model from a checkpoint (warm_start_checkpoint) whose dataset and shapes match."""
    meta = payload["meta"]
    if meta["fingerprint"] != trainer.data.fingerprint:
        raise UserError(
            f"--init-from checkpoint was trained on dataset fingerprint {meta['fingerprint'][:12]}, "
            f"this run's data is {trainer.data.fingerprint[:12]}; item ids would not line up"
        )
    try:
        trainer.model.load_state_dict(payload["model"])
    except RuntimeError as exc:
        # torch lists every mismatch after a header line; the first one names a tensor and both shapes.
        lines = [line.strip() for line in str(exc).splitlines()[1:] if line.strip()] or [first_line(exc, typed=False)]
        detail = lines[0] if len(lines[0]) <= 200 else lines[0][:200] + " ..."
        raise UserError(f"--init-from checkpoint does not fit this model's shape: {detail}") from None


def default_output(cfg: Config) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{cfg.model_name}-{cfg.data.name.replace('/', '_')}-{stamp}")


def train_run(
    cfg: Config,
    data: SplitData,
    output: str | None = None,
    init_from: dict[str, Any] | None = None,
    on_epoch: Callable[[Trainer, dict[str, Any]], Any] | None = None,
    progress: bool = False,
) -> RunResult:
    """Train, evaluate the best weights on test once, and publish the run directory.
    Ctrl-C after the first epoch ends the run there, as a run of the epochs that ended
    (stop_reason 'interrupted'); before it, KeyboardInterrupt propagates and nothing is written.
    `init_from`: a checkpoint from warm_start_checkpoint, whose weights the model starts from."""
    from rayrec.storage import check_writable, publish_dir, write_parquet, write_yaml

    output = output or default_output(cfg)
    check_writable(output, must_not_exist=True)
    trainer = Trainer(cfg, data)
    if init_from:
        init_from_checkpoint(trainer, init_from)
    try:
        fit = trainer.fit(on_epoch=on_epoch, progress=progress)
    except KeyboardInterrupt:
        fit = trainer.interrupted()  # Ctrl-C: the run of the epochs that ended, tested once
        if fit is None:  # no epoch ended: nothing to keep, nothing written
            raise
    per_user = cfg.train.save_per_user
    rankings = trainer.test_rankings(per_user=per_user)
    tests = {section: ranking.metrics for section, ranking in rankings.items()}
    with tempfile.TemporaryDirectory(prefix="rayrec-run-") as tmp:
        if per_user:
            valid = trainer.evaluation("valid", per_user=True) if trainer.has_validation else None
            write_parquet(os.path.join(tmp, PER_USER_FILE), per_user_frame(valid, rankings["test"], data))
        write_yaml(os.path.join(tmp, "config.yaml"), cfg.to_dict())
        write_parquet(os.path.join(tmp, "metrics.parquet"), fit.history)
        save_state(checkpoint_payload(trainer, fit), os.path.join(tmp, "checkpoint.pt"))
        summary = {
            "model": cfg.model_name,
            "dataset": data.name,
            "synthetic": bool(data.info.get("synthetic", False)),
            "fingerprint": data.fingerprint,
            "best_epoch": fit.best_epoch,
            "epochs_run": fit.epochs_run,
            "stop_reason": fit.stop_reason,
            "selection": fit.selection,
            "valid": {k.removeprefix("val_"): float(v) for k, v in fit.best_metrics.items()},
            **plain_sections(tests),
            "rayrec_version": rayrec.__version__,
        }
        write_yaml(os.path.join(tmp, "summary.yaml"), summary)
        publish_dir(tmp, output)
    return RunResult(output=output, fit=fit, tests=tests, config=cfg)


PER_USER_FILE = "per_user.parquet"


def per_user_frame(valid: Ranking | None, test: Ranking, data: SplitData):
    """One row per (split, user): 'split' ('valid' | 'test'), 'user', 'in_<group>' for each
    test group of the dataset, 'n_targets', 'rank' and each per-user metric (Ranking)."""
    import pandas as pd

    frames = []
    for split, ranking in (("valid", valid), ("test", test)):
        if ranking is None or ranking.per_user is None:
            continue
        frame = pd.DataFrame(ranking.per_user)
        frame.insert(0, "split", split)
        for offset, (name, users) in enumerate(data.test_groups.items()):
            frame.insert(2 + offset, f"in_{name}", np.isin(frame["user"].to_numpy(), users))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def plain_sections(tests: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """Test sections as plain floats, for YAML records."""
    return {section: {k: float(v) for k, v in metrics.items()} for section, metrics in tests.items()}
