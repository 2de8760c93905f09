"""Turning a SplitData into model inputs: right-padded sequences, (user, positive, negative)
triples, and the binary user-item matrix with its rows as item sets (EASE, SLIM, ALS)."""

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


def item_sets(rows: CSR, users: np.ndarray) -> np.ndarray:
    """Each user's distinct items, ascending, right-padded with 0: int64 [len(users), width].

    For models that read a history as a set (EASE, SLIM, ALS): a repeated interaction counts
    once, as in `interaction_matrix`. Width = the most distinct items of any row (at least 1).
    """
    padded = recent_items(rows, users, max(1, int(rows.lengths().max(initial=0))))
    padded.sort(axis=1)  # padding (0) first, then each row's items ascending
    repeat = np.zeros(padded.shape, dtype=bool)
    repeat[:, 1:] = padded[:, 1:] == padded[:, :-1]
    padded[repeat] = 0
    # Stable descending sort on "is an item" moves each row's items left, keeping them ascending.
    order = np.argsort(padded == 0, axis=1, kind="stable")
    out = np.take_along_axis(padded, order, axis=1)
    width = max(1, int((out != 0).sum(axis=1).max(initial=0)))
    return np.ascontiguousarray(out[:, :width])


def interaction_matrix(rows: CSR, n_items: int, dtype=np.float64):
    """The binary user-item matrix of `rows` as a scipy CSR matrix (n_rows, n_items): entry
    (u, i - 1) is 1 when item i is in row u, however many times."""
    from scipy.sparse import csr_matrix

    matrix = csr_matrix((np.ones(rows.nnz, dtype=dtype), rows.items - 1, rows.indptr), shape=(rows.n_rows, n_items))
    matrix.sum_duplicates()  # sorts each row's columns and adds up repeats ...
    matrix.data[:] = 1  # ... which count once
    return matrix


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
    full = train.lengths()
    lengths = np.minimum(full, length)  # positions each row fills
    users = np.flatnonzero(full >= min_length)
    users = users[rng.permutation(len(users))]
    bucketed = bucket_batches > 1 and len(users) > batch_size
    # Bucketed: each chunk of bucket_batches batches is sorted by length before it is cut.
    span = batch_size * bucket_batches if bucketed else batch_size
    chunks = (users[s : s + span] for s in range(0, len(users), span))
    if bucketed:
        chunks = (c[np.argsort(-lengths[c], kind="stable")] for c in chunks)
    batches = [c[b : b + batch_size] for c in chunks for b in range(0, len(c), batch_size)]
    if bucketed:
        batches = [batches[i] for i in rng.permutation(len(batches))]
        positions = np.array([lengths[b].sum() for b in batches], dtype=np.float64)
        weights = positions / positions.mean()
    for i, b in enumerate(batches):
        batch: dict[str, np.ndarray | float] = {"seq": recent_items(train, b, length)}
        if bucketed:
            batch["weight"] = float(weights[i])
        yield batch


