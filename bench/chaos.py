"""A seeded fault campaign on a sweep, then the invariants that must hold after it.

The bench owns everything: a simulated Ray cluster (`ray.cluster_utils.Cluster`: a head with
0 CPUs and `--workers` 1-CPU worker nodes) and moto's S3 server on 127.0.0.1, where the sweep
lives (`s3://chaos/sweeps/<name>`). The driver is `python -m rayrec sweep ... --address
<cluster>` in its own session. At seeded random moments the campaign

- SIGKILLs the driver's process group `--kills` times, each followed by `rayrec sweep
  --resume` (the last resume runs to the end);
- removes a worker node without warning and adds a fresh one (`--node-losses`);
- SIGKILLs a trial's worker process (`ray::ImplicitFunc`) mid-epoch (`--trial-kills`);
- stops the S3 server for each of `--outages` seconds right after a checkpoint was written,
  then starts it again on the same port.

Then `check_invariants` reads what the sweep left in storage and checks:

| invariant | how |
|---|---|
| every trial finished exactly once | `summary.yaml` complete; `trials.parquet` has the planned trials, each once, each `finished` |
| no reported epoch lost | each trial's `history.parquet` epochs are 1..its last epoch, and so are the reports its final checkpoint holds |
| no epoch trained twice (replays apart) | every report ever seen of a (trial, epoch) -- raw `result.json` rows, every checkpoint's `reports.json` (polled during the campaign, as Ray deletes old ones), `history.parquet` -- names one training (`trained_pid`, `reported_at`); a replay repeats the original's, so it counts once |
| `best.yaml` reproduces | `rayrec train --config best.yaml` in a fresh process: its validation metric within 1e-6 of the sweep's |
| no partial checkpoint loaded | every restore (`restored_epoch` > 0) restored the weights that epoch reported (`restored_checksum` = that epoch's `weights_checksum`), every final checkpoint's reports cover its lineage, and no trial ended with an error |

Figures only: the bench prints the table and never fails on it (`--json FILE` writes it).

    nohup .venv/bin/python bench/chaos.py --seed 15 > chaos.log 2>&1 &
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # s3server: the loopback S3 the storage tests use too

BUCKET = "chaos"
SECRET = "rayrec-chaos-secret"
# A SASRec small enough for epochs of about a second on one core (sweep-sized, synthetic).
SETS = ["data.synthetic_users=1500", "data.synthetic_items=200", "data.synthetic_length=20",
        "model.hidden=32", "model.blocks=1", "model.max_len=20", "train.batch_size=64", "train.eval_batch_size=512"]
SPACE = {
    "model": "sasrec",
    "fixed": {"train.patience": 100},  # every trial runs all its epochs: 'finished', never early-stopped
    "params": {"train.lr": {"dist": "loguniform", "low": 1e-3, "high": 1e-2},
               "model.dropout": {"dist": "uniform", "low": 0.1, "high": 0.4}},
}
# Failure detection within seconds, so a lost node's trials are retried soon (tests/test_cluster.py
# uses 3 x 500 ms; 10 x 1 s here, so that a starved node on a loaded machine is not taken for dead).
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 1000, "health_check_failure_threshold": 10}
TOLERANCE = 1e-6


@dataclass
class Campaign:
    seed: int = 15
    trials: int = 24
    epochs: int = 5
    workers: int = 3
    kills: int = 10
    node_losses: int = 1
    trial_kills: int = 1
    outages: tuple[float, ...] = (5.0, 30.0, 90.0)
    storage: str = "s3"  # "s3": the bench's moto server; else a local directory
    address: str | None = None  # an existing Ray (no node faults); else the bench's own cluster
    max_failures: int = 3
    sets: list[str] = field(default_factory=lambda: list(SETS))
    name: str = "chaos"
    workdir: str = ""
    retrain: bool = True
    final_timeout_s: float = 1200.0
    early_kill_p: float = 0.25  # share of fault-free runs whose driver dies while it starts or restores
    kill_window_s: tuple[float, float] = (1.0, 12.0)  # the kill, this long after the run's faults
    poll_s: float = 2.0  # how often the ledger reads the checkpoints (a kill "after a checkpoint" waits on it)


# --- the campaign ---------------------------------------------------------------------------------
def run_campaign(c: Campaign) -> dict[str, Any]:
    """Run the sweep under faults; returns the faults injected, the driver runs and the invariants."""
    rng = random.Random(c.seed)
    workdir = Path(c.workdir or tempfile.mkdtemp(prefix="rayrec-chaos-"))
    workdir.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(WANDB_MODE="disabled", RAY_DEDUP_LOGS="0", RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS="0")
    server = cluster = None
    started = time.time()
    try:
        if c.storage == "s3":
            server = _start_s3(env)
            storage = f"s3://{BUCKET}/sweeps"
        else:
            storage = c.storage or str(workdir / "sweeps")
        if c.address is None:
            cluster = _start_cluster(c.workers, env)
            address = cluster.address
        else:
            address = c.address
        space = workdir / "space.yaml"
        import yaml

        space.write_text(yaml.safe_dump(SPACE))
        ledger = Ledger(storage, c.name, interval=c.poll_s)
        ledger.start()
        plan = _plan_faults(c, rng, can_lose_nodes=cluster is not None, can_stop_storage=server is not None)
        faults = {"driver_kill": 0, "node_loss": 0, "trial_kill": 0, "storage_outage": 0}
        outage_s: list[float] = []
        runs: list[dict[str, Any]] = []
        base = [sys.executable, "-m", "rayrec", "sweep"]
        common = ["--name", c.name, "--storage", storage, "--address", address, "--cpus-per-trial", "1",
                  "--max-failures", str(c.max_failures), "--wandb", "off", "--no-test", "--verbose", "0"]
        first = ["sasrec", "--space", str(space), "--search", "random", "--scheduler", "fifo",
                 "--num-samples", str(c.trials), "--max-epochs", str(c.epochs), "--seed", str(c.seed),
                 *[a for s in c.sets for a in ("--set", s)]]
        complete = False
        for i, run_faults in enumerate(plan):
            cmd = base + (first if i == 0 else ["--resume"]) + common
            log = open(workdir / f"driver-{i:02d}.log", "wb")
            t0 = time.time()
            driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=workdir)
            record: dict[str, Any] = {"run": i, "resume": i > 0, "faults": []}
            last = i == len(plan) - 1
            try:
                if not last:
                    _inject(run_faults, rng, driver, ledger, t0, cluster, server, faults, outage_s, record, c)
                    if driver.poll() is None:
                        os.killpg(driver.pid, signal.SIGKILL)
                        faults["driver_kill"] += 1
                        record["killed_after_s"] = round(time.time() - t0, 1)
                driver.wait(timeout=c.final_timeout_s)
            except subprocess.TimeoutExpired:
                record["hung"] = True
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
            finally:
                log.close()
            record["exit"] = driver.returncode
            record["seconds"] = round(time.time() - t0, 1)
            runs.append(record)
            print(f"   run {i:2d}: {record}", flush=True)
            if driver.returncode == 0:
                complete = True
                break
            time.sleep(1.0)  # the killed driver's trial actors are reaped by their nodes
        if not complete:  # the planned last run did not finish: resume until it does (each one recorded)
            for extra in range(3):
                log = open(workdir / f"driver-extra-{extra}.log", "wb")
                t0 = time.time()
                rc = subprocess.call(base + ["--resume"] + common, stdout=log, stderr=subprocess.STDOUT,
                                     start_new_session=True, env=env, cwd=workdir, timeout=c.final_timeout_s)
                log.close()
                runs.append({"run": len(runs), "resume": True, "extra": True, "exit": rc, "seconds": round(time.time() - t0, 1)})
                if rc == 0:
                    break
        ledger.stop()
        campaign_s = time.time() - started
        session = cluster.head_node.get_session_dir_path() if cluster is not None else None
        (workdir / "ledger.json").write_text(json.dumps(ledger.rows()))
        if server is not None:  # moto's bucket lives in this process: keep a copy to check again later
            from rayrec.storage import join, split_url

            fs, path = split_url(join(storage, c.name))
            fs.get(path, str(workdir / "experiment"), recursive=True)
        try:
            invariants = check_invariants(storage, c.name, ledger=ledger.rows(), retrain=c.retrain, env=env,
                                          workdir=str(workdir), ray_session_dir=session)
        except Exception:  # noqa: BLE001 - reported; the copy in workdir can be checked again
            import traceback

            invariants = {"invariants": [], "ok": False, "figures": {}, "check_error": traceback.format_exc()}
        return {"seed": c.seed, "campaign": {k: v for k, v in asdict(c).items() if k != "sets"},
                "faults": faults, "outage_seconds": outage_s, "driver_runs": runs,
                "campaign_seconds": round(campaign_s, 1), "seconds": round(time.time() - started, 1),
                "storage": storage, "workdir": str(workdir), **invariants}
    finally:
        if cluster is not None:
            cluster.shutdown()
        if server is not None:
            try:
                server.stop()
            except Exception:  # noqa: BLE001 - already stopped
                pass


def _plan_faults(c: Campaign, rng: random.Random, can_lose_nodes: bool, can_stop_storage: bool) -> list[list]:
    """For each driver run (kills + 1 of them), the faults it gets besides its own kill."""
    plan: list[list] = [[] for _ in range(c.kills + 1)]
    slots = list(range(c.kills))  # the last run is left to finish
    for _ in range(c.node_losses if can_lose_nodes else 0):
        plan[rng.choice(slots)].append(("node_loss", None))
    for _ in range(c.trial_kills if can_lose_nodes else 0):  # only in the bench's own cluster
        plan[rng.choice(slots)].append(("trial_kill", None))
    if can_stop_storage:
        outage_runs = rng.sample(slots, min(len(slots), len(c.outages)))
        for seconds, run in zip(c.outages, outage_runs):
            plan[run].append(("storage_outage", seconds))
    for faults in plan:
        rng.shuffle(faults)
    return plan


def _inject(run_faults, rng, driver, ledger, t0, cluster, server, faults, outage_s, record, c: Campaign) -> None:
    """This run's faults, then the moment of its driver kill."""
    if not run_faults and rng.random() < c.early_kill_p:
        _sleep_unless_done(driver, rng.uniform(2.0, 12.0))  # a kill while the driver starts or restores
        return
    if not ledger.wait_for_new_checkpoint(since=t0, timeout=600, driver=driver):
        record["faults"].append("no checkpoint before the kill")
        return
    for kind, arg in run_faults:
        _sleep_unless_done(driver, rng.uniform(0.0, 3.0))
        if driver.poll() is not None:
            return
        try:
            _inject_one(kind, arg, rng, driver, ledger, cluster, server, faults, outage_s, record)
        except Exception as err:  # noqa: BLE001 - recorded; the campaign goes on
            record["faults"].append(f"{kind} failed: {err!r}"[:300])
    _sleep_unless_done(driver, rng.uniform(*c.kill_window_s))


