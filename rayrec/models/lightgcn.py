"""LightGCN (He et al., SIGIR'20): matrix factorisation whose embeddings are smoothed over
the user-item graph.

    E^(0) = [user ego embeddings; item ego embeddings]          (U + N, C)
    E^(k+1) = D^-1/2 A D^-1/2 E^(k)                             A: the bipartite TRAIN graph
    final = (E^(0) + E^(1) + ... + E^(K)) / (K + 1)

Everything else (pair batches, BPR, L2 on the ego embeddings, dot-product scores, the
per-evaluation cache) is BPR-MF's. The propagation runs inside every `loss()` call, so each
optimiser step sees embeddings computed from the current weights (field-lessons §4: reusing
propagated embeddings across steps is the classic silent failure of graph models).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from rayrec.data.types import CSR
from rayrec.errors import UserError
from rayrec.models.base import ModelSpec
from rayrec.models.bprmf import BPRMF, GRAPH_TRAIN_DEFAULTS, check_graph_config


@dataclass
class LightGCNConfig:
    hidden: int = 64  # embedding size
    layers: int = 3  # propagation layers K; the final embedding averages layers 0..K
    reg: float = 1e-4  # L2 on the batch's EGO embeddings, LightGCN-scaled: reg * 0.5 * ||.||^2 / batch
    negatives: int = 1  # uniform negatives per positive (anchors.md: the LightGCN protocol uses 1)
    init_std: float = 0.1  # normal init of the ego embeddings (field-lessons §5: ~0.1, not 0.01)
    # Training pairs: "edges" = every interaction once per epoch; "users" = the LightGCN
    # reference's sampler (a uniform user, then one of its items); see pair_batches.
    sampling: str = "edges"

    def validate(self) -> None:
        check_graph_config(self)
        if self.layers < 1:
            raise UserError(f"model.layers must be >= 1, got {self.layers} (0 layers is BPR-MF: use model bprmf)")


def normalized_adjacency(train: CSR, n_users: int, n_items: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the bipartite graph of `train`, as a sparse CSR tensor (U + N, U + N).

    Node u is user u; node U + i - 1 is item i. Entry (u, item) = 1 / sqrt(deg(u) deg(item));
    duplicate interactions count once; isolated nodes get an all-zero row.
    """
    return csr_tensor(*_normalized_adjacency_parts(train, n_users, n_items))


