"""The function trainable every sweep trial runs: the shared trainer, reporting every epoch.

- Every epoch reports validation metrics (never test ones), so ASHA can prune early.
- Every `checkpoint_every` epochs it checkpoints the full trainer state; PBT's perturbation
  interval equals that interval, so an exploit always finds the donor's checkpoint.
- It resumes from `tune.get_checkpoint()` (retry after a failure, sweep resume, or a PBT
  exploit), then writes the trial's own (possibly mutated) lr and weight decay into the
  restored optimiser (Trainer.apply_hyperparameters; lr is set before every step anyway).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import posixpath
import re
import tempfile
import time
from typing import Any

import numpy as np
import torch
from ray import get_runtime_context, tune

from rayrec.config import build_config
from rayrec.data.types import SplitData
from rayrec.experiment import REPORTS_FILE, STATE_FILE
from rayrec.train.trainer import Trainer, peak_memory_mb, read_state, save_state

log = logging.getLogger(__name__)



def weights_checksum(model: torch.nn.Module) -> float:
    """A cheap fingerprint of the weights, reported so tests can follow PBT's weight copies."""
    with torch.no_grad():
        total = 0.0
        for i, v in enumerate(model.state_dict().values()):
            if v.is_floating_point():
                total += float(v.double().sum()) * (1.0 + 1e-3 * i)
    return round(total, 6)


def trial_device() -> tuple[str, list]:
    """The device Ray assigned: CUDA when this trial holds a GPU that torch can see, else CPU.

    Ray 2.60 no longer hides GPUs from gpu=0 trials (ray-notes §6), so torch.cuda.is_available()
    alone would let a CPU trial grab a GPU; the assignment decides.
    """
    import ray

    gpu_ids = ray.get_gpu_ids()
    if gpu_ids and torch.cuda.is_available():
        return "cuda", gpu_ids
    if gpu_ids:
        log.warning("trial was assigned GPU %s but torch sees no CUDA device; running on CPU", gpu_ids)
    return "cpu", gpu_ids


def trial_threads(cpus_per_trial: float) -> int:
    """A trial's torch thread count: its CPUs rounded up, so trials never oversubscribe cores."""
    return max(1, int(math.ceil(cpus_per_trial)))


def resolve_trial_config(model: str, base: dict[str, Any], sampled: dict[str, Any], threads: int, device: str):
    """The fully resolved config a trial trains with, device and thread count included, so
    `rayrec train --config best.yaml` repeats the trial exactly (field-lessons §2)."""
    overrides = {k: v for k, v in sampled.items() if not k.startswith("_")}
    overrides.setdefault("train.num_threads", threads)
    overrides["train.device"] = device
    return build_config(model, base, overrides)


def train_trial(config: dict[str, Any], data: SplitData | None = None, model: str = "", base: dict | None = None,
                checkpoint_every: int = 1, cpus_per_trial: float = 1.0) -> None:
    """Ray Tune function trainable. `config` holds dotted config keys sampled by the searcher
    (keys starting with '_' are not config: tests pass control values that way)."""
    started = time.time()
    remove_orphaned_staging()
    device, gpu_ids = trial_device()
    cfg = resolve_trial_config(model, base or {}, config, trial_threads(cpus_per_trial), device)
    torch.set_num_threads(cfg.train.num_threads)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()  # the trial's own peak, not an earlier trial's in this worker
    trainer = Trainer(cfg, data, device=device)
    reports, restored, replayed = restore_trial(trainer)  # reports: this lineage's, kept in its checkpoints
    if trainer.finished:
        if not replayed and reports:
            # Restored at its end, and Tune did not see it end (it handed an older checkpoint,
            # or a stand-in for a lost one, LostCheckpointStandIn): the last epoch again, as
            # trained, so the trial ends with its figures.
            _report(trainer, {**reports[-1], **restored, "replayed": 1}, reports)
        return
    fixed = {
        "config_lr": cfg.train.lr,
        "config_weight_decay": cfg.train.weight_decay,
        "device": device,
        "gpu_ids": ",".join(str(g) for g in gpu_ids),
        "trained_by": tune.get_context().get_trial_id(),  # history rebuilt from checkpoints keeps only the trial's own epochs
        "trained_pid": os.getpid(),  # Ray overwrites "pid" with the reporting process, replays included
        "node_id": get_runtime_context().get_node_id(),  # which node ran this epoch
        "trial_started": started,  # wall clock, to see which trials ran at once
    }

    def on_epoch(tr: Trainer, record: dict[str, Any]) -> None:
        # Peak memory as the trial measures it (peak RSS is the worker process's: with reused
        # workers it can carry an earlier, larger trial's peak).
        metrics = {**epoch_metrics(tr, record), **fixed, **peak_memory_mb(device), "reported_at": time.time()}
        metrics.update(restored)  # the first report says where the trial started from
        restored.clear()
        last = bool(tr.stop_reason) or record["epoch"] >= cfg.train.epochs
        reports.append(metrics)
        _report(tr, metrics, reports if record["epoch"] % checkpoint_every == 0 or last else None)

    try:
        trainer.fit(on_epoch=on_epoch)
    finally:
        # Sweeps reuse worker processes (reuse_actors): free this trial's GPU memory for the
        # trials sharing the GPU, also when the scheduler stops it mid-way (SystemExit in report).
        del trainer
        if device == "cuda":
            import gc

            gc.collect()
            torch.cuda.empty_cache()


