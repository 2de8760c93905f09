"""SASRec (Kang & McAuley, 2018): causal self-attention over a user's recent items.

Defaults follow SASRec+ (Klenitskiy & Vasilev, RecSys'23): full-softmax cross-entropy,
which beats BCE with one negative by a wide margin (anchors.md: 0.182 vs 0.134 NDCG@10 on ML-1M).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from rayrec.errors import UserError
from rayrec.models.base import ModelSpec
from rayrec.models.next_item import NextItemModel
from rayrec.models.transformer import SequenceEncoder


@dataclass
class SASRecConfig:
    hidden: int = 64  # embedding and hidden size
    blocks: int = 2  # transformer blocks
    heads: int = 1  # attention heads; must divide hidden
    dropout: float = 0.1  # embedding, residual and feed-forward dropout (SASRec+: 0.1)
    # Dropout on the attention weights. SASRec+ uses 0.1; 0 keeps the fused attention kernel
    # on CPU (about 2.5x cheaper attention) and reached the anchor (docs/benchmarks.md).
    attn_dropout: float = 0.0
    ffn_mult: int = 1  # feed-forward width = ffn_mult * hidden (SASRec: 1; BERT: 4)
    # Block layout: "pre" (pre-norm, GELU) or "sasrec" (the SASRec/SASRec+ code's block:
    # residual from the normalised queries, post-norm ReLU feed-forward, item embeddings
    # scaled by sqrt(hidden)); see rayrec/models/transformer.py.
    layout: Literal["pre", "sasrec"] = "pre"
    max_len: int = 200  # most recent items a user's sequence keeps
    loss: Literal["ce", "bce", "bpr", "sampled_softmax"] = "ce"  # next-item loss
    negatives: int = 1  # uniform negatives per position for bce / bpr / sampled_softmax
    init_std: float = 0.02  # normal init of embeddings and linear layers

    def validate(self) -> None:
        check_transformer_config(self)


def check_sequence_config(cfg) -> None:
    """Checks every sequential model's common fields share."""
    if cfg.hidden < 1:
        raise UserError(f"model.hidden must be >= 1, got {cfg.hidden}")
    for key in ("dropout", "attn_dropout"):
        value = getattr(cfg, key, 0.0)
        if not 0.0 <= value < 1.0:
            raise UserError(f"model.{key} must be in [0, 1), got {value}")
    if cfg.max_len < 2:
        raise UserError(f"model.max_len must be >= 2, got {cfg.max_len}")
    if cfg.negatives < 1:
        raise UserError(f"model.negatives must be >= 1, got {cfg.negatives}")
    if not cfg.init_std > 0:
        raise UserError(f"model.init_std must be > 0, got {cfg.init_std}")


def check_transformer_config(cfg) -> None:
    """The sequential checks plus those of SequenceEncoder's shape (SASRec, BERT4Rec)."""
    check_sequence_config(cfg)
    if cfg.heads < 1 or cfg.hidden % cfg.heads:
        raise UserError(f"model.heads={cfg.heads} must be >= 1 and divide model.hidden={cfg.hidden}")
    if cfg.blocks < 1:
        raise UserError(f"model.blocks must be >= 1, got {cfg.blocks}")
    if cfg.ffn_mult < 1:
        raise UserError(f"model.ffn_mult must be >= 1, got {cfg.ffn_mult}")


class SASRec(NextItemModel):
    def __init__(self, cfg: SASRecConfig, data):
        super().__init__(cfg, data)
        self.encoder = SequenceEncoder(
            data.n_items + 1, cfg.hidden, cfg.blocks, cfg.heads, cfg.dropout, cfg.max_len,
            causal=True, init_std=cfg.init_std, attn_dropout=cfg.attn_dropout, ffn_mult=cfg.ffn_mult,
            layout=cfg.layout,
        )

    def states(self, seq):
        return self.encoder(seq)  # (B, L, C)

    def last_state(self, seq):
        return self.encoder(seq, last_only=True)  # (B, C)

    def item_table(self):
        return self.encoder.item_emb.weight  # (N + 1, C)


SPEC = ModelSpec(
    name="sasrec", kind="sequential", config_cls=SASRecConfig, model_cls=SASRec,
    train_defaults={"grad_clip": 5.0, "patience": 10},  # SASRec+: patience 10
)
