"""Sweeps on the shared Ray instance: pruning, PBT exploits, search algorithms, parity,
failure retry, resume after a killed driver, GPU packing. Tiny data and models throughout."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import REPO, TINY, failing_trainable, tiny_space, wait_for_killed_drivers_reaped, wait_until
from rayrec.config import build_config
from rayrec.experiment import REPORTS_FILE
from rayrec.storage import read_parquet
from rayrec.tune.sweep import SweepOptions, run_sweep

pytestmark = pytest.mark.ray



LR = {"dist": "loguniform", "low": 1e-4, "high": 3e-2}
WD = {"dist": "loguniform", "low": 0.01, "high": 0.3}


@pytest.fixture(scope="module")
def tiny_data():
    from rayrec.data import load_split

    return load_split(build_config("sasrec", overrides=dict(s.split("=") for s in TINY[:3])).data)


def sweep(tmp_path, data, trial_function=None, **kwargs):
    opts = SweepOptions(model="sasrec", storage=str(tmp_path / "sweeps"), sets=list(TINY), wandb="off",
                        cpus_per_trial=0.5, verbose=0, **kwargs)
    return run_sweep(opts, data=data, trial_function=trial_function)


def test_asha_prunes_some_trials_and_lets_others_finish(ray_session, tmp_path, tiny_data):
    space = tiny_space(tmp_path, {"train.lr": LR})
    result = sweep(tmp_path, tiny_data, space=space, name="asha", search="random", scheduler="asha",
                   num_samples=9, max_epochs=6, grace_period=1, reduction_factor=3, seed=3)
    history = read_parquet(os.path.join(result.experiment, "history.parquet"))
    epochs = history.groupby("trial_id")["epoch"].max()
    assert len(epochs) == 9
    assert (epochs == 1).any(), f"no trial stopped at the grace period: {epochs.to_dict()}"
    assert (epochs == 6).any(), f"no trial reached max epochs: {epochs.to_dict()}"
    trials = read_parquet(os.path.join(result.experiment, "trials.parquet"))
    assert set(trials["status"]) <= {"pruned", "finished", "early_stopped"}
    assert (trials["status"] == "pruned").sum() == (epochs < 6).sum()
    # Test metrics never reach Tune.
    assert not [c for c in history.columns if c.startswith("test")]


def test_pbt_exploit_continues_from_donor_weights_with_mutated_config(ray_session, tmp_path, tiny_data):
    space = tiny_space(tmp_path, {"train.lr": LR, "train.weight_decay": WD}, mutate=["train.lr", "train.weight_decay"])
    result = sweep(tmp_path, tiny_data, space=space, name="pbt", search="random", scheduler="pbt",
                   num_samples=4, max_epochs=6, perturbation_interval=2, quantile_fraction=0.25, pbt_synch=True,
                   seed=1)
    history = read_parquet(os.path.join(result.experiment, "history.parquet"))
    # No reported epoch lost: a paused trial's first epochs can miss from Ray's result file,
    # and come back from its own checkpoints (export._with_checkpoint_reports).
    for trial_id, group in history.groupby("trial_id"):
        assert sorted(group["epoch"]) == [1, 2, 3, 4, 5, 6], (trial_id, sorted(group["epoch"]))
    restored = history[history["restored_epoch"] > 0]
    exploits = 0
    for _, row in restored.iterrows():
        at_epoch = history[history["epoch"] == row["restored_epoch"]]
        match = at_epoch[np.isclose(at_epoch["weights_checksum"], row["restored_checksum"], rtol=0, atol=1e-6)]
        # Every restore starts from weights some trial reported at that epoch: its own after a
        # synch pause, or a donor's after an exploit.
        assert len(match), f"restore from unknown weights: {row.to_dict()}"
        # The restored optimiser uses the trial's own (possibly mutated) weight decay.
        assert row["optimizer_weight_decay"] == pytest.approx(row["config_weight_decay"])
        donors = match[match["trial_id"] != row["trial_id"]]
        if len(donors) and not (match["trial_id"] == row["trial_id"]).any():
            exploits += 1
            assert row["config_lr"] != pytest.approx(donors.iloc[0]["config_lr"]), "exploit did not mutate train.lr"
    assert exploits >= 1, "PBT never exploited"


def test_grid_covers_its_grid_exactly_once_and_best_config_reproduces(ray_session, tmp_path, tiny_data):
    space = tiny_space(tmp_path, {
        "train.lr": {**LR, "grid": [1e-3, 1e-2]},
        "model.dropout": {"dist": "uniform", "low": 0.1, "high": 0.5, "grid": [0.1, 0.3]},
    })
    result = sweep(tmp_path, tiny_data, space=space, name="grid", search="grid", scheduler="fifo", max_epochs=2)
    trials = result.trials
    combos = sorted(zip(trials["config/train.lr"], trials["config/model.dropout"]))
    assert combos == sorted([(a, b) for a in (1e-3, 1e-2) for b in (0.1, 0.3)])
    assert (trials["status"] == "finished").all()

    # Parity: `rayrec train --config best.yaml` reproduces the best trial's validation metric.
    from rayrec.config import config_from_dict, load_yaml
    from rayrec.train.run import train_run

    cfg = config_from_dict(load_yaml(os.path.join(result.experiment, "best.yaml")))
    run = train_run(cfg, tiny_data, output=str(tmp_path / "retrain"))
    assert run.fit.best_metrics["val_ndcg@10"] == pytest.approx(result.best["value"], abs=1e-6)
    # The best checkpoint was evaluated on test once, with the same weights.
    assert result.best["test"]["ndcg@10"] == pytest.approx(run.test_metrics["ndcg@10"], abs=1e-6)

    # Resuming with a changed search space is refused, naming the change, before Ray runs anything.
    from rayrec.errors import UserError

    changed = tiny_space(tmp_path, {"train.lr": {**LR, "grid": [1e-3, 3e-2]},
                                    "model.dropout": {"dist": "uniform", "low": 0.1, "high": 0.5, "grid": [0.1, 0.3]}})
    with pytest.raises(UserError, match=r"changed search space \(params.train.lr"):
        run_sweep(SweepOptions(model="sasrec", name="grid", storage=str(tmp_path / "sweeps"), space=changed,
                               resume=True, wandb="off", verbose=0))


def test_hyperopt_proposes_its_own_seeded_points_and_random_search_others(ray_session, tmp_path, tiny_data):
    """The hyperopt sweep's first trials are exactly what HyperOpt (TPE's random start, same
    seed) suggests outside Tune; random search with the same seed draws other points."""
    from ray.tune.search.hyperopt import HyperOptSearch

    from rayrec.tune.space import load_space

    space = tiny_space(tmp_path, {"train.lr": LR, "model.loss": {"dist": "choice", "values": ["ce", "bce"]}})
    configs = {}
    for search in ("hyperopt", "random"):
        result = sweep(tmp_path, tiny_data, space=space, name=f"s-{search}", search=search, scheduler="fifo",
                       num_samples=3, max_epochs=1, evaluate_test=False)
        assert len(result.trials) == 3
        assert (result.trials["status"] == "finished").all()
        assert result.trials["config/train.lr"].nunique() == 3
        configs[search] = {(round(lr, 12), loss) for lr, loss in
                           zip(result.trials["config/train.lr"], result.trials["config/model.loss"])}

    # n_initial_points = max(2, 3 // 3) and the searcher seed 0, as tuner.tune_config builds it:
    # its two random starting points are trials of the hyperopt sweep (the third is TPE's).
    hyperopt = HyperOptSearch(n_initial_points=2, random_state_seed=0)
    hyperopt.set_search_properties("val_ndcg@10", "max", load_space("sasrec", space).tune_domains("hyperopt"))
    expected = [hyperopt.suggest(f"t{i}") for i in range(2)]
    assert {(round(e["train.lr"], 12), e["model.loss"]) for e in expected} <= configs["hyperopt"]
    assert not configs["hyperopt"] & configs["random"]


def test_failed_trial_is_retried_from_its_checkpoint(ray_session, tmp_path, tiny_data):
    from ray import tune

    space = tiny_space(tmp_path, {"train.lr": {**LR, "grid": [3e-3]}})
    result = sweep(tmp_path, tiny_data, space=space, name="retry", search="grid", scheduler="fifo", max_epochs=3,
                   max_failures=1, extra_space={"_fail_at_epoch": tune.grid_search([0, 2])}, evaluate_test=False,
                   trial_function=failing_trainable())
    trials = result.trials
    assert len(trials) == 2 and (trials["status"] == "finished").all(), trials["error"].tolist()
    history = result.history
    restored = history[history["restored_epoch"] > 0]
    assert len(restored) == 1 and restored.iloc[0]["restored_epoch"] == 1, "retry did not resume from epoch 1"
    assert trials["restores"].sum() == 1

    # Without retries the failure is recorded, and the other trial still finishes.
    result = sweep(tmp_path, tiny_data, space=space, name="noretry", search="grid", scheduler="fifo", max_epochs=3,
                   max_failures=0, extra_space={"_fail_at_epoch": tune.grid_search([0, 2])}, evaluate_test=False,
                   trial_function=failing_trainable())
    statuses = sorted(result.trials["status"])
    assert statuses == ["errored", "finished"]
    assert "injected failure" in result.trials.loc[result.trials["status"] == "errored", "error"].iloc[0]


def test_fractional_gpus_pack_four_trials_on_one_gpu(ray_session, tmp_path, tiny_data):
    space = tiny_space(tmp_path, {"train.lr": LR})
    # Each trial waits after its first epoch until all four are running (conftest's barrier),
    # so a trial that could not get its quarter of the GPU fails the sweep.
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    result = sweep(tmp_path, tiny_data, space=space, name="pack", search="random", scheduler="fifo",
                   num_samples=4, max_epochs=3, gpus_per_trial=0.25, evaluate_test=False, max_failures=0,
                   extra_space={"_barrier": f"{barrier}:4"}, trial_function=failing_trainable())
    assert (result.trials["status"] == "finished").all(), result.trials[["status", "error"]]
    assert len(os.listdir(barrier)) == 4
    history = result.history
    assert set(history["gpu_ids"].astype(str)) == {"0"}
    spans = history.groupby("trial_id").agg(start=("trial_started", "min"), end=("reported_at", "max"))
    # All four ran at the same time: the last trial to start did so before the first one ended.
    assert spans["start"].max() < spans["end"].min(), spans


def test_resume_after_killed_driver_finishes_every_trial_once(ray_session, tmp_path):
    # Six trials, killed once two have finished (their last checkpoints are on storage). Each
    # epoch pauses 0.3 s (conftest's hook): tiny trials on reused actors otherwise go by
    # faster than the test can watch, and the driver had sometimes finished them all first.
    space = tiny_space(tmp_path, {"train.lr": LR})
    storage = tmp_path / "sweeps"
    hooks = {"_epoch_pause_s": 0.3}
    script = (
        f"import sys\nsys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from conftest import failing_trainable\n"
        "from rayrec.tune.sweep import SweepOptions, run_sweep\n"
        f"run_sweep(SweepOptions(model='sasrec', name='killed', storage={str(storage)!r}, space={space!r},"
        f" sets={TINY!r}, search='random', scheduler='fifo', num_samples=6, max_epochs=4, max_concurrent=1,"
        f" cpus_per_trial=1, wandb='off', verbose=0, evaluate_test=False,"
        f" address={ray_session.get_runtime_context().gcs_address!r}, extra_space={hooks!r}),"
        " trial_function=failing_trainable())\n"
    )
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    experiment = storage / "killed"
    deadline = time.time() + 240
    finished: set[str] = set()
    try:
        while time.time() < deadline and len(finished) < 2:
            time.sleep(0.2)
            finished = _finished_trials(experiment, max_epochs=4)
            assert driver.poll() is None, "driver exited before it could be killed"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert len(finished) >= 2, "no trial finished before the deadline"
    wait_for_killed_drivers_reaped(ray_session)

    result = run_sweep(SweepOptions(name="killed", storage=str(storage), resume=True, wandb="off", verbose=0,
                                    cpus_per_trial=1, evaluate_test=False, extra_space=hooks),
                       trial_function=failing_trainable())
    trials = result.trials
    assert len(trials) == 6
    assert (trials["status"] == "finished").all()
    history = result.history
    assert sorted(history.groupby("trial_id")["epoch"].max()) == [4] * 6
    assert sorted(history.groupby("trial_id")["epoch"].count()) == [4] * 6
    # Trials that finished before the kill were kept, not rerun: one process, no restore.
    assert finished <= set(trials["trial_id"])
    # (Its result file can reach storage before the experiment state saying it ended: then
    # it is restored at its end and only re-reports its last epoch, `replayed`.)
    replay = history["replayed"].fillna(0) == 1 if "replayed" in history else pd.Series(False, index=history.index)
    restored = history["restored_epoch"].fillna(0) > 0
    for trial_id in finished:
        rows = history["trial_id"] == trial_id
        assert history.loc[rows, "trained_pid"].nunique() == 1
        assert replay[rows & restored].all(), history.loc[rows]
    # A trial cut off mid-way continued from its checkpoint, not from scratch.
    resumed = history[restored & ~replay]
    assert set(resumed["trial_id"]).isdisjoint(finished)


def test_a_driver_killed_after_its_last_trial_but_before_export_is_resumed_to_a_complete_sweep(ray_session, tmp_path, tiny_data):
    """Every trial had finished and Tune's state said so, but the driver died before the export
    (found by bench/chaos.py: Tune then runs no step, and the resume exported every trial as
    interrupted, for ever). The resume exports the sweep complete, and retrains nothing."""
    from rayrec.experiment import BEST_FILE, HISTORY_FILE, SUMMARY_FILE, TRIALS_FILE

    space = tiny_space(tmp_path, {"train.lr": LR})
    first = sweep(tmp_path, tiny_data, space=space, name="unexported", search="random", scheduler="fifo",
                  num_samples=2, max_epochs=2, evaluate_test=False)
    assert not first.status.partial
    experiment = tmp_path / "sweeps" / "unexported"
    for name in (SUMMARY_FILE, BEST_FILE, TRIALS_FILE, HISTORY_FILE):  # what the kill left unwritten
        (experiment / name).unlink()
    again = run_sweep(SweepOptions(name="unexported", storage=str(tmp_path / "sweeps"), resume=True, wandb="off",
                                   verbose=0, cpus_per_trial=0.5, evaluate_test=False), data=tiny_data)
    assert not again.status.partial and again.status.trials_finished == 2
    assert (again.trials["status"] == "finished").all()
    assert again.history.groupby("trial_id")["trained_pid"].nunique().eq(1).all()
    pd.testing.assert_frame_equal(again.history[first.history.columns], first.history)
    assert "partial" not in (experiment / SUMMARY_FILE).read_text().split("status:")[1].splitlines()[0]


def test_resume_reports_checkpointed_epochs_the_killed_driver_never_saw(ray_session, tmp_path):
    """The trial SIGKILLs its driver just before writing its epoch-2 checkpoint: storage holds
    the checkpoint, the driver's experiment state does not. The resumed sweep must take the
    newer checkpoint and report epoch 2 as trained, not train it again."""
    space = tiny_space(tmp_path, {"train.lr": LR})
    storage = tmp_path / "sweeps"
    script = (
        "import os, sys\n"
        f"sys.path.insert(0, {str(REPO / 'tests')!r})\n"
        "from conftest import failing_trainable\n"
        "from rayrec.tune.sweep import SweepOptions, run_sweep\n"
        f"run_sweep(SweepOptions(model='sasrec', name='lost', storage={str(storage)!r}, space={space!r},"
        f" sets={TINY!r}, search='random', scheduler='fifo', num_samples=1, max_epochs=4, cpus_per_trial=1,"
        f" wandb='off', verbose=0, evaluate_test=False,"
        f" address={ray_session.get_runtime_context().gcs_address!r},"
        " extra_space={'_kill_driver_at_epoch': 2, '_driver_pid': os.getpid()}), trial_function=failing_trainable())\n"
    )
    driver = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=240)
    assert driver.returncode == -signal.SIGKILL, driver.stderr.decode()[-2000:]
    wait_for_killed_drivers_reaped(ray_session)

    # Tune's restore wants the same param_space keys; the hook fires only in a from-scratch attempt.
    result = run_sweep(SweepOptions(name="lost", storage=str(storage), resume=True, wandb="off", verbose=0,
                                    cpus_per_trial=1, evaluate_test=False,
                                    extra_space={"_kill_driver_at_epoch": 2, "_driver_pid": 0}),
                       trial_function=failing_trainable())
    history = result.history.sort_values("epoch")
    assert history["epoch"].tolist() == [1, 2, 3, 4]
    assert (result.trials["status"] == "finished").all()
    by_epoch = history.set_index("epoch")
    # Epochs 1-2 were trained once, by the killed run's process; 3-4 by the resumed one,
    # which started from the epoch-2 checkpoint the old driver never registered.
    assert by_epoch.loc[1, "trained_pid"] == by_epoch.loc[2, "trained_pid"] != by_epoch.loc[3, "trained_pid"] == by_epoch.loc[4, "trained_pid"]
    assert by_epoch.loc[2, "replayed"] == 1
    assert by_epoch.loc[3, "restored_epoch"] == 2


def test_interrupted_sweep_is_exported_as_partial_and_a_complete_one_is_not_resumed(ray_session, tmp_path):
    """Ctrl-C mid-sweep: Tune stops, and the export says partial (summary.yaml, best.yaml, the
    exit status) instead of publishing a winner. The resume completes it; resuming the
    complete sweep again says so and touches nothing."""
    import yaml
    from typer.testing import CliRunner

    from rayrec.cli import app

    space = tiny_space(tmp_path, {"train.lr": LR})
    storage = tmp_path / "sweeps"
    cmd = [sys.executable, "-m", "rayrec", "sweep", "sasrec", "--space", space, "--name", "cut",
           "--storage", str(storage), "--search", "random", "--scheduler", "fifo", "--num-samples", "4",
           "--max-epochs", "4", "--max-concurrent", "1", "--cpus-per-trial", "1", "--wandb", "off",
           "--address", ray_session.get_runtime_context().gcs_address, "--no-test"]
    for s in TINY:
        cmd += ["--set", s]
    experiment = storage / "cut"
    with open(tmp_path / "out.txt", "w") as out, open(tmp_path / "err.txt", "w") as err:
        driver = subprocess.Popen(cmd, stdout=out, stderr=err, start_new_session=True)
        try:
            # Until the driver has recorded a finished trial (its progress line; a trial's own last
            # report may not have reached the driver yet). Generous bound: a loaded machine is slow.
            wait_until(lambda: "finished at epoch 4" in (tmp_path / "err.txt").read_text() or driver.poll() is not None,
                       480, "the driver to record a finished trial")
            assert driver.poll() is None, "driver exited before it could be interrupted"
            driver.send_signal(signal.SIGINT)  # Ctrl-C
            driver.wait(timeout=300)
        finally:
            if driver.poll() is None:
                os.killpg(driver.pid, signal.SIGKILL)
                driver.wait()
    output = (tmp_path / "out.txt").read_text()
    assert driver.returncode == 130, output + (tmp_path / "err.txt").read_text()[-2000:]
    assert "interrupted (" in output and "--resume --name cut" in output and "reproduce:" not in output
    summary = yaml.safe_load((experiment / "summary.yaml").read_text())
    assert summary["status"] == "partial" and summary["trials_planned"] == 4
    assert summary["trials_finished"] < 4 and "test" not in summary["best"]  # test is not looked at
    best_text = (experiment / "best.yaml").read_text()
    assert best_text.startswith("# PARTIAL: the best of an unfinished sweep")
    assert yaml.safe_load(best_text)["sweep"]["status"] == "partial"
    trials = read_parquet(str(experiment / "trials.parquet"))
    assert (trials["status"] == "finished").sum() == summary["trials_finished"]
    # FIFO prunes nothing: a trial the interrupt cut off is "interrupted" (the trials not yet
    # started are simply absent).
    assert set(trials["status"]) <= {"finished", "interrupted"}
    assert summary["best"]["trial_id"] in set(trials.loc[trials["status"] == "finished", "trial_id"])
    wait_for_killed_drivers_reaped(ray_session)

    result = run_sweep(SweepOptions(name="cut", storage=str(storage), resume=True, wandb="off", verbose=0,
                                    cpus_per_trial=1, evaluate_test=False))
    assert not result.status.partial and (result.trials["status"] == "finished").sum() == 4
    summary = yaml.safe_load((experiment / "summary.yaml").read_text())
    assert (summary["status"], summary["trials_finished"], summary["trials_planned"]) == ("complete", 4, 4)
    best_text = (experiment / "best.yaml").read_text()
    assert not best_text.startswith("#") and yaml.safe_load(best_text)["sweep"]["status"] == "complete"

    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in experiment.rglob("*") if p.is_file()}
    again = CliRunner().invoke(app, ["sweep", "--resume", "--name", "cut", "--storage", str(storage),
                                     "--wandb", "off"])
    assert again.exit_code == 0, again.output
    assert "is already complete (4 of 4 trials finished" in again.stdout and "nothing rewritten" in again.stdout
    after = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in experiment.rglob("*") if p.is_file()}
    assert after == before


def _finished_trials(experiment, max_epochs: int) -> set[str]:
    """Trials whose last checkpoint is on storage: written by the trial itself, ahead of the
    driver's files (result.json, the experiment state), which reach storage at its snapshots."""
    import json

    done = set()
    for reports_file in experiment.glob(f"train_trial_*/checkpoint_*/{REPORTS_FILE}"):
        try:
            reports = json.loads(reports_file.read_text())
        except (OSError, ValueError):
            continue  # being written, or rotated out while we looked
        if reports and reports[-1].get("epoch") == max_epochs:
            done.add(reports[-1]["trained_by"])
    return done


