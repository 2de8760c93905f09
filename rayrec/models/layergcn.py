"""LayerGCN (Zhou et al., "Layer-refined Graph Convolutional Networks for Recommendation",
ICDE 2023): LightGCN's propagation with every layer re-weighted, node by node, by how similar
it still is to the node's ego embedding, and degree-sensitive edge dropout while training.

    E^(0) = [user ego embeddings; item ego embeddings]                  (U + N, C)
    H^(l) = Â' E^(l-1)                                                  Â': the (dropped-out) graph
    E^(l) = diag(cos(H^(l), E^(0))) H^(l)                               row-wise cosine, l = 1..L
    final = E^(1) + ... + E^(L)                                          (the ego layer is left out)

Degree-sensitive edge dropout: at every epoch a share `dropout` of the TRAIN edges is removed,
sampling the kept edges without replacement with probability proportional to
1 / sqrt(deg(u) deg(i)), so edges between high-degree nodes are dropped most; the kept graph
is normalised again with its own degrees. Evaluation propagates over the whole graph.

Paper: https://arxiv.org/abs/2207.11088. Reference code: https://github.com/enoche/ImRec
(models/layergcn.py; also in https://github.com/enoche/MMRec): cosine weights against the ego
embeddings, the sum of layers 1..L, `pre_epoch_processing` drawing `torch.multinomial(1 /
sqrt(d_u d_i), keep)` and renormalising; dropout 0.1-0.2, 4 layers. That code alternates the
degree-sensitive draw with a uniform one every other epoch; here every epoch's draw is the
degree-sensitive one the paper describes. The draw uses the epoch's seeded generator, so a
resumed run draws the same graphs. Loss, L2 on the batch's ego embeddings, batches, scoring
and the propagation order are LightGCN's; the graph is propagated again at every optimiser
step (field-lessons §4).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from rayrec.data.batches import pair_batches
from rayrec.data.types import CSR
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec
from rayrec.models.bprmf import GRAPH_TRAIN_DEFAULTS
from rayrec.models.lightgcn import LightGCN, LightGCNConfig, SymmetricSpMM, csr_tensor, propagation_parts


@dataclass
class LayerGCNConfig(LightGCNConfig):
    """LightGCN's fields (hidden, reg, negatives, init_std, sampling) and LayerGCN's own."""

    layers: int = 4  # propagation layers L; the final embedding sums the refined layers 1..L (reference: 4)
    dropout: float = 0.1  # share of training edges dropped at every epoch, degree-sensitively (reference: 0.0-0.2)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"model.dropout must be in [0, 1), got {self.dropout}")


def degree_sensitive_keep(train: CSR, n_items: int, keep: float, rng: np.random.Generator) -> CSR:
    """The training graph with round(keep * edges) distinct edges kept: drawn without replacement
    with probability proportional to 1 / sqrt(deg(u) deg(i)) (LayerGCN's edge dropout).

    Weighted sampling without replacement as one vectorised draw (Efraimidis and Spirakis
    2006): the k largest keys log(U) / w, U uniform, are distributed as k successive weighted
    draws, which is what torch.multinomial(w, k) does in the reference.
    """
    users, items = train.rows(), train.items
    pairs = np.unique(users * (n_items + 1) + items)  # distinct edges (a repeated interaction is one edge)
    users, items = pairs // (n_items + 1), pairs % (n_items + 1)
    deg_u = np.bincount(users, minlength=train.n_rows)
    deg_i = np.bincount(items, minlength=n_items + 1)
    weight = 1.0 / np.sqrt(deg_u[users] * deg_i[items])
    n_keep = int(round(keep * len(pairs)))
    keys = np.log(rng.random(len(pairs))) / weight  # all <= 0; larger = kept
    kept = np.sort(np.argpartition(-keys, n_keep - 1)[:n_keep]) if 0 < n_keep < len(pairs) else np.arange(n_keep)
    return CSR.from_pairs(users[kept], items[kept], train.n_rows)


class LayerGCN(LightGCN):
    def __init__(self, cfg: LayerGCNConfig, data):
        super().__init__(cfg, data)
        # The graph training propagates over: this epoch's dropped-out graph once train_batches
        # has drawn it, the whole graph until then (and always when dropout is 0).
        self.register_buffer("train_crow", self.adj_crow, persistent=False)
        self.register_buffer("train_col", self.adj_col, persistent=False)
        self.register_buffer("train_values", self.adj_values, persistent=False)

    def train_batches(self, data, batch_size: int, rng: np.random.Generator, bucket_batches: int = 1):
        if self.cfg.dropout > 0:
            kept = degree_sensitive_keep(data.train, self.n_items, 1.0 - self.cfg.dropout, rng)
            order = torch.argsort(self.node_rank.cpu())  # the same propagation order as the whole graph's
            crow, col, values, _ = propagation_parts(kept, self.n_users, self.n_items, order=order)
            device = self.adj_values.device
            self.train_crow, self.train_col = crow.to(device), col.to(device)
            self.train_values = values.to(device, self.adj_values.dtype)
        return pair_batches(data.train, self.n_items, batch_size, rng, self.cfg.negatives, sampling=self.cfg.sampling)

    def propagate(self) -> torch.Tensor:
        ego = self.ego  # (U + N, C), propagation order
        if self.training:
            adj = csr_tensor(self.train_crow, self.train_col, self.train_values)
        else:
            adj = self.adj
        with torch.autocast(ego.device.type, enabled=False):
            layer, total = ego, torch.zeros_like(ego)
            for _ in range(self.cfg.layers):
                layer = SymmetricSpMM.apply(adj, layer)  # (U + N, C)
                layer = F.cosine_similarity(layer, ego, dim=-1)[:, None] * layer  # refined by similarity to the ego layer
                total = total + layer
        return total

    def batch_embeddings(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.propagated_batch_embeddings(users, items)


SPEC = ModelSpec(
    name="layergcn", kind="graph", config_cls=LayerGCNConfig, model_cls=LayerGCN,
    train_defaults=dict(GRAPH_TRAIN_DEFAULTS), data_defaults={"split": "ratio"},
)
