"""Shared fixtures. One Ray instance serves the whole test session (ray-notes §6: about 5 s
of fixed cost each time Ray starts), with logical GPUs so packing can be tested on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# Tiny synthetic data and a tiny SASRec: a trial takes seconds (dotted --set keys).
TINY_DATA = ["data.synthetic_users=150", "data.synthetic_items=60", "data.synthetic_length=12"]
TINY = [*TINY_DATA, "model.hidden=16", "model.blocks=1", "model.max_len=16", "train.eval_batch_size=256"]


def tiny_space(tmp_path, params: dict, mutate: list[str] | None = None, fixed: dict | None = None) -> str:
    """A SASRec search space with these params (PBT mutating `mutate`), written under tmp_path."""
    space = {"model": "sasrec", "fixed": fixed or {}, "params": params}
    if mutate:
        space["pbt"] = {"mutate": mutate}
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return str(path)


def set_flags(items: list[str]) -> list[str]:
    """Dotted key=value items as command-line arguments: --set a=1 --set b=2."""
    return [arg for item in items for arg in ("--set", item)]


def assert_user_error(result, *fragments: str) -> str:
    """A CliRunner result that is a user error: exit status 2, one line starting 'error: ', no
    traceback, naming every fragment. Returns the line."""
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
SHARED_DATA = Path(os.environ.get("RAYREC_SHARED_DATA", REPO.parent / "shared" / "data"))

# Keep tests away from the user's cache, results and W&B account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared datasets beside the repo)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    cache = os.environ.get("RAYREC_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "rayrec-cache")
    monkeypatch.setenv("RAYREC_CACHE", cache)


def wait_until(condition, timeout: float, what: str, interval: float = 0.2):
    """Poll `condition` until it returns something truthy (returned), or fail naming `what`."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")


def wait_for_killed_drivers_reaped(ray, cpus: float = 1.0, timeout: float = 90.0) -> None:
    """Until every other driver of the shared Ray has ended and what it owned is gone (no live
    actor, no placement group of another job), and `cpus` CPUs are free: a killed driver's
    trial workers are gone, so a resume neither races them nor waits for slots.

    CPUs held by this process's own jobs (an earlier test's) do not count. Should Ray not have
    reaped an ended driver's actors and placement groups within `timeout`, they are killed and
    removed here, with a warning that names them, and the wait starts again."""
    import warnings

    def reaped() -> bool:
        return not _other_jobs_leftovers(ray) and ray.available_resources().get("CPU", 0) >= cpus

    try:
        wait_until(reaped, timeout, "the killed drivers' actors and placement groups to be reaped")
        return
    except pytest.fail.Exception:
        holders = ray_holders(ray)
    removed = _remove_other_jobs_leftovers(ray)
    warnings.warn(f"Ray had not reaped ended drivers' leftovers after {timeout:.0f} s; removed {removed}; "
                  f"the cluster was: {holders}", stacklevel=2)
    try:
        wait_until(reaped, timeout, "the killed drivers' leftovers to be gone once removed")
    except pytest.fail.Exception as failed:
        raise AssertionError(f"{failed}; what holds the cluster: {ray_holders(ray)}") from None


def _other_jobs_leftovers(ray) -> dict[str, list]:
    """Other jobs' live drivers, live actors (id, pid) and placement groups (hex ids)."""
    from ray._private import state

    own = ray.get_runtime_context().get_job_id()
    jobs = {j["JobID"]: j for j in state.jobs() if j["JobID"] != own}
    left: dict[str, list] = {"drivers": [], "actors": [], "placement groups": []}
    for job, info in jobs.items():
        if not info["IsDead"] and _process_alive(int(info.get("DriverPid") or 0)):
            left["drivers"].append(job)
    for a in state.actors().values():
        if a["State"] != "DEAD" and a.get("JobID") in jobs:
            left["actors"].append((a["ActorID"], a.get("Pid")))
    for g in ray.util.placement_group_table().values():  # a group's id ends with its job's id
        if g["state"] != "REMOVED" and g["placement_group_id"][-len(own):] in jobs:
            left["placement groups"].append(g["placement_group_id"])
    return {k: v for k, v in left.items() if v}


