"""Interaction-file readers: one function per on-disk layout, all returning the same frame.

Every parser returns a pandas DataFrame with columns `user`, `item` (raw ids, any dtype)
and, where the file has them, `timestamp` (float64) and `rating` (float64), rows in file
order. Files are opened through fsspec, so local paths and any URL fsspec understands
(s3://, gs://, https://, ...) work, compressed files (.gz, .bz2, .xz, .zst) included.

Whether the rows carry time order is the format's business: see `is_ordered`.
"""

from __future__ import annotations

import io
import posixpath
from typing import Callable

import numpy as np
import pandas as pd

from rayrec.errors import UserError

STANDARD_COLUMNS = ("user", "item", "timestamp", "rating")
# Formats whose row order is chronological even without a timestamp column.
ORDER_CARRYING_FORMATS = frozenset({"pairs", "sequences", "gsasrec"})
_COMPRESSION_SUFFIXES = (".gz", ".bz2", ".xz", ".zst")


def read_bytes(path: str) -> bytes:
    """The file's (decompressed) bytes; a missing file is the user's mistake, so a UserError."""
    import fsspec

    try:
        with fsspec.open(path, "rb", compression="infer") as fh:
            return fh.read()
    except FileNotFoundError:
        raise UserError(f"data file not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"data path {path} is a directory; expected a file, or data.format set to a folder format") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read data file {path}: {exc}") from None


def _garbled(path: str, fmt: str, layout: str, detail: str = "") -> UserError:
    suffix = f" ({detail})" if detail else ""
    return UserError(f"cannot read {path} as format '{fmt}': expected {layout}{suffix}")


def _numeric(series: pd.Series, column: str, path: str, fmt: str, layout: str) -> pd.Series:
    values = pd.to_numeric(series, errors="coerce")
    if values.isna().any():
        bad = series[values.isna()].iloc[0]
        raise _garbled(path, fmt, layout, f"non-numeric {column} {bad!r}")
    return values.astype(np.float64)


def _timestamps(series: pd.Series, column: str, path: str) -> pd.Series:
    """Numbers as they are; date strings (CSV exports) become seconds since the epoch."""
    values = pd.to_numeric(series, errors="coerce")
    if not values.isna().any():
        return values.astype(np.float64)
    try:
        dates = pd.to_datetime(series, utc=True)
    except (ValueError, TypeError):
        raise UserError(
            f"timestamp column '{column}' in {path} holds {series.iloc[0]!r}; expected numbers or dates"
        ) from None
    return (dates - pd.Timestamp(0, tz="UTC")).dt.total_seconds()


