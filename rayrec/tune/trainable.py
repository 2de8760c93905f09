"""The function trainable every sweep trial runs: the shared trainer, reporting every epoch.

- Every epoch reports validation metrics (never test ones), so ASHA can prune early.
- Every `checkpoint_every` epochs it checkpoints the full trainer state; PBT's perturbation
  interval equals that interval, so an exploit always finds the donor's checkpoint.
- It resumes from `tune.get_checkpoint()` (retry after a failure, sweep resume, or a PBT
  exploit), then writes the trial's own (possibly mutated) lr and weight decay into the
  restored optimiser (Trainer.apply_hyperparameters; lr is set before every step anyway).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import tempfile
import time
from typing import Any

import numpy as np
import torch
from ray import get_runtime_context, tune

from rayrec.config import build_config
from rayrec.data.types import SplitData
from rayrec.errors import UserError
from rayrec.train.trainer import Trainer, load_state, save_state

log = logging.getLogger(__name__)

STATE_FILE = "trainer.pt"


def weights_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the weights, reported so tests can follow PBT's weight copies."""
    with torch.no_grad():
        total = 0.0
        for i, v in enumerate(model.state_dict().values()):
            if v.is_floating_point():
                total += float(v.double().sum()) * (1.0 + 1e-3 * i)
    return round(total, 6)


def trial_device() -> tuple[str, list]:
    """The device Ray assigned: CUDA when this trial holds a GPU that torch can see, else CPU.

    Ray 2.60 no longer hides GPUs from gpu=0 trials (ray-notes §6), so torch.cuda.is_available()
    alone would let a CPU trial grab a GPU; the assignment decides.
    """
    import ray

    gpu_ids = ray.get_gpu_ids()
    if gpu_ids and torch.cuda.is_available():
        return "cuda", gpu_ids
    if gpu_ids:
        log.warning("trial was assigned GPU %s but torch sees no CUDA device; running on CPU", gpu_ids)
    return "cpu", gpu_ids


def resolve_trial_config(model: str, base: dict[str, Any], sampled: dict[str, Any], threads: int, device: str):
    """The fully resolved config a trial trains with, device and thread count included, so
    `rayrec train --config best.yaml` repeats the trial exactly (field-lessons §2)."""
    overrides = {k: v for k, v in sampled.items() if not k.startswith("_")}
    overrides.setdefault("train.num_threads", threads)
    overrides["train.device"] = device
    return build_config(model, base, overrides)


def train_trial(config: dict[str, Any], data: SplitData | None = None, model: str = "", base: dict | None = None,
                checkpoint_every: int = 1, cpus_per_trial: float = 1.0) -> None:
    """Ray Tune function trainable. `config` holds dotted config keys sampled by the searcher.

    Keys starting with '_' are control values, not config: `_fail_at_epoch` makes the trial
    raise once at that epoch (used by the tests of retry-from-checkpoint).
    """
    fail_at_epoch = int(config.get("_fail_at_epoch", 0) or 0)
    started = time.time()
    device, gpu_ids = trial_device()
    threads = max(1, int(math.ceil(cpus_per_trial)))
    cfg = resolve_trial_config(model, base or {}, config, threads, device)
    torch.set_num_threads(cfg.train.num_threads)
    trainer = Trainer(cfg, data, device=device)

    restored: dict[str, Any] = {}
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(os.path.join(d, STATE_FILE), trainer.device)
        trainer.load_state_dict(state)  # also applies this trial's weight decay to the optimiser
        restored = {
            "restored_epoch": trainer.epoch,
            "restored_checksum": weights_checksum(trainer.model),
        }
    # Trials that resume must not re-run the epochs they already reported.
    reported = {"first": True}

    def on_epoch(tr: Trainer, record: dict[str, Any]) -> None:
        epoch = record["epoch"]
        if fail_at_epoch and epoch == fail_at_epoch and _first_attempt():
            raise RuntimeError(f"injected failure at epoch {epoch} (test hook)")
        metrics = {k: _scalar(v) for k, v in record.items() if not k.startswith("test")}
        metrics["stop_reason"] = tr.stop_reason
        metrics["weights_checksum"] = weights_checksum(tr.model)
        metrics["optimizer_lr"] = tr.optimizer.param_groups[0]["lr"] if tr.optimizer is not None else float("nan")
        metrics["optimizer_weight_decay"] = tr.optimizer.param_groups[0]["weight_decay"] if tr.optimizer is not None else float("nan")
        metrics["config_lr"] = cfg.train.lr
        metrics["config_weight_decay"] = cfg.train.weight_decay
        metrics["device"] = device
        metrics["gpu_ids"] = ",".join(str(g) for g in gpu_ids)
        metrics["pid"] = os.getpid()
        metrics["node_id"] = get_runtime_context().get_node_id()  # which node ran this epoch
        metrics["trial_started"] = started  # wall clock, to see which trials ran at once
        metrics["reported_at"] = time.time()
        if reported["first"]:
            metrics.update(restored or {"restored_epoch": 0, "restored_checksum": float("nan")})
            reported["first"] = False
        last = bool(tr.stop_reason) or epoch >= cfg.train.epochs
        if epoch % checkpoint_every == 0 or last:
            with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as d:
                save_state(tr.state_dict(), os.path.join(d, STATE_FILE))
                tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        else:
            tune.report(metrics)

    trainer.fit(on_epoch=on_epoch)


def _first_attempt() -> bool:
    # The failure-injection hook fires once: a marker file in the trial dir remembers it.
    marker = os.path.join(tune.get_context().get_trial_dir(), ".rayrec_failed_once")
    if os.path.exists(marker):
        return False
    with open(marker, "w") as fh:
        fh.write("1")
    return True


def _scalar(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def evaluate_checkpoint_on_test(checkpoint_dir: str, resolved: dict[str, Any], data: SplitData) -> dict[str, float]:
    """Load a trial's checkpoint (its best weights) and evaluate on test, once, after the sweep."""
    from rayrec.config import config_from_dict

    cfg = config_from_dict(resolved)
    trainer = Trainer(cfg, data, device="cpu" if not torch.cuda.is_available() else None)
    state = load_state(os.path.join(checkpoint_dir, STATE_FILE), trainer.device)
    trainer.load_state_dict(state)
    if trainer.best_state:
        trainer.model.load_state_dict(trainer.best_state)
    return trainer.test()


def state_digest(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha256(fh.read()).hexdigest()
