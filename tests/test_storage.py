"""Storage URLs against a real S3 protocol: moto's server on 127.0.0.1, started here.

Pre-flight errors (malformed URL, unknown protocol, unreachable endpoint, missing bucket, no
write permission) go through the CLI; a sweep writes to s3://, is killed and resumed from
there, survives a storage outage, and its best checkpoint is loaded back from S3. Nothing
written anywhere may contain the secret key or the endpoint.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
from typer.testing import CliRunner

from conftest import TINY, tiny_space
from rayrec.cli import app
from rayrec.errors import UserError
from rayrec.storage import check_writable, display, split_url, storage_environment
from rayrec.tune.storage_handoff import pyarrow_filesystem
from s3server import FOREIGN_S3_ENV, S3Server, free_port, s3_environment
from wandb_offline import read_offline_run

BUCKET = "rayrec-test"
SECRET = "rayrec-test-secret-6b1f0c2a9e"


@pytest.fixture(scope="module")
def s3():
    """A bucket on a loopback S3 server; the standard AWS variables point at it (module-wide)."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto logs every request otherwise
    server = S3Server()
    server.start()
    env = s3_environment(server.endpoint, SECRET)
    with pytest.MonkeyPatch.context() as mp:
        for key in FOREIGN_S3_ENV:
            mp.delenv(key, raising=False)
        for key, value in env.items():
            mp.setenv(key, value)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield server
    server.stop()


def run_cli(*args: str):
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, (result.stderr if hasattr(result, "stderr") else result.output).strip()


# --- URL parsing (no server) ---------------------------------------------------------------
@pytest.mark.parametrize("url, message", [
    ("s3:/bucket/prefix", "malformed storage URL"),
    ("s3://", "no bucket"),
    ("s3://Not_A_Bucket/x", "not a valid bucket name"),
    ("nosuchproto://bucket/x", "unknown storage protocol 'nosuchproto'"),
    ("s3://user:pw@bucket/x", "carries credentials"),
    ("s3://bucket/x?endpoint_override=http://h:9000", "carries credentials or options"),
])
def test_bad_urls_are_one_line_user_errors(url, message):
    with pytest.raises(UserError, match=message) as err:
        split_url(url)
    assert "\n" not in str(err.value)
    assert "pw@" not in str(err.value) and "h:9000" not in str(err.value)


def test_local_and_file_urls_reach_ray_as_plain_paths(tmp_path):
    assert pyarrow_filesystem(str(tmp_path)) == (None, str(tmp_path))
    assert pyarrow_filesystem(f"file://{tmp_path}") == (None, str(tmp_path))
    fs, path = split_url("memory://bucket/prefix")
    assert path == "/bucket/prefix" and "memory" in fs.protocol
    assert display("s3://k:secret@bucket/p?x=1") == "s3://***@bucket/p?..."


# --- pre-flight probe through the CLI -----------------------------------------------------------
def test_probe_errors_exit_2_before_any_trial(s3, tmp_path, monkeypatch):
    """Each bad storage is one line on stderr, exit status 2, within seconds, before Ray starts."""
    import ray

    was_running = ray.is_initialized()
    common = ["sweep", "sasrec", "--num-samples", "1", "--max-epochs", "1", "--grace-period", "1", "--scheduler", "fifo", "--search", "random",
              "--wandb", "off", "--name", "probe"]
    cases = {
        "malformed": (["--storage", "s3:/rayrec-test/x"], "malformed storage URL"),
        "unknown protocol": (["--storage", "nosuchproto://b/x"], "unknown storage protocol"),
        "missing bucket": (["--storage", "s3://no-such-bucket/x"], "bucket 'no-such-bucket' does not exist"),
    }
    for label, (args, expected) in cases.items():
        code, err = run_cli(*common, *args)
        assert code == 2, (label, err)
        assert expected in err and len(err.splitlines()) == 1, (label, err)

    # No write permission: a read-only IAM user on a server that enforces IAM.
    code, err = _with_read_only_user(s3, lambda: run_cli(*common, "--storage", f"s3://{BUCKET}/ro"))
    assert code == 2 and "no permission to write to storage" in err and len(err.splitlines()) == 1, err

    # Unreachable endpoint: a closed port. The probe gives up at once, not after botocore's retry loop.
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")
    started = time.time()
    code, err = run_cli(*common, "--storage", f"s3://{BUCKET}/x")
    assert code == 2 and "cannot reach storage" in err and len(err.splitlines()) == 1, err
    assert time.time() - started < 10
    # The endpoint is named by its variable, never by value.
    assert "$AWS_ENDPOINT_URL" in err and "127.0.0.1" not in err

    # `rayrec train --output` goes through the same probe.
    code, err = run_cli("train", "sasrec", "--epochs", "1", "--output", f"s3://{BUCKET}/run", *sum((["--set", s] for s in TINY), []))
    assert code == 2 and "cannot reach storage" in err, err
    assert ray.is_initialized() == was_running, "a failed probe must not start Ray"


