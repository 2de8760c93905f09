"""Time to quality: wall-clock seconds until validation NDCG@10 first reaches 90% of a run's best.

    .venv/bin/python bench/time_to_quality.py --data beauty
    .venv/bin/python bench/time_to_quality.py --data beauty --grid 128:1e-3,256:2e-3,512:2e-3

Throughput is not time to quality (field-lessons §13): a bigger batch gives more positions
per second but fewer optimiser steps per epoch. Each grid point (batch size : learning rate)
trains SASRec with the default recipe (constant lr after a one-epoch warm-up, early
stopping with patience 10) to early stopping, one after another in this process, and
reports: the best validation NDCG@10 and its epoch, and the wall-clock seconds (training +
validation, as the trainer measures them) until the validation curve first reached 90% of
that run's best, and of the first run's best (the reference, batch 128 at lr 1e-3). The
whole curve goes into --json. Figures only; the machine and load average are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average, print_machine  # noqa: E402


def seconds_to(curve: list[tuple[float, float]], level: float) -> float:
    """Cumulative seconds at the first epoch whose value reaches `level` (NaN if none)."""
    return next((t for t, v in curve if v >= level), float("nan"))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="beauty")
    p.add_argument("--model", default="sasrec")
    p.add_argument("--grid", default="128:1e-3,256:2e-3,512:2e-3,64:1e-3",
                   help="batch:lr points; the first is the reference (default %(default)s)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra override key=value")
    p.add_argument("--json", help="also write the figures and curves to this JSON file")
    args = p.parse_args(argv)

    import torch

    from rayrec.config import build_config, parse_overrides
    from rayrec.data import load_split
    from rayrec.train.trainer import Trainer

    machine = print_machine(f"time to quality: {args.model} on {args.data}")
    runs = []
    for point in args.grid.split(","):
        batch, lr = point.split(":")
        cfg = build_config(args.model, overrides={
            "data.name": args.data, "train.batch_size": int(batch), "train.lr": float(lr), "train.seed": args.seed,
            "train.device": "cpu", "train.num_threads": torch.get_num_threads(), **parse_overrides(args.sets)})
        data = load_split(cfg.data)
        fit = Trainer(cfg, data).fit()
        clock, curve = 0.0, []
        for r in fit.history:
            clock += r["epoch_seconds"]
            curve.append((clock, r["val_ndcg@10"]))
        best = max(v for _, v in curve)
        run = {"batch_size": int(batch), "lr": float(lr), "epochs": fit.epochs_run, "best_epoch": fit.best_epoch,
               "best_val_ndcg@10": best, "seconds_total": clock, "seconds_to_90pct_own_best": seconds_to(curve, 0.9 * best),
               "curve": curve, "load": load_average()}
        runs.append(run)
        ref_best = runs[0]["best_val_ndcg@10"]
        run["seconds_to_90pct_reference_best"] = seconds_to(curve, 0.9 * ref_best)
        print(f"   batch {batch:>4} lr {float(lr):.0e}: best val ndcg@10 {best:.4f} at epoch {fit.best_epoch}"
              f" ({fit.epochs_run} run, {clock:.0f} s); 90% of own best after {run['seconds_to_90pct_own_best']:.0f} s,"
              f" 90% of the reference's best after {run['seconds_to_90pct_reference_best']:.0f} s  load {run['load']}",
              flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "command": " ".join(sys.argv), "runs": runs}, fh, indent=1)


if __name__ == "__main__":
    main()
