"""Seconds per checkpoint for a SASRec ML-1M-sized model: local disk vs loopback S3, side by side.

    .venv/bin/python bench/checkpoint_io.py --repeats 20

One checkpoint is what a sweep trial does every `checkpoint_every` epochs (rayrec/tune/
trainable.py): `Trainer.state_dict()` -> `save_state` into a temporary directory -> Ray
copies the directory to storage (StorageContext.persist_current_checkpoint, the code path of
`tune.report(checkpoint=...)`). Storage is either a local directory or s3://bucket/prefix on
moto's S3 server on 127.0.0.1 (its own process), reached through the same filesystem rayrec hands Ray
(rayrec.tune.storage_handoff.pyarrow_filesystem: s3fs behind pyarrow's FSSpecHandler). Targets alternate
within each repeat, so both see the same machine load.

The model: SASRec with 3,416 items (ml-1m-gsasrec from ../shared/data, or a synthetic
stand-in of the same size when absent), hidden 64, 2 blocks, max_len 200, after one short
training epoch so the AdamW moments and the best-weights copy exist, as in a real trial.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from machine import load_average, print_machine  # noqa: E402

ML1M_ITEMS = 3416


def build_trainer():
    """A trainer in the state a sweep trial checkpoints: weights, AdamW moments, best weights, history."""
    from rayrec.config import build_config
    from rayrec.data import load_split
    from rayrec.train.trainer import Trainer

    model = {"model.hidden": 64, "model.blocks": 2, "model.max_len": 200, "model.heads": 1}
    train = {"train.epochs": 1, "train.limit_train_batches": 3, "train.device": "cpu", "train.eval_batch_size": 1024}
    try:
        cfg = build_config("sasrec", overrides={"data.name": "ml-1m-gsasrec", **model, **train})
        data = load_split(cfg.data)
    except Exception as exc:  # noqa: BLE001 - the shared datasets may be absent
        print(f"   ml-1m-gsasrec unavailable ({type(exc).__name__}); synthetic data with {ML1M_ITEMS} items")
        cfg = build_config("sasrec", overrides={
            "data.synthetic_users": 2000, "data.synthetic_items": ML1M_ITEMS, "data.synthetic_length": 40,
            "data.item_core": 0, "data.user_core": 0, **model, **train})
        data = load_split(cfg.data)
    trainer = Trainer(cfg, data)
    trainer.fit()
    return trainer, data


def start_s3() -> subprocess.Popen:
    """moto's S3 server in its own process on a free loopback port (so it does not share this
    process's GIL, as a real endpoint would not); the standard AWS variables point at it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1",
                      AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_EC2_METADATA_DISABLED="true")
    import boto3

    deadline = time.time() + 30
    while True:
        try:
            boto3.client("s3").create_bucket(Bucket="rayrec-bench")
            return server
        except Exception:  # noqa: BLE001 - the server is still starting
            if time.time() > deadline:
                server.kill()
                raise
            time.sleep(0.3)


def storage_context(url: str):
    from ray.train._internal.storage import StorageContext

    from rayrec.tune.storage_handoff import pyarrow_filesystem

    fs, path = pyarrow_filesystem(url)
    return StorageContext(storage_path=path, experiment_dir_name="bench", storage_filesystem=fs,
                          trial_dir_name="trial")


def one_checkpoint(trainer, storage, index: int) -> dict[str, float]:
    from ray.tune import Checkpoint

    from rayrec.train.trainer import save_state

    t0 = time.perf_counter()
    state = trainer.state_dict()
    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rayrec-ckpt-") as d:
        path = os.path.join(d, "trainer.pt")
        save_state(state, path)
        size = os.path.getsize(path)
        t2 = time.perf_counter()
        storage.current_checkpoint_index = index
        storage.persist_current_checkpoint(Checkpoint.from_directory(d))
        t3 = time.perf_counter()
    return {"state_dict": t1 - t0, "save": t2 - t1, "upload": t3 - t2, "total": t3 - t0, "mb": size / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import logging

    import ray.train._internal.storage  # noqa: F401 - configures Ray's loggers; quiet them after

    for name in ("ray", "ray.train", "ray.train._internal.storage"):
        logging.getLogger(name).setLevel(logging.WARNING)  # no "Checkpoint successfully created" lines
    info = print_machine("checkpoint I/O: SASRec ML-1M size, local disk vs loopback S3 (moto)")
    import torch

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    trainer, data = build_trainer()
    params = sum(p.numel() for p in trainer.model.parameters())
    print(f"   model: sasrec, {data.n_items} items, hidden 64, 2 blocks, max_len 200, {params:,} parameters")
    server = start_s3()
    local_root = tempfile.mkdtemp(prefix="rayrec-bench-")
    targets = {"local disk": storage_context(local_root), "loopback S3": storage_context("s3://rayrec-bench/ckpt")}
    for storage in targets.values():  # warm-up: connections, first writes
        one_checkpoint(trainer, storage, 0)
    runs: dict[str, list[dict[str, float]]] = {name: [] for name in targets}
    for i in range(1, args.repeats + 1):
        for name, storage in targets.items():
            runs[name].append(one_checkpoint(trainer, storage, i))
    server.terminate()
    server.wait()

    figures = {}
    print(f"   {args.repeats} checkpoints per target, alternating; seconds (median, [min, max]); load {load_average()}")
    print(f"   {'target':<12} {'MB':>6} {'state_dict':>11} {'save':>8} {'upload':>8} {'total':>8}   total range")
    for name, rows in runs.items():
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        lo, hi = min(r["total"] for r in rows), max(r["total"] for r in rows)
        figures[name] = {**{f"median_{k}": v for k, v in med.items()}, "min_total": lo, "max_total": hi}
        print(f"   {name:<12} {med['mb']:>6.1f} {med['state_dict']:>11.4f} {med['save']:>8.4f} {med['upload']:>8.4f} "
              f"{med['total']:>8.4f}   [{lo:.4f}, {hi:.4f}]")
    ratio = figures["loopback S3"]["median_total"] / figures["local disk"]["median_total"]
    print(f"   loopback S3 / local disk: {ratio:.1f}x per checkpoint")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "params": params, "n_items": data.n_items, "repeats": args.repeats,
                       "figures": figures, "load_at_end": load_average()}, fh, indent=2)


if __name__ == "__main__":
    main()
