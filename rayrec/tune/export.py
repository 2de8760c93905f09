"""After the Tuner: the sweep's results as files (collect, pick, write), then the best
checkpoint evaluated on test once, as its own step.

    trials.parquet   one row per trial: id, status, sampled config, best/last validation metric,
                     epochs run, restores, error
    history.parquet  every reported epoch of every trial, as the trials finally ran them
    best.yaml        the best trial's fully resolved config: `rayrec train --config best.yaml`
    summary.yaml     best trial, its validation metric, checkpoint URL and test metrics

A sweep that was interrupted (Ctrl-C: Tune stops its trials and returns) is exported too,
as partial: summary.yaml says `status: partial` with the trials finished and planned,
best.yaml says so in a comment header and in its `sweep:` section, the best is chosen among
the trials that finished, and test is not looked at. The export after the last trial
finished overwrites them as complete. summary.yaml is written last: it is the record.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from rayrec.config import DEFAULT_METRIC, PROVENANCE, flatten
from rayrec.errors import first_line
from rayrec.experiment import BEST_FILE, COMPLETE, HISTORY_FILE, PARTIAL, SUMMARY_FILE, TRIALS_FILE, ExportStatus, utc_timestamp
from rayrec.storage import join, plain, to_url, write_parquet, write_yaml
from rayrec.tune.plan import Plan
from rayrec.tune.results import classify, format_value
from rayrec.tune.settings import SweepSettings


@dataclass
class SweepResult:
    experiment: str
    trials: Any  # pandas DataFrame
    history: Any
    best: dict[str, Any]
    searched: list[str] | None = None  # the space's parameter keys (for the summary table)
    mode: str = "max"  # the sweep's mode: the summary table ranks the best trial first under it
    metric: str = DEFAULT_METRIC  # the sweep's metric, without 'val_'
    status: ExportStatus = ExportStatus(COMPLETE)
    already_complete: bool = False  # `--resume` of a complete sweep: nothing ran, nothing was written


def export_results(plan: Plan, results, data, stopped: set[str], planned: int) -> SweepResult:
    """Write trials.parquet, history.parquet, best.yaml and summary.yaml; evaluate the best
    checkpoint on test when the sweep is complete: `planned` trials, each of which stopped
    (its path in `stopped`: tuner.fit_sweep)."""
    done = [result.path in stopped for result in results]
    status = ExportStatus(COMPLETE if all(done) and len(done) >= planned else PARTIAL,
                          trials_finished=sum(done), trials_planned=planned, exported=utc_timestamp())
    trials, history, best_result, best_value = collect_trials(results, plan.settings, done)
    best: dict[str, Any] = {}
    if best_result is not None:
        best, resolved = best_section(plan, best_result, best_value)
        if not status.partial and plan.options.evaluate_test and best_result.checkpoint is not None:
            best.update(evaluate_best_on_test(best_result.checkpoint, resolved, data))  # "test", "test_<group>"
    # Test is evaluated before anything is written, so the files of one export appear together.
    write_parquet(join(plan.experiment, TRIALS_FILE), trials)
    write_parquet(join(plan.experiment, HISTORY_FILE), history)
    if best_result is not None:
        write_best(plan, resolved, best, status)
    write_summary(plan, data, trials, best, status)
    return SweepResult(experiment=plan.experiment, trials=trials, history=history, best=best,
                       searched=list(plan.space.params), mode=plan.settings.mode, metric=plan.settings.metric,
                       status=status)


def collect_trials(results, settings: SweepSettings, stopped: list[bool] | None = None):
    """(trials frame, history frame, best Ray result or None, its best metric value) from
    Tune's ResultGrid. A trial that had not stopped (`stopped`) is never the best."""
    import pandas as pd

    better = max if settings.mode == "max" else min
    rows, history = [], []
    best_result, best_value = None, None
    for result, done in zip(results, stopped or [True] * len(results)):
        row, frame = trial_record(result, settings, done)
        rows.append(row)
        if frame is not None:
            history.append(frame)
        best = row[f"best_{settings.tune_metric}"]
        if done and _finite(best) and (best_value is None or better(best, best_value) == best and best != best_value):
            best_result, best_value = result, best
    trials = pd.DataFrame(rows)
    history_frame = _clean_history(pd.concat(history, ignore_index=True) if history else pd.DataFrame())
    return trials, history_frame, best_result, best_value