def _inject_one(kind, arg, rng, driver, ledger, cluster, server, faults, outage_s, record) -> None:
    if kind == "node_loss":
        victim = rng.choice(sorted(cluster.worker_nodes, key=lambda n: n.node_id))
        cluster.remove_node(victim, allow_graceful=False)
        cluster.add_node(num_cpus=1)
        faults["node_loss"] += 1
        record["faults"].append(f"node {victim.node_id[:8]} removed, a fresh one added")
    elif kind == "trial_kill":
        pids = trial_processes(cluster)
        if pids:
            pid = rng.choice(pids)
            os.kill(pid, signal.SIGKILL)
            faults["trial_kill"] += 1
            record["faults"].append(f"trial process {pid} killed (of {len(pids)})")
        else:
            record["faults"].append("no trial process to kill")
    elif kind == "storage_outage":
        ledger.wait_for_new_checkpoint(since=time.time(), timeout=60, driver=driver)  # while checkpoints are written
        server.stop()
        down = time.time()
        try:
            time.sleep(arg)
        finally:
            server.start()
        outage_s.append(round(time.time() - down, 1))
        faults["storage_outage"] += 1
        record["faults"].append(f"storage down {arg:.0f} s")  # moto keeps the bucket in this process


def _sleep_unless_done(driver, seconds: float) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline and driver.poll() is None:
        time.sleep(0.2)


