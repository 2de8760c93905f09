"""SVD-GCN (Peng et al., "SVD-GCN: A Simplified Graph Convolution Paradigm for Recommendation",
CIKM 2022): a graph convolution of any depth over the user-item graph, written through the
truncated SVD of the normalised interaction matrix, with one small learned matrix.

    R~ = (D_u + alpha)^-1/2 R (D_i + alpha)^-1/2 ~= P diag(sigma) Q^T      top-K singular triplets
    users = P diag(exp(beta sigma)) W                                       (U, K) (K, C) -> (U, C)
    items = Q diag(exp(beta sigma)) W                                       (N, K) (K, C) -> (N, C)
    score(u, i) = users[u] . items[i]

exp(beta sigma) is the paper's weighting of the singular vectors (it stands for propagating
infinitely many layers with a low-pass filter), and W is the only learned parameter: the
"learnable low-dimensional weighting" that maps K singular directions to C dimensions. The
SVD is computed once per dataset, from the TRAIN interactions, when the model is built (SciPy
ARPACK, deterministic start vector, float64). The loss (SVD-GCN-M in the reference) is BPR
on (user, positive, negative) plus two auxiliary BPR terms, weighted coef_u and coef_i: a
user ranks a user who shares an item with it above a random user, and a positive item ranks
an item that shares a user with it above a random item; L2 `reg` is on the batch's final
embeddings (what the reference regularises; W has no other regulariser).

Paper: https://arxiv.org/abs/2208.12689. Reference code: https://github.com/tanatosuu/svd_gcn
(preprocess.py: alpha = 1 renormalisation, torch.svd_lowrank; svd_gcn_m.py: W Xavier-uniform
(K, C), the two auxiliary terms; Param_Settings: K 60-90, beta 2.0, coef_u 0.5, coef_i
0.7-0.9). Where the reference draws a neighbour uniformly from the dense user-user (item-item)
co-occurrence matrix, this draws it by a two-hop walk (a random item of the user, then a
random user of that item), which needs no dense matrix: the neighbour set is the same, the
weights favour neighbours that share more items.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from rayrec.data.batches import pair_batches
from rayrec.data.types import CSR
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec, RecModel
from rayrec.models.bprmf import BPRMF, GRAPH_TRAIN_DEFAULTS, check_graph_config


@dataclass
class SVDGCNConfig:
    hidden: int = 64  # output size C of the learned (K, C) matrix W
    rank: int = 60  # singular vectors K kept (reference: 60-90); at most min(users, items)
    beta: float = 2.0  # weighting exp(beta * sigma) of each singular vector (reference: 2.0)
    alpha: float = 1.0  # degree renormalisation (D + alpha)^-1/2 before the SVD (reference: 1)
    coef_u: float = 0.5  # weight of the user-user auxiliary BPR term (reference: 0.5)
    coef_i: float = 0.9  # weight of the item-item auxiliary BPR term (reference: 0.7-0.9)
    reg: float = 1e-2  # L2 on the batch's final embeddings, LightGCN-scaled: reg * 0.5 * ||.||^2 / batch
    negatives: int = 1  # uniform negatives per positive (reference: 1)
    # Training pairs: "users" (the reference: a uniform user, then one of its items) | "edges".
    sampling: str = "users"

    def validate(self) -> None:
        check_graph_config(self)
        if self.rank < 1:
            raise UserError(f"model.rank must be >= 1, got {self.rank}")
        if self.alpha < 0:
            raise UserError(f"model.alpha must be >= 0, got {self.alpha}")
        if self.coef_u < 0 or self.coef_i < 0:
            raise UserError(f"model.coef_u and model.coef_i must be >= 0, got {self.coef_u} and {self.coef_i}")


def normalized_interactions(train: CSR, n_items: int, alpha: float):
    """(D_u + alpha)^-1/2 R (D_i + alpha)^-1/2 of the distinct training edges, a SciPy CSR (U, N);
    column i - 1 is item i. Isolated rows and columns stay zero (alpha = 0 included)."""
    from scipy.sparse import csr_matrix

    keys = np.unique(train.rows() * (n_items + 1) + train.items)
    users, items = keys // (n_items + 1), keys % (n_items + 1) - 1
    deg_u = np.bincount(users, minlength=train.n_rows) + alpha
    deg_i = np.bincount(items, minlength=n_items) + alpha
    values = 1.0 / np.sqrt(deg_u[users] * deg_i[items])
    return csr_matrix((values, (users, items)), shape=(train.n_rows, n_items), dtype=np.float64)


def top_singular(matrix, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The k largest singular triplets (P (U, k), sigma (k,) descending, Q (N, k)), deterministic.

    ARPACK (scipy svds) from a fixed start vector; a dense SVD when k is close to the
    smaller side, where ARPACK cannot go.
    """
    k = min(k, *matrix.shape)
    if k >= min(matrix.shape) - 1:
        p, sigma, qt = np.linalg.svd(matrix.toarray(), full_matrices=False)
        return p[:, :k], sigma[:k], qt[:k].T
    from scipy.sparse.linalg import svds

    start = np.full(min(matrix.shape), 1.0 / np.sqrt(min(matrix.shape)))
    p, sigma, qt = svds(matrix, k=k, v0=start)
    by = np.argsort(-sigma)
    return p[:, by], sigma[by], qt[by].T


