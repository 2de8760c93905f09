"""Graph recommenders (LightGCN, BPR-MF) and the LightGCN-format reader (Gowalla, LastFM)."""

from __future__ import annotations

import copy
import importlib.util
import math
import os

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from rayrec.config import DataConfig, build_config
from rayrec.data.batches import ItemExclusion, pair_batches, sample_negatives
from rayrec.data.datasets import shared_data_dir
from rayrec.data.lightgcn_format import carve_validation, load_lightgcn_dir
from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError
from rayrec.models import build_model, get_model_spec
from rayrec.models.bprmf import BPRMF, BPRMFConfig
from rayrec.models.dgrec import DGRec, DGRecConfig
from rayrec.models.gcnii import GCNII, GCNIIConfig
from rayrec.models.layergcn import LayerGCN, LayerGCNConfig
from rayrec.models.lightgcn import LightGCN, LightGCNConfig, csr_tensor, normalized_adjacency, row_subset
from rayrec.models.svdgcn import SVDGCN, SVDGCNConfig

GRAPH_MODELS = [(LightGCN, LightGCNConfig), (BPRMF, BPRMFConfig)]
# Graph models whose final embeddings are computed from the weights at every step (issue 13).
PROPAGATING_MODELS = [(LightGCN, LightGCNConfig), (GCNII, GCNIIConfig), (LayerGCN, LayerGCNConfig), (SVDGCN, SVDGCNConfig),
                      (DGRec, DGRecConfig)]


def split(train_rows, n_items, test_rows=None, valid_rows=None, name="tiny") -> SplitData:
    empty = [[] for _ in train_rows]
    return SplitData(
        name=name, n_users=len(train_rows), n_items=n_items, train=CSR.from_lists(train_rows),
        valid=CSR.from_lists(valid_rows or empty), test=CSR.from_lists(test_rows or empty),
        ordered=False, fingerprint="tiny",
    )


