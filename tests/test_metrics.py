"""Metrics against hand-worked examples; every expected value is written out as a fraction."""

from math import log2

import pytest
import torch

from rayrec.train import metrics as M


def approx(values):
    return pytest.approx(values, abs=1e-6)


def test_one_target_per_user():
    # ranked lists, best first; one target each
    topk = torch.tensor([[3, 1, 2], [4, 5, 6], [2, 5, 1]])
    targets = torch.tensor([[1], [2], [2]])  # user 0 hits at rank 2, user 1 misses, user 2 at rank 1
    m = M.full_ranking_metrics(topk, targets, ks=[1, 3])
    assert m["hr@1"].tolist() == [0, 0, 1]
    assert m["hr@3"].tolist() == [1, 0, 1]
    assert m["recall@3"].tolist() == m["hr@3"].tolist()  # one target: recall = HR
    assert m["precision@1"].tolist() == approx([0, 0, 1])
    assert m["precision@3"].tolist() == approx([1 / 3, 0, 1 / 3])
    assert m["ndcg@1"].tolist() == approx([0, 0, 1])
    assert m["ndcg@3"].tolist() == approx([1 / log2(3), 0, 1])
    assert m["mrr@1"].tolist() == approx([0, 0, 1])
    assert m["mrr@3"].tolist() == approx([1 / 2, 0, 1])


def test_several_targets_idcg_uses_min_of_targets_and_k():
    topk = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5]])
    # user 0: targets {2, 4, 6} (padded), hits at ranks 2 and 4; user 1: target {5} at rank 4
    targets = torch.tensor([[2, 4, 6], [5, 0, 0]])
    m = M.full_ranking_metrics(topk, targets, ks=[2, 4])
    assert m["hr@2"].tolist() == [1, 0]
    assert m["recall@2"].tolist() == approx([1 / 3, 0])
    assert m["recall@4"].tolist() == approx([2 / 3, 1])
    assert m["precision@2"].tolist() == approx([1 / 2, 0])
    assert m["precision@4"].tolist() == approx([2 / 4, 1 / 4])
    # K=2: IDCG over min(3, 2) = 2 relevant positions
    assert m["ndcg@2"][0].item() == approx((1 / log2(3)) / (1 + 1 / log2(3)))
    # K=4: IDCG over min(3, 4) = 3 positions; user 1 has one target so IDCG = 1
    assert m["ndcg@4"].tolist() == approx(
        [(1 / log2(3) + 1 / log2(5)) / (1 + 1 / log2(3) + 1 / log2(4)), 1 / log2(5)]
    )
    assert m["mrr@4"].tolist() == approx([1 / 2, 1 / 4])


def test_duplicate_targets_and_users_without_targets():
    topk = torch.tensor([[1, 2], [1, 2]])
    targets = torch.tensor([[2, 2], [0, 0]])  # a duplicated target counts once; user 1 has none
    m = M.full_ranking_metrics(topk, targets, ks=[2])
    assert m["recall@2"].tolist() == approx([1, 0])
    assert m["ndcg@2"].tolist() == approx([1 / log2(3), 0])
    assert m["hr@2"].tolist() == [1, 0]


def test_k_beyond_list_length_counts_missing_ranks_as_misses():
    hits = torch.tensor([[False, True]])  # a catalogue of 2 items, asked for K=5
    m = M.ranking_metrics(hits, torch.tensor([1]), ks=[5])
    assert m["precision@5"].tolist() == approx([1 / 5])
    assert m["ndcg@5"].tolist() == approx([1 / log2(3)])


def test_coverage_accumulates_over_batches():
    n_items = 5
    seen = {k: torch.zeros(n_items + 1, dtype=torch.bool) for k in (1, 2)}
    for batch in (torch.tensor([[1, 2]]), torch.tensor([[2, 3]])):
        for k in seen:
            M.mark_recommended(seen[k], batch[:, :k])
    assert M.catalogue_coverage(seen[1]) == approx(2 / 5)  # {1, 2}
    assert M.catalogue_coverage(seen[2]) == approx(3 / 5)  # {1, 2, 3}


def test_first_target_rank_is_pessimistic_on_ties():
    scores = torch.tensor([[float("-inf"), 0.5, 0.3, 0.5]] * 4)
    targets = torch.tensor(
        [
            [2, 0],  # 0.3: two items above -> rank 3
            [1, 0],  # 0.5, tied with column 3 -> rank 2
            [3, 2],  # best target 0.5, tied with column 1 -> rank 2
            [3, 3],  # a repeated target counts once: tied with column 1 -> rank 2
        ]
    )
    assert M.first_target_rank_(scores, targets).tolist() == [3, 2, 2, 2]


def test_first_target_rank_of_a_masked_target_is_last():
    # The only target is masked (-inf): every other column, padding included, ties it.
    scores = torch.tensor([[float("-inf"), 0.5, float("-inf"), 0.1]])
    assert M.first_target_rank_(scores, torch.tensor([[2]])).tolist() == [4]


def test_target_hits_search_the_sorted_targets():
    ordered, real = M.distinct_targets(torch.tensor([[7, 0, 3, 3], [0, 0, 0, 0]]))
    assert ordered.tolist() == [[0, 3, 3, 7], [0, 0, 0, 0]]
    assert real.tolist() == [[False, True, False, True], [False] * 4]
    hits = M.target_hits(torch.tensor([[3, 0, 8, 7], [0, 1, 2, 3]]), ordered)
    assert hits.tolist() == [[True, False, False, True], [False] * 4]  # id 0 (no item) never hits


def test_sampled_metrics():
    target = torch.tensor([0.9, 0.5, 0.1])
    negatives = torch.tensor([[0.1, 0.2, 0.3], [0.6, 0.5, 0.1], [0.2, 0.3, 0.4]])
    # ranks: 1; 3 (0.6 above, 0.5 tied counts above); 4
    m = M.sampled_metrics(target, negatives, ks=[1, 3])
    assert set(m) == {f"sampled_{n}@{k}" for n in ("hr", "ndcg", "mrr") for k in (1, 3)}
    assert m["sampled_hr@1"].tolist() == [1, 0, 0]
    assert m["sampled_hr@3"].tolist() == [1, 1, 0]
    assert m["sampled_ndcg@3"].tolist() == approx([1, 1 / log2(4), 0])
    assert m["sampled_mrr@3"].tolist() == approx([1, 1 / 3, 0])
    # invalid slots (no real negative there) do not count: user 1 -> rank 2
    valid = torch.tensor([[True] * 3, [True, False, True], [True] * 3])
    m = M.sampled_metrics(target, negatives, ks=[3], valid=valid)
    assert m["sampled_mrr@3"].tolist() == approx([1, 1 / 2, 0])
