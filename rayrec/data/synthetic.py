"""The built-in offline dataset: deterministic interactions with planted sequential structure.

It exists so that every command works without a download and so tests can check that
a sequential model learns something popularity cannot. How a user's sequence is drawn:

    items are split into clusters laid out on a ring; popularity is long-tailed (Zipf)
    every item has SUCCESSORS likely successors: most in its own cluster, the last one in
    the next cluster, so users drift round the ring over time

    first item  ~ popularity
    next item   ~ with prob. FOLLOW: one of the previous item's successors (weights SUCCESSOR_WEIGHTS)
                  otherwise: a popular item of the previous item's cluster

Knowing only the previous item, the best guess is its first successor: right about
FOLLOW * SUCCESSOR_WEIGHTS[0] + a little, about 45% of the time after de-duplication and
k-core (tests/test_data_pipeline.py measures it), so the next item is predictable but far
from deterministic; a first-order Markov model reaches about 7x popularity's NDCG@10.
"""

from __future__ import annotations

import numpy as np

VERSION = 2  # bump when the generator's output changes, so cached splits are rebuilt
FOLLOW = 0.75  # chance the next item is one of the previous item's successors
SUCCESSOR_WEIGHTS = np.array([0.55, 0.25, 0.2])  # first successors are likelier; the last leads to the next cluster
ITEMS_PER_CLUSTER = 20
ZIPF_EXPONENT = 1.0  # popularity of the item of rank r is proportional to 1 / r**ZIPF_EXPONENT
MIN_LENGTH = 5  # the default 5-core keeps every synthetic user
RETRIES = 4  # redraws when the drawn item is already in the user's history (de-duplication would drop it)
RATING_SCALE = 0.5  # std of the user and item biases, of each latent factor, and of the noise
RATING_FACTORS = 3


def generate_interactions(n_users: int, n_items: int, mean_length: int, seed: int) -> dict[str, np.ndarray]:
    """Columns user (0..n_users-1), item (1..n_items), timestamp, category (the item's
    cluster, 0..n_clusters-1: the item categories DGRec reads) and rating (1..5), in per-user
    time order.

    Vectorised over users: one step of every user's sequence at a time.
    """
    rng = np.random.default_rng(seed)
    n_clusters = max(2, n_items // ITEMS_PER_CLUSTER)
    cluster = rng.permutation(np.arange(n_items) % n_clusters)  # cluster of item index i
    popularity = 1.0 / np.arange(1, n_items + 1) ** ZIPF_EXPONENT
    popularity = popularity[rng.permutation(n_items)]
    members = [np.flatnonzero(cluster == c) for c in range(n_clusters)]
    # Cumulative popularity within each cluster, for drawing "a popular item of cluster c".
    member_cdf = [np.cumsum(popularity[m]) / popularity[m].sum() for m in members]

    successors = np.empty((n_items, len(SUCCESSOR_WEIGHTS)), dtype=np.int64)
    for c in range(n_clusters):  # per cluster, not per interaction
        own, nxt = members[c], members[(c + 1) % n_clusters]
        for column in range(successors.shape[1]):
            pool = nxt if column == successors.shape[1] - 1 else own
            p = popularity[pool] / popularity[pool].sum()
            successors[own, column] = rng.choice(pool, size=len(own), p=p)

    lengths = MIN_LENGTH + rng.poisson(max(mean_length - MIN_LENGTH, 0), size=n_users)
    max_length = int(lengths.max())
    history = np.full((n_users, max_length), -1, dtype=np.int64)
    history[:, 0] = rng.choice(n_items, size=n_users, p=popularity / popularity.sum())
    successor_cdf = np.cumsum(SUCCESSOR_WEIGHTS) / SUCCESSOR_WEIGHTS.sum()

    def draw(previous: np.ndarray) -> np.ndarray:
        follow = rng.random(len(previous)) < FOLLOW
        pick = np.searchsorted(successor_cdf, rng.random(len(previous)), side="right")
        out = successors[previous, np.minimum(pick, successors.shape[1] - 1)]
        jump = np.flatnonzero(~follow)
        for c in np.unique(cluster[previous[jump]]):  # per cluster: a vectorised draw for its users
            rows = jump[cluster[previous[jump]] == c]
            index = np.searchsorted(member_cdf[c], rng.random(len(rows)), side="right")
            out[rows] = members[c][np.minimum(index, len(members[c]) - 1)]
        return out

    for step in range(1, max_length):
        previous = history[:, step - 1]
        nxt = draw(previous)
        for _ in range(RETRIES):
            seen = (history[:, :step] == nxt[:, None]).any(axis=1)
            if not seen.any():
                break
            nxt[seen] = draw(previous[seen])
        history[:, step] = nxt

    keep = np.arange(max_length)[None, :] < lengths[:, None]
    users = np.repeat(np.arange(n_users, dtype=np.int64), lengths)
    items = history[keep] + 1
    # Timestamps: each user starts at a random time and acts about once a day, so users
    # interleave globally and a temporal split has something to cut.
    day = 86_400.0
    start = rng.uniform(0, 365 * day, size=n_users)
    gaps = rng.exponential(day, size=(n_users, max_length)).cumsum(axis=1)
    timestamps = (start[:, None] + gaps)[keep].round()
    return {"user": users, "item": items, "timestamp": timestamps, "category": cluster[items - 1],
            "rating": planted_ratings(users, items, n_items, seed)}


def planted_ratings(users: np.ndarray, items: np.ndarray, n_items: int, seed: int) -> np.ndarray:
    """A 1..5 rating per (user, item) row from biases, latent factors and noise (module docstring)."""
    rng = np.random.default_rng([seed, 1])  # separate from the sequence generator's stream
    n_users = int(users.max()) + 1 if len(users) else 0
    user_bias = rng.normal(0, RATING_SCALE, n_users)
    item_bias = rng.normal(0, RATING_SCALE, n_items + 1)
    p = rng.normal(0, RATING_SCALE, (n_users, RATING_FACTORS))
    q = rng.normal(0, RATING_SCALE, (n_items + 1, RATING_FACTORS))
    raw = 3.5 + user_bias[users] + item_bias[items] + (p[users] * q[items]).sum(1) + rng.normal(0, RATING_SCALE, len(users))
    return np.clip(np.round(raw), 1, 5).astype(np.float64)
