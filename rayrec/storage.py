"""Storage URLs: local paths, file://, s3://, gs:// and any fsspec protocol, one way for all.

Everything rayrec writes outside a trial (run directories, sweep results, Parquet, YAML)
goes through these helpers; the tuning layer hands Ray the same filesystem through
pyarrow's FSSpecHandler (rayrec.tune.storage_handoff.pyarrow_filesystem).

Credentials and endpoints come only from the standard environment of each process
(AWS_ACCESS_KEY_ID/..., AWS_ENDPOINT_URL(_S3), ~/.aws, instance roles,
GOOGLE_APPLICATION_CREDENTIALS); botocore and gcsfs read them themselves. They are never
constructor arguments of a filesystem, so the filesystem Ray pickles into its experiment
state (tuner.pkl, experiment_state-*.json) holds neither, and a URL carrying them is
refused. Ray's trial processes, possibly on other nodes and started before the driver
existed, get the driver's storage variables in memory: the driver puts them in Ray's
key-value store (GCS memory) and the filesystem handle reads them when it is unpickled in
a trial, before Ray's own restore code first touches storage. Not through Ray's
runtime_env, whose values Ray writes into its logs (runtime_env_agent.log).
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import threading
import uuid
from typing import Any, Callable

from rayrec.errors import UserError, first_line

# The variables storage backends read; forwarded to trials, redacted from error messages.
STORAGE_ENV = (
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION",
    "AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "GOOGLE_APPLICATION_CREDENTIALS",
    "GOOGLE_CLOUD_PROJECT", "STORAGE_EMULATOR_HOST",
)
# Checkpoint uploads ride out short outages: botocore retries with exponential back-off
# (standard mode: up to 8 attempts, about half a minute in all) before Ray sees an error.
S3_CONFIG = {"connect_timeout": 10, "read_timeout": 60, "retries": {"max_attempts": 8, "mode": "standard"}}
# The pre-flight probe must fail fast instead: one attempt, short timeouts, and an overall deadline.
PROBE_S3_CONFIG = {"connect_timeout": 3, "read_timeout": 10, "retries": {"max_attempts": 1, "mode": "standard"}}
PROBE_TIMEOUT_S = float(os.environ.get("RAYREC_STORAGE_PROBE_TIMEOUT_S", "20"))

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://(.*)$", re.S)
_ALMOST_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+):/?(?!/)")  # 's3:/b' or 's3:b': a URL missing a slash
_S3_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_GCS_BUCKET = re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$")


def split_url(url: str, probe: bool = False) -> tuple[Any, str]:
    """(fsspec filesystem, path without scheme) for a URL or local path, with clear errors.

    `probe=True` gives a separate, uncached filesystem with bounded retries and timeouts,
    for pre-flight checks that must fail in seconds on an unreachable endpoint.
    """
    import fsspec

    protocol, rest = _parse(url)
    options: dict[str, Any] = {}
    if protocol in ("s3", "s3a"):
        options["config_kwargs"] = dict(PROBE_S3_CONFIG if probe else S3_CONFIG)
    if probe and protocol != "file":
        options["skip_instance_cache"] = True
    try:
        fs, path = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        raise UserError(f"storage protocol '{protocol}' needs a package that is not installed: {exc}") from None
    except (ValueError, TypeError) as exc:
        raise UserError(f"malformed storage URL '{display(url)}': {error_line(exc)}") from None
    if probe and protocol in ("s3", "s3a"):
        fs.retries = 1  # s3fs's own retry loop, on top of botocore's
    return fs, path


def _parse(url: str) -> tuple[str, str]:
    """(protocol, rest); refuses malformed URLs, unknown protocols and URLs carrying secrets."""
    from fsspec.registry import available_protocols, known_implementations

    if not isinstance(url, str) or not url.strip():
        raise UserError(f"storage location must be a path or URL, got {url!r}")
    match = _SCHEME.match(url)
    if not match:
        almost = _ALMOST_URL.match(url)
        if "://" in url or (almost and almost.group(1).lower() in known_implementations):
            raise UserError(f"malformed storage URL '{display(url)}'; expected a local path or SCHEME://bucket/prefix")
        return "file", url
    protocol, rest = match.group(1).lower(), match.group(2)
    if protocol not in known_implementations and protocol not in available_protocols():
        raise UserError(
            f"unknown storage protocol '{protocol}' in '{display(url)}'; valid: a local path, file://, s3://, "
            "gs://, or another fsspec protocol (memory, hdfs, abfs, ...)"
        )
    if protocol in ("file", "local"):
        return "file", rest
    netloc = rest.split("/", 1)[0]
    if "@" in netloc or "?" in rest or "#" in rest:
        raise UserError(
            f"storage URL '{display(url)}' carries credentials or options; give a plain {protocol}://bucket/prefix "
            "and put credentials and endpoints in the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
            "AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS)"
        )
    if not netloc:
        raise UserError(f"malformed storage URL '{display(url)}': no bucket; expected {protocol}://bucket/prefix")
    bucket_rule = {"s3": _S3_BUCKET, "s3a": _S3_BUCKET, "gs": _GCS_BUCKET, "gcs": _GCS_BUCKET}.get(protocol)
    if bucket_rule is not None and not bucket_rule.match(netloc):
        raise UserError(
            f"malformed storage URL '{display(url)}': '{netloc}' is not a valid bucket name "
            "(3-63 lowercase letters, digits, dots and hyphens)"
        )
    return protocol, rest


def display(url: Any) -> str:
    """The URL as it may be shown: no user:password@ part, no query string."""
    text = str(url)
    match = _SCHEME.match(text)
    if not match:
        return text
    rest = match.group(2)
    netloc, _, path = rest.partition("/")
    if "@" in netloc:
        netloc = "***@" + netloc.rsplit("@", 1)[1]
    path = re.split(r"[?#]", path, maxsplit=1)[0]
    shown = f"{match.group(1)}://{netloc}" + (f"/{path}" if path else "")
    return shown + ("?..." if "?" in rest else "")


def is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def local_path(url: str) -> str:
    return url[len("file://"):] if url.startswith("file://") else url


def join(url: str, *parts: str) -> str:
    return "/".join([url.rstrip("/"), *(p.strip("/") for p in parts)])


def to_url(url: str, fs_path: str) -> str:
    """A path on `url`'s filesystem (as Ray reports it, without scheme) as a URL again."""
    if is_local(url):
        return fs_path
    return f"{_parse(url)[0]}://{fs_path.lstrip('/')}"


