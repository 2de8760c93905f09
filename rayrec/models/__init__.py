"""Model registry. Each entry names the module that defines `SPEC`; modules load on first use
so `import rayrec` does not import torch."""

from __future__ import annotations

import importlib

from rayrec.errors import UserError, did_you_mean

MODELS: dict[str, str] = {
    "sasrec": "rayrec.models.sasrec",
    "pop": "rayrec.models.pop",
    "lightgcn": "rayrec.models.lightgcn",
    "bprmf": "rayrec.models.bprmf",
    "bert4rec": "rayrec.models.bert4rec",
    "gru4rec": "rayrec.models.gru4rec",
    "ncf": "rayrec.models.ncf",
    "gcnii": "rayrec.models.gcnii",
    "layergcn": "rayrec.models.layergcn",
    "svdgcn": "rayrec.models.svdgcn",
    "dgrec": "rayrec.models.dgrec",
    "ease": "rayrec.models.ease",
    "slim": "rayrec.models.slim",
    "als": "rayrec.models.als",
    "mean": "rayrec.models.mean",
    "svdpp": "rayrec.models.svdpp",
}


def get_model_spec(name: str):
    """The ModelSpec for `name`, or a UserError listing the registered models."""
    module = MODELS.get(name)
    if module is None:
        raise UserError(f"unknown model '{name}'; {did_you_mean(name, MODELS)}")
    return importlib.import_module(module).SPEC


def build_model(name: str, cfg, data):
    """Instantiate a registered model for a dataset, checking the data suits it."""
    check_model_data(name, data)
    return get_model_spec(name).model_cls(cfg, data)


def check_model_data(name: str, data) -> None:
    """A UserError when the model cannot learn from this dataset (sequential models need order;
    a model's own `check_data`, e.g. EASE's memory check)."""
    spec = get_model_spec(name)
    if spec.kind == "sequential" and not data.ordered:
        order_free = ", ".join(m for m in MODELS if m != "pop" and get_model_spec(m).kind != "sequential"
                               and get_model_spec(m).model_cls.task == "ranking")
        raise UserError(
            f"model '{name}' is sequential and needs interactions in time order, but dataset "
            f"'{data.name}' has no timestamps or order; use an order-free model ({order_free}) or pop, "
            "or give data with a timestamp column"
        )
    spec.model_cls.check_data(data)
