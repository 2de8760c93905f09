"""rayrec: tune sequential and graph recommenders with Ray Tune.

Importing the package is cheap on purpose: ray, wandb and torch are imported only by the
modules that need them, so `rayrec --help` and config validation stay fast.
"""

__version__ = "0.1.0"

from rayrec.errors import UserError  # noqa: E402

__all__ = ["UserError", "__version__"]
