"""SLIM (Ning & Karypis, "SLIM: Sparse Linear Methods for Top-N Recommender Systems", ICDM
2011): an item-item weight matrix W >= 0 with a zero diagonal, one elastic-net regression
per item.

    for each item j:  minimise_w  1/2 ||X_j - X w||^2 + l1_reg ||w||_1 + l2_reg / 2 ||w||^2
                      subject to  w >= 0,  w_j = 0          X: binary user-item matrix (U, N)
    score(user) = x_user W                                   W[:, j] = w for item j

The objective is the paper's (its lambda is l1_reg, its beta l2_reg), so the regularisers
compare with co-occurrence counts whatever the number of users U. It is solved with
scikit-learn's ElasticNet (coordinate descent, positive=True, no intercept), whose objective
is the one above divided by U: alpha = (l1_reg + l2_reg) / U, l1_ratio = l1_reg / (l1_reg +
l2_reg). The diagonal is kept at zero by zeroing item j's column while item j is fitted.
Items are fitted in parallel threads (the solver releases the GIL), as many as the trial's
torch threads (train.num_threads).

Iterative, so it reports every epoch: an epoch runs up to `max_iter` coordinate-descent
passes per item, warm-started from the weights so far (which live in the model's state, so
a checkpoint resumes exactly). Items whose solve has converged (sklearn's duality-gap test
at `tol`) cost one pass per later epoch and do not change; once all have, the metric stops
moving and early stopping ends the run. ASHA can prune a bad setting after its first epoch.
The per-item regression with a zeroed target column follows recpack (github.com/LienM/recpack,
recpack/algorithms/slim.py, which maps l1_reg and l2_reg to alpha = l1_reg + l2_reg and
l1_ratio = l1_reg / alpha of sklearn's per-user-normalised objective; here they are the
paper's unnormalised weights, hence the extra 1 / U) and Levy & Jack (LSRS 2013).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from rayrec.data.batches import interaction_matrix
from rayrec.data.types import SplitData
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec
from rayrec.models.item_item import ItemItemModel


@dataclass
class SLIMConfig:
    # Defaults: the best of four points on ml-100k (docs/benchmarks.md); stronger L2 beat weaker.
    l1_reg: float = 1.0  # L1 weight (the paper's lambda): sparsity of W
    l2_reg: float = 10.0  # L2 weight (the paper's beta): l2_reg / 2 ||w||^2
    max_iter: int = 20  # coordinate-descent passes per item per epoch (warm-started across epochs)
    tol: float = 1e-4  # sklearn's convergence tolerance on the duality gap

    def validate(self) -> None:
        if self.l1_reg < 0 or self.l2_reg < 0 or not self.l1_reg + self.l2_reg > 0:
            raise UserError(f"model.l1_reg and model.l2_reg must be >= 0 and not both 0, got {self.l1_reg}, {self.l2_reg}")
        if self.max_iter < 1:
            raise UserError(f"model.max_iter must be >= 1, got {self.max_iter}")
        if not self.tol > 0:
            raise UserError(f"model.tol must be > 0, got {self.tol}")


class SLIM(ItemItemModel):
    def fit_epoch(self, data: SplitData, epoch: int, rng: np.random.Generator) -> float:
        from joblib import Parallel, delayed
        from sklearn.exceptions import ConvergenceWarning

        x = interaction_matrix(data.train, self.n_items).tocsc()  # (U, N) float64, the layout CD reads
        start = self.weights[1:, 1:].double().cpu().numpy()  # (N, N): warm start, column j = item j's w
        threads = max(1, torch.get_num_threads())
        blocks = np.array_split(np.arange(self.n_items), threads)
        with warnings.catch_warnings():
            # An item that uses all max_iter passes continues next epoch: that is the design.
            warnings.simplefilter("ignore", ConvergenceWarning)
            results = Parallel(n_jobs=threads, backend="threading")(
                delayed(fit_items)(x, start, items, self.cfg) for items in blocks if len(items)
            )
        weights = np.zeros_like(start)
        objective = 0.0
        for items, columns, value in results:
            weights[:, items] = columns
            objective += value
        self.weights[1:, 1:] = torch.from_numpy(weights).to(self.weights)
        return objective / max(self.n_items, 1)  # mean per-item objective


def fit_items(x, start: np.ndarray, items: np.ndarray, cfg: SLIMConfig) -> tuple[np.ndarray, np.ndarray, float]:
    """Fit the columns `items` of W from their warm start: (items, W[:, items], summed objective).

    Works on its own copy of x's values, so threads never see each other's zeroed column.
    """
    from scipy.sparse import csc_matrix
    from sklearn.linear_model import ElasticNet

    local = csc_matrix((x.data.copy(), x.indices, x.indptr), shape=x.shape)
    n_users = x.shape[0]
    total = cfg.l1_reg + cfg.l2_reg
    enet = ElasticNet(alpha=total / n_users, l1_ratio=cfg.l1_reg / total, positive=True, fit_intercept=False,
                      max_iter=cfg.max_iter, tol=cfg.tol, warm_start=True, selection="cyclic")
    columns = np.zeros((x.shape[1], len(items)))
    objective = 0.0
    for k, j in enumerate(items):
        lo, hi = x.indptr[j], x.indptr[j + 1]
        target = np.zeros(n_users)
        target[x.indices[lo:hi]] = 1.0
        local.data[lo:hi] = 0.0  # item j may not explain itself: its column is zero, so w_j stays 0
        enet.coef_ = start[:, j].copy()
        enet.fit(local, target, check_input=False)
        w = enet.coef_
        residual = target - local @ w
        objective += 0.5 * (residual @ residual) + cfg.l1_reg * w.sum() + 0.5 * cfg.l2_reg * (w @ w)
        columns[:, k] = w
        local.data[lo:hi] = 1.0
    return items, columns, objective


# Coordinate descent converges in a few epochs of max_iter passes; a short patience ends the
# run once the weights stop changing.
SPEC = ModelSpec(
    name="slim", kind="matrix", config_cls=SLIMConfig, model_cls=SLIM,
    train_defaults={"epochs": 20, "patience": 3},
)
