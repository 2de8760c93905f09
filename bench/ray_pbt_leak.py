"""Ray alone, without rayrec: does a synchronous PBT sweep with reused actors leave a trial's
CPUs counted as in use after it ended? (`bench/pbt_cpu_accounting.py` saw it through rayrec.)

    .venv/bin/python bench/ray_pbt_leak.py --sweeps 6
    .venv/bin/python bench/ray_pbt_leak.py --sweeps 6 --no-reuse
    .venv/bin/python bench/ray_pbt_leak.py --sweeps 6 --scheduler pbt-async      # or fifo (--trials 16 to reuse)

A plain Tune function trainable (a sleep per iteration, a checkpoint each, restore from the
checkpoint PBT hands it), 4 trials at 0.5 CPU on a local Ray of 4 logical CPUs: the shape of
the PBT test. After each sweep it waits up to `--settle-s` for every CPU to be free and
prints what Ray still counts, with its placement groups and live actors. Meant as the
reproducer of an upstream report; it prints figures and decides nothing.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average, print_machine  # noqa: E402


def settled_cluster(ray, cpus: float, settle_s: float) -> tuple[float, int, int]:
    """After up to `settle_s` for `cpus` CPUs to be free: (CPUs free, placement groups not
    removed, actors alive)."""
    from ray._private import state

    deadline = time.monotonic() + settle_s
    while time.monotonic() < deadline and ray.available_resources().get("CPU", 0) < cpus:
        time.sleep(0.5)
    groups = sum(g["state"] != "REMOVED" for g in ray.util.placement_group_table().values())
    actors = sum(a["State"] != "DEAD" for a in state.actors().values())
    return ray.available_resources().get("CPU", 0), groups, actors


def trainable(config):
    import json

    from ray import tune

    start = 0
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d, open(os.path.join(d, "state.json")) as f:
            start = json.load(f)["step"]
    for step in range(start + 1, config["steps"] + 1):
        time.sleep(config["step_s"])
        with tempfile.TemporaryDirectory() as d:
            with open(os.path.join(d, "state.json"), "w") as f:
                json.dump({"step": step}, f)
            tune.report({"score": config["lr"] * step, "step": step}, checkpoint=tune.Checkpoint.from_directory(d))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sweeps", type=int, default=6)
    p.add_argument("--trials", type=int, default=4, help="trials per sweep, 0.5 CPU each, on 4 logical CPUs")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--step-s", type=float, default=0.3, help="seconds per iteration")
    p.add_argument("--no-reuse", action="store_true", help="reuse_actors off")
    p.add_argument("--scheduler", choices=["pbt", "pbt-async", "fifo"], default="pbt",
                   help="synchronous PBT (the case seen), asynchronous PBT, or no scheduler")
    p.add_argument("--settle-s", type=float, default=30.0)
    args = p.parse_args()
    print_machine("Ray alone: CPUs counted after synchronous PBT sweeps")

    import ray
    from ray import tune
    from ray.tune.schedulers import PopulationBasedTraining

    print(f"ray {ray.__version__}; reuse_actors={not args.no_reuse}; {args.trials} trials x 0.5 CPU; "
          f"{args.steps} steps of {args.step_s} s; scheduler {args.scheduler} (PBT every 2 steps)", flush=True)
    ray.init(address="local", num_cpus=4, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    leaks = 0
    for i in range(args.sweeps):
        storage = tempfile.mkdtemp(prefix="ray-pbt-leak-")
        scheduler = None
        if args.scheduler != "fifo":
            scheduler = PopulationBasedTraining(time_attr="training_iteration", metric="score", mode="max",
                                                perturbation_interval=2, quantile_fraction=0.25,
                                                synch=args.scheduler == "pbt",
                                                hyperparam_mutations={"lr": tune.loguniform(1e-4, 1e-1)})
        tuner = tune.Tuner(
            tune.with_resources(trainable, {"cpu": 0.5}),
            param_space={"lr": tune.loguniform(1e-4, 1e-1), "steps": args.steps, "step_s": args.step_s},
            tune_config=tune.TuneConfig(scheduler=scheduler, metric=None if scheduler else "score",
                                        mode=None if scheduler else "max", num_samples=args.trials, reuse_actors=not args.no_reuse),
            run_config=tune.RunConfig(name=f"pbt{i}", storage_path=storage, verbose=0),
        )
        start = time.perf_counter()
        grid = tuner.fit()
        seconds = time.perf_counter() - start
        errors = sum(r.error is not None for r in grid)
        free, groups, actors = settled_cluster(ray, 4, args.settle_s)
        leaks += free < 4
        print(f"sweep {i + 1}: {seconds:5.1f} s, {len(grid)} trials ({errors} errors); CPU free after "
              f"{args.settle_s:.0f} s: {free:.1f} of 4; placement groups not removed {groups}; "
              f"live actors {actors}; load {load_average()}", flush=True)
    print(f"{leaks} of {args.sweeps} sweeps left CPUs counted as used", flush=True)


if __name__ == "__main__":
    main()
