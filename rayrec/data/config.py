"""The data section of a run's config (`data.*` keys): where the interactions come from and
how they are cleaned and split. It lives in the data package so that the pipeline never
imports rayrec.config; rayrec.config re-exports it as part of the run's Config.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rayrec.errors import UserError


@dataclass
class DataConfig:
    """Where the interactions come from and how they are cleaned and split."""

    name: str = "synthetic"  # named dataset (synthetic, ml-100k, ml-1m, ml-1m-gsasrec, gowalla, ...) or a path/URL
    format: str | None = None  # reader for a path: grouplens, ml-1m, inter, pairs, sequences, csv, parquet, gsasrec, lightgcn
    columns: dict[str, str] = field(default_factory=dict)  # csv/parquet: {user: col, item: col, timestamp: col, rating: col}
    # A file of `item category` lines (space, tab or comma separated; item ids as in the
    # interaction file), for models that read item categories (DGRec); items it omits share
    # one 'unknown' category. The synthetic data carry their own categories.
    item_categories: str | None = None
    min_rating: float | None = None  # implicit feedback: keep ratings >= this
    user_core: int = 5  # iterative k-core: every user keeps >= this many interactions
    item_core: int = 5  # ... and every item
    # leave-one-out | per-user random ratio | global temporal | random over all interactions (rating prediction)
    split: Literal["loo", "ratio", "temporal", "random"] = "loo"
    valid_ratio: float = 0.1  # ratio/temporal/random splits: share of each user's (or all) interactions for validation
    test_ratio: float = 0.2  # ratio/temporal/random splits: share for test (random with folds > 1: one fold instead)
    folds: int = 1  # random split: k > 1 cuts one seeded shuffle into k folds, and fold `fold` is test (k-fold CV)
    fold: int = 0  # random split with folds > 1: which fold (0 .. folds - 1) is the test set
    seed: int = 0  # split and synthetic-data seed (separate from the training seed)
    cache_dir: str | None = None  # default: $RAYREC_CACHE or ~/.cache/rayrec
    # The built-in synthetic dataset (offline, deterministic, planted sequential structure).
    synthetic_users: int = 1000
    synthetic_items: int = 400
    synthetic_length: int = 30  # mean interactions per user

    def validate(self) -> None:
        if self.user_core < 0 or self.item_core < 0:
            raise UserError(f"data.user_core/item_core must be >= 0, got {self.user_core}/{self.item_core}")
        for key in ("valid_ratio", "test_ratio"):
            v = getattr(self, key)
            if not 0.0 <= v < 1.0:
                raise UserError(f"data.{key} must be in [0, 1), got {v}")
        if self.valid_ratio + self.test_ratio >= 1.0:
            raise UserError(
                f"data.valid_ratio + data.test_ratio must be < 1, got {self.valid_ratio + self.test_ratio}"
            )
        if self.seed < 0:
            raise UserError(f"data.seed must be >= 0, got {self.seed}")
        if self.folds < 1 or (self.folds > 1 and self.split != "random"):
            raise UserError(f"data.folds={self.folds} is not valid; valid: 1, or k >= 2 with data.split=random")
        if not 0 <= self.fold < max(self.folds, 1):
            raise UserError(f"data.fold={self.fold} is not valid; valid: 0 .. {self.folds - 1} (data.folds={self.folds})")
        for key in ("synthetic_users", "synthetic_items", "synthetic_length"):
            if getattr(self, key) < 2:
                raise UserError(f"data.{key} must be >= 2, got {getattr(self, key)}")
