"""GCNII (Chen et al., "Simple and Deep Graph Convolutional Networks", ICML 2020) on the
user-item graph: graph convolution with an initial residual and an identity mapping, which
keep many layers from over-smoothing.

    E^(0) = [user ego embeddings; item ego embeddings]                              (U + N, C)
    E^(l) = act( ((1 - alpha) Â E^(l-1) + alpha E^(0)) ((1 - beta_l) I + beta_l W_l) ),  l = 1..L
    beta_l = log(lambda / l + 1)
    final = E^(L)

Â = D^-1/2 A D^-1/2 is LightGCN's normalised bipartite adjacency of the TRAIN interactions
(no self-loops: the initial residual plays their part), and the ego embeddings are the
first layer's input, as LightGCN's are (the paper's input layer maps node features, which a
recommender does not have). The paper's activation is ReLU; on ego embeddings ReLU makes
every score a dot product of non-negative vectors, so `activation` defaults to "none" (the
linear propagation that LightGCN found better for collaborative filtering) and "relu" gives
the paper's form. Everything else (pair batches, BPR, L2 on the batch's ego embeddings,
scoring, the propagation order) is LightGCN's; the whole graph is propagated again at every
optimiser step (field-lessons §4).

Paper: https://arxiv.org/abs/2007.02133. Reference code: https://github.com/chennnM/GCNII
(model.py: theta = log(lamda / l + 1); output = theta * support @ W + (1 - theta) * support,
support = (1 - alpha) * adj @ h + alpha * h0; W ~ U(-1/sqrt(C), 1/sqrt(C)); alpha 0.1, lamda 0.5).
The default alpha here is 0.5, not 0.1: see GCNIIConfig.alpha.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from rayrec.errors import UserError
from rayrec.models.base import ModelSpec
from rayrec.models.bprmf import GRAPH_TRAIN_DEFAULTS
from rayrec.models.lightgcn import LightGCN, LightGCNConfig, SymmetricSpMM

ACTIVATIONS = ("none", "relu")


@dataclass
class GCNIIConfig(LightGCNConfig):
    """LightGCN's fields (hidden, reg, negatives, init_std, sampling) and GCNII's own."""

    layers: int = 8  # propagation layers L; the initial residual lets GCNII go deep (paper: up to 64)
    # Initial-residual weight of E^(0) in every layer. At the paper's 0.1 (8 layers) lastfm's
    # validation Recall@20 stayed at popularity's ~0.035 for 25 epochs (coverage@20 2%), and 0.2
    # reached 0.047 by epoch 11; 0.5 reached 0.134 by epoch 30, still rising (docs/benchmarks.md).
    alpha: float = 0.5
    lam: float = 0.5  # lambda of the identity mapping, beta_l = log(lambda / l + 1) (paper: 0.5)
    activation: str = "none"  # "none" (linear, as LightGCN) | "relu" (the paper's)

    def validate(self) -> None:
        super().validate()
        if not 0.0 <= self.alpha <= 1.0:
            raise UserError(f"model.alpha must be in [0, 1], got {self.alpha}")
        if not self.lam > 0:
            raise UserError(f"model.lam must be > 0, got {self.lam}")
        if self.activation not in ACTIVATIONS:
            raise UserError(f"model.activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}")


class GCNII(LightGCN):
    def __init__(self, cfg: GCNIIConfig, data):
        super().__init__(cfg, data)
        bound = 1.0 / math.sqrt(cfg.hidden)  # the reference's init
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(cfg.hidden, cfg.hidden).uniform_(-bound, bound)) for _ in range(cfg.layers)
        )

    def betas(self) -> list[float]:
        """beta_l = log(lambda / l + 1), l = 1..L: each deeper layer stays closer to the identity."""
        return [math.log(self.cfg.lam / layer + 1.0) for layer in range(1, self.cfg.layers + 1)]

    def propagate(self) -> torch.Tensor:
        ego = self.ego  # (U + N, C), propagation order
        adj, alpha = self.adj, self.cfg.alpha
        with torch.autocast(ego.device.type, enabled=False):
            layer = ego
            for weight, beta in zip(self.weights, self.betas()):
                support = (1 - alpha) * SymmetricSpMM.apply(adj, layer) + alpha * ego  # (U + N, C)
                layer = (1 - beta) * support + beta * (support @ weight)  # support ((1 - beta) I + beta W)
                if self.cfg.activation == "relu":
                    layer = torch.relu(layer)
        return layer

    def batch_embeddings(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.propagated_batch_embeddings(users, items)


SPEC = ModelSpec(
    name="gcnii", kind="graph", config_cls=GCNIIConfig, model_cls=GCNII,
    train_defaults=dict(GRAPH_TRAIN_DEFAULTS), data_defaults={"split": "ratio"},
)
