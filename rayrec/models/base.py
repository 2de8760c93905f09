"""The contract every model implements, so one trainer and one evaluator serve them all.

A model owns its maths (how to build training batches it needs, the loss, the scores);
the trainer owns the loop (optimiser, schedule, clipping, AMP, early stopping, state).

Two ways to learn, one loop (`Trainer.fit`): most models take optimiser steps over
`train_batches` / `loss`; a model that fits itself (`fits_itself = True`: a closed form such
as EASE, an alternating or coordinate-descent solver such as ALS or SLIM, or nothing at all
for popularity) does one `fit_epoch` per epoch instead, on buffers no optimiser sees. Either
way the trainer evaluates, reports, early-stops and checkpoints after every epoch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterator

import numpy as np
import torch
from torch import nn

from rayrec.data.types import CSR, SplitData


class RecModel(nn.Module):
    """Base class. Subclasses set `kind` and implement score and either train_batches and
    loss (optimised models) or fit_epoch (`fits_itself = True`).

    kind: 'sequential' needs chronological rows (SplitData.ordered); 'graph', 'matrix' (models
    of the user-item training matrix: EASE, SLIM, ALS) and 'static' work on any split.
    """

    kind: ClassVar[str] = "sequential"
    # 'ranking': `score` ranks the catalogue (full-ranking metrics); 'rating': `score` is the
    # predicted rating of every item, evaluated by RMSE and MAE on held-out ratings.
    task: ClassVar[str] = "ranking"
    # True: the model fits itself, one `fit_epoch` per epoch, and the trainer makes no
    # optimiser (popularity, EASE, SLIM, ALS); False: optimiser steps over train_batches/loss.
    fits_itself: ClassVar[bool] = False
    # True: the first epoch is the whole fit (a closed form: EASE, popularity), so every run
    # ends after one epoch and one report, whatever train.epochs says.
    closed_form: ClassVar[bool] = False

    def __init__(self, cfg: Any, data: SplitData):
        super().__init__()
        self.cfg = cfg
        self.n_users = data.n_users
        self.n_items = data.n_items

    def train_batches(
        self, data: SplitData, batch_size: int, rng: np.random.Generator, bucket_batches: int = 1
    ) -> Iterator[dict[str, Any]]:
        """One epoch of training batches (numpy arrays or tensors; the trainer moves them to the device).

        bucket_batches > 1 asks for rows of similar length in a batch (sequential models; see
        batches.sequence_batches); a batch may then carry a float `weight` for its loss.
        """
        raise NotImplementedError

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scalar training loss for one batch."""
        raise NotImplementedError

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer | None:
        """The model's own optimiser (SVD++: plain SGD), or None for the trainer's AdamW. The
        trainer still sets its lr before every step (schedule, PBT)."""
        return None

    def fit_epoch(self, data: SplitData, epoch: int, rng: np.random.Generator) -> float:
        """One epoch of a model that fits itself (`fits_itself`): the closed-form solve, or one
        iteration of its solver, written into its buffers. Returns the training objective after
        it (NaN when there is none). Called under torch.no_grad(), after the trainer has seeded
        torch from (seed, epoch); `rng` is seeded the same way.

        Everything the next epoch needs must live in the model's state_dict, so a checkpoint
        at an epoch boundary resumes exactly.
        """
        raise NotImplementedError

    @classmethod
    def check_data(cls, data: SplitData) -> None:
        """A UserError when this model cannot be fitted to `data` (e.g. a matrix too large for
        memory). Runs before any training directory is written or Ray starts."""

    def eval_inputs(self, history: CSR, users: np.ndarray) -> dict[str, Any]:
        """What `score` needs to rank items for `users` given what they have seen (history)."""
        return {"users": users}

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Scores over all item ids for each user in the batch: [B, n_items + 1] (column 0 is padding)."""
        raise NotImplementedError

    def extra_metrics(self) -> dict[str, float]:
        """Model-specific per-epoch figures worth logging (an auxiliary loss, a norm)."""
        return {}


@dataclass(frozen=True)
class ModelSpec:
    """What the registry knows about a model: its name, kind, classes and training defaults."""

    name: str
    kind: str
    config_cls: type
    model_cls: type
    # Trainer settings this model wants unless the user says otherwise (field-lessons §5:
    # graph models want lower lr, clipping 1.0 and long patience; transformers clip at 5.0).
    train_defaults: dict[str, Any] = field(default_factory=dict)
    # Data settings this model wants by default (graph models: a per-user random ratio split).
    data_defaults: dict[str, Any] = field(default_factory=dict)
