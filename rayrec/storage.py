"""Storage URLs: local paths, file://, s3://, gs:// and any fsspec protocol, one way for all.

Everything rayrec writes outside a trial (run directories, sweep results, Parquet, YAML)
goes through these helpers; the tuning layer hands Ray the same filesystem through
pyarrow's FSSpecHandler (`pyarrow_filesystem`). Credentials and endpoints come from the
standard environment (AWS_*, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS) and never
from a URL written into results.
"""

from __future__ import annotations

import io
import os
import shutil
import uuid
from typing import Any

from rayrec.errors import UserError


def split_url(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path without scheme) for a URL or local path, with clear errors."""
    import fsspec
    from fsspec.registry import known_implementations

    if not url or not isinstance(url, str):
        raise UserError(f"storage location must be a path or URL, got {url!r}")
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    if "://" in url and (not protocol or not protocol.replace("+", "").replace("-", "").isalnum()):
        raise UserError(f"malformed storage URL '{url}'; expected a path or SCHEME://bucket/prefix")
    if protocol not in known_implementations and protocol not in fsspec.available_protocols():
        raise UserError(
            f"unknown storage protocol '{protocol}' in '{url}'; valid: a local path, file://, s3://, gs://, "
            "or another fsspec protocol"
        )
    options = {}
    if protocol == "s3":
        # S3-compatible stores (MinIO, moto, R2) are reached through the standard AWS endpoint variable.
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            options["endpoint_url"] = endpoint
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise UserError(f"storage protocol '{protocol}' needs a package that is not installed: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"malformed storage URL '{url}': {exc}") from None
    if protocol != "file" and not path.strip("/"):
        raise UserError(f"storage URL '{url}' names no bucket; expected {protocol}://bucket/prefix")
    return fs, path


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def exists(url: str) -> bool:
    fs, path = split_url(url)
    try:
        return fs.exists(path)
    except Exception as exc:  # network and permission errors from any backend
        raise UserError(f"cannot reach storage '{url}': {_short(exc)}") from None


def check_writable(url: str, must_not_exist: bool = False) -> None:
    """Probe that `url` can be written (create, write, delete a small file) before any work starts."""
    fs, path = split_url(url)
    try:
        if must_not_exist and fs.exists(path):
            raise UserError(f"output '{url}' already exists; choose a new --output or remove it")
        probe = f"{path.rstrip('/')}/.rayrec-write-probe-{uuid.uuid4().hex[:8]}"
        if is_local(url):
            # Create only the parent: the final directory appears when the run is published.
            parent = os.path.dirname(os.path.abspath(path)) or "."
            os.makedirs(parent, exist_ok=True)
            probe = os.path.join(parent, os.path.basename(probe))
        with fs.open(probe, "wb") as fh:
            fh.write(b"ok")
        fs.rm(probe)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"cannot write to storage '{url}': {_short(exc)}") from None


def publish_dir(local_dir: str, url: str) -> None:
    """Copy a finished local directory to `url` so that readers never see it half-written.

    Locally the copy goes to a hidden sibling and is renamed into place (atomic on one
    filesystem). Object stores have no rename; files are uploaded and the directory is
    complete when its last file lands, which callers mark by writing summary files last.
    """
    if is_local(url):
        final = os.path.abspath(local_path(url))
        os.makedirs(os.path.dirname(final), exist_ok=True)
        staging = os.path.join(os.path.dirname(final), f".{os.path.basename(final)}.partial-{uuid.uuid4().hex[:8]}")
        shutil.copytree(local_dir, staging)
        if os.path.exists(final):
            # Only reached when the caller allows replacing (sweep result files); keep it atomic per file.
            for name in os.listdir(staging):
                os.replace(os.path.join(staging, name), os.path.join(final, name))
            shutil.rmtree(staging)
        else:
            os.rename(staging, final)
        return
    fs, path = split_url(url)
    names = sorted(os.listdir(local_dir), key=lambda n: n.startswith("summary"))
    for name in names:
        src = os.path.join(local_dir, name)
        if os.path.isdir(src):
            fs.put(src, f"{path}/{name}", recursive=True)
        else:
            fs.put_file(src, f"{path}/{name}")


def write_bytes(url: str, data: bytes) -> None:
    """Write a file; local writes go through a temporary name and an atomic rename."""
    if is_local(url):
        final = local_path(url)
        os.makedirs(os.path.dirname(os.path.abspath(final)), exist_ok=True)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as fh:
            fh.write(data)
        os.replace(tmp, final)
        return
    fs, path = split_url(url)
    with fs.open(path, "wb") as fh:
        fh.write(data)


def read_bytes(url: str) -> bytes:
    fs, path = split_url(url)
    try:
        with fs.open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        raise UserError(f"file not found: {url}") from None


def write_yaml(url: str, obj: Any) -> None:
    import yaml

    write_bytes(url, yaml.safe_dump(obj, sort_keys=False, default_flow_style=False).encode())


def read_yaml(url: str) -> Any:
    import yaml

    return yaml.safe_load(read_bytes(url))


def write_parquet(url: str, rows: list[dict[str, Any]] | Any) -> None:
    """Rows (list of dicts) or a DataFrame to Parquet."""
    import pandas as pd

    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write_bytes(url, buf.getvalue())


def read_parquet(url: str):
    import pandas as pd

    return pd.read_parquet(io.BytesIO(read_bytes(url)))


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem, path without scheme) for Ray's `storage_filesystem`/`storage_path`.

    Ray is handed the same fsspec filesystem rayrec uses, wrapped by FSSpecHandler, so one
    set of credentials and endpoint settings serves both (ray-notes §2).
    """
    import pyarrow.fs

    fs, path = split_url(url)
    if is_local(url):
        return None, os.path.abspath(local_path(url))
    return pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs)), path


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
