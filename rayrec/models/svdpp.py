"""SVD++ for explicit ratings (Koren, "Factorization Meets the Neighborhood: a Multifaceted
Collaborative Filtering Model", KDD 2008), trained by SGD through the shared trainer.

    r(u, i) = mu + b_u + b_i + q_i . (p_u + |N(u)|^-1/2 sum_{j in N(u)} y_j)

mu is the training mean (fixed); N(u) the items u rated in training (at test time the
history the evaluator gives: train + validation). Each rating's objective is

    1/2 (r - r(u, i))^2 + reg/2 (b_u^2 + b_i^2 + |p_u|^2 + |q_i|^2 + sum_{j in N(u)} |y_j|^2)

whose gradient step is exactly Koren's (and Surprise's SVDpp) update, e.g.
b_u += lr (e - reg b_u), y_j += lr (e |N(u)|^-1/2 q_i - reg y_j). A batch's loss is the SUM
over its ratings, so `train.lr` is that per-rating step and plain SGD (no momentum, no weight
decay) on a batch applies every rating's update at once: a minibatch version of the
per-rating loop. The implicit sum runs as one EmbeddingBag over the distinct users of a
batch. Predictions are clamped to the training ratings' range.

`implicit=false` drops the y terms: biased matrix factorisation (Funk SVD; Surprise's SVD).

Defaults follow Surprise's SVDpp (factors 20, lr 0.007, reg 0.02, N(0, 0.1) init, biases 0;
surprise.readthedocs.io, "Matrix Factorization-based algorithms"), with early stopping on
validation RMSE in place of its fixed 20 epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec, RecModel
from rayrec.models.mean import rating_range, require_ratings


@dataclass
class SVDppConfig:
    factors: int = 20  # latent dimension of p_u, q_i, y_j
    reg: float = 0.02  # L2 on every bias and factor a rating touches (Surprise's reg_all)
    init_std: float = 0.1  # normal init of p, q, y (biases start at 0)
    implicit: bool = True  # the |N(u)|^-1/2 sum y_j term; false = biased MF

    def validate(self) -> None:
        if self.factors < 1:
            raise UserError(f"model.factors must be >= 1, got {self.factors}")
        if self.reg < 0:
            raise UserError(f"model.reg must be >= 0, got {self.reg}")
        if not self.init_std > 0:
            raise UserError(f"model.init_std must be > 0, got {self.init_std}")


def bags(rows: CSR, users: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The concatenated rows of `users` for an EmbeddingBag: (items [total], offsets [U], owner
    [total] = the position in `users` each item belongs to)."""
    starts = rows.indptr[users]
    lengths = rows.indptr[users + 1] - starts
    offsets = np.zeros(len(users), dtype=np.int64)
    np.cumsum(lengths[:-1], out=offsets[1:])
    owner = np.repeat(np.arange(len(users), dtype=np.int64), lengths)
    positions = starts[owner] + np.arange(int(lengths.sum()), dtype=np.int64) - offsets[owner]
    return rows.items[positions], offsets, owner


