"""The split cache: a split's fingerprint, and the split stored under it.

Cache layout, under data.cache_dir, else $RAYREC_CACHE, else ~/.cache/rayrec:

    downloads/ml-100k.zip                    verified archives (rayrec.data.downloads)
    splits/<fingerprint>/meta.json           SplitData fields and info
    splits/<fingerprint>/{train,valid,test}.parquet   (user, item[, rating]) rows in CSR order
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from rayrec.data.config import DataConfig
from rayrec.data.sources import Source
from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError

log = logging.getLogger(__name__)

# Bump when a change to reading, preprocessing or splitting changes the result for the
# same inputs, so stale caches are not reused.
PIPELINE_VERSION = 1


def fingerprint(source: Source, cfg: DataConfig) -> str:
    """sha256 over the source's identity and every parameter that can change the split.

    JSON with sorted keys makes it stable across runs, processes and machines (Python's
    hash() is salted per process). Parameters that cannot change the result are left out,
    so e.g. changing valid_ratio under leave-one-out still reuses the cache.
    """
    parts: dict[str, Any] = {"pipeline": PIPELINE_VERSION, "source": source.identity}
    if source.read_split is None:
        parts["preprocess"] = {"min_rating": cfg.min_rating, "user_core": cfg.user_core, "item_core": cfg.item_core}
        split: dict[str, Any] = {"kind": cfg.split}
        if cfg.split in ("ratio", "temporal"):
            split.update(valid_ratio=cfg.valid_ratio, test_ratio=cfg.test_ratio)
        if cfg.split in ("ratio", "loo", "random"):  # loo draws the held-out items at random on unordered data
            split["seed"] = cfg.seed
        if cfg.split == "random":
            split.update(valid_ratio=cfg.valid_ratio, folds=cfg.folds)
            if cfg.folds > 1:
                split["fold"] = cfg.fold
            else:
                split["test_ratio"] = cfg.test_ratio
        parts["split"] = split
    blob = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()


def cache_root(cfg: DataConfig) -> Path:
    """The cache folder, created and checked writable: data.cache_dir, $RAYREC_CACHE or ~/.cache/rayrec."""
    root = Path(cfg.cache_dir or os.environ.get("RAYREC_CACHE") or "~/.cache/rayrec").expanduser()
    try:
        (root / "splits").mkdir(parents=True, exist_ok=True)
        # mkdir succeeds on an existing read-only folder; only a real write proves it is usable.
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=root / "splits")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UserError(
            f"cache directory {root} is not writable ({exc.strerror or exc}); set data.cache_dir or "
            "RAYREC_CACHE to a writable folder"
        ) from None
    return root


PARTS = ("train", "valid", "test")


def write_cached_split(cache: Path, split: SplitData) -> Path:
    """Store `split` under splits/<fingerprint>/, atomically: written to a temporary folder, then renamed."""
    final = cache / "splits" / split.fingerprint
    tmp = Path(tempfile.mkdtemp(prefix=f".{split.fingerprint[:16]}-", dir=cache / "splits"))
    try:
        for part in PARTS:
            csr: CSR = getattr(split, part)
            columns = {"user": csr.rows(), "item": csr.items}
            if csr.ratings is not None:
                columns["rating"] = csr.ratings
            pd.DataFrame(columns).to_parquet(tmp / f"{part}.parquet", index=False)
        meta = {
            "name": split.name,
            "n_users": split.n_users,
            "n_items": split.n_items,
            "ordered": split.ordered,
            "fingerprint": split.fingerprint,
            "ratings": split.train.ratings is not None,
            "info": split.info,
            "test_groups": {name: users.tolist() for name, users in split.test_groups.items()},
            "item_categories": None if split.item_categories is None else split.item_categories.tolist(),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, default=_json_default))
        try:
            os.rename(tmp, final)
        except OSError:
            # Another process stored the same fingerprint first; its copy is equally good.
            if not (final / "meta.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON-serialisable: {value!r}")


def read_cached_split(cache: Path, fp: str) -> SplitData | None:
    """The split stored under `fp`, or None; a damaged entry is removed so it gets rebuilt."""
    folder = cache / "splits" / fp
    if not (folder / "meta.json").exists():
        return None
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if "ratings" not in meta:
            # Written before splits carried ratings: rebuilt once, so a rated source keeps them.
            shutil.rmtree(folder, ignore_errors=True)
            return None
        parts = {}
        for part in PARTS:
            frame = pd.read_parquet(folder / f"{part}.parquet")
            ratings = frame["rating"].to_numpy() if "rating" in frame.columns else None
            parts[part] = CSR.from_pairs(frame["user"].to_numpy(), frame["item"].to_numpy(), meta["n_users"], ratings)
    except (OSError, ValueError, KeyError) as exc:
        log.warning("ignoring damaged split cache %s (%s); rebuilding it", folder, exc)
        shutil.rmtree(folder, ignore_errors=True)
        return None
    return SplitData(
        name=meta["name"],
        n_users=meta["n_users"],
        n_items=meta["n_items"],
        ordered=meta["ordered"],
        fingerprint=meta["fingerprint"],
        info=meta["info"],
        test_groups={name: np.asarray(users, dtype=np.int64) for name, users in meta.get("test_groups", {}).items()},
        item_categories=None if meta.get("item_categories") is None else np.asarray(meta["item_categories"], np.int64),
        **parts,
    )