def _with_read_only_user(server: S3Server, fn):
    """Run fn as an IAM user allowed only to read, with moto enforcing IAM meanwhile."""
    import boto3
    import requests

    iam = boto3.client("iam")
    iam.create_user(UserName="reader")
    iam.put_user_policy(UserName="reader", PolicyName="read", PolicyDocument=json.dumps({
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Action": ["s3:GetObject", "s3:ListBucket"], "Resource": "*"}],
    }))
    key = iam.create_access_key(UserName="reader")["AccessKey"]
    saved = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")}
    requests.post(f"{server.endpoint}/moto-api/reset-auth", data=b"0")
    os.environ.update(AWS_ACCESS_KEY_ID=key["AccessKeyId"], AWS_SECRET_ACCESS_KEY=key["SecretAccessKey"])
    try:
        return fn()
    finally:
        os.environ.update(saved)
        requests.post(f"{server.endpoint}/moto-api/reset-auth", data=b"inf")


def test_probe_writes_and_cleans_up(s3):
    import s3fs

    check_writable(f"s3://{BUCKET}/clean")
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    assert not [p for p in fs.find(f"{BUCKET}/clean") if ".rayrec-write-probe" in p]
    # Credentials and the endpoint reach trials only in memory; the variables are the standard ones.
    env = storage_environment()
    assert env["AWS_SECRET_ACCESS_KEY"] == SECRET and env["AWS_ENDPOINT_URL"] == s3.endpoint


@pytest.mark.ray
def test_trial_processes_get_storage_settings_in_memory_not_in_pickles(ray_session, s3):
    """What Ray pickles (and persists) names no secret; a Ray worker that knows nothing still writes."""
    import ray
    import ray.cloudpickle as cloudpickle

    from rayrec.storage import STORAGE_ENV

    fs, path = pyarrow_filesystem(f"s3://{BUCKET}/kv")
    blob = cloudpickle.dumps(fs)
    assert SECRET.encode() not in blob and s3.endpoint.split("//")[1].encode() not in blob

    @ray.remote(num_cpus=0)
    def write_from_bare_worker(blob: bytes) -> str | None:
        saved = {k: os.environ.pop(k) for k in STORAGE_ENV if k in os.environ}
        try:
            fs = cloudpickle.loads(blob)  # the driver's settings arrive from Ray's key-value store here
            with fs.open_output_stream(f"{path}/from-worker") as out:
                out.write(b"hi")
            return os.environ.get("AWS_ENDPOINT_URL")
        finally:
            for k in STORAGE_ENV:
                os.environ.pop(k, None)
            os.environ.update(saved)

    assert ray.get(write_from_bare_worker.remote(blob)) == s3.endpoint
    assert s3fs_fresh().cat(f"{BUCKET}/kv/from-worker") == b"hi"


# --- sweeps on S3 ----------------------------------------------------------------------------
LR_SPACE = {"train.lr": {"dist": "loguniform", "low": 1e-3, "high": 3e-2}}


def s3fs_fresh():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def terminated_trials(fs, experiment: str) -> set[str]:
    """Trials the experiment state on S3 already records as finished (what a resume keeps)."""
    done: set[str] = set()
    for path in fs.glob(f"{experiment}/experiment_state-*.json"):
        try:
            state = json.loads(fs.cat(path))
        except (ValueError, FileNotFoundError):
            continue
        for trial_json, _ in state["trial_data"]:
            trial = json.loads(trial_json)
            if trial["status"] == "TERMINATED":
                done.add(trial["trial_id"])
    return done


def sweep_cmd(space: str, name: str, storage: str, address: str, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "rayrec", "sweep", "sasrec", "--space", space, "--name", name, "--storage", storage,
           "--search", "random", "--scheduler", "fifo", "--cpus-per-trial", "0.5", "--address", address, *extra]
    for s in TINY:
        cmd += ["--set", s]
    return cmd


