"""What a sweep's driver costs at 100, 300 and 1,000 trials, on a simulated multi-node cluster.

    .venv/bin/python bench/scale.py --trials 100,300,1000 --nodes 4 --cpus-per-node 4

Each size runs in a fresh process (so the driver's peak memory is its own): a
`ray.cluster_utils.Cluster` with a head that has no CPUs and `--nodes` worker nodes of
`--cpus-per-node` logical CPUs, then `run_sweep` (what `rayrec sweep` runs, with its
one-line-per-trial progress printer) of N trials of a tiny SASRec on the synthetic data:
random search over lr and dropout, FIFO, every trial `--epochs` epochs (0.2 s each at the
default 2,000 users; `--set data.synthetic_users=9000` gives the issue's epochs of about a
second), one CPU each. Ray is started and the data loaded before the clock starts.

Printed per size, and as one table at the end:
- driver CPU / trial CPU: the driver process's CPU seconds (all its threads: Tune's
  controller, the progress printer, callbacks, snapshots, export) against the CPU seconds of
  the trial worker processes (every `ray::` process under this one), sampled once a second
  from /proc; Ray's own daemons (GCS, raylets, agents) are a third column. CPU seconds do
  not stretch when logical CPUs outnumber cores, so the ratio holds on a small machine;
- slot idle: 1 - sum of trial seconds (trainable start -> last report) / (wall x slots);
- driver peak RSS (ru_maxrss) and its RSS growth during the sweep;
- experiment state: the bytes of Tune's snapshot files, the number of snapshots and the
  mean and largest seconds per snapshot (`TuneController.save_to_dir`, timed in place);
- per-trial start latency (a slot becoming free -> the trial's first batch), median and p95;
- export: seconds to write trials.parquet, history.parquet, best.yaml and summary.yaml;
- dataset copies: per node, the bytes created in its object store during the sweep divided
  by the dataset object's size (1 = shipped once to that node, whatever its trial count).
Figures only, never pass/fail.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from machine import load_average, print_machine  # noqa: E402
from sweep_overhead import trial_timings  # noqa: E402

# 2,000 users: about 0.2 s an epoch on one core of this machine (2026-12-04); the issue's
# trials of about a second an epoch are `--set data.synthetic_users=9000` (0.9-1.0 s). The
# dataset object is 1-2 MB, so it goes through the object store.
DATA = ["data.synthetic_users=2000", "data.synthetic_items=300", "data.synthetic_length=20"]
MODEL = ["model.hidden=16", "model.blocks=1", "model.heads=1", "model.max_len=20", "train.batch_size=128",
         "train.eval_batch_size=1024"]
SPACE = {
    "model": "sasrec",
    "fixed": {"train.patience": 100},
    "params": {"train.lr": {"dist": "loguniform", "low": 1.0e-4, "high": 1.0e-2},
               "model.dropout": {"dist": "uniform", "low": 0.1, "high": 0.5}},
}
CLK = os.sysconf("SC_CLK_TCK")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", default="100,300,1000", help="comma-separated sweep sizes, each in a fresh process")
    p.add_argument("--nodes", type=int, default=4)
    p.add_argument("--cpus-per-node", type=int, default=4)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--wandb", default="off", choices=["off", "offline"], help="the W&B callback (offline: real client)")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra config override key=value")
    p.add_argument("--json", help="write every size's figures to this JSON file")
    p.add_argument("--profile", help="cProfile the driver's main thread; write the top functions to this file")
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # internal: run one size in this process
    p.add_argument("--out", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# --- CPU seconds of this process's descendants, from /proc ----------------------------------------


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    return children


def _cpu_and_kind(pid: int) -> tuple[float, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK  # utime + stime
    first = cmd.split()[0] if cmd.strip() else "?"
    return cpu, (first if first.startswith("ray::") else os.path.basename(first))


def _is_trial(name: str) -> bool:
    """Trial workers carry Ray's process title `ray::<actor or task>`; the agents do too."""
    return name.startswith("ray::") and not name.endswith("Agent")