def test_history_gets_back_epochs_only_the_checkpoint_remembers(tmp_path):
    """A result file that lost epoch 2 (a stale copy restored after a storage outage) is
    completed from the reports in the trial's checkpoint; a PBT donor's epochs are not."""
    import json

    from ray import tune

    from rayrec.tune.export import _with_checkpoint_reports

    ckpt = tmp_path / "checkpoint_000002"
    ckpt.mkdir()
    reports = [{"epoch": e, "val_ndcg@10": 0.1 * e, "trained_by": "t1"} for e in (1, 2, 3)]
    reports.insert(0, {"epoch": 0.5, "val_ndcg@10": 0.9, "trained_by": "donor"})
    (ckpt / REPORTS_FILE).write_text(json.dumps(reports))
    frame = pd.DataFrame({"epoch": [1, 3], "val_ndcg@10": [0.1, 0.3], "trial_id": ["t1", "t1"]})

    merged = _with_checkpoint_reports(frame, tune.Checkpoint.from_directory(str(ckpt)), "t1")
    assert merged["epoch"].tolist() == [1, 2, 3]
    assert merged["val_ndcg@10"].tolist() == pytest.approx([0.1, 0.2, 0.3])
    assert merged["from_checkpoint"].fillna(0).tolist() == [0, 1, 0]
    # Nothing missing: the frame comes back as it was.
    full = merged[["epoch", "val_ndcg@10", "trial_id"]]
    assert _with_checkpoint_reports(full, tune.Checkpoint.from_directory(str(ckpt)), "t1") is full


