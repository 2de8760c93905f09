"""Typed configuration: one object describes a run, for `rayrec train` and every sweep trial.

A run's config has three typed sections plus the model's own dataclass:

    model: {name: sasrec, hidden: 64, ...}   # the model's dataclass (rayrec/models/<name>.py)
    data:  {name: synthetic, ...}             # DataConfig
    train: {epochs: 30, lr: 0.001, ...}       # TrainConfig

Values are resolved in one order everywhere (field-lessons §2: tuning environment ==
training environment): dataclass defaults < the model's training/data defaults < a YAML file <
`--set key=value` overrides (or a sweep's sampled values, which are the same dotted keys).
The resolved config, defaults included, is what every run records, and feeding that record
back through `--config` reproduces the run.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

from rayrec.data.config import DataConfig  # lives in the data package, which never imports this module
from rayrec.errors import UserError, did_you_mean
from rayrec.experiment import COMPLETE

__all__ = ["DEFAULT_METRIC", "RATING_METRICS", "Config", "DataConfig", "TrainConfig", "build_config", "config_from_dict"]

log = logging.getLogger(__name__)

# A sweep's best.yaml says where it came from in a `sweep:` section (name, status, trials
# finished and planned, the trial): provenance, not configuration, so build_config skips it.
PROVENANCE = "sweep"

# The validation metric runs select on and sweeps optimise unless told otherwise (the one place it is written).
DEFAULT_METRIC = "ndcg@10"
# Rating prediction's error metrics (models whose task is 'rating'): lower is better.
RATING_METRICS = ("rmse", "mae")
RANKING_METRICS = ("ndcg", "hr", "recall", "mrr", "precision", "coverage")  # each followed by @K


def metric_mode(metric: str) -> str:
    """'min' for an error (rmse, mae: lower is better), 'max' for a ranking metric: the one rule
    early stopping, best-epoch selection and sweeps (ASHA, summary, best.yaml) follow."""
    return "min" if metric in RATING_METRICS else "max"


@dataclass
class TrainConfig:
    """The one trainer's settings: the same for `rayrec train` and every sweep trial."""

    # The recipe that converges (README, Recipes): a cap that early stopping ends, a constant
    # lr after a one-epoch warm-up (the published sequential recipes: constant 1e-3, up to
    # 100-200 epochs, patience 10-20), so nothing decays to zero before early stopping acts.
    epochs: int = 200  # maximum epochs; early stopping normally ends the run sooner
    batch_size: int = 128  # sequences (sequential models) or (user, item) pairs (graph models) per step
    # Sequential models: sort rows by length within shuffled chunks of this many batches, so
    # a batch computes little padding (every row is still visited once per epoch); 1 = off.
    bucket_batches: int = 8
    lr: float = 1e-3  # peak learning rate of AdamW
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    warmup_epochs: float = 1.0  # linear warm-up, capped at 20% of the schedule's horizon
    schedule: Literal["cosine", "constant"] = "constant"  # after warm-up; cosine decays to min_lr_ratio over the horizon
    min_lr_ratio: float = 0.0  # cosine floor as a fraction of lr
    schedule_epochs: int = 0  # the schedule's horizon (warm-up cap, cosine length) in epochs; 0 = `epochs`
    grad_clip: float = 5.0  # max global gradient norm; 0 disables
    amp: bool = True  # mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling)
    # bf16 autocast on CPU (softmax and loss stay fp32). Off by default: it pays only on CPUs
    # with native bf16 (avx512_bf16, AMX), and its 10-epoch A/B differed from fp32 by up to 7%
    # (docs/benchmarks.md).
    cpu_amp: bool = False
    patience: int = 10  # early stopping: epochs without improvement of `metric` by > min_delta
    min_delta: float = 0.0
    metric: str = DEFAULT_METRIC  # validation metric for early stopping and model selection
    ks: list[int] = field(default_factory=lambda: [5, 10, 20])  # cut-offs for HR/NDCG/MRR/recall/coverage
    eval_batch_size: int = 512  # users per full-ranking batch
    sampled_negatives: int = 0  # >0 adds sampled metrics (target among N unseen items), keys prefixed 'sampled_'
    # Write per-user test (and best-validation) metrics beside the aggregate, as
    # per_user.parquet in the run directory: the input of paired significance tests.
    save_per_user: bool = False
    train_eval_users: int = 0  # >0: also score this many training users (fixed sample) to measure the train/val gap
    limit_train_batches: int = 0  # >0: cap batches per epoch (smoke tests)
    seed: int = 42  # model init, batch order, dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_threads: int = 0  # torch CPU threads; 0 = torch's default

    def validate(self) -> None:
        positive = ("epochs", "batch_size", "eval_batch_size", "bucket_batches")
        for key in positive:
            if getattr(self, key) < 1:
                raise UserError(f"train.{key} must be >= 1, got {getattr(self, key)}")
        if not self.lr > 0:
            raise UserError(f"train.lr must be > 0, got {self.lr}")
        for key in ("weight_decay", "warmup_epochs", "grad_clip", "min_delta", "min_lr_ratio"):
            if getattr(self, key) < 0:
                raise UserError(f"train.{key} must be >= 0, got {getattr(self, key)}")
        if self.seed < 0:
            raise UserError(f"train.seed must be >= 0, got {self.seed}")
        if self.patience < 1:
            raise UserError(f"train.patience must be >= 1, got {self.patience}")
        if self.schedule_epochs < 0:
            raise UserError(f"train.schedule_epochs must be >= 0 (0 = train.epochs), got {self.schedule_epochs}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise UserError(f"train.ks must be a non-empty list of positive integers, got {self.ks}")
        name, _, k = self.metric.partition("@")
        valid = RANKING_METRICS
        if self.metric not in RATING_METRICS and (name not in valid or not k.isdigit() or int(k) not in self.ks):
            raise UserError(
                f"train.metric '{self.metric}' is not computed; valid: one of {', '.join(valid)} "
                f"followed by @K with K in train.ks={self.ks}, e.g. ndcg@10; or rmse, mae for rating models"
            )
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise UserError(f"train.device '{self.device}' is not valid; valid: auto, cpu, cuda, cuda:N")

    @property
    def schedule_horizon(self) -> int:
        """Epochs the lr schedule spans: `schedule_epochs`, or `epochs` when that is 0.

        Separate from `epochs` so a run can stop early on purpose (`rayrec final
        --train-on-valid` stops at the trial's best epoch) on the learning-rate path of a
        longer run."""
        return self.schedule_epochs or self.epochs


@dataclass
class Config:
    """A fully resolved run: model name, the model's dataclass, data and train sections."""

    model_name: str
    model: Any
    data: DataConfig
    train: TrainConfig

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": {"name": self.model_name, **dataclasses.asdict(self.model)},
            "data": dataclasses.asdict(self.data),
            "train": dataclasses.asdict(self.train),
        }

    def flat(self) -> dict[str, Any]:
        """Dotted keys ('train.lr') to values: the form search spaces and W&B use."""
        return flatten(self.to_dict())