@pytest.mark.ray
def test_sweep_on_s3_survives_a_killed_driver_and_its_best_checkpoint_loads_back(ray_session, s3, tmp_path):
    import ray

    fs = s3fs_fresh()
    storage, name = f"s3://{BUCKET}/sweeps", "killed"
    experiment = f"{BUCKET}/sweeps/{name}"
    address = ray_session.get_runtime_context().gcs_address
    log = open(tmp_path / "driver.log", "wb")
    cmd = sweep_cmd(tiny_space(tmp_path, LR_SPACE), name, storage, address, "--num-samples", "3", "--max-epochs", "3",
                    "--max-concurrent", "1", "--wandb", "offline", "--no-test")
    driver = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                              env={**os.environ, "WANDB_MODE": "offline"})
    deadline, finished = time.time() + 240, set()
    try:
        while time.time() < deadline and not finished:
            time.sleep(1.0)
            fs.invalidate_cache()
            finished = terminated_trials(fs, experiment)
            assert driver.poll() is None, (tmp_path / "driver.log").read_text()[-3000:]
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        log.close()
    assert finished, "no trial finished on S3 before the deadline"
    # What the killed driver left on S3: checkpoints written by the trials themselves.
    assert fs.glob(f"{experiment}/train_trial_*/checkpoint_*/trainer.pt")
    before = {t: _last_result(fs, experiment, t) for t in finished}

    code, out = _cli_out("sweep", "--resume", "--name", name, "--storage", storage, "--address", address,
                         "--cpus-per-trial", "0.5", "--wandb", "offline")
    assert code == 0, out
    fs.invalidate_cache()
    from rayrec.storage import read_parquet, read_yaml

    trials = read_parquet(f"{storage}/{name}/trials.parquet")
    assert len(trials) == 3 and (trials["status"] == "finished").all(), trials[["trial_id", "status", "epochs"]]
    history = read_parquet(f"{storage}/{name}/history.parquet")
    for trial_id, group in history.groupby("trial_id"):
        assert sorted(set(group["epoch"])) == [1, 2, 3], (trial_id, group["epoch"].tolist())
    for trial_id, result in before.items():  # finished before the kill: kept as they were
        row = history[(history["trial_id"] == trial_id) & (history["epoch"] == 3)]
        assert row["val_ndcg@10"].iloc[0] == pytest.approx(result["val_ndcg@10"])
        rows = history[history["trial_id"] == trial_id]
        assert len(rows) == 3 and (rows["restored_epoch"].fillna(0) == 0).all(), "a finished trial was rerun"
    summary = read_yaml(f"{storage}/{name}/summary.yaml")
    assert summary["best"]["checkpoint"].startswith(f"s3://{BUCKET}/sweeps/{name}/")

    # The best checkpoint, loaded back from S3 by `rayrec train --init-from <sweep URL>`.
    run_url = f"s3://{BUCKET}/runs/warm"
    code, out = _cli_out("train", "--config", f"{storage}/{name}/best.yaml", "--init-from", f"{storage}/{name}",
                         "--epochs", "1", "--output", run_url, "--no-progress")
    assert code == 0, out
    from rayrec.train.run import load_checkpoint, sweep_best_checkpoint

    best = sweep_best_checkpoint(f"{storage}/{name}")
    assert best["meta"]["trial_id"] == summary["best"]["trial_id"]
    assert load_checkpoint(f"{run_url}/checkpoint.pt")["meta"]["fingerprint"] == summary["fingerprint"]

    # Neither the secret key nor the endpoint appears in anything written: results, Ray's state
    # (pickles included), W&B's offline files, the run directory, or the driver's output.
    fs.invalidate_cache()
    session_logs = glob.glob(f"{ray._private.worker._global_node.get_session_dir_path()}/logs/*")
    extra = [open(p, "rb").read() for p in session_logs if os.path.isfile(p)]  # Ray's own logs too
    _assert_no_secrets(fs, [experiment, f"{BUCKET}/runs/warm"],
                       extra=[(tmp_path / "driver.log").read_bytes(), out.encode(), *extra], endpoint=s3.endpoint)
    # W&B's offline runs of both drivers (trials and summary) were copied next to the results.
    runs = {p.split("/")[-2].rsplit("-", 1)[-1] for p in fs.glob(f"{experiment}/wandb/offline-run-*/run-*.wandb")}
    assert set(trials["trial_id"]) <= runs and "summary" in runs, runs
    # And every trial's runs there hold all its epochs, wherever the kill caught its logging actor
    # (which dies with the driver: before wandb.init, or before its run was flushed).
    fs.get(f"{experiment}/wandb/", str(tmp_path / "wandb"), recursive=True)
    for trial_id in trials["trial_id"]:
        logged = {row["epoch"] for run_dir in glob.glob(f"{tmp_path}/wandb/offline-run-*-{trial_id}")
                  for row in read_offline_run(run_dir)["history"] if "epoch" in row}
        assert logged == {1, 2, 3}, (trial_id, logged)


