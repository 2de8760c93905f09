"""Full-ranking evaluation with a fixed-score model, and the popularity baseline."""

from math import log2

import numpy as np
import pytest
import torch

from rayrec.data.types import CSR, SplitData
from rayrec.models import build_model, get_model_spec
from rayrec.models.base import RecModel
from rayrec.models.pop import PopConfig, Popularity
from rayrec.train.evaluate import (
    evaluate,
    evaluate_on_train,
    evaluation,
    history_mask_indices,
    item_hash,
    rank_users,
    split_last_item,
)

NEG = -1.0


def make_data(train, valid, test, n_items) -> SplitData:
    return SplitData(
        name="tiny",
        n_users=len(train),
        n_items=n_items,
        train=CSR.from_lists(train),
        valid=CSR.from_lists(valid),
        test=CSR.from_lists(test),
        ordered=True,
        fingerprint="0" * 16,
    )


class FixedScores(RecModel):
    """Returns a fixed [n_users, n_items + 1] table; records the mode it was called in."""

    kind = "static"

    def __init__(self, table, data):
        super().__init__(None, data)
        self.register_buffer("table", torch.as_tensor(table, dtype=torch.float32))
        self.modes = []

    def score(self, batch):
        self.modes.append(self.training)
        return self.table[batch["users"]]


@pytest.fixture
def tiny():
    # users 0..3, items 1..6
    data = make_data(
        train=[[1, 2], [3], [4, 5], [1]],
        valid=[[3], [], [6], [2]],  # user 1 has no validation target
        test=[[4], [5], [1], [3]],
        n_items=6,
    )
    # Column 0 (padding) and history items get the highest scores: masking must remove them.
    table = [
        [100, 90, 80, 5, 7, 1, 0],  # valid: masked {1,2}; ranking 4,3,5,6 -> target 3 at rank 2
        [100, 1, 2, 3, 4, 5, 6],
        [100, 3, 2, 1, 90, 80, 10],  # masked {4,5}; ranking 6,1,2,3 -> target 6 at rank 1
        [100, 90, 1, 2, 3, 4, 5],  # masked {1}; ranking 6,5,4,3,2 -> target 2 at rank 5
    ]
    return data, FixedScores(table, data)


def test_full_ranking_worked_example(tiny):
    data, model = tiny
    r = evaluate(model, data, "valid", ks=[1, 5], device="cpu")
    assert r["n_users"] == 3  # user 1 has no validation target
    assert r["hr@1"] == pytest.approx(1 / 3)
    assert r["hr@5"] == pytest.approx(1)
    assert r["recall@5"] == pytest.approx(1)
    assert r["precision@1"] == pytest.approx(1 / 3)
    assert r["precision@5"] == pytest.approx(3 / 15)
    assert r["ndcg@1"] == pytest.approx(1 / 3)
    assert r["ndcg@5"] == pytest.approx((1 / log2(3) + 1 + 1 / log2(6)) / 3)
    assert r["mrr@5"] == pytest.approx((1 / 2 + 1 + 1 / 5) / 3)
    assert r["avg_rank"] == pytest.approx((2 + 1 + 5) / 3)
    # top-1 lists: item 4, item 6, item 6 -> never column 0 (100) nor a history item (90)
    assert r["coverage@1"] == pytest.approx(2 / 6)
    assert r["coverage@5"] == pytest.approx(6 / 6)
    assert not any(k.startswith("sampled_") for k in r)


def test_per_user_rows_of_the_worked_example(tiny):
    data, model = tiny
    ranking = evaluation(model, data, "valid", ks=[1, 5], device="cpu", per_user=True)
    rows = {int(u): i for i, u in enumerate(ranking.per_user["user"])}
    assert sorted(rows) == [0, 2, 3]  # user 1 has no validation target
    expected = {0: (2, 1 / log2(3)), 2: (1, 1.0), 3: (5, 1 / log2(6))}  # rank, ndcg@5
    for user, (rank, ndcg) in expected.items():
        i = rows[user]
        assert ranking.per_user["rank"][i] == rank
        assert ranking.per_user["ndcg@5"][i] == pytest.approx(ndcg)
        assert ranking.per_user["hr@1"][i] == (rank == 1)
        assert ranking.per_user["n_targets"][i] == 1
    # Every column's mean is the aggregate; without per_user there are no rows.
    for key in ("hr@1", "ndcg@5", "mrr@5", "precision@5"):
        assert ranking.per_user[key].mean() == pytest.approx(ranking.metrics[key])
    assert ranking.per_user["rank"].mean() == pytest.approx(ranking.metrics["avg_rank"])
    # Coverage is a property of the whole evaluation (the union of top-K lists), not of a user:
    # it is in the aggregate metrics only, never a per-user column whose mean would mislead.
    assert ranking.metrics["coverage@1"] == pytest.approx(2 / 6)
    assert not [key for key in ranking.per_user if key.startswith("coverage")]
    assert evaluation(model, data, "valid", ks=[1], device="cpu").per_user is None
    empty = evaluation(model, data, "valid", ks=[1], device="cpu", users=np.array([1]), per_user=True)
    assert len(empty.per_user["user"]) == len(empty.per_user["ndcg@1"]) == 0


