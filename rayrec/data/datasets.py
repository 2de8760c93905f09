"""Named datasets and `load_split`: resolve -> (cache hit, or read -> preprocess -> split) -> cache.

`data.name` is either a named dataset (a key of NAMED) or a path/URL read with the parser
`data.format` names (inferred from the file name where unambiguous). Every dataset is
first resolved to a `Source` (rayrec.data.sources): what identifies its content (the
source part of the fingerprint) and how to read it. Reading happens only on a cache miss.

Extending: a named dataset is `NAMED[name] = fn(cfg) -> Source`; a folder format that
comes already split (like gsasrec) is `PRESPLIT_FORMATS[fmt] = fn(path, name) -> Source`
with `read_split` set; both are looked up at call time.

The pieces live beside this module: sources.py (files, synthetic, LightGCN folders, the
shared data folder), gsasrec.py (the gSASRec folder format), downloads.py (GroupLens
archives) and cache.py (fingerprint and split cache, with the cache layout).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Callable

from rayrec.data import readers
from rayrec.data.cache import cache_root, fingerprint, read_cached_split, write_cached_split
from rayrec.data.config import DataConfig
from rayrec.data.downloads import DOWNLOADS, grouplens_source
from rayrec.data.gsasrec import GSASREC_FILES, gsasrec_source
from rayrec.data.preprocess import preprocess
from rayrec.data.sources import Source, file_source, lightgcn_source, sha256_bytes, shared_data_dir, shared_path, synthetic_source
from rayrec.data.splits import split_interactions
from rayrec.data.types import SplitData
from rayrec.errors import UserError, did_you_mean

# Imported from here by other modules and the tests; they live in the modules named above.
__all__ = ["DOWNLOADS", "NAMED", "PRESPLIT_FORMATS", "Source", "build_split", "fingerprint", "load_split",
           "resolve_source", "shared_data_dir", "shipped_split", "synthetic_source"]

log = logging.getLogger(__name__)


# Folder formats that come already split.
PRESPLIT_FORMATS: dict[str, Callable[[str, str | None], Source]] = {
    "gsasrec": gsasrec_source,
    "lightgcn": lightgcn_source,
}


def _shared_lightgcn(dataset: str) -> Callable[[DataConfig], Source]:
    def resolve(cfg: DataConfig) -> Source:
        return lightgcn_source(shared_path(dataset, dataset), dataset, cfg)

    return resolve


def beauty_source(cfg: DataConfig) -> Source:
    return file_source(shared_path("beauty", "beauty/Beauty.txt"), "sequences", {}, name="beauty")


def ml1m_gsasrec_source(cfg: DataConfig) -> Source:
    return gsasrec_source(shared_path("ml-1m-gsasrec", "ml-1m-gsasrec"), name="ml-1m-gsasrec")


# The split a dataset ships with, known from its name or format without reading it, so
# that a model runs on it as it is: popularity on gowalla, NCF or LightGCN (whose own default is
# a ratio split) on ml-1m-gsasrec. An explicit data.split still has to match.
SHIPPED_SPLITS = {"gowalla": "ratio", "lastfm": "ratio", "lightgcn": "ratio", "ml-1m-gsasrec": "loo", "gsasrec": "loo"}


def shipped_split(name: str, fmt: str | None) -> str | None:
    return SHIPPED_SPLITS.get(name) if name in NAMED else SHIPPED_SPLITS.get(fmt or "")


# Named datasets -> Source builders. Others register theirs here (e.g. NAMED["gowalla"]).
NAMED: dict[str, Callable[[DataConfig], Source]] = {
    "synthetic": synthetic_source,
    "ml-100k": grouplens_source("ml-100k"),
    "ml-1m": grouplens_source("ml-1m"),
    "ml-1m-gsasrec": ml1m_gsasrec_source,
    "beauty": beauty_source,
    "gowalla": _shared_lightgcn("gowalla"),
    "lastfm": _shared_lightgcn("lastfm"),
}


def _looks_like_path(name: str) -> bool:
    return "://" in name or "/" in name or os.sep in name or "." in os.path.basename(name) or os.path.exists(name)


def resolve_source(cfg: DataConfig) -> Source:
    """The Source `cfg.name` (and `cfg.format`) designate; reads a file's bytes but parses nothing."""
    name = cfg.name
    if name in NAMED:
        if cfg.format is not None:
            raise UserError(
                f"data.format='{cfg.format}' applies to paths, but '{name}' is a named dataset with its own format; "
                "unset data.format"
            )
        return NAMED[name](cfg)
    if not _looks_like_path(name):
        raise UserError(f"unknown dataset '{name}' (not a named dataset, not a path); {did_you_mean(name, NAMED)}")
    valid_formats = sorted({*readers.PARSERS, *PRESPLIT_FORMATS})
    fmt = cfg.format or readers.infer_format(name)
    if fmt is None and os.path.isdir(name) and os.path.exists(os.path.join(name, GSASREC_FILES[0])):
        fmt = "gsasrec"
    if fmt is None:
        raise UserError(
            f"cannot tell the format of {name} from its name; set data.format to one of: {', '.join(valid_formats)}"
        )
    if fmt == "lightgcn":
        return lightgcn_source(name, None, cfg)
    if fmt in PRESPLIT_FORMATS:
        return PRESPLIT_FORMATS[fmt](name, None)
    if fmt not in readers.PARSERS:
        raise UserError(f"unknown data.format '{fmt}'; {did_you_mean(fmt, valid_formats)}")
    return file_source(name, fmt, cfg.columns)