def trial_processes(cluster) -> list[int]:
    """Pids of the worker processes running a trial (the function trainable's actor) on this
    cluster's nodes: children of its raylets, never another Ray's on the same machine."""
    raylets = {info.process.pid for node in cluster.list_all_nodes() for info in node.all_processes.get("raylet", [])}
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                cmdline = fh.read().replace(b"\0", b" ").decode(errors="replace")
            with open(f"/proc/{entry}/status") as fh:
                ppid = next(int(line.split()[1]) for line in fh if line.startswith("PPid:"))
        except (OSError, StopIteration, ValueError):
            continue
        if cmdline.startswith("ray::ImplicitFunc") and ppid in raylets:
            pids.append(int(entry))
    return pids


def _start_s3(env: dict[str, str]):
    import logging

    from s3server import FOREIGN_S3_ENV, S3Server, s3_environment

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = S3Server()
    server.start()
    for key in FOREIGN_S3_ENV:
        os.environ.pop(key, None)
        env.pop(key, None)
    s3_env = s3_environment(server.endpoint, SECRET)
    os.environ.update(s3_env)  # the cluster's nodes inherit them, as do the drivers
    env.update(s3_env)
    import boto3

    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return server


def _start_cluster(workers: int, env: dict[str, str]):
    import logging

    from ray.cluster_utils import Cluster

    os.environ.pop("RAY_ADDRESS", None)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    patient_node_startup()
    for attempt in range(3):  # on a loaded machine the head's raylet can die while it starts: again
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                                    "_system_config": SYSTEM_CONFIG})
            break
        except Exception:  # noqa: BLE001 - "The current node timed out during startup"
            if attempt == 2:
                raise
    for _ in range(workers):
        cluster.add_node(num_cpus=1)
    import ray

    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    cluster.wait_for_nodes(timeout=300)
    ray.shutdown()  # the bench only starts and removes nodes; the drivers are the subprocesses
    return cluster