def test_test_split_masks_validation_items_too(tiny):
    data, _ = tiny
    # user 0 on test: history = train + valid = {1, 2, 3}; item 3 outscores the target 4
    model = FixedScores([[100, 90, 80, 70, 7, 1, 0]] * 4, data)
    r = evaluate(model, data, "test", ks=[1], device="cpu", users=np.array([0]))
    assert r["hr@1"] == 1.0


def test_catalogue_smaller_than_k_never_recommends_padding(tiny):
    data, model = tiny
    r = evaluate(model, data, "valid", ks=[10], device="cpu")
    assert r["hr@10"] == 1.0
    assert r["precision@10"] == pytest.approx(1 / 10)
    assert r["coverage@10"] <= 1.0


def test_nan_scores_rank_last(tiny):
    data, _ = tiny
    model = FixedScores(np.full((4, 7), np.nan), data)
    r = evaluate(model, data, "valid", ks=[5], device="cpu")
    assert r["hr@5"] == 0.0 and r["coverage@5"] == 0.0


def test_users_without_targets_are_skipped_and_empty_gives_nan(tiny):
    data, model = tiny
    default = evaluate(model, data, "valid", ks=[1, 5], device="cpu")
    explicit = evaluate(model, data, "valid", ks=[1, 5], device="cpu", users=np.array([0, 1, 2, 3]))
    assert explicit == default
    empty = evaluate(model, data, "valid", ks=[1], device="cpu", users=np.array([1]))
    assert empty["n_users"] == 0 and np.isnan(empty["hr@1"])


def test_runs_in_eval_mode_and_restores_mode(tiny):
    data, model = tiny
    model.train()
    evaluate(model, data, "valid", ks=[1], device="cpu")
    assert model.modes and not any(model.modes)
    assert model.training
    model.eval()
    evaluate(model, data, "valid", ks=[1], device="cpu")
    assert not model.training


@pytest.fixture
def random_case():
    rng = np.random.default_rng(0)
    n_users, n_items = 60, 30
    train = [rng.choice(np.arange(1, n_items + 1), size=rng.integers(1, 12), replace=False) for _ in range(n_users)]
    valid = [rng.choice(np.arange(1, n_items + 1), size=rng.integers(0, 3), replace=False) for _ in range(n_users)]
    test = [rng.choice(np.arange(1, n_items + 1), size=1) for _ in range(n_users)]
    data = make_data(train, valid, test, n_items)
    return data, FixedScores(rng.normal(size=(n_users, n_items + 1)), data)


def test_batch_size_does_not_change_results(random_case):
    data, model = random_case
    for split in ("valid", "test"):
        one = evaluate(model, data, split, ks=[1, 5, 10], device="cpu", batch_size=1, sampled_negatives=5)
        many = evaluate(model, data, split, ks=[1, 5, 10], device="cpu", batch_size=100, sampled_negatives=5)
        assert one.keys() == many.keys()
        for key in one:
            assert one[key] == pytest.approx(many[key], abs=1e-9), key


def test_sampled_metrics_labelled_and_deterministic_by_seed(random_case):
    data, model = random_case
    a = evaluate(model, data, "test", ks=[1, 5], device="cpu", sampled_negatives=5, seed=3)
    b = evaluate(model, data, "test", ks=[1, 5], device="cpu", sampled_negatives=5, seed=3)
    assert a == b
    sampled = {k for k in a if k.startswith("sampled_")}
    assert sampled == {f"sampled_{n}@{k}" for n in ("hr", "ndcg", "mrr") for k in (1, 5)}
    # sampled figures sit beside, never replace, the full-ranking ones
    assert {"hr@5", "ndcg@5", "mrr@5"} <= a.keys()
    assert a["sampled_hr@5"] >= a["hr@5"]
    keys_3 = item_hash(3, torch.arange(4), 50)
    assert torch.equal(keys_3, item_hash(3, torch.arange(4), 50))
    assert not torch.equal(keys_3, item_hash(4, torch.arange(4), 50))