def _fixed_columns(data: bytes, path: str, fmt: str, layout: str, names: tuple[str, ...], sep: str) -> pd.DataFrame:
    """Headerless delimited rows with exactly len(names) fields each."""
    if not data.strip():
        return pd.DataFrame({name: pd.Series(dtype=np.int64) for name in names})
    try:
        # pandas' own type inference: numbers parse at C speed; anything else stays object.
        frame = pd.read_csv(io.BytesIO(data), sep=sep, header=None)
    except (pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise _garbled(path, fmt, layout, str(exc).strip().splitlines()[-1]) from None
    if frame.shape[1] != len(names):
        raise _garbled(path, fmt, layout, f"found {frame.shape[1]} field(s) per row")
    if frame.isna().any(axis=None):
        raise _garbled(path, fmt, layout, "some rows have missing fields")
    frame.columns = list(names)
    for id_column in ("user", "item"):
        frame[id_column] = _ids(frame[id_column])
    for column in ("rating", "timestamp"):
        if column in frame:
            frame[column] = _numeric(frame[column], column, path, fmt, layout)
    return frame


def _ids(series: pd.Series) -> pd.Series:
    """Integer ids where every id is an integer, so re-indexing sorts 2 before 10; else strings."""
    if pd.api.types.is_integer_dtype(series):
        return series.astype(np.int64)
    as_int = pd.to_numeric(series, errors="coerce")
    if as_int.isna().any() or (as_int != np.floor(as_int)).any():
        return series.astype(str)
    return as_int.astype(np.int64)


GROUPLENS_LAYOUT = "tab-separated 'user item rating timestamp' rows without a header (ML-100K u.data)"
ML1M_LAYOUT = "'user::item::rating::timestamp' rows (ML-1M ratings.dat)"
INTER_LAYOUT = (
    "a RecBole .inter file: a tab-separated header such as "
    "'user_id:token item_id:token rating:float timestamp:float', then rows"
)
PAIRS_LAYOUT = "one 'user item' pair per line, whitespace-separated, in time order (SASRec format)"
SEQUENCES_LAYOUT = "one 'user item1 item2 ...' line per user, whitespace-separated, in time order (S3-Rec format)"
CSV_LAYOUT = "a CSV file with a header row naming the columns given in data.columns"
PARQUET_LAYOUT = "a Parquet file with the columns given in data.columns"


def parse_grouplens(data: bytes, path: str, columns: dict[str, str]) -> pd.DataFrame:
    return _fixed_columns(data, path, "grouplens", GROUPLENS_LAYOUT, ("user", "item", "rating", "timestamp"), "\t")


def parse_ml1m(data: bytes, path: str, columns: dict[str, str]) -> pd.DataFrame:
    # '::' would need pandas' slow python engine; as a tab it goes through the C parser.
    data = data.replace(b"::", b"\t")
    return _fixed_columns(data, path, "ml-1m", ML1M_LAYOUT, ("user", "item", "rating", "timestamp"), "\t")


def parse_pairs(data: bytes, path: str, columns: dict[str, str]) -> pd.DataFrame:
    # r"\s+" is special-cased by pandas to the fast C whitespace tokenizer.
    return _fixed_columns(data, path, "pairs", PAIRS_LAYOUT, ("user", "item"), r"\s+")


def parse_sequences(data: bytes, path: str, columns: dict[str, str]) -> pd.DataFrame:
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise _garbled(path, "sequences", SEQUENCES_LAYOUT, "not UTF-8 text") from None
    users: list[str] = []
    items: list[str] = []
    for line in lines:  # per line (one per user), not per interaction
        tokens = line.split()
        if len(tokens) > 1:
            users.extend([tokens[0]] * (len(tokens) - 1))
            items.extend(tokens[1:])
    if not items and data.strip():
        raise _garbled(path, "sequences", SEQUENCES_LAYOUT, "no line has a user followed by items")
    return pd.DataFrame({"user": _ids(pd.Series(users, dtype=str)), "item": _ids(pd.Series(items, dtype=str))})


def parse_inter(data: bytes, path: str, columns: dict[str, str]) -> pd.DataFrame:
    try:
        frame = pd.read_csv(io.BytesIO(data), sep="\t", dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise _garbled(path, "inter", INTER_LAYOUT, str(exc).strip().splitlines()[-1]) from None
    # RecBole headers carry a type after the name ('user_id:token'); the name is what maps.
    frame.columns = [str(c).split(":", 1)[0] for c in frame.columns]
    defaults = {"user": "user_id", "item": "item_id", "timestamp": "timestamp", "rating": "rating"}
    return _select_columns(frame, columns, defaults, path, "inter", INTER_LAYOUT)


def parse_csv(data: bytes, path: str, columns: dict[str, str]) -> pd.DataFrame:
    sep = "\t" if _strip_compression(path).lower().endswith(".tsv") else ","
    try:
        frame = pd.read_csv(io.BytesIO(data), sep=sep, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise _garbled(path, "csv", CSV_LAYOUT, str(exc).strip().splitlines()[-1]) from None
    return _select_columns(frame, columns, {c: c for c in STANDARD_COLUMNS}, path, "csv", CSV_LAYOUT)


def parse_parquet(data: bytes, path: str, columns: dict[str, str]) -> pd.DataFrame:
    import pyarrow as pa

    try:
        frame = pd.read_parquet(io.BytesIO(data))
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _garbled(path, "parquet", PARQUET_LAYOUT, str(exc).strip().splitlines()[-1]) from None
    return _select_columns(frame, columns, {c: c for c in STANDARD_COLUMNS}, path, "parquet", PARQUET_LAYOUT)


def _select_columns(
    frame: pd.DataFrame, columns: dict[str, str], defaults: dict[str, str], path: str, fmt: str, layout: str
) -> pd.DataFrame:
    """Rename the file's columns to user/item/timestamp/rating.

    A column named in data.columns must exist; a default name (e.g. 'timestamp') is used
    only when the file has it, so a CSV without timestamps reads as unordered.
    """
    unknown = set(columns) - set(STANDARD_COLUMNS)
    if unknown:
        raise UserError(f"data.columns has unknown key '{sorted(unknown)[0]}'; valid: {', '.join(STANDARD_COLUMNS)}")
    present = [str(c) for c in frame.columns]
    out = {}
    for key in STANDARD_COLUMNS:
        source = columns.get(key, defaults[key])
        if source in present:
            out[key] = frame[source]
        elif key in ("user", "item") or key in columns:
            where = f"data.columns.{key}='{source}'" if key in columns else f"the {key} column '{source}'"
            raise UserError(f"{where} is not in {path}; columns present: {', '.join(present) or '(none)'}")
    result = pd.DataFrame(out)
    ids = result[["user", "item"]]
    if ids.isna().any(axis=None) or (ids.astype(str) == "").any(axis=None):
        raise _garbled(path, fmt, layout, "some user or item ids are empty")
    for key in ("user", "item"):
        result[key] = _ids(result[key])
    if "rating" in result:
        result["rating"] = _numeric(result["rating"], "rating", path, fmt, layout)
    if "timestamp" in result:
        result["timestamp"] = _timestamps(result["timestamp"], columns.get("timestamp", defaults["timestamp"]), path)
    return result.reset_index(drop=True)


# Format name -> parser of the file's bytes. `path` is only for messages.
PARSERS: dict[str, Callable[[bytes, str, dict[str, str]], pd.DataFrame]] = {
    "grouplens": parse_grouplens,
    "ml-1m": parse_ml1m,
    "inter": parse_inter,
    "pairs": parse_pairs,
    "sequences": parse_sequences,
    "csv": parse_csv,
    "parquet": parse_parquet,
}


def _strip_compression(path: str) -> str:
    for suffix in _COMPRESSION_SUFFIXES:
        if path.lower().endswith(suffix):
            return path[: -len(suffix)]
    return path


def infer_format(path: str) -> str | None:
    """The reader a file name implies, or None where the name is ambiguous (e.g. `.txt`)."""
    name = posixpath.basename(_strip_compression(path.rstrip("/")))
    lower = name.lower()
    if lower == "u.data":
        return "grouplens"
    if lower == "ratings.dat":
        return "ml-1m"
    for suffix, fmt in ((".inter", "inter"), (".csv", "csv"), (".tsv", "csv"), (".parquet", "parquet"), (".pq", "parquet")):
        if lower.endswith(suffix):
            return fmt
    return None


def is_ordered(frame: pd.DataFrame, fmt: str) -> bool:
    """Usable by sequential models: it has timestamps, or its format's row order is time order."""
    return "timestamp" in frame.columns or fmt in ORDER_CARRYING_FORMATS


ITEM_CATEGORIES_LAYOUT = "'item category' lines (space, tab or comma separated), no header"


def parse_item_categories(data: bytes, path: str) -> pd.DataFrame:
    """An item-category file (data.item_categories): columns item and category, both strings."""
    text = data.decode("utf-8", errors="replace")
    rows = [line.replace(",", " ").split() for line in text.splitlines() if line.strip()]
    bad = next((row for row in rows if len(row) != 2), None)
    if bad is not None or not rows:
        detail = f"a line with {len(bad)} fields: {' '.join(bad)!r}" if bad is not None else "no lines"
        raise UserError(f"cannot read {path} as item categories: expected {ITEM_CATEGORIES_LAYOUT} ({detail})")
    return pd.DataFrame(rows, columns=["item", "category"], dtype=str)


def parse_interactions(data: bytes, fmt: str, path: str, columns: dict[str, str] | None = None) -> pd.DataFrame:
    """Parse a file's bytes with the `fmt` parser: columns user, item [, timestamp, rating] in file order."""
    parser = PARSERS.get(fmt)
    if parser is None:
        raise UserError(f"unknown data.format '{fmt}'; valid: {', '.join(sorted(PARSERS))}")
    return parser(data, path, dict(columns or {}))