def patient_node_startup(seconds: float = 120.0) -> None:
    """Give a starting node minutes, not 30 s, to register with the GCS.

    ray._private.node.Node waits 30 s (a constant) for its raylet to appear in the GCS and
    then gives up; on a shared 2-core machine at load 30+ the head or a worker node misses
    that. Its loop asks services.get_node, so that call retries here until `seconds` pass.
    """
    from ray._private import services

    if getattr(services.get_node, "patient", False):
        return
    original = services.get_node

    def get_node(*args, **kwargs):
        deadline = time.monotonic() + seconds
        while True:
            try:
                return original(*args, **kwargs)
            except Exception:  # noqa: BLE001 - RuntimeError (not registered yet), RaySystemError (GCS busy)
                if time.monotonic() > deadline:
                    raise
                time.sleep(1.0)

    get_node.patient = True
    services.get_node = get_node


class Ledger:
    """Every checkpoint's reports, read while the campaign runs (Ray keeps only the newest two
    per trial), and the moment the newest checkpoint appeared."""

    def __init__(self, storage: str, name: str, interval: float = 2.0):
        from rayrec.storage import join, split_url

        self.fs, self.path = split_url(join(storage, name))
        self.interval = interval
        self._seen: dict[str, list[dict[str, Any]]] = {}
        self._last_new = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.poll()

    def rows(self) -> list[dict[str, Any]]:
        return [r for reports in list(self._seen.values()) for r in reports]

    def wait_for_new_checkpoint(self, since: float, timeout: float, driver=None) -> bool:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self._last_new > since:
                return True
            if driver is not None and driver.poll() is not None:
                return False
            time.sleep(0.2)
        return False

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def poll(self) -> None:
        try:
            if hasattr(self.fs, "invalidate_cache"):
                self.fs.invalidate_cache()
            paths = self.fs.glob(f"{self.path}/train_trial_*/checkpoint_*/reports.json")
        except Exception:  # noqa: BLE001 - storage down: try again later
            return
        for p in paths:
            if p in self._seen:
                continue
            try:
                self._seen[p] = json.loads(self.fs.cat(p))
                self._last_new = time.time()
            except Exception:  # noqa: BLE001 - mid-upload or storage down: next poll
                continue


