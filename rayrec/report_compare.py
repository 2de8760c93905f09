"""The report page of `rayrec compare`: `<compare>/report/index.html` and its figures.

    leaderboard.png    each model's test mean with its bootstrap interval over users (dot and
                       interval), seed means as small marks, best validation first
    pvalues.png        Wilcoxon p-values between every pair of models, Holm-adjusted
    tuning_curves.png  best validation metric against trials and against wall-clock seconds

Figures use report.py's Agg-backed helpers; no Ray here.
"""

from __future__ import annotations

import html
import math

from rayrec.report import CSS, _figure, _img, _png, _table


def leaderboard_figure(table, runs, metric: str) -> bytes:
    fig = _figure(8.0, 0.6 * len(table) + 1.5)
    ax = fig.add_subplot()
    order = list(table["model"])[::-1]  # the leader on top
    for y, model in enumerate(order):
        r = table[table["model"] == model].iloc[0]
        colour = "tab:red" if r["leader"] else ("tab:blue" if r["significant"] else "tab:gray")
        ax.errorbar([r["test_user_mean"]], [y], xerr=[[r["test_user_mean"] - r["ci_low"]], [r["ci_high"] - r["test_user_mean"]]],
                    fmt="o", color=colour, capsize=4)
        seeds = runs.loc[runs["model"] == model, f"test_{metric}"]
        ax.plot(seeds, [y + 0.15] * len(seeds), "|", color=colour, alpha=0.6)
    ax.set_yticks(range(len(order)), order)
    ax.set_xlabel(f"test {metric}: mean over users (seed-averaged) with bootstrap interval; | = one seed")
    ax.set_title("leader red; blue = significantly behind the leader; gray = not significant")
    return _png(fig)


def pvalue_figure(pvalues) -> bytes:
    import numpy as np

    names = list(pvalues.index)
    fig = _figure(1.2 * len(names) + 2.5, 1.0 * len(names) + 1.5)
    ax = fig.add_subplot()
    values = pvalues.to_numpy(dtype=float)
    image = ax.imshow(np.nan_to_num(values, nan=1.0), vmin=0, vmax=1, cmap="viridis_r")
    for i in range(len(names)):
        for j in range(len(names)):
            if i != j and math.isfinite(values[i, j]):
                ax.text(j, i, f"{values[i, j]:.2g}", ha="center", va="center", color="black" if values[i, j] < 0.5 else "white")  # viridis_r: light for small p
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_title("Wilcoxon p-values (Holm over all pairs)")
    fig.colorbar(image, ax=ax)
    return _png(fig)


def tuning_figure(tuning, metric: str) -> bytes:
    fig = _figure(10.0, 4.0)
    by_trials, by_time = fig.subplots(1, 2)
    for model, curve in tuning.groupby("model", sort=False):
        by_trials.step(curve["trial_index"], curve["best"], where="post", label=model, marker=".")
        by_time.step(curve["seconds"], curve["best"], where="post", label=model, marker=".")
    by_trials.set_xlabel("trials finished")
    by_time.set_xlabel("wall-clock seconds since the model's search started")
    for ax in (by_trials, by_time):
        ax.set_ylabel(f"best val {metric} so far")
        ax.grid(alpha=0.3)
    by_trials.legend()
    return _png(fig)


def build_compare_report(experiment: str, table, runs, pvalues, tuning, metric: str, alpha: float, name: str) -> str:
    """Write the figures and index.html under `<experiment>/report/`; returns the index URL."""
    from rayrec.storage import join, write_bytes

    output = join(experiment, "report")
    figures = {"leaderboard.png": leaderboard_figure(table, runs, metric), "pvalues.png": pvalue_figure(pvalues)}
    if len(tuning):
        figures["tuning_curves.png"] = tuning_figure(tuning, metric)
    e = html.escape
    shown = ["model", "n_seeds", "val_mean", "val_std", "test_mean", "test_std", "ci_low", "ci_high", "n_users",
             "gap", "wilcoxon_p", "wilcoxon_p_holm", "ttest_p", "ttest_p_holm", "significant", "spread_exceeds_gap",
             "tune_trials", "tune_epochs", "tune_trial_seconds", "tune_wall_seconds", "tune_peak_rss_mb", "tune_peak_gpu_mb",
             "retrain_seconds", "retrain_peak_rss_mb"]
    leader = str(table["model"].iloc[0])
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
        f"<title>rayrec compare: {e(name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Comparison {e(name)}</h1>", f"<p class='note'>{e(experiment)}</p>",
        f"<p>Leader on validation {e(metric)} (mean over seeds): <b>{e(leader)}</b>. Paired tests on per-user "
        f"test {e(metric)} against the leader, Holm-corrected across models, at alpha {alpha:g}.</p>",
        "<h2>Leaderboard</h2>", _table(table[[c for c in shown if c in table.columns]], {"model": True}),
        _img("leaderboard.png"), "<h2>p-value matrix</h2>", _img("pvalues.png"),
    ]
    if "tuning_curves.png" in figures:
        parts += ["<h2>Tuning curves: which model is cheap to tune</h2>", _img("tuning_curves.png")]
    parts += ["<h2>Retrained runs</h2>",
              _table(runs[[c for c in ("model", "seed", f"val_{metric}", f"test_{metric}", "best_epoch", "epochs",
                                       "seconds", "test_evaluations", "peak_rss_mb") if c in runs.columns]],
                     {"model": True}),
              "</body></html>"]
    for file, png in figures.items():
        write_bytes(join(output, file), png)
    index = join(output, "index.html")
    write_bytes(index, "\n".join(parts).encode("utf-8"))
    return index