def _last_result(fs, experiment: str, trial_id: str) -> dict:
    (path,) = fs.glob(f"{experiment}/train_trial_{trial_id}_*/result.json")
    return json.loads(fs.cat(path).decode().strip().splitlines()[-1])


def _cli_out(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, list(args))
    return result.exit_code, result.output + (str(result.exception) if result.exception else "")


def _assert_no_secrets(fs, prefixes: list[str], extra: list[bytes], endpoint: str) -> None:
    host = endpoint.split("://", 1)[1]
    needles = [SECRET.encode(), host.encode()]
    needles += [n.hex().encode() for n in needles]  # Ray stores pickles hex-encoded in its JSON state
    blobs = [(p, fs.cat(p)) for prefix in prefixes for p in fs.find(prefix)]
    assert len(blobs) > 10
    blobs += [(f"extra{i}", b) for i, b in enumerate(extra)]
    leaks = [(path, n) for path, blob in blobs for n in needles if n in blob]
    assert not leaks, leaks


@pytest.mark.ray
def test_storage_outage_mid_sweep_loses_no_completed_result(ray_session, s3, tmp_path):
    """The S3 server goes away for a few seconds while trials checkpoint every epoch, then returns."""
    from rayrec.storage import read_parquet
    from rayrec.train.trainer import load_state
    from rayrec.tune.sweep import SweepOptions, run_sweep

    fs = s3fs_fresh()
    storage, name = f"s3://{BUCKET}/outage", "outage"
    experiment = f"{BUCKET}/outage/{name}"
    outage: dict[str, float] = {}

    def storage_outage() -> None:
        deadline = time.time() + 180
        while time.time() < deadline:  # once both running trials have checkpointed at least once
            fs.invalidate_cache()
            checkpointed = {p.split("/")[-3] for p in fs.glob(f"{experiment}/train_trial_*/checkpoint_*/trainer.pt")}
            if len(checkpointed) >= 2:
                outage["checkpointed_trials"] = len(checkpointed)
                break
            time.sleep(0.2)
        outage["start"] = time.time()
        s3.stop()
        time.sleep(OUTAGE_S)
        s3.start()
        outage["end"] = time.time()

    watcher = threading.Thread(target=storage_outage, daemon=True)
    watcher.start()
    result = run_sweep(SweepOptions(
        model="sasrec", space=tiny_space(tmp_path, LR_SPACE), name=name, storage=storage, sets=list(TINY), search="random",
        scheduler="fifo", num_samples=3, max_epochs=5, max_concurrent=2, cpus_per_trial=0.5, wandb="off",
        max_failures=2, verbose=0, evaluate_test=False))
    watcher.join(timeout=30)
    assert "end" in outage, "the outage never happened"

    trials, history = result.trials, result.history
    assert len(trials) == 3 and (trials["status"] == "finished").all(), trials[["trial_id", "status", "error"]]
    for trial_id, group in history.groupby("trial_id"):
        assert sorted(set(group["epoch"])) == [1, 2, 3, 4, 5], (trial_id, group["epoch"].tolist())
    # The outage fell inside the sweep: two trials had checkpointed before it (the watcher's
    # condition), and epochs were reported after it. (Not "reported before it" from history:
    # on a loaded machine a trial the outage failed can retrain its first epoch after it,
    # and history keeps an epoch's last report.)
    assert outage["checkpointed_trials"] >= 2
    assert history["reported_at"].max() > outage["end"]
    # Everything on S3 reads back: the exported tables and every checkpoint that Ray kept.
    fs.invalidate_cache()
    assert len(read_parquet(f"{storage}/{name}/history.parquet")) == len(history)
    checkpoints = fs.glob(f"{experiment}/train_trial_*/checkpoint_*/trainer.pt")
    assert len(checkpoints) >= 3
    for path in checkpoints:
        assert load_state(f"s3://{path}")["epoch"] >= 1


