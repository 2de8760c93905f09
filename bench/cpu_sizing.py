"""How to size sweep trials on a CPU-only machine: threads per trial versus trials in parallel.

    .venv/bin/python bench/cpu_sizing.py                     # SASRec on ml-1m-gsasrec and on the synthetic data
    .venv/bin/python bench/cpu_sizing.py --steps 12 --cases synthetic

For each case, the machine's cores are used two ways, each for the same number of
training steps per trial: ONE trial with all cores as torch threads (`--cpus-per-trial
<cores>`), and one trial PER CORE with one thread each, all running at once
(`--cpus-per-trial 1`). The figure that decides a sweep is the machine's total training
throughput (positions per second, summed over the trials running at once). Trials are
separate processes, as in a sweep. Figures only; the machine and load average are printed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average, print_machine  # noqa: E402

CASES = {
    # The ML-1M recipe (d=64, 2 blocks, length 200) and a small sweep-sized model.
    "ml-1m": {"data.name": "ml-1m-gsasrec"},
    "synthetic": {"data.name": "synthetic", "data.synthetic_users": 7000, "model.hidden": 32, "model.blocks": 1,
                  "model.max_len": 30},
}


def trial(overrides: dict, threads: int, steps: int, queue) -> None:
    """One 'trial': `steps` SASRec training steps with `threads` torch threads."""
    import numpy as np
    import torch

    from rayrec.config import build_config
    from rayrec.data import load_split
    from rayrec.train.evaluate import batch_to_device
    from rayrec.train.trainer import Trainer

    torch.set_num_threads(threads)
    cfg = build_config("sasrec", overrides={**overrides, "train.device": "cpu", "train.num_threads": threads})
    data = load_split(cfg.data)
    trainer = Trainer(cfg, data)
    rng = np.random.default_rng(0)
    batches = list(trainer.model.train_batches(data, cfg.train.batch_size, rng, bucket_batches=cfg.train.bucket_batches))
    batches = (batches * (1 + steps // len(batches)))[: steps + 2]
    trainer.model.train()
    for b in batches[:2]:  # warm-up
        trainer._step(batch_to_device(b, "cpu"))
    positions = sum(int(((b["seq"] != 0).sum(1) - 1).clip(min=0).sum()) for b in batches[2:])
    start = time.perf_counter()
    for b in batches[2:]:
        trainer._step(batch_to_device(b, "cpu"))
    queue.put((positions, time.perf_counter() - start))


def measure(overrides: dict, trials: int, threads: int, steps: int) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=trial, args=(overrides, threads, steps, queue)) for _ in range(trials)]
    for p in procs:
        p.start()
    results = [queue.get() for _ in procs]
    for p in procs:
        p.join()
    per_trial = [pos / sec for pos, sec in results]
    return {"trials": trials, "threads": threads, "per_trial_positions_per_s": per_trial,
            "total_positions_per_s": sum(per_trial), "seconds": max(sec for _, sec in results)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", default="ml-1m,synthetic", help=f"comma-separated: {', '.join(CASES)}")
    p.add_argument("--steps", type=int, default=20, help="timed training steps per trial (default 20)")
    p.add_argument("--json", help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    machine = print_machine(f"trial sizing on {cores} cores")
    rows = []
    for name in args.cases.split(","):
        for trials, threads in ((1, cores), (cores, 1)):
            r = measure(CASES[name], trials, threads, args.steps)
            r.update(case=name, load=load_average())
            rows.append(r)
            print(f"   {name:10s} {trials} trial(s) x {threads} thread(s): total {r['total_positions_per_s']:>9,.0f}"
                  f" positions/s (per trial {', '.join(f'{x:,.0f}' for x in r['per_trial_positions_per_s'])})"
                  f"  load {r['load']}", flush=True)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "command": " ".join(sys.argv), "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
