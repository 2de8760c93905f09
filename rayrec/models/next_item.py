"""What SASRec and GRU4Rec share: causal next-item models over users' recent sequences.

A subclass provides `states(seq) -> (B, L, C)` (the state after each position of a
right-padded sequence, read only from that position and the ones before it) and
`item_table()`, the (N + 1, C) item embeddings that score states (row 0 = padding). It may
override `last_state(seq) -> (B, C)` when the state after the most recent item alone is
cheaper to compute. Training, evaluation inputs and scores are then the same for every
such model.
"""

from __future__ import annotations

import numpy as np
import torch

from rayrec.data.batches import recent_items, sequence_batches
from rayrec.models.base import RecModel
from rayrec.models.losses import item_loss
from rayrec.models.transformer import last_positions


class NextItemModel(RecModel):
    kind = "sequential"

    def states(self, seq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def item_table(self) -> torch.Tensor:
        raise NotImplementedError

    def last_state(self, seq: torch.Tensor) -> torch.Tensor:
        """(B, C): the state after each row's most recent item."""
        states = self.states(seq)  # (B, L, C)
        return states[torch.arange(len(seq), device=seq.device), last_positions(seq)]

    def train_batches(self, data, batch_size: int, rng: np.random.Generator, bucket_batches: int = 1):
        # max_len + 1 items give max_len (input, next item) positions per row.
        return sequence_batches(data.train, self.cfg.max_len + 1, batch_size, rng, bucket_batches=bucket_batches)

    def loss(self, batch):
        seq = batch["seq"]  # (B, L + 1), right-padded
        n = (seq != 0).sum(dim=1)  # (B,)
        col = torch.arange(seq.shape[1] - 1, device=seq.device)[None, :]
        # Inputs: every item but each row's last; targets: every item but its first.
        inputs = torch.where(col < (n - 1)[:, None], seq[:, :-1], 0)  # (B, L)
        targets = seq[:, 1:]  # (B, L): nonzero exactly where inputs are
        hidden = self.states(inputs)  # (B, L, C)
        keep = targets != 0
        return item_loss(hidden[keep], targets[keep], self.item_table(), self.cfg.loss, self.cfg.negatives)

    def eval_inputs(self, history, users):
        return {"seq": recent_items(history, users, self.cfg.max_len)}

    def score(self, batch):
        return self.last_state(batch["seq"]) @ self.item_table().T  # (B, N + 1)
