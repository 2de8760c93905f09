"""The package as users install it: a wheel (no -e) in a fresh virtual environment, run
from outside the source tree, finds its shipped search spaces and runs a smoke sweep."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile

import pytest

from conftest import REPO


@pytest.mark.slow
def test_wheel_installs_and_runs_a_smoke_sweep_outside_the_source_tree(tmp_path):
    # Build from a copy of the tracked sources, so nothing is written into the checkout.
    src = tmp_path / "src"
    tracked = subprocess.run(["git", "ls-files", "rayrec", "pyproject.toml", "README.md"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
    for rel in tracked:
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / rel, src / rel)
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)],
                   check=True, capture_output=True, text=True)
    (wheel,) = dist.glob("rayrec-*.whl")
    assert "rayrec/search_spaces/sasrec.yaml" in zipfile.ZipFile(wheel).namelist()

    # A fresh venv; its dependencies (torch, ray, ...) come from the test's environment through a
    # .pth path entry, which adds the directory but runs none of its .pth files, so the editable
    # install there does not shadow the wheel.
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    with open(os.path.join(site, "deps.pth"), "w") as fh:
        fh.write(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(python), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)],
                   check=True, capture_output=True, text=True)

    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RAYREC_STORAGE", "RAY_ADDRESS")}
    where = subprocess.run([str(python), "-c", "import rayrec.tune.space as s; print(s.SPACES_DIR)"], cwd=work, env=env,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(site) and not where.startswith(str(REPO))
    proc = subprocess.run([str(venv / "bin" / "rayrec"), "sweep", "sasrec", "--stage", "smoke", "--name", "wheel",
                           "--wandb", "off", "--set", "data.synthetic_users=150", "--set", "data.synthetic_items=60",
                           "--set", "data.synthetic_length=12"],
                          cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert (work / "sweeps" / "wheel" / "best.yaml").exists()
    assert "best trial" in proc.stdout