# --- pre-flight checks ------------------------------------------------------------------
def exists(url: str) -> bool:
    """Whether `url` exists; an unreachable store is a UserError within the probe deadline."""
    _parse(url)

    def check() -> bool:
        fs, path = split_url(url, probe=True)
        return fs.exists(path)

    return _with_deadline(check, url, "reach")


def check_writable(url: str, must_not_exist: bool = False) -> None:
    """Probe that `url` can be written (create, write, read back, delete a small file) before any work starts.

    Each failure is one UserError line: unreachable endpoint, missing bucket, no permission,
    no credentials, or no answer within PROBE_TIMEOUT_S.
    """
    _parse(url)  # a malformed URL fails here, without a thread

    def probe() -> None:
        fs, path = split_url(url, probe=True)  # inside the deadline: some backends connect when built
        if must_not_exist and fs.exists(path):
            raise UserError(f"output '{display(url)}' already exists; choose a new --output or remove it")
        target = f"{path.rstrip('/')}/.rayrec-write-probe-{uuid.uuid4().hex[:8]}"
        if is_local(url):
            # Probe the nearest folder that exists and create none: a command that fails after
            # this check leaves nothing behind (the run or sweep creates its own directory).
            parent = os.path.abspath(path)
            while not os.path.exists(parent):
                parent = os.path.dirname(parent)
            if not os.path.isdir(parent):
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", parent)
            target = os.path.join(parent, os.path.basename(target))
        with fs.open(target, "wb") as fh:
            fh.write(b"ok")
        fs.rm(target)

    _with_deadline(probe, url, "write to")


