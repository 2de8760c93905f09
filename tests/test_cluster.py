"""The cluster path: cluster.yaml checked by Ray's own autoscaler validation (offline), and a
sweep on several Ray nodes on one machine that loses a worker node mid-sweep.

The multi-node sweep needs its own Ray (`ray.cluster_utils.Cluster`: a head and two workers),
which cannot share a process with the session's Ray instance (one driver connection per
process, and `ray.shutdown()` would break the other tests). It therefore runs this file as a
script in a subprocess: its own GCS on its own ports, its own session directory, torn down by
`cluster.shutdown()` in the subprocess (and by killing the subprocess's process group if it
hangs), so the shared instance never sees it.
"""

from __future__ import annotations

import copy
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER_FILES = ["cluster.yaml", "cluster-gcp.yaml"]


# --- cluster.yaml ----------------------------------------------------------------------------
@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_cluster_file_passes_ray_autoscaler_validation(name):
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / name).read_text())
    config = prepare_config(copy.deepcopy(raw))  # merges the provider's defaults.yaml, as `ray up` does
    validate_config(config)  # ray-schema.json plus Ray's cross-field checks

    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0}, "trials must land on the workers"
    assert config["docker"]["image"] == "rayproject/ray:2.60.0-py311-gpu"
    workers = [t for n, t in config["available_node_types"].items() if n != config["head_node_type"]]
    assert workers and all(t["min_workers"] >= 1 for t in workers), "a GPU must be there when the sweep checks"
    for t in workers:
        node = t["node_config"]
        gpu = node.get("InstanceType", "").split(".")[0] in {"g4dn", "g5", "g6", "g6e", "p3", "p4d", "p5"} \
            or bool(node.get("guestAccelerators"))
        assert gpu, f"worker type without a GPU: {node}"
    # rayrec installed with the exact tested versions, from the synced checkout.
    assert any("-c /home/ray/rayrec/constraints.txt -e /home/ray/rayrec" in c for c in config["setup_commands"])
    assert config["file_mounts"] == {"/home/ray/rayrec": "."}
    assert "**/.venv" in config["rsync_exclude"]
    assert (REPO / "constraints.txt").exists() and "ray==2.60.0" in (REPO / "constraints.txt").read_text()


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_validation_catches_a_broken_cluster_file(name):
    """The check above is not vacuous: an unknown key or a missing node_config fails it."""
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((REPO / name).read_text())
    for broken in (dict(raw, max_wrokers=3), _without_node_config(raw)):
        with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
            validate_config(prepare_config(copy.deepcopy(broken)))


def _without_node_config(raw: dict) -> dict:
    broken = copy.deepcopy(raw)
    del broken["available_node_types"][broken["head_node_type"]]["node_config"]
    return broken


@pytest.mark.parametrize("name", CLUSTER_FILES)
def test_every_key_has_a_comment_above_it(name):
    lines = (REPO / name).read_text().splitlines()
    key = re.compile(r"^(\s*)(- )?([A-Za-z_][\w.-]*|/[\w/.-]+):( |$)")
    missing = []
    for i, line in enumerate(lines):
        match = key.match(line)
        if not match or match.group(2):  # list items are values; their keys are commented on the item
            continue
        above = lines[i - 1].strip() if i else ""
        if not above.startswith("#"):
            missing.append(f"{i + 1}: {line.strip()}")
    assert not missing, "keys without a comment line above them:\n" + "\n".join(missing)


