"""The one trainer: every `rayrec train` run and every sweep trial goes through `Trainer.fit`.

It knows models, metrics and data, never Ray: the tuning layer plugs in through the
`on_epoch` callback, which sees each epoch's record and may save the trainer's state.

Reproducibility rules (field-lessons §2):
- every epoch starts by seeding torch and numpy from (seed, epoch), so the state at an
  epoch boundary (weights, optimiser moments, epoch counter, early-stopping state) fully
  determines the rest of the run: save at epoch k, restore in a fresh process, finish, and
  the metrics equal those of a straight run (tested on CPU);
- the learning rate is a pure function of (config, progress), set before every step, so
  nothing about the schedule hides in optimiser state and a PBT mutation of train.lr takes
  effect immediately after an exploit.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from rayrec.config import Config, metric_mode
from rayrec.data.types import SplitData
from rayrec.errors import UserError
from rayrec.models import build_model
from rayrec.train.allocator import keep_freed_memory
from rayrec.train.evaluate import Ranking, batch_to_device, evaluate_on_train, evaluation

log = logging.getLogger(__name__)

STATE_VERSION = 1
NO_SELECTION = "none (no validation users)"  # FitResult.selection of a run without validation users


def resolve_device(requested: str) -> torch.device:
    """'auto' is CUDA when torch sees a GPU, else CPU; an explicit CUDA request without one is a UserError."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={requested} but no CUDA GPU is visible here; valid: cpu, auto")
    return torch.device(requested)


def lr_factor(progress: float, epochs: int, warmup_epochs: float, schedule: str, min_ratio: float) -> float:
    """Multiplier of the peak lr at `progress` epochs (fractional): linear warm-up, then cosine or constant.

    `epochs` is the schedule's horizon (TrainConfig.schedule_horizon). Warm-up is capped at 20%
    of it so that a short run still spends most steps decaying.
    """
    warm = min(warmup_epochs, 0.2 * epochs)
    if warm > 0 and progress < warm:
        return progress / warm
    if schedule == "constant":
        return 1.0
    span = max(epochs - warm, 1e-9)
    t = min(max((progress - warm) / span, 0.0), 1.0)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))


@dataclass
class EarlyStopping:
    """Stop when `metric` has not improved by more than `min_delta` for `patience` epochs.

    mode 'max' (ranking metrics) or 'min' (errors: rmse, mae; config.metric_mode).
    """

    patience: int
    min_delta: float
    mode: str = "max"
    best: float = -math.inf
    best_epoch: int = 0
    bad_epochs: int = 0

    def __post_init__(self):
        if self.mode == "min":
            self.best = math.inf

    def update(self, value: float, epoch: int) -> bool:
        """Record an epoch's value; True when it is a new best."""
        better = value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta
        if better:
            self.best, self.best_epoch, self.bad_epochs = value, epoch, 0
            return True
        self.bad_epochs += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.bad_epochs >= self.patience