def trial_record(result, settings: SweepSettings, stopped: bool = True) -> tuple[dict[str, Any], Any]:
    """One trial's row of trials.parquet, and its per-epoch frame (None when it reported nothing)."""
    metric = settings.tune_metric
    better = max if settings.mode == "max" else min
    frame = result.metrics_dataframe
    last = dict(result.metrics or {})
    # A PBT exploit copies the donor's last result into the trial, so take the id from the
    # trial's own per-epoch log rather than from result.metrics.
    if frame is not None and len(frame) and "trial_id" in frame:
        trial_id = str(frame["trial_id"].iloc[0])
    else:
        trial_id = last.get("trial_id") or os.path.basename(result.path or "")
    frame = _with_checkpoint_reports(frame, result.checkpoint, trial_id)
    if frame is not None and len(frame):
        frame = frame.copy()
        frame["trial_id"] = trial_id
        last = {**last, **frame.iloc[-1].to_dict(), "trial_id": trial_id}
    else:
        frame = None
    values = [v for v in (frame[metric].tolist() if frame is not None and metric in frame else []) if _finite(v)]
    sampled = {k: v for k, v in (result.config or {}).items() if not k.startswith("_")}
    row = {
        "trial_id": trial_id,
        "status": classify(last, result.error is not None, settings.max_epochs, stopped),
        "epochs": int(last.get("epoch", 0) or 0),
        f"best_{metric}": better(values) if values else float("nan"),
        f"last_{metric}": last.get(metric, float("nan")),
        "error": first_line(result.error)[:300] if result.error is not None else "",
        # Starts from a checkpoint: retries after a failure, sweep resumes, PBT exploits.
        "restores": int((frame["restored_epoch"] > 0).sum()) if frame is not None and "restored_epoch" in frame else 0,
        **{f"config/{k}": v for k, v in sampled.items()},
    }
    for key in ("val_hr@10", "val_ndcg@10", "val_coverage@10", "train_loss"):
        if key in last and key != metric:
            row[f"last_{key}"] = last[key]
    return row, frame