class CpuSampler(threading.Thread):
    """Once a second, the CPU seconds of every process under this one, by kind (trial worker
    or Ray daemon), keeping each pid's last reading so processes that exit still count. Its
    own CPU time is measured, to be taken off the driver's."""

    def __init__(self, period: float = 1.0):
        super().__init__(daemon=True)
        self.period, self.stop = period, threading.Event()
        self.last: dict[int, tuple[float, str]] = {}
        self.base: dict[int, float] = {}
        self.own_cpu = 0.0

    def sample(self) -> None:
        start = time.thread_time()
        children, todo = _children_map(), [os.getpid()]
        while todo:
            for pid in children.get(todo.pop(), []):
                todo.append(pid)
                reading = _cpu_and_kind(pid)
                if reading is not None:
                    if reading[1] == "?" and pid in self.last:  # exiting: the title is gone, the kind is not
                        reading = (reading[0], self.last[pid][1])
                    self.last[pid] = reading
        self.own_cpu += time.thread_time() - start

    def mark(self) -> None:
        """The clock starts: CPU spent before now (Ray's start-up) does not count."""
        self.sample()
        self.base = {pid: cpu for pid, (cpu, _) in self.last.items()}

    def run(self) -> None:
        while not self.stop.wait(self.period):
            self.sample()

    def totals(self) -> dict[str, float]:
        out = {"trial": 0.0, "ray": 0.0}
        for pid, (cpu, name) in self.last.items():
            out["trial" if _is_trial(name) else "ray"] += cpu - self.base.get(pid, 0.0)
        return out

    def by_name(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for pid, (cpu, name) in self.last.items():
            out[name] = out.get(name, 0.0) + cpu - self.base.get(pid, 0.0)
        return {k: round(v, 1) for k, v in sorted(out.items(), key=lambda kv: -kv[1])}


# --- one size, in its own process --------------------------------------------------------------


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _node_created_bytes() -> dict[str, int]:
    import ray
    from ray._private.internal_api import node_stats

    out = {}
    for node in ray.nodes():
        if node["Alive"]:
            stats = node_stats(node["NodeManagerAddress"], node["NodeManagerPort"], include_memory_info=False)
            out[node["NodeID"]] = int(stats.store_stats.cumulative_created_bytes)
    return out


def _dir_bytes(path: str, match) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files if match(root, f))
    return total


