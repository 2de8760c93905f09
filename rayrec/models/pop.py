"""Popularity baseline: every user gets the items with the most training interactions.

The floor any personalised model must beat; it needs no training, so the trainer only
evaluates it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

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
    trainable = False

    def __init__(self, cfg: PopConfig, data: SplitData):
        super().__init__(cfg, data)
        counts = torch.as_tensor(data.item_counts(), dtype=torch.float32)  # [n_items + 1]
        counts[0] = float("-inf")  # padding is never an item
        # A buffer, not a parameter: `.to(device)` moves it and `state_dict` saves it, but no
        # optimiser ever sees it.
        self.register_buffer("counts", counts)

    def train_batches(
        self, data: SplitData, batch_size: int, rng: np.random.Generator, bucket_batches: int = 1
    ) -> Iterator[dict[str, Any]]:
        return iter(())

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        raise RuntimeError("the popularity model is not trainable (trainable = False); only evaluate it")

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        n = len(batch["users"])
        return self.counts.expand(n, -1).clone()  # [B, n_items + 1]


SPEC = ModelSpec(name="pop", kind="static", config_cls=PopConfig, model_cls=Popularity, train_defaults={})
