"""Seconds per training epoch of one model and dataset with whatever rayrec is on PYTHONPATH.

For side-by-side comparisons of two versions of the code (an old commit checked out in a
git worktree against the current tree), run in alternating processes so both see the same
machine state:

    git worktree add /tmp/rayrec-old 2c89edf
    for code in /tmp/rayrec-old $PWD /tmp/rayrec-old $PWD; do
        PYTHONPATH=$code .venv/bin/python bench/epoch_seconds.py sasrec --data beauty --set model.max_len=50
    done

Each process times `Trainer.train_epoch` (batch building included, as in a run) for
`--epochs` epochs and prints one JSON line: the code's location, the seconds of each
epoch, the machine and the load average. Only the train epoch is timed, never the
validation. Settings not given are the version's own defaults.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--data", required=True)
    parser.add_argument("--set", dest="sets", action="append", default=[], help="key=value override")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    import rayrec
    from rayrec.config import build_config, parse_overrides
    from rayrec.data import load_split
    from rayrec.train.trainer import Trainer

    overrides = {"data.name": args.data, "train.num_threads": args.threads, **parse_overrides(args.sets)}
    cfg = build_config(args.model, overrides=overrides)
    data = load_split(cfg.data)
    trainer = Trainer(cfg, data)
    torch.set_num_threads(args.threads)
    seconds = []
    for epoch in range(1, args.epochs + 1):
        start = time.perf_counter()
        trainer.train_epoch(epoch)
        seconds.append(round(time.perf_counter() - start, 2))
    print(json.dumps({"code": os.path.dirname(os.path.dirname(rayrec.__file__)), "model": args.model, "data": args.data,
                      "sets": args.sets, "epoch_seconds": seconds, "load": load_average()}), flush=True)


if __name__ == "__main__":
    main()
