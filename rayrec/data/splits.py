"""Train / validation / test splits of cleaned interactions.

Each splitter assigns every interaction a part (TRAIN, VALID or TEST) and returns counts
for `SplitData.info`; `split_interactions` turns the parts into per-user CSR rows, which
keep the interactions' time order.

    loo       user A:  a1 a2 a3 a4 | a5 | a6      train | valid | test: the last two items held out
              user B:  b1 | b2                     2 items: train | test, no validation target
              user C:  c1                          1 item: train only
    ratio     user A:  a1 a3 a4 a6 | a2 | a5      random items held out per user (seeded)
    temporal  all:     t < T_valid | T_valid <= t < T_test | t >= T_test
                       T_valid, T_test: timestamp quantiles 1 - valid - test and 1 - test
    random    all:     one seeded shuffle of every interaction (rating prediction's protocol)
                       folds = 1: the first test_ratio of it is test, the next valid_ratio validation
                       folds = k: k equal folds, fold `fold` is test; validation is valid_ratio of
                       all interactions, taken from the other folds; the rest is train
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from rayrec.data.preprocess import Interactions
from rayrec.data.types import CSR
from rayrec.errors import UserError

TRAIN, VALID, TEST = 0, 1, 2


def _position_from_end(user: np.ndarray, n_users: int) -> tuple[np.ndarray, np.ndarray]:
    """For each row, how many of the same user's rows come after it; and each user's row count."""
    counts = np.bincount(user, minlength=n_users)
    order = np.argsort(user, kind="stable")
    ends = np.cumsum(counts)
    from_end = np.empty(len(user), dtype=np.int64)
    from_end[order] = ends[user[order]] - 1 - np.arange(len(user))
    return from_end, counts


def leave_one_out_split(data: Interactions, ordered: bool, seed: int, **_) -> tuple[np.ndarray, dict[str, Any]]:
    """Each user's last item is the test target and the one before it the validation target.

    Users with 2 interactions get a test target but no validation target; users with 1
    keep it for training only. On unordered data "last" means a random item (seeded).
    """
    user = data.user
    if not ordered:
        # A random order per user, so the held-out items are a seeded random choice.
        shuffle = np.random.default_rng(seed).permutation(len(user))
        user = user[shuffle]
    from_end, counts = _position_from_end(user, data.n_users)
    length = counts[user]
    part = np.full(len(user), TRAIN, dtype=np.int8)
    part[(from_end == 0) & (length >= 2)] = TEST
    part[(from_end == 1) & (length >= 3)] = VALID
    if not ordered:
        unshuffled = np.empty_like(part)
        unshuffled[shuffle] = part
        part = unshuffled
    info = {
        "users_without_valid": int((counts < 3).sum()),
        "users_without_test": int((counts < 2).sum()),
    }
    return part, info


def random_rank_in_user(user: np.ndarray, n_users: int, seed: int) -> np.ndarray:
    """Each row's rank (0 .. n - 1) among its user's n rows, in a seeded random order.

    One random key per row and a sort by (user, key). The per-user random hold-outs (the
    ratio split, lightgcn_format's validation carve) take the rows ranked below a quota.
    """
    rng = np.random.default_rng(seed)
    order = np.lexsort((rng.random(len(user)), user))
    counts = np.bincount(user, minlength=n_users)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    rank = np.empty(len(user), dtype=np.int64)
    rank[order] = np.arange(len(user)) - starts[user[order]]
    return rank


def holdout_quota(counts: np.ndarray, ratio: float, at_most: np.ndarray) -> np.ndarray:
    """round(count * ratio), half-up, capped at `at_most` (never below 0)."""
    return np.minimum(np.floor(counts * ratio + 0.5).astype(np.int64), np.maximum(at_most, 0))


def ratio_split(
    data: Interactions, ordered: bool, seed: int, valid_ratio: float, test_ratio: float, **_
) -> tuple[np.ndarray, dict[str, Any]]:
    """Per user, random items held out: round(n * test_ratio) for test, round(n * valid_ratio) for validation.

    Rounding is half-up. Every user keeps at least one training item: when the rounded
    shares would leave none, validation shrinks first, then test.
    """
    rank = random_rank_in_user(data.user, data.n_users, seed)
    counts = np.bincount(data.user, minlength=data.n_users)
    n_test = holdout_quota(counts, test_ratio, counts - 1)
    n_valid = holdout_quota(counts, valid_ratio, counts - 1 - n_test)
    row_test, row_valid = n_test[data.user], n_valid[data.user]  # the row's user's quotas
    part = np.full(len(data.user), TRAIN, dtype=np.int8)
    part[rank < row_test] = TEST
    part[(rank >= row_test) & (rank < row_test + row_valid)] = VALID
    info = {
        "users_without_valid": int((n_valid == 0).sum()),
        "users_without_test": int((n_test == 0).sum()),
    }
    return part, info


def temporal_split(
    data: Interactions, ordered: bool, seed: int, valid_ratio: float, test_ratio: float, **_
) -> tuple[np.ndarray, dict[str, Any]]:
    """One global cut in time: the latest test_ratio of interactions are test, the valid_ratio before them validation.

    Cuts are timestamp thresholds, so interactions at the same instant never straddle a
    cut (split sizes can differ slightly from the ratios when timestamps tie).
    """
    if data.timestamp is None:
        raise UserError(
            "data.split=temporal needs timestamps, and this dataset has none; use data.split=loo or data.split=ratio"
        )
    ts = data.timestamp
    sorted_ts = np.sort(ts)
    n_test = int(np.floor(len(ts) * test_ratio + 0.5))
    n_valid = int(np.floor(len(ts) * valid_ratio + 0.5))
    # Thresholds at the rounded quantile positions; +inf when a part is empty (ratio 0).
    t_test = sorted_ts[len(ts) - n_test] if n_test else np.inf
    t_valid = sorted_ts[len(ts) - n_test - n_valid] if n_valid and n_test + n_valid < len(ts) else t_test
    part = np.full(len(ts), TRAIN, dtype=np.int8)
    part[ts >= t_valid] = VALID
    part[ts >= t_test] = TEST
    if (part == TRAIN).sum() == 0:
        raise UserError(
            f"data.split=temporal left no training interactions (all timestamps are >= {t_valid}); "
            f"lower data.valid_ratio/test_ratio or use data.split=loo"
        )
    info = {
        "valid_from_timestamp": float(t_valid) if np.isfinite(t_valid) else None,
        "test_from_timestamp": float(t_test) if np.isfinite(t_test) else None,
        "users_without_valid": int(data.n_users - len(np.unique(data.user[part == VALID]))),
        "users_without_test": int(data.n_users - len(np.unique(data.user[part == TEST]))),
    }
    return part, info


def random_split(
    data: Interactions, ordered: bool, seed: int, valid_ratio: float, test_ratio: float, folds: int = 1,
    fold: int = 0, **_
) -> tuple[np.ndarray, dict[str, Any]]:
    """Interactions held out at random over the whole dataset, not per user (rating prediction's
    k-fold protocol: the same seed and folds give the same k disjoint test folds, one per `fold`).

    One seeded permutation of all rows; test is `test_ratio` of it (folds = 1) or its fold
    `fold` of `folds` near-equal folds (np.array_split sizes); validation is the next
    round(n * valid_ratio) rows of the permutation outside the test fold.
    """
    n = len(data.user)
    order = np.random.default_rng(seed).permutation(n)
    if folds > 1:
        in_test = np.zeros(n, dtype=bool)
        in_test[np.array_split(np.arange(n), folds)[fold]] = True  # positions in the permutation
    else:
        in_test = np.arange(n) < int(np.floor(n * test_ratio + 0.5))
    rest = np.flatnonzero(~in_test)
    n_valid = min(int(np.floor(n * valid_ratio + 0.5)), max(len(rest) - 1, 0))
    part = np.full(n, TRAIN, dtype=np.int8)
    part[order[in_test]] = TEST
    part[order[rest[:n_valid]]] = VALID
    if (part == TRAIN).sum() == 0:
        raise UserError("data.split=random left no training interactions; lower data.valid_ratio/test_ratio")
    info = {
        "folds": folds,
        "fold": fold if folds > 1 else None,
        "users_without_valid": int(data.n_users - len(np.unique(data.user[part == VALID]))),
        "users_without_test": int(data.n_users - len(np.unique(data.user[part == TEST]))),
    }
    return part, info


SPLITTERS: dict[str, Callable[..., tuple[np.ndarray, dict[str, Any]]]] = {
    "loo": leave_one_out_split,
    "ratio": ratio_split,
    "temporal": temporal_split,
    "random": random_split,
}


def split_interactions(
    data: Interactions, kind: str, ordered: bool, seed: int, valid_ratio: float, test_ratio: float,
    folds: int = 1, fold: int = 0,
) -> tuple[CSR, CSR, CSR, dict[str, Any]]:
    """Train, valid and test CSRs (rows in time order, ratings carried when the data has them)
    and the split's counts for `info`."""
    splitter = SPLITTERS.get(kind)
    if splitter is None:
        raise UserError(f"unknown data.split '{kind}'; valid: {', '.join(SPLITTERS)}")
    part, info = splitter(data, ordered=ordered, seed=seed, valid_ratio=valid_ratio, test_ratio=test_ratio,
                          folds=folds, fold=fold)
    train, valid, test = (
        CSR.from_pairs(data.user[part == p], data.item[part == p], data.n_users,
                       None if data.rating is None else data.rating[part == p])
        for p in (TRAIN, VALID, TEST)
    )
    # Users left without training items are kept (they have targets), counted here and
    # warned about by load_split.
    info = {"kind": kind, **info, "users_without_train": int((train.lengths() == 0).sum())}
    return train, valid, test, info