def test_history_gets_back_a_pbt_trials_first_epochs_from_its_older_checkpoints(tmp_path):
    """Under synchronous PBT a paused trial's result file can lack its first epochs, and after
    an exploit at the end its latest checkpoint holds the donor's lineage: the trial's own
    epochs come back from its older checkpoints, newest first (seen in this file's PBT test)."""
    import json

    from ray import tune

    from rayrec.tune.export import _with_checkpoint_reports

    def checkpoint(index: int, reports: list[tuple[int, str, float]]):
        path = tmp_path / "train_trial_t0" / f"checkpoint_00000{index}"
        path.mkdir(parents=True)
        rows = [{"epoch": e, "trained_by": by, "weights_checksum": c} for e, by, c in reports]
        (path / REPORTS_FILE).write_text(json.dumps(rows))
        return tune.Checkpoint.from_directory(str(path))

    checkpoint(0, [(1, "t0", 1.0), (2, "t0", 2.0)])
    checkpoint(1, [(1, "t0", 1.0), (2, "t0", 2.0), (3, "t0", 3.0), (4, "t0", 4.0)])
    latest = checkpoint(2, [(e, "t3", 30.0 + e) for e in range(1, 7)])  # the exploit copied t3's epoch 6
    frame = pd.DataFrame({"epoch": [3, 4, 5, 6], "weights_checksum": [3.0, 4.0, 5.0, 36.0], "trial_id": ["t0"] * 4})

    merged = _with_checkpoint_reports(frame, latest, "t0")
    assert merged["epoch"].tolist() == [1, 2, 3, 4, 5, 6]
    assert merged["weights_checksum"].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 36.0]  # t0's own, never the donor's
    assert merged["from_checkpoint"].fillna(0).tolist() == [1, 1, 0, 0, 0, 0]