def flatten(nested: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in nested.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and key != "columns":
            out.update(flatten(value, dotted + "."))
        else:
            out[dotted] = value
    return out


def unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = out
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def load_yaml(path: str, what: str = "config file", keys: str = "model:, data:, train:") -> dict[str, Any]:
    """Read a YAML mapping from a local path or any fsspec URL, safely. `what` names the file
    in errors, and `keys` what its mapping holds."""
    import fsspec
    import yaml

    try:
        with fsspec.open(path, "r") as fh:
            loaded = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UserError(f"{what} not found: {path}") from None
    except IsADirectoryError:
        raise UserError(f"{what} {path} is a directory; expected a YAML file") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"{what} {path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {what} {path}: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{what} {path} must hold a mapping ({keys}), got {type(loaded).__name__}")
    return loaded


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` strings to a dict; values are parsed as YAML scalars (1e-3, true, [5, 10])."""
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set expects key=value (e.g. train.lr=0.001), got '{item}'")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        out[key.strip()] = value
    return out


def overlay(base: dict[str, Any], overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`base` (model/data/train mappings) with dotted `overrides` set on top: a value replaces
    the base's whole value, mappings such as data.columns included."""
    sections = {name: dict(base.get(name) or {}) for name in ("model", "data", "train")}
    for dotted, value in overrides.items():
        section, _, key = dotted.partition(".")
        if section not in sections or not key:
            raise UserError(f"unknown key '{dotted}'; keys look like model.<field>, data.<field> or train.<field>")
        sections[section][key] = value
    return sections


def command_layers(
    config_file: str | None = None,
    data: str | None = None,
    data_format: str | None = None,
    sets: list[str] | tuple[str, ...] = (),
    seed: int | None = None,
    epochs: int | None = None,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The layers a command line adds above the defaults, for `rayrec train` and `rayrec sweep`
    alike: (the --config file's mapping, dotted overrides from --data, --format, --seed,
    --epochs and then --set, which wins)."""
    base = load_yaml(config_file) if config_file else {}
    provenance = base.get(PROVENANCE)
    if isinstance(provenance, dict) and provenance.get("status", COMPLETE) != COMPLETE:
        log.warning(
            f"warning: {config_file} is the best config of an unfinished sweep "
            f"({provenance.get('trials_finished', '?')} of {provenance.get('trials_planned', '?')} trials finished), "
            "not the sweep's winner"
        )
    overrides: dict[str, Any] = {}
    if data is not None:
        overrides["data.name"] = data
    if data_format is not None:
        overrides["data.format"] = data_format
    if seed is not None:
        overrides["train.seed"] = seed
    if epochs is not None:
        overrides["train.epochs"] = epochs
    overrides.update(parse_overrides(list(sets)))
    return base, overrides


def build_config(
    model_name: str | None = None,
    base: dict[str, Any] | None = None,
    overrides: dict[str, Any] | None = None,
) -> Config:
    """Resolve a Config: defaults < model training defaults < `base` (a YAML mapping) < `overrides`.

    `overrides` uses dotted keys ('train.lr', 'model.hidden', 'data.name'). `model_name`, if
    given, must agree with `base`'s model.name when both are set.
    """
    from rayrec.models import get_model_spec

    base = {key: value for key, value in (base or {}).items() if key != PROVENANCE}
    unknown = set(base) - {"model", "data", "train"}
    if unknown:
        raise UserError(f"unknown config section '{sorted(unknown)[0]}'; valid: model, data, train")
    sections = {}
    for name in ("model", "data", "train"):
        section = base.get(name) or {}
        if not isinstance(section, dict):
            raise UserError(f"config section '{name}' must be a mapping, got {section!r}")
        sections[name] = dict(section)

    overrides = dict(overrides or {})
    file_model = sections["model"].pop("name", None)
    set_model = overrides.pop("model.name", None)
    name = set_model or model_name or file_model
    if model_name and file_model and model_name != file_model and not set_model:
        raise UserError(f"model '{model_name}' does not match the config file's model.name '{file_model}'")
    if not name:
        raise UserError("no model given; pass one (e.g. `rayrec train sasrec`) or set model.name in --config")
    spec = get_model_spec(name)

    sections = overlay(sections, overrides)

    train_values = {**spec.train_defaults, **sections["train"]}
    model_cfg = _make(spec.config_cls, sections["model"], "model")
    data_defaults = dict(spec.data_defaults)
    if "split" not in sections["data"]:
        from rayrec.data.datasets import shipped_split

        shipped = shipped_split(sections["data"].get("name", DataConfig.name), sections["data"].get("format"))
        if shipped:
            data_defaults["split"] = shipped
    data_cfg = _make(DataConfig, {**data_defaults, **sections["data"]}, "data")
    train_cfg = _make(TrainConfig, train_values, "train")
    for section in (model_cfg, data_cfg, train_cfg):
        if hasattr(section, "validate"):
            section.validate()
    check_task_metric(spec, train_cfg.metric)
    return Config(model_name=spec.name, model=model_cfg, data=data_cfg, train=train_cfg)


def check_task_metric(spec, metric: str) -> None:
    """A rating model selects on an error (rmse, mae), a ranking model on a ranking metric."""
    rating = spec.model_cls.task == "rating"
    if rating and metric not in RATING_METRICS:
        raise UserError(f"model '{spec.name}' predicts ratings: train.metric must be one of "
                        f"{', '.join(RATING_METRICS)}, got '{metric}'")
    if not rating and metric in RATING_METRICS:
        raise UserError(f"train.metric '{metric}' is a rating metric, but model '{spec.name}' ranks items; valid: "
                        f"one of {', '.join(RANKING_METRICS)} followed by @K, e.g. ndcg@10")


def config_from_dict(resolved: dict[str, Any]) -> Config:
    """Rebuild a Config from `Config.to_dict()` output (best.yaml, checkpoints, W&B)."""
    return build_config(base=resolved)


def _make(cls, values: dict[str, Any], section: str):
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"unknown key '{section}.{key}'; {did_you_mean(key, fields)}")
        kwargs[key] = coerce(value, hints[key], f"{section}.{key}")
    return cls(**kwargs)


def coerce(value: Any, annotation: Any, key: str) -> Any:
    """Check `value` against a field's type, converting only where it loses nothing (int -> float)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{key} must not be empty")
    if origin is Literal:
        if value not in args:
            raise UserError(f"{key} got '{value}'; {did_you_mean(value, args)}")
        return value
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            value = [value]
        return [coerce(v, args[0], key) for v in value]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{key} must be a mapping, got {value!r}")
        for k, v in value.items():
            if v is None and ":" in str(k):  # YAML reads {user:uid} as one key 'user:uid' with no value
                raise UserError(f"{key} entry '{k}' has no value; write '{str(k).replace(':', ': ', 1)}', "
                                "with a space after the colon")
        return {str(k): coerce(v, args[1], key) for k, v in value.items()}
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise UserError(f"{key} must be true or false, got {value!r}")
    if isinstance(value, str) and annotation in (int, float):
        # YAML 1.1 reads '1e-3' (no dot) as a string; accept numeric text for numeric fields.
        try:
            value = float(value)
        except ValueError:
            raise UserError(f"{key} must be a number, got {value!r}") from None
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value:
            raise UserError(f"{key} must be an integer, got {value!r}")
        return int(value)
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UserError(f"{key} must be a number, got {value!r}")
        return float(value)
    if annotation is str:
        if isinstance(value, (dict, list)) or value is None:
            raise UserError(f"{key} must be a string, got {value!r}")
        return str(value)
    return value
