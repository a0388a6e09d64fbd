"""The training scripts' own code, for measurements that time what users run: ``load_example("train_maskdit")``
imports ``examples/train_maskdit.py`` once (as the module ``train_maskdit``) so a benchmark calls its
``training_step`` itself, not a copy."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name: str):
    """The module of ``examples/<name>.py``, imported on first use and then shared (``sys.modules[name]``)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