class SVDpp(RecModel):
    kind = "matrix"
    task = "rating"

    def __init__(self, cfg: SVDppConfig, data: SplitData):
        super().__init__(cfg, data)
        f = cfg.factors
        self.user_bias = nn.Parameter(torch.zeros(data.n_users))
        self.item_bias = nn.Parameter(torch.zeros(data.n_items + 1))
        self.p = nn.Parameter(torch.randn(data.n_users, f) * cfg.init_std)  # (U, f)
        self.q = nn.Parameter(torch.randn(data.n_items + 1, f) * cfg.init_std)  # (N + 1, f)
        # Created either way, so a config's shapes never depend on `implicit`.
        self.y = nn.Parameter(torch.randn(data.n_items + 1, f) * cfg.init_std)  # (N + 1, f)
        ratings = data.train.ratings
        self.register_buffer("mu", torch.tensor(float(ratings.mean()) if len(ratings) else 0.0))
        self.register_buffer("bounds", rating_range(data))
        self._squared_error, self._n = 0.0, 0

    @classmethod
    def check_data(cls, data: SplitData) -> None:
        require_ratings("svdpp", data)

    def make_optimizer(self, lr: float) -> torch.optim.Optimizer:
        """Plain SGD: Koren's updates (see the module docstring)."""
        return torch.optim.SGD(self.parameters(), lr=lr)

    # --- training -------------------------------------------------------------------------
    def train_batches(self, data: SplitData, batch_size: int, rng: np.random.Generator,
                      bucket_batches: int = 1) -> Iterator[dict[str, Any]]:
        train = data.train
        all_users, order = train.rows(), rng.permutation(train.nnz)
        for start in range(0, train.nnz, batch_size):
            at = order[start : start + batch_size]
            users, inverse = np.unique(all_users[at], return_inverse=True)
            batch = {"users": users, "inverse": inverse, "items": train.items[at], "ratings": train.ratings[at]}
            if self.cfg.implicit:
                batch["bag"], batch["offsets"], batch["owner"] = bags(train, users)
            yield batch

    def user_vectors(self, users: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """p_u + |N(u)|^-1/2 sum_j y_j for each user of the batch: (U, f)."""
        vectors = self.p[users]
        if not self.cfg.implicit:
            return vectors
        summed = F.embedding_bag(batch["bag"], self.y, batch["offsets"], mode="sum")  # (U, f); empty bag = 0
        counts = torch.bincount(batch["owner"], minlength=len(users)).float()  # |N(u)|
        return vectors + summed * counts.clamp(min=1).rsqrt()[:, None]

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        users, inverse, items = batch["users"], batch["inverse"], batch["items"]
        u = users[inverse]  # (B,)
        vectors = self.user_vectors(users, batch)  # (U, f)
        q = self.q[items]  # (B, f)
        predicted = self.mu + self.user_bias[u] + self.item_bias[items] + (vectors[inverse] * q).sum(1)
        error = batch["ratings"] - predicted  # (B,)
        penalty = self.user_bias[u] ** 2 + self.item_bias[items] ** 2 + (self.p[u] ** 2).sum(1) + (q**2).sum(1)
        if self.cfg.implicit:
            # sum_j |y_j|^2 per user, counted once for each of the user's ratings in the batch.
            y_norms = torch.zeros(len(users), device=users.device).index_add_(
                0, batch["owner"], (self.y[batch["bag"]] ** 2).sum(1))
            penalty = penalty + y_norms[inverse]
        self._squared_error += float((error.detach() ** 2).sum())
        self._n += len(error)
        return 0.5 * ((error**2).sum() + self.cfg.reg * penalty.sum())

    def extra_metrics(self) -> dict[str, float]:
        """RMSE over the epoch's training ratings, at the weights each batch saw."""
        rmse = (self._squared_error / self._n) ** 0.5 if self._n else float("nan")
        self._squared_error, self._n = 0.0, 0
        return {"train_rmse": rmse}

    # --- prediction -----------------------------------------------------------------------
    def eval_inputs(self, history: CSR, users: np.ndarray) -> dict[str, Any]:
        inputs: dict[str, Any] = {"users": users}
        if self.cfg.implicit:
            inputs["bag"], inputs["offsets"], inputs["owner"] = bags(history, np.asarray(users, dtype=np.int64))
        return inputs

    def score(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Predicted ratings of every item for each user: (B, N + 1), clamped to the rating range."""
        users = batch["users"]
        vectors = self.user_vectors(users, batch)  # (B, f)
        scores = self.mu + self.user_bias[users][:, None] + self.item_bias[None, :] + vectors @ self.q.T
        return scores.clamp(self.bounds[0], self.bounds[1])


SPEC = ModelSpec(
    name="svdpp", kind="matrix", config_cls=SVDppConfig, model_cls=SVDpp,
    # SGD at Surprise's per-rating step from the first batch (no warm-up, no clipping, no
    # weight decay: model.reg is the L2); early stopping on validation RMSE.
    train_defaults={"metric": "rmse", "lr": 0.007, "batch_size": 128, "epochs": 100, "patience": 5,
                    "warmup_epochs": 0.0, "grad_clip": 0.0, "weight_decay": 0.0},
    data_defaults={"split": "random", "folds": 5, "user_core": 0, "item_core": 0},
)