def restore_trial(trainer: Trainer) -> tuple[list[dict[str, Any]], dict[str, Any], bool]:
    """Load the trial's checkpoint, if any, into `trainer`: (the lineage's reports so far, what
    the first report says about the restore, whether epochs were replayed).

    The checkpoint is Tune's (retry after a failure, sweep resume, PBT exploit) or, when newer,
    the trial's own newest one in storage (a killed driver never registered it). Epochs that
    only the newer one knows are reported again as they were (same figures, same trained_pid)
    instead of being trained twice.
    """
    checkpoint = tune.get_checkpoint()
    tune_state = read_checkpoint(checkpoint.filesystem, checkpoint.path, trainer.device) if checkpoint is not None else None
    known = int(tune_state[0]["epoch"]) if tune_state is not None else 0
    newer = newest_own_state(checkpoint, trainer.device, tune_state[1] if tune_state is not None else None)
    state, reports = newer or tune_state or (None, [])
    if state is None:
        return reports, {"restored_epoch": 0, "restored_checksum": float("nan")}, False
    trainer.load_state_dict(state)  # also applies this trial's weight decay to the optimiser
    restored = {"restored_epoch": trainer.epoch, "restored_checksum": weights_checksum(trainer.model)}
    if newer is not None:
        lost = [r for r in reports if int(r["epoch"]) > known]
        for i, record in enumerate(lost):
            _report(trainer, {**record, "replayed": 1}, reports if i == len(lost) - 1 else None)
    return reports, restored, newer is not None


def epoch_metrics(trainer: Trainer, record: dict[str, Any]) -> dict[str, Any]:
    """What a trial reports for an epoch: the trainer's record (never test metrics) and the
    optimiser's actual lr and weight decay, which PBT tests compare with the config's."""
    optimizer = trainer.optimizer
    metrics = {k: _scalar(v) for k, v in record.items() if not k.startswith("test")}
    metrics["stop_reason"] = trainer.stop_reason
    metrics["weights_checksum"] = weights_checksum(trainer.model)
    metrics["optimizer_lr"] = optimizer.param_groups[0]["lr"] if optimizer is not None else float("nan")
    metrics["optimizer_weight_decay"] = optimizer.param_groups[0]["weight_decay"] if optimizer is not None else float("nan")
    return metrics


# A checkpoint is written to a local staging directory, which Ray then uploads. A trial process
# killed meanwhile (SIGKILL, a lost node coming back) leaves its directory behind, one
# checkpoint's size each (59 piled up in /tmp over a day of tests and chaos campaigns here), so
# the directory names its process and the next trial process on the machine removes the ones
# whose process is gone (at the start of each trial).
STAGING_PREFIX = "rayrec-ckpt-"


def remove_orphaned_staging(root: str | None = None) -> list[str]:
    """Delete checkpoint staging directories under `root` (default: the temp dir) left by
    processes that no longer exist. Returns what it removed."""
    import shutil

    root = root or tempfile.gettempdir()
    removed = []
    for name in os.listdir(root):
        match = re.fullmatch(rf"{STAGING_PREFIX}(\d+)-\w+", name)
        if match is None or _alive(int(match.group(1))):
            continue
        shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        removed.append(name)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def _report(trainer: Trainer, metrics: dict[str, Any], reports: list[dict[str, Any]] | None) -> None:
    """tune.report; with `reports` (the lineage's reports so far) also a checkpoint holding them."""
    if reports is None:
        tune.report(metrics)
        return
    with tempfile.TemporaryDirectory(prefix=f"{STAGING_PREFIX}{os.getpid()}-") as d:
        save_state(trainer.state_dict(), os.path.join(d, STATE_FILE))
        with open(os.path.join(d, REPORTS_FILE), "w") as fh:
            json.dump(reports, fh)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(d))
        # Ray has persisted it at the storage context's current checkpoint path, or believes so.
        try:
            storage = tune.get_context().get_storage()
            fs, path = storage.storage_filesystem, storage.checkpoint_fs_path
        except Exception:  # noqa: BLE001 - outside a Tune session
            return
        ensure_persisted(d, fs, path)


