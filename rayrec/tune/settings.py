"""How a sweep searches, schedules and stops: `SweepSettings`, resolved once per sweep.

Values resolve in one order: these defaults < the space's `sweep:` section < its `--stage`
section < the `rayrec sweep` flags. The resolved settings are recorded in sweep.yaml
(`settings:`), so a resume, `rayrec narrow`, `report` and W&B read the same values.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from rayrec.config import DEFAULT_METRIC, metric_mode
from rayrec.errors import UserError, did_you_mean
from rayrec.tune.space import SCHEDULERS, SEARCHES, SearchSpace


@dataclass
class SweepSettings:
    """The search and scheduling settings of one sweep (the keys of a space's `sweep:` section)."""

    metric: str = DEFAULT_METRIC  # validation metric to optimise, without 'val_' (never a test metric)
    mode: str = "max"  # max | min: whether a larger metric is better (default: min for rmse/mae, else max)
    num_samples: int = 8  # trials to run (a grid search covers its grid once instead)
    max_epochs: int = 10  # epochs per trial, and ASHA's max_t
    grace_period: int = 2  # ASHA: epochs before a trial can be pruned (at most max_epochs)
    reduction_factor: float = 3  # ASHA: keep 1/reduction_factor of the trials at each rung
    search: str = "hyperopt"  # hyperopt | random | grid
    scheduler: str = "asha"  # asha | pbt | fifo
    perturbation_interval: int = 2  # PBT: epochs between exploits
    quantile_fraction: float = 0.25  # PBT: the bottom share of trials that clone the top share
    checkpoint_every: int = 1  # epochs between checkpoints; with PBT, the perturbation interval
    pbt_synch: bool = False  # PBT: perturb all trials together (deterministic, slower)

    @classmethod
    def resolve(cls, space: SearchSpace, stage: str | None, flags: dict[str, Any]) -> SweepSettings:
        """Defaults < space `sweep:` < `stages.<stage>` < flags (None flags ignored); validated.

        Two values follow from others unless given: the grace period is capped at max
        epochs, and PBT (which picks configs itself) searches randomly. With PBT the
        checkpoint interval is the perturbation interval, so an exploit always finds one.
        """
        explicit = {k: v for k, v in flags.items() if v is not None}
        unknown = set(explicit) - set(cls.fields())
        if unknown:
            raise UserError(f"unknown sweep setting '{sorted(unknown)[0]}'; {did_you_mean(sorted(unknown)[0], cls.fields())}")
        given = {**space.sweep_defaults(stage), **explicit}
        settings = cls(**given)
        if "mode" not in given:
            settings.mode = metric_mode(settings.metric)
        if "grace_period" not in explicit and isinstance(settings.max_epochs, int):
            settings.grace_period = min(settings.grace_period, settings.max_epochs)
        if settings.scheduler == "pbt" and settings.search == "hyperopt":
            if "search" in explicit:
                raise UserError(
                    "--scheduler pbt cannot be combined with --search hyperopt: PBT chooses configs itself "
                    "(Ray refuses a searcher with PBT); use --search random or grid with pbt"
                )
            settings.search = "random"
        settings.validate(space)
        if settings.scheduler == "pbt":
            settings.checkpoint_every = settings.perturbation_interval
        return settings

    def validate(self, space: SearchSpace | None = None) -> None:
        """Every problem as one UserError naming the value and what would be valid."""
        if self.search not in SEARCHES:
            raise UserError(f"--search '{self.search}' is not valid; {did_you_mean(self.search, SEARCHES)}")
        if self.scheduler not in SCHEDULERS:
            raise UserError(f"--scheduler '{self.scheduler}' is not valid; {did_you_mean(self.scheduler, SCHEDULERS)}")
        if self.mode not in ("max", "min"):
            raise UserError(f"sweep mode '{self.mode}' is not valid; valid: max, min")
        if self.mode != metric_mode(self.metric):
            raise UserError(f"sweep mode '{self.mode}' does not suit metric {self.metric}; valid: mode "
                            f"{metric_mode(self.metric)} (lower is better for rmse and mae, higher for ranking metrics)")
        if self.scheduler == "pbt" and self.search == "hyperopt":
            raise UserError("--scheduler pbt cannot be combined with --search hyperopt; use --search random or grid")
        if self.scheduler == "pbt" and space is not None and not space.mutate:
            raise UserError(f"--scheduler pbt needs 'pbt: mutate: [...]' in the search space {space.source}")
        for key in ("num_samples", "max_epochs", "grace_period", "perturbation_interval", "checkpoint_every"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"sweep {key} must be an integer >= 1, got {value!r}")
        if self.grace_period > self.max_epochs:
            raise UserError(f"grace period {self.grace_period} exceeds max epochs {self.max_epochs}")
        if not self.reduction_factor > 1:
            raise UserError(f"reduction factor must be > 1, got {self.reduction_factor}")
        if not 0 < self.quantile_fraction <= 0.5:
            raise UserError(f"PBT quantile fraction must be in (0, 0.5], got {self.quantile_fraction}")

    @property
    def tune_metric(self) -> str:
        """The name trials report the metric under (validation only)."""
        return f"val_{self.metric}"

    @classmethod
    def fields(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))

    @classmethod
    def from_dict(cls, values: dict[str, Any] | None) -> SweepSettings:
        """Settings as recorded in a sweep.yaml; keys this version does not know are ignored."""
        values = values or {}
        return cls(**{k: v for k, v in values.items() if k in cls.fields()})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
