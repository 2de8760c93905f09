"""Per-trial diagnostics of a finished sweep (train/validation gap, dead training, coverage
collapse) and PBT lineage (who cloned whom)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from rayrec.experiment import DIAGNOSTICS_FILE
from rayrec.tune.results import COMPLETED, SweepResults, is_missing


@dataclass
class DiagnosticThresholds:
    gap: float = 0.02  # train - validation metric above this: over-fitting (field-lessons §4)
    dead_epoch: int = 2  # early-stopped at or before this epoch: training that did nothing
    coverage_floor: float = 0.05  # coverage@10 below this: recommendations collapsed to few items
    coverage_ratio: float = 0.25  # ... or below this fraction of the best trial's coverage

# Long: one short block per diagnostic over the same per-trial frame, kept together so each
# flag reads beside its threshold.
def diagnose(results: SweepResults, thresholds: DiagnosticThresholds | None = None):
    """One row per trial: train/validation gap, dead training, coverage collapse, and flags."""
    import numpy as np
    import pandas as pd

    th = thresholds or DiagnosticThresholds()
    trials, history = results.trials, results.history
    value_col = results.value_col
    metric_col = f"val_{results.metric}"
    train_col = f"train_{results.metric}"
    ranked = results.ranked()
    best_id = ranked["trial_id"].iloc[0] if len(ranked) else None
    per_trial = {tid: frame.sort_values("epoch") for tid, frame in history.groupby("trial_id")} if len(history) and "trial_id" in history else {}

    rows = []
    for _, t in trials.iterrows():
        tid = t["trial_id"]
        frame = per_trial.get(tid)
        at_best = _best_row(frame, metric_col, results.mode)
        gap = float("nan")
        if at_best is not None and train_col in at_best and not is_missing(at_best[train_col]):
            gap = float(at_best[train_col]) - float(at_best[metric_col])
            if results.mode == "min":  # an error (rmse): over-fitting shows as validation above train
                gap = -gap
        coverage = float(at_best["val_coverage@10"]) if at_best is not None and "val_coverage@10" in at_best and not is_missing(at_best["val_coverage@10"]) else float(t.get("last_val_coverage@10", float("nan")))
        loss_moved = float("nan")
        if frame is not None and "train_loss" in frame and len(frame) >= 2:
            losses = frame["train_loss"].astype(float).dropna()
            if len(losses) >= 2 and losses.iloc[0] != 0:
                loss_moved = abs(losses.iloc[-1] - losses.iloc[0]) / abs(losses.iloc[0])
        rows.append({
            "trial_id": tid, "status": t["status"], "epochs": int(t.get("epochs", 0) or 0),
            value_col: float(t.get(value_col, float("nan"))),
            "best_epoch": int(at_best["epoch"]) if at_best is not None else 0,
            "train_val_gap": gap, "coverage@10": coverage, "loss_change": loss_moved,
        })
    frame = pd.DataFrame(rows)
    if not len(frame):
        return frame
    best_cov = frame.loc[frame["trial_id"] == best_id, "coverage@10"]
    best_cov = float(best_cov.iloc[0]) if len(best_cov) else float("nan")
    values = frame.loc[frame["status"].isin(COMPLETED), value_col].dropna()
    identical = len(values) >= 2 and float(values.max() - values.min()) == 0.0
    flags_all, over, dead, collapse = [], [], [], []
    for _, r in frame.iterrows():
        flags = []
        is_over = bool(np.isfinite(r["train_val_gap"]) and r["train_val_gap"] > th.gap)
        if is_over:
            flags.append(f"overfitting: train-valid gap {r['train_val_gap']:.3f} > {th.gap}")
        is_dead = False
        if r["status"] == "early_stopped" and r["epochs"] <= th.dead_epoch:
            is_dead = True
            flags.append(f"dead training: early-stopped at epoch {r['epochs']}")
        if identical and r["status"] in COMPLETED:
            is_dead = True
            flags.append("dead training: every trial has the same metric")
        if np.isfinite(r["loss_change"]) and r["loss_change"] < 1e-4:
            is_dead = True
            flags.append("dead training: training loss did not move")
        is_collapse = False
        if np.isfinite(r["coverage@10"]):
            if r["coverage@10"] < th.coverage_floor:
                is_collapse = True
                flags.append(f"coverage collapse: coverage@10 {r['coverage@10']:.3f} < {th.coverage_floor}")
            elif np.isfinite(best_cov) and r["coverage@10"] < th.coverage_ratio * best_cov:
                is_collapse = True
                flags.append(f"coverage collapse: coverage@10 {r['coverage@10']:.3f} < {th.coverage_ratio:g} x best trial's {best_cov:.3f}")
        if r["status"] == "errored":
            flags.append("errored")
        over.append(is_over)
        dead.append(is_dead)
        collapse.append(is_collapse)
        flags_all.append("; ".join(flags))
    frame["overfitting"] = over
    frame["dead"] = dead
    frame["coverage_collapse"] = collapse
    frame["flags"] = flags_all
    return frame

def _best_row(frame, metric_col: str, mode: str):
    if frame is None or metric_col not in frame or not len(frame):
        return None
    values = frame[metric_col].astype(float)
    if values.isna().all():
        return frame.iloc[-1]
    return frame.loc[values.idxmax() if mode == "max" else values.idxmin()]

def write_diagnostics(results: SweepResults, url: str | None = None):
    from rayrec.storage import write_parquet

    frame = diagnose(results)
    write_parquet(url or results.file(DIAGNOSTICS_FILE), frame)
    return frame

def best_epochs(results: SweepResults, trial_ids: list[str]) -> list[int]:
    """Each trial's best epoch by the sweep metric (from history)."""
    metric_col = f"val_{results.metric}"
    out = []
    for tid in trial_ids:
        frame = results.history[results.history["trial_id"] == tid] if len(results.history) else None
        row = _best_row(frame, metric_col, results.mode)
        if row is not None:
            out.append(int(row["epoch"]))
    return out

