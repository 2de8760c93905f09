"""NCF (NeuMF) and the graph models that share LightGCN's data path: GCNII, LayerGCN, SVD-GCN, DGRec.

Tiny hand-made data throughout (the `planted` two-cluster split of test_models_graph); the
end-to-end runs (`rayrec train`, `rayrec sweep`, beating popularity) are in test_model_zoo.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from rayrec.config import build_config
from rayrec.data.lightgcn_format import carve_validation
from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError
from rayrec.models.dgrec import DGRec, DGRecConfig, class_balanced_weights, derived_categories, select_neighbours
from rayrec.models.gcnii import GCNII, GCNIIConfig
from rayrec.models.layergcn import LayerGCN, LayerGCNConfig, degree_sensitive_keep
from rayrec.models.lightgcn import LightGCN, LightGCNConfig, csr_tensor
from rayrec.models.ncf import NCFConfig, NeuMF
from rayrec.models.svdgcn import SVDGCN, SVDGCNConfig, normalized_interactions, top_singular
from test_models_graph import first_batch, planted, split, tensors

NEW_GRAPH = [(GCNII, GCNIIConfig), (LayerGCN, LayerGCNConfig), (SVDGCN, SVDGCNConfig), (DGRec, DGRecConfig)]
ROWS = [[1, 2], [2, 3, 4], [4], [1, 3]]  # 4 users, 4 items


def dense_normalized(rows, n_items, alpha=0.0):
    """(D_u + alpha)^-1/2 R (D_i + alpha)^-1/2, and the bipartite (U + N) adjacency built from it when alpha = 0."""
    r = torch.zeros(len(rows), n_items, dtype=torch.float64)
    for u, row in enumerate(rows):
        r[u, torch.tensor(row) - 1] = 1
    du, di = r.sum(1) + alpha, r.sum(0) + alpha
    r_norm = r / du.sqrt()[:, None] / di.sqrt()[None, :]
    a = torch.zeros(len(rows) + n_items, len(rows) + n_items, dtype=torch.float64)
    a[: len(rows), len(rows) :], a[len(rows) :, : len(rows)] = r_norm, r_norm.T
    return r_norm, a


def train_steps(model, data, steps, lr=1e-2, batch_size=32, seed=0):
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    rng = np.random.default_rng(seed)
    done = 0
    while done < steps:
        for batch in model.train_batches(data, batch_size, rng):
            opt.zero_grad()
            model.loss(tensors(batch)).backward()
            opt.step()
            done += 1
            if done == steps:
                break


def planted_recall(model, data, k=5):
    model.eval()
    with torch.no_grad():
        scores = model.score({"users": torch.arange(data.n_users)})
    scores[:, 0] = -math.inf
    for u in range(data.n_users):
        scores[u, torch.as_tensor(data.train.row(u))] = -math.inf
    top = scores.topk(k, dim=1).indices.numpy()
    return float(np.mean([np.isin(data.test.row(u), top[u]).mean() for u in range(data.n_users)]))


def test_rayrec_models_lists_the_new_models():
    from typer.testing import CliRunner

    from rayrec.cli import app

    result = CliRunner().invoke(app, ["models"])
    assert result.exit_code == 0
    kinds = dict(line.split() for line in result.output.strip().splitlines())
    names = ("ncf", "gcnii", "layergcn", "svdgcn", "dgrec")
    assert {name: kinds.get(name) for name in names} == dict.fromkeys(names, "graph")


# --- training and evaluation (the stale-embedding guard for these models is
# test_models_graph.test_every_training_step_propagates_again) ----------------------------

@pytest.mark.parametrize("model_cls,config_cls", NEW_GRAPH)
def test_new_graph_models_learn_planted_clusters_and_evaluate_fresh(model_cls, config_cls):
    data = planted()
    torch.manual_seed(0)
    model = model_cls(config_cls(hidden=16), data)
    model.eval()
    with torch.no_grad():
        before = model.score({"users": torch.arange(4)})
    model.train()
    train_steps(model, data, 150)
    assert planted_recall(model, data) > 0.9  # chance is about 0.38 (see test_models_graph)
    with torch.no_grad():
        after = model.score({"users": torch.arange(4)})
    assert not torch.allclose(before, after), "evaluation reused embeddings from before training"


def test_graph_models_give_different_metrics_on_the_same_data():
    """The field-lessons §4 failure: every graph model reporting identical metrics. Each model
    trained through the shared trainer on one split gives its own figures."""
    from rayrec.train.trainer import Trainer

    base = planted()
    train, valid = carve_validation(base.train, 0.3, seed=0)
    data = SplitData("planted", base.n_users, base.n_items, train, valid, base.test, False, "planted")
    figures = {}
    for name in ("lightgcn", "bprmf", "gcnii", "layergcn", "svdgcn", "ncf", "dgrec"):
        size = {"model.embedding_dim": 16} if name == "ncf" else {"model.hidden": 16}
        cfg = build_config(name, overrides={"train.epochs": 3, "train.batch_size": 32, "train.device": "cpu",
                                            "train.lr": 1e-2, **size})
        fit = Trainer(cfg, data).fit()
        figures[name] = tuple(round(fit.last_metrics[f"val_{m}"], 6) for m in ("recall@20", "ndcg@20", "ndcg@10"))
    assert len(set(figures.values())) == len(figures), figures


# --- GCNII ------------------------------------------------------------------------------------

@pytest.mark.parametrize("activation", ["none", "relu"])
def test_gcnii_propagation_equals_the_dense_formula(activation):
    data = split(ROWS, n_items=4)
    torch.manual_seed(0)
    cfg = GCNIIConfig(hidden=5, layers=3, alpha=0.2, lam=0.7, activation=activation)
    model = GCNII(cfg, data).double()
    _, a = dense_normalized(ROWS, 4)
    ego = torch.cat(model.ego_embeddings()).detach()
    layer = ego
    for depth, w in enumerate(model.weights, start=1):
        beta = math.log(0.7 / depth + 1)
        support = 0.8 * a @ layer + 0.2 * ego
        layer = support @ ((1 - beta) * torch.eye(5, dtype=torch.float64) + beta * w.detach())
        if activation == "relu":
            layer = layer.relu()
    users, items = model.final_embeddings()
    torch.testing.assert_close(torch.cat([users, items]).detach(), layer)
    assert model.betas()[0] == pytest.approx(math.log(1.7)) and model.betas()[1] < model.betas()[0]


def test_gcnii_config_validation():
    assert build_config("gcnii").model.layers == 8
    for key, value in (("model.alpha", 1.5), ("model.lam", 0.0), ("model.layers", 0), ("model.activation", "tanh")):
        with pytest.raises(UserError, match=key):
            build_config("gcnii", overrides={key: value})


# --- LayerGCN ------------------------------------------------------------------------------

def test_layergcn_propagation_refines_each_layer_by_its_similarity_to_the_ego_layer():
    data = split(ROWS, n_items=4)
    torch.manual_seed(0)
    model = LayerGCN(LayerGCNConfig(hidden=5, layers=3, dropout=0.0), data).double().eval()
    _, a = dense_normalized(ROWS, 4)
    ego = torch.cat(model.ego_embeddings()).detach()
    layer, total = ego, torch.zeros_like(ego)
    for _ in range(3):
        layer = a @ layer
        layer = F.cosine_similarity(layer, ego, dim=-1)[:, None] * layer
        total = total + layer  # layers 1..L, the ego layer left out
    torch.testing.assert_close(torch.cat(model.final_embeddings()).detach(), total)


def test_degree_sensitive_edge_dropout_drops_high_degree_edges_most():
    # User 0 and item 1 are hubs; user 4 - item 6 is an edge between two degree-1 nodes.
    rows = [[1, 2, 3, 4, 5], [1, 2], [1, 3], [1, 4], [6]]
    train = CSR.from_lists(rows)
    kept_hub, kept_leaf = 0, 0
    for seed in range(200):
        kept = degree_sensitive_keep(train, 6, 0.6, np.random.default_rng(seed))
        assert kept.nnz == round(0.6 * train.nnz)  # exactly the kept share, distinct edges
        pairs = set(zip(kept.rows().tolist(), kept.items.tolist()))
        assert len(pairs) == kept.nnz and pairs <= set(zip(train.rows().tolist(), train.items.tolist()))
        kept_hub += (0, 1) in pairs  # 1 / sqrt(5 * 4): the lightest edge
        kept_leaf += (4, 6) in pairs  # 1 / sqrt(1 * 1): the heaviest
    # A uniform draw keeps every edge in 7 of 11 draws (about 127 of 200 here); measured 176 and 92.
    assert kept_leaf > 150 and kept_hub < 110, (kept_leaf, kept_hub)
    again = degree_sensitive_keep(train, 6, 0.6, np.random.default_rng(7))
    np.testing.assert_array_equal(again.items, degree_sensitive_keep(train, 6, 0.6, np.random.default_rng(7)).items)


def test_layergcn_trains_on_the_epochs_dropped_graph_and_evaluates_on_the_whole_graph():
    data = planted()
    model = LayerGCN(LayerGCNConfig(hidden=8, dropout=0.3), data)
    full = model.adj.to_dense()
    next(iter(model.train_batches(data, 32, np.random.default_rng(0))))  # draws this epoch's graph
    dropped = csr_tensor(model.train_crow, model.train_col, model.train_values).to_dense()
    n_edges = int((full > 0).sum()) // 2
    assert int((dropped > 0).sum()) // 2 == round(0.7 * n_edges)
    assert torch.equal(dropped, dropped.T) and ((dropped > 0) <= (full > 0)).all()
    # Renormalised with the kept graph's degrees: entry (v, w) = 1 / sqrt(deg'(v) deg'(w)).
    degree = (dropped > 0).sum(1).double()
    v, w = dropped.nonzero(as_tuple=True)
    torch.testing.assert_close(dropped[v, w].double(), 1 / (degree[v] * degree[w]).sqrt())
    with torch.no_grad():
        model.train()
        on_dropped = torch.cat(model.final_embeddings())
        model.eval()
        on_full = torch.cat(model.final_embeddings())
    assert not torch.allclose(on_dropped, on_full)


def test_layergcn_config_validation():
    for key, value in (("model.dropout", 1.0), ("model.dropout", -0.1), ("model.layers", 0)):
        with pytest.raises(UserError, match=key):
            build_config("layergcn", overrides={key: value})


# --- SVD-GCN ---------------------------------------------------------------------------------

def test_svdgcn_vectors_are_the_weighted_top_singular_vectors_of_the_renormalised_matrix():
    data = planted()
    r_norm, _ = dense_normalized([data.train.row(u).tolist() for u in range(data.n_users)], data.n_items, alpha=1.0)
    matrix = normalized_interactions(data.train, data.n_items, alpha=1.0)
    np.testing.assert_allclose(matrix.toarray(), r_norm.numpy())
    p, sigma, q = top_singular(matrix, 5)
    np.testing.assert_allclose(sigma, np.linalg.svd(r_norm.numpy(), compute_uv=False)[:5], rtol=1e-8)
    assert np.all(np.diff(sigma) <= 0)
    # The top-5 singular triplets reconstruct R~'s best rank-5 approximation.
    u_full, s_full, vt_full = np.linalg.svd(r_norm.numpy())
    np.testing.assert_allclose(p * sigma @ q.T, u_full[:, :5] * s_full[:5] @ vt_full[:5], atol=1e-8)
    model = SVDGCN(SVDGCNConfig(hidden=4, rank=5, beta=2.0), data)
    torch.testing.assert_close(model.user_vectors.double(), torch.from_numpy(p * np.exp(2.0 * sigma)), rtol=1e-5, atol=1e-6)
    assert [name for name, _ in model.named_parameters()] == ["weight"] and model.weight.shape == (5, 4)
    assert not any(key.endswith("vectors") for key in model.state_dict())  # derived from the data


def test_svdgcn_rank_is_capped_by_the_matrix_and_the_svd_is_deterministic():
    data = split(ROWS, n_items=4)
    model = SVDGCN(SVDGCNConfig(hidden=3, rank=60), data)
    assert model.weight.shape == (4, 3)  # min(users, items)
    a = SVDGCN(SVDGCNConfig(hidden=3, rank=8), planted())
    b = SVDGCN(SVDGCNConfig(hidden=3, rank=8), planted())
    assert torch.equal(a.user_vectors, b.user_vectors)


def test_svdgcn_auxiliary_neighbours_share_an_item_or_a_user():
    data = planted()
    model = SVDGCN(SVDGCNConfig(hidden=4, rank=4), data)
    batch = next(iter(model.train_batches(data, 64, np.random.default_rng(0))))
    for u, v in zip(batch["users"], batch["user_pos"]):
        assert set(data.train.row(u)) & set(data.train.row(v))
    users_of = {i: {u for u in range(data.n_users) if i in data.train.row(u)} for i in range(1, data.n_items + 1)}
    for i, j in zip(batch["pos"], batch["item_pos"]):
        assert users_of[i] & users_of[j]
    assert batch["user_neg"].max() < data.n_users and 1 <= batch["item_neg"].min() <= batch["item_neg"].max() <= data.n_items
    # The auxiliary terms weigh in: with both coefficients 0 the loss is BPR-MF's on the final embeddings.
    batch = tensors(batch)
    with torch.no_grad():
        full = model.loss(batch)
        model.cfg.coef_u = model.cfg.coef_i = 0.0
        plain = model.loss(batch)
    assert full > plain


# --- DGRec -----------------------------------------------------------------------------------

def greedy_coverage(items, categories, degree, k):
    """The textbook greedy for f(S) = sum_c n_c (1 - 2^-|S ∩ C_c|): k times, add the candidate
    with the largest marginal gain f(S + j) - f(S) (ties: lower category, then higher degree, then lower id)."""
    n = {c: sum(categories[i] == c for i in items) for c in set(categories[i] for i in items)}

    def f(chosen):
        return sum(n_c * (1 - 2.0 ** -sum(categories[i] == c for i in chosen)) for c, n_c in n.items())

    chosen = []
    for _ in range(min(k, len(items))):
        rest = [i for i in items if i not in chosen]
        best = max(rest, key=lambda i: (f(chosen + [i]) - f(chosen), -categories[i], degree[i], -i))
        chosen.append(best)
    return chosen


def test_neighbour_selection_is_the_greedy_maximiser_of_category_coverage():
    # Items 1..8; categories: 1-4 -> 0, 5-6 -> 1, 7 -> 2, 8 -> 3.
    categories = np.array([-1, 0, 0, 0, 0, 1, 1, 2, 3])
    rows = [[1, 2, 3, 4, 5, 6, 7], [1, 2, 3], [5, 8, 1, 2, 6], [4, 3, 2, 1, 7]]
    # Item degrees: 1: 4, 2: 4, 3: 3, 4: 2, 5: 2, 6: 2, 7: 2, 8: 1.
    selected = select_neighbours(CSR.from_lists(rows), categories, k=3)
    # User 0: n = (4, 2, 1). Gains: cat 0 -> 2, cat 1 -> 1, cat 0 again -> 1 (tie: lower category first):
    # picks item 1 (cat 0, degree 4 ties item 2: lower id), then the tie at gain 1 goes to category 0
    # (item 2), then category 1 (item 5: degree 2 ties item 6, lower id).
    assert selected.row(0).tolist() == [1, 2, 5]
    assert selected.row(1).tolist() == [1, 2, 3]  # at most k items: all kept
    assert selected.row(2).tolist() == [1, 5, 2]  # n = (2, 2, 0, 1): cat 0 (gain 1), cat 1 (1), then 0.5 ties -> cat 0
    degree = np.bincount(np.concatenate(rows), minlength=9)
    for u, row in enumerate(rows):
        assert selected.row(u).tolist() == greedy_coverage(row, categories, degree, 3), u
    # A bigger random case against the textbook greedy.
    rng = np.random.default_rng(0)
    categories = np.r_[-1, rng.integers(0, 5, 40)]
    rows = [sorted(rng.choice(np.arange(1, 41), size=rng.integers(1, 25), replace=False).tolist()) for _ in range(30)]
    degree = np.bincount(np.concatenate(rows), minlength=41)
    selected = select_neighbours(CSR.from_lists(rows), categories, k=6)
    for u, row in enumerate(rows):
        assert selected.row(u).tolist() == greedy_coverage(row, categories, degree, 6), u


def test_class_balanced_weights_favour_small_categories():
    categories = np.array([-1, 0, 0, 0, 1])  # category 0: 3 items, category 1: 1 item
    w = class_balanced_weights(categories, beta=0.5)
    w0, w1 = 0.5 / (1 - 0.5**3), 0.5 / (1 - 0.5)  # (1 - b) / (1 - b^N)
    scale = 2 / (w0 + w1)  # the two category weights sum to 2
    np.testing.assert_allclose(w, [0, w0 * scale, w0 * scale, w0 * scale, w1 * scale], rtol=1e-6)
    assert w[4] > w[1]
    np.testing.assert_allclose(class_balanced_weights(categories, beta=0.0)[1:], 1.0)  # beta 0: no reweighting


def test_dgrec_reads_the_datas_categories_or_derives_them_deterministically():
    data = planted()
    derived = derived_categories(data.train, data.n_items, 2)
    assert derived[0] == -1 and np.array_equal(derived, derived_categories(data.train, data.n_items, 2))
    # The two planted item clusters (1..10, 11..20) are recovered as the two categories.
    assert len(set(derived[1:11])) == 1 and len(set(derived[11:])) == 1 and derived[1] != derived[11]
    model = DGRec(DGRecConfig(hidden=4, n_categories=2), data)
    assert model.category_source == "derived" and model.item_categories.tolist() == derived.tolist()
    given = np.r_[-1, np.arange(20) % 3]
    with_categories = SplitData(**{**data.__dict__, "item_categories": given})
    model = DGRec(DGRecConfig(hidden=4), with_categories)
    assert model.category_source == "data" and model.item_categories.tolist() == given.tolist()
    assert DGRec(DGRecConfig(hidden=4, categories="derived", n_categories=2), with_categories).category_source == "derived"


def test_dgrec_propagates_over_the_selected_graph_with_layer_attention():
    data = split(ROWS, n_items=4, )
    data.item_categories = np.array([-1, 0, 0, 1, 1])
    torch.manual_seed(0)
    model = DGRec(DGRecConfig(hidden=5, layers=2, neighbours=2), data).double()
    with torch.no_grad():
        model.att_w.normal_()
        model.att_a.normal_()
    _, a = dense_normalized(ROWS, 4)
    # User 1 (items 2, 3, 4; categories 0, 1, 1) hears 2 of them: category 1 first (n = 2), then 0.
    # Item 4 has degree 2, item 3 degree 2: the lower id (3) wins; then item 2.
    keep = torch.ones_like(a, dtype=torch.bool)
    keep[1, 4 + 4 - 1] = False  # user row 1 drops item 4
    a_sel = a * keep
    ego = torch.cat(model.ego_embeddings()).detach()
    layers = [ego, a_sel @ ego, a_sel @ (a_sel @ ego)]
    stack = torch.stack(layers)
    att = torch.softmax(stack @ model.att_w.detach() @ model.att_a.detach(), dim=0)
    expected = (att[..., None] * stack).sum(0)
    torch.testing.assert_close(torch.cat(model.final_embeddings()).detach(), expected)
    # Gradients flow through the asymmetric graph (backward = A_sel^T): compare with autograd on dense.
    ego_leaf = ego.clone().requires_grad_(True)
    s = torch.stack([ego_leaf, a_sel @ ego_leaf, a_sel @ (a_sel @ ego_leaf)])
    dense_final = (torch.softmax(s @ model.att_w.detach() @ model.att_a.detach(), 0)[..., None] * s).sum(0)
    dense_final.pow(2).sum().backward()
    torch.cat(model.final_embeddings()).pow(2).sum().backward()
    torch.testing.assert_close(model.ego.grad[model.node_rank], ego_leaf.grad)


def test_dgrec_starts_as_lightgcn_and_its_layer_attention_learns():
    data = planted()
    torch.manual_seed(0)
    dgrec = DGRec(DGRecConfig(hidden=8, layers=2, neighbours=100), data)  # every neighbour kept
    lightgcn = LightGCN(LightGCNConfig(hidden=8, layers=2), data)
    with torch.no_grad():
        lightgcn.ego.copy_(dgrec.ego)
        torch.testing.assert_close(torch.cat(dgrec.final_embeddings()), torch.cat(lightgcn.final_embeddings()))
    start = dgrec.extra_metrics()
    assert start == pytest.approx({f"layer_attention_{i}": 1 / 3 for i in range(3)})
    train_steps(dgrec, data, 50)
    assert dgrec.extra_metrics() != pytest.approx(start, abs=1e-3)  # the attention module moved


def test_dgrec_loss_weighs_each_positive_by_its_category():
    data = planted()
    data.item_categories = np.r_[-1, np.zeros(15, dtype=np.int64), np.ones(5, dtype=np.int64)]
    torch.manual_seed(0)
    model = DGRec(DGRecConfig(hidden=8, reg=0.0, negatives=2, beta_class=0.9), data)
    batch = first_batch(model, data)
    w = torch.from_numpy(class_balanced_weights(data.item_categories, 0.9))
    with torch.no_grad():
        users, items = model.final_embeddings()
        u, p, n = users[batch["users"]], items[batch["pos"] - 1], items[batch["neg"] - 1]
        terms = F.softplus(torch.einsum("bc,bkc->bk", u, n) - (u * p).sum(-1)[:, None])
        torch.testing.assert_close(model.loss(batch), (w[batch["pos"]][:, None] * terms).mean())
    assert w[20] > w[1]  # the 5-item category weighs more than the 15-item one


def test_dgrec_config_validation():
    assert build_config("dgrec").model.neighbours == 20 and build_config("dgrec").train.metric == "recall@20"
    for key, value in (("model.neighbours", 0), ("model.beta_class", 1.0), ("model.categories", "genre"),
                       ("model.n_categories", 0), ("model.layers", 0)):
        with pytest.raises(UserError, match=key):
            build_config("dgrec", overrides={key: value})


def test_item_categories_reach_the_split_from_the_synthetic_data_and_from_a_file(tmp_path):
    from rayrec.config import DataConfig
    from rayrec.data import load_split

    synthetic = load_split(DataConfig(cache_dir=str(tmp_path), synthetic_users=60, synthetic_items=40))
    assert synthetic.item_categories is not None and synthetic.item_categories.shape == (synthetic.n_items + 1,)
    assert synthetic.item_categories[0] == -1 and (synthetic.item_categories[1:] >= 0).all()
    cached = load_split(DataConfig(cache_dir=str(tmp_path), synthetic_users=60, synthetic_items=40))
    assert np.array_equal(cached.item_categories, synthetic.item_categories)  # through the cache
    table = tmp_path / "pairs.csv"
    table.write_text("user,item\n" + "".join(f"{u},{i}\n" for u in range(20) for i in (10, 20, 30, 40, 50)))
    (tmp_path / "cats.txt").write_text("10 rock\n20,jazz\n30\trock\n40 pop\n")  # item 50 not listed
    cfg = DataConfig(name=str(table), format="csv", cache_dir=str(tmp_path), split="ratio",
                     columns={"user": "user", "item": "item"}, item_categories=str(tmp_path / "cats.txt"))
    split_ = load_split(cfg)
    # Raw items 10..50 become ids 1..5; categories by sorted name: jazz 0, pop 1, rock 2, unknown 3.
    assert split_.item_categories.tolist() == [-1, 2, 0, 2, 1, 3]
    plain = load_split(DataConfig(name=str(table), format="csv", cache_dir=str(tmp_path), split="ratio",
                                  columns={"user": "user", "item": "item"}))
    assert plain.item_categories is None and plain.fingerprint != split_.fingerprint
    (tmp_path / "bad.txt").write_text("10 rock extra\n")
    with pytest.raises(UserError, match="expected 'item category' lines"):
        load_split(DataConfig(**{**cfg.__dict__, "item_categories": str(tmp_path / "bad.txt")}))


# --- NCF ----------------------------------------------------------------------------------

def test_ncf_scores_every_item_in_one_batched_pass_equal_to_its_pair_logits():
    data = planted()
    torch.manual_seed(0)
    model = NeuMF(NCFConfig(embedding_dim=8, hidden_layers=3, dropout=0.3), data).eval()
    users = torch.arange(data.n_users)
    with torch.no_grad():
        scores = model.score({"users": users})
        pairs = model._logits(users, torch.arange(data.n_items).expand(data.n_users, -1))
    assert scores.shape == (data.n_users, data.n_items + 1) and torch.all(scores[:, 0] == 0)
    torch.testing.assert_close(scores[:, 1:], pairs)
    assert [layer.out_features for layer in model.tower] == [4, 2]  # the halving tower 8, 4, 2


def test_ncf_scoring_in_chunks_equals_one_chunk(monkeypatch):
    import rayrec.models.ncf as ncf

    data = planted()
    model = NeuMF(NCFConfig(embedding_dim=8), data).eval()
    users = {"users": torch.arange(data.n_users)}
    with torch.no_grad():
        whole = model.score(users)
        monkeypatch.setattr(ncf, "SCORE_CHUNK_PAIRS", 3 * data.n_items)  # 3 users per chunk
        torch.testing.assert_close(model.score(users), whole)


def test_ncf_loss_is_bce_of_positives_against_sampled_negatives_and_learns():
    data = planted()
    torch.manual_seed(0)
    model = NeuMF(NCFConfig(embedding_dim=8, negatives=3, dropout=0.0), data)
    batch = first_batch(model, data)
    assert batch["neg"].shape == (8, 3)
    with torch.no_grad():
        logits = model._logits(batch["users"], torch.cat([batch["pos"][:, None], batch["neg"]], 1) - 1)
        expected = -(F.logsigmoid(logits[:, 0]).sum() + F.logsigmoid(-logits[:, 1:]).sum()) / logits.numel()
        torch.testing.assert_close(model.loss(batch), expected)
    model = NeuMF(NCFConfig(embedding_dim=16, dropout=0.1), data)
    train_steps(model, data, 300, lr=1e-2)
    assert planted_recall(model, data) > 0.9


def test_ncf_config_validation_and_defaults():
    cfg = build_config("ncf")
    assert (cfg.model.embedding_dim, cfg.model.hidden_layers, cfg.model.negatives) == (64, 3, 4)
    assert cfg.data.split == "ratio" and cfg.train.metric == "recall@20"
    for key, value in (("model.embedding_dim", 0), ("model.hidden_layers", 0), ("model.hidden_layers", 9),
                       ("model.dropout", 1.0), ("model.negatives", 0), ("model.init_std", 0.0)):
        with pytest.raises(UserError, match=key):
            build_config("ncf", overrides={key: value})


# --- resume -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["ncf", "gcnii", "layergcn", "svdgcn", "dgrec"])
def test_save_at_an_epoch_boundary_and_resume_gives_the_straight_runs_metrics(tmp_path, name):
    """The trainer's parity rule holds for these models too: LayerGCN's dropped graph is drawn
    from the epoch's seeded generator, SVD-GCN's SVD is rebuilt deterministically."""
    from rayrec.train.trainer import Trainer

    base = planted()
    train, valid = carve_validation(base.train, 0.3, seed=0)
    data = SplitData("planted", base.n_users, base.n_items, train, valid, base.test, False, "planted")
    size = {"model.embedding_dim": 8} if name == "ncf" else {"model.hidden": 8}
    cfg = build_config(name, overrides={"train.epochs": 4, "train.batch_size": 32, "train.device": "cpu", **size})
    straight = Trainer(cfg, data).fit()
    partial = Trainer(cfg, data)
    partial.fit(on_epoch=lambda tr, rec: rec["epoch"] == 2)
    partial.save(str(tmp_path / "state.pt"))
    resumed = Trainer(cfg, data)
    resumed.load(str(tmp_path / "state.pt"))
    keys = ("epoch", "train_loss", "val_recall@20", "val_ndcg@20", "val_coverage@20")
    assert [[r[k] for k in keys] for r in resumed.fit().history] == [[r[k] for k in keys] for r in straight.history]