def _remove_other_jobs_leftovers(ray) -> dict[str, list]:
    import signal

    from ray._raylet import PlacementGroupID
    from ray.util.placement_group import PlacementGroup

    left = _other_jobs_leftovers(ray)
    for _, pid in left.get("actors", []):
        if pid and _process_alive(int(pid)):
            os.kill(int(pid), signal.SIGKILL)
    for group in left.get("placement groups", []):
        ray.util.remove_placement_group(PlacementGroup(PlacementGroupID.from_hex(group)))
    return left


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet waited for) counts as ended.
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def ray_holders(ray) -> str:
    """What holds the shared Ray's resources: free/total CPUs, live placement groups, live
    actors and jobs, Ray's worker processes; for a failure message."""
    import subprocess

    from ray._private import state

    free, total = ray.available_resources().get("CPU", 0), ray.cluster_resources().get("CPU", 0)
    groups = [(g["placement_group_id"], g["state"], g.get("bundles")) for g in ray.util.placement_group_table().values()
              if g["state"] != "REMOVED"]
    actors = [(a["ActorID"][:8], a["State"], a.get("JobID"), a.get("ActorClassName"))
              for a in state.actors().values() if a["State"] != "DEAD"]
    jobs = [(j["JobID"], "dead" if j["IsDead"] else "running", j.get("DriverPid")) for j in state.jobs()]
    ps = subprocess.run(["ps", "-eo", "pid,ppid,stat,etime,args"], capture_output=True, text=True).stdout
    workers = [line.strip()[:120] for line in ps.splitlines() if "ray::" in line]
    return (f"CPU free {free} of {total}; placement groups {groups}; actors {actors}; jobs {jobs}; "
            f"worker processes {workers}")


@pytest.fixture(autouse=True)
def _ray_left_idle(request):
    """After each test on the shared Ray: warn, naming the test and what holds them, if it
    left fewer CPUs free than it found (waiting up to 20 s for them). A leak then surfaces at
    the test that caused it, not at a later test that waits for a slot; tests after it do not
    wait for CPUs that were already held when they started."""
    import warnings

    uses_ray = "ray_session" in request.fixturenames
    ray = request.getfixturevalue("ray_session") if uses_ray else None
    before = ray.available_resources().get("CPU", 0) if ray is not None else 0
    yield
    if ray is None:
        return
    try:
        wait_until(lambda: ray.available_resources().get("CPU", 0) >= before, 20, "the CPUs the test found free")
        return
    except pytest.fail.Exception:
        pass
    warnings.warn(f"{request.node.nodeid} left the shared Ray's CPUs held: {ray_holders(ray)}", stacklevel=1)


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session: 4 logical CPUs and 1 logical GPU."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()


# --- failure injection: rayrec's trainable wrapped (the package carries no test hooks) ----
def failing_trainable():
    """The trainable below, for `run_sweep(trial_function=failing_trainable())`. Ray's worker
    processes cannot import conftest, so it travels to them by value."""
    import sys

    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])
    return train_trial


def train_trial(config, **kwargs):
    """rayrec.tune.trainable.train_trial with failures injected.

    Named like the real one, so Tune names trial directories the same (train_trial_*). Control
    values come in the trial's config (SweepOptions.extra_space); they act only in an attempt
    that started from scratch (no checkpoint in Tune or in the trial's storage), so once per
    trial, and always before the report (and checkpoint) of their epoch reaches Tune:

    - `_fail_at_epoch`: the trial raises (a retry starts from the previous checkpoint);
    - `_kill_driver_at_epoch` with `_driver_pid`: that epoch's checkpoint is written to
      storage, then the driver is SIGKILLed before the result is handed to it, so the driver
      never records it;
    - `_barrier` = "DIR:N": before its first report the trial waits (up to 60 s, else it
      raises) until N trials have reached that point, so that N trials provably ran at once;
    - `_epoch_pause_s`: the trial sleeps that long before each report (every attempt), so
      that a test watching storage sees a sweep of tiny trials go by.
    """
    import signal
    import time

    from ray import tune

    from rayrec.tune import trainable

    fail_at = int(config.get("_fail_at_epoch") or 0)
    kill_at = int(config.get("_kill_driver_at_epoch") or 0)
    driver_pid = int(config.get("_driver_pid") or 0)
    barrier = config.get("_barrier") or ""
    pause = float(config.get("_epoch_pause_s") or 0)
    fresh = tune.get_checkpoint() is None and trainable.newest_own_state(None, "cpu") is None
    if not (barrier or pause or (fresh and (fail_at or (kill_at and driver_pid)))):
        return trainable.train_trial(config, **kwargs)
    report = tune.report

    def wait_at_barrier():
        folder, count = barrier.rsplit(":", 1)
        open(os.path.join(folder, tune.get_context().get_trial_id()), "w").close()
        deadline = time.monotonic() + 60
        while len(os.listdir(folder)) < int(count):
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(os.listdir(folder))} of {count} trials ran at once (test hook)")
            time.sleep(0.05)

    def hooked_report(metrics, *args, **kw):
        time.sleep(pause)
        if barrier and metrics.get("epoch") == 1:
            wait_at_barrier()
        if not fresh:
            return report(metrics, *args, **kw)
        if metrics.get("epoch") == fail_at:
            raise RuntimeError(f"injected failure at epoch {fail_at} (test hook)")
        if kill_at and metrics.get("epoch") == kill_at:
            kill_driver_once_persisted()
        return report(metrics, *args, **kw)

    def kill_driver_once_persisted():
        # Ray's report writes the checkpoint to storage, then queues the result for the driver.
        # Between the two the driver dies; the trial waits for its actor to be reaped with it.
        # (Killing the driver first raced the upload: on a loaded machine Ray reaped the trial
        # before its checkpoint reached storage.)
        from ray.train._internal.session import get_session

        storage = get_session().storage
        persist = storage.persist_current_checkpoint

        def persist_then_kill(checkpoint):
            persist(checkpoint)
            os.kill(driver_pid, signal.SIGKILL)
            time.sleep(600)  # never returns: the result must not reach Tune
            raise RuntimeError("the trial outlived its killed driver by 600 s (test hook)")

        storage.persist_current_checkpoint = persist_then_kill

    tune.report = hooked_report  # the trainable calls tune.report at call time
    try:
        return trainable.train_trial(config, **kwargs)
    finally:
        tune.report = report


