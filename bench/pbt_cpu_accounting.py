"""Ray's CPU accounting after PBT sweeps: how many CPUs Ray still counts as in use once a
synchronous PBT sweep has ended (every placement group removed, every trial actor dead),
with Tune's actor reuse on (rayrec's default) or off.

    .venv/bin/python bench/pbt_cpu_accounting.py --sweeps 4            # reuse on
    .venv/bin/python bench/pbt_cpu_accounting.py --sweeps 3 --no-reuse

Seen with Ray 2.60 (docs/benchmarks.md): with reuse, about half of the sweeps leave one
trial's bundle (0.5 CPU here) counted as used, not growing with more sweeps; without reuse,
none, but the tiny sweeps take 1.8x longer. The sweeps are the PBT test's (tests/test_sweep.py).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from machine import load_average, print_machine  # noqa: E402
from ray_pbt_leak import settled_cluster  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweeps", type=int, default=4)
    p.add_argument("--trials", type=int, default=4, help="trials per sweep, 0.5 CPU each, on 4 logical CPUs")
    p.add_argument("--no-reuse", action="store_true", help="Tune's reuse_actors off")
    p.add_argument("--settle-s", type=float, default=30.0, help="how long to wait for the CPUs after each sweep")
    args = p.parse_args()
    print_machine("Ray's CPU accounting after PBT sweeps")

    import ray

    import rayrec.tune.sweep as sweep_module
    from conftest import TINY, tiny_space
    from rayrec.tune.sweep import SweepOptions, run_sweep

    sweep_module.REUSE_ACTORS = not args.no_reuse
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    lr = {"dist": "loguniform", "low": 1e-4, "high": 3e-2}
    wd = {"dist": "loguniform", "low": 1e-3, "high": 0.3}
    for i in range(args.sweeps):
        tmp = Path(tempfile.mkdtemp(prefix="rayrec-pbt-bench-"))
        space = tiny_space(tmp, {"train.lr": lr, "train.weight_decay": wd}, mutate=["train.lr", "train.weight_decay"])
        start = time.perf_counter()
        run_sweep(SweepOptions(
            model="sasrec", storage=str(tmp / "sweeps"), sets=list(TINY), wandb="off", cpus_per_trial=0.5, verbose=0,
            space=space, name="pbt", search="random", scheduler="pbt", num_samples=args.trials, max_epochs=6,
            perturbation_interval=2, quantile_fraction=0.25, pbt_synch=True, seed=1 + i))
        seconds = time.perf_counter() - start
        free, groups, actors = settled_cluster(ray, 4, args.settle_s)
        print(f"sweep {i + 1}: {seconds:5.1f} s; reuse {not args.no_reuse}; CPU free after {args.settle_s:.0f} s: "
              f"{free} of 4; live placement groups {groups}, live actors {actors}; "
              f"load {load_average()}", flush=True)


if __name__ == "__main__":
    main()
