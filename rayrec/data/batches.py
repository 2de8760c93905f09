"""Turning a SplitData into model inputs: right-padded sequences and (user, positive, negative) triples."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from rayrec.data.types import CSR


def recent_items(history: CSR, users: np.ndarray, length: int) -> np.ndarray:
    """The last `length` items of each user's row, oldest first, right-padded with 0.

    int64 [len(users), width] with width = min(length, longest row) (at least 1), so a
    batch is never wider than its longest row. Row r holds its n_r items in columns
    0..n_r - 1, the most recent at n_r - 1. Right padding is what lets causal attention
    run without a mask: a real position only ever looks at positions before it.
    """
    users = np.asarray(users, dtype=np.int64)
    ends = history.indptr[users + 1]
    take = np.minimum(ends - history.indptr[users], length)
    width = max(1, int(take.max())) if len(users) else 1
    out = np.zeros((len(users), width), dtype=np.int64)
    col = np.arange(width)[None, :]
    inside = col < take[:, None]
    out[inside] = history.items[((ends - take)[:, None] + col)[inside]]
    return out


def sequence_batches(
    train: CSR, length: int, batch_size: int, rng: np.random.Generator, min_length: int = 2,
    bucket_batches: int = 1,
) -> Iterator[dict[str, np.ndarray | float]]:
    """One epoch of users' training sequences: {"seq": the last `length` items, right-padded}.

    One row per user per epoch (the SASRec/BERT4Rec convention): every position of the row
    is a training target, so a row of length L gives L - 1 next-item examples.

    bucket_batches > 1: rows of similar length share a batch, so a batch computes little
    padding. Users are shuffled, cut into chunks of `bucket_batches` batches, sorted by
    length within each chunk, cut into batches, and the batches are shuffled: every row
    is still visited exactly once, in an order fixed by `rng`. Such batches hold very
    different numbers of targets, so each also carries `weight` = its real positions /
    the epoch's mean per batch: the trainer scales the batch's mean loss by it, which
    gives every position the same weight as in unbucketed batches.
    """
    users = np.flatnonzero(train.lengths() >= min_length)
    users = users[rng.permutation(len(users))]
    batches = [users[s : s + batch_size] for s in range(0, len(users), batch_size)]
    if bucket_batches > 1 and len(batches) > 1:
        lengths = np.minimum(train.lengths(), length)
        span = batch_size * bucket_batches
        batches = []
        for s in range(0, len(users), span):
            chunk = users[s : s + span]
            chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
            batches.extend(chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size))
        batches = [batches[i] for i in rng.permutation(len(batches))]
        positions = np.array([lengths[b].sum() for b in batches], dtype=np.float64)
        for b, weight in zip(batches, positions / positions.mean()):
            yield {"seq": recent_items(train, b, length), "weight": float(weight)}
        return
    for b in batches:
        yield {"seq": recent_items(train, b, length)}


def sample_negatives(
    rng: np.random.Generator, n_items: int, shape: tuple[int, ...], weights: np.ndarray | None = None
) -> np.ndarray:
    """Uniform (or weighted) random item ids in 1..n_items, vectorised.

    Negatives are not checked against the user's positives: with thousands of items the
    collision rate is a fraction of a percent, and rejection would need a per-user loop.
    """
    if weights is None:
        return rng.integers(1, n_items + 1, size=shape, dtype=np.int64)
    p = weights[1:] / weights[1:].sum()
    return rng.choice(np.arange(1, n_items + 1), size=shape, p=p)


def pair_batches(
    train: CSR, n_items: int, batch_size: int, rng: np.random.Generator, n_negatives: int = 1
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled (user, positive, negatives) batches over every training interaction, for BPR-style losses."""
    users = train.rows()
    items = train.items
    order = rng.permutation(len(items))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield {
            "users": users[idx],
            "pos": items[idx],
            "neg": sample_negatives(rng, n_items, (len(idx), n_negatives)),
        }
