"""DGRec (Yang et al., "DGRec: Graph Neural Network for Recommendation with Diversified
Embedding Generation", WSDM 2023): LightGCN's propagation made to favour diverse
recommendations by three changes, each driven by item categories.

    E^(0) = [user ego embeddings; item ego embeddings]                    (U + N, C)
    E^(l+1) = Â_S E^(l)        Â_S: D^-1/2 A D^-1/2 whose USER rows keep only the user's
                               selected neighbours S(u) (item rows keep all their users)
    a_l(v) = softmax_l( (E^(l)_v W) . a )                                 layer attention, per node
    final_v = sum_{l=0..L} a_l(v) E^(l)_v
    loss   = mean over (u, i, j) of w_cat(i) * softplus(s_uj - s_ui)  + L2 on the ego embeddings

1. Submodular neighbour selection: a user with more than `neighbours` (k) items aggregates
   messages from k of them only, chosen greedily to maximise a monotone submodular coverage
   of the user's categories,

       f(S) = sum_c n_c(u) (1 - 2^-|S ∩ C_c|)      n_c(u): the user's items in category c,

   so the first pick comes from the user's largest category, and every further pick from a
   category halves that category's next gain: the k messages spread over the user's
   categories instead of repeating the dominant one. Within a category the item with the
   most training interactions goes first (ties: the lower id). The selection depends only on
   the training graph and the categories, so it is computed once (`select_neighbours`); the
   propagation over it is recomputed at every optimiser step (field-lessons §4).
2. Layer attention: the final embedding weighs the layers by a softmax of (E^(l) W) . a per
   node, instead of LightGCN's plain mean. W starts as the identity and a at zero, so the
   model starts as LightGCN's layer mean and learns away from it.
3. Loss reweighting: each positive's BPR term is weighted by its category's class-balanced
   weight (Cui et al., CVPR 2019): w_c = (1 - beta) / (1 - beta^{N_c}), N_c the items in
   category c, normalised so the weights of the categories sum to their number. Items of
   small (long-tail) categories weigh more. beta = 0 turns it off (every w_c = 1).

Categories: the data's when it has them (`SplitData.item_categories`: the synthetic
generator's clusters, or a file given as `data.item_categories`). None of the shared real
datasets has any (ml-100k is u.data alone; lastfm, gowalla and beauty have none), so there
the model DERIVES stand-in categories (`categories: auto` falls back to them, `derived`
forces them): k-means (`n_categories` clusters, seed 0) of the items' unit-length truncated
SVD factors of the training matrix (`derived_categories`). They are clusters of co-consumed
items, not genres: real-data figures of DGRec in rayrec are measured with such categories.

Paper: https://arxiv.org/abs/2211.10486. Reference code: https://github.com/YangLiangwei/DGRec
(models/layers.py, models/models.py, utils/dataloader.py). Facts taken from it: selection
only in the item -> user direction (item -> user messages carry categories; user -> item
messages are all summed), the full graph's degree normalisation kept for the selected
messages, k = 20 neighbours, the layer attention softmax((E W) a) over layers 0..L, the
class-balanced weights normalised to sum to the number of categories (beta 0.9 there).
Differences: the reference selects neighbours at every message pass by a facility-location
function over a Gaussian kernel of the neighbours' current embeddings; here the submodular
function covers the neighbours' categories, as the paper motivates it (diverse categories),
which needs no per-step selection. W and a start at the identity and zero, not N(0, 1).
Batches, negatives, L2 on the batch's ego embeddings, scoring and the propagation order are
LightGCN's.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rayrec.data.types import CSR
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec
from rayrec.models.bprmf import GRAPH_TRAIN_DEFAULTS
from rayrec.models.lightgcn import LightGCN, LightGCNConfig, _normalized_adjacency_parts, csr_tensor, permuted, spmm


@dataclass
class DGRecConfig(LightGCNConfig):
    """LightGCN's fields (hidden, layers, reg, negatives, init_std, sampling) and DGRec's own."""

    neighbours: int = 20  # k: items a user aggregates from, chosen by submodular category coverage (reference: 20)
    beta_class: float = 0.99  # class-balanced loss weights (1 - b) / (1 - b^N_c); 0 = no reweighting (reference: 0.9)
    categories: str = "auto"  # auto: the data's item categories, else derived ones; derived: always derive
    n_categories: int = 20  # clusters when categories are derived (k-means of SVD item factors)

    def validate(self) -> None:
        super().validate()
        if self.neighbours < 1:
            raise UserError(f"model.neighbours must be >= 1, got {self.neighbours}")
        if not 0.0 <= self.beta_class < 1.0:
            raise UserError(f"model.beta_class must be in [0, 1), got {self.beta_class}")
        if self.categories not in ("auto", "derived"):
            raise UserError(f"model.categories must be 'auto' or 'derived', got {self.categories!r}")
        if self.n_categories < 1:
            raise UserError(f"model.n_categories must be >= 1, got {self.n_categories}")


def derived_categories(train: CSR, n_items: int, n_categories: int, seed: int = 0) -> np.ndarray:
    """Stand-in item categories from the training graph alone: int64 [n_items + 1], codes
    0..C-1, entry 0 (padding) -1.

    Items are embedded by the truncated SVD (scikit-learn, seeded) of the binary item x user
    training matrix, scaled to unit length, and clustered by k-means (seeded): items bought by
    the same users share a category. Deterministic for a given split.
    """
    from scipy.sparse import csr_matrix
    from sklearn.cluster import KMeans
    from sklearn.decomposition import TruncatedSVD

    out = np.full(n_items + 1, -1, dtype=np.int64)
    n_clusters = min(n_categories, n_items)
    if n_clusters <= 1:
        out[1:] = 0
        return out
    matrix = csr_matrix((np.ones(train.nnz), (train.items - 1, train.rows())), shape=(n_items, train.n_rows))
    matrix.data[:] = 1.0  # repeated interactions count once
    components = max(1, min(32, n_items - 1, train.n_rows - 1))
    factors = TruncatedSVD(components, random_state=seed).fit_transform(matrix)  # (N, components)
    norms = np.linalg.norm(factors, axis=1, keepdims=True)
    factors = np.divide(factors, norms, out=np.zeros_like(factors), where=norms > 0)
    out[1:] = KMeans(n_clusters, n_init=4, random_state=seed).fit_predict(factors)
    return out


def select_neighbours(train: CSR, categories: np.ndarray, k: int) -> CSR:
    """Each user's training items, cut to the k chosen by greedy maximisation of the category
    coverage f(S) = sum_c n_c (1 - 2^-|S ∩ C_c|) (users with at most k distinct items keep all).

    categories: int64 [n_items + 1]. The gain of the j-th pick (j = 0, 1, ...) from category c
    is n_c 2^-(j+1), decreasing in j, so the greedy sequence is the k largest gains over all
    (category, j) candidates: one vectorised sort instead of a loop per user. Ties go to the
    lower category code; within a category, items by training degree (desc), then id. Rows
    come back in that selection order, duplicates removed.
    """
    users, items = train.rows(), train.items
    pairs = np.unique(users * (len(categories) + 1) + items)  # distinct (user, item), sorted
    users, items = pairs // (len(categories) + 1), pairs % (len(categories) + 1)
    degree = np.bincount(items, minlength=len(categories))
    cats = categories[items]
    # Within each (user, category): items by degree desc, then id; j = rank in that order.
    order = np.lexsort((items, -degree[items], cats, users))
    users, items, cats = users[order], items[order], cats[order]
    group = np.r_[True, (users[1:] != users[:-1]) | (cats[1:] != cats[:-1])]
    starts = np.flatnonzero(group)
    sizes = np.diff(np.r_[starts, len(users)])
    j = np.arange(len(users)) - np.repeat(starts, sizes)
    n_c = np.repeat(sizes, sizes)
    gain = n_c * np.exp2(-(j + 1.0))
    # Per user: picks by gain desc, category asc, j asc; keep the first k.
    pick = np.lexsort((j, cats, -gain, users))
    users, items = users[pick], items[pick]
    first = np.r_[True, users[1:] != users[:-1]]
    row_start = np.maximum.accumulate(np.where(first, np.arange(len(users)), 0))
    keep = np.arange(len(users)) - row_start < k
    return CSR.from_pairs(users[keep], items[keep], train.n_rows)


def class_balanced_weights(categories: np.ndarray, beta: float) -> np.ndarray:
    """Per item id: its category's weight (1 - beta) / (1 - beta^N_c), the category weights
    normalised to sum to the number of categories; float32 [n_items + 1] (padding: 0)."""
    codes = categories[1:]
    counts = np.bincount(codes)
    present = counts > 0
    weight = np.zeros(len(counts))
    weight[present] = (1.0 - beta) / (1.0 - beta ** counts[present])
    weight *= present.sum() / weight.sum()
    return np.r_[0.0, weight[codes]].astype(np.float32)


class _SpMM(torch.autograd.Function):
    """adj @ x for a sparse CSR adj with its transpose given, whose backward is adj^T @ grad
    (DGRec's selected graph is not symmetric: a user hears k items, an item hears all its users)."""

    @staticmethod
    def forward(ctx, adj: torch.Tensor, adj_t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj_t = adj_t
        return spmm(adj, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None, spmm(ctx.adj_t, grad)


class DGRec(LightGCN):
    def __init__(self, cfg: DGRecConfig, data):
        super().__init__(cfg, data)
        if cfg.categories == "auto" and data.item_categories is not None:
            categories = np.asarray(data.item_categories, dtype=np.int64)
            self.category_source = "data"
        else:
            categories = derived_categories(data.train, data.n_items, cfg.n_categories)
            self.category_source = "derived"
        # Derived from the data, not learned: buffers outside the state_dict, like the adjacency.
        self.register_buffer("item_categories", torch.from_numpy(categories), persistent=False)
        weights = class_balanced_weights(categories, cfg.beta_class)
        self.register_buffer("item_weights", torch.from_numpy(weights), persistent=False)
        selected = select_neighbours(data.train, categories, cfg.neighbours)
        order = torch.argsort(self.node_rank)  # the same propagation order as LightGCN's graph
        parts = selected_adjacency_parts(data.train, selected, data.n_users, data.n_items)
        crow, col, values = permuted(*parts, order)
        t_crow, t_col, t_values = permuted(*transposed_parts(*parts), order)
        for name, tensor in (("sel_crow", crow), ("sel_col", col), ("sel_values", values),
                             ("sel_t_crow", t_crow), ("sel_t_col", t_col), ("sel_t_values", t_values)):
            if name.endswith(("crow", "col")):
                tensor = tensor.int()  # int32 indices: the CPU kernel converts int64 ones at every product
            self.register_buffer(name, tensor, persistent=False)
        # Layer attention: W = I and a = 0 give LightGCN's equal layer weights at the start.
        self.att_w = nn.Parameter(torch.eye(cfg.hidden))  # (C, C)
        self.att_a = nn.Parameter(torch.zeros(cfg.hidden))  # (C,)

    def layer_stack(self) -> torch.Tensor:
        """E^(0..L) over the selected graph, in propagation order: (L + 1, U + N, C)."""
        adj = csr_tensor(self.sel_crow, self.sel_col, self.sel_values)
        adj_t = csr_tensor(self.sel_t_crow, self.sel_t_col, self.sel_t_values)
        layer, layers = self.ego, [self.ego]
        for _ in range(self.cfg.layers):
            layer = _SpMM.apply(adj, adj_t, layer)  # (U + N, C)
            layers.append(layer)
        return torch.stack(layers)

    def layer_attention(self, layers: torch.Tensor) -> torch.Tensor:
        """Softmax over layers of (E^(l) W) . a, per node: (L + 1, U + N)."""
        return torch.softmax((layers @ self.att_w) @ self.att_a, dim=0)

    def propagate(self) -> torch.Tensor:
        with torch.autocast(self.ego.device.type, enabled=False):
            layers = self.layer_stack()  # (L + 1, U + N, C)
            return (self.layer_attention(layers)[..., None] * layers).sum(0)  # (U + N, C)

    def batch_embeddings(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.propagated_batch_embeddings(users, items)

    def positive_weights(self, batch) -> torch.Tensor:
        """Loss reweighting: each positive's BPR terms weigh its category's class-balanced weight."""
        return self.item_weights[batch["pos"]]  # (B,)

    def extra_metrics(self) -> dict[str, float]:
        """The mean attention each layer gets over the nodes: it leaves 1 / (L + 1) as the
        attention learns (a stuck value means the module does not train)."""
        with torch.no_grad():
            mean = self.layer_attention(self.layer_stack()).mean(1)
        return {f"layer_attention_{layer}": float(v) for layer, v in enumerate(mean)}


def selected_adjacency_parts(train: CSR, selected: CSR, n_users: int, n_items: int):
    """(crow, col, values) in node id order of D^-1/2 A D^-1/2 with each user row cut to its
    selected items; degrees (and so values) are the full graph's, as in the reference."""
    crow, col, values = _normalized_adjacency_parts(train, n_users, n_items)
    n_nodes = n_users + n_items
    rows = torch.repeat_interleave(torch.arange(n_nodes), crow[1:] - crow[:-1])
    wanted = selected.rows() * n_nodes + n_users + selected.items - 1  # (user, item node) keys
    keep = torch.from_numpy((rows >= n_users).numpy() | np.isin((rows * n_nodes + col).numpy(), wanted))
    new_crow = torch.zeros(n_nodes + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(rows[keep], minlength=n_nodes), 0, out=new_crow[1:])
    return new_crow, col[keep], values[keep]


def transposed_parts(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor):
    """CSR parts of the transpose of a square CSR given by its parts."""
    n = crow.shape[0] - 1
    rows = torch.repeat_interleave(torch.arange(n), crow[1:] - crow[:-1])
    by = torch.argsort(col * n + rows)
    new_crow = torch.zeros(n + 1, dtype=torch.int64)
    torch.cumsum(torch.bincount(col, minlength=n), 0, out=new_crow[1:])
    return new_crow, rows[by], values[by]


SPEC = ModelSpec(
    name="dgrec", kind="graph", config_cls=DGRecConfig, model_cls=DGRec,
    train_defaults=dict(GRAPH_TRAIN_DEFAULTS), data_defaults={"split": "ratio"},
)
