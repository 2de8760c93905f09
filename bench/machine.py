"""What every benchmark prints beside its figures: the machine, the software and the load.

This machine may be shared, so the load average is recorded with each figure: a timing
taken at load 6 on 2 cores is not the same measurement as one taken on an idle machine.
"""

from __future__ import annotations

import os
import platform


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_average() -> str:
    """'1.23 0.98 0.75' (1, 5 and 15 minutes), like `uptime`."""
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def machine_info() -> dict[str, str]:
    import torch

    import rayrec

    return {
        "cpu": cpu_model(),
        "cores": str(os.cpu_count()),
        "cores usable": str(len(os.sched_getaffinity(0))) if hasattr(os, "sched_getaffinity") else "n/a",
        "torch threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "rayrec": rayrec.__version__,
        "python": platform.python_version(),
        "load average at start": load_average(),
    }


def print_machine(title: str) -> dict[str, str]:
    info = machine_info()
    print(f"== {title}")
    print("   " + "; ".join(f"{k}: {v}" for k, v in info.items()), flush=True)
    return info
