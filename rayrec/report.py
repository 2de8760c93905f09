"""`rayrec report SWEEP`: one self-contained folder (index.html + PNG figures) per sweep.

Reads only the exported results (trials.parquet, history.parquet, sweep.yaml, and
confirm.parquet / final.yaml / narrow.yaml when present) from any storage URL, and writes
`<sweep>/report/` (or --output). Figures are drawn with matplotlib's Agg canvas through
`matplotlib.figure.Figure`, so no GUI backend and no global pyplot state are involved:

    learning_curves.png        validation metric per epoch for every trial; pruned ones cut short (x)
    rung_survival.png          trials still running at each epoch (ASHA's rungs marked)
    pbt_lineage.png            PBT only: which trial cloned which, at which epoch, what changed
    parallel_coordinates.png   each trial's parameters against the metric
    importance.png             parameter importance, when there are enough trials to compute it
    confirmation.png           box plots over seeds, when `rayrec confirm` has run
"""

from __future__ import annotations

import html
import io
import logging
import math
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

STATUS_STYLE = {  # colour, line style, end marker
    "finished": ("tab:blue", "-", "o"),
    "early_stopped": ("tab:green", "-", "s"),
    "pruned": ("tab:gray", "--", "x"),
    "errored": ("tab:red", ":", "X"),
    "interrupted": ("tab:orange", "-.", "|"),  # still training when the sweep was interrupted
}


@dataclass
class Report:
    output: str  # the report folder (path or URL)
    index: str  # .../index.html
    figures: list[str] = field(default_factory=list)  # file names inside `output`


def build_report(sweep: str, storage: str | None = None, output: str | None = None) -> Report:
    """Read a sweep's results and write index.html, the figures and diagnostics.parquet."""
    from rayrec.experiment import CONFIRM_FILE, CONFIRM_SUMMARY, FINAL_FILE, NARROW_FILE, REPORT_DIR
    from rayrec.storage import check_writable, exists, read_parquet, read_yaml, write_bytes, write_parquet
    from rayrec.tune.confirm import confirmation_stats
    from rayrec.tune.diagnostics import diagnose, pbt_lineage
    from rayrec.tune.importance import parameter_importance
    from rayrec.tune.results import load_results, require_completed

    results = load_results(sweep, storage)
    ranked = require_completed(results, 1, "a report")
    output = (output or results.file(REPORT_DIR)).rstrip("/")
    check_writable(output)  # before the figures are drawn
    importance = parameter_importance(ranked, results.space.params, results.value_col)
    diagnostics = diagnose(results)
    lineage = pbt_lineage(results.history) if results.scheduler == "pbt" else None
    confirm = read_parquet(results.file(CONFIRM_FILE)) if exists(results.file(CONFIRM_FILE)) else None
    confirm_stats = None
    if confirm is not None:
        confirm_yaml = results.file(CONFIRM_SUMMARY)
        thresholds = read_yaml(confirm_yaml) if exists(confirm_yaml) else {}
        confirm_stats = confirmation_stats(confirm, f"val_{results.metric}", results.mode,
                                           thresholds.get("max_std", 0.002), thresholds.get("tolerance", 0.01))
    final = read_yaml(results.file(FINAL_FILE)) if exists(results.file(FINAL_FILE)) else None
    narrow = read_yaml(results.file(NARROW_FILE)) if exists(results.file(NARROW_FILE)) else None

    figures: dict[str, bytes] = {
        "learning_curves.png": learning_curves(results),
        "rung_survival.png": rung_survival(results),
    }
    if lineage is not None:
        figures["pbt_lineage.png"] = lineage_figure(results, lineage)
    figures["parallel_coordinates.png"] = parallel_coordinates(results, ranked)
    if importance.conclusive:
        figures["importance.png"] = importance_figure(importance)
    if confirm is not None:
        figures["confirmation.png"] = confirmation_figure(confirm, f"val_{results.metric}")

    page = render_html(results, ranked, figures, importance, diagnostics, lineage, confirm_stats, final, narrow)
    from rayrec.storage import join

    for name, png in figures.items():
        write_bytes(join(output, name), png)
    write_parquet(join(output, "diagnostics.parquet"), diagnostics)
    index = join(output, "index.html")
    write_bytes(index, page.encode("utf-8"))  # last: a complete index means a complete report
    return Report(output=output, index=index, figures=list(figures))


