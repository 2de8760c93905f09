"""The data pipeline: `load_split(cfg.data)` gives the SplitData every model and trial uses.

Importing this package is cheap: the pipeline (pandas, fsspec, pyarrow) loads on first
use of `load_split` or `NAMED`.
"""

from __future__ import annotations

import importlib
from typing import Any

from rayrec.data.types import CSR, SplitData

_LAZY = {"load_split": "rayrec.data.datasets", "NAMED": "rayrec.data.datasets"}

__all__ = ["CSR", "NAMED", "SplitData", "load_split"]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'rayrec.data' has no attribute '{name}'")