def csr_tensor(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_cols: int | None = None) -> torch.Tensor:
    """A sparse CSR tensor (rows, n_cols; square by default) over existing index and value tensors (no copy)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        n = crow.shape[0] - 1
        return torch.sparse_csr_tensor(crow, col, values, size=(n, n if n_cols is None else n_cols), check_invariants=False)


def propagation_parts(train: CSR, n_users: int, n_items: int, order: torch.Tensor | None = None):
    """(crow, col, values, order): D^-1/2 A D^-1/2 of `train`'s bipartite graph as CSR parts with
    rows and columns in propagation order `order` (new position -> node; by default the graph's
    `locality_order`), indices int32 where they fit."""
    crow, col, values = _normalized_adjacency_parts(train, n_users, n_items)
    # Propagation runs over the nodes in bandwidth-reducing order, so that the rows a
    # product reads lie close together in memory (see `locality_order`).
    if order is None:
        order = locality_order(crow, col)
    crow, col, values = permuted(crow, col, values, order)
    if len(values) < 2**31:
        # int32 indices: the CPU (MKL) kernel converts int64 ones on every product.
        crow, col = crow.int(), col.int()
    return crow, col, values, order


def _normalized_adjacency_parts(train: CSR, n_users: int, n_items: int):
    n_nodes = n_users + n_items
    users = train.rows()
    items = n_users + train.items - 1
    # Both directions, sorted by (row, col) and deduplicated, which is CSR order.
    keys = np.concatenate([users * n_nodes + items, items * n_nodes + users])
    keys.sort()
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    keys = keys[first]
    rows, cols = keys // n_nodes, keys % n_nodes
    degree = np.bincount(rows, minlength=n_nodes)
    inv_sqrt = np.zeros(n_nodes)
    np.divide(1.0, np.sqrt(degree), out=inv_sqrt, where=degree > 0)
    values = (inv_sqrt[rows] * inv_sqrt[cols]).astype(np.float32)
    crow = np.zeros(n_nodes + 1, dtype=np.int64)
    np.cumsum(degree, out=crow[1:])
    return torch.from_numpy(crow), torch.from_numpy(cols), torch.from_numpy(values)


def locality_order(crow: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
    """A node order (new position -> node, int64) in which the graph's edges join nearby nodes.

    Reverse Cuthill-McKee (SciPy) narrows the adjacency's band, so each product gathers rows
    that lie close together in memory: on Gowalla a 64-column product takes about 0.7x the
    time it takes in id order (docs/benchmarks.md). Any order gives the same embeddings up
    to rounding, since only the order of each row's sum changes.
    """
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import reverse_cuthill_mckee

    n = crow.shape[0] - 1
    pattern = csr_matrix((np.ones(len(col), dtype=np.int8), col.numpy(), crow.numpy()), shape=(n, n))
    return torch.from_numpy(reverse_cuthill_mckee(pattern, symmetric_mode=True).astype(np.int64))


def permuted(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, order: torch.Tensor):
    """The CSR parts of P A P^T for the node order `order`: row and column i are node order[i]'s."""
    rank = torch.argsort(order)
    rows = row_subset(crow, col, values, order)  # A's rows in the new order, columns still node ids
    new_crow, new_col = rows.crow_indices(), rank[rows.col_indices()]
    # Columns ascending within each row, as CSR kernels expect: sort by (row, column) keys.
    row_ids = torch.repeat_interleave(torch.arange(len(order)), new_crow[1:] - new_crow[:-1])
    by = torch.argsort(row_ids * len(order) + new_col)
    return new_crow, new_col[by], rows.values()[by]