# --- the invariants -------------------------------------------------------------------------------
def check_invariants(storage: str, name: str, *, ledger: list[dict[str, Any]] | None = None, retrain: bool = True,
                     env: dict[str, str] | None = None, workdir: str | None = None,
                     ray_session_dir: str | None = None) -> dict[str, Any]:
    """The invariants of a sweep that went through faults, read from its storage.

    Returns {"invariants": [{name, value, ok, detail}], "figures": {...}}; `ok` is what a test
    asserts. `ledger`: extra reports seen during the campaign (checkpoints Ray deleted since).
    """
    import pandas as pd

    from rayrec.storage import join, read_parquet, read_yaml, split_url

    experiment = join(storage, name)
    fs, path = split_url(experiment)
    if hasattr(fs, "invalidate_cache"):
        fs.invalidate_cache()
    summary = read_yaml(join(experiment, "summary.yaml"))
    trials = read_parquet(join(experiment, "trials.parquet"))
    history = read_parquet(join(experiment, "history.parquet"))
    planned = int(summary.get("trials_planned") or 0)
    rows: list[dict[str, Any]] = []

    def add(invariant: str, value: Any, ok: bool, detail: str = "") -> None:
        rows.append({"invariant": invariant, "value": value, "ok": bool(ok), "detail": detail})

    # 1. Every trial finished exactly once.
    statuses = trials["status"].value_counts().to_dict()
    unfinished = int((trials["status"] != "finished").sum())
    duplicates = int(trials["trial_id"].duplicated().sum())
    add("trials lost or unfinished", unfinished + max(0, planned - len(trials)),
        summary.get("status") == "complete" and unfinished == 0 and len(trials) == planned and duplicates == 0,
        f"{len(trials)} of {planned} planned; summary {summary.get('status')}; statuses {statuses}; duplicate ids {duplicates}")

    # 2. No reported epoch lost: history and every final checkpoint's lineage hold epochs 1..last.
    lost, lost_detail = 0, []
    last_epoch = dict(zip(trials["trial_id"], trials["epochs"].astype(int)))
    for trial_id, epochs in last_epoch.items():
        have = set(history.loc[history["trial_id"] == trial_id, "epoch"].astype(int))
        missing = set(range(1, epochs + 1)) - have
        lost += len(missing)
        if missing:
            lost_detail.append(f"{trial_id}: {sorted(missing)}")
    final_reports = _final_checkpoint_reports(fs, path)
    short_lineages = [t for t, reps in final_reports.items() if t in last_epoch and
                      sorted(int(r["epoch"]) for r in reps) != list(range(1, last_epoch[t] + 1))]
    add("reported epochs lost (history.parquet)", lost, lost == 0, "; ".join(lost_detail[:5]))

    # 3. No epoch trained twice: every report of a (trial, epoch) names one training.
    raw = _result_rows(fs, path)
    evidence = pd.DataFrame([*raw, *(ledger or []), *[r for reps in final_reports.values() for r in reps],
                             *history.to_dict("records")])
    evidence["trial"] = evidence["trained_by"].where(evidence["trained_by"].notna(), evidence["trial_id"]) \
        if "trained_by" in evidence else evidence["trial_id"]
    evidence = evidence.dropna(subset=["epoch", "trained_pid", "reported_at"])
    evidence["training"] = list(zip(evidence["trained_pid"].astype(int), evidence["reported_at"].astype(float).round(6)))
    trainings = evidence.groupby(["trial", evidence["epoch"].astype(int)])["training"].nunique()
    twice = trainings[trainings > 1]
    replayed = int(history["replayed"].fillna(0).astype(int).sum()) if "replayed" in history else 0
    recovered = int(history["from_checkpoint"].fillna(0).astype(int).sum()) if "from_checkpoint" in history else 0
    add("epochs trained twice", int(len(twice)), len(twice) == 0,
        f"{replayed} epochs replayed (replayed=1), {recovered} recovered from checkpoints (from_checkpoint=1); "
        f"{len(evidence)} reports compared" + (f"; twice: {list(twice.index[:5])}" if len(twice) else ""))

    # 4. best.yaml reproduces its trial's metric.
    if retrain:
        value, expected = _retrain_best(experiment, env, workdir)
        diff = abs(value - expected)
        add("best.yaml reproduces (|diff|)", f"{diff:.1e}", diff <= TOLERANCE, f"retrained {value:.6f}, sweep {expected:.6f}")

    # 5. No partial checkpoint loaded.
    restores = evidence[evidence["restored_epoch"].fillna(0) > 0] if "restored_epoch" in evidence else evidence.iloc[:0]
    # A restore loads the weights some report of that epoch fingerprinted: the trial's own, or
    # under PBT a donor's.
    checksums = evidence.groupby(evidence["epoch"].astype(int))["weights_checksum"].agg(set)
    wrong = 0
    for _, r in restores.drop_duplicates(subset=["trial", "training"]).iterrows():
        known = checksums.get(int(r["restored_epoch"]), set())
        if not any(math.isclose(float(r["restored_checksum"]), float(k), rel_tol=1e-9, abs_tol=TOLERANCE) for k in known):
            wrong += 1
    errored = [f"{t}: {e}" for t, e in zip(trials["trial_id"], trials.get("error", [""] * len(trials))) if str(e or "")]
    partial = wrong + len(short_lineages) + len(errored)
    add("partial checkpoints loaded", partial, partial == 0,
        f"{len(restores.drop_duplicates(subset=['trial', 'training']))} restores checked against the epoch's weights "
        f"({wrong} wrong); final checkpoints with a short lineage {len(short_lineages)}"
        + "".join(f" ({t}: epochs {[int(r['epoch']) for r in final_reports[t]]} of {last_epoch[t]})" for t in short_lineages[:5])
        + f"; trials ended in error {len(errored)}")

    figures = {
        "trials": len(trials), "planned": planned, "epochs_reported": int(len(history)), "replayed": replayed,
        "from_checkpoint": recovered, "restores": int(trials["restores"].sum()) if "restores" in trials else 0,
        "trial_failures": _trial_failures(fs, path),
    }
    if ray_session_dir:
        figures["incomplete_checkpoints_skipped"] = _count_in_logs(ray_session_dir, "skipping incomplete checkpoint")
    return {"invariants": rows, "ok": all(r["ok"] for r in rows), "figures": figures}


