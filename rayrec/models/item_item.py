"""What EASE and SLIM share: an item-item weight matrix W that scores a user's history.

    score(user) = x_user W      x_user: the history as a 0/1 row over item ids (B, N + 1)

W is an (N + 1, N + 1) float32 buffer whose row and column 0 (padding) stay zero, so item ids
index it directly; a subclass fills W[1:, 1:] in `fit_epoch`. The history is read as a set
(repeats count once), the training items for validation and training plus validation
items for test.
"""

from __future__ import annotations

import torch

from rayrec.data.batches import item_sets
from rayrec.data.types import SplitData
from rayrec.models.base import RecModel


class ItemItemModel(RecModel):
    kind = "matrix"
    fits_itself = True

    def __init__(self, cfg, data: SplitData):
        super().__init__(cfg, data)
        self.register_buffer("weights", torch.zeros(data.n_items + 1, data.n_items + 1))  # (N + 1, N + 1)

    def eval_inputs(self, history, users):
        return {"items": item_sets(history, users)}

    def score(self, batch):
        return history_rows(batch["items"], self.weights.shape[0], self.weights.dtype) @ self.weights  # (B, N + 1)


def history_rows(items: torch.Tensor, n_cols: int, dtype: torch.dtype) -> torch.Tensor:
    """0/1 rows (B, n_cols) with a 1 at each item id of `items` (B, L), padding (0) included:
    row 0 of an item-item table is zero, so it adds nothing."""
    rows = torch.zeros(items.shape[0], n_cols, dtype=dtype, device=items.device)
    return rows.scatter_(1, items, 1.0)
