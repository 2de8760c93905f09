"""GRU4Rec (Hidasi et al., ICLR 2016): a GRU reads a user's items in order and its state
after each item scores the next one.

Trained like SASRec (every position of a user's recent sequence predicts the next item),
with the same choice of losses (field-lessons §7), which is the setting in which GRU4Rec
was found competitive with transformers (Petrov & Macdonald; Klenitskiy & Vasilev). The
output layer shares the item embedding table, as in later GRU4Rec versions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from rayrec.errors import UserError
from rayrec.models import ops
from rayrec.models.base import ModelSpec
from rayrec.models.next_item import NextItemModel
from rayrec.models.sasrec import check_sequence_config


@dataclass
class GRU4RecConfig:
    embedding: int = 64  # item embedding size (input and output, shared)
    hidden: int = 64  # GRU state size; projected back to `embedding` when different
    layers: int = 1  # stacked GRU layers
    dropout: float = 0.2  # on embeddings, between GRU layers and on the GRU output
    max_len: int = 200  # most recent items a user's sequence keeps
    loss: Literal["ce", "bpr", "bce", "sampled_softmax"] = "ce"  # next-item loss
    negatives: int = 1  # uniform negatives per position for bce / bpr / sampled_softmax
    init_std: float = 0.02  # normal init of the item embedding and the projection

    def validate(self) -> None:
        check_sequence_config(self)
        if self.embedding < 1:
            raise UserError(f"model.embedding must be >= 1, got {self.embedding}")
        if self.layers < 1:
            raise UserError(f"model.layers must be >= 1, got {self.layers}")


class GRU4Rec(NextItemModel):
    def __init__(self, cfg: GRU4RecConfig, data):
        super().__init__(cfg, data)
        self.item_emb = nn.Embedding(data.n_items + 1, cfg.embedding, padding_idx=0)
        # The GRU keeps PyTorch's uniform(+-1/sqrt(hidden)) init, which suits its gates;
        # init_std applies to the embedding and projection, as in SASRec.
        self.gru = nn.GRU(
            cfg.embedding, cfg.hidden, num_layers=cfg.layers, batch_first=True,
            dropout=cfg.dropout if cfg.layers > 1 else 0.0,
        )
        self.proj = nn.Linear(cfg.hidden, cfg.embedding) if cfg.hidden != cfg.embedding else nn.Identity()
        nn.init.normal_(self.item_emb.weight, std=cfg.init_std)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        if isinstance(self.proj, nn.Linear):
            nn.init.normal_(self.proj.weight, std=cfg.init_std)
            nn.init.zeros_(self.proj.bias)

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        """seq: (B, L) right-padded item ids -> (B, L, E) states, aligned with `seq`.

        Right padding means the GRU starts from a zero state at each row's first item, and
        a GRU is causal, so the padding after a row's items cannot reach the states at its
        real positions: they equal those of the unpadded sequence, with no packing and no
        host sync. States at padding positions are meaningless and never used.
        """
        x = ops.dropout(self.item_emb(seq), self.cfg.dropout, self.training)  # (B, L, E)
        # The recurrence stays in fp32 under AMP: rounding compounds over up to max_len steps,
        # bf16 RNNs are recent in cuDNN, and the full softmax, not the GRU, dominates the cost.
        with torch.autocast(seq.device.type, enabled=False):
            h, _ = self.gru(x.float())  # (B, L, H)
        return self.proj(ops.dropout(h, self.cfg.dropout, self.training))  # (B, L, E)

    def states(self, seq):
        return self(seq)  # (B, L, C)

    def item_table(self):
        return self.item_emb.weight  # (N + 1, C)


SPEC = ModelSpec(
    name="gru4rec", kind="sequential", config_cls=GRU4RecConfig, model_cls=GRU4Rec,
    train_defaults={"grad_clip": 5.0, "patience": 10},
)