# How long a trial keeps trying to write a checkpoint that storage lost before it fails.
PERSIST_DEADLINE_S = 900.0


def ensure_persisted(local_dir: str, fs, path: str, deadline_s: float = PERSIST_DEADLINE_S) -> int:
    """Make sure storage holds the checkpoint `local_dir` at `path`, every file at its size;
    upload what is missing, retrying with backoff while storage is down. Returns the number
    of retries (0: Ray's upload was complete).

    Ray uploads a checkpoint with pyarrow's copy_files, which on an fsspec filesystem (S3,
    GCS) logs a failed upload and returns as if it had succeeded: with the storage endpoint
    down, `tune.report` came back after s3fs's retries and the checkpoint was registered at
    a path that stayed empty (bench/chaos.py found a finished trial whose last checkpoint
    never existed). Checked here, after every report, by one listing.
    """
    import pyarrow.fs

    names = sorted(os.listdir(local_dir))
    sizes = {n: os.path.getsize(os.path.join(local_dir, n)) for n in names}
    deadline, delay, retries = time.monotonic() + deadline_s, 1.0, 0
    while True:
        try:
            infos = fs.get_file_info([f"{path}/{n}" for n in names])
            missing = [n for n, i in zip(names, infos) if i.type != pyarrow.fs.FileType.File or i.size != sizes[n]]
        except Exception:  # noqa: BLE001 - storage unreachable: treat everything as missing
            missing = names
        if not missing:
            return retries
        if time.monotonic() > deadline:
            raise RuntimeError(f"checkpoint {path} is not in storage after {deadline_s:.0f} s of retries "
                               f"(missing or short: {', '.join(missing)})")
        log.warning("checkpoint %s is missing %s in storage (an upload failed); writing it again", path, missing)
        retries += 1
        if retries > 1:  # storage still down (a failed write may also pass silently): wait
            time.sleep(delay)
            delay = min(2 * delay, 30.0)
        try:
            fs.create_dir(path)
            for n in missing:
                with open(os.path.join(local_dir, n), "rb") as src, fs.open_output_stream(f"{path}/{n}") as out:
                    out.write(src.read())
        except Exception:  # noqa: BLE001 - still down: check again after the wait
            continue


def _trial_storage():
    """(pyarrow filesystem, trial directory in storage) of the running trial, or None."""
    try:
        storage = tune.get_context().get_storage()
        return storage.storage_filesystem, storage.trial_fs_path.rstrip("/")
    except Exception:  # outside a Tune session, or Ray moved its internals: fall back to Tune's checkpoint
        return None


