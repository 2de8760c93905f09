"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional transformer trained by cloze, i.e. by
predicting randomly masked items from the items on both sides of them.

Defaults follow anchors.md (mask probability 0.2, 2 layers, 2 heads) and the full-softmax
cross-entropy over masked positions that Klenitskiy & Vasilev (RecSys'23) used for their
BERT4Rec figures (0.2843 HR@10 / 0.1537 NDCG@10 on ML-1M, full ranking).

Token ids: 0 = padding, 1..n_items = items, n_items + 1 = [MASK]. The mask token has an
input embedding but is never an output: the loss and the scores use rows 0..n_items only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from rayrec.data.batches import recent_items, sequence_batches
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec, RecModel
from rayrec.models.losses import item_loss
from rayrec.models.sasrec import check_transformer_config
from rayrec.models.transformer import SequenceEncoder, last_positions


@dataclass
class BERT4RecConfig:
    hidden: int = 64  # embedding and hidden size
    blocks: int = 2  # transformer blocks
    heads: int = 2  # attention heads; must divide hidden
    dropout: float = 0.1  # embedding, residual and feed-forward dropout (BERT's 0.1)
    attn_dropout: float = 0.0  # dropout on attention weights; 0 keeps the fused CPU kernel (see sasrec.py)
    ffn_mult: int = 4  # feed-forward width = ffn_mult * hidden (BERT: 4, i.e. 256 at hidden 64)
    max_len: int = 200  # most recent items a user's sequence keeps (scoring: max_len - 1 items + [MASK])
    # Share of real positions replaced by [MASK] in training. Keep search ranges >= 0.15
    # (field-lessons §3): lower values give too few targets per sequence and overfit.
    mask_prob: float = 0.2
    last_mask_ratio: float = 0.1  # share of sequences that mask only their last item, exactly like scoring
    loss: Literal["ce", "bce", "bpr", "sampled_softmax"] = "ce"  # masked-item loss; ce = full softmax
    negatives: int = 1  # uniform negatives per masked position for bce / bpr / sampled_softmax
    init_std: float = 0.02  # normal init of embeddings and linear layers

    def validate(self) -> None:
        check_transformer_config(self)
        if not 0.0 < self.mask_prob < 1.0:
            raise UserError(f"model.mask_prob must be in (0, 1) (0.15 or more recommended), got {self.mask_prob}")
        if not 0.0 <= self.last_mask_ratio <= 1.0:
            raise UserError(f"model.last_mask_ratio must be in [0, 1], got {self.last_mask_ratio}")


class BERT4Rec(RecModel):
    kind = "sequential"

    def __init__(self, cfg: BERT4RecConfig, data):
        super().__init__(cfg, data)
        self.mask_token = data.n_items + 1
        self.encoder = SequenceEncoder(
            data.n_items + 2, cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len,
            causal=False, init_std=cfg.init_std, attn_dropout=cfg.attn_dropout, ffn_mult=cfg.ffn_mult,
        )

    def train_batches(self, data, batch_size: int, rng: np.random.Generator, bucket_batches: int = 1):
        # Masks are drawn in `loss`, on the device, so batches are plain sequences.
        return sequence_batches(data.train, self.cfg.max_len, batch_size, rng, bucket_batches=bucket_batches)

    def cloze(self, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask a batch for training: (inputs with [MASK] tokens, bool mask of the masked positions).

        Each real position is masked with probability mask_prob; a share last_mask_ratio of rows
        instead mask only their last item, which is what scoring sees. A row with no masked
        position masks its last item, so every row gives at least one target. Uses torch's RNG.
        """
        B, L = seq.shape
        real = seq != 0  # (B, L)
        masked = (torch.rand(B, L, device=seq.device) < self.cfg.mask_prob) & real
        last_only = torch.rand(B, device=seq.device) < self.cfg.last_mask_ratio  # (B,)
        masked = masked & ~last_only[:, None]
        empty = ~masked.any(dim=1) & real.any(dim=1)  # (B,): last_only rows and rows the draw left unmasked
        # Right padding: each row's most recent item sits at its last real column.
        rows = torch.arange(B, device=seq.device)
        last = last_positions(seq)
        masked[rows, last] |= empty
        inputs = seq.masked_fill(masked, self.mask_token)
        return inputs, masked

    def loss(self, batch):
        seq = batch["seq"]  # (B, L)
        inputs, masked = self.cloze(seq)
        hidden = self.encoder(inputs)  # (B, L, C)
        items = self.encoder.item_emb.weight[: self.n_items + 1]  # (N + 1, C): no [MASK] row
        return item_loss(hidden[masked], seq[masked], items, self.cfg.loss, self.cfg.negatives)

    def eval_inputs(self, history, users):
        # The last max_len - 1 items then [MASK] right after them: the model fills in the next item.
        items = recent_items(history, users, self.cfg.max_len - 1)
        seq = np.concatenate([items, np.zeros((len(items), 1), dtype=np.int64)], axis=1)
        seq[np.arange(len(seq)), (items != 0).sum(axis=1)] = self.mask_token
        return {"seq": seq}

    def score(self, batch):
        hidden = self.encoder(batch["seq"], last_only=True)  # (B, C): state at the [MASK] position
        return hidden @ self.encoder.item_emb.weight[: self.n_items + 1].T  # (B, N + 1)


SPEC = ModelSpec(
    name="bert4rec", kind="sequential", config_cls=BERT4RecConfig, model_cls=BERT4Rec,
    train_defaults={"grad_clip": 5.0, "patience": 20},  # anchors: BERT4Rec converges near epoch 200, patience 20
)
