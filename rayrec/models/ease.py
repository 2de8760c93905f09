"""EASE (Steck, "Embarrassingly Shallow Autoencoders for Sparse Data", WWW 2019): an
item-item weight matrix B with a zero diagonal, in closed form.

    minimise ||X - X B||^2 + l2_reg ||B||^2   subject to diag(B) = 0
    P = (X^T X + l2_reg I)^-1                  X: binary user-item training matrix (U, N)
    B_ij = -P_ij / P_jj  (i != j),  B_jj = 0
    score(user) = x_user B                     x_user: the user's history as a 0/1 row

One regularised solve is the whole fit, so EASE is a closed-form model: one "epoch", one
report (RecModel.closed_form). The solve runs in float64 (Cholesky, then its inverse) on the
trial's device; the (N + 1, N + 1) float32 weights that score are a buffer, saved in the
trainer's state like any weights. The closed form and the zero diagonal were checked against
the paper's listing and recpack's implementation (github.com/LienM/recpack,
recpack/algorithms/ease.py: B = I - P diagMat(1 / diag(P)), diagonal set to 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch

from rayrec.data.batches import interaction_matrix
from rayrec.data.types import SplitData
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec
from rayrec.models.item_item import ItemItemModel

# Bytes the solve may use; None = the memory available when the check runs (RAM on CPU, the
# GPU's free memory on CUDA). Tests lower it to exercise the refusal.
MEMORY_LIMIT_BYTES: int | None = None


@dataclass
class EASEConfig:
    l2_reg: float = 500.0  # lambda on ||B||^2; the paper's best on ML-20M/Netflix is 200-1000 (usual range 100-2000)

    def validate(self) -> None:
        if not self.l2_reg > 0:
            raise UserError(f"model.l2_reg must be > 0 (it makes X^T X invertible), got {self.l2_reg}")


def solve_bytes(n_items: int) -> int:
    """Peak memory of the fit: two float64 (N, N) matrices at any time (the Gram matrix and a
    dense block of it, then the Gram matrix and its Cholesky factor, then the factor and the
    inverse) plus the float32 (N + 1, N + 1) weights."""
    return 2 * 8 * n_items**2 + 4 * (n_items + 1) ** 2


def available_memory(device: torch.device) -> int:
    """Bytes the fit may use on `device`: MEMORY_LIMIT_BYTES when set, else what is free now."""
    if MEMORY_LIMIT_BYTES is not None:
        return MEMORY_LIMIT_BYTES
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as fh:  # MemAvailable counts reclaimable cache, unlike free pages
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(n_items: int, device: torch.device) -> None:
    """A UserError naming the size needed and the limit when the item-item solve does not fit."""
    need, limit = solve_bytes(n_items), available_memory(device)
    if need > limit:
        raise UserError(
            f"model 'ease' needs {need / 2**30:.2f} GiB on {device.type} for its {n_items:,} x {n_items:,} item-item "
            f"matrices but only {limit / 2**30:.2f} GiB is available; use fewer items (raise data.item_core) or slim/als"
        )


class EASE(ItemItemModel):
    closed_form = True

    @classmethod
    def check_data(cls, data: SplitData) -> None:
        check_fits(data.n_items, torch.device("cpu"))  # the Gram matrix is built in host memory first

    def fit_epoch(self, data: SplitData, epoch: int, rng: np.random.Generator) -> float:
        device = self.weights.device
        check_fits(self.n_items, device)
        gram = torch.from_numpy(item_gram(data)).to(device)  # (N, N) float64: X^T X
        lam = self.cfg.l2_reg
        gram.diagonal().add_(lam)
        factor, info = torch.linalg.cholesky_ex(gram)
        del gram
        if int(info) != 0:  # cannot happen for l2_reg > 0 in exact arithmetic
            raise FloatingPointError(f"EASE: X^T X + {lam} I is not positive definite in float64 (minor {int(info)})")
        p = torch.cholesky_inverse(factor)  # (N, N) float64: P = (X^T X + lambda I)^-1
        del factor
        diag = p.diagonal().clone()  # (N,)
        # The objective at the optimum is sum_j (1 / P_jj - lambda): X^T X (I - B) = (I - lambda P) D^-1
        # with D = diag(P), and the two terms of ||X - XB||^2 + lambda ||B||^2 then add up column by column.
        objective = float((1.0 / diag - lam).sum())
        p.div_(-diag[None, :])  # B_ij = -P_ij / P_jj
        p.diagonal().zero_()
        self.weights.zero_()
        self.weights[1:, 1:].copy_(p)  # converts in place: no third N x N matrix
        return objective / max(self.n_users, 1)  # per user


def item_gram(data: SplitData, blocks: int = 8) -> np.ndarray:
    """X^T X of the binary training matrix, dense float64 (N, N): co-occurrence counts.

    Filled a block of columns at a time, so the sparse product and its dense copy never
    hold more than 1 / blocks of the matrix beside it (solve_bytes' budget).
    """
    x = interaction_matrix(data.train, data.n_items).tocsc()
    xt = x.T.tocsr()
    gram = np.empty((data.n_items, data.n_items))
    width = max(1, -(-data.n_items // blocks))
    for start in range(0, data.n_items, width):
        gram[:, start : start + width] = (xt @ x[:, start : start + width]).toarray()
    return gram


# One solve is the fit: one epoch; patience never matters. Item-based models read the user's
# history as it is at evaluation time (train for validation, train + validation for test).
SPEC = ModelSpec(
    name="ease", kind="matrix", config_cls=EASEConfig, model_cls=EASE,
    train_defaults={"epochs": 1},
)