def planted(seed: int = 0, users_per_group: int = 16, cluster: int = 10, n_train: int = 7) -> SplitData:
    """Two user groups, each interacting with every item of its own cluster (items 1..10, 11..20);
    n_train of them are training items, the rest held out as test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for group in range(2):
        items = np.arange(1, cluster + 1) + group * cluster
        for _ in range(users_per_group):
            perm = rng.permutation(items)
            train.append(sorted(perm[:n_train].tolist()))
            test.append(sorted(perm[n_train:].tolist()))
    return split(train, 2 * cluster, test_rows=test)


def tensors(batch):
    return {k: torch.as_tensor(v) for k, v in batch.items()}


def first_batch(model, data, batch_size=8, seed=0):
    return tensors(next(iter(model.train_batches(data, batch_size, np.random.default_rng(seed)))))


# --- LightGCN's graph ---------------------------------------------------------------------

def test_normalized_adjacency_matches_hand_computed_example():
    # user 0: items 1, 2 (item 2 twice: counts once); user 1: items 2, 3.
    # Nodes: u0, u1, i1, i2, i3. Degrees: u0 2, u1 2, i1 1, i2 2, i3 1.
    adj = normalized_adjacency(CSR.from_lists([[1, 2, 2], [2, 3]]), n_users=2, n_items=3).to_dense()
    r2, half = 1 / math.sqrt(2 * 1), 1 / math.sqrt(2 * 2)
    expected = torch.tensor([
        [0, 0, r2, half, 0],
        [0, 0, 0, half, r2],
        [r2, 0, 0, 0, 0],
        [half, half, 0, 0, 0],
        [0, r2, 0, 0, 0],
    ], dtype=torch.float32)
    torch.testing.assert_close(adj, expected)


def test_isolated_nodes_get_zero_rows():
    adj = normalized_adjacency(CSR.from_lists([[1], []]), n_users=2, n_items=2).to_dense()
    assert torch.isfinite(adj).all()
    assert adj[1].abs().sum() == 0 and adj[3].abs().sum() == 0  # user 1 and item 2 have no edge


@pytest.mark.parametrize("layers", [1, 3])
def test_propagation_and_its_gradient_equal_the_dense_computation(layers):
    data = split([[1, 2], [2, 3, 4], [4], [1, 3]], n_items=4)
    torch.manual_seed(0)
    model = LightGCN(LightGCNConfig(hidden=5, layers=layers), data)

    # Dense reference, degrees counted by hand from the interaction matrix.
    r = torch.zeros(4, 4)
    for u, row in enumerate([[1, 2], [2, 3, 4], [4], [1, 3]]):
        r[u, torch.tensor(row) - 1] = 1
    a = torch.zeros(8, 8)
    a[:4, 4:], a[4:, :4] = r, r.T
    d = a.sum(1).rsqrt()
    a_norm = d[:, None] * a * d[None, :]
    ego = torch.cat(model.ego_embeddings()).detach().clone().requires_grad_(True)
    layer, total = ego, ego
    for _ in range(layers):
        layer = a_norm @ layer
        total = total + layer
    dense = total / (layers + 1)

    users, items = model.final_embeddings()
    torch.testing.assert_close(torch.cat([users, items]), dense)
    weights = torch.randn(8, 5)
    (torch.cat([users, items]) * weights).sum().backward()
    (dense * weights).sum().backward()
    torch.testing.assert_close(model.ego.grad[model.node_rank], ego.grad)  # the table is in propagation order


def test_adjacency_lives_in_buffers_outside_the_state_dict():
    model = LightGCN(LightGCNConfig(hidden=4), planted())
    assert {"adj_crow", "adj_col", "adj_values"} <= set(dict(model.named_buffers()))
    assert not any(key.startswith("adj") for key in model.state_dict())  # derived from the data, not learned
    assert model.adj.layout == torch.sparse_csr
    # .to() moves it with the weights (here a dtype change stands in for a device change).
    model.to(torch.float64)
    assert model.adj.dtype == torch.float64
    assert model.final_embeddings()[0].dtype == torch.float64
    twin = copy.deepcopy(model)
    torch.testing.assert_close(twin.final_embeddings()[1], model.final_embeddings()[1])


@pytest.mark.parametrize("model_cls,config_cls", PROPAGATING_MODELS)
def test_every_training_step_propagates_again(model_cls, config_cls):
    """The stale-embedding guard (field-lessons §4), for every graph model that propagates:
    consecutive batches, with an optimiser step between them, are scored with embeddings
    propagated from the current weights, so the second step sees different embeddings."""
    data = planted()
    torch.manual_seed(0)
    model = model_cls(config_cls(hidden=8), data)
    seen = []
    batch_embeddings = model.batch_embeddings

    def recording(users, items):
        out = batch_embeddings(users, items)
        with torch.no_grad():
            fresh_users, fresh_items = model.final_embeddings()  # a full propagation of the current weights
        torch.testing.assert_close(out[0].detach(), fresh_users[users])
        torch.testing.assert_close(out[1].detach(), fresh_items[items])
        seen.append(torch.cat([fresh_users, fresh_items]))
        return out

    model.batch_embeddings = recording
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    batches = [tensors(b) for b in model.train_batches(data, 32, np.random.default_rng(0))][:2]
    for batch in batches:
        opt.zero_grad()
        model.loss(batch).backward()
        opt.step()
    assert len(seen) == 2, "loss() must propagate once per call"
    assert not torch.allclose(seen[0], seen[1]), "the second batch saw embeddings from before the step"
    del model.batch_embeddings
    assert not torch.allclose(seen[1], torch.cat(model.final_embeddings()).detach())  # the 2nd step moved them


@pytest.mark.parametrize("layers", [1, 2, 3])
@pytest.mark.parametrize("negatives", [1, 3])
def test_batch_propagation_equals_indexing_the_full_propagation(layers, negatives):
    """The training path (PropagateRows: last layer on the batch's nodes only, Horner backward)
    gives the loss and gradients of indexing final_embeddings(), duplicates in the batch included."""
    data = planted()
    torch.manual_seed(0)
    model = LightGCN(LightGCNConfig(hidden=8, layers=layers, negatives=negatives, reg=1e-2), data).double()
    batch = first_batch(model, data, batch_size=24)
    batch["users"][1] = batch["users"][0]  # a repeated user and a repeated item
    batch["neg"][0, 0] = batch["pos"][0]
    model.loss(batch).backward()
    fast = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    users, pos, neg = batch["users"], batch["pos"] - 1, batch["neg"] - 1
    user_final, item_final = model.final_embeddings()
    u = user_final[users]
    neg_score, pos_score = torch.einsum("bc,bkc->bk", u, item_final[neg]), (u * item_final[pos]).sum(-1)
    bpr = F.softplus(neg_score.float() - pos_score.float()[:, None]).mean()  # the model's loss is float32
    user_ego, item_ego = model.ego_embeddings()
    ego = user_ego[users].pow(2).sum() + item_ego[pos].pow(2).sum() + item_ego[neg].pow(2).sum() / negatives
    (bpr + 1e-2 * (0.5 * ego / len(users)).float()).backward()
    for got, want in zip(fast, (p.grad for p in model.parameters())):
        torch.testing.assert_close(got, want, rtol=1e-7, atol=1e-10)


def test_row_subset_of_the_adjacency():
    adj = normalized_adjacency(CSR.from_lists([[1, 2], [2, 3], [3]]), n_users=3, n_items=3)
    rows = torch.tensor([0, 4, 5])
    sub = row_subset(adj.crow_indices(), adj.col_indices(), adj.values(), rows)
    torch.testing.assert_close(sub.to_dense(), adj.to_dense()[rows])


def test_scoring_propagates_once_per_evaluation_phase():
    data = planted()
    torch.manual_seed(0)
    model = LightGCN(LightGCNConfig(hidden=8), data)
    calls = []
    propagate = model.final_embeddings
    model.final_embeddings = lambda: (calls.append(1), propagate())[1]
    users = {"users": torch.arange(5)}

    model.eval()
    with torch.no_grad():
        before = model.score(users)
        again = model.score({"users": torch.arange(5, 10)})
    assert len(calls) == 1 and before.shape == (5, data.n_items + 1) and again.shape == (5, data.n_items + 1)
    assert torch.all(before[:, 0] == 0)  # column 0 (padding) is a dummy

    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    opt.zero_grad()
    model.loss(first_batch(model, data)).backward()
    opt.step()
    model.eval()
    with torch.no_grad():
        after = model.score(users)
    assert len(calls) == 2  # one more for the new evaluation phase (loss() propagates only its batch)
    assert not torch.allclose(before, after), "evaluation reused embeddings from before training"


def test_loading_weights_in_eval_mode_drops_the_cache():
    data = planted()
    model = LightGCN(LightGCNConfig(hidden=8), data).eval()
    other = LightGCN(LightGCNConfig(hidden=8), data).eval()
    users = {"users": torch.arange(4)}
    with torch.no_grad():
        model.score(users)
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(model.score(users), other.score(users))


# --- negative sampling -------------------------------------------------------------------

def test_negatives_exclude_each_users_positives():
    # Dense rows make collisions common: user 0 has 7 of 8 items, user 2 has every item.
    train = CSR.from_lists([[1, 2, 3, 4, 5, 6, 7], [2, 2, 4], list(range(1, 9)), []])
    exclude = ItemExclusion(train, n_items=8)
    users = np.repeat(np.arange(4), 500)
    neg = sample_negatives(np.random.default_rng(0), 8, (len(users), 3), users=users, exclude=exclude)
    assert neg.shape == (2000, 3) and neg.dtype == np.int64 and neg.min() >= 1 and neg.max() <= 8
    assert np.all(neg[users == 0] == 8)  # the one item user 0 has not seen
    assert not np.isin(neg[users == 1], [2, 4]).any()
    # Uniform over the allowed items (6 for user 1, 8 for user 3): each about 1/6 and 1/8 of 1500 draws.
    np.testing.assert_allclose(np.bincount(neg[users == 1].ravel(), minlength=9)[[1, 3, 5, 6, 7, 8]] / 1500, 1 / 6, atol=0.04)
    np.testing.assert_allclose(np.bincount(neg[users == 3].ravel(), minlength=9)[1:] / 1500, 1 / 8, atol=0.04)
    # User 2 has nothing left to draw: the plain draw is kept instead of looping forever.
    assert neg[users == 2].min() >= 1


def test_negative_sampling_is_reproducible_by_seed():
    train = CSR.from_lists([[1, 2, 3], [3, 4], [1, 5, 6, 7]])
    exclude = ItemExclusion(train, n_items=8)
    users = np.array([0, 1, 2, 0, 2])
    draw = lambda seed: sample_negatives(np.random.default_rng(seed), 8, (5, 4), users=users, exclude=exclude)  # noqa: E731
    np.testing.assert_array_equal(draw(3), draw(3))
    assert not np.array_equal(draw(3), draw(4))
    assert not exclude.contains(np.repeat(users, 4), draw(3).ravel()).any()


def test_weighted_negatives_exclude_positives_and_fail_clearly_when_impossible():
    train = CSR.from_lists([[1, 2], [3]])
    weights = np.array([0.0, 1.0, 1.0, 0.0, 2.0])  # column 0 is padding; item 3 never drawn
    exclude = ItemExclusion(train, n_items=4)
    neg = sample_negatives(np.random.default_rng(0), 4, (2, 50), weights=weights, users=np.array([0, 1]), exclude=exclude)
    assert set(neg[0]) == {4} and set(neg[1]) <= {1, 2, 4}
    with pytest.raises(ValueError, match="no allowed item"):
        sample_negatives(np.random.default_rng(0), 4, (1, 5), weights=np.array([0.0, 1.0, 1.0, 0.0, 0.0]),
                         users=np.array([0]), exclude=exclude, max_rounds=50)


def test_pair_batches_visit_every_edge_once_with_allowed_negatives():
    data = planted()
    batches = list(pair_batches(data.train, data.n_items, 10, np.random.default_rng(0), n_negatives=2))
    users = np.concatenate([b["users"] for b in batches])
    pos = np.concatenate([b["pos"] for b in batches])
    neg = np.concatenate([b["neg"] for b in batches])
    edges = sorted(zip(data.train.rows().tolist(), data.train.items.tolist()))
    assert sorted(zip(users.tolist(), pos.tolist())) == edges
    assert not ItemExclusion(data.train, data.n_items).contains(np.repeat(users, 2), neg.ravel()).any()
    again = list(pair_batches(data.train, data.n_items, 10, np.random.default_rng(0), n_negatives=2))
    assert all(np.array_equal(a["neg"], b["neg"]) for a, b in zip(batches, again))



def test_user_uniform_sampling_weighs_users_equally():
    """sampling="users" (the LightGCN reference's sampler): users drawn uniformly, whatever
    their degree; each pair is one of the user's own items; as many pairs as interactions."""
    from rayrec.data.types import CSR

    heavy, light = list(range(1, 19)), [19]  # user 0 has 18 items, user 1 has one, user 2 none
    train = CSR.from_lists([heavy, light, []])
    batches = list(pair_batches(train, 20, 64, np.random.default_rng(0), sampling="users"))
    users = np.concatenate([b["users"] for b in batches])
    pos = np.concatenate([b["pos"] for b in batches])
    assert len(users) == train.nnz == 19
    assert set(pos[users == 1].tolist()) <= {19} and set(pos[users == 0].tolist()) <= set(heavy)
    many = [b["users"] for seed in range(10) for b in pair_batches(train, 20, 64, np.random.default_rng(seed), sampling="users")]
    drawn = np.concatenate(many)
    share = (drawn == 1).mean()  # by edges it would be 1/19; by users 1/2
    assert 0.35 < share < 0.65 and not (drawn == 2).any()
    edges = list(pair_batches(train, 20, 64, np.random.default_rng(0)))
    assert (np.concatenate([b["users"] for b in edges]) == 1).sum() == 1  # "edges": each interaction once


# --- both models -----------------------------------------------------------------------

@pytest.mark.parametrize("model_cls,config_cls", GRAPH_MODELS)
def test_loss_is_finite_and_one_step_changes_the_parameters(model_cls, config_cls):
    data = planted()
    torch.manual_seed(0)
    model = model_cls(config_cls(hidden=8, negatives=3), data)
    batch = first_batch(model, data)
    assert batch["neg"].shape == (8, 3) and batch["neg"].min() >= 1 and batch["neg"].max() <= data.n_items
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    loss = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    # Untrained embeddings of std 0.1 give scores near 0, so BPR starts near log 2.
    assert abs(loss.item() - math.log(2)) < 0.05
    loss.backward()
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


@pytest.mark.parametrize("model_cls,config_cls", GRAPH_MODELS)
def test_l2_term_is_lightgcn_scaled_on_the_ego_embeddings(model_cls, config_cls):
    data = planted()
    model = model_cls(config_cls(hidden=8, reg=0.0), data)
    batch = first_batch(model, data)
    reg = 1e-2
    with torch.no_grad():
        plain = model.loss(batch)  # the batch carries its negatives, so the loss is deterministic
        model.cfg.reg = reg
        delta = model.loss(batch) - plain
        user_ego, item_ego = model.ego_embeddings()
        u = user_ego[batch["users"]]
        p = item_ego[batch["pos"] - 1]
        n = item_ego[batch["neg"] - 1]
        expected = reg * 0.5 * (u.pow(2).sum() + p.pow(2).sum() + n.pow(2).sum()) / len(batch["users"])
    torch.testing.assert_close(delta, expected)


@pytest.mark.parametrize("model_cls,config_cls", GRAPH_MODELS)
def test_learns_planted_clusters(model_cls, config_cls):
    data = planted()
    torch.manual_seed(0)
    model = model_cls(config_cls(hidden=16), data)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2, weight_decay=0.0)
    rng = np.random.default_rng(0)
    steps = 0
    while steps < 200:
        for batch in model.train_batches(data, 64, rng):
            opt.zero_grad()
            model.loss(tensors(batch)).backward()
            opt.step()
            steps += 1
    model.eval()
    with torch.no_grad():
        scores = model.score({"users": torch.arange(data.n_users)})
    scores[:, 0] = -math.inf
    for u in range(data.n_users):
        scores[u, torch.as_tensor(data.train.row(u))] = -math.inf
    top5 = scores.topk(5, dim=1).indices.numpy()
    recall = np.mean([np.isin(data.test.row(u), top5[u]).mean() for u in range(data.n_users)])
    # Perfect cluster ranking puts the 3 held-out items in the top 5 (recall 1); chance is about 0.38.
    assert recall > 0.9, recall


@pytest.mark.parametrize("name", ["lightgcn", "bprmf"])
def test_registry_and_training_defaults(name):
    spec = get_model_spec(name)
    assert spec.kind == "graph" and spec.model_cls.kind == "graph"
    cfg = build_config(name)
    assert (cfg.train.lr, cfg.train.weight_decay, cfg.train.grad_clip) == (1e-3, 0.0, 1.0)
    assert (cfg.train.batch_size, cfg.train.patience, cfg.train.metric) == (2048, 50, "recall@20")
    assert cfg.train.epochs == 1000 and cfg.train.schedule == "constant"
    assert (cfg.model.hidden, cfg.model.reg, cfg.model.negatives, cfg.model.init_std) == (64, 1e-4, 1, 0.1)
    # Graph models accept data without time order.
    assert isinstance(build_model(name, cfg.model, planted()), spec.model_cls)


@pytest.mark.parametrize("key,value", [
    ("model.hidden", 0), ("model.reg", -1.0), ("model.negatives", 0), ("model.init_std", 0.0),
    ("model.sampling", "items"),
])
@pytest.mark.parametrize("name", ["lightgcn", "bprmf"])
def test_config_validation(name, key, value):
    with pytest.raises(UserError, match=key):
        build_config(name, overrides={key: value})


def test_lightgcn_needs_a_layer():
    assert build_config("lightgcn").model.layers == 3
    with pytest.raises(UserError, match="model.layers"):
        build_config("lightgcn", overrides={"model.layers": 0})


@pytest.mark.skipif(importlib.util.find_spec("rayrec.train.trainer") is None, reason="the shared trainer is not there yet")
def test_trains_through_the_shared_trainer():
    from rayrec.train.trainer import Trainer

    base = planted()
    train, valid = carve_validation(base.train, 0.3, seed=0)
    data = SplitData("planted", base.n_users, base.n_items, train, valid, base.test, False, "planted")
    cfg = build_config("lightgcn", overrides={
        "train.epochs": 2, "train.batch_size": 64, "train.device": "cpu", "train.lr": 1e-2, "model.hidden": 16,
    })
    result = Trainer(cfg, data).fit()
    assert result.epochs_run == 2 and len(result.history) == 2
    assert all(math.isfinite(r["train_loss"]) for r in result.history)
    assert 0.0 <= result.history[-1]["val_recall@20"] <= 1.0


# --- the LightGCN-format reader -----------------------------------------------------------

TRAIN_LINES = "0 0 1 2 3 4\n1 2 3 4 5 6 7\n2 0 7\n"  # 3 users, items 0..7 (0-based)
TEST_LINES = "0 5 6\n1 0\n2 1\n"


def write_lines(folder):
    (folder / "train.txt").write_text(TRAIN_LINES)
    (folder / "test.txt").write_text(TEST_LINES)


def write_adjacency(folder):
    import scipy.sparse as sp

    users, items = [], []
    for line in TRAIN_LINES.splitlines():
        u, *its = map(int, line.split())
        users += [u] * len(its)
        items += its
    n_users, n_items = 3, 8
    r = sp.coo_matrix((np.ones(len(users)), (users, items)), shape=(n_users, n_items))
    adj = sp.bmat([[None, r], [r.T, None]]).tocsr()
    sp.save_npz(folder / "s_adj_mat.npz", adj)
    (folder / "test.txt").write_text(TEST_LINES)


def write_pairs(folder):
    # 1-based ids, as LightGCN-PyTorch ships LastFM, and a weight in scientific notation.
    rows = [(u + 1, i + 1) for line in TRAIN_LINES.splitlines() for u, *its in [map(int, line.split())] for i in its]
    (folder / "data1.txt").write_text("".join(f"{u}\t{i}\t{3.2466e5 if k == 0 else 7}\n" for k, (u, i) in enumerate(rows)))
    tests = [(u + 1, i + 1) for line in TEST_LINES.splitlines() for u, *its in [map(int, line.split())] for i in its]
    (folder / "test1.txt").write_text("".join(f"{u}\t{i}\t1\n" for u, i in tests))


@pytest.mark.parametrize("writer", [write_lines, write_adjacency, write_pairs])
def test_reads_every_layout_into_the_same_split(tmp_path, writer):
    writer(tmp_path)
    data = load_lightgcn_dir(str(tmp_path), "tiny", valid_ratio=0.0)
    assert (data.n_users, data.n_items, data.ordered) == (3, 8, False)
    assert [data.train.row(u).tolist() for u in range(3)] == [[1, 2, 3, 4, 5], [3, 4, 5, 6, 7, 8], [1, 8]]
    assert [data.test.row(u).tolist() for u in range(3)] == [[6, 7], [1], [2]]
    assert data.valid.nnz == 0 and data.valid.n_rows == 3
    assert data.info["train_edges"] == 13


def test_validation_carve_is_seeded_disjoint_and_keeps_a_training_item(tmp_path):
    write_lines(tmp_path)
    full = load_lightgcn_dir(str(tmp_path), "tiny", valid_ratio=0.0)
    a = load_lightgcn_dir(str(tmp_path), "tiny", valid_ratio=0.4, seed=1)
    b = load_lightgcn_dir(str(tmp_path), "tiny", valid_ratio=0.4, seed=1)
    assert a.fingerprint == b.fingerprint != full.fingerprint
    assert np.array_equal(a.valid.items, b.valid.items)
    # round(0.4 * n), at most n - 1: 5 -> 2, 6 -> 2, 2 -> 1.
    assert a.valid.lengths().tolist() == [2, 2, 1]
    for u in range(3):
        t, v = set(a.train.row(u).tolist()), set(a.valid.row(u).tolist())
        assert not t & v and t | v == set(full.train.row(u).tolist()) and t
    seeds = {tuple(load_lightgcn_dir(str(tmp_path), "tiny", valid_ratio=0.4, seed=s).valid.items) for s in range(6)}
    assert len(seeds) > 1


def test_carve_keeps_rows_of_one_item_in_train():
    train, valid = carve_validation(CSR.from_lists([[3], [1, 2], []]), 0.9, seed=0)
    assert train.lengths().tolist() == [1, 1, 0] and valid.lengths().tolist() == [0, 1, 0]


def test_fingerprint_follows_the_file_content(tmp_path):
    write_lines(tmp_path)
    before = load_lightgcn_dir(str(tmp_path), "tiny").fingerprint
    (tmp_path / "test.txt").write_text(TEST_LINES.replace("2 1", "2 3"))
    assert load_lightgcn_dir(str(tmp_path), "tiny").fingerprint != before


def test_missing_files_are_a_user_error_naming_the_layout(tmp_path):
    (tmp_path / "s_adj_mat.npz").write_bytes(b"")
    with pytest.raises(UserError, match=r"s_adj_mat.npz without test.txt.*expected one of.*train.txt \+ test.txt"):
        load_lightgcn_dir(str(tmp_path), "x")
    with pytest.raises(UserError, match="dataset folder not found"):
        load_lightgcn_dir(str(tmp_path / "nowhere"), "x")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="found nothing.*data1.txt \\+ test1.txt"):
        load_lightgcn_dir(str(empty), "x")