def neighbours_through(first: CSR, second: CSR, nodes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """For each of `nodes` (rows of `first`), a two-hop neighbour: a uniform entry j of its row of
    `first`, then a uniform entry of row j of `second` (every node must have a row entry)."""
    def uniform_entry(rows: CSR, at: np.ndarray) -> np.ndarray:
        lengths = rows.lengths()[at]
        return rows.items[rows.indptr[at] + (rng.random(len(at)) * lengths).astype(np.int64)]

    return uniform_entry(second, uniform_entry(first, nodes))


class SVDGCN(BPRMF):
    def __init__(self, cfg: SVDGCNConfig, data):
        # BPR-MF's loss, scoring and evaluation cache, but not its embedding tables: the SVD
        # stands in for them, so BPRMF.__init__ (which builds them) is skipped.
        RecModel.__init__(self, cfg, data)
        self._eval_cache = None
        p, sigma, q = top_singular(normalized_interactions(data.train, data.n_items, cfg.alpha), cfg.rank)
        weighting = np.exp(cfg.beta * sigma)  # (K,)
        # Derived from the data, deterministic: buffers that move with the model, outside checkpoints.
        self.register_buffer("user_vectors", torch.from_numpy((p * weighting).astype(np.float32)), persistent=False)
        self.register_buffer("item_vectors", torch.from_numpy((q * weighting).astype(np.float32)), persistent=False)
        k = len(sigma)
        bound = float(np.sqrt(6.0 / (k + cfg.hidden)))  # Xavier uniform, as the reference
        self.weight = nn.Parameter(torch.empty(k, cfg.hidden).uniform_(-bound, bound))  # W (K, C)

    def ego_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """SVD-GCN has no ego tables; its L2 term is on the final embeddings, as in the reference."""
        return self.final_embeddings()

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.user_vectors @ self.weight, self.item_vectors @ self.weight  # (U, C), (N, C)

    def batch_embeddings(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        u, i = self.user_vectors[users] @ self.weight, self.item_vectors[items] @ self.weight  # (B, C), (M, C)
        return u, i, u, i

    def train_batches(self, data, batch_size: int, rng: np.random.Generator, bucket_batches: int = 1):
        train = data.train
        item_users = CSR.from_pairs(train.items, train.rows(), self.n_items + 1)  # row i: the users of item i
        for batch in pair_batches(train, self.n_items, batch_size, rng, self.cfg.negatives, sampling=self.cfg.sampling):
            users, pos = batch["users"], batch["pos"]
            batch["user_pos"] = neighbours_through(train, item_users, users, rng)  # shares an item with the user
            batch["user_neg"] = rng.integers(0, self.n_users, len(users))
            batch["item_pos"] = neighbours_through(item_users, train, pos, rng)  # shares a user with the positive
            batch["item_neg"] = rng.integers(1, self.n_items + 1, len(users))
            yield batch

    def loss(self, batch):
        main = super().loss(batch)  # BPR + L2 on the batch's final embeddings (BPRMF.loss)
        if not ("user_pos" in batch and (self.cfg.coef_u > 0 or self.cfg.coef_i > 0)):
            return main
        v, w = self.user_vectors, self.weight
        items = self.item_vectors
        u = v[batch["users"]] @ w  # (B, C)
        p = items[batch["pos"] - 1] @ w  # (B, C)

        def ranked_above(anchor, better, worse):  # mean BPR of anchor . better over anchor . worse
            return F.softplus((anchor * worse).sum(-1).float() - (anchor * better).sum(-1).float()).mean()

        user_term = ranked_above(u, v[batch["user_pos"]] @ w, v[batch["user_neg"]] @ w)
        item_term = ranked_above(p, items[batch["item_pos"] - 1] @ w, items[batch["item_neg"] - 1] @ w)
        return main + self.cfg.coef_u * user_term + self.cfg.coef_i * item_term


# The reference trains W with plain SGD at lr 4.5-10.5 for about 15 epochs; with AdamW a
# learning rate around 1e-2..1e-1 moves W as fast. Otherwise the graph models' recipe.
SVDGCN_TRAIN_DEFAULTS = {**GRAPH_TRAIN_DEFAULTS, "lr": 1e-2}

SPEC = ModelSpec(
    name="svdgcn", kind="graph", config_cls=SVDGCNConfig, model_cls=SVDGCN,
    train_defaults=dict(SVDGCN_TRAIN_DEFAULTS), data_defaults={"split": "ratio"},
)