class ItemExclusion:
    """The items each user must not be given as a negative (their positives), searchable in bulk.

    keys: sorted distinct int64 user * (n_items + 1) + item, so that "is item i one of user
    u's positives" for a whole batch is one np.searchsorted instead of a loop over users.
    """

    def __init__(self, rows: CSR, n_items: int):
        self.n_items = n_items
        keys = np.sort(rows.rows() * (n_items + 1) + rows.items)  # a plain sort: np.unique hashes first, 7x slower
        self.keys = keys[np.concatenate([[True], keys[1:] != keys[:-1]])]  # sorted, duplicates dropped

    def contains(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """bool, shaped like users and items: items[j] is one of users[j]'s excluded items."""
        query = users * (self.n_items + 1) + items
        if len(self.keys) == 0:
            return np.zeros(query.shape, dtype=bool)
        at = np.minimum(np.searchsorted(self.keys, query), len(self.keys) - 1)
        return self.keys[at] == query

    def counts(self, users: np.ndarray) -> np.ndarray:
        """Distinct excluded items of each user: int64, shaped like users."""
        width = self.n_items + 1
        return np.searchsorted(self.keys, (users + 1) * width) - np.searchsorted(self.keys, users * width)


def sample_negatives(
    rng: np.random.Generator,
    n_items: int,
    shape: tuple[int, ...],
    weights: np.ndarray | None = None,
    users: np.ndarray | None = None,
    exclude: ItemExclusion | None = None,
    max_rounds: int = 10_000,
) -> np.ndarray:
    """Uniform (or weighted) random item ids in 1..n_items, vectorised: int64 `shape`.

    With `exclude` and `users` (shape[0],), a draw that is one of its row's user's excluded
    items is drawn again, and again, until none is (rejection sampling: each negative is then
    distributed as the plain draw restricted to the user's other items, as in the LightGCN
    reference). Only the collisions are redrawn, in bulk, from the same rng, so the result
    depends on the seed alone. A user with every item excluded keeps the plain draw under
    uniform sampling; under weighted sampling a user whose allowed items all weigh 0 is an
    error after `max_rounds` rounds.
    """
    p = None if weights is None else weights[1:] / weights[1:].sum()
    negatives = _draw_items(rng, n_items, shape, p)
    if exclude is None:
        return negatives
    if users is None or len(users) != shape[0]:
        raise ValueError("sample_negatives: `exclude` needs `users`, one per row of `shape`")
    flat = negatives.reshape(-1)  # a view: writes land in `negatives`
    slot_users = np.repeat(np.asarray(users, dtype=np.int64), int(np.prod(shape[1:])))  # (prod(shape),)
    todo = np.flatnonzero(exclude.contains(slot_users, flat))
    if p is None:
        todo = todo[exclude.counts(slot_users[todo]) < n_items]  # nothing left to draw for the others
    for _ in range(max_rounds):
        if len(todo) == 0:
            break
        flat[todo] = _draw_items(rng, n_items, len(todo), p)
        todo = todo[exclude.contains(slot_users[todo], flat[todo])]
    if len(todo) == 0:
        return negatives
    raise ValueError(f"{len(todo)} negatives still collide with positives after {max_rounds} redraws: "
                     "some user has no allowed item of nonzero weight")


def _draw_items(rng: np.random.Generator, n_items: int, size, p: np.ndarray | None) -> np.ndarray:
    """Item ids in 1..n_items, uniform or with probabilities p [n_items]: int64 `size`."""
    if p is None:
        return rng.integers(1, n_items + 1, size=size, dtype=np.int64)
    return rng.choice(np.arange(1, n_items + 1), size=size, p=p)


def pair_batches(
    train: CSR,
    n_items: int,
    batch_size: int,
    rng: np.random.Generator,
    n_negatives: int = 1,
    exclude_positives: bool = True,
    sampling: str = "edges",
) -> Iterator[dict[str, np.ndarray]]:
    """Shuffled (user, positive, negatives) batches for BPR-style losses, as many pairs per
    epoch as there are training interactions.

    sampling: "edges" visits every training interaction once per epoch, in a seeded random
    order (users weigh by their number of interactions); "users" is the LightGCN reference's
    sampler: each pair draws a user uniformly among those with training items, then one of
    that user's items uniformly (users weigh equally; interactions are drawn with
    replacement). exclude_positives: redraw a negative that is one of the user's training
    items (the reference does); the exclusion index is built once per call (per epoch).
    """
    if sampling == "edges":
        users = train.rows()
        items = train.items
        order = rng.permutation(len(items))
    elif sampling == "users":
        lengths = train.lengths()
        active = np.flatnonzero(lengths > 0)
        users = active[rng.integers(0, len(active), size=train.nnz)] if len(active) else np.zeros(0, dtype=np.int64)
        items = train.items[train.indptr[users] + (rng.random(len(users)) * lengths[users]).astype(np.int64)]
        order = np.arange(len(users))
    else:
        raise ValueError(f"sampling must be 'edges' or 'users', got {sampling!r}")
    exclude = ItemExclusion(train, n_items) if exclude_positives else None
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield {
            "users": users[idx],
            "pos": items[idx],
            "neg": sample_negatives(rng, n_items, (len(idx), n_negatives), users=users[idx], exclude=exclude),
        }