OUTAGE_S = 4.0


def test_a_checkpoint_that_storage_lost_is_written_again_once_storage_is_back(s3, tmp_path):
    """Ray uploads checkpoints with pyarrow's copy_files, which on S3 returns as if it had
    succeeded while the endpoint is down (bench/chaos.py: a finished trial whose registered
    last checkpoint never existed). After each report the trial checks storage and writes
    what is missing again, waiting out the outage."""
    from rayrec.tune.trainable import ensure_persisted

    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "trainer.pt").write_bytes(os.urandom(300_000))
    (local / "reports.json").write_text('[{"epoch": 4}]')
    fs, root = pyarrow_filesystem(f"s3://{BUCKET}/lost")
    path = f"{root}/train_trial_x/checkpoint_000003"
    # What Ray left: the upload of reports.json went through, trainer.pt's did not.
    fs.create_dir(path)
    with fs.open_output_stream(f"{path}/reports.json") as out:
        out.write((local / "reports.json").read_bytes())

    s3.stop()
    restart = threading.Timer(3.0, s3.start)
    restart.start()
    started = time.time()
    retries = ensure_persisted(str(local), fs, path, deadline_s=120)
    restart.join()
    assert retries >= 1 and time.time() - started >= 3.0  # it waited for the outage to end
    check = s3fs_fresh()
    assert check.cat(f"{path}/trainer.pt") == (local / "trainer.pt").read_bytes()
    assert check.cat(f"{path}/reports.json") == (local / "reports.json").read_bytes()
    assert ensure_persisted(str(local), fs, path) == 0  # complete now: one listing, nothing written


def test_a_trial_restarting_during_an_outage_waits_for_storage_to_find_its_own_checkpoint(s3):
    """A trial that restarts while storage is down (Tune handing it no checkpoint) must not
    decide it has none of its own and retrain from scratch: it waits for storage to answer."""
    from rayrec.tune.trainable import own_checkpoints

    fs, root = pyarrow_filesystem(f"s3://{BUCKET}/restart")
    trial = f"{root}/train_trial_y"
    for index, epoch in ((0, 1), (1, 2)):
        fs.create_dir(f"{trial}/checkpoint_00000{index}")
        with fs.open_output_stream(f"{trial}/checkpoint_00000{index}/reports.json") as out:
            out.write(json.dumps([{"epoch": e} for e in range(1, epoch + 1)]).encode())
    s3.stop()
    restart = threading.Timer(3.0, s3.start)
    restart.start()
    started = time.time()
    found = own_checkpoints(fs, trial, wait_s=120)
    restart.join()
    assert time.time() - started >= 3.0
    assert [(epoch, index) for epoch, index, _ in found] == [(2, 1), (1, 0)]


def test_a_trial_gives_up_on_storage_that_never_answers_and_starts_without_its_checkpoints():
    import fsspec
    import pyarrow.fs

    from rayrec.tune.trainable import own_checkpoints

    class Down(pyarrow.fs.FSSpecHandler):
        def get_file_info_selector(self, selector):
            raise OSError("connection refused")

    fs = pyarrow.fs.PyFileSystem(Down(fsspec.filesystem("memory")))
    started = time.time()
    assert own_checkpoints(fs, "/trial", wait_s=2) == []
    assert 1.0 <= time.time() - started < 10


def test_a_checkpoint_that_never_reaches_storage_fails_the_trial_with_a_clear_error(tmp_path):
    import pyarrow.fs

    from rayrec.tune.trainable import ensure_persisted

    local = tmp_path / "ckpt"
    local.mkdir()
    (local / "trainer.pt").write_bytes(b"x" * 10)

    class Refusing(pyarrow.fs.FSSpecHandler):  # a store that accepts nothing
        def open_output_stream(self, path, metadata):
            raise OSError("storage refuses writes")

    import fsspec

    fs = pyarrow.fs.PyFileSystem(Refusing(fsspec.filesystem("memory")))
    with pytest.raises(RuntimeError, match=r"not in storage after 2 s of retries \(missing or short: trainer.pt\)"):
        ensure_persisted(str(local), fs, "/nowhere/checkpoint_000001", deadline_s=2)