# --- hand-made finished sweeps (no Ray): what `rayrec sweep` exports, written directly -----
SPACE = {
    "model": "sasrec",
    "stages": {"quick": {"num_samples": 12, "max_epochs": 4}, "medium": {"num_samples": 24, "max_epochs": 12}},
    "fixed": {"train.patience": 3},
    "params": {
        "train.lr": {"dist": "loguniform", "low": 1e-5, "high": 1e-1},
        "train.weight_decay": {"dist": "loguniform", "low": 0.01, "high": 0.3},
        "model.dropout": {"dist": "uniform", "low": 0.1, "high": 0.5},
        "model.blocks": {"dist": "int", "low": 1, "high": 4},
        "model.loss": {"dist": "choice", "values": ["ce", "bce", "sampled_softmax"]},
    },
}
BASE = {"model": {"name": "sasrec", "hidden": 16, "max_len": 16}, "data": {"synthetic_users": 150},
        "train": {"epochs": 4, "metric": "ndcg@10", "patience": 3}}


def write_sweep(root, trials: list[dict], history: pd.DataFrame | None = None, space: dict | None = None,
                scheduler: str = "fifo", stage: str | None = "quick", name: str = "hand", status: str = "complete") -> str:
    """A sweep directory as `rayrec sweep` exports it, from hand-made trial rows (`status`
    "partial": as an interrupted sweep exports it)."""
    path = os.path.join(str(root), name)
    os.makedirs(path, exist_ok=True)
    space = space or SPACE
    spec = {
        "model": "sasrec", "name": name, "space": space, "base": BASE,
        "settings": {"metric": "ndcg@10", "mode": "max", "num_samples": len(trials), "max_epochs": 4,
                     "search": "random", "scheduler": scheduler, "grace_period": 1, "reduction_factor": 2},
        "options": {"stage": stage}, "dataset": {"name": "synthetic", "fingerprint": "abc123"},
    }
    with open(os.path.join(path, "sweep.yaml"), "w") as fh:
        yaml.safe_dump(spec, fh)
    rows = []
    for i, t in enumerate(trials):
        row = {"trial_id": t.get("trial_id", f"t{i:02d}"), "status": t.get("status", "finished"),
               "epochs": t.get("epochs", 4), "best_val_ndcg@10": t["value"], "error": t.get("error", "")}
        row.update({f"config/{k}": v for k, v in t["config"].items()})
        row["config/train.patience"] = 3
        rows.append(row)
    pd.DataFrame(rows).to_parquet(os.path.join(path, "trials.parquet"), index=False)
    if history is None:
        history = pd.DataFrame([
            {"trial_id": r["trial_id"], "epoch": e, "val_ndcg@10": r["best_val_ndcg@10"] * e / r["epochs"],
             "val_coverage@10": 0.5, "train_loss": 5.0 - e}
            for r in rows if r["status"] != "errored" for e in range(1, r["epochs"] + 1)
        ])
    history.to_parquet(os.path.join(path, "history.parquet"), index=False)
    with open(os.path.join(path, "summary.yaml"), "w") as fh:  # written last, as the export does
        yaml.safe_dump({"name": name, "status": status, "trials_finished": len(trials) if status == "complete" else 1,
                        "trials_planned": len(trials), "model": "sasrec", "trials": len(trials)}, fh)
    return path


def config(lr, dropout=0.3, blocks=2, loss="ce", wd=0.05):
    return {"train.lr": lr, "model.dropout": dropout, "model.blocks": blocks, "model.loss": loss,
            "train.weight_decay": wd}


def ten_trials():
    """Two clear winners (lr 1e-3 and 1e-2), eight losers spread over the rest of the space."""
    top = [dict(value=0.40, config=config(1e-3, 0.2, 2, "ce", 0.01)),
           dict(value=0.39, config=config(1e-2, 0.4, 3, "bce", 0.012))]
    rest = [dict(value=0.10 + 0.01 * i, config=config(10 ** -(1.5 + 0.4 * i), 0.1 + 0.04 * i, 1 + i % 4,
                                                      "sampled_softmax", 0.01 + 0.03 * i)) for i in range(8)]
    return top + rest