@dataclass
class FitResult:
    best_epoch: int
    best_metrics: dict[str, float]  # validation metrics at the best epoch ('val_' keys)
    last_metrics: dict[str, float]
    epochs_run: int
    stop_reason: str  # 'early_stopped' | 'finished' | 'stopped' | 'interrupted' (Ctrl-C, Trainer.interrupted)
    # How best_epoch was chosen: 'best val_<metric>', or NO_SELECTION when the data has no
    # validation users (every epoch of the budget trained, best_epoch = the last one, its
    # weights kept, best_metrics empty).
    selection: str
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    """Owns the loop; the model owns the maths (RecModel.train_batches / loss / score)."""

    def __init__(self, cfg: Config, data: SplitData, device: str | torch.device | None = None):
        self.cfg = cfg
        self.data = data
        tc = cfg.train
        self.device = torch.device(device) if device is not None else resolve_device(tc.device)
        if tc.num_threads > 0:
            torch.set_num_threads(tc.num_threads)
        keep_freed_memory()  # large per-step tensors reuse warm memory (see rayrec/train/allocator.py)
        torch.manual_seed(tc.seed)  # model init depends only on the seed
        self.model = build_model(cfg.model_name, cfg.model, data).to(self.device)
        self.optimizer = None if self.model.fits_itself else self._make_optimizer()
        self.amp_dtype = self._amp_dtype()
        self.scaler = torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None
        self.epoch = 0  # epochs completed
        self.stopper = EarlyStopping(tc.patience, tc.min_delta, metric_mode(tc.metric))
        # Without validation users every validation metric is NaN: nothing to select or stop on.
        self.has_validation = len(data.eval_users("valid")) > 0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.history: list[dict[str, Any]] = []
        self._settled: tuple | None = None  # (epoch, best_state, best_epoch, best, len(history)) after each epoch
        self.stop_reason = ""
        self._train_users = self._fixed_train_users()
        self.evaluations: dict[str, int] = {}  # full evaluations run, by split ('test' should stay at 1 per run)

    # --- set-up -------------------------------------------------------------------------
    def _make_optimizer(self) -> torch.optim.Optimizer:
        own = self.model.make_optimizer(self.cfg.train.lr)
        if own is not None:
            return own
        # Decay matrices and embeddings, not biases or LayerNorm gains (standard AdamW practice).
        decay, no_decay = [], []
        for p in self.model.parameters():
            if p.requires_grad:
                (decay if p.dim() >= 2 else no_decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.train.weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        # The fused kernel is AdamW's algorithm in one pass over each tensor (equal to the
        # per-tensor loop up to float rounding, ~1e-8); on CPU the default per-tensor loop makes
        # about eight passes and costs 10x more, which dominates a step over big embedding tables.
        fused = self.device.type in ("cpu", "cuda") and all(p.is_floating_point() for g in groups for p in g["params"])
        return torch.optim.AdamW(groups, lr=self.cfg.train.lr, fused=fused or None)

    def _amp_dtype(self) -> torch.dtype | None:
        tc = self.cfg.train
        if self.device.type == "cpu":
            if not tc.cpu_amp:
                return None
            if not cpu_has_native_bf16():
                log.warning("train.cpu_amp: this CPU has no native bf16 (avx512_bf16/AMX); bf16 runs emulated and slower")
            return torch.bfloat16
        if not tc.amp or self.device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def _fixed_train_users(self) -> np.ndarray:
        n = self.cfg.train.train_eval_users
        if n <= 0:
            return np.zeros(0, dtype=np.int64)
        eligible = np.flatnonzero(self.data.train.lengths() >= 2)
        rng = np.random.default_rng(self.cfg.train.seed)
        return np.sort(rng.choice(eligible, size=min(n, len(eligible)), replace=False))

    def apply_hyperparameters(self) -> None:
        """Push config values that live in the optimiser (weight decay) into it.

        Called after restoring state, so a config mutated by PBT overrides the donor's
        optimiser settings; lr needs nothing here because it is set before every step.
        """
        if self.optimizer is not None:
            self.optimizer.param_groups[0]["weight_decay"] = self.cfg.train.weight_decay

    # --- the loop -----------------------------------------------------------------------
    def fit(self, on_epoch: Callable[["Trainer", dict[str, Any]], bool | None] | None = None,
            progress: bool = False) -> FitResult:
        """Train until `train.epochs` (one epoch for a closed-form model), early stopping, or
        `on_epoch` returning True.

        Without validation users there is no early stopping: the whole budget trains and
        the final weights are kept (FitResult.selection says NO_SELECTION).

        `on_epoch(trainer, record)` runs after every epoch's validation, with the trainer's
        state already advanced, so it can save `trainer.state_dict()` for an exact resume.
        """
        self.stop_reason = ""  # a run paused by on_epoch and restored continues from here
        while not self.finished:
            start = time.perf_counter()
            loss, lr = self.train_epoch(self.epoch, progress=progress)
            record = self._record(self.epoch, loss, lr, start)
            self.epoch += 1
            if self._track_best(record):
                self.best_state = self._weights()
            record["best_epoch"] = self.stopper.best_epoch
            # The epoch's bookkeeping is complete: what an interrupted fit keeps (`interrupted`).
            # One assignment, so a Ctrl-C sees all of it or none.
            self._settled = (self.epoch, self.best_state, self.stopper.best_epoch, self.stopper.best, len(self.history))
            if self.stopper.should_stop:
                self.stop_reason = "early_stopped"
            elif self.epoch >= self.epoch_budget:
                self.stop_reason = "finished"
            if on_epoch is not None and on_epoch(self, record) and not self.stop_reason:
                # Paused by the caller: keep the current weights so state_dict() can resume.
                self.stop_reason = "stopped"
                return self._result()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self._result()

    def _track_best(self, record: dict[str, Any]) -> bool:
        """Early-stopping bookkeeping for the epoch just ended; True when it is the new best.

        Without validation users nothing is selected: the latest epoch stands as best_epoch,
        patience never runs out (the whole budget trains) and fit keeps the final weights
        (as the epoch's "best" state, so that an interrupted fit keeps a whole epoch's).
        """
        if not self.has_validation:
            self.stopper.best_epoch = self.epoch
            return True
        return self.stopper.update(record[f"val_{self.cfg.train.metric}"], self.epoch)

    def interrupted(self) -> FitResult | None:
        """End a fit that Ctrl-C cut short (KeyboardInterrupt out of `fit`) as a run of the
        epochs whose bookkeeping completed: their best weights (the last epoch's without
        validation) are loaded, not the half-trained ones of the epoch it stopped in, and an
        epoch cut short between its validation and its selection is dropped. None when no
        epoch of this fit completed."""
        if self._settled is None:
            return None
        self.epoch, self.best_state, self.stopper.best_epoch, self.stopper.best, n = self._settled
        del self.history[n:]
        self.stop_reason = "interrupted"
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self._result()

    @property
    def epoch_budget(self) -> int:
        """Epochs this run may train: train.epochs, or 1 for a closed-form model (one solve)."""
        return 1 if self.model.closed_form else self.cfg.train.epochs

    @property
    def finished(self) -> bool:
        """No epoch left: the epoch budget is spent or early stopping has triggered."""
        return self.epoch >= self.epoch_budget or self.stopper.should_stop

    def train_epoch(self, epoch: int, progress: bool = False) -> tuple[float, float]:
        """One pass over the training batches; returns (mean loss, lr at the end).

        A model that fits itself (RecModel.fits_itself) does its `fit_epoch` instead: one
        closed-form solve or solver iteration; its loss is the objective it reports, its lr NaN.
        """
        tc = self.cfg.train
        seed_epoch(tc.seed, epoch)
        rng = np.random.default_rng([tc.seed, epoch])
        if self.model.fits_itself:
            self.model.train()
            with torch.no_grad():
                return float(self.model.fit_epoch(self.data, epoch, rng)), float("nan")
        batches = list(self.model.train_batches(self.data, tc.batch_size, rng, bucket_batches=tc.bucket_batches))
        if tc.limit_train_batches > 0:
            batches = batches[: tc.limit_train_batches]
        if not batches:
            raise UserError(
                f"no training batches for model '{self.cfg.model_name}' on dataset '{self.data.name}': "
                "every user has too few training interactions; lower data.user_core or use more data"
            )
        self.model.train()
        total, lr = 0.0, tc.lr
        bar = _progress(len(batches), f"epoch {epoch + 1}") if progress else None
        for i, batch in enumerate(batches):
            lr = tc.lr * lr_factor(epoch + (i + 1) / len(batches), tc.schedule_horizon, tc.warmup_epochs,
                                   tc.schedule, tc.min_lr_ratio)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            loss = self._step(batch_to_device(batch, self.device))
            total += loss
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{loss:.4f}")
        if bar is not None:
            bar.close()
        return total / len(batches), lr

    def _step(self, batch: dict[str, torch.Tensor]) -> float:
        tc = self.cfg.train
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
            loss = self.model.loss(batch)
        if "weight" in batch:  # length-bucketed batches: see batches.sequence_batches
            loss = loss * batch["weight"]
        if not torch.isfinite(loss):
            raise FloatingPointError(f"training loss became {loss.item()} (lr {self.optimizer.param_groups[0]['lr']:.3g})")
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), tc.grad_clip)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        return float(loss.detach())

    def _record(self, epoch: int, loss: float, lr: float, start: float) -> dict[str, Any]:
        tc = self.cfg.train
        train_seconds = time.perf_counter() - start
        val = self.evaluate("valid")
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": loss, "lr": lr}
        record.update({f"val_{k}": v for k, v in val.items()})
        if len(self._train_users) and self.model.task == "ranking":  # the gap is a ranking figure
            on_train = evaluate_on_train(self.model, self.data, self._train_users, tc.ks, self.device, tc.eval_batch_size)
            record.update({f"train_{k}": v for k, v in on_train.items() if k != "n_users"})
        record.update(self.model.extra_metrics())
        record["epoch_seconds"] = time.perf_counter() - start
        record["train_seconds"] = train_seconds
        self.history.append(record)
        return record

    def evaluate(self, split: str = "valid", users: np.ndarray | None = None) -> dict[str, float]:
        """Metrics of the current weights on `split`, over `users` (default: all with a target)."""
        return self.evaluation(split, users).metrics

    def evaluation(self, split: str = "valid", users: np.ndarray | None = None, per_user: bool = False) -> Ranking:
        """`evaluate` as a Ranking; with per_user, one row per user as well."""
        tc = self.cfg.train
        self.evaluations[split] = self.evaluations.get(split, 0) + 1
        return evaluation(
            self.model, self.data, split, tc.ks, self.device, batch_size=tc.eval_batch_size,
            sampled_negatives=tc.sampled_negatives, seed=tc.seed, users=users, per_user=per_user,
        )

    def test(self) -> dict[str, float]:
        """Test metrics of the current (best, after fit) weights on all users."""
        return self.evaluate("test")

    def test_report(self) -> dict[str, dict[str, float]]:
        """The run's test evaluation, by section: 'test' (all users) and 'test_<group>' for each
        group of test users the dataset declares (SplitData.test_groups). Call once per run."""
        return {section: ranking.metrics for section, ranking in self.test_rankings().items()}

    def test_rankings(self, per_user: bool = False) -> dict[str, Ranking]:
        """`test_report` as Rankings. With per_user, only 'test' (all users) carries the
        per-user rows: a group's rows are a subset of them."""
        report = {"test": self.evaluation("test", per_user=per_user)}
        for name, users in self.data.test_groups.items():
            report[f"test_{name}"] = self.evaluation("test", users=users)
        return report

    def _result(self) -> FitResult:
        best = next((r for r in self.history if r["epoch"] == self.stopper.best_epoch), self.history[-1] if self.history else {})
        selected = self.has_validation
        return FitResult(
            best_epoch=self.stopper.best_epoch,
            best_metrics={k: v for k, v in best.items() if k.startswith("val_")} if selected else {},
            last_metrics=dict(self.history[-1]) if self.history else {},
            epochs_run=self.epoch,
            stop_reason=self.stop_reason or "finished",
            selection=f"best val_{self.cfg.train.metric}" if selected else NO_SELECTION,
            history=list(self.history),
        )

    def _weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    # --- state --------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue exactly: weights, optimiser, epoch, early stopping, history.

        Only tensors, numbers, strings, lists and dicts, so `torch.load(weights_only=True)` reads it.
        """
        return {
            "version": STATE_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else {},
            "scaler": self.scaler.state_dict() if self.scaler is not None else {},
            "epoch": self.epoch,
            "stopper": {"best": self.stopper.best, "best_epoch": self.stopper.best_epoch,
                        "bad_epochs": self.stopper.bad_epochs},
            "best_model": self.best_state or {},
            "history": copy.deepcopy(self.history),
            "stop_reason": self.stop_reason,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise UserError(f"checkpoint state version {state.get('version')} is not supported (expected {STATE_VERSION})")
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"]:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.scaler is not None and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        self.epoch = int(state["epoch"])
        s = state["stopper"]
        self.stopper.best, self.stopper.best_epoch, self.stopper.bad_epochs = float(s["best"]), int(s["best_epoch"]), int(s["bad_epochs"])
        self.best_state = state["best_model"] or None
        self.history = list(state["history"])
        self.stop_reason = state.get("stop_reason", "")
        self.apply_hyperparameters()

    def save(self, path: str) -> None:
        save_state(self.state_dict(), path)

    def load(self, path: str) -> None:
        self.load_state_dict(load_state(path, self.device))


def save_state(state: dict[str, Any], path: str) -> None:
    """torch.save to a local path or fsspec URL."""
    import fsspec

    with fsspec.open(path, "wb") as fh:
        torch.save(state, fh)


def read_state(fh, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The one reader of saved trainer states and checkpoints, from an open binary file:
    weights_only=True, so a checkpoint cannot run code."""
    return torch.load(fh, map_location=device, weights_only=True)