def test_sampled_negatives_exclude_history_and_targets(tiny):
    data, model = tiny
    # user 0 (valid): history {1, 2}, target 3 -> the only allowed negatives are {4, 5, 6},
    # scored 7, 1, 0 against the target's 5 -> rank 2. Asking for more than exist
    # leaves empty slots that must not count.
    for n in (3, 10):
        r = evaluate(model, data, "valid", ks=[1, 5], device="cpu", users=np.array([0]), sampled_negatives=n)
        assert r["sampled_hr@1"] == 0.0
        assert r["sampled_mrr@5"] == pytest.approx(1 / 2)


def test_item_hash_samples_items_uniformly():
    keys = item_hash(0, torch.arange(20000), 11)[:, 1:]  # 10 items
    picked = keys.topk(3, dim=1).indices
    freq = torch.bincount(picked.reshape(-1), minlength=10).float() / 20000
    assert torch.allclose(freq, torch.full((10,), 0.3), atol=0.02)


def test_history_mask_indices_pads_with_zero():
    csr = CSR.from_lists([[5, 6, 7], [], [2]])
    idx = history_mask_indices(csr, np.array([2, 0, 1]))
    assert idx.dtype == torch.long
    assert idx.tolist() == [[2, 0, 0], [5, 6, 7], [0, 0, 0]]


def test_evaluate_on_train_ranks_last_training_item(tiny):
    data, model = tiny
    head, tail = split_last_item(data.train)
    assert [head.row(u).tolist() for u in range(4)] == [[1], [], [4], []]
    assert [tail.row(u).tolist() for u in range(4)] == [[2], [3], [5], [1]]
    # users 1 and 3 have a single training item and are skipped; user 0: history {1},
    # target 2 (80) is top once 1 is masked; user 2: history {4}, target 5 (80) likewise
    r = evaluate_on_train(model, data, np.arange(4), ks=[1], device="cpu")
    assert r["n_users"] == 2
    assert r["hr@1"] == 1.0


def test_popularity_ranks_by_training_counts():
    data = make_data(
        train=[[1, 2, 3], [2, 3], [3], []],
        valid=[[4], [1], [2], [5]],
        test=[[5], [4], [1], [3]],
        n_items=6,
    )
    assert get_model_spec("pop").model_cls is Popularity
    model = build_model("pop", PopConfig(), data)
    assert model.kind == "static" and model.fits_itself and model.closed_form
    assert list(model.parameters()) == [] and "counts" in dict(model.named_buffers())
    scores = model.score({"users": torch.tensor([0, 3])})
    assert scores.shape == (2, 7)
    # counts: item 1 once, item 2 twice, item 3 three times, items 4-6 never
    assert scores[1].tolist() == [float("-inf"), 1, 2, 3, 0, 0, 0]
    # valid (user 0 left out: its target competes with items tied at 0):
    # user 1: history {2, 3}, ranking 1, then ties -> target 1 at rank 1
    # user 2: history {3}, ranking 2, 1 -> target 2 at rank 1
    # user 3: no history, ranking 3, 2, 1 -> target 5 (count 0) outside the top 3
    r = evaluate(model, data, "valid", ks=[1, 3], device="cpu", users=np.array([1, 2, 3]))
    assert r["n_users"] == 3
    assert r["hr@1"] == pytest.approx(2 / 3)
    assert r["hr@3"] == pytest.approx(2 / 3)
    assert r["coverage@1"] == pytest.approx(3 / 6)  # items 1, 2 and 3
    # test split, user 3's history is {5}: the ranking starts 3 -> target 3 at rank 1
    r = evaluate(model, data, "test", ks=[1], device="cpu", users=np.array([3]))
    assert r["hr@1"] == 1.0


# --- the evaluator against a deliberately plain reference ---------------------------------

