"""Faults, checked: a checkpoint whose upload a kill interrupted is never loaded, and the chaos
campaign's invariant checker (bench/chaos.py) passes on a small campaign with a killed driver."""

from __future__ import annotations

import json
import os
import sys

import pyarrow.fs
import pytest

from conftest import REPO, TINY


def _write_checkpoint(trial_dir, index: int, epoch: int, reports: str | None) -> None:
    from rayrec.experiment import REPORTS_FILE, STATE_FILE
    from rayrec.train.trainer import save_state

    d = trial_dir / f"checkpoint_{index:06d}"
    d.mkdir(parents=True)
    save_state({"epoch": epoch}, str(d / STATE_FILE))
    if reports is not None:
        (d / REPORTS_FILE).write_text(reports)


def test_a_checkpoint_with_missing_or_truncated_reports_is_skipped_for_the_older_complete_one(tmp_path, monkeypatch):
    """Ray uploads trainer.pt and reports.json one by one; a driver, node or trial killed in
    between leaves a newer checkpoint directory that looks loadable. Loading it would resume
    the trial with its earlier epochs' reports forgotten; the newest complete one is taken."""
    from rayrec.tune import trainable

    trial = tmp_path / "train_trial_x"
    lineage = [{"epoch": e, "trained_pid": 1, "reported_at": float(e)} for e in (1, 2)]
    _write_checkpoint(trial, 0, 1, json.dumps(lineage[:1]))
    _write_checkpoint(trial, 1, 2, json.dumps(lineage))  # the newest complete one
    _write_checkpoint(trial, 2, 3, None)  # trainer.pt uploaded, reports.json not yet
    _write_checkpoint(trial, 3, 4, json.dumps(lineage)[:25])  # reports.json cut short
    _write_checkpoint(trial, 4, 5, json.dumps(lineage))  # reports of another state (mixed-up files)
    monkeypatch.setattr(trainable, "_trial_storage", lambda: (pyarrow.fs.LocalFileSystem(), str(trial)))

    state, reports = trainable.newest_own_state(None, "cpu")
    assert state["epoch"] == 2 and [r["epoch"] for r in reports] == [1, 2]
    assert trainable.complete_checkpoint({"epoch": 2}, lineage)
    assert not trainable.complete_checkpoint({"epoch": 3}, []) and not trainable.complete_checkpoint({"epoch": 3}, lineage)


def _lineage(epochs, pid=1):
    return [{"epoch": e, "trained_pid": pid, "reported_at": float(e)} for e in epochs]


def test_the_newest_own_checkpoint_is_the_newest_epoch_of_the_handed_lineage_not_the_highest_index(tmp_path, monkeypatch):
    """After a killed driver's resume Ray numbers a trial's checkpoints from the snapshot's
    count, so a stale directory from before the kill can carry a higher index than the
    trial's newest epoch; and under asynchronous PBT a trial's directory can hold a later
    epoch of the lineage it left for a donor's. Neither may be restored."""
    from rayrec.tune import trainable

    trial = tmp_path / "train_trial_x"
    monkeypatch.setattr(trainable, "_trial_storage", lambda: (pyarrow.fs.LocalFileSystem(), str(trial)))
    _write_checkpoint(trial, 1, 2, json.dumps(_lineage([1, 2])))
    _write_checkpoint(trial, 2, 4, json.dumps(_lineage([1, 2, 3, 4])))  # written after the resume, index reused
    _write_checkpoint(trial, 3, 3, json.dumps(_lineage([1, 2, 3])))  # stale, from before the kill
    state, reports = trainable.newest_own_state(None, "cpu", _lineage([1, 2]))
    assert state["epoch"] == 4 and [r["epoch"] for r in reports] == [1, 2, 3, 4]  # by index it was epoch 3
    assert trainable.newest_own_state(None, "cpu", _lineage([1, 2, 3, 4])) is None  # nothing past epoch 4

    # PBT: the trial copied a donor at epoch 2 and trained epoch 3 on it; its own old lineage
    # (pid 1) reached epoch 4 before that. Tune hands over the new lineage's epoch 3.
    pbt = tmp_path / "train_trial_y"
    monkeypatch.setattr(trainable, "_trial_storage", lambda: (pyarrow.fs.LocalFileSystem(), str(pbt)))
    copied = _lineage([1, 2], pid=7) + _lineage([3], pid=8)
    _write_checkpoint(pbt, 3, 4, json.dumps(_lineage([1, 2, 3, 4])))
    _write_checkpoint(pbt, 4, 3, json.dumps(copied))
    assert trainable.newest_own_state(None, "cpu", copied) is None
    _write_checkpoint(pbt, 5, 4, json.dumps(copied + _lineage([4], pid=8)))  # its own continuation counts
    assert trainable.newest_own_state(None, "cpu", copied)[0]["epoch"] == 4


