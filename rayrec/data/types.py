"""The in-memory form every model and the trainer consume: per-user item lists in CSR layout.

Users are 0..n_users-1. Items are 1..n_items; 0 is reserved for padding, so a padded
sequence never collides with a real item. CSR (indptr + items) keeps a split compact and
cheap to pickle into Ray's object store: ML-1M is about 8 MB.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np


@dataclass
class CSR:
    """Variable-length item lists, one row per user, in the order given (chronological for sequences)."""

    indptr: np.ndarray  # int64 [n_users + 1]
    items: np.ndarray  # int64 [nnz]
    # float32 [nnz]: the explicit rating of each stored item, aligned with `items`; None when
    # the source has no ratings (implicit feedback). Rating models need it (SplitData.has_ratings).
    ratings: np.ndarray | None = None

    @classmethod
    def from_lists(cls, rows: list) -> "CSR":
        lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
        indptr = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lengths, out=indptr[1:])
        items = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if len(rows) else np.zeros(0, np.int64)
        return cls(indptr, items.astype(np.int64, copy=False))

    @classmethod
    def from_pairs(cls, users: np.ndarray, items: np.ndarray, n_users: int,
                   ratings: np.ndarray | None = None) -> "CSR":
        """Rows from (user, item[, rating]) triples; a stable sort keeps each user's pairs in their given order."""
        users = np.asarray(users, dtype=np.int64)
        order = np.argsort(users, kind="stable")
        counts = np.bincount(users, minlength=n_users)
        indptr = np.zeros(n_users + 1, dtype=np.int64)
        np.cumsum(counts, out=indptr[1:])
        values = None if ratings is None else np.asarray(ratings, dtype=np.float32)[order]
        return cls(indptr, np.asarray(items, dtype=np.int64)[order], values)

    @property
    def n_rows(self) -> int:
        return len(self.indptr) - 1

    @property
    def nnz(self) -> int:
        return int(self.indptr[-1])

    def lengths(self) -> np.ndarray:
        return np.diff(self.indptr)

    def row(self, u: int) -> np.ndarray:
        return self.items[self.indptr[u] : self.indptr[u + 1]]

    def row_ratings(self, u: int) -> np.ndarray:
        """The ratings of row u's items (ratings must be present)."""
        return self.ratings[self.indptr[u] : self.indptr[u + 1]]

    def rows(self) -> np.ndarray:
        """The user of every stored item (the COO row index)."""
        return np.repeat(np.arange(self.n_rows, dtype=np.int64), self.lengths())

    def concat(self, other: "CSR") -> "CSR":
        """Row-wise concatenation: row u = self.row(u) followed by other.row(u)."""
        assert self.n_rows == other.n_rows
        users = np.concatenate([self.rows(), other.rows()])
        items = np.concatenate([self.items, other.items])
        ratings = None
        if self.ratings is not None or other.ratings is not None:  # an empty part may carry none
            parts = [c.ratings if c.ratings is not None else np.full(c.nnz, np.nan, np.float32) for c in (self, other)]
            ratings = np.concatenate(parts)
        # Stable sort on user keeps self's items before other's within a row.
        return CSR.from_pairs(users, items, self.n_rows, ratings)


@dataclass
class SplitData:
    """A preprocessed, split dataset: what the trainer, every model and every trial receive."""

    name: str
    n_users: int
    n_items: int  # real items are 1..n_items; 0 is padding
    train: CSR  # training interactions per user (chronological when `ordered`)
    valid: CSR  # validation targets per user (may be empty for some users)
    test: CSR  # test targets per user
    ordered: bool  # True when rows are in time order, which sequential models require
    fingerprint: str  # hash of source content + preprocessing + split parameters
    info: dict[str, Any] = field(default_factory=dict)  # source, counts, 'synthetic': True, ...
    # Named subsets of the test users whose test metrics are reported beside all users' (as
    # 'test_<name>'), e.g. gsasrec's {'complete': users whose test input is complete}: name -> user ids.
    test_groups: dict[str, np.ndarray] = field(default_factory=dict)
    # Item categories where the data has them (the synthetic generator's clusters, or the file
    # `data.item_categories` names): int64 [n_items + 1], codes 0..C-1, entry 0 (padding) -1.
    item_categories: np.ndarray | None = None

    def history(self, split: Literal["valid", "test"]) -> CSR:
        """What a model may see when predicting `split`: train for valid, train + valid for test."""
        if split == "valid":
            return self.train
        if split == "test":
            cached = self.__dict__.get("_test_history")
            if cached is None:
                cached = self.train.concat(self.valid)
                self.__dict__["_test_history"] = cached
            return cached
        raise ValueError(f"split must be 'valid' or 'test', got {split!r}")

    def targets(self, split: Literal["valid", "test"]) -> CSR:
        return {"valid": self.valid, "test": self.test}[split]

    def eval_users(self, split: Literal["valid", "test"]) -> np.ndarray:
        """Users that have at least one target in `split`."""
        return np.flatnonzero(self.targets(split).lengths() > 0)

    @property
    def has_ratings(self) -> bool:
        """Explicit ratings on every interaction (rating models need them); an empty part may carry none."""
        parts = (self.train, self.valid, self.test)
        return self.train.ratings is not None and all(p.ratings is not None or p.nnz == 0 for p in parts)

    def item_counts(self) -> np.ndarray:
        """Training interactions per item id, index 0 (padding) included: [n_items + 1]."""
        return np.bincount(self.train.items, minlength=self.n_items + 1)

    def summary(self) -> str:
        kind = "SYNTHETIC dataset" if self.info.get("synthetic") else "dataset"
        return (
            f"{kind} '{self.name}': {self.n_users:,} users, {self.n_items:,} items, "
            f"{self.train.nnz:,} train / {self.valid.nnz:,} valid / {self.test.nnz:,} test interactions "
            f"(fingerprint {self.fingerprint[:12]})"
        )