# --- several nodes on one machine --------------------------------------------------------------
@pytest.mark.slow
def test_sweep_across_nodes_survives_losing_a_worker(tmp_path):
    """Head (0 CPUs) + two 1-CPU workers; a worker is removed while it runs a trial."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(WANDB_MODE="disabled", RAY_DEDUP_LOGS="0")
    proc = subprocess.Popen([sys.executable, __file__, str(tmp_path)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the cluster's raylets and workers go with it
        out, _ = proc.communicate()
        pytest.fail("multi-node sweep timed out:\n" + out.decode()[-4000:])
    log = out.decode()
    assert proc.returncode == 0, log[-4000:]
    report = json.loads((tmp_path / "report.json").read_text())
    history = report["history"]

    # Trials ran on both workers and never on the head (it has no CPUs).
    nodes = {row["node_id"] for row in history}
    assert report["head"] not in nodes
    assert set(report["workers"]) <= nodes, (nodes, report["workers"])
    # Every trial finished every epoch.
    assert report["statuses"] == ["finished"] * report["num_samples"]
    epochs: dict[str, set] = {}
    for row in history:
        epochs.setdefault(row["trial_id"], set()).add(row["epoch"])
    assert all(sorted(e) == list(range(1, report["max_epochs"] + 1)) for e in epochs.values()), epochs
    # The trial that ran on the removed node continued from its checkpoint on the surviving one.
    removed, survivor = report["removed"], report["survivor"]
    moved = {row["trial_id"] for row in history if row["node_id"] == removed} - set(report["finished_before_removal"])
    assert moved, "no unfinished trial was on the removed node"
    for trial_id in moved:
        rows = sorted((r for r in history if r["trial_id"] == trial_id), key=lambda r: r["reported_at"])
        resumed = [r for r in rows if (r.get("restored_epoch") or 0) > 0]
        assert resumed, f"{trial_id} restarted from scratch instead of its checkpoint"
        on_removed = [r["epoch"] for r in rows if r["node_id"] == removed]
        # Checkpoints every epoch: it went on from the last epoch it reported on the lost node.
        assert resumed[0]["restored_epoch"] == max(on_removed), (resumed[0], on_removed)
        after = [r for r in rows if r["reported_at"] >= resumed[0]["reported_at"]]
        assert {r["node_id"] for r in after} == {survivor}
    assert report["shutdown_clean"]


def test_thirty_trial_sweep_on_two_nodes_ships_the_dataset_once_per_node(tmp_path):
    """The CI version of bench/scale.py: 30 trials on 2 simulated one-CPU nodes, all finished,
    and the object store moved the dataset to each node once, not once per trial."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(WANDB_MODE="disabled", RAY_DEDUP_LOGS="0")
    out = tmp_path / "scale.json"
    cmd = [sys.executable, str(REPO / "bench" / "scale.py"), "--trials", "30", "--nodes", "2", "--cpus-per-node", "1",
           "--epochs", "1", "--set", "data.synthetic_users=400", "--json", str(out)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        log, _ = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail("30-trial sweep timed out:\n" + log.decode()[-4000:])
    assert proc.returncode == 0 and out.exists(), log.decode()[-4000:]
    (result,) = json.loads(out.read_text())["results"]
    assert result["finished"] == 30 and result["epochs_total"] == 30
    workers = {k: v for k, v in result["trials_per_node"].items() if k != "head"}
    assert len(workers) == 2 and sum(workers.values()) == 30 and min(workers.values()) >= 5, workers
    # Each worker node created one copy of the dataset in its object store (plus a few bytes of
    # small objects), although it ran 5 or more trials.
    copies = {k: v for k, v in result["dataset_copies_per_node"].items() if k != "head"}
    assert all(0.99 <= c < 1.5 for c in copies.values()), copies
    assert result["snapshots"] >= 1 and result["export_s"] > 0


def _cluster_sweep(workdir: str) -> None:
    """Run in a subprocess: a 3-node Ray cluster, a sweep, a worker removed once it holds a checkpoint."""
    import logging

    import ray
    from ray.cluster_utils import Cluster

    sys.path.insert(0, str(REPO))
    from rayrec.tune.sweep import SweepOptions, run_sweep

    logging.basicConfig(level=logging.WARNING)
    # Fast failure detection, so the lost node's trial is retried within seconds.
    system = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 3}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False,
                                                            "_system_config": system})
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address, logging_level=logging.WARNING, log_to_driver=False)
    head_id = ray.get_runtime_context().get_node_id()
    storage = os.path.join(workdir, "sweeps")  # shared by every node of this one machine
    space = os.path.join(workdir, "space.yaml")
    with open(space, "w") as fh:
        yaml.safe_dump({"model": "sasrec", "params": {"train.lr": {"dist": "loguniform", "low": 1e-3, "high": 1e-2}}}, fh)
    num_samples, max_epochs = 3, 10
    event: dict = {}

    def remove_busy_worker() -> None:
        """Once two trials hold a checkpoint of epoch >= 2, kill the second worker node outright."""
        deadline = time.time() + 200
        while time.time() < deadline:
            time.sleep(0.3)
            ready = _trials_with_epoch(storage, 2)
            if len(ready) >= 2:
                break
        event["finished_before_removal"] = sorted(_trials_with_epoch(storage, max_epochs))
        victim = workers[1]
        event["removed"] = victim.node_id
        cluster.remove_node(victim, allow_graceful=False)
        event["removed_at"] = time.time()  # its processes are gone by now

    watcher = threading.Thread(target=remove_busy_worker, daemon=True)
    watcher.start()
    result = run_sweep(SweepOptions(
        model="sasrec", space=space, name="nodes", storage=storage, search="random", scheduler="fifo",
        num_samples=num_samples, max_epochs=max_epochs, cpus_per_trial=1, max_failures=3, wandb="off", verbose=0,
        evaluate_test=False,
        sets=["data.synthetic_users=1500", "data.synthetic_items=200", "data.synthetic_length=20",
              "model.hidden=32", "model.blocks=1", "model.max_len=20", "train.batch_size=64"]))
    watcher.join(timeout=60)
    history = result.history[["trial_id", "epoch", "node_id", "restored_epoch", "reported_at"]]
    report = {
        "head": head_id, "workers": [w.node_id for w in workers], "survivor": workers[0].node_id,
        "num_samples": num_samples, "max_epochs": max_epochs,
        "statuses": result.trials["status"].tolist(),
        "history": json.loads(history.to_json(orient="records")), **event,
    }
    ray.shutdown()
    cluster.shutdown()
    report["shutdown_clean"] = not ray.is_initialized()
    with open(os.path.join(workdir, "report.json"), "w") as fh:
        json.dump(report, fh)


def _trials_with_epoch(storage: str, epoch: int) -> set[str]:
    """Trial ids whose checkpoints (written by the trials themselves) reached `epoch`."""
    found = set()
    for trial_dir in Path(storage, "nodes").glob("train_trial_*"):
        if len(list(trial_dir.glob("checkpoint_*"))) and any(
                int(p.name.split("_")[1]) + 1 >= epoch for p in trial_dir.glob("checkpoint_*")):
            found.add("_".join(trial_dir.name.split("_")[2:4]))
    return found


if __name__ == "__main__":
    _cluster_sweep(sys.argv[1])
