"""Shared fixtures. One Ray instance serves the whole test session (ray-notes §6: about 5 s
of fixed cost each time Ray starts), with logical GPUs so packing can be tested on CPU."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("RAYREC_SHARED_DATA", REPO.parent / "shared" / "data"))

# Keep tests away from the user's cache, results and W&B account.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")


def shared_data(*parts: str) -> Path:
    """A path under ../shared/data, or skip the test with a reason when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"needs {path} (the shared datasets beside the repo)")
    return path


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    cache = os.environ.get("RAYREC_TEST_CACHE") or str(tmp_path_factory.getbasetemp() / "rayrec-cache")
    monkeypatch.setenv("RAYREC_CACHE", cache)


@pytest.fixture(scope="session")
def ray_session():
    """The one Ray instance of the test session: 4 logical CPUs and 1 logical GPU."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, num_gpus=1, include_dashboard=False,
                 logging_level="WARNING", log_to_driver=False)
    yield ray
    ray.shutdown()
