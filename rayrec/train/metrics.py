"""Ranking metrics as pure functions on torch tensors (any device), one value per user.

Definitions, for a user with a set R of relevant (target) items, |R| = T >= 1, and a
recommended list whose position r = 1..K holds item i_r; hit_r = 1 if i_r is in R:

    hr@K        = 1 if any hit_r (r <= K) else 0
    recall@K    = sum_{r<=K} hit_r / T                 (= hr@K when T = 1)
    precision@K = sum_{r<=K} hit_r / K
    ndcg@K      = DCG@K / IDCG@K, binary relevance:
                  DCG@K  = sum_{r<=K} hit_r / log2(r + 1)
                  IDCG@K = sum_{r<=min(T, K)} 1 / log2(r + 1)   (LightGCN's definition)
    mrr@K       = 1 / (rank of the first hit) if it is <= K, else 0
    coverage@K  = |union of every evaluated user's top-K| / n_items   (catalogue coverage)
    avg_rank    = mean 1-based full-ranking rank of each user's best-ranked target

Ranks computed from scores (avg_rank and the sampled metrics) count ties pessimistically:
an item scored equal to the target ranks above it, so a constant model scores worst, not
best, and ties can never inflate a figure.

Sampled metrics (the SASRec paper's protocol) rank one target among N sampled unseen
items; their keys always carry the prefix `sampled_` so they are never mixed with the
full-ranking figures, which are far lower (anchors.md).

Rating prediction (models whose task is 'rating'), over the N held-out ratings r of the
evaluated users and the model's predictions p of them:

    rmse = sqrt(sum (p - r)^2 / N)        mae = sum |p - r| / N

errors over ratings, not means of per-user errors, as the published figures are.

Every function returns per-user tensors; the evaluator sums them over batches and
divides once, so a user counts the same whatever batch it falls in.
"""

from __future__ import annotations

import torch

FULL_RANKING = ("hr", "recall", "precision", "ndcg", "mrr")
SAMPLED = ("hr", "ndcg", "mrr")


def _discounts(k: int, device: torch.device) -> torch.Tensor:
    """1 / log2(r + 1) for ranks r = 1..k: float32 [k]."""
    return 1.0 / torch.log2(torch.arange(2, k + 2, device=device, dtype=torch.float32))