def test_bad_rows_and_out_of_graph_test_ids_are_user_errors(tmp_path):
    (tmp_path / "train.txt").write_text("0 1 x\n")
    (tmp_path / "test.txt").write_text("0 1\n")
    with pytest.raises(UserError, match="train.txt line 1"):
        load_lightgcn_dir(str(tmp_path), "x")
    write_adjacency(tmp_path)
    (tmp_path / "train.txt").unlink()
    (tmp_path / "test.txt").write_text("0 8\n")  # the graph has items 0..7
    with pytest.raises(UserError, match="outside the training graph"):
        load_lightgcn_dir(str(tmp_path), "x")


def shared(name):
    folder = os.path.join(shared_data_dir(), name)
    if not os.path.isdir(folder):
        pytest.skip(f"{folder} is absent (real data is not part of the repository; set RAYREC_SHARED_DATA)")
    return folder


def test_real_gowalla():
    from rayrec.data import load_split

    shared("gowalla")
    data = load_split(DataConfig(name="gowalla", split="ratio", seed=0, valid_ratio=0.1))
    assert (data.n_users, data.n_items) == (29_858, 40_981)
    assert data.train.nnz + data.valid.nnz == 810_128
    assert data.test.nnz == 217_242
    assert 0.09 < data.valid.nnz / 810_128 < 0.11 and data.train.lengths().min() >= 1
    assert data.train.items.min() >= 1 and max(data.train.items.max(), data.test.items.max()) == 40_981


