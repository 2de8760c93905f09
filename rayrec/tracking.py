"""W&B for sweeps: the only module that imports wandb (through Ray's integration).

Off by default unless asked; never allowed to fail or hang a sweep.
"""

from __future__ import annotations

import logging
import os
from typing import Any

log = logging.getLogger(__name__)


def wandb_mode(requested: str | None) -> str:
    """online | offline | off. Default: online when an API key is configured, else offline."""
    from rayrec.errors import UserError

    if requested is not None:
        if requested not in ("online", "offline", "off"):
            raise UserError(f"--wandb '{requested}' is not valid; valid: online, offline, off")
        return requested
    if os.environ.get("WANDB_MODE") in ("offline", "disabled"):
        return "offline" if os.environ["WANDB_MODE"] == "offline" else "off"
    if os.environ.get("WANDB_API_KEY") or _netrc_has_wandb():
        return "online"
    log.warning("W&B: no API key configured; logging offline (upload later with `wandb sync`)")
    return "offline"


def _netrc_has_wandb() -> bool:
    path = os.path.expanduser("~/.netrc")
    try:
        with open(path) as fh:
            return "api.wandb.ai" in fh.read()
    except OSError:
        return False


def sweep_callbacks(plan: Any) -> list:
    mode = wandb_mode(plan.options.wandb)
    if mode == "off":
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    return [
        WandbLoggerCallback(
            project=os.environ.get("WANDB_PROJECT", "rayrec"),
            group=plan.name,
            log_config=True,
            upload_checkpoints=False,
            mode=mode,
            tags=[plan.model, plan.settings["scheduler"], plan.settings["search"]],
        )
    ]
