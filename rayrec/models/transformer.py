"""A pre-norm transformer encoder over item sequences, shared by SASRec (causal) and BERT4Rec
(bidirectional). Attention goes through `scaled_dot_product_attention`, which picks a fused
kernel on GPU and stays exact on CPU."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn = nn.Sequential(
            nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * hidden, hidden)
        )
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # x: (B, L, C); mask: (B, 1, L, L) bool, True = may attend
        B, L, C = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(C, dim=-1)
        q, k, v = (t.view(B, L, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, L, C/H)
        drop = self.attn_dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=drop)
        x = x + self.dropout(self.proj(a.transpose(1, 2).reshape(B, L, C)))
        return x + self.dropout(self.ffn(self.norm2(x)))


class SequenceEncoder(nn.Module):
    """Item + learned position embeddings, `blocks` transformer blocks, final LayerNorm.

    Sequences are left-padded with item 0, so the most recent item sits at the last position.
    Positions count back from that item (0 = most recent), so a batch trimmed of its
    all-padding columns embeds exactly as the full-width one: the same item at the same
    recency gets the same position whatever the batch width.
    """

    def __init__(
        self, n_tokens: int, hidden: int, blocks: int, heads: int, dropout: float, max_len: int,
        causal: bool, init_std: float = 0.02,
    ):
        super().__init__()
        self.causal = causal
        self.item_emb = nn.Embedding(n_tokens, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.emb_dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.apply(lambda m: _init(m, init_std))

    def forward(self, seq: torch.Tensor) -> torch.Tensor:
        # seq: (B, L) item ids, 0 = padding -> (B, L, C) hidden states
        B, L = seq.shape
        keep = seq != 0  # (B, L)
        pos = torch.arange(L - 1, -1, -1, device=seq.device)  # recency: 0 = most recent
        x = self.emb_dropout(self.item_emb(seq) + self.pos_emb(pos)[None]) * keep[..., None]
        allowed = keep[:, None, None, :]  # keys that are real items
        if self.causal:
            allowed = allowed & torch.ones(L, L, dtype=torch.bool, device=seq.device).tril()[None, None]
        # A padded query with no key left would give NaN; let every position see itself.
        mask = allowed | torch.eye(L, dtype=torch.bool, device=seq.device)[None, None]
        for block in self.blocks:
            x = block(x, mask) * keep[..., None]
        return self.norm(x)


def _init(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