# --- figures ----------------------------------------------------------------------------
def _figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")  # Figure.savefig uses the Agg canvas: no display needed
    return buf.getvalue()


def learning_curves(results) -> bytes:
    """Validation metric against epoch, one line per trial, styled by why the trial stopped."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    metric_col = f"val_{results.metric}"
    fig = _figure()
    ax = fig.add_subplot()
    status = dict(zip(results.trials["trial_id"], results.trials["status"]))
    ranked = results.ranked()
    best = ranked["trial_id"].iloc[0] if len(ranked) else None
    history = results.history
    if len(history) and metric_col in history:
        many = history["trial_id"].nunique() > 30
        for tid, frame in history.groupby("trial_id", sort=False):
            frame = frame.sort_values("epoch")
            colour, style, marker = STATUS_STYLE.get(status.get(tid, "finished"), STATUS_STYLE["finished"])
            width, alpha = (2.6, 1.0) if tid == best else (1.0, 0.45 if many else 0.75)
            ax.plot(frame["epoch"], frame[metric_col], linestyle=style, color="black" if tid == best else colour,
                    linewidth=width, alpha=alpha, zorder=3 if tid == best else 2)
            ax.plot(frame["epoch"].iloc[-1:], frame[metric_col].iloc[-1:], marker=marker, linestyle="none",
                    color="black" if tid == best else colour, markersize=7 if marker == "x" else 4, alpha=alpha)
    if results.max_epochs:
        ax.axvline(results.max_epochs, color="0.7", linewidth=0.8, linestyle=":")
    handles = [Line2D([], [], color=c, linestyle=s, marker=m, label=name.replace("_", " "))
               for name, (c, s, m) in STATUS_STYLE.items() if name in set(status.values())]
    handles.append(Line2D([], [], color="black", linewidth=2.6, label=f"best ({best})"))
    ax.legend(handles=handles, loc="lower right", fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel(metric_col)
    ax.set_title(f"{results.name}: validation {results.metric} per epoch ({len(results.trials)} trials)")
    ax.grid(alpha=0.3)
    return _png(fig)


def rung_survival(results) -> bytes:
    """How many trials were still training at each epoch; ASHA's rungs as vertical lines."""
    fig = _figure(7, 3.8)
    ax = fig.add_subplot()
    history = results.history
    last = history.groupby("trial_id")["epoch"].max() if len(history) else None
    top = int(max(results.max_epochs, last.max() if last is not None and len(last) else 0))
    epochs = list(range(1, top + 1))
    alive = [int((last >= e).sum()) if last is not None else 0 for e in epochs]
    ax.bar(epochs, alive, color="tab:blue", alpha=0.8)
    for e, n in zip(epochs, alive):
        ax.annotate(str(n), (e, n), ha="center", va="bottom", fontsize=7)
    settings = results.settings
    if results.scheduler == "asha":
        rung, rf = float(settings.grace_period), float(settings.reduction_factor)
        first = True
        while rung < top:
            ax.axvline(rung + 0.5, color="tab:red", linestyle="--", linewidth=1, label="ASHA rung" if first else None)
            rung, first = rung * rf, False
        if not first:
            ax.legend(fontsize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("trials alive")
    ax.set_title(f"Trials still training at each epoch ({results.scheduler or 'unknown'} scheduler)")
    ax.set_xticks(epochs if len(epochs) <= 30 else epochs[:: max(1, len(epochs) // 15)])
    return _png(fig)


def lineage_figure(results, lineage) -> bytes:
    """Each trial as a horizontal line over its epochs; an arrow donor -> trial at every exploit."""
    from matplotlib.ticker import MaxNLocator

    history = results.history
    order = sorted(history["trial_id"].unique()) if len(history) else []
    y = {tid: i for i, tid in enumerate(order)}
    fig = _figure(8, max(3.0, 0.45 * len(order) + 1.5))
    ax = fig.add_subplot()
    for tid in order:
        epochs = history.loc[history["trial_id"] == tid, "epoch"]
        ax.plot([epochs.min(), epochs.max()], [y[tid], y[tid]], color="0.6", linewidth=3, solid_capstyle="round")
    for _, ev in lineage.iterrows():
        if ev["donor"] not in y or ev["trial_id"] not in y:
            continue
        ax.annotate("", xy=(ev["epoch"], y[ev["trial_id"]]), xytext=(ev["epoch"], y[ev["donor"]]),
                    arrowprops={"arrowstyle": "->", "color": "tab:purple", "linewidth": 1.4})
        if ev["changes"]:
            ax.annotate(ev["changes"], (ev["epoch"], y[ev["trial_id"]]), xytext=(4, 4), textcoords="offset points",
                        fontsize=6.5, color="tab:purple")
    if not len(lineage):
        ax.text(0.5, 0.5, "no exploit recorded", transform=ax.transAxes, ha="center", color="0.4")
    ax.set_yticks(range(len(order)), order, fontsize=7)
    ax.set_ylim(-0.5, len(order) - 0.3)  # room for the change labels above the top trial
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_title(f"PBT lineage: {len(lineage)} exploits (arrow: donor -> trial that cloned its weights)")
    ax.grid(axis="x", alpha=0.3)
    return _png(fig)


def parallel_coordinates(results, ranked) -> bytes:
    """One axis per searched parameter (log10 for log scales, category index for choices) and
    the metric last; every completed trial is a line coloured by its metric."""
    import numpy as np
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    from rayrec.storage import plain

    params = [(k, p) for k, p in results.space.params.items() if f"config/{k}" in ranked]
    axes_names = [k for k, _ in params] + [results.metric]
    columns, ticks = [], []
    for key, p in params:
        raw = [plain(v) for v in ranked[f"config/{key}"].tolist()]
        if p.dist == "choice":
            labels = [str(v) for v in p.values]
            x = np.array([labels.index(str(v)) if str(v) in labels else 0 for v in raw], dtype=float)
            span = max(len(labels) - 1, 1)
            columns.append(x / span)
            ticks.append([(i / span, lab) for i, lab in enumerate(labels)])
            continue
        lo, hi = float(p.low), float(p.high)
        x = np.array([float(v) for v in raw])
        if p.log:
            x, lo, hi = np.log10(x), math.log10(lo), math.log10(hi)
        columns.append((x - lo) / (hi - lo) if hi > lo else np.zeros_like(x))
        ticks.append([(0.0, f"{p.low:.3g}"), (1.0, f"{p.high:.3g}")])
    values = ranked[results.value_col].astype(float).to_numpy()
    vlo, vhi = float(values.min()), float(values.max())
    columns.append((values - vlo) / (vhi - vlo) if vhi > vlo else np.full_like(values, 0.5))
    ticks.append([(0.0, f"{vlo:.4f}"), (1.0, f"{vhi:.4f}")])
    data = np.column_stack(columns)

    fig = _figure(max(6.0, 1.4 * len(axes_names) + 2), 4.8)
    ax = fig.add_subplot()
    norm = Normalize(vlo, vhi if vhi > vlo else vlo + 1e-12)
    cmap = colormaps["viridis"]
    order = np.argsort(values if results.mode == "max" else -values)  # best drawn last, on top
    xs = np.arange(len(axes_names))
    for i in order:
        ax.plot(xs, data[i], color=cmap(norm(values[i])), alpha=0.8, linewidth=1.2)
    for j, axis_ticks in enumerate(ticks):
        ax.axvline(j, color="0.3", linewidth=0.8)
        for pos, label in axis_ticks:
            ax.annotate(label, (j, pos), xytext=(3, 0), textcoords="offset points", fontsize=7, va="center")
    ax.set_xticks(xs, [f"{n}\n(log)" if (i < len(params) and params[i][1].log) else n
                       for i, n in enumerate(axes_names)], fontsize=8)
    ax.set_yticks([])
    ax.set_xlim(-0.2, len(axes_names) - 0.5)
    ax.set_title(f"Parameters of {len(ranked)} completed trials against validation {results.metric}")
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=results.value_col)
    return _png(fig)


def importance_figure(importance) -> bytes:
    names = list(importance.scores)[::-1]
    fig = _figure(7, max(2.5, 0.4 * len(names) + 1.2))
    ax = fig.add_subplot()
    ax.barh(names, [importance.scores[n] for n in names], color="tab:orange")
    ax.axvline(0.05, color="0.4", linestyle="--", linewidth=0.8, label="rayrec narrow freezes below 0.05 (default)")
    ax.set_xlabel("share of importance (sums to 1)")
    ax.set_title(f"Parameter importance (random forest, permutation; {importance.n_trials} trials)")
    ax.legend(fontsize=8)
    return _png(fig)


def confirmation_figure(runs, metric_col: str) -> bytes:
    """Box plot of the metric over seeds per config; the tuning-time figure as a red diamond."""
    names = list(dict.fromkeys(runs["candidate"]))
    groups = [runs.loc[runs["candidate"] == n, metric_col].dropna().astype(float).to_numpy() for n in names]
    fig = _figure(max(5.0, 1.3 * len(names) + 2), 4.2)
    ax = fig.add_subplot()
    ax.boxplot(groups, tick_labels=names, showmeans=True)
    for i, (n, g) in enumerate(zip(names, groups), start=1):
        ax.scatter([i] * len(g), g, color="tab:blue", s=14, zorder=3)
        tuning = runs.loc[runs["candidate"] == n, "tuning_value"].astype(float)
        if len(tuning) and math.isfinite(tuning.iloc[0]):
            ax.scatter([i], [tuning.iloc[0]], marker="D", color="tab:red", s=36, zorder=4,
                       label="tuning-time value" if i == 1 else None)
    ax.set_ylabel(metric_col)
    ax.set_title(f"Confirmation: {metric_col} over {runs.groupby('candidate').size().max()} seeds")
    ax.grid(axis="y", alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _png(fig)


# --- HTML -------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.5em; text-align: right; }
th { background: #f4f4f4; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.note { color: #555; } .warn { color: #a40; font-weight: 600; } .flagged td { background: #fff3e0; }
"""


# Long by design: the page's template, its sections in page order; split up, the layout of
# one page would be scattered over a dozen functions.
def render_html(results, ranked, figures, importance, diagnostics, lineage, confirm_stats, final, narrow) -> str:
    e = html.escape
    spec = results.spec
    settings = results.settings
    counts = results.trials["status"].value_counts().to_dict()
    dataset = spec.get("dataset", {})
    best = ranked.iloc[0]
    parts = [
        "<!DOCTYPE html>", "<html><head><meta charset='utf-8'>",
        f"<title>rayrec report: {e(results.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>Sweep {e(results.name)}</h1>",
        f"<p class='note'>{e(results.experiment)}</p>",
        "<table>",
        _row("model", results.model),
        _row("dataset", f"{dataset.get('name', '?')} (fingerprint {str(dataset.get('fingerprint', ''))[:12]})"),
        _row("stage", (spec.get("options") or {}).get("stage") or "-"),
        _row("search / scheduler", f"{settings.search} / {settings.scheduler}"),
        _row("budget", f"{settings.num_samples} trials x {settings.max_epochs} epochs"),
        _row("trials", ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))),
        _row("best trial", f"{best['trial_id']}: {results.value_col} {float(best[results.value_col]):.4f}"),
        "</table>",
    ]
    if results.status.partial:
        parts.append(f"<p class='warn'>PARTIAL: an unfinished sweep ({e(results.status.describe())}); "
                     "the best trial so far is not the sweep's winner.</p>")
    if str(dataset.get("name", "")).startswith("synthetic"):
        parts.append("<p class='warn'>SYNTHETIC dataset: figures show the tool working, not model quality.</p>")

    parts += ["<h2>Learning curves</h2>",
              "<p class='note'>Pruned trials (grey, dashed) end early with an x; the best trial is black.</p>",
              _img("learning_curves.png"),
              "<h2>Trials alive per epoch</h2>", _img("rung_survival.png")]
    if lineage is not None:
        parts += ["<h2>PBT lineage</h2>", _img("pbt_lineage.png")]
        parts.append(_table(lineage, {}) if len(lineage) else "<p class='note'>No exploit was recorded.</p>")
    parts += ["<h2>Parameters against the metric</h2>", _img("parallel_coordinates.png")]
    top = ranked.head(10)
    cols = ["trial_id", "status", "epochs", results.value_col] + [c for c in top.columns if c.startswith("config/")
                                                                   and c[7:] in results.space.params]
    parts.append(_table(top[cols].rename(columns=lambda c: c.removeprefix("config/")), {}))

    parts.append("<h2>Parameter importance</h2>")
    if importance.conclusive:
        parts += [_img("importance.png"), f"<p class='note'>{e(importance.message)}</p>"]
    else:
        parts.append(f"<p class='warn'>Importance {e(importance.message)}.</p>")
    if narrow:
        parts.append("<h3>Next stage (rayrec narrow)</h3><ul>")
        parts += [f"<li><code>{e(k)}</code>: {e(str(v))}</li>" for k, v in (narrow.get("changes") or {}).items()]
        parts.append(f"</ul><p class='note'>{e(str(narrow.get('next_space', '')))}</p>")

    if confirm_stats is not None:
        parts += ["<h2>Confirmation over seeds</h2>", _img("confirmation.png"),
                  _table(confirm_stats, {"flags": True})]
    parts.append("<h2>Diagnostics</h2>")
    flagged = int((diagnostics["flags"] != "").sum()) if len(diagnostics) else 0
    parts.append(f"<p class='note'>{flagged} of {len(diagnostics)} trials flagged (over-fitting: train-valid gap "
                 "&gt; 0.02; dead training; coverage collapse).</p>")
    shown = diagnostics.drop(columns=["overfitting", "dead", "coverage_collapse"], errors="ignore")
    parts.append(_table(shown, {"flags": True}))

    parts.append("<h2>Final test</h2>")
    if final:
        parts.append(_final_html(final, results.metric))
        for extra in final.get("final_history") or []:
            parts.append("<p class='warn'>Evaluated on test again with --force:</p>" + _final_html(extra, results.metric))
    else:
        parts.append(f"<p class='note'>Not run yet: <code>rayrec final {e(results.experiment)}</code> "
                     "evaluates the chosen config on test exactly once.</p>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _final_html(final: dict[str, Any], metric: str) -> str:
    test = final.get("test") or {}
    keys = [k for k in (metric, "hr@10", "ndcg@10", "mrr@10", "coverage@10") if k in test]
    keys = list(dict.fromkeys(keys))
    rows = [_row("config", f"{final.get('config_name')} ({final.get('config_file', '')})"),
            _row("trained on", "train + validation" if final.get("train_on_valid") else "train (validation for early stopping)"),
            _row("epochs", final.get("epochs")), _row("when", final.get("timestamp")),
            _row("forced", "yes" if final.get("forced") else "no")]
    rows += [_row(f"test {k}", f"{float(test[k]):.4f}") for k in keys]
    return "<table>" + "".join(rows) + "</table>"


def _row(key: str, value: Any) -> str:
    return f"<tr><th>{html.escape(str(key))}</th><td>{html.escape(str(value))}</td></tr>"


def _img(name: str) -> str:
    return f"<p><img src='{name}' alt='{name}'></p>"


def _table(frame, left: dict[str, bool]) -> str:
    def fmt(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4g}"
        return str(v)

    head = "".join(f"<th>{html.escape(str(c))}</th>" for c in frame.columns)
    body = []
    for _, r in frame.iterrows():
        flagged = " class='flagged'" if "flags" in frame.columns and r["flags"] else ""
        cells = "".join(
            f"<td style='text-align:left'>{html.escape(fmt(r[c]))}</td>" if left.get(c) else f"<td>{html.escape(fmt(r[c]))}</td>"
            for c in frame.columns)
        body.append(f"<tr{flagged}>{cells}</tr>")
    return f"<table><tr>{head}</tr>{''.join(body)}</table>"