def run_one(args: argparse.Namespace) -> dict:
    import pickle

    import ray
    import yaml
    from ray.cluster_utils import Cluster
    from ray.tune.execution.tune_controller import TuneController

    import rayrec.tune.export as export
    from rayrec.config import build_config, parse_overrides
    from rayrec.data import load_split
    from rayrec.tune.sweep import SweepOptions, run_sweep

    n, sets = args.one, DATA + MODEL + args.sets
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    for _ in range(args.nodes):
        cluster.add_node(num_cpus=args.cpus_per_node)
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
    head = ray.get_runtime_context().get_node_id()
    slots = args.nodes * args.cpus_per_node
    data = load_split(build_config("sasrec", overrides=parse_overrides(sets)).data)
    data_bytes = len(pickle.dumps(data, protocol=5))

    snapshots: list[float] = []
    save_to_dir = TuneController.save_to_dir

    def timed_save(self):
        t = time.perf_counter()
        save_to_dir(self)
        snapshots.append(time.perf_counter() - t)

    TuneController.save_to_dir = timed_save
    export_seconds = []
    export_results = export.export_results

    def timed_export(*a, **k):
        t = time.perf_counter()
        try:
            return export_results(*a, **k)
        finally:
            export_seconds.append(time.perf_counter() - t)

    export.export_results = timed_export

    sampler = CpuSampler()
    storage = tempfile.mkdtemp(prefix="rayrec-scale-")
    space = os.path.join(storage, "space.yaml")
    with open(space, "w") as fh:
        yaml.safe_dump(SPACE, fh)
    opts = SweepOptions(model="sasrec", name="scale", storage=os.path.join(storage, "sweeps"), space=space, sets=sets,
                        search="random", scheduler="fifo", num_samples=n, max_epochs=args.epochs, cpus_per_trial=1,
                        max_failures=0, wandb=args.wandb, verbose=1, evaluate_test=False, seed=0)
    created_before = _node_created_bytes()
    rss_before = _rss_mb()
    load_start = load_average()
    sampler.mark()
    sampler.start()
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    profiler = None
    if args.profile:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    t0 = time.time()
    result = run_sweep(opts, data=data)
    wall = time.time() - t0
    if profiler is not None:
        import pstats

        profiler.disable()
        with open(args.profile, "w") as fh:
            pstats.Stats(profiler, stream=fh).sort_stats("tottime").print_stats(40)
            pstats.Stats(profiler, stream=fh).sort_stats("cumulative").print_stats(60)
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    sampler.stop.set()
    sampler.join()
    sampler.sample()
    created_after = _node_created_bytes()
    nodes_used = result.history.groupby("node_id")["trial_id"].nunique().to_dict()

    per_trial = trial_timings(result.history, t0, slots)
    trial_wall = float((per_trial["end"] - per_trial["started"]).sum())
    cpu = sampler.totals()
    driver_cpu = (cpu1.ru_utime + cpu1.ru_stime) - (cpu0.ru_utime + cpu0.ru_stime) - sampler.own_cpu
    experiment = os.path.join(storage, "sweeps", "scale")
    state_bytes = _dir_bytes(experiment, lambda root, f: root == experiment and (
        f.startswith("experiment_state") or f.startswith("searcher-state") or f.startswith("callback-states")
        or f.endswith(".pkl")))
    copies = {node: (created_after.get(node, 0) - created_before.get(node, 0)) / data_bytes for node in created_after}
    out = {
        "trials": n, "finished": int((result.trials["status"] == "finished").sum()),
        "nodes": args.nodes, "cpus_per_node": args.cpus_per_node, "slots": slots, "epochs": args.epochs,
        "epochs_total": int(per_trial["epochs"].sum()), "wall_s": wall,
        "trial_wall_s": trial_wall, "mean_trial_s": trial_wall / max(len(per_trial), 1),
        "slot_idle": 1 - trial_wall / (wall * slots),
        "driver_cpu_s": driver_cpu, "trial_cpu_s": cpu["trial"], "ray_daemons_cpu_s": cpu["ray"],
        "cpu_by_process": sampler.by_name(),
        "driver_over_trials": driver_cpu / max(cpu["trial"], 1e-9),
        "daemons_over_trials": cpu["ray"] / max(cpu["trial"], 1e-9),
        "driver_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "driver_rss_growth_mb": _rss_mb() - rss_before,
        "state_bytes": state_bytes, "snapshots": len(snapshots),
        "snapshot_mean_s": sum(snapshots) / max(len(snapshots), 1), "snapshot_max_s": max(snapshots, default=0.0),
        "snapshot_total_s": sum(snapshots),
        "start_latency_median_s": float(per_trial["start_overhead"].median()),
        "start_latency_p95_s": float(per_trial["start_overhead"].quantile(0.95)),
        "export_s": export_seconds[-1] if export_seconds else float("nan"),
        "data_mb": data_bytes / 2**20,
        "dataset_copies_per_node": {("head" if k == head else k[:8]): round(v, 2) for k, v in copies.items()},
        "trials_per_node": {("head" if k == head else k[:8]): v for k, v in nodes_used.items()},
        "load_start": load_start, "load_end": load_average(),
    }
    ray.shutdown()
    cluster.shutdown()
    shutil.rmtree(storage, ignore_errors=True)
    with open(args.out, "w") as fh:
        json.dump(out, fh, indent=1)
    return out


