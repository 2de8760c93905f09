"""Cleaning raw interactions: time order, implicit feedback, de-duplication, k-core, re-indexing.

The steps run in this order, each counted in `Interactions.counts`:

    read -> chronological order -> rating >= min_rating -> de-duplicate -> iterative k-core -> re-index

De-duplication keeps a (user, item) pair's EARLIEST occurrence: a repeat says nothing new
to a model that never recommends seen items, and keeping the first one means leave-one-out
can never hold out an item that is also in the user's training history (no test leakage).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from rayrec.errors import UserError


@dataclass
class Interactions:
    """Cleaned interactions in global time order (per user: chronological, ties in file order)."""

    user: np.ndarray  # int64, 0..n_users-1
    item: np.ndarray  # int64, 1..n_items (0 is padding)
    timestamp: np.ndarray | None  # float64, or None when the source has no timestamps
    n_users: int
    n_items: int
    counts: dict[str, int] = field(default_factory=dict)  # rows left after each step
    item_categories: np.ndarray | None = None  # int64 [n_items + 1] category codes (entry 0: -1), when given
    rating: np.ndarray | None = None  # float32 explicit ratings, or None when the source has none


def chronological(frame: pd.DataFrame) -> pd.DataFrame:
    """Rows by timestamp; ties (and sources without timestamps) keep file order."""
    if "timestamp" not in frame.columns:
        return frame.reset_index(drop=True)
    return frame.sort_values("timestamp", kind="stable").reset_index(drop=True)


def k_core(user: np.ndarray, item: np.ndarray, user_core: int, item_core: int) -> np.ndarray:
    """Mask of rows kept by the iterative k-core: every user has >= user_core rows and every item >= item_core.

    Removing a sparse user can push an item below its threshold (and back), so filtering
    repeats until nothing changes. `user` and `item` are dense codes (0..n-1).
    """
    keep = np.ones(len(user), dtype=bool)
    if user_core <= 1 and item_core <= 1:
        return keep
    n_users = int(user.max()) + 1 if len(user) else 0
    n_items = int(item.max()) + 1 if len(item) else 0
    while True:
        user_count = np.bincount(user[keep], minlength=n_users)
        item_count = np.bincount(item[keep], minlength=n_items)
        still = keep & (user_count[user] >= user_core) & (item_count[item] >= item_core)
        if still.sum() == keep.sum():
            return keep
        keep = still


def preprocess(frame: pd.DataFrame, min_rating: float | None, user_core: int, item_core: int) -> Interactions:
    """Clean `frame` (columns user, item [, timestamp, rating, category]) into dense, time-ordered
    Interactions; a `category` column (one per item) becomes `item_categories`."""
    counts = {"read": len(frame)}
    frame = chronological(frame)
    if min_rating is not None:
        if "rating" not in frame.columns:
            raise UserError(
                f"data.min_rating={min_rating} needs a rating column, but this source has only: "
                f"{', '.join(frame.columns)}; unset data.min_rating or map data.columns.rating"
            )
        frame = frame[frame["rating"].to_numpy() >= min_rating]
        counts["min_rating"] = len(frame)
    frame = frame.drop_duplicates(["user", "item"], keep="first")
    counts["dedup"] = len(frame)

    user_code, _ = pd.factorize(frame["user"])
    item_code, _ = pd.factorize(frame["item"])
    keep = k_core(user_code.astype(np.int64), item_code.astype(np.int64), user_core, item_core)
    frame = frame[keep]
    counts["k_core"] = len(frame)
    if len(frame) == 0:
        steps = ", ".join(f"{n:,} after {step}" for step, n in counts.items())
        raise UserError(
            f"no interactions left after preprocessing ({steps}); lower data.user_core "
            f"(now {user_core}), data.item_core (now {item_core}) or data.min_rating (now {min_rating})"
        )

    # Sorted raw ids -> dense ids, so a file whose ids are already 1..N keeps them.
    user, user_ids = pd.factorize(frame["user"], sort=True)
    item, item_ids = pd.factorize(frame["item"], sort=True)
    timestamp = frame["timestamp"].to_numpy(np.float64) if "timestamp" in frame.columns else None
    item_categories = None
    if "category" in frame.columns:
        codes, _ = pd.factorize(frame["category"], sort=True)
        item_categories = np.full(len(item_ids) + 1, -1, dtype=np.int64)
        item_categories[item + 1] = codes
    rating = frame["rating"].to_numpy(np.float32) if "rating" in frame.columns else None
    return Interactions(
        user=user.astype(np.int64),
        item=item.astype(np.int64) + 1,
        timestamp=timestamp,
        n_users=len(user_ids),
        n_items=len(item_ids),
        counts=counts,
        item_categories=item_categories,
        rating=rating,
    )