def pbt_lineage(history, atol: float = 1e-6):
    """Who cloned whom: one row per exploit (a report with restored_epoch > 0 whose restored
    weights match another trial's weights_checksum at that epoch), with the config changes.

    A restore that matches the trial's own weights (a retry or a resume) is not an exploit.
    """
    import numpy as np
    import pandas as pd

    columns = ["epoch", "trial_id", "donor", "changes"]
    needed = {"restored_epoch", "restored_checksum", "weights_checksum", "trial_id", "epoch"}
    if not len(history) or not needed <= set(history.columns):
        return pd.DataFrame(columns=columns)
    tracked = [c for c in history.columns if c.startswith(("config_", "config/"))]
    restores = history[(history["restored_epoch"].fillna(0) > 0) & history["restored_checksum"].notna()]
    rows = []
    for _, r in restores.iterrows():
        at = history[(history["epoch"] == r["restored_epoch"]) & (history["trial_id"] != r["trial_id"])]
        match = at[np.isclose(at["weights_checksum"].astype(float), float(r["restored_checksum"]), rtol=0, atol=atol)]
        if not len(match):
            continue
        donor = match.iloc[0]
        changes = []
        for c in tracked:
            a, b = donor[c], r[c]
            if is_missing(a) or is_missing(b):
                continue
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                if not math.isclose(float(a), float(b), rel_tol=1e-9):
                    changes.append(f"{c.split('/', 1)[-1].removeprefix('config_')} {float(a):.3g}->{float(b):.3g}")
            elif a != b:
                changes.append(f"{c.split('/', 1)[-1].removeprefix('config_')} {a}->{b}")
        rows.append({"epoch": int(r["restored_epoch"]), "trial_id": str(r["trial_id"]), "donor": str(donor["trial_id"]),
                     "changes": ", ".join(changes)})
    return pd.DataFrame(rows, columns=columns)
