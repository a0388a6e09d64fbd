"""What every benchmark records about the machine it ran on, so its numbers can be compared across hosts.

Imported by the scripts beside it (`python benchmarks/<name>.py` puts this folder on `sys.path`; a script loaded by
path, as the tests do, adds it itself).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo ("AMD EPYC ..."); `platform.processor()` often says only
    "x86_64" on Linux."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: str | None = None) -> dict:
    """CPU, cores, torch and its thread count, the load average (a load above the core count means the machine was
    shared and the timings are inflated), and the GPU when `device` is a CUDA device."""
    info = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
    }
    if device is not None and str(device).startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info
