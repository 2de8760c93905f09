"""A finished sweep as read back from storage, and the small vocabulary every analysis
shares: which trials count, how they rank, how a trial's status is named.

No Ray here: everything reads the exported results (`trials.parquet`, `history.parquet`,
`sweep.yaml`) from any storage URL, so it runs on a laptop against a sweep that ran on a
cluster (field-lessons §1, 4, 9).

Which trials count. Every trial that ran without error and reported the metric is
*completed*, pruned ones included: ASHA pruned them for ranking low at a rung, so ranking
all completed trials by their best validation metric is ASHA's own ranking (survivors,
trained longer, rank first). Counting only trials that reached max_epochs would leave one
or two trials after an ASHA stage, too few to narrow anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from rayrec.errors import UserError
from rayrec.experiment import (
    COMPLETE,
    HISTORY_FILE,
    SPEC_FILE,
    TRIALS_FILE,
    ExportStatus,
    export_status,
    resolve_experiment,
    resume_hint,
    warn_if_unfinished,
)
from rayrec.storage import plain
from rayrec.tune.settings import SweepSettings
from rayrec.tune.space import SearchSpace, parse_space

COMPLETED = ("finished", "early_stopped", "pruned")
STATUSES = ("errored", "early_stopped", "finished", "interrupted", "pruned")


def classify(last: dict[str, Any], error: bool, max_epochs: int, stopped: bool = True) -> str:
    """Why a trial stopped: errored, early_stopped (patience), finished (max epochs) or pruned
    (scheduler); interrupted when it had not stopped (`stopped` False: the sweep was cut off)."""
    if error:
        return "errored"
    if not stopped:
        return "interrupted"
    reason = last.get("stop_reason") or ""
    if reason in ("early_stopped", "finished"):
        return reason
    if int(last.get("epoch", 0) or 0) >= max_epochs:
        return "finished"
    return "pruned"


@dataclass
class SweepResults:
    """A finished sweep as read back from storage."""

    experiment: str
    spec: dict[str, Any]  # sweep.yaml
    trials: Any  # pandas DataFrame, trials.parquet
    history: Any  # pandas DataFrame, history.parquet
    space: SearchSpace
    status: ExportStatus = ExportStatus(COMPLETE)  # summary.yaml's: partial for an interrupted sweep

    @property
    def model(self) -> str:
        return self.spec["model"]

    @property
    def settings(self) -> SweepSettings:
        """The sweep's recorded settings (sweep.yaml `settings:`), defaults for keys it lacks."""
        return SweepSettings.from_dict(self.spec.get("settings"))

    @property
    def metric(self) -> str:
        return self.settings.metric

    @property
    def mode(self) -> str:
        return self.settings.mode

    @property
    def scheduler(self) -> str:
        return self.settings.scheduler

    @property
    def max_epochs(self) -> int:
        return int(self.settings.max_epochs or 0)

    @property
    def value_col(self) -> str:
        return f"best_val_{self.metric}"

    @property
    def name(self) -> str:
        return self.spec.get("name") or self.experiment.rstrip("/").rsplit("/", 1)[-1]

    def ranked(self):
        """Completed trials with a finite metric, best first (ties keep trial order)."""
        return rank_trials(self.trials, self.value_col, self.mode)

    def file(self, name: str) -> str:
        from rayrec.storage import join

        return join(self.experiment, name)

def load_results(sweep: str, storage: str | None = None, allow_partial: bool = True,
                 refusal: str = "") -> SweepResults:
    """A sweep's exported results. A partial export (an interrupted sweep) is read with a
    one-line warning on stderr; with `allow_partial=False` it is refused, `refusal` saying
    which flag overrides that."""
    from rayrec.storage import exists, join, read_parquet, read_yaml

    experiment = resolve_experiment(sweep, storage)
    spec = read_yaml(join(experiment, SPEC_FILE)) or {}
    trials_url = join(experiment, TRIALS_FILE)
    resume = resume_hint(experiment, spec.get("name"))
    if not exists(trials_url):
        raise UserError(
            f"sweep '{experiment}' has no trials.parquet yet: it is still running or was interrupted; "
            f"finish it with {resume}"
        )
    if allow_partial:
        status = warn_if_unfinished(experiment, spec.get("name"))
    else:
        status = export_status(experiment)
        if status.partial:
            raise UserError(f"sweep '{experiment}' is unfinished ({status.describe()}): its best is not the "
                            f"sweep's winner; finish it with {resume}{refusal}")
    trials = read_parquet(trials_url)
    history_url = join(experiment, HISTORY_FILE)
    import pandas as pd

    history = read_parquet(history_url) if exists(history_url) else pd.DataFrame()
    space = parse_space(dict(spec["space"]), source=join(experiment, SPEC_FILE))
    return SweepResults(experiment=experiment, spec=spec, trials=trials, history=history, space=space, status=status)

def rank_trials(trials, value_col: str, mode: str = "max"):
    """Completed (not errored) trials with a finite `value_col`, best first."""
    import numpy as np

    if not len(trials) or value_col not in trials:
        return trials.iloc[0:0]
    ok = trials["status"].isin(COMPLETED) & np.isfinite(trials[value_col].astype(float))
    return trials[ok].sort_values(value_col, ascending=(mode == "min"), kind="stable")

def require_completed(results: SweepResults, need: int = 1, what: str = "this") -> Any:
    """The ranked trials, or a one-line error saying how many there are and why that is too few."""
    ranked = results.ranked()
    if len(ranked) >= need:
        return ranked
    counts = results.trials["status"].value_counts().to_dict() if len(results.trials) else {}
    detail = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no trials"
    first_error = ""
    if "error" in results.trials and (results.trials["status"] == "errored").any():
        first_error = str(results.trials.loc[results.trials["status"] == "errored", "error"].iloc[0])[:160]
        first_error = f"; first error: {first_error}" if first_error else ""
    raise UserError(
        f"sweep '{results.experiment}' has {len(ranked)} completed trial(s) with a {results.value_col} "
        f"({detail}); {what} needs at least {need}{first_error}"
    )

def param_values(trials, key: str) -> list[Any]:
    """Plain Python values of config/<key> (NaN and missing dropped)."""
    col = f"config/{key}"
    if col not in trials:
        return []
    return [plain(v) for v in trials[col].tolist() if not is_missing(v)]

def trial_overrides(row) -> dict[str, Any]:
    """A trial's sampled and fixed values as dotted overrides (`config/<key>` columns)."""
    return {c[len("config/"):]: plain(v) for c, v in row.items()
            if c.startswith("config/") and not c[len("config/"):].startswith("_") and not is_missing(v)}


def is_missing(v: Any) -> bool:
    import numbers

    if v is None:
        return True
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isnan(v)


def same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool) and not isinstance(b, bool):
        return float(a) == float(b)
    return a == b


def format_value(v: Any, digits: int = 4, quote: bool = True) -> str:
    """A parameter value for people: floats to `digits` significant digits, strings quoted when `quote`."""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return repr(v) if quote and isinstance(v, str) else str(v)
