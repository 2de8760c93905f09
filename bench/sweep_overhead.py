"""How much of a sweep's wall time goes into training: a 16-trial ASHA sweep on this machine.

    .venv/bin/python bench/sweep_overhead.py --trials 16 --epochs 10 --max-minutes 10

Runs `run_sweep` (what `rayrec sweep` runs) with SASRec on the synthetic dataset, sized so
that a full trial trains for about 20 s on one core (`--calibrate` measures it first), one
CPU per trial, so as many trials run at once as the machine has cores ("slots"). Ray is
started and the data loaded before the clock starts, as on a running cluster.

Printed:
- utilisation = sum over trials of their epoch seconds (training + validation, as the
  trainer measures them) / (sweep wall seconds x slots); also with training seconds only;
- per-trial start overhead = from the moment a slot became free (the previous trial in it
  reported its last epoch, or the sweep started) to the trial's first batch, split into the
  part before the trainable function runs (Ray: scheduling, worker start, imports) and the
  part inside it (building the trainer and model, fetching the data from the object store).
  The first batch is taken as (time the first epoch was reported) - (its epoch seconds).
Targets (issue 3): utilisation >= 0.8 with trials of about 20 s; start overhead <= 3 s.
Figures only, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average, print_machine  # noqa: E402

# SASRec on the synthetic data: about 2 s per epoch on one core of this machine (AMD EPYC;
# 2,000 users took 0.55 s per epoch at load ~4), so a full 10-epoch trial is about 20 s.
DATA = ["data.synthetic_users=7000", "data.synthetic_items=400", "data.synthetic_length=30"]
MODEL = ["model.hidden=32", "model.blocks=1", "model.heads=1", "model.max_len=30", "train.batch_size=128"]
SPACE = {  # shapes fixed, so every full trial costs the same
    "model": "sasrec",
    "fixed": {"train.patience": 100},
    "params": {"train.lr": {"dist": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
               "model.dropout": {"dist": "uniform", "low": 0.1, "high": 0.5}},
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=16)
    p.add_argument("--epochs", type=int, default=10, help="ASHA max epochs per trial (default 10)")
    p.add_argument("--grace-period", type=int, default=2)
    p.add_argument("--reduction-factor", type=float, default=2)
    p.add_argument("--cpus-per-trial", type=float, default=1.0)
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="e.g. 0.25: four trials share one GPU")
    p.add_argument("--max-minutes", type=float, default=10.0, help="Tune time budget for the whole sweep")
    p.add_argument("--calibrate", action="store_true", help="first time one epoch of the trial's config on one thread")
    p.add_argument("--no-reuse-actors", dest="reuse_actors", action="store_false",
                   help="run with Tune's reuse_actors=False (rayrec's sweeps use True) to see what starting a"
                        " fresh worker process per trial costs")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override key=value")
    p.add_argument("--json", help="also write the figures to this JSON file")
    return p.parse_args(argv)


def calibrate(sets: list[str], threads: int) -> float:
    import torch

    from rayrec.config import build_config, parse_overrides
    from rayrec.data import load_split
    from rayrec.train.trainer import Trainer

    torch.set_num_threads(threads)
    cfg = build_config("sasrec", overrides={**parse_overrides(sets), "train.epochs": 3, "train.device": "cpu",
                                            "train.num_threads": threads})
    trainer = Trainer(cfg, load_split(cfg.data))
    trainer.fit()
    seconds = [r["epoch_seconds"] for r in trainer.history]
    print(f"   calibration: epoch seconds {', '.join(f'{s:.2f}' for s in seconds)} on {threads} thread(s)", flush=True)
    return min(seconds)


def run(args: argparse.Namespace) -> dict:
    import yaml

    from rayrec.config import build_config, parse_overrides
    from rayrec.data import load_split
    from rayrec.tune import sweep
    from rayrec.tune.sweep import SweepOptions, connect_ray, run_sweep

    sweep.REUSE_ACTORS = args.reuse_actors
    machine = print_machine(f"{args.trials}-trial ASHA sweep overhead (reuse_actors={args.reuse_actors})")
    sets = DATA + MODEL + args.sets
    threads = max(1, int(round(args.cpus_per_trial)))
    if args.calibrate:
        epoch = calibrate(sets, threads)
        print(f"   a full trial ({args.epochs} epochs) ~ {epoch * args.epochs:.0f} s", flush=True)
    import ray

    connect_ray(None, verbose=0)
    resources = ray.cluster_resources()
    slots = int(resources.get("CPU", 1) // args.cpus_per_trial)
    if args.gpus_per_trial > 0:
        slots = min(slots, int(resources.get("GPU", 0) // args.gpus_per_trial))
    data = load_split(build_config("sasrec", overrides=parse_overrides(sets)).data)
    with tempfile.TemporaryDirectory(prefix="rayrec-bench-") as storage:
        space = os.path.join(storage, "space.yaml")
        with open(space, "w") as fh:
            yaml.safe_dump(SPACE, fh)
        opts = SweepOptions(
            model="sasrec", name="overhead", storage=storage, space=space, sets=sets, search="random",
            scheduler="asha", num_samples=args.trials, max_epochs=args.epochs, grace_period=args.grace_period,
            reduction_factor=args.reduction_factor, cpus_per_trial=args.cpus_per_trial,
            gpus_per_trial=args.gpus_per_trial, wandb="off", verbose=0,
            evaluate_test=False, seed=0,
        )
        load_start = load_average()
        t0 = time.time()
        result = run_sweep(opts, data=data)
        wall = time.time() - t0
    history, trials = result.history, result.trials
    per_trial = trial_timings(history, t0, slots)
    busy, training = per_trial["epoch_seconds"].sum(), per_trial["train_seconds"].sum()
    span = per_trial["end"].max() - t0
    full = per_trial[per_trial["epochs"] >= args.epochs]
    out = {
        "machine": machine, "command": " ".join(sys.argv), "trials": len(trials), "slots": slots,
        "reuse_actors": args.reuse_actors,
        "status": trials["status"].value_counts().to_dict(), "epochs_total": int(per_trial["epochs"].sum()),
        "full_trial_seconds": float(full["epoch_seconds"].mean()) if len(full) else float("nan"),
        "wall_seconds": wall, "trials_span_seconds": span,
        "utilisation": busy / (wall * slots), "utilisation_train_only": training / (wall * slots),
        "utilisation_over_trials_span": busy / (span * slots),
        "start_overhead_mean": float(per_trial["start_overhead"].mean()),
        "start_overhead_median": float(per_trial["start_overhead"].median()),
        "start_overhead_max": float(per_trial["start_overhead"].max()),
        "before_trainable_mean": float(per_trial["before_trainable"].mean()),
        "inside_trainable_mean": float(per_trial["inside_trainable"].mean()),
        "load_at_start": load_start, "load_at_end": load_average(),
    }
    print(f"== {out['trials']} trials, {slots} slots ({args.cpus_per_trial:g} CPU each), ASHA max {args.epochs} epochs,"
          f" grace {args.grace_period}, reduction {args.reduction_factor:g}: {out['status']}")
    print(f"   {out['epochs_total']} epochs in all; a full trial trained for {out['full_trial_seconds']:.1f} s"
          f" ({len(full)} full trials)")
    print(f"   wall {wall:.1f} s (trials' span {span:.1f} s); trial busy seconds {busy:.1f} (training only {training:.1f})")
    print(f"   utilisation {out['utilisation']:.2f} (training only {out['utilisation_train_only']:.2f};"
          f" over the trials' span {out['utilisation_over_trials_span']:.2f})   target >= 0.8")
    print(f"   start overhead per trial: mean {out['start_overhead_mean']:.2f} s, median {out['start_overhead_median']:.2f} s,"
          f" max {out['start_overhead_max']:.2f} s   target <= 3 s")
    print(f"     of which before the trainable runs (Ray) {out['before_trainable_mean']:.2f} s,"
          f" inside it (trainer, model, data) {out['inside_trainable_mean']:.2f} s (means)")
    print(f"   load average: start {load_start}, end {out['load_at_end']}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(out, fh, indent=1, default=str)
    return out


def trial_timings(history, t0: float, slots: int):
    """Per trial (from a sweep's history.parquet frame): start, end, epochs, busy seconds and the
    start overhead (a slot becoming free -> the trial's first batch), split into the part before
    the trainable function runs and the part inside it. Trials take slots in start order; a slot
    frees when its trial reports its last epoch."""
    per_trial = history.groupby("trial_id").agg(
        started=("trial_started", "min"), end=("reported_at", "max"), epochs=("epoch", "max"),
        epoch_seconds=("epoch_seconds", "sum"), train_seconds=("train_seconds", "sum"),
    )
    first = history.sort_values("epoch").groupby("trial_id").first()
    per_trial["first_batch"] = first["reported_at"] - first["epoch_seconds"]
    per_trial = per_trial.sort_values("started")
    free = sorted([t0] * slots)
    waits = []
    for _, row in per_trial.iterrows():
        slot_free = free.pop(0)
        waits.append(max(row["started"] - slot_free, 0.0))
        free = sorted(free + [row["end"]])
    per_trial["before_trainable"] = waits
    per_trial["inside_trainable"] = per_trial["first_batch"] - per_trial["started"]
    per_trial["start_overhead"] = per_trial["before_trainable"] + per_trial["inside_trainable"]
    return per_trial


if __name__ == "__main__":
    run(parse_args())
