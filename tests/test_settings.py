"""SweepSettings: typed, commented, validated; and `rayrec sweep` resolves its base config as `rayrec train` does."""

from __future__ import annotations

import inspect

import pytest
import yaml

from rayrec.config import DEFAULT_METRIC, TrainConfig
from rayrec.errors import UserError
from rayrec.tune.settings import SweepSettings
from rayrec.tune.space import SWEEP_KEYS, load_space


def test_every_field_has_a_comment_and_matches_the_space_keys():
    source = inspect.getsource(SweepSettings).splitlines()
    for name in SweepSettings.fields():
        line = next(line for line in source if line.strip().startswith(f"{name}:"))
        assert "  # " in line, f"SweepSettings.{name} has no comment"
    # The space's sweep: section and the settings are one vocabulary (plus the --pbt-synch flag).
    assert set(SWEEP_KEYS) | {"pbt_synch"} == set(SweepSettings.fields())


def test_one_default_metric():
    assert SweepSettings().metric == TrainConfig().metric == DEFAULT_METRIC


@pytest.mark.parametrize("change, fragment", [
    ({"search": "bayes"}, "--search 'bayes' is not valid"),
    ({"scheduler": "hb"}, "--scheduler 'hb' is not valid"),
    ({"mode": "up"}, "sweep mode 'up' is not valid; valid: max, min"),
    ({"num_samples": 0}, "sweep num_samples must be an integer >= 1, got 0"),
    ({"max_epochs": 2.5}, "sweep max_epochs must be an integer >= 1, got 2.5"),
    ({"grace_period": 5, "max_epochs": 3}, "grace period 5 exceeds max epochs 3"),
    ({"reduction_factor": 1}, "reduction factor must be > 1, got 1"),
    ({"quantile_fraction": 0.7}, "PBT quantile fraction must be in (0, 0.5], got 0.7"),
    ({"scheduler": "pbt", "search": "hyperopt"}, "--scheduler pbt cannot be combined with --search hyperopt"),
])
def test_validate_names_the_bad_value(change, fragment):
    with pytest.raises(UserError) as err:
        SweepSettings(**change).validate()
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_resolve_layers_defaults_space_stage_flags():
    space = load_space("sasrec")
    smoke = SweepSettings.resolve(space, "smoke", {"num_samples": None, "mode": None})
    assert (smoke.num_samples, smoke.max_epochs, smoke.search) == (2, 2, "random")  # the space's smoke stage
    assert smoke.grace_period == 1
    flagged = SweepSettings.resolve(space, "quick", {"num_samples": 3, "max_epochs": 1})
    assert (flagged.num_samples, flagged.max_epochs, flagged.grace_period) == (3, 1, 1)  # grace capped at max epochs
    pbt = SweepSettings.resolve(space, None, {"scheduler": "pbt", "perturbation_interval": 3})
    assert (pbt.search, pbt.checkpoint_every) == ("random", 3)  # PBT picks configs itself; checkpoints at perturbations
    with pytest.raises(UserError, match="cannot be combined"):
        SweepSettings.resolve(space, None, {"scheduler": "pbt", "search": "hyperopt"})
    with pytest.raises(UserError, match="unknown sweep setting 'epochs'"):
        SweepSettings.resolve(space, None, {"epochs": 3})


def test_round_trip_through_sweep_yaml():
    settings = SweepSettings(num_samples=5, scheduler="fifo", search="random")
    again = SweepSettings.from_dict(yaml.safe_load(yaml.safe_dump({**settings.to_dict(), "retired_key": 1})))
    assert again == settings


def test_sweep_base_config_resolves_through_the_train_path(tmp_path):
    """A trial's config equals `rayrec train`'s for the same --config and --set, plus the space's
    fixed values and the sweep's epochs and metric."""
    from rayrec.cli import resolve_cli_config
    from rayrec.config import build_config
    from rayrec.tune.plan import SweepOptions, plan_sweep

    config = tmp_path / "base.yaml"
    config.write_text(yaml.safe_dump({"model": {"name": "sasrec", "hidden": 48}, "data": {"synthetic_users": 120},
                                      "train": {"lr": 0.002, "patience": 9}}))
    sets = ["train.batch_size=32", "data.synthetic_items=70"]
    plan = plan_sweep(SweepOptions(model="sasrec", stage="smoke", config=str(config), sets=sets, data="synthetic"))
    space = load_space("sasrec")
    train = resolve_cli_config("sasrec", str(config), "synthetic", None,
                               [f"{k}={v}" for k, v in space.fixed.items()] + sets
                               + [f"train.epochs={plan.settings.max_epochs}", f"train.metric={plan.settings.metric}"])
    assert build_config("sasrec", plan.base).to_dict() == train.to_dict()
    assert train.model.hidden == 48 and train.train.batch_size == 32 and train.train.patience == space.fixed["train.patience"]