def test_tunes_per_trial_state_keeps_no_metric_windows_and_only_restore_counters_per_checkpoint(tmp_path):
    """What every snapshot writes per trial: without the last-5/last-10 windows of every
    metric, and with only Ray's restore counters (and the epoch) per kept checkpoint, a
    trial's state is a quarter of its size; restore reads the same counters."""
    from ray import tune
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult
    from ray.tune.trainable.metadata import _TrainingRunMetadata

    from rayrec.tune.tuner import slim_trial_state

    report = {f"val_metric{i}@10": 0.1 * i for i in range(40)}
    full = _TrainingRunMetadata(n_steps=(5, 10))  # Tune's default, for the comparison
    slim_trial_state()
    slim = _TrainingRunMetadata()
    for step in (1, 2, 3):
        for meta in (full, slim):
            for key, value in report.items():
                meta.update_metric(key, value + step, step)
    assert slim.metric_analysis["val_metric3@10"] == {"max": 3.3, "min": 1.3, "avg": pytest.approx(2.3), "last": 3.3}
    assert all(not windows for windows in slim.metric_n_steps.values())
    assert len(slim.get_json_state()) < 0.3 * len(full.get_json_state())

    manager = _CheckpointManager(tune.CheckpointConfig(num_to_keep=2))
    metrics = {**report, "training_iteration": 7, "time_total_s": 12.5, "timesteps_total": None, "epoch": 7,
               "trial_id": "x"}
    for i in range(3):
        (tmp_path / f"checkpoint_00000{i}").mkdir()
        manager.register_checkpoint(_TrainingResult(
            checkpoint=tune.Checkpoint(path=str(tmp_path / f"checkpoint_00000{i}")), metrics=dict(metrics)))
    kept = manager.best_checkpoint_results
    assert len(kept) == 2 and kept[-1].checkpoint.path.endswith("checkpoint_000002")
    assert kept[-1].metrics == {"training_iteration": 7, "time_total_s": 12.5, "timesteps_total": None, "epoch": 7}
    assert not (tmp_path / "checkpoint_000000").exists()  # rotation works as before


