"""Rating baselines: predict every held-out rating by a mean of the training ratings.

    by=global   r(u, i) = mu                         the floor every rating model must beat
    by=user     r(u, i) = mean of u's training ratings (mu for a user without any)
    by=item     r(u, i) = mean of i's training ratings (mu for an item without any)

A closed form: the means are taken at construction, so the trainer evaluates it once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rayrec.data.types import SplitData
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec, RecModel


@dataclass
class MeanConfig:
    by: Literal["global", "user", "item"] = "global"  # whose training ratings are averaged


def require_ratings(model: str, data: SplitData) -> None:
    """A UserError when `data` carries no explicit ratings (rating models' check_data)."""
    if not data.has_ratings:
        raise UserError(
            f"model '{model}' predicts ratings, but dataset '{data.name}' has none; use data with a rating column "
            "(ml-100k, ml-1m, synthetic, or a csv/parquet/inter file with data.columns.rating)"
        )


def rating_range(data: SplitData) -> torch.Tensor:
    """[lowest, highest] training rating: predictions are clamped into it."""
    ratings = data.train.ratings
    return torch.tensor([float(ratings.min()), float(ratings.max())] if len(ratings) else [0.0, 0.0])


def group_means(ids: np.ndarray, ratings: np.ndarray, size: int, fallback: float) -> torch.Tensor:
    """Mean rating per id in 0..size-1 (fallback where an id has none): float32 [size]."""
    totals = np.bincount(ids, weights=ratings, minlength=size)
    counts = np.bincount(ids, minlength=size)
    return torch.as_tensor(np.where(counts > 0, totals / np.maximum(counts, 1), fallback), dtype=torch.float32)


class MeanRating(RecModel):
    """score(u, i) = the chosen mean, the same for every item (by=global, user) or user (by=item)."""

    kind = "static"
    task = "rating"
    fits_itself = True
    closed_form = True

    def __init__(self, cfg: MeanConfig, data: SplitData):
        super().__init__(cfg, data)
        train = data.train
        ratings = train.ratings.astype(np.float64)
        mu = float(ratings.mean()) if len(ratings) else 0.0
        self.register_buffer("mu", torch.tensor(mu))
        self.register_buffer("user_means", group_means(train.rows(), ratings, data.n_users, mu))  # [U]
        self.register_buffer("item_means", group_means(train.items, ratings, data.n_items + 1, mu))  # [N + 1]
        self.register_buffer("bounds", rating_range(data))

    @classmethod
    def check_data(cls, data: SplitData) -> None:
        require_ratings("mean", data)

    def fit_epoch(self, data: SplitData, epoch: int, rng: np.random.Generator) -> float:
        """Nothing left to fit; returns the training mean squared error."""
        train = data.train
        users = torch.as_tensor(train.rows(), device=self.mu.device)
        items = torch.as_tensor(train.items, device=self.mu.device)
        predicted = self.predict(users[:, None], items[:, None]).squeeze(1)  # [nnz]
        truth = torch.as_tensor(train.ratings, device=self.mu.device)
        return float(((predicted - truth) ** 2).mean()) if len(truth) else float("nan")

    def predict(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Predicted ratings of users [B, 1] for items [1 or B, M]: [B, M], clamped to the rating range."""
        shape = torch.broadcast_shapes(users.shape, items.shape)
        if self.cfg.by == "user":
            scores = self.user_means[users].expand(shape)
        elif self.cfg.by == "item":
            scores = self.item_means[items].expand(shape)
        else:
            scores = self.mu.expand(shape)
        return scores.clamp(self.bounds[0], self.bounds[1])

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        users = batch["users"]  # [B]
        all_items = torch.arange(self.item_means.shape[0], device=users.device)
        return self.predict(users[:, None], all_items[None, :]).clone()  # [B, N + 1]


SPEC = ModelSpec(
    name="mean", kind="static", config_cls=MeanConfig, model_cls=MeanRating,
    train_defaults={"metric": "rmse"},
    # Rating prediction's protocol: every rating kept (no k-core), fold 0 of a seeded 5-fold random split.
    data_defaults={"split": "random", "folds": 5, "user_core": 0, "item_core": 0},
)
