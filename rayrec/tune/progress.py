"""What the driver follows of a sweep's trials: one log line per finished, pruned or failed
trial (TrialLines), and which trials stopped for good (StoppedTrials).

Ray's own status tables are wide and repeat every few seconds; at the default verbosity
rayrec silences them and logs what a person watching a sweep wants to know instead.
"""

from __future__ import annotations

import logging
import math

from ray import tune

from rayrec.tune.results import classify

log = logging.getLogger("rayrec.sweep")


class TrialLines(tune.Callback):
    def __init__(self, metric: str, mode: str, max_epochs: int, total: int | None = None):
        self.metric = metric
        self.mode = mode
        self.max_epochs = max_epochs
        self.total = total
        self.done = 0
        self.best: float | None = None
        self.best_of: dict[str, float] = {}

    def on_trial_result(self, iteration, trials, trial, result, **info):
        value = result.get(self.metric)
        if value is None or not math.isfinite(float(value)):
            return
        prev = self.best_of.get(trial.trial_id)
        if prev is None or (value > prev if self.mode == "max" else value < prev):
            self.best_of[trial.trial_id] = float(value)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0) or 0)
        self._line(trial, f"{classify(last, False, self.max_epochs)} at epoch {epoch}")

    def on_trial_error(self, iteration, trials, trial, **info):
        self.done += 1
        self._line(trial, f"failed at epoch {int((trial.last_result or {}).get('epoch', 0) or 0)}")

    def _line(self, trial, what: str) -> None:
        value = self.best_of.get(trial.trial_id)
        if value is not None and (self.best is None or (value > self.best if self.mode == "max" else value < self.best)):
            self.best = value
        total = f"/{self.total}" if self.total else ""
        shown = f"{value:.4f}" if value is not None else "n/a"
        best = f"{self.best:.4f}" if self.best is not None else "n/a"
        log.info("[%d%s] trial %s %s: best %s %s (sweep best %s)",
                 self.done, total, trial.trial_id, what, self.metric, shown, best)


class StoppedTrials(tune.Callback):
    """The paths of the trials that stopped for good: finished, pruned or errored, in this run
    or in the one a resume continues.

    After Ctrl-C, Tune returns with the trials it cut off marked TERMINATED like finished
    ones (its saved experiment state, which a resume reads, has them RUNNING). A trial
    counts as stopped only when Tune completed or failed it, so the export can tell an
    interrupted sweep from a finished one.
    """

    def __init__(self):
        self.paths: set[str] = set()
        self._first_step = True

    def on_step_begin(self, iteration, trials, **info):
        if self._first_step:  # a resumed sweep's trials that had stopped before
            self._first_step = False
            self.paths.update(t.path for t in trials if t.status in ("TERMINATED", "ERROR"))

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.paths.add(trial.path)

    def on_experiment_end(self, trials, **info):
        if self._first_step:  # no step ran: every trial had stopped before this resume
            self.on_step_begin(0, trials)

    def on_trial_error(self, iteration, trials, trial, **info):
        self.paths.add(trial.path)