def test_the_chaos_checker_takes_a_trials_newest_epoch_as_its_final_checkpoint(tmp_path):
    sys.path.insert(0, str(REPO / "bench"))
    import fsspec

    from chaos import _final_checkpoint_reports

    trial = tmp_path / "train_trial_x"
    lineage = [{**r, "trial_id": "x"} for r in _lineage([1, 2, 3, 4])]
    _write_checkpoint(trial, 2, 4, json.dumps(lineage))
    _write_checkpoint(trial, 3, 3, json.dumps(lineage[:3]))  # stale, higher index
    _write_checkpoint(trial, 4, 5, None)  # trainer.pt without reports: not a final checkpoint
    final = _final_checkpoint_reports(fsspec.filesystem("file"), str(tmp_path))
    assert [r["epoch"] for r in final["x"]] == [1, 2, 3, 4]


@pytest.mark.ray
def test_a_sweep_whose_driver_was_killed_passes_the_chaos_invariants(ray_session, tmp_path):
    """bench/chaos.py in small: 3 trials, the driver SIGKILLed once after the first checkpoint,
    `rayrec sweep --resume`, then the campaign's invariant checker (best.yaml retrained too).

    The kill must land before the sweep ends: the ledger looks for the first checkpoint every
    0.1 s and the kill follows at once, with 9 of a trial's 10 epochs still to go (at 2 s
    polls and 4 epochs, a loaded CI machine once saw the first checkpoint after the last)."""
    sys.path.insert(0, str(REPO / "bench"))
    from chaos import Campaign, format_report, run_campaign

    report = run_campaign(Campaign(
        seed=3, trials=3, epochs=10, kills=1, node_losses=0, trial_kills=0, outages=(), storage=str(tmp_path / "sweeps"),
        address=ray_session.get_runtime_context().gcs_address, sets=list(TINY), workdir=str(tmp_path),
        early_kill_p=0.0, kill_window_s=(0.0, 0.0), poll_s=0.1, final_timeout_s=300))
    text = format_report(report)
    assert report["faults"]["driver_kill"] == 1, text
    assert [r["exit"] for r in report["driver_runs"]] == [-9, 0], text
    assert report["ok"], text
    assert {r["invariant"] for r in report["invariants"]} >= {"trials lost or unfinished", "epochs trained twice",
                                                               "partial checkpoints loaded"}
    assert report["figures"]["trials"] == 3 and report["figures"]["epochs_reported"] == 30, text


def test_checkpoint_staging_left_by_a_killed_trial_process_is_removed_by_the_next_one(tmp_path):
    """A trial process SIGKILLed between staging a checkpoint and Ray's upload leaves its staging
    directory behind; the next trial process on the machine removes those whose process is
    gone, and nothing else."""
    import subprocess

    from rayrec.tune.trainable import STAGING_PREFIX, remove_orphaned_staging

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # its pid now names no process
    orphan = tmp_path / f"{STAGING_PREFIX}{gone.pid}-k3j_x9"
    mine = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-a8f2qz"
    other = tmp_path / f"{STAGING_PREFIX}notapid"
    for d in (orphan, mine, other):
        d.mkdir()
        (d / "trainer.pt").write_bytes(b"x" * 1000)
    assert remove_orphaned_staging(str(tmp_path)) == [orphan.name]
    assert not orphan.exists() and mine.exists() and other.exists()