def _with_deadline(fn: Callable[[], Any], url: str, verb: str) -> Any:
    """Run a storage call in a daemon thread; any failure, or no answer in time, is one UserError line."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - reported below as a UserError
            outcome["error"] = exc

    worker = threading.Thread(target=target, name="rayrec-storage-probe", daemon=True)
    worker.start()
    worker.join(PROBE_TIMEOUT_S)
    if worker.is_alive():
        raise UserError(
            f"storage '{display(url)}' did not answer within {PROBE_TIMEOUT_S:g} s; check the endpoint "
            f"({_endpoint_source(url)}), the credentials and the network"
        )
    if "error" in outcome:
        raise _storage_error(outcome["error"], url, verb) from None
    return outcome.get("value")


def _storage_error(exc: BaseException, url: str, verb: str) -> BaseException:
    if isinstance(exc, UserError):
        return exc
    shown, name = display(url), type(exc).__name__
    text = error_line(exc)
    bucket = _bucket(url)
    if isinstance(exc, FileNotFoundError) or "NoSuchBucket" in text:
        if bucket and ("bucket" in text.lower() or "NoSuchBucket" in text):
            return UserError(f"storage '{shown}': bucket '{bucket}' does not exist; create it or fix the URL")
        return UserError(f"cannot {verb} storage '{shown}': {text}")
    if isinstance(exc, PermissionError) or "AccessDenied" in text or "Forbidden" in text:
        return UserError(
            f"no permission to {verb} storage '{shown}' ({text}); check the credentials "
            "(AWS_* variables, profile or instance role) and the bucket policy"
        )
    if name in ("NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"):
        return UserError(
            f"no credentials for storage '{shown}': set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE "
            "or an instance role (gs://: GOOGLE_APPLICATION_CREDENTIALS)"
        )
    connection = ("EndpointConnectionError", "ConnectTimeoutError", "ConnectionError", "ReadTimeoutError",
                  "ClientConnectorError", "ServerDisconnectedError", "TimeoutError", "gaierror")
    if name in connection or isinstance(exc, (ConnectionError, TimeoutError)):
        return UserError(f"cannot reach storage '{shown}' (endpoint: {_endpoint_source(url)}): {text}")
    return UserError(f"cannot {verb} storage '{shown}': {text}")


def _bucket(url: str) -> str:
    match = _SCHEME.match(url)
    return match.group(2).split("/", 1)[0] if match and not is_local(url) else ""


def _endpoint_source(url: str) -> str:
    """Where the endpoint came from, named by variable: the value itself is never shown."""
    protocol = _SCHEME.match(url).group(1).lower() if _SCHEME.match(url) else "file"
    keys = {"s3": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"), "s3a": ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"),
            "gs": ("STORAGE_EMULATOR_HOST",), "gcs": ("STORAGE_EMULATOR_HOST",)}.get(protocol, ())
    for key in keys:
        if os.environ.get(key):
            return f"from ${key}"
    return "the provider's default"


# --- credentials for trials -------------------------------------------------------------
def storage_environment() -> dict[str, str]:
    """The storage variables of this process (what the driver shares with its trials)."""
    return {key: os.environ[key] for key in STORAGE_ENV if os.environ.get(key)}


def apply_storage_environment(env: dict[str, str] | None) -> None:
    """Set storage variables this process lacks; a node's own settings win over the driver's."""
    for key, value in (env or {}).items():
        if key in STORAGE_ENV and not os.environ.get(key):
            os.environ[key] = value


# --- reading and writing ----------------------------------------------------------------
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
        if os.path.islink(src):  # object stores have no links (W&B's latest-run, debug.log)
            continue
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
        raise UserError(f"file not found: {display(url)}") from None


def plain(obj: Any) -> Any:
    """YAML-safe copy: numpy scalars and arrays to Python values."""
    if isinstance(obj, dict):
        return {str(k): plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return plain(obj.tolist())
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            return obj.item()
        except (ValueError, AttributeError):
            return obj
    return obj


def write_yaml(url: str, obj: Any, header: str = "") -> None:
    """A YAML file, with `header` (lines of text) as a comment block above it when given."""
    import yaml

    comment = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines())
    write_bytes(url, (comment + yaml.safe_dump(obj, sort_keys=False, default_flow_style=False)).encode())


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


def error_line(exc: BaseException) -> str:
    """errors.first_line, with storage variables' values (endpoint, keys) masked: for messages
    and logs about storage and tracking."""
    return redact(first_line(exc))


def redact(text: str) -> str:
    for key in STORAGE_ENV:
        value = os.environ.get(key)
        if value and len(value) >= 4:
            text = text.replace(value, f"${key}")
    return text
