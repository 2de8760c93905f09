"""A pre-norm transformer encoder over item sequences, shared by SASRec (causal) and BERT4Rec
(bidirectional).

Speed without approximation (docs/benchmarks.md has the measurements):
- Sequences are right-padded (rayrec.data.batches.recent_items), so causal attention needs
  no mask at all: a real position only looks at earlier positions, which are all real, and
  `scaled_dot_product_attention(is_causal=True)` takes its fused kernel on CPU and GPU.
  Bidirectional attention passes a key-padding mask, which the fused CPU kernel also takes.
- Attention dropout cannot go through the fused CPU kernel; when it is on, attention on CPU
  is computed explicitly with the cheap dropout of `ops.dropout`. `attn_dropout=0` keeps
  the fused kernel.
- Scoring needs only the most recent position: the last block computes its query,
  attention and feed-forward for that position alone (`last_only`).

Two block layouts (`layout`):
- "pre": the pre-norm transformer block (x + Attn(LN(x)), then x + FFN(LN(x)) with GELU).
- "sasrec": the block of the SASRec authors' code and of its PyTorch port that SASRec+
  builds on (pmixer/SASRec.pytorch): the queries are normalised and the residual starts
  from them, keys and values are not (h = LN1(x); x = h + Attn(h, x, x)); the
  feed-forward is post-norm with ReLU (x = LN2(x); x = x + FFN(x)); item embeddings are
  scaled by sqrt(hidden) before the positions are added.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from rayrec.models import ops

# Positions per chunk when only the last state is wanted (scoring). CPU: an activation of a
# chunk is a few MB and stays in the last-level cache through a block (ML-1M test
# evaluation, 6,040 users x 200 positions: see docs/benchmarks.md); GPU: no chunking.
LAST_ONLY_POSITIONS = {"cpu": 1 << 14, "cuda": 1 << 30}
LAYOUTS = ("pre", "sasrec")


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float, attn_dropout: float, ffn_mult: int,
                 layout: str = "pre"):
        super().__init__()
        self.sasrec = layout == "sasrec"  # see the module docstring
        self.heads = heads
        self.dropout = dropout
        self.attn_dropout = attn_dropout
        self.norm1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, ffn_mult * hidden)
        self.ffn_out = nn.Linear(ffn_mult * hidden, hidden)

    def forward(
        self, x: torch.Tensor, causal: bool, key_mask: torch.Tensor | None = None,
        query_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x: (B, L, C) -> (B, L, C); with query_index (B,), only those positions: (B, 1, C).

        key_mask: (B, 1, 1, L) bool, True = a real key (bidirectional attention only).
        """
        B, L, C = x.shape
        h = self.norm1(x)
        w, b = self.qkv.weight, self.qkv.bias
        # "pre": queries, keys, values and the residual all come from LN(x) / x as usual;
        # "sasrec": keys and values from the un-normalised x, the residual from LN(x).
        kv_in, residual = (x, h) if self.sasrec else (h, x)
        if query_index is None:
            if self.sasrec:
                q = F.linear(h, w[:C], b[:C])
                k, v = F.linear(kv_in, w[C:], b[C:]).split(C, dim=-1)
            else:
                q, k, v = self.qkv(h).split(C, dim=-1)  # (B, L, C) each, one product
        else:
            rows = torch.arange(B, device=x.device)
            residual = residual[rows, query_index][:, None]  # (B, 1, C): the queries' residual stream
            q = F.linear(h[rows, query_index][:, None], w[:C], b[:C])  # (B, 1, C)
            k, v = F.linear(kv_in, w[C:], b[C:]).split(C, dim=-1)  # (B, L, C): every position is a key
            if causal:
                # One query per row, at its last real item: it sees every key up to itself,
                # which with right padding is a key mask, not the square causal mask.
                upto = torch.arange(L, device=x.device)[None, :] <= query_index[:, None]  # (B, L)
                key_mask, causal = upto[:, None, None, :], False
        q, k, v = (t.reshape(B, -1, self.heads, C // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, ., C/H)
        a = self._attention(q, k, v, causal, key_mask)  # (B, H, Lq, C/H)
        x = ops.dropout_add(residual, self.proj(a.transpose(1, 2).reshape(B, -1, C)), self.dropout, self.training)
        if self.sasrec:
            x = self.norm2(x)
            f = self.ffn_out(ops.dropout(F.relu(self.ffn_in(x)), self.dropout, self.training))
        else:
            f = self.ffn_out(ops.dropout(F.gelu(self.ffn_in(self.norm2(x))), self.dropout, self.training))
        return ops.dropout_add(x, f, self.dropout, self.training)

    def _attention(self, q, k, v, causal: bool, key_mask: torch.Tensor | None) -> torch.Tensor:
        drop = self.attn_dropout if self.training else 0.0
        if drop > 0 and q.device.type == "cpu":
            # Explicit attention, so the dropout on the weights is the cheap one.
            scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5  # (B, H, Lq, Lk)
            if causal:
                lq, lk = scores.shape[-2:]
                allowed = torch.ones(lq, lk, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~allowed, float("-inf"))
            if key_mask is not None:
                scores = scores.masked_fill(~key_mask, float("-inf"))
            return ops.dropout(scores.softmax(dim=-1), drop, True) @ v
        return F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask, dropout_p=drop, is_causal=causal)


class SequenceEncoder(nn.Module):
    """Item + learned position embeddings, `blocks` transformer blocks, final LayerNorm.

    Input: (B, L) item ids, right-padded with 0 (a row's n items in columns 0..n - 1, most
    recent last). Positions count back from the most recent item (0 = most recent), so the
    same item at the same recency embeds the same whatever the batch width or padding.
    States at padding positions are meaningless and never read.
    """

    def __init__(
        self, n_tokens: int, hidden: int, blocks: int, heads: int, dropout: float, max_len: int,
        causal: bool, init_std: float = 0.02, attn_dropout: float = 0.0, ffn_mult: int = 4,
        layout: str = "pre",
    ):
        super().__init__()
        self.causal = causal
        self.emb_scale = hidden**0.5 if layout == "sasrec" else 1.0
        self.dropout = dropout
        self.item_emb = nn.Embedding(n_tokens, hidden, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads, dropout, attn_dropout, ffn_mult, layout) for _ in range(blocks))
        self.norm = nn.LayerNorm(hidden)
        self.apply(lambda m: _init(m, init_std))

    def forward(self, seq: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """seq: (B, L) -> (B, L, C) states; last_only: (B, C), the state at each row's last item.

        last_only runs the rows in chunks of at most `LAST_ONLY_POSITIONS` positions, so the
        activations of a chunk stay in cache (each row's result is the same either way).
        """
        if last_only:
            budget = LAST_ONLY_POSITIONS.get(seq.device.type, LAST_ONLY_POSITIONS["cuda"])
            rows = max(1, budget // max(1, seq.shape[1]))
            if len(seq) > rows:
                return torch.cat([self._forward(part, True) for part in seq.split(rows)])
        return self._forward(seq, last_only)

    def _forward(self, seq: torch.Tensor, last_only: bool) -> torch.Tensor:
        B, L = seq.shape
        real = seq != 0  # (B, L)
        n = real.sum(dim=1)  # (B,)
        recency = (n[:, None] - 1 - torch.arange(L, device=seq.device)[None, :]).clamp_(min=0)  # (B, L)
        items = self.item_emb(seq)
        if self.emb_scale != 1.0:
            items = items * self.emb_scale
        x = ops.dropout(items + self.pos_emb(recency), self.dropout, self.training)
        key_mask = None if self.causal else real[:, None, None, :]
        if not last_only:
            for block in self.blocks:
                x = block(x, self.causal, key_mask)
            return self.norm(x)
        for block in self.blocks[:-1]:
            x = block(x, self.causal, key_mask)
        x = self.blocks[-1](x, self.causal, key_mask, query_index=(n - 1).clamp(min=0))  # (B, 1, C)
        return self.norm(x[:, 0])


def last_positions(seq: torch.Tensor) -> torch.Tensor:
    """(B,) column of each right-padded row's most recent item (0 for an empty row)."""
    return ((seq != 0).sum(dim=1) - 1).clamp(min=0)


def _init(module: nn.Module, std: float) -> None:
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