def _result_rows(fs, path: str) -> list[dict[str, Any]]:
    """Every row of every trial's result.json in storage (Ray appends; a resume may repeat epochs)."""
    rows = []
    for p in fs.glob(f"{path}/train_trial_*/result.json"):
        for line in fs.cat(p).decode(errors="replace").splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:
                continue
    return rows


def _final_checkpoint_reports(fs, path: str) -> dict[str, list[dict[str, Any]]]:
    """Each trial's newest checkpoint's reports, by the trial that trained them.

    Newest by the epoch it holds, as a restore ranks them (trainable.own_checkpoints), among
    directories that hold both files: a resumed trial's checkpoint indices restart from the
    snapshot's, so the highest index can be a stale directory from before a kill."""
    best: dict[str, tuple[int, int, list[dict[str, Any]]]] = {}
    for p in fs.glob(f"{path}/train_trial_*/checkpoint_*/reports.json"):
        directory = p.rsplit("/", 1)[0]
        if not fs.exists(f"{directory}/trainer.pt"):
            continue
        try:
            reports = json.loads(fs.cat(p))
        except ValueError:
            continue  # cut short by a kill: never a restore's choice either
        if not reports:
            continue
        key = (int(reports[-1]["epoch"]), int(directory.rsplit("_", 1)[1]))
        trial = p.split("/")[-3]
        if trial not in best or key > best[trial][:2]:
            best[trial] = (*key, reports)
    return {str(reps[-1].get("trained_by") or reps[-1].get("trial_id")): reps for _, _, reps in best.values()}


