"""Reporting: what every benchmark records about the machine it ran on (so its numbers can be compared across
hosts), tables of rows, and the JSON result file.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path

import torch

from diffusers_masked.utils.io import atomic_write_text


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


def environment(device: str | None = None, **extra) -> dict:
    """`machine` plus the date and the library versions: the header of a result file."""
    import diffusers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        **machine(device),
        "diffusers": diffusers.__version__,
        "platform": platform.platform(),
        **extra,
    }


def pass_label(passed) -> str:
    """ "PASS" / "FAIL" for a checked target, "" where none applies."""
    return "" if passed is None else ("PASS" if passed else "FAIL")


def format_table(rows: Sequence[dict], columns: Sequence[tuple[str, str, str]]) -> str:
    """A fixed-width text table: `columns` are ``(header, key, format)``, e.g. ``("img/s", "images_per_s",
    ".1f")``; a missing or `None` value prints as "-"."""
    cells = [[header for header, _, _ in columns]]
    for row in rows:
        line = []
        for _, key, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec))
        cells.append(line)
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    text = [" ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in cells]
    text.insert(1, "-" * len(text[0]))
    return "\n".join(text)


def write_json(path: str | os.PathLike, result: dict) -> Path:
    """Write a result file atomically (a reader never sees half of it)."""
    return atomic_write_text(path, json.dumps(result, indent=2, default=str) + "\n")