def spmm(adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """adj @ x for a sparse CSR adj (n, m) and dense x (m, C): (n, C).

    On CPU, `adj @ x` zero-fills its output, multiplies into a temporary and copies it over:
    three passes over (n, C) for one product's worth of result. addmm with beta=0 writes the
    product straight into an uninitialised output (beta=0 ignores its old contents), with the
    same kernel and the same result.
    """
    if adj.device.type != "cpu":
        return adj @ x
    out = x.new_empty(adj.shape[0], x.shape[1])
    return torch.addmm(out, adj, x, beta=0, out=out)


class SymmetricSpMM(torch.autograd.Function):
    """adj @ x for a SYMMETRIC sparse adj, whose backward is adj @ grad.

    torch's own backward of a CSR product transposes the matrix at every call, which is
    about four times slower on CPU than this forward-sized product (measured on Gowalla).
    """

    @staticmethod
    def forward(ctx, adj: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        ctx.adj = adj
        return spmm(adj, x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, spmm(ctx.adj, grad)


class LightGCN(BPRMF):
    kind = "graph"

    def __init__(self, cfg: LightGCNConfig, data):
        super().__init__(cfg, data)
        # Built once from the TRAIN rows only (validation and test edges never enter the
        # graph). Its CSR parts are buffers so that .to(device) moves them with the weights
        # (dense parts, because a sparse CSR tensor cannot be deep-copied); not persistent,
        # because they are derived from the data, not learned (keeps checkpoints small).
        crow, col, values, order = propagation_parts(data.train, data.n_users, data.n_items)
        self.register_buffer("adj_crow", crow, persistent=False)
        self.register_buffer("adj_col", col, persistent=False)
        self.register_buffer("adj_values", values, persistent=False)
        # node_rank[v]: node v's position in the propagation order (order[i] is the node at i).
        self.register_buffer("node_rank", torch.argsort(order), persistent=False)
        # One table of ego embeddings, users then items, stored in propagation order, so a
        # step neither concatenates nor permutes the tables (three full-table passes).
        # Initialised exactly as BPR-MF's two tables.
        with torch.no_grad():
            table = torch.cat([self.user_emb.weight, self.item_emb.weight])[order]
        del self.user_emb, self.item_emb
        self.ego = nn.Parameter(table)  # (U + N, C)

    def ego_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ego embeddings in id order: (users (U, C), items (N, C)); differentiable."""
        ego = self.ego[self.node_rank]
        return ego[: self.n_users], ego[self.n_users :]

    @property
    def adj(self) -> torch.Tensor:
        """The normalised adjacency D^-1/2 A D^-1/2, sparse CSR (U + N, U + N), on the model's device,
        with rows and columns in propagation order (see `node_rank`)."""
        return csr_tensor(self.adj_crow, self.adj_col, self.adj_values)

    def propagate(self) -> torch.Tensor:
        """The final embeddings of every node, in propagation order: (U + N, C).

        LightGCN's: the ego embeddings propagated K layers over the graph, layers averaged.
        Graph models that share this data path override it (GCNII, LayerGCN).
        """
        ego = self.ego  # (U + N, C), propagation order
        # In the weights' dtype even under autocast: the sparse products are memory-bound, and
        # low-precision sparse kernels are not available everywhere.
        adj = self.adj
        with torch.autocast(ego.device.type, enabled=False):
            layer, total = ego, ego
            for _ in range(self.cfg.layers):
                layer = SymmetricSpMM.apply(adj, layer)  # (U + N, C)
                total = total + layer
        return total / (self.cfg.layers + 1)

    def final_embeddings(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(users (U, C), items (N, C)) in id order: `propagate()`, back in node order."""
        final = self.propagate()[self.node_rank]
        return final[: self.n_users], final[self.n_users :]

    def propagated_batch_embeddings(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """`batch_embeddings` by one full `propagate()` whose rows are then gathered.

        For models whose propagation is not LightGCN's linear layer mean, so that
        PropagateRows does not apply; recomputed at every call, i.e. at every optimiser step.
        """
        nodes = self.node_rank[torch.cat([users, items + self.n_users])]  # (B + M,) positions in propagation order
        final, ego = self.propagate()[nodes], self.ego[nodes]
        b = users.shape[0]
        return final[:b], final[b:], ego[:b], ego[b:]

    def batch_embeddings(self, users: torch.Tensor, items: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Final and ego embeddings of the batch's rows only (see BPRMF.batch_embeddings).

        Equal to indexing `final_embeddings()`, with less sparse work: the last layer is
        propagated to the batch's nodes only (see PropagateRows).
        """
        nodes = self.node_rank[torch.cat([users, items + self.n_users])]  # (B + M,) positions in propagation order
        rows, where = torch.unique(nodes, return_inverse=True)  # (R,) sorted distinct positions
        with torch.autocast(self.ego.device.type, enabled=False):
            final, ego_rows = PropagateRows.apply(
                self.ego, rows, self.adj_crow, self.adj_col, self.adj_values, self.cfg.layers
            )  # (R, C) each
        b = users.shape[0]
        # index_select, whose backward is index_add_: an indexing's backward (index_put_ with
        # accumulate) took 0.86 ms a call here, four a step (see PropagateRows.backward).
        u, i = where[:b], where[b:]
        return final.index_select(0, u), final.index_select(0, i), ego_rows.index_select(0, u), ego_rows.index_select(0, i)


def row_subset(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """adj[rows] as a sparse CSR (R, n) with each row's entries in the original order."""
    starts, ends = crow[rows].long(), crow[rows + 1].long()  # (R,)
    lengths = ends - starts
    sub_crow = torch.zeros(len(rows) + 1, dtype=torch.long, device=crow.device)
    torch.cumsum(lengths, 0, out=sub_crow[1:])
    # Entry j of the subset comes from position starts[r] + (j - sub_crow[r]) of its row r.
    shift = torch.repeat_interleave(starts - sub_crow[:-1], lengths)
    take = shift + torch.arange(int(sub_crow[-1]), device=crow.device)
    return csr_tensor(sub_crow.to(crow.dtype), col[take], values[take], n_cols=crow.shape[0] - 1)


def transposed(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, n_cols: int) -> torch.Tensor:
    """The transpose of the CSR (R, n_cols) given by its parts, as a sparse CSR (n_cols, R)."""
    lengths = crow[1:] - crow[:-1]
    rows = torch.repeat_interleave(torch.arange(len(lengths), device=crow.device), lengths.long())
    by_col = torch.argsort(col, stable=True)  # stable: rows stay ascending within each new row
    new_crow = torch.zeros(n_cols + 1, dtype=torch.int64, device=crow.device)
    torch.cumsum(torch.bincount(col.long(), minlength=n_cols), 0, out=new_crow[1:])
    return csr_tensor(new_crow.to(crow.dtype), rows[by_col].to(crow.dtype), values[by_col], n_cols=len(lengths))


class PropagateRows(torch.autograd.Function):
    """Rows `rows` of LightGCN's final embeddings (E0 + A E0 + ... + A^K E0) / (K + 1) and of E0,
    everything (E0, rows, the adjacency) in propagation order.

    Layer K is only needed on `rows`, so the forward costs K - 1 full sparse products plus
    A[rows] @ E_{K-1} (about a sixth of one on a Gowalla batch). A is symmetric, so the
    gradient of the final rows is (G + A G + ... + A^K G) / (K + 1), G = their gradient
    scattered into the full table, computed by Horner's rule with no activation kept, since
    the backward does not depend on E0. G is zero outside `rows`, so the first product,
    A G = A[rows]^T g, reads only the batch's rows of A: K - 1 full products in all.
    """

    @staticmethod
    def forward(ctx, ego: torch.Tensor, rows: torch.Tensor, crow: torch.Tensor, col: torch.Tensor,
                values: torch.Tensor, layers: int) -> tuple[torch.Tensor, torch.Tensor]:
        adj = csr_tensor(crow, col, values)
        ego_rows = ego.index_select(0, rows)  # (R, C); index_select is the faster gather on CPU
        layer, total = ego, ego_rows
        for _ in range(layers - 1):
            layer = spmm(adj, layer)  # (n, C)
            total = total + layer.index_select(0, rows)
        sub = row_subset(crow, col, values, rows)  # A[rows] (R, n)
        total = total + spmm(sub, layer)
        ctx.save_for_backward(rows, crow, col, values, sub.crow_indices(), sub.col_indices(), sub.values())
        ctx.layers = layers
        return total / (layers + 1), ego_rows

    @staticmethod
    def backward(ctx, grad_final: torch.Tensor, grad_ego: torch.Tensor):
        rows, crow, col, values, sub_crow, sub_col, sub_values = ctx.saved_tensors
        adj = csr_tensor(crow, col, values)
        g = grad_final / (ctx.layers + 1)  # (R, C)
        # A G, G = g scattered to `rows`: only A's columns `rows` meet a nonzero, and by
        # symmetry those are A[rows]^T, a sixth of A's entries on a Gowalla batch.
        grad = spmm(transposed(sub_crow, sub_col, sub_values, crow.shape[0] - 1), g)  # (n, C)
        # grad[rows] += g (rows are distinct, so each row gets one exact addition): index_add_,
        # 0.20-0.26 ms for a Gowalla batch's 6,000 rows on 1-2 threads, where index_put_ with
        # accumulate took 0.58 ms on 1 thread and 1.8 ms on 2 (its sort-based path; Intel Xeon,
        # torch 2.13, 2026-12-04): 16% of a LightGCN step before.
        for _ in range(ctx.layers - 1):
            grad.index_add_(0, rows, g)
            grad = spmm(adj, grad)
        grad.index_add_(0, rows, g)
        grad.index_add_(0, rows, grad_ego)
        return grad, None, None, None, None, None


SPEC = ModelSpec(
    name="lightgcn", kind="graph", config_cls=LightGCNConfig, model_cls=LightGCN,
    train_defaults=dict(GRAPH_TRAIN_DEFAULTS), data_defaults={"split": "ratio"},
)