def reference_metrics(table, history, targets, users, ks, sampled=0, seed=0):
    """Per-user loops over a dense numpy score table, every formula written out by hand."""
    n_cols = table.shape[1]
    sums, seen = {}, {k: set() for k in ks}

    def add(key, value):
        sums[key] = sums.get(key, 0.0) + value

    for u in users:
        scores = table[u].astype(np.float64)
        masked = {0, *history[u]}
        scores[list(masked)] = -np.inf
        relevant = set(targets[u])
        ranked = [c for c in np.argsort(-scores, kind="stable") if c not in masked]  # best first
        for k in ks:
            top = ranked[:k]
            seen[k].update(top)
            hits = [c in relevant for c in top]
            add(f"hr@{k}", float(any(hits)))
            add(f"recall@{k}", sum(hits) / len(relevant))
            add(f"precision@{k}", sum(hits) / k)
            dcg = sum(1 / log2(r + 2) for r, hit in enumerate(hits) if hit)
            idcg = sum(1 / log2(r + 2) for r in range(min(len(relevant), k)))
            add(f"ndcg@{k}", dcg / idcg)
            add(f"mrr@{k}", next((1 / (r + 1) for r, hit in enumerate(hits) if hit), 0.0))
        best = max(scores[t] for t in relevant)
        add("avg_rank", 1 + sum(1 for c in range(n_cols) if c not in relevant and scores[c] >= best))
        if sampled:
            keys = item_hash(seed, torch.tensor([u]), n_cols)[0].numpy()
            allowed = [c for c in range(1, n_cols) if c not in masked and c not in relevant]
            negatives = sorted(allowed, key=lambda c: -keys[c])[:sampled]
            target_score = scores[targets[u][0]]  # the first target as stored
            rank = 1 + sum(1 for c in negatives if scores[c] >= target_score)
            for k in ks:
                inside = rank <= k
                add(f"sampled_hr@{k}", float(inside))
                add(f"sampled_ndcg@{k}", inside / log2(rank + 1))
                add(f"sampled_mrr@{k}", inside / rank)
    result = {key: value / len(users) for key, value in sums.items()}
    result.update({f"coverage@{k}": len(seen[k]) / (n_cols - 1) for k in ks})
    result["n_users"] = len(users)
    return result


def reference_case(ties: bool):
    """12 items, 9 users: several targets per user (graph splits), a user with only 2
    unmasked items (fewer than K), a user whose target is also in its history (masked)."""
    rng = np.random.default_rng(7)
    n_items = 12
    history = [[1, 2], [3], list(range(1, 11)), [4, 5, 6], [], [7, 8], [2, 9], [1], [5, 12]]
    targets = [[3, 4, 5], [1], [11], [1, 2], [6, 7, 8, 9], [8, 9], [10, 3], [1, 12], [5]]
    shape = (len(history), n_items + 1)
    # Distinct scores for the top-K metrics (their tie order is arbitrary); a few levels for
    # the tie-defined figures (avg_rank, sampled ranks).
    table = rng.integers(0, 4, size=shape) / 4 if ties else rng.permutation(np.prod(shape)).reshape(shape) / 10
    return table.astype(np.float32), CSR.from_lists(history), CSR.from_lists(targets), history, targets


@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("batch_size", [1, 4, 100])
def test_rank_users_equals_a_plain_reference(ties, batch_size):
    table, history, targets, history_rows, target_rows = reference_case(ties)
    data = make_data([[1]] * table.shape[0], [[1]] * table.shape[0], [[1]] * table.shape[0], table.shape[1] - 1)
    model = FixedScores(table, data)
    users = np.arange(table.shape[0])
    ks = [1, 3, 5, 20]  # 20 > 12 items: every user has fewer unmasked items than K
    got = rank_users(model, history, targets, 12, users, ks, "cpu", batch_size=batch_size, sampled_negatives=4, seed=5).metrics
    want = reference_metrics(table, history_rows, target_rows, users, ks, sampled=4, seed=5)
    assert set(got) == set(want)
    tie_free = {"avg_rank", "n_users"} | {k for k in want if k.startswith("sampled_")}
    for key in want if not ties else tie_free:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key


def test_evaluate_uses_the_split_history_and_targets():
    table, _, _, history_rows, target_rows = reference_case(ties=False)
    train = [row[:1] or [12] for row in history_rows]
    valid = [row[1:] for row in history_rows]
    data = make_data(train, valid, target_rows, 12)
    model = FixedScores(table, data)
    got = evaluate(model, data, "test", ks=[2, 5], device="cpu", sampled_negatives=3, seed=1)
    test_history = [sorted(set(t) | set(v)) for t, v in zip(train, valid)]
    want = reference_metrics(table, test_history, target_rows, np.arange(len(train)), [2, 5], sampled=3, seed=1)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=1e-6), key