def best_section(plan: Plan, best_result, best_value: float) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the summary's `best` section, the best trial's fully resolved config)."""
    from rayrec.tune.trainable import resolve_trial_config, trial_threads

    last = best_result.metrics or {}
    threads = trial_threads(plan.options.cpus_per_trial)
    resolved = resolve_trial_config(plan.model, plan.base, best_result.config, threads, last.get("device", "cpu")).to_dict()
    if plan.settings.scheduler == "pbt":
        resolved["train"]["device"] = last.get("device", "cpu")
    best = {"trial_id": last.get("trial_id"), "metric": plan.settings.tune_metric, "value": float(best_value),
            "config": flatten(resolved)}
    if best_result.checkpoint is not None:
        # Its URL, for `rayrec train --init-from <sweep>` (path as Ray reports it, scheme restored).
        best["checkpoint"] = to_url(plan.storage, best_result.checkpoint.path)
    return best, resolved


def write_best(plan: Plan, resolved: dict[str, Any], best: dict[str, Any], status: ExportStatus) -> None:
    """best.yaml: the resolved config, after a `sweep:` section saying which sweep and trial it
    came from and whether the sweep had finished (a comment header says so too when not)."""
    provenance = {"name": plan.name, "status": status.status, "trials_finished": status.trials_finished,
                  "trials_planned": status.trials_planned, "trial_id": best["trial_id"],
                  "metric": best["metric"], "value": best["value"]}
    header = ""
    if status.partial:
        header = (f"PARTIAL: the best of an unfinished sweep ({status.describe()}), not its winner.\n"
                  f"Finish the sweep with `rayrec sweep --resume --name {plan.name}`; that overwrites this file.")
    write_yaml(join(plan.experiment, BEST_FILE), plain({PROVENANCE: provenance, **resolved}), header=header)


def evaluate_best_on_test(checkpoint, resolved: dict[str, Any], data) -> dict[str, dict[str, float]]:
    """The best checkpoint's test metrics: the sweep's one look at test (skipped with --no-test)."""
    from rayrec.tune.trainable import evaluate_checkpoint_on_test

    return evaluate_checkpoint_on_test(checkpoint, resolved, data)


def write_summary(plan: Plan, data, trials, best: dict[str, Any], status: ExportStatus) -> None:
    summary = {
        "name": plan.name,
        "status": status.status,  # partial until every planned trial has stopped
        "trials_finished": status.trials_finished,  # ran to their end: finished, early-stopped, pruned or errored
        "trials_planned": status.trials_planned,
        "model": plan.model,
        "dataset": data.name,
        "synthetic": bool(data.info.get("synthetic", False)),
        "fingerprint": data.fingerprint,
        "search": plan.settings.search,
        "scheduler": plan.settings.scheduler,
        "mode": plan.settings.mode,  # min: the best trial has the lowest metric (rmse, mae)
        "trials": len(trials),
        "status_counts": trials["status"].value_counts().to_dict() if len(trials) else {},
        "best": plain(best),
        "exported": status.exported,
    }
    write_yaml(join(plan.experiment, SUMMARY_FILE), summary)


def _with_checkpoint_reports(frame, checkpoint, trial_id: str):
    """The trial's per-epoch frame plus the epochs only its checkpoints still know.

    Every checkpoint carries the reports of its lineage (trainable.REPORTS_FILE). Ray's
    result files can miss epochs: a restore that copied back a stale result.json after a
    storage outage, or, under synchronous PBT with reused actors, a paused trial whose first
    epochs never reached its result file. Those rows come back from the latest checkpoint,
    marked from_checkpoint=1; where epochs 1..N still have gaps (the latest checkpoint is a
    donor's lineage after a PBT exploit), from the trial's other checkpoints in storage,
    newest first. Only epochs this trial trained itself count, not a PBT donor's.
    """
    import posixpath

    import pandas as pd

    from rayrec.tune.trainable import checkpoint_reports, own_checkpoints_with_reports

    if checkpoint is None:
        return frame
    known = set(frame["epoch"].dropna().astype(int)) if frame is not None and "epoch" in frame else set()
    recovered: dict[int, dict] = {}

    def take(reports: list[dict]) -> None:
        for r in reports:
            epoch = int(r["epoch"])
            if r.get("trained_by") == trial_id and epoch not in known and epoch not in recovered:
                recovered[epoch] = r

    fs = checkpoint.filesystem
    take(checkpoint_reports(fs, checkpoint.path))
    have = known | set(recovered)
    if have and have != set(range(1, max(have) + 1)):  # gaps: look in the trial's older checkpoints
        for *_, reports in own_checkpoints_with_reports(fs, posixpath.dirname(checkpoint.path.rstrip("/"))):
            take(reports)  # the latest's epochs were taken already
    if not recovered:
        return frame
    rows = pd.DataFrame([{**r, "trial_id": trial_id, "from_checkpoint": 1} for _, r in sorted(recovered.items())])
    merged = pd.concat([f for f in (frame, rows) if f is not None and len(f)], ignore_index=True)
    return merged.sort_values("epoch", kind="stable").reset_index(drop=True)

def _clean_history(frame):
    """Per-epoch rows as the trials finally ran them.

    A trial that restarts from an earlier checkpoint (after a killed driver, or a PBT
    exploit of a donor behind it) reports some epochs again; the later report replaces the
    earlier one, so each (trial, epoch) appears once and curves follow the final lineage.
    """
    if not len(frame):
        return frame
    frame = frame.drop_duplicates(subset=["trial_id", "epoch"], keep="last").sort_values(["trial_id", "epoch"])
    frame = frame.reset_index(drop=True)
    keep = [c for c in frame.columns if not c.startswith("config/") and c not in ("date", "done", "should_checkpoint")]
    frame = frame[keep]
    # Parquet needs one type per column; mixed object columns become strings.
    for c in frame.columns:
        if frame[c].dtype == object:
            frame[c] = frame[c].astype(str)
    return frame

def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False

def summary_table(result: SweepResult, metric: str, top: int = 10) -> str:
    """The `top` trials, best first under the sweep's mode, then the status counts."""
    trials = result.trials
    if not len(trials):
        return "no trials"
    col = f"best_val_{metric}"
    ordered = trials.sort_values(col, ascending=result.mode == "min", na_position="last").head(top)
    searched = set(result.searched) if result.searched is not None else None
    cfg_cols = [c for c in ordered.columns if c.startswith("config/") and (searched is None or c[7:] in searched)]
    header = f"{'trial':<14}{'status':<14}{'epochs':>6}  {metric:>10}  " + "  ".join(c.split('/', 1)[1] for c in cfg_cols)
    lines = [header]
    for _, r in ordered.iterrows():
        params = "  ".join(format_value(r[c], digits=3, quote=False) for c in cfg_cols)
        lines.append(f"{str(r['trial_id']):<14}{r['status']:<14}{int(r['epochs']):>6}  {r[col]:>10.4f}  {params}")
    counts = trials["status"].value_counts().to_dict()
    lines.append("status: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return "\n".join(lines)