def ranking_metrics(hits: torch.Tensor, n_targets: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """hr, recall, precision, ndcg and mrr at each K from a hit matrix, per user.

    hits: bool [B, Kmax], hits[b, r] = the item user b got at rank r + 1 is a target
    (Kmax may be below max(ks) when the catalogue is smaller; missing ranks count as misses).
    n_targets: int [B], distinct targets per user; users with 0 targets get 0 everywhere.
    Returns {'hr@K': float [B], ...} for every metric and K.
    """
    device = hits.device
    kmax = max(ks)
    width = hits.shape[1]
    h = hits.float()  # [B, width]
    disc = _discounts(kmax, device)  # [kmax]
    idcg_table = torch.cumsum(disc, 0)  # idcg_table[m - 1] = IDCG with m relevant items
    n_targets = n_targets.to(device)
    has_target = n_targets > 0
    n_safe = n_targets.clamp(min=1).float()
    rank = torch.arange(1, width + 1, device=device, dtype=torch.float32)
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        hk = h[:, :k]  # [B, min(k, width)]
        n_hits = hk.sum(1)
        dcg = (hk * disc[: hk.shape[1]]).sum(1)
        idcg = idcg_table[(n_targets.clamp(min=1, max=k) - 1)]
        out[f"hr@{k}"] = (n_hits > 0).float()
        out[f"recall@{k}"] = torch.where(has_target, n_hits / n_safe, torch.zeros_like(n_hits))
        out[f"precision@{k}"] = n_hits / k
        out[f"ndcg@{k}"] = torch.where(has_target, dcg / idcg, torch.zeros_like(dcg))
        # Reciprocal ranks fall with rank, so the largest among hits is the first hit's.
        out[f"mrr@{k}"] = (hk / rank[: hk.shape[1]]).amax(1) if hk.shape[1] else torch.zeros_like(n_hits)
    return out


def full_ranking_metrics(topk: torch.Tensor, targets: torch.Tensor, ks: list[int]) -> dict[str, torch.Tensor]:
    """Per-user full-ranking metrics from recommended ids and padded targets.

    topk: int64 [B, Kmax] item ids, best first, 0 = no item (never a hit). targets: int64
    [B, T], 0 = padding (one column for leave-one-out, many for graph splits); a repeated
    target counts once.
    """
    ordered, real = distinct_targets(targets)
    return ranking_metrics(target_hits(topk, ordered), real.sum(1), ks)


def distinct_targets(targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded target ids sorted per row, and which entries are real and distinct.

    targets: int64 [B, T], 0 = padding. Returns (sorted int64 [B, T], bool [B, T]): the
    second is False for padding and for repeats of the id before, so its row sums are the
    users' numbers of distinct targets.
    """
    ordered = targets.sort(dim=1).values
    first = ordered != 0
    first[:, 1:] &= ordered[:, 1:] != ordered[:, :-1]
    return ordered, first


def target_hits(topk: torch.Tensor, ordered_targets: torch.Tensor) -> torch.Tensor:
    """hits[b, r] = item topk[b, r] is one of user b's targets: bool [B, K].

    topk: int64 [B, K], 0 = no item; ordered_targets: the first output of
    `distinct_targets` [B, T]. A binary search per pick instead of a dense [B, n_cols]
    relevance matrix.
    """
    at = torch.searchsorted(ordered_targets, topk).clamp(max=ordered_targets.shape[1] - 1)  # [B, K]
    return (ordered_targets.gather(1, at) == topk) & (topk != 0)


def first_target_rank_(scores: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """1-based rank of each user's best-scored target among all columns: float [B].

    scores: float [B, n_cols] after masking (masked columns = -inf, no NaN); targets: int64
    [B, T] padded with 0 (column 0 is never a target). Ties with non-target items count
    against the target (pessimistic): rank = 1 + #columns scored >= best - #distinct targets
    scored >= best.

    Consumes `scores` (trailing underscore): the count runs in place, overwriting scores
    with 1.0 / 0.0, because summing a bool [B, n_cols] converts it to int64 first, which
    costs about ten times the comparison. Float sums of 0/1 are exact below 2**24 columns.
    """
    ordered, real = distinct_targets(targets)
    target_scores = scores.gather(1, ordered)  # [B, T]
    best = target_scores.masked_fill(~real, float("-inf")).amax(1, keepdim=True)  # [B, 1]
    targets_at_least = ((target_scores >= best) & real).sum(1)  # [B]
    at_least = torch.ge(scores, best, out=scores).sum(1)  # every column, targets included
    return 1.0 + at_least - targets_at_least.float()


def mark_recommended(seen: torch.Tensor, topk: torch.Tensor) -> None:
    """Record every id in topk [B, K] in the bool vector seen [n_cols], in place (for coverage)."""
    seen.index_fill_(0, topk.reshape(-1), True)


def catalogue_coverage(seen: torch.Tensor) -> float:
    """Share of real items (ids 1..n) that were recommended at least once; seen: bool [n + 1]."""
    n_items = seen.shape[0] - 1
    return float(seen[1:].sum()) / n_items if n_items > 0 else 0.0


def sampled_metrics(
    target_scores: torch.Tensor,
    negative_scores: torch.Tensor,
    ks: list[int],
    valid: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """hr, ndcg and mrr of one target ranked among N sampled negatives, per user.

    target_scores: float [B]; negative_scores: float [B, N]; valid: bool [B, N], False for
    slots that hold no real negative (a user who has seen almost every item). Rank =
    1 + number of valid negatives scored >= the target (ties pessimistic). With one
    target, ndcg@K = 1 / log2(rank + 1) if rank <= K. Keys are prefixed 'sampled_'.
    """
    ahead = negative_scores >= target_scores[:, None]  # [B, N]
    if valid is not None:
        ahead = ahead & valid
    rank = 1.0 + ahead.sum(1).float()  # [B]
    out: dict[str, torch.Tensor] = {}
    for k in ks:
        inside = (rank <= k).float()
        out[f"sampled_hr@{k}"] = inside
        out[f"sampled_ndcg@{k}"] = inside / torch.log2(rank + 1.0)
        out[f"sampled_mrr@{k}"] = inside / rank
    return out



def rating_errors(predicted: torch.Tensor, truth: torch.Tensor, real: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-user sums for RMSE and MAE: squared error 'se', absolute error 'ae' and 'n' ratings.

    predicted, truth: float [B, T]; real: bool [B, T], False for padding. The evaluator sums
    each over users and finishes rmse = sqrt(se / n), mae = ae / n.
    """
    error = (predicted.double() - truth.double()) * real  # padding contributes 0
    return {"se": (error * error).sum(1), "ae": error.abs().sum(1), "n": real.sum(1).double()}
