"""Reading a W&B offline run back, for the tracking tests: wandb 0.31 has no Python reader
for its transaction log (`run-<id>.wandb`), so this is one."""

from __future__ import annotations

import os
import struct
from typing import Any


def read_offline_run(run_dir: str) -> dict[str, Any]:
    """A W&B offline run as plain data, read from its own transaction log (`run-<id>.wandb`).

    wandb 0.31 writes config, history and summary only there (a LevelDB-style log of
    protobuf records); there is no Python reader in the package any more, so this is one:
    {'id', 'group', 'name', 'tags', 'config', 'config_updates', 'history', 'summary'}.
    """
    import glob
    import json

    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = glob.glob(os.path.join(run_dir, "run-*.wandb"))
    out: dict[str, Any] = {"config": {}, "config_updates": 0, "history": [], "summary": {}}
    for data in _log_records(path):
        record = pb.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
            out.update(id=run.run_id, group=run.run_group, name=run.display_name, tags=list(run.tags),
                       project=run.project, job_type=run.job_type, sweep_id=run.sweep_id)
            out["config"].update({i.key: json.loads(i.value_json) for i in run.config.update})
        elif kind == "config":
            out["config_updates"] += 1
            out["config"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                  for i in record.config.update})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                   for i in record.summary.update})
    out["config"] = {k: (v.get("value") if isinstance(v, dict) and "value" in v else v)
                     for k, v in out["config"].items() if k != "_wandb"}
    return out


def _log_records(path: str):
    """Payloads of a LevelDB-format log: 32 KiB blocks of (crc32, length, type) chunks, after W&B's 7-byte header."""
    block = 32768
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B transaction log")
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == 1:  # FULL
            yield chunk
        elif kind == 2:  # FIRST
            pending = chunk
        elif kind == 3:  # MIDDLE
            pending += chunk
        elif kind == 4:  # LAST
            yield pending + chunk
            pending = b""