def _trial_failures(fs, path: str) -> int:
    """Trial attempts that raised (Ray's error.txt lists each failure of a trial)."""
    count = 0
    for p in fs.glob(f"{path}/train_trial_*/error.txt"):
        count += max(1, fs.cat(p).decode(errors="replace").count("Failure #"))
    return count


def _count_in_logs(session_dir: str, needle: str) -> int:
    count = 0
    logs = Path(session_dir) / "logs"
    for p in logs.glob("worker-*"):
        try:
            count += p.read_text(errors="replace").count(needle)
        except OSError:
            continue
    return count


def _retrain_best(experiment: str, env: dict[str, str] | None, workdir: str | None) -> tuple[float, float]:
    """(validation metric of `rayrec train --config best.yaml`, the sweep's value for it)."""
    from rayrec.storage import join, read_yaml

    best = read_yaml(join(experiment, "best.yaml"))
    provenance = best["sweep"]
    out = Path(workdir or tempfile.mkdtemp(prefix="rayrec-chaos-")) / "retrain"
    cmd = [sys.executable, "-m", "rayrec", "train", "--config", join(experiment, "best.yaml"), "--output", str(out),
           "--no-progress"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        raise RuntimeError(f"retraining best.yaml failed: {done.stderr[-2000:]}")
    import yaml

    summary = yaml.safe_load((out / "summary.yaml").read_text())
    metric = str(provenance["metric"]).removeprefix("val_")
    return float(summary["valid"][metric]), float(provenance["value"])


# --- output -------------------------------------------------------------------------------------------
def format_report(report: dict[str, Any]) -> str:
    lines = [f"seed {report['seed']}; faults injected: "
             + ", ".join(f"{k} {v}" for k, v in report["faults"].items())
             + (f" (storage down {', '.join(f'{s:.0f}' for s in report['outage_seconds'])} s)" if report["outage_seconds"] else ""),
             f"driver runs {len(report['driver_runs'])}; campaign {report['campaign_seconds']:.0f} s, "
             f"with the checks {report['seconds']:.0f} s",
             "", f"| {'invariant':<40} | {'value':>8} | ok  | detail", f"|{'-' * 42}|{'-' * 10}|-----|-------"]
    for r in report["invariants"]:
        lines.append(f"| {r['invariant']:<40} | {str(r['value']):>8} | {'yes' if r['ok'] else 'NO ':<3} | {r['detail']}")
    lines.append("")
    lines.append("figures: " + ", ".join(f"{k} {v}" for k, v in report["figures"].items()))
    if report.get("check_error"):
        lines.append("the check failed:\n" + report["check_error"])
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=15)
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--kills", type=int, default=10)
    parser.add_argument("--node-losses", type=int, default=1)
    parser.add_argument("--trial-kills", type=int, default=1)
    parser.add_argument("--outages", default="5,30,90", help="seconds of each storage outage, comma-separated ('' for none)")
    parser.add_argument("--storage", default="s3", help="'s3' (the bench's moto server) or a local directory")
    parser.add_argument("--max-failures", type=int, default=3)
    parser.add_argument("--workdir", default="")
    parser.add_argument("--json", default=None, help="write the report as JSON here")
    args = parser.parse_args()
    from machine import load_average, print_machine

    info = print_machine("chaos campaign (bench/chaos.py)")
    outages = tuple(float(s) for s in args.outages.split(",") if s.strip())
    campaign = Campaign(seed=args.seed, trials=args.trials, epochs=args.epochs, workers=args.workers, kills=args.kills,
                        node_losses=args.node_losses, trial_kills=args.trial_kills, outages=outages,
                        storage=args.storage, max_failures=args.max_failures, workdir=args.workdir)
    print(f"   seed {args.seed}: {args.trials} trials x {args.epochs} epochs on {args.workers} worker nodes; "
          f"{args.kills} driver kills, {args.node_losses} node losses, {args.trial_kills} trial kills, "
          f"storage outages {list(outages)} s", flush=True)
    report = run_campaign(campaign)
    report["machine"] = info
    report["load_average_at_end"] = load_average()
    print(format_report(report))
    print(f"   load average at end: {report['load_average_at_end']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()