def read_checkpoint(fs, path: str, device) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(trainer state, reports) of a Tune checkpoint directory in storage: the one reader of
    trial checkpoints (resume, retry, PBT exploit, the test evaluation), read where they lie."""
    path = path.rstrip("/")
    with fs.open_input_file(f"{path}/{STATE_FILE}") as fh:
        state = read_state(io.BytesIO(fh.read()), device)
    return state, checkpoint_reports(fs, path)


def checkpoint_reports(fs, checkpoint_path: str) -> list[dict[str, Any]]:
    """The reports a checkpoint directory in storage holds; [] when it has none."""
    try:
        with fs.open_input_file(f"{checkpoint_path.rstrip('/')}/{REPORTS_FILE}") as fh:
            return json.loads(fh.read())
    except (FileNotFoundError, OSError, ValueError):
        return []


def newest_own_state(checkpoint, device, known: list[dict[str, Any]] | None = None,
                     ) -> tuple[dict[str, Any], list[dict[str, Any]]] | None:
    """(state, reports) of the trial's newest complete checkpoint in storage that continues
    `known` (the reports of the checkpoint Tune handed over, or none) past its last epoch.

    Ray writes a checkpoint to storage before the driver registers it, and the experiment
    state snapshot comes later still; a driver killed in between resumes the trial from an
    older checkpoint and would train the lost epochs again. Only this trial's own
    directory is searched: a PBT exploit hands over a donor's checkpoint, which stands.
    Checkpoints are ranked by the epoch they hold, not by their directory's index: a resumed
    trial's indices restart from the snapshot's, so a directory with a higher index can be a
    stale one from before the kill (`own_checkpoints`). And a candidate must hold `known` as
    the start of its reports: under asynchronous PBT a trial's own directory can still hold a
    later epoch of the lineage it left when it copied a donor; that one is not the trial's.
    """
    where = _trial_storage()
    if where is None:
        return None
    if checkpoint is not None and not is_own_checkpoint(checkpoint):
        return None
    fs, trial_path = where
    known = known or []
    known_epoch = int(known[-1]["epoch"]) if known else 0
    for epoch, _, path in own_checkpoints(fs, trial_path):
        if epoch <= known_epoch:
            break
        try:
            state, reports = read_checkpoint(fs, path, device)
        except Exception:  # noqa: BLE001 - unreadable: a kill interrupted its upload
            state, reports = None, []
        if state is not None and complete_checkpoint(state, reports):
            if _lineage(reports[:len(known)]) == _lineage(known):
                return state, reports
            continue  # another lineage's (the one a PBT exploit left behind)
        # Ray uploads a checkpoint's files one by one, in no set order; a kill in between
        # leaves trainer.pt without reports.json (or a truncated file): take the next older one.
        log.warning("skipping incomplete checkpoint %s (interrupted upload)", path)
    return None


# How long a (re)starting trial waits for unreachable storage before it gives up looking for
# its own newer checkpoints there.
STORAGE_WAIT_S = 60.0


def own_checkpoints(fs, trial_path: str, wait_s: float = STORAGE_WAIT_S) -> list[tuple[int, int, str]]:
    """(epoch of its last report, index, path) of every checkpoint directory in a trial's
    storage directory, newest epoch first (the higher index first among equal epochs); a
    directory without readable reports ranks last (epoch -1).

    The epoch, not the index, says which is newest. Ray numbers a trial's checkpoints from the
    experiment snapshot's count, so after a driver was killed and the sweep resumed, the
    trial's new checkpoints reuse indices and can stay below a stale directory written before
    the kill (an older epoch's, or one whose upload the kill cut short)."""
    return [(epoch, index, path) for epoch, index, path, _ in own_checkpoints_with_reports(fs, trial_path, wait_s)]


def own_checkpoints_with_reports(fs, trial_path: str,
                                 wait_s: float = STORAGE_WAIT_S) -> list[tuple[int, int, str, list[dict]]]:
    """own_checkpoints, each with the reports it was ranked by (read once)."""
    import pyarrow.fs

    infos = _list_waiting_out_outages(fs, pyarrow.fs.FileSelector(trial_path, allow_not_found=True), wait_s)
    found = []
    for info in infos:
        index = _checkpoint_index(posixpath.basename(info.path))
        if info.type != pyarrow.fs.FileType.Directory or index < 0:
            continue
        reports = checkpoint_reports(fs, info.path)
        try:
            epoch = int(reports[-1]["epoch"]) if reports else -1
        except (KeyError, TypeError, ValueError):
            epoch = -1
        found.append((epoch, index, info.path, reports))
    return sorted(found, key=lambda f: f[:3], reverse=True)


def _list_waiting_out_outages(fs, selector, wait_s: float) -> list:
    """fs.get_file_info(selector), retried with backoff while storage is unreachable.

    A trial that restarts during a storage outage (a retry after the outage failed it) must
    not conclude that it has no checkpoint of its own and train its epochs again from
    scratch: it waits up to `wait_s` for storage to answer, then starts without (warned)."""
    deadline, delay = time.monotonic() + wait_s, 0.5
    while True:
        try:
            return fs.get_file_info(selector)
        except Exception as e:  # noqa: BLE001 - unreachable storage raises whatever its client raises
            if time.monotonic() + delay > deadline:
                log.warning("storage unreachable for %.0f s (%s): the trial starts without its own checkpoints",
                            wait_s, str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
                return []
            time.sleep(delay)
            delay = min(2 * delay, 8.0)


class LostCheckpointStandIn(tune.Callback):
    """Driver side: before a trial (re)starts, make sure the checkpoint Tune will restore it
    from still exists; if one of the trial's own is gone, the oldest later one that holds both
    files stands in (`rotated_checkpoint_stand_in`), and the trial then continues from its
    newest complete one (`restore_trial`). Checked once per trial and driver run, when the
    trial first appears (a new trial, or every trial of a resumed sweep at its first step).

    Tune's experiment state in storage can lag the trials' checkpoints by minutes: an upload
    of it started while storage was down blocks the next ones for as long as the client
    retries, and meanwhile the trials rotate out the checkpoints it names. A driver killed
    then resumes trials from checkpoints that no longer exist, which Ray's
    `Trainable.restore` refuses on every retry (bench/chaos.py: 2 of 24 trials errored so,
    2026-12-04). A PBT donor's missing checkpoint has no stand-in: Ray's error stands.
    """

    def __init__(self) -> None:
        self._seen = 0  # Tune's trial list only grows: each step looks at the trials new since the last

    def on_step_begin(self, iteration, trials, **info):
        new, self._seen = trials[self._seen:], len(trials)
        for trial in new:
            if trial.status != "PENDING":
                continue
            handed = trial.latest_checkpoint_result
            if handed is None:
                continue
            try:
                stand_in = rotated_checkpoint_stand_in(handed, trial.storage)
            except Exception:  # noqa: BLE001 - storage unreachable: Ray's restore decides
                continue
            if stand_in is not handed:
                trial.run_metadata.checkpoint_manager._latest_checkpoint_result = stand_in
                trial.run_metadata.invalidate_cache()
                trial.invalidate_json_state()


def rotated_checkpoint_stand_in(handed, storage):
    """What a trial should be restored from for `handed` (Tune's _TrainingResult or a
    Checkpoint): itself, unless it is one of the trial's own checkpoints (`storage`: the
    trial's StorageContext) that no longer exists; then the oldest later one holding both files."""
    import pyarrow.fs

    checkpoint = getattr(handed, "checkpoint", handed)
    if not isinstance(checkpoint, tune.Checkpoint):
        return handed
    fs, trial_path = storage.storage_filesystem, storage.trial_fs_path.rstrip("/")
    parent, name = posixpath.split(checkpoint.path.rstrip("/"))
    if parent != trial_path or fs.get_file_info(checkpoint.path).type != pyarrow.fs.FileType.NotFound:
        return handed
    gone = _checkpoint_index(name)
    infos = fs.get_file_info(pyarrow.fs.FileSelector(trial_path, allow_not_found=True))
    later = sorted((_checkpoint_index(posixpath.basename(i.path)), i.path) for i in infos
                   if i.type == pyarrow.fs.FileType.Directory and _checkpoint_index(posixpath.basename(i.path)) > gone)
    for _, path in later:
        files = fs.get_file_info([f"{path}/{STATE_FILE}", f"{path}/{REPORTS_FILE}"])
        if all(f.type == pyarrow.fs.FileType.File for f in files):
            log.warning("checkpoint %s is gone from storage; restoring from %s", checkpoint.path, path)
            stand_in = tune.Checkpoint(path=path, filesystem=fs)
            if handed is checkpoint:
                return stand_in
            return type(handed)(checkpoint=stand_in, metrics=handed.metrics)
    return handed


def is_own_checkpoint(checkpoint) -> bool:
    """Whether a Tune checkpoint lies in the running trial's own directory (not a PBT donor's)."""
    where = _trial_storage()
    return where is not None and posixpath.dirname(checkpoint.path.rstrip("/")) == where[1]


def complete_checkpoint(state: dict[str, Any], reports: list[dict[str, Any]]) -> bool:
    """Whether a checkpoint's files belong together: every checkpoint holds its lineage's
    reports, the last of which is the epoch of its state. A checkpoint without them would
    resume the trial with its earlier epochs forgotten (they could be neither replayed nor
    recovered at export)."""
    try:
        return bool(reports) and int(reports[-1]["epoch"]) == int(state["epoch"])
    except (KeyError, TypeError, ValueError):
        return False


def _lineage(reports: list[dict[str, Any]]) -> list[tuple]:
    """What identifies each epoch's training in a lineage of reports (a replay repeats them)."""
    return [(int(r.get("epoch", -1)), r.get("trained_pid"), r.get("reported_at")) for r in reports]


def _checkpoint_index(name: str) -> int:
    match = re.fullmatch(r"checkpoint_(\d+)", name)
    return int(match.group(1)) if match else -1


def _scalar(v: Any) -> Any:
    if isinstance(v, (np.floating, np.integer)):
        return v.item()
    return v


def evaluate_checkpoint_on_test(checkpoint, resolved: dict[str, Any], data: SplitData) -> dict[str, dict[str, float]]:
    """Load a trial's Tune checkpoint (its best weights) and evaluate on test, once, after the
    sweep (Trainer.test_report: 'test' on all users, 'test_<group>' on the dataset's test groups)."""
    from rayrec.config import config_from_dict

    cfg = config_from_dict(resolved)
    trainer = Trainer(cfg, data, device="cpu" if not torch.cuda.is_available() else None)
    state, _ = read_checkpoint(checkpoint.filesystem, checkpoint.path, trainer.device)
    trainer.load_state_dict(state)
    if trainer.best_state:
        trainer.model.load_state_dict(trainer.best_state)
    return trainer.test_report()