def show(r: dict) -> None:
    print(f"== {r['trials']} trials on {r['nodes']} nodes x {r['cpus_per_node']} CPUs, {r['epochs']} epochs each:"
          f" {r['finished']} finished, {r['epochs_total']} epochs, wall {r['wall_s']:.0f} s, mean trial {r['mean_trial_s']:.1f} s")
    print(f"   CPU seconds: driver {r['driver_cpu_s']:.1f}, trials {r['trial_cpu_s']:.1f}, Ray daemons {r['ray_daemons_cpu_s']:.1f}"
          f"  ->  driver / trials {r['driver_over_trials']:.3f} (target < 0.10), daemons / trials {r['daemons_over_trials']:.3f}")
    print(f"   CPU seconds by process title: {r['cpu_by_process']}")
    print(f"   slot idle {r['slot_idle']:.3f}; start latency median {r['start_latency_median_s']:.2f} s,"
          f" p95 {r['start_latency_p95_s']:.2f} s")
    print(f"   driver peak RSS {r['driver_peak_rss_mb']:.0f} MB (grew {r['driver_rss_growth_mb']:.0f} MB in the sweep)")
    print(f"   experiment state {r['state_bytes'] / 1e6:.2f} MB; {r['snapshots']} snapshots, mean {r['snapshot_mean_s'] * 1e3:.1f} ms,"
          f" max {r['snapshot_max_s'] * 1e3:.1f} ms, total {r['snapshot_total_s']:.1f} s; export {r['export_s']:.2f} s")
    print(f"   dataset {r['data_mb']:.2f} MB; copies created per node {r['dataset_copies_per_node']};"
          f" trials per node {r['trials_per_node']}")
    print(f"   load average: start {r['load_start']}, end {r['load_end']}", flush=True)


def main(args: argparse.Namespace) -> None:
    if args.one:
        run_one(args)
        return
    machine = print_machine(f"sweep driver cost at scale: {args.trials} trials, {args.nodes} nodes x {args.cpus_per_node} CPUs")
    results = []
    with tempfile.TemporaryDirectory(prefix="rayrec-scale-json-") as tmp:
        for n in [int(x) for x in args.trials.split(",")]:
            out = os.path.join(tmp, f"{n}.json")
            cmd = [sys.executable, os.path.abspath(__file__), "--one", str(n), "--out", out, "--nodes", str(args.nodes),
                   "--cpus-per-node", str(args.cpus_per_node), "--epochs", str(args.epochs), "--wandb", args.wandb,
                   *(["--profile", f"{args.profile}.{n}"] if args.profile else []),
                   *[f"--set={s}" for s in args.sets]]
            env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
            log = os.path.join(tmp, f"{n}.log")
            with open(log, "w") as fh:
                rc = subprocess.call(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT)
            if rc != 0:
                print(f"   {n} trials: failed (exit {rc}); the end of its log:")
                print(open(log).read()[-3000:], flush=True)
                continue
            results.append(json.load(open(out)))
            show(results[-1])
    print("\n| trials | wall s | trial CPU s | driver CPU s | driver / trials | daemons / trials | slot idle |"
          " peak RSS MB | state MB | snapshots (mean ms) | start p50 / p95 s | export s | dataset copies per node |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        copies = sorted(v for k, v in r["dataset_copies_per_node"].items() if k != "head")
        print(f"| {r['trials']} | {r['wall_s']:.0f} | {r['trial_cpu_s']:.0f} | {r['driver_cpu_s']:.1f} |"
              f" **{r['driver_over_trials']:.3f}** | {r['daemons_over_trials']:.3f} | {r['slot_idle']:.3f} |"
              f" {r['driver_peak_rss_mb']:.0f} | {r['state_bytes'] / 1e6:.2f} | {r['snapshots']} ({r['snapshot_mean_s'] * 1e3:.1f}) |"
              f" {r['start_latency_median_s']:.2f} / {r['start_latency_p95_s']:.2f} | {r['export_s']:.2f} | {copies} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "command": " ".join(sys.argv), "results": results}, fh, indent=1)


if __name__ == "__main__":
    main(parse_args())
