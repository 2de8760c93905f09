"""Where a dataset's content comes from, resolved but not yet read: a `Source` per single
interaction file, the built-in synthetic data and LightGCN-layout folders; the shared
real-data folder (../shared/data) that named datasets read.

A Source's `identity` (hashes or generator parameters) is the source part of the split's
fingerprint (rayrec.data.cache); reading happens only on a cache miss.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pandas as pd

from rayrec.data import readers, synthetic
from rayrec.data.config import DataConfig
from rayrec.data.types import SplitData
from rayrec.errors import UserError


@dataclass
class Source:
    """A dataset resolved but not yet read."""

    name: str  # SplitData.name
    location: str  # path, URL or description, for info['source']
    format: str
    identity: dict[str, Any]  # JSON-able; identifies the content (hashes or generator parameters)
    read: Callable[[], tuple[pd.DataFrame, bool]] | None = None  # raw frame and whether it is ordered
    read_split: Callable[[], SplitData] | None = None  # pre-split datasets skip preprocessing and splitting
    synthetic: bool = False
    split: str = "loo"  # the split a pre-split dataset comes with (data.split must agree)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()



def file_source(path: str, fmt: str, columns: dict[str, str], name: str | None = None) -> Source:
    """A single interaction file. Its bytes are read once: hashed now, parsed on a cache miss."""
    data = readers.read_bytes(path)

    def read() -> tuple[pd.DataFrame, bool]:
        frame = readers.parse_interactions(data, fmt, path, columns)
        return frame, readers.is_ordered(frame, fmt)

    identity = {"kind": "file", "sha256": sha256_bytes(data), "format": fmt, "columns": dict(sorted(columns.items()))}
    return Source(name=name or path, location=path, format=fmt, identity=identity, read=read)


def synthetic_source(cfg: DataConfig) -> Source:
    params = {
        "users": cfg.synthetic_users,
        "items": cfg.synthetic_items,
        "length": cfg.synthetic_length,
        "seed": cfg.seed,
    }

    def read() -> tuple[pd.DataFrame, bool]:
        columns = synthetic.generate_interactions(params["users"], params["items"], params["length"], params["seed"])
        return pd.DataFrame(columns), True

    return Source(
        name="synthetic",
        location="built-in synthetic generator",
        format="synthetic",
        identity={"kind": "synthetic", "version": synthetic.VERSION, **params},
        read=read,
        synthetic=True,
    )


def lightgcn_source(directory: str, name: str | None = None, cfg: DataConfig | None = None) -> Source:
    """A LightGCN-layout folder (Gowalla, Yelp2018, LastFM): train/test given, validation carved
    out of train by data.valid_ratio (seeded), since selection must never use test."""
    from rayrec.data.lightgcn_format import LAYOUT_FILES, load_lightgcn_dir

    cfg = cfg or DataConfig(split="ratio")
    base = directory.rstrip("/")
    present = {f: f"{base}/{f}" for f in LAYOUT_FILES if os.path.exists(f"{base}/{f}") or "://" in base}
    identity = {"kind": "lightgcn", "valid_ratio": cfg.valid_ratio, "seed": cfg.seed,
                **{f: sha256_file(Path(p)) for f, p in present.items() if "://" not in p}}
    return Source(
        name=name or base, location=base, format="lightgcn", identity=identity, split="ratio",
        read_split=lambda: load_lightgcn_dir(base, name or base, valid_ratio=cfg.valid_ratio, seed=cfg.seed),
    )


def shared_data_dir() -> Path:
    """The shared real-data folder: $RAYREC_SHARED_DATA, else <repo root>/../shared/data."""
    env = os.environ.get("RAYREC_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data"


def shared_path(dataset: str, relative: str) -> str:
    path = shared_data_dir() / relative
    if not path.exists():
        raise UserError(
            f"dataset '{dataset}' reads {path}, which does not exist; set RAYREC_SHARED_DATA to the "
            f"folder that holds {relative}"
        )
    return str(path)


