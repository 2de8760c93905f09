"""The allocator setting: freed per-step tables are reused instead of being mapped afresh."""

import os
import subprocess
import sys

import pytest

SCRIPT = """
import resource, sys, torch
from rayrec.train.allocator import keep_freed_memory
on = keep_freed_memory()
x = torch.randn(1 << 22)  # 16 MB, a LightGCN-Gowalla-sized table
def step():
    a = torch.empty(1 << 22); a.copy_(x); b = a * 2.0; return float(b[0])
for _ in range(3):
    step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(40):
    step()
print(on, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def faults(env_value: str) -> tuple[bool, int]:
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True,
                         env={**os.environ, "RAYREC_KEEP_FREED_MEMORY": env_value, "MALLOC_MMAP_THRESHOLD_": "131072"})
    on, count = out.stdout.split()
    return on == "True", int(count)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_tables_are_reused_instead_of_mapped_afresh():
    # MALLOC_MMAP_THRESHOLD_ pins glibc's threshold at 128 KiB (no dynamic raise), so without
    # the setting every 16 MB table of every step is a fresh mapping: 2 x 4,096 pages a step; with it, a few one-time mappings while the heap grows.
    on, with_setting = faults("1")
    off, without = faults("0")
    assert on and not off
    assert without >= 40 * 2 * 4096 * 0.9
    # A few one-time mappings as the heap grows (seen: 3 tables' worth), then none.
    assert with_setting <= 4 * 4096 < 0.1 * without