def test_real_lastfm():
    from rayrec.data import load_split

    shared("lastfm")
    data = load_split(DataConfig(name="lastfm", split="ratio", seed=0, valid_ratio=0.0))
    assert (data.n_users, data.n_items) == (1_880, 4_489)
    assert data.train.nnz == 42_135 and data.test.nnz == 10_533
    assert not data.ordered and data.valid.nnz == 0


def test_propagation_order_permutes_the_adjacency():
    """The model propagates over P A P^T in a locality order; its entries are A's, moved."""
    from rayrec.models.lightgcn import _normalized_adjacency_parts, locality_order, permuted

    train = CSR.from_lists([[1, 2, 2], [3], [1, 4], []])
    crow, col, values = _normalized_adjacency_parts(train, n_users=4, n_items=4)
    order = locality_order(crow, col)
    assert sorted(order.tolist()) == list(range(8))
    dense = csr_tensor(crow, col, values).to_dense()
    new = csr_tensor(*permuted(crow, col, values, order))
    torch.testing.assert_close(new.to_dense(), dense[order][:, order])
    for r in range(8):  # columns ascending within each row, as CSR kernels expect
        cols = new.col_indices()[new.crow_indices()[r] : new.crow_indices()[r + 1]]
        assert torch.equal(cols, cols.sort().values)


def test_transposed_row_subset():
    from rayrec.models.lightgcn import transposed

    adj = normalized_adjacency(CSR.from_lists([[1, 2], [2, 3], [3]]), n_users=3, n_items=3)
    rows = torch.tensor([4, 0, 5])
    sub = row_subset(adj.crow_indices(), adj.col_indices(), adj.values(), rows)
    t = transposed(sub.crow_indices(), sub.col_indices(), sub.values(), n_cols=6)
    assert t.shape == (6, 3)
    torch.testing.assert_close(t.to_dense(), adj.to_dense()[rows].T)


def test_lightgcn_table_starts_as_bprmf_tables():
    """LightGCN keeps one table in propagation order; with the same seed it starts from
    exactly BPR-MF's two tables, and ego_embeddings() gives them back in id order."""
    data = planted()
    torch.manual_seed(3)
    mf = BPRMF(BPRMFConfig(hidden=6), data)
    torch.manual_seed(3)
    gcn = LightGCN(LightGCNConfig(hidden=6), data)
    for a, b in zip(mf.ego_embeddings(), gcn.ego_embeddings()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert [name for name, _ in gcn.named_parameters()] == ["ego"]
