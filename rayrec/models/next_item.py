"""What SASRec and GRU4Rec share: causal next-item models over users' recent sequences.

A subclass provides `states(seq) -> (B, L, C)` (the state after each position, read only
from that position and the ones before it) and `item_table()`, the (N + 1, C) item
embeddings that score states (row 0 = padding). Training, evaluation inputs and scores
are then the same for every such model.
"""

from __future__ import annotations

import numpy as np
import torch

from rayrec.data.batches import last_items, sequence_batches, trim_padding
from rayrec.models.base import RecModel
from rayrec.models.losses import item_loss


class NextItemModel(RecModel):
    kind = "sequential"

    def states(self, seq: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def item_table(self) -> torch.Tensor:
        raise NotImplementedError

    def train_batches(self, data, batch_size: int, rng: np.random.Generator):
        # max_len + 1 items give max_len (input, next item) positions per row.
        for seq in sequence_batches(data.train, self.cfg.max_len + 1, batch_size, rng):
            yield {"seq": seq}

    def loss(self, batch):
        seq = batch["seq"]  # (B, L + 1)
        inputs, targets = seq[:, :-1], seq[:, 1:]
        hidden = self.states(inputs)  # (B, L, C)
        keep = (inputs != 0) & (targets != 0)
        return item_loss(hidden[keep], targets[keep], self.item_table(), self.cfg.loss, self.cfg.negatives)

    def eval_inputs(self, history, users):
        return {"seq": trim_padding(last_items(history, users, self.cfg.max_len))}

    def score(self, batch):
        hidden = self.states(batch["seq"])[:, -1]  # (B, C): state after the most recent item
        return hidden @ self.item_table().T  # (B, N + 1)
