"""The experiment directory of a sweep, `<storage>/<name>/`: its file names, where sweeps
live by default, the sweeps a storage holds, and how a name becomes a URL.

Every module that reads or writes a sweep's files takes the names from here (`rayrec sweep`,
`narrow`, `confirm`, `final`, `report`, and `rayrec train --init-from SWEEP`). No Ray here:
the analysis commands run on a laptop against a sweep that ran on a cluster.

    sweep.yaml          what was asked: model, space, base config, settings, options (resume reads it)
    trials.parquet      one row per trial: id, status, config, best/last validation metrics
    history.parquet     every reported epoch of every trial
    best.yaml           the best trial's fully resolved config: `rayrec train --config best.yaml`
    summary.yaml        best trial, its validation metric, its checkpoint's URL and test metrics;
                        `status: partial` (with trials_finished / trials_planned) until the sweep completes
    next_space.yaml     `rayrec narrow`: the next stage's search space (narrow.yaml says why)
    robust.yaml         `rayrec narrow`: the top-k averaged config
    diagnostics.parquet `rayrec narrow`: per-trial flags
    confirm.parquet     `rayrec confirm`: one row per (config, seed); confirm.yaml the statistics
    final.yaml          `rayrec final`: the single test evaluation
    wandb_sweep.yaml    the registered W&B sweep, so a resume joins the same one
    <trial>/checkpoint_*/trainer.pt, reports.json   a trial's checkpoints (Ray's layout)
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from rayrec.errors import UserError

log = logging.getLogger(__name__)

SPEC_FILE = "sweep.yaml"
TRIALS_FILE = "trials.parquet"
HISTORY_FILE = "history.parquet"
BEST_FILE = "best.yaml"
SUMMARY_FILE = "summary.yaml"
NEXT_SPACE_FILE = "next_space.yaml"
NARROW_FILE = "narrow.yaml"
ROBUST_FILE = "robust.yaml"
DIAGNOSTICS_FILE = "diagnostics.parquet"
CONFIRM_FILE = "confirm.parquet"
CONFIRM_SUMMARY = "confirm.yaml"
CONFIRM_PER_USER = "confirm_per_user.parquet"  # per-user validation metrics of every confirmation run
FINAL_FILE = "final.yaml"
WANDB_SWEEP_FILE = "wandb_sweep.yaml"
REPORT_DIR = "report"

# summary.yaml's `status`, and best.yaml's `sweep.status`: an interrupted sweep exports its
# results so far as partial; only the export after the last trial finished says complete.
COMPLETE = "complete"
PARTIAL = "partial"

# Inside each of a trial's checkpoint directories.
STATE_FILE = "trainer.pt"  # the full trainer state (Trainer.state_dict)
REPORTS_FILE = "reports.json"  # every report of the trial's lineage so far


def utc_timestamp() -> str:
    """Now, as the records of a run or sweep state it: UTC, ISO 8601, whole seconds."""
    import datetime as dt

    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def default_storage() -> str:
    """Where sweeps live without --storage: $RAYREC_STORAGE, else ./sweeps."""
    return os.environ.get("RAYREC_STORAGE") or os.path.abspath("sweeps")


def experiment_url(storage: str, name: str) -> str:
    from rayrec.storage import join

    return join(storage, name)


def known_sweeps(storage: str, limit: int = 10) -> list[str]:
    """Names of the sweeps in `storage` (directories holding a sweep.yaml), for error hints."""
    from rayrec.storage import split_url

    try:
        fs, path = split_url(storage)
        names = [p.rstrip("/").rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)]
        return sorted(n for n in names if fs.exists(f"{path}/{n}/{SPEC_FILE}"))[:limit]
    except Exception:  # noqa: BLE001 - only a hint: an unreadable storage lists nothing
        return []


def known_sweeps_hint(storage: str) -> str:
    known = known_sweeps(storage)
    return f"sweeps in {storage}: {', '.join(known)}" if known else f"{storage} holds no sweeps"


def resolve_experiment(sweep: str, storage: str | None = None) -> str:
    """The experiment directory of SWEEP: a path or URL, or a sweep name under the storage."""
    from rayrec.storage import exists, join

    if not sweep or not str(sweep).strip():
        raise UserError("no sweep given; pass a sweep name, directory or URL")
    sweep = str(sweep).rstrip("/")
    storage = storage or default_storage()
    plain_name = "://" not in sweep and "/" not in sweep
    candidates = [join(storage, sweep), sweep] if plain_name else [sweep]
    for candidate in candidates:
        if exists(join(candidate, SPEC_FILE)):
            return candidate
    raise UserError(f"no sweep at '{sweep}' (no {SPEC_FILE} there); {known_sweeps_hint(storage)}")


def next_space_source(sweep: str, storage: str | None = None) -> tuple[str, dict[str, Any]]:
    """For `rayrec sweep --from SWEEP`: (URL of its next_space.yaml, its base config)."""
    from rayrec.storage import exists, join, read_yaml

    experiment = resolve_experiment(sweep, storage)
    warn_if_unfinished(experiment)  # narrowed from an interrupted sweep: allowed, said so
    url = join(experiment, NEXT_SPACE_FILE)
    if not exists(url):
        raise UserError(f"sweep '{experiment}' has no {NEXT_SPACE_FILE}; run `rayrec narrow {sweep}` first")
    return url, read_yaml(join(experiment, SPEC_FILE)).get("base") or {}


def is_sweep_dir(url: str) -> bool:
    """A sweep's directory (as opposed to a run's checkpoint.pt): it has a summary.yaml."""
    from rayrec.storage import exists, join

    return not url.endswith(".pt") and exists(join(url, SUMMARY_FILE))


@dataclass(frozen=True)
class ExportStatus:
    """Whether a sweep's exported results are final: summary.yaml's `status` and trial counts."""

    status: str  # COMPLETE or PARTIAL
    trials_finished: int | None = None
    trials_planned: int | None = None
    exported: str | None = None  # UTC time of the export

    @property
    def partial(self) -> bool:
        return self.status != COMPLETE

    def describe(self) -> str:
        """'3 of 8 trials finished' ('export cut off' when summary.yaml is missing)."""
        if self.trials_finished is None:
            return "its export was cut off" if self.partial else "trial count not recorded"
        planned = f" of {self.trials_planned}" if self.trials_planned is not None else ""
        return f"{self.trials_finished}{planned} trials finished"

    def record(self) -> str:
        """For the files that cite the sweep (confirm.yaml, final.yaml, narrow.yaml): 'partial (3 of 8 trials finished)'."""
        return f"{self.status} ({self.describe()})"


def export_status(experiment: str) -> ExportStatus | None:
    """What the sweep's export says about itself; None when nothing was exported yet.

    summary.yaml is written last in every export, so it is the record of completeness. A
    trials.parquet without a summary.yaml is an export that was cut off: partial. A
    summary.yaml without `status` predates partial exports, which were only ever written at
    the end of a sweep: complete.
    """
    from rayrec.storage import exists, join, read_yaml

    url = join(experiment, SUMMARY_FILE)
    if not exists(url):
        return ExportStatus(PARTIAL) if exists(join(experiment, TRIALS_FILE)) else None
    summary = read_yaml(url) or {}
    return ExportStatus(status=str(summary.get("status", COMPLETE)), trials_finished=summary.get("trials_finished"),
                        trials_planned=summary.get("trials_planned"), exported=summary.get("exported"))


def warn_if_unfinished(experiment: str, name: str | None = None) -> ExportStatus | None:
    """The sweep's export status, after one warning line on stderr when it is partial: for
    the commands that read an unfinished sweep and go on (narrow, confirm, report,
    `train --init-from`, `sweep --from`)."""
    status = export_status(experiment)
    if status is not None and status.partial:
        log.warning(f"warning: sweep '{experiment}' is unfinished ({status.describe()}); its results are not "
                    f"final until {resume_hint(experiment, name)} completes it")
    return status


def resume_hint(experiment: str | None, name: str | None = None, storage: str | None = None) -> str:
    """The command that continues a sweep, in backticks; its name is the experiment folder's
    unless given ('<name>' when neither is known)."""
    name = name or (experiment.rstrip("/").rsplit("/", 1)[-1] if experiment else "<name>")
    where = f" --storage {storage}" if storage else ""
    return f"`rayrec sweep --resume --name {name}{where}`"
