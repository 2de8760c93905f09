"""Where datasets come from, and `load_split`: read -> preprocess -> split -> fingerprint -> cache.

`data.name` is either a named dataset (a key of NAMED) or a path/URL read with the parser
`data.format` names (inferred from the file name where unambiguous). Every dataset is
first resolved to a `Source`: what identifies its content (the source part of the
fingerprint) and how to read it. Reading happens only on a cache miss.

Extending: a named dataset is `NAMED[name] = fn(cfg) -> Source`; a folder format that
comes already split (like gsasrec) is `PRESPLIT_FORMATS[fmt] = fn(path, name) -> Source`
with `read_split` set; both are looked up at call time.

Cache layout, under data.cache_dir, else $RAYREC_CACHE, else ~/.cache/rayrec:

    downloads/ml-100k.zip                    verified archives
    splits/<fingerprint>/meta.json           SplitData fields and info
    splits/<fingerprint>/{train,valid,test}.parquet   (user, item) rows in CSR order
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from rayrec.data import readers, synthetic
from rayrec.data.config import DataConfig
from rayrec.data.preprocess import preprocess
from rayrec.data.splits import split_interactions
from rayrec.data.types import CSR, SplitData
from rayrec.errors import UserError, did_you_mean

log = logging.getLogger(__name__)

# Bump when a change to reading, preprocessing or splitting changes the result for the
# same inputs, so stale caches are not reused.
PIPELINE_VERSION = 1
GSASREC_VERSION = 2  # the gsasrec reader's own: 2 declares the 'complete' test group


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


# ---------------------------------------------------------------------------------------
# Files, the built-in dataset and pre-split folders


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


GSASREC_FILES = ("train_input.txt", "val_input.txt", "val_output.txt", "test_output.txt")
GSASREC_LAYOUT = (
    "a folder with train_input.txt (line i: user i's items), val_input.txt/val_output.txt "
    "(validation users' input and target) and test_output.txt (every user's test target)"
)


def _int_lines(data: bytes, path: str) -> list[list[int]]:
    try:
        return [[int(t) for t in line.split()] for line in data.decode("utf-8").splitlines() if line.strip()]
    except (UnicodeDecodeError, ValueError):
        raise UserError(f"cannot read {path} as format 'gsasrec': expected {GSASREC_LAYOUT}") from None


def gsasrec_source(directory: str, name: str | None = None) -> Source:
    """The gSASRec authors' pre-split leave-one-out folder (see shared/data/README.md).

    Per user the full sequence is s[:-3] + a + b + c for validation users and s[:-2] + c
    for the others (their second-to-last item is not in the files). Train is val_input
    (= train_input + a) for validation users, so the validation target b is predicted from
    exactly the gSASRec validation input, and the test history train + b is the user's
    sequence without its last item; for the others train is train_input and they have no
    validation target. Items keep their ids (1..3416 for ML-1M); no k-core is applied.

    Only the validation users' test input (train + b) is the complete sequence before the
    test target; the others miss their second-to-last item. They form the test group
    'complete', whose test metrics are reported beside all users' (`test_complete`).
    """
    base = directory.rstrip("/")
    blobs = {f: readers.read_bytes(f"{base}/{f}") for f in GSASREC_FILES}

    def read_split() -> SplitData:
        train_rows, val_inputs, val_outputs, test_outputs = (_int_lines(blobs[f], f"{base}/{f}") for f in GSASREC_FILES)
        n_users = len(train_rows)
        one_target_each = all(len(t) == 1 for t in test_outputs + val_outputs)
        if len(test_outputs) != n_users or len(val_inputs) != len(val_outputs) or not one_target_each:
            raise UserError(f"cannot read {base} as format 'gsasrec': expected {GSASREC_LAYOUT} (line counts disagree or a target line has several items)")
        # val_input lines carry no user id: a line is the user's train_input plus one item.
        user_of = {tuple(row): u for u, row in enumerate(train_rows)}
        valid_rows: list[list[int]] = [[] for _ in range(n_users)]
        for val_input, val_output in zip(val_inputs, val_outputs):
            user = user_of.get(tuple(val_input[:-1]))
            if user is None:
                raise UserError(
                    f"cannot read {base} as format 'gsasrec': a val_input.txt line extends no train_input.txt line"
                )
            train_rows[user] = val_input
            valid_rows[user] = val_output
        train, valid, test = CSR.from_lists(train_rows), CSR.from_lists(valid_rows), CSR.from_lists(test_outputs)
        n_items = int(max(train.items.max(initial=0), valid.items.max(initial=0), test.items.max(initial=0)))
        complete = np.flatnonzero(valid.lengths() > 0)  # the validation users
        n_valid_users = len(complete)
        info = {
            "counts": {"read": train.nnz + valid.nnz + test.nnz},
            "split": {
                "kind": "loo",
                "presplit": True,
                "users_without_valid": n_users - n_valid_users,
                "users_without_test": int((test.lengths() == 0).sum()),
                "users_without_train": int((train.lengths() == 0).sum()),
            },
            "test_groups": {"complete": "users whose test input is complete (the validation users)"},
        }
        return SplitData(name or base, n_users, n_items, train, valid, test, True, "", info,
                         test_groups={"complete": complete})

    identity = {"kind": "gsasrec", "version": GSASREC_VERSION, **{f: sha256_bytes(b) for f, b in blobs.items()}}
    return Source(name=name or base, location=base, format="gsasrec", identity=identity, read_split=read_split)


def lightgcn_source(directory: str, name: str | None = None, cfg: DataConfig | None = None) -> Source:
    """A LightGCN-layout folder (Gowalla, Yelp2018, LastFM): train/test given, validation carved
    out of train by data.valid_ratio (seeded), since selection must never use test."""
    from rayrec.data.lightgcn_format import LAYOUT_FILES, load_lightgcn_dir

    cfg = cfg or DataConfig(split="ratio")
    base = directory.rstrip("/")
    present = {f: f"{base}/{f}" for f in LAYOUT_FILES if os.path.exists(f"{base}/{f}") or "://" in base}
    identity = {"kind": "lightgcn", "valid_ratio": cfg.valid_ratio, "seed": cfg.seed,
                **{f: _sha256_file(Path(p)) for f, p in present.items() if "://" not in p}}
    return Source(
        name=name or base, location=base, format="lightgcn", identity=identity, split="ratio",
        read_split=lambda: load_lightgcn_dir(base, name or base, valid_ratio=cfg.valid_ratio, seed=cfg.seed),
    )


def _shared_lightgcn(dataset: str) -> Callable[[DataConfig], Source]:
    def resolve(cfg: DataConfig) -> Source:
        return lightgcn_source(_shared_path(dataset, dataset), dataset, cfg)

    return resolve


# Folder formats that come already split.
PRESPLIT_FORMATS: dict[str, Callable[[str, str | None], Source]] = {
    "gsasrec": gsasrec_source,
    "lightgcn": lightgcn_source,
}


# ---------------------------------------------------------------------------------------
# Named datasets


def shared_data_dir() -> Path:
    """The shared real-data folder: $RAYREC_SHARED_DATA, else <repo root>/../shared/data."""
    env = os.environ.get("RAYREC_SHARED_DATA")
    if env:
        return Path(env).expanduser()
    repo_root = Path(__file__).resolve().parents[2]
    return repo_root.parent / "shared" / "data"


def _shared_path(dataset: str, relative: str) -> str:
    path = shared_data_dir() / relative
    if not path.exists():
        raise UserError(
            f"dataset '{dataset}' reads {path}, which does not exist; set RAYREC_SHARED_DATA to the "
            f"folder that holds {relative}"
        )
    return str(path)


def beauty_source(cfg: DataConfig) -> Source:
    return file_source(_shared_path("beauty", "beauty/Beauty.txt"), "sequences", {}, name="beauty")


def ml1m_gsasrec_source(cfg: DataConfig) -> Source:
    return gsasrec_source(_shared_path("ml-1m-gsasrec", "ml-1m-gsasrec"), name="ml-1m-gsasrec")


GROUPLENS_BASE_URL = "https://files.grouplens.org/datasets/movielens"
MIRROR_ENV = "RAYREC_DATA_MIRROR"  # base URL that replaces GROUPLENS_BASE_URL (tests, offline mirrors)


@dataclass(frozen=True)
class Download:
    """An archive under the GroupLens base URL and the ratings file inside it."""

    file: str
    sha256: str
    member: str
    format: str


DOWNLOADS: dict[str, Download] = {
    "ml-100k": Download(
        "ml-100k.zip", "552a5ef951d45d406608698c107c1dbee3728de63232080ff476df7c88dab3c5", "ml-100k/u.data", "grouplens"
    ),
    # GroupLens publishes only an MD5 for this archive (ml-1m.zip.md5: c4d9eecfca2ab87c1945afe126590906).
    # This SHA-256 is the one the project issue gives; public projects pin the same value,
    # some noting that their archive's MD5 matched GroupLens'. Not recomputed here (no
    # network); were it wrong, the download fails with a checksum error naming both values.
    "ml-1m": Download(
        "ml-1m.zip", "a6898adb50b9ca05aa231689da44c217cb524e7ebd39d264c56e2832f2c54e20", "ml-1m/ratings.dat", "ml-1m"
    ),
}


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch(spec: Download, cache: Path) -> Path:
    """The verified archive in `cache`/downloads, downloading it first if needed.

    The download goes to a temporary file next to the target and is renamed into place
    only after its checksum matches, so the cache never holds a partial or wrong archive.
    """
    target = cache / "downloads" / spec.file
    if target.exists() and _sha256_file(target) == spec.sha256:
        return target
    base = os.environ.get(MIRROR_ENV) or GROUPLENS_BASE_URL
    url = f"{base.rstrip('/')}/{spec.file}"
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{spec.file}.", suffix=".part", dir=target.parent)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != spec.sha256:
            raise UserError(
                f"download {url} has sha256 {digest.hexdigest()}, expected {spec.sha256}; it was discarded "
                f"(if {MIRROR_ENV} is set, check that the mirror serves the GroupLens file)"
            )
        os.replace(tmp, target)
        log.info("downloaded %s to %s", url, target)
    except urllib.error.URLError as exc:
        raise UserError(
            f"cannot download {url}: {getattr(exc, 'reason', exc)}; check the network or set {MIRROR_ENV} "
            f"to a mirror of {GROUPLENS_BASE_URL}"
        ) from None
    except (OSError, TimeoutError) as exc:
        raise UserError(f"cannot download {url} into {target.parent}: {exc}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def grouplens_source(dataset: str) -> Callable[[DataConfig], Source]:
    def resolve(cfg: DataConfig) -> Source:
        # Looked up at call time so tests can swap in a tiny archive and its checksum.
        spec = DOWNLOADS[dataset]
        cache = cache_root(cfg)

        def read() -> tuple[pd.DataFrame, bool]:
            archive = fetch(spec, cache)
            where = f"{archive}!{spec.member}"
            try:
                with zipfile.ZipFile(archive) as zf:
                    data = zf.read(spec.member)
            except (KeyError, zipfile.BadZipFile) as exc:
                raise UserError(f"archive {archive} does not hold {spec.member}: {exc}") from None
            return readers.parse_interactions(data, spec.format, where), True

        return Source(
            name=dataset,
            location=f"{os.environ.get(MIRROR_ENV) or GROUPLENS_BASE_URL}/{spec.file}",
            format=spec.format,
            identity={"kind": "download", "file": spec.file, "sha256": spec.sha256},
            read=read,
        )

    return resolve


# The split a dataset ships with, known from its name or format without reading it, so
# that a model with no split default of its own (popularity) runs on gowalla as it is.
SHIPPED_SPLITS = {"gowalla": "ratio", "lastfm": "ratio", "lightgcn": "ratio"}


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


# ---------------------------------------------------------------------------------------
# Fingerprint and cache


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
        if cfg.split in ("ratio", "loo"):  # loo draws the held-out items at random on unordered data
            split["seed"] = cfg.seed
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
            pd.DataFrame({"user": csr.rows(), "item": csr.items}).to_parquet(tmp / f"{part}.parquet", index=False)
        meta = {
            "name": split.name,
            "n_users": split.n_users,
            "n_items": split.n_items,
            "ordered": split.ordered,
            "fingerprint": split.fingerprint,
            "info": split.info,
            "test_groups": {name: users.tolist() for name, users in split.test_groups.items()},
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
        parts = {}
        for part in PARTS:
            frame = pd.read_parquet(folder / f"{part}.parquet")
            parts[part] = CSR.from_pairs(frame["user"].to_numpy(), frame["item"].to_numpy(), meta["n_users"])
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
        **parts,
    )


# ---------------------------------------------------------------------------------------
# The entry point


def build_split(source: Source, cfg: DataConfig) -> SplitData:
    """Read, preprocess and split `source` (no caching)."""
    if source.read_split is not None:
        split = source.read_split()
        split.info = {"source": source.location, "format": source.format, "synthetic": source.synthetic, **split.info}
    else:
        frame, ordered = source.read()
        data = preprocess(frame, cfg.min_rating, cfg.user_core, cfg.item_core)
        train, valid, test, split_info = split_interactions(
            data, cfg.split, ordered, cfg.seed, cfg.valid_ratio, cfg.test_ratio
        )
        info = {
            "source": source.location,
            "format": source.format,
            "synthetic": source.synthetic,
            "preprocess": {"min_rating": cfg.min_rating, "user_core": cfg.user_core, "item_core": cfg.item_core},
            "counts": data.counts,
            "split": split_info,
        }
        split = SplitData(source.name, data.n_users, data.n_items, train, valid, test, ordered, "", info)
    split.info.update(
        n_users=split.n_users,
        n_items=split.n_items,
        n_interactions=split.train.nnz + split.valid.nnz + split.test.nnz,
        ordered=split.ordered,
    )
    return split


def load_split(cfg: DataConfig) -> SplitData:
    """The preprocessed, split dataset `cfg` describes, from the cache when it has been built before.

    Raises UserError for anything the user can fix (bad name, path, format, columns,
    parameters, unwritable cache, failed download).
    """
    cfg.validate()
    cache = cache_root(cfg)
    source = resolve_source(cfg)
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
