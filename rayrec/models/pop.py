"""Popularity baseline: every user gets the items with the most training interactions.

The floor any personalised model must beat. Its counts are the whole fit: it is a closed
form whose one epoch has nothing left to do, so the trainer evaluates it once.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from rayrec.data.types import SplitData
from rayrec.models.base import ModelSpec, RecModel


@dataclass
class PopConfig:
    """The popularity baseline has no hyper-parameters."""


class Popularity(RecModel):
    """score(user, item) = number of training interactions of item, the same for all users."""

    kind = "static"
    fits_itself = True
    closed_form = True

    def __init__(self, cfg: PopConfig, data: SplitData):
        super().__init__(cfg, data)
        counts = torch.as_tensor(data.item_counts(), dtype=torch.float32)  # [n_items + 1]
        counts[0] = float("-inf")  # padding is never an item
        # A buffer, not a parameter: `.to(device)` moves it and `state_dict` saves it, but no
        # optimiser ever sees it.
        self.register_buffer("counts", counts)

    def fit_epoch(self, data: SplitData, epoch: int, rng: np.random.Generator) -> float:
        return float("nan")  # the counts were taken at construction; there is no objective

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = len(batch["users"])
        return self.counts.expand(n, -1).clone()  # [B, n_items + 1]


SPEC = ModelSpec(name="pop", kind="static", config_cls=PopConfig, model_cls=Popularity, train_defaults={})
