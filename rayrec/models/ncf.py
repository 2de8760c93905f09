"""NCF / NeuMF (He et al., "Neural Collaborative Filtering", WWW 2017): a generalised matrix
factorisation (GMF) and a multi-layer perceptron (MLP) over separate user and item
embeddings, fused by one output layer and trained as binary classification (BCE) of observed
interactions against sampled negatives.

    GMF:   g = p_u^G * q_i^G                                     (C,)
    MLP:   m = MLP([p_u^M ; q_i^M])                              (C / 2^(L-1),)  tower, halving
    score: y(u, i) = h^T [g ; m] + b                             a logit; sigmoid in the loss

Paper: https://arxiv.org/abs/1708.05031. Reference code: https://github.com/hexiangnan/neural_collaborative_filtering
(Keras; its NeuMF takes a tower of MLP layers, 4 negatives per positive, and initialises the
embeddings with N(0, 0.01)). The paper's optional pre-training of GMF and MLP is not done
here: NeuMF is trained from scratch, the paper's "without pre-training" variant.

Scoring all items: the first MLP layer is linear in [p_u ; q_i], so W1 [p_u ; q_i] =
W1_u p_u + W1_i q_i: the user half is computed once per user, the item half once per item, and
only the layers above the first run on every (user, item) pair, in chunks of users.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rayrec.data.batches import pair_batches
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec, RecModel
from rayrec.models.bprmf import GRAPH_TRAIN_DEFAULTS

# (user, item) pairs per chunk when scoring the whole catalogue: bounds the (users, items,
# width) activations of the MLP to about 16M values (64 MiB in float32) at a time.
SCORE_CHUNK_PAIRS = 1 << 18


@dataclass
class NCFConfig:
    embedding_dim: int = 64  # GMF embedding size, and the MLP's first layer width (its input is 2x this)
    hidden_layers: int = 3  # MLP layers, a halving tower: embedding_dim, embedding_dim/2, ... (NCF paper)
    dropout: float = 0.2  # dropout on the MLP's hidden layers (field-lessons §3: floor 0.1)
    negatives: int = 4  # sampled negatives per positive (NCF paper: 4)
    init_std: float = 0.01  # normal init of the embeddings (NCF reference: N(0, 0.01))

    def validate(self) -> None:
        if self.embedding_dim < 1:
            raise UserError(f"model.embedding_dim must be >= 1, got {self.embedding_dim}")
        if self.hidden_layers < 1:
            raise UserError(f"model.hidden_layers must be >= 1, got {self.hidden_layers}")
        if self.embedding_dim >> (self.hidden_layers - 1) < 1:
            raise UserError(f"model.hidden_layers={self.hidden_layers} halves model.embedding_dim="
                            f"{self.embedding_dim} below 1; use at most {self.embedding_dim.bit_length()} layers")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")
        if self.negatives < 1:
            raise UserError(f"model.negatives must be >= 1, got {self.negatives}")
        if not self.init_std > 0:
            raise UserError(f"model.init_std must be > 0, got {self.init_std}")


class NeuMF(RecModel):
    kind = "graph"  # order-free (user, item) pairs: the graph models' data path and protocol

    def __init__(self, cfg: NCFConfig, data):
        super().__init__(cfg, data)
        c = cfg.embedding_dim
        # Row u is user u; row i - 1 is item i (no padding row). GMF and MLP embed separately.
        self.user_gmf = nn.Embedding(data.n_users, c)
        self.item_gmf = nn.Embedding(data.n_items, c)
        self.user_mlp = nn.Embedding(data.n_users, c)
        self.item_mlp = nn.Embedding(data.n_items, c)
        for table in (self.user_gmf, self.item_gmf, self.user_mlp, self.item_mlp):
            nn.init.normal_(table.weight, std=cfg.init_std)
        widths = [c >> k for k in range(cfg.hidden_layers)]  # the tower: c, c/2, ...
        # First layer split into its user and item halves (see the module docstring).
        self.first_user = nn.Linear(c, widths[0])
        self.first_item = nn.Linear(c, widths[0], bias=False)
        self.tower = nn.ModuleList(nn.Linear(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.out = nn.Linear(c + widths[-1], 1)  # h and b over [GMF ; MLP]
        self.dropout = nn.Dropout(cfg.dropout)

    def train_batches(self, data, batch_size: int, rng: np.random.Generator, bucket_batches: int = 1):
        return pair_batches(data.train, self.n_items, batch_size, rng, self.cfg.negatives)

    def _mlp(self, hidden: torch.Tensor) -> torch.Tensor:
        """The tower above the first layer's pre-activation: (..., width0) -> (..., width_last)."""
        hidden = self.dropout(F.relu(hidden))
        for layer in self.tower:
            hidden = self.dropout(F.relu(layer(hidden)))
        return hidden

    def _logits(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Logits of users (B,) against items (B, M) (item rows, 0-based): (B, M)."""
        gmf = self.user_gmf(users)[:, None, :] * self.item_gmf(items)  # (B, M, C)
        first = self.first_user(self.user_mlp(users))[:, None, :] + self.first_item(self.item_mlp(items))  # (B, M, W0)
        fused = torch.cat([gmf, self._mlp(first)], dim=-1)  # (B, M, C + W_last)
        return self.out(fused).squeeze(-1)

    def loss(self, batch):
        items = torch.cat([batch["pos"][:, None], batch["neg"]], dim=1) - 1  # (B, 1 + k) item rows
        logits = self._logits(batch["users"], items).float()
        labels = torch.zeros_like(logits)
        labels[:, 0] = 1.0
        return F.binary_cross_entropy_with_logits(logits, labels)  # mean over every (user, item) pair

    def score(self, batch):
        """(B, N + 1) logits for every item, column 0 (padding) 0; batched over users and items."""
        users = batch["users"]  # (B,)
        u_gmf = self.user_gmf(users)  # (B, C)
        u_first = self.first_user(self.user_mlp(users))  # (B, W0)
        i_gmf = self.item_gmf.weight  # (N, C)
        i_first = self.first_item(self.item_mlp.weight)  # (N, W0)
        w_gmf, w_mlp = self.out.weight[0, : u_gmf.shape[1]], self.out.weight[0, u_gmf.shape[1] :]
        # GMF's share of the logit is bilinear: (u * i) . h = u @ (i * h)^T, one product.
        scores = u_gmf @ (i_gmf * w_gmf).T + self.out.bias  # (B, N)
        step = max(1, SCORE_CHUNK_PAIRS // max(1, self.n_items))
        mlp = []
        for start in range(0, len(users), step):
            hidden = self._mlp(u_first[start : start + step, None, :] + i_first)  # (b, N, W_last)
            mlp.append(hidden @ w_mlp)  # (b, N)
        scores = scores + torch.cat(mlp)
        return torch.cat([scores.new_zeros(len(users), 1), scores], dim=1)


# NCF's own recipe: Adam at lr 1e-3 (the paper's search covers 1e-4..5e-3), a mini-batch of
# 256 positives with their negatives; no decoupled decay by default (the paper has none).
# Early stopping on the graph protocol's Recall@20 with a moderate patience: NCF converges in
# tens of epochs, not hundreds.
NCF_TRAIN_DEFAULTS = {**GRAPH_TRAIN_DEFAULTS, "batch_size": 256, "epochs": 200, "patience": 10}

SPEC = ModelSpec(
    name="ncf", kind="graph", config_cls=NCFConfig, model_cls=NeuMF,
    train_defaults=dict(NCF_TRAIN_DEFAULTS), data_defaults={"split": "ratio"},
)
