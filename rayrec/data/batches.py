"""Turning a SplitData into model inputs: padded sequences and (user, positive, negative) triples."""

from __future__ import annotations

from typing import Iterator

import numpy as np

from rayrec.data.types import CSR


def last_items(history: CSR, users: np.ndarray, length: int) -> np.ndarray:
    """The last `length` items of each user's row, left-padded with 0: int64 [len(users), length].

    Left padding puts the most recent item at the last position, where causal models read
    their prediction from.
    """
    users = np.asarray(users, dtype=np.int64)
    out = np.zeros((len(users), length), dtype=np.int64)
    starts = history.indptr[users]
    ends = history.indptr[users + 1]
    take = np.minimum(ends - starts, length)
    # Vectorised gather: position j of row r holds items[ends[r] - take[r] + (j - (length - take[r]))].
    col = np.arange(length)[None, :]
    offset = col - (length - take)[:, None]
    valid = offset >= 0
    src = (ends - take)[:, None] + offset
    out[valid] = history.items[src[valid]]
    return out


def trim_padding(seq: np.ndarray, keep: int = 1) -> np.ndarray:
    """Drop leading columns that are padding in every row (keeping at least `keep` columns).

    Rows are left-padded to the longest allowed length; most batches are far shorter, and
    attention cost grows with the square of the width. Models that index positions from
    the most recent item (see transformer.py) see identical inputs after trimming.
    """
    used = np.flatnonzero(seq.any(axis=0))
    start = min(int(used[0]) if len(used) else seq.shape[1], seq.shape[1] - keep)
    return seq[:, max(start, 0):]


def sequence_batches(
    train: CSR, length: int, batch_size: int, rng: np.random.Generator, min_length: int = 2
) -> Iterator[np.ndarray]:
    """Shuffled batches of users' training sequences, each the last `length` items, left-padded.

    One row per user per epoch (the SASRec/BERT4Rec convention): every position of the row
    is a training target, so a row of length L gives L - 1 next-item examples.
    """
    users = np.flatnonzero(train.lengths() >= min_length)
    users = users[rng.permutation(len(users))]
    for start in range(0, len(users), batch_size):
        yield trim_padding(last_items(train, users[start : start + batch_size], length), keep=2)


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