def load_state(path: str, device: torch.device | str = "cpu") -> dict[str, Any]:
    """Load a state saved by save_state from a local path or fsspec URL."""
    import pickle

    import fsspec

    try:
        with fsspec.open(path, "rb") as fh:
            return read_state(fh, device)
    except FileNotFoundError:
        raise UserError(f"checkpoint not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{path} is a directory but not a sweep (no summary.yaml); give a checkpoint.pt or a "
                        "sweep's directory") from None
    except (pickle.UnpicklingError, EOFError, RuntimeError):  # torch.load on a file torch.save did not write
        raise UserError(f"{path} is not a rayrec checkpoint (torch.load cannot read it)") from None


def cpu_has_native_bf16() -> bool:
    """True when oneDNN can run bf16 matrix products natively here (avx512_bf16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def peak_memory_mb(device: torch.device | str) -> dict[str, float]:
    """This process's peak memory so far, as a run measures it itself: peak resident set size
    (`resource.getrusage`, Linux reports KiB) and, on CUDA, torch's peak allocated memory since
    the last `torch.cuda.reset_peak_memory_stats()` (NaN on CPU)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_mb = rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # macOS reports bytes
    gpu = float("nan")
    if torch.device(device).type == "cuda" and torch.cuda.is_available():
        gpu = torch.cuda.max_memory_allocated() / 2**20
    return {"peak_rss_mb": float(rss_mb), "peak_gpu_mb": float(gpu)}


def seed_epoch(seed: int, epoch: int) -> None:
    """Seed torch (dropout, masks, sampled negatives) from (seed, epoch)."""
    torch.manual_seed((seed * 1_000_003 + epoch) % (2**63 - 1))


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, mininterval=0.5)