def build_split(source: Source, cfg: DataConfig) -> SplitData:
    """Read, preprocess and split `source` (no caching)."""
    if source.read_split is not None:
        split = source.read_split()
        split.info = {"source": source.location, "format": source.format, "synthetic": source.synthetic, **split.info}
    else:
        frame, ordered = source.read()
        data = preprocess(frame, cfg.min_rating, cfg.user_core, cfg.item_core)
        train, valid, test, split_info = split_interactions(
            data, cfg.split, ordered, cfg.seed, cfg.valid_ratio, cfg.test_ratio, cfg.folds, cfg.fold
        )
        info = {
            "source": source.location,
            "format": source.format,
            "synthetic": source.synthetic,
            "preprocess": {"min_rating": cfg.min_rating, "user_core": cfg.user_core, "item_core": cfg.item_core},
            "counts": data.counts,
            "split": split_info,
        }
        split = SplitData(source.name, data.n_users, data.n_items, train, valid, test, ordered, "", info,
                          item_categories=data.item_categories)
    split.info.update(
        n_users=split.n_users,
        n_items=split.n_items,
        n_interactions=split.train.nnz + split.valid.nnz + split.test.nnz,
        ordered=split.ordered,
    )
    return split


def with_item_categories(source: Source, path: str) -> Source:
    """`source` whose frame gains a `category` column from the file of `item category` lines at
    `path` (raw item ids, as in the interaction file); items the file omits get 'unknown'. The
    file's hash joins the source's identity, so the split's fingerprint follows its content."""
    if source.read is None:
        raise UserError(
            f"data.item_categories applies to interaction files, but dataset '{source.name}' comes already "
            "split; unset data.item_categories (DGRec then derives categories from the training graph)"
        )
    data = readers.read_bytes(path)
    categories = readers.parse_item_categories(data, path)
    inner = source.read

    def read():
        frame, ordered = inner()
        by_item = dict(zip(categories["item"].astype(str), categories["category"]))
        frame = frame.assign(category=frame["item"].astype(str).map(by_item).fillna("unknown"))
        return frame, ordered

    identity = {**source.identity, "item_categories": sha256_bytes(data)}
    return dataclasses.replace(source, read=read, identity=identity)


def load_split(cfg: DataConfig) -> SplitData:
    """The preprocessed, split dataset `cfg` describes, from the cache when it has been built before.

    Raises UserError for anything the user can fix (bad name, path, format, columns,
    parameters, unwritable cache, failed download).
    """
    cfg.validate()
    cache = cache_root(cfg)
    source = resolve_source(cfg)
    if cfg.item_categories:
        source = with_item_categories(source, cfg.item_categories)
    if source.read_split is not None and cfg.split != source.split:
        raise UserError(
            f"dataset '{source.name}' comes already split ({source.split}); data.split must be {source.split}, "
            f"got '{cfg.split}'"
        )
    fp = fingerprint(source, cfg)
    split = read_cached_split(cache, fp)
    if split is None:
        split = build_split(source, cfg)
        split = dataclasses.replace(split, fingerprint=fp)
        write_cached_split(cache, split)
    else:
        log.debug("split %s read from the cache", fp[:12])
    # The cache is keyed by content, so a moved or renamed file hits it: report where it came from now.
    split.name = source.name
    split.info.update(source=source.location, cache_path=str(cache / "splits" / fp))
    no_train = int(((split.train.lengths() == 0) & (split.valid.lengths() + split.test.lengths() > 0)).sum())
    if no_train:
        # Kept, not dropped: they still have targets, and a model scores them from no history.
        log.warning(
            "%s: %d user(s) have no training interactions (kept; scored from an empty history)", split.name, no_train
        )
    return split