def test_snapshot_cadence_keeps_to_its_budget_above_rayrecs_floor(monkeypatch):
    """Experiment-state snapshots: period = 19 x the last snapshot's duration (5% of the
    driver's time), floored at 0 s on local storage and 5 s on object stores; a user's own
    TUNE_GLOBAL_CHECKPOINT_S is left alone."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from rayrec.tune.tuner import adaptive_snapshots

    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    adaptive_snapshots(min_period=0.0)
    manager = _ExperimentCheckpointManager(storage=None, checkpoint_period=os.environ["TUNE_GLOBAL_CHECKPOINT_S"])
    assert manager.auto_checkpoint_enabled
    manager._update_auto_checkpoint_time(0.002)  # a small sweep: a snapshot after (nearly) every step
    assert manager._checkpoint_period == pytest.approx(0.038)
    manager._update_auto_checkpoint_time(0.5)  # a large one: every 9.5 s
    assert manager._checkpoint_period == pytest.approx(9.5)
    adaptive_snapshots(min_period=5.0)  # an object store: each snapshot is an upload
    manager._update_auto_checkpoint_time(0.002)
    assert manager._checkpoint_period == 5.0
    monkeypatch.setenv("TUNE_GLOBAL_CHECKPOINT_S", "7")
    adaptive_snapshots(min_period=0.0)
    assert os.environ["TUNE_GLOBAL_CHECKPOINT_S"] == "7"
    assert not _ExperimentCheckpointManager(storage=None, checkpoint_period="7").auto_checkpoint_enabled



def test_snapshot_budget_counts_the_upload_of_the_drivers_files(monkeypatch, tmp_path):
    """Each snapshot starts an upload of the driver's directory (every trial's result files):
    its measured seconds join the snapshot's in the 5% budget, and an upload stuck behind a
    storage outage stretches the period to 300 s at most."""
    import pyarrow.fs
    from ray.train._internal.storage import _FilesystemSyncer
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    from rayrec.tune.tuner import adaptive_snapshots

    monkeypatch.delenv("TUNE_GLOBAL_CHECKPOINT_S", raising=False)
    adaptive_snapshots(min_period=0.0)
    local = tmp_path / "driver"
    for i in range(200):
        (local / f"trial_{i}").mkdir(parents=True)
        (local / f"trial_{i}" / "result.json").write_text('{"epoch": 1}\n' * 50)
    syncer = _FilesystemSyncer(storage_filesystem=pyarrow.fs.LocalFileSystem())
    assert syncer.sync_up(str(local), str(tmp_path / "storage"))
    syncer.wait()
    assert (tmp_path / "storage" / "trial_199" / "result.json").read_text() == '{"epoch": 1}\n' * 50
    upload_s = syncer._rayrec_upload_s
    assert upload_s > 0

    class Storage:  # what the manager reads of Ray's StorageContext
        pass

    storage = Storage()
    storage.syncer = syncer
    manager = _ExperimentCheckpointManager(storage=storage, checkpoint_period="auto")
    manager._update_auto_checkpoint_time(0.01)
    assert manager._checkpoint_period == pytest.approx(19 * (0.01 + upload_s))
    syncer._rayrec_upload_s = 196.0  # an upload that waited out a storage outage
    manager._update_auto_checkpoint_time(0.01)
    assert manager._checkpoint_period == 300.0


def test_time_budget_ends_the_sweep_as_complete_with_the_trials_it_made(ray_session, tmp_path, tiny_data):
    """`rayrec compare --minutes` (SweepOptions.time_budget_s): the clock, not num_samples,
    ends the search; what it stopped is the whole sweep, exported complete, never partial."""
    space = tiny_space(tmp_path, {"train.lr": LR}, fixed={"train.patience": 1000})
    started = time.monotonic()
    result = sweep(tmp_path, tiny_data, space=space, name="clock", search="random", scheduler="fifo",
                   num_samples=200, max_epochs=100_000, time_budget_s=30, max_concurrent=2, seed=5)
    elapsed = time.monotonic() - started
    trials = result.trials
    assert 1 <= len(trials) < 200  # the clock ended it long before 200 trials of 100,000 epochs
    assert not result.status.partial and result.status.trials_planned == len(trials)
    assert elapsed < 30 + 90, elapsed  # Ray's start-up and the export on top of the budget
    history = read_parquet(os.path.join(result.experiment, "history.parquet"))
    assert history.groupby("trial_id")["epoch"].max().max() < 100_000  # trials were stopped, not finished
    import yaml

    summary = yaml.safe_load(open(os.path.join(result.experiment, "summary.yaml")))
    assert summary["status"] == "complete" and summary["best"]["value"] == pytest.approx(
        trials["best_val_ndcg@10"].max())


def test_a_lost_checkpoint_of_the_trials_own_is_restored_from_its_next_one(tmp_path):
    """A resume can name a checkpoint the trial has rotated out since the experiment state in
    storage was written: the oldest later one that holds both files stands in. Another trial's (a PBT donor's) or an existing one is left as handed."""
    from types import SimpleNamespace

    import pyarrow.fs
    from ray import tune
    from ray.train._internal.session import _TrainingResult

    from rayrec.experiment import REPORTS_FILE, STATE_FILE
    from rayrec.tune.trainable import rotated_checkpoint_stand_in

    trial = tmp_path / "sweep" / "train_trial_00000"
    (trial / "checkpoint_000003").mkdir(parents=True)  # an upload cut short: state without reports
    (trial / "checkpoint_000003" / STATE_FILE).write_bytes(b"x")
    for index in (4, 5):
        (trial / f"checkpoint_00000{index}").mkdir()
        (trial / f"checkpoint_00000{index}" / STATE_FILE).write_bytes(b"x")
        (trial / f"checkpoint_00000{index}" / REPORTS_FILE).write_text("[]")
    fs = pyarrow.fs.LocalFileSystem()
    storage = SimpleNamespace(storage_filesystem=fs, trial_fs_path=str(trial))

    gone = tune.Checkpoint(path=str(trial / "checkpoint_000001"), filesystem=fs)
    stand_in = rotated_checkpoint_stand_in(gone, storage)
    assert stand_in.path == str(trial / "checkpoint_000004")
    result = rotated_checkpoint_stand_in(_TrainingResult(checkpoint=gone, metrics={"epoch": 2}), storage)
    assert result.checkpoint.path == str(trial / "checkpoint_000004") and result.metrics == {"epoch": 2}

    there = tune.Checkpoint(path=str(trial / "checkpoint_000005"), filesystem=fs)
    assert rotated_checkpoint_stand_in(there, storage) is there
    donor = tune.Checkpoint(path=str(tmp_path / "sweep" / "train_trial_00001" / "checkpoint_000001"), filesystem=fs)
    assert rotated_checkpoint_stand_in(donor, storage) is donor
    newest_gone = tune.Checkpoint(path=str(trial / "checkpoint_000007"), filesystem=fs)
    assert rotated_checkpoint_stand_in(newest_gone, storage) is newest_gone  # nothing later: Ray's error stands


def test_a_trial_about_to_restore_from_a_lost_checkpoint_is_handed_its_next_one(tmp_path):
    """LostCheckpointStandIn on Tune's own Trial objects: before a PENDING trial starts, a
    checkpoint of its own that storage no longer holds is swapped for the oldest later one that
    holds both files (Ray's restore would refuse the lost one on every retry); a trial whose
    checkpoint exists keeps it, and a trial that has started is not looked at again."""
    from ray import tune
    from ray.train._internal.session import _TrainingResult
    from ray.train._internal.storage import StorageContext
    from ray.tune.experiment import Trial

    from rayrec.experiment import REPORTS_FILE, STATE_FILE
    from rayrec.tune.trainable import LostCheckpointStandIn

    def trial_with(name: str, handed_index: int, existing: tuple[int, ...]) -> Trial:
        storage = StorageContext(storage_path=str(tmp_path), experiment_dir_name="sweep", trial_dir_name=name)
        trial = Trial("train_trial", trial_id=name, storage=storage, stub=True,
                      checkpoint_config=tune.CheckpointConfig(num_to_keep=2))
        trial_dir = tmp_path / "sweep" / name
        for index in existing:
            (trial_dir / f"checkpoint_{index:06d}").mkdir(parents=True)
            for file in (STATE_FILE, REPORTS_FILE):
                (trial_dir / f"checkpoint_{index:06d}" / file).write_text("x")
        handed = tune.Checkpoint(path=str(trial_dir / f"checkpoint_{handed_index:06d}"))
        trial.run_metadata.checkpoint_manager._latest_checkpoint_result = _TrainingResult(
            checkpoint=handed, metrics={"training_iteration": 2, "epoch": 2})
        return trial

    lost = trial_with("lost", 1, existing=(3, 4))
    kept = trial_with("kept", 1, existing=(1, 2))
    callback = LostCheckpointStandIn()
    callback.on_step_begin(0, [lost, kept])
    assert lost.latest_checkpoint_result.checkpoint.path.endswith("lost/checkpoint_000003")
    assert lost.latest_checkpoint_result.metrics == {"training_iteration": 2, "epoch": 2}  # Tune's counters stay
    assert kept.latest_checkpoint_result.checkpoint.path.endswith("kept/checkpoint_000001")
    lost.run_metadata.checkpoint_manager._latest_checkpoint_result = _TrainingResult(
        checkpoint=tune.Checkpoint(path=str(tmp_path / "sweep" / "lost" / "checkpoint_000009")), metrics={})
    callback.on_step_begin(1, [lost])  # checked once per driver run
    assert lost.latest_checkpoint_result.checkpoint.path.endswith("checkpoint_000009")
