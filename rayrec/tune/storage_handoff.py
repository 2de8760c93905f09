"""The storage hand-off to Ray: the filesystem Ray Tune writes checkpoints and results with,
and the storage credentials its trial processes need, kept out of Ray's logs.

rayrec.storage (no Ray) resolves URLs and credentials for everything rayrec writes itself;
this module is where those meet Ray, so Ray stays inside rayrec.tune.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import pyarrow.fs

from rayrec.storage import _parse, apply_storage_environment, is_local, local_path, split_url, storage_environment

KV_NAMESPACE = "rayrec"


class RayStorageHandler(pyarrow.fs.FSSpecHandler):
    """FSSpecHandler that pickles as (filesystem class, its non-secret options, a store key).

    Unpickled inside a Ray worker, it first applies the driver's storage variables from
    Ray's key-value store, then rebuilds the filesystem, which reads them when it connects.
    """

    def __init__(self, fs, env_key: str):
        super().__init__(fs)
        self.env_key = env_key

    def __reduce__(self):
        return _rebuild_handler, (type(self.fs), dict(self.fs.storage_options), self.env_key)


def _rebuild_handler(cls, options: dict[str, Any], env_key: str) -> RayStorageHandler:
    apply_storage_environment(_shared_environment(env_key))
    return RayStorageHandler(cls(**options), env_key)


def share_storage_environment(env_key: str) -> None:
    """Driver side: put this process's storage variables where trial processes read them.

    A no-op outside Ray. The latest driver for a bucket wins, so a resume with rotated
    credentials hands its trials the new ones.
    """
    env = storage_environment()
    kv = _ray_kv()
    if kv is not None and env:
        kv._internal_kv_put(env_key, json.dumps(env), overwrite=True, namespace=KV_NAMESPACE)


def _shared_environment(env_key: str) -> dict[str, str]:
    kv = _ray_kv()
    if kv is None:
        return {}
    try:
        raw = kv._internal_kv_get(env_key, namespace=KV_NAMESPACE)
    except Exception:  # noqa: BLE001 - without it, the node's own settings are used
        return {}
    return json.loads(raw) if raw else {}


def _keep_credentials_out_of_ray_logs() -> None:
    """Stop Ray Tune from copying the driver's AWS keys into every trial's runtime_env.

    Ray Tune does that (ray/tune/execution/class_cache.py, ENV_VARS_TO_PROPAGATE), and Ray's
    runtime_env agent writes runtime_env values to runtime_env_agent.log. rayrec's trials get
    the keys from the key-value store instead (RayStorageHandler), or from their node.
    """
    if "ray" not in sys.modules:
        return
    try:
        from ray.tune.execution import class_cache
    except ImportError:
        return
    secrets = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN"}
    propagated = getattr(class_cache, "ENV_VARS_TO_PROPAGATE", None)
    if isinstance(propagated, (set, frozenset)) and propagated & secrets:
        class_cache.ENV_VARS_TO_PROPAGATE = set(propagated) - secrets


def _ray_kv():
    """Ray's internal key-value store when this process is connected to Ray (never imports Ray)."""
    if "ray" not in sys.modules:
        return None
    try:
        from ray.experimental import internal_kv
    except ImportError:
        return None
    return internal_kv if internal_kv._internal_kv_initialized() else None


def pyarrow_filesystem(url: str):
    """(pyarrow filesystem, path without scheme) for Ray's `storage_filesystem`/`storage_path`.

    Ray is handed the same fsspec filesystem rayrec uses, wrapped by FSSpecHandler, so one
    set of settings serves both (ray-notes §2); the driver's storage variables are shared
    with the trials (RayStorageHandler). Local paths go to Ray as plain absolute paths (None
    filesystem): Ray's own local filesystem, which it also uses to restore.
    """
    fs, path = split_url(url)
    _keep_credentials_out_of_ray_logs()
    if is_local(url):
        return None, os.path.abspath(local_path(url))
    protocol, rest = _parse(url)
    env_key = f"storage-env:{protocol}://{rest.split('/', 1)[0]}"
    share_storage_environment(env_key)
    return pyarrow.fs.PyFileSystem(RayStorageHandler(fs, env_key)), path
