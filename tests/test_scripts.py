"""What the training scripts share: one definition of every common flag, the library's step machinery, and no
rename outside the package's one atomic write."""

import argparse
import ast
import importlib.util
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ("train_maskdit", "train_maskdm", "train_dit")


def _script(name):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "examples" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def _actions(name) -> dict[str, argparse.Action]:
    parser = None

    class Capture(Exception):
        pass

    original = argparse.ArgumentParser.parse_args

    def capture(self, args=None, namespace=None):
        nonlocal parser
        parser = self
        raise Capture

    argparse.ArgumentParser.parse_args = capture
    try:
        with pytest.raises(Capture):
            _script(name).parse_args([])
    finally:
        argparse.ArgumentParser.parse_args = original
    return {action.option_strings[0]: action for action in parser._actions if action.option_strings}


@pytest.mark.parametrize("first, second", [(a, b) for i, a in enumerate(SCRIPTS) for b in SCRIPTS[i + 1 :]])
def test_every_flag_two_training_scripts_take_has_one_help_text_and_type(first, second):
    maskdit, maskdm = _actions(first), _actions(second)
    shared = sorted((set(maskdit) & set(maskdm)) - {"-h"})
    # The data, model, optimisation, output and sampling groups: at least these, defined once.
    groups = ["--dataset_name", "--label_column", "--learning_rate", "--use_ema", "--tread_routes"]
    groups += ["--checkpointing_steps", "--push_to_hub", "--guidance_scale", "--torch_compile", "--recipe"]
    if "train_dit" not in (first, second):
        groups += ["--mask_type", "--mask_schedule"]
    assert set(groups) <= set(shared)
    assert len(shared) >= 40
    for flag in shared:
        a, b = maskdit[flag], maskdm[flag]
        assert a.help == b.help, flag
        assert type(a) is type(b) and a.choices == b.choices and a.nargs == b.nargs, flag
        # argparse types are closures made by the same factory: compare what they accept.
        assert (a.type is None) == (b.type is None), flag
        if a.type is not None:
            assert getattr(a.type, "__qualname__", a.type) == getattr(b.type, "__qualname__", b.type), flag


@pytest.mark.parametrize("name", SCRIPTS)
def test_each_script_defines_its_step_and_stays_a_recipe_of_about_three_hundred_lines(name):
    source = (REPO / "examples" / f"{name}.py").read_text()
    functions = {node.name for node in ast.parse(source).body if isinstance(node, ast.FunctionDef)}
    assert {"training_step", "parse_args", "main"} <= functions
    assert len(source.splitlines()) <= 340  # MaskDM runs two stages into two folders: the larger recipe


def test_renames_happen_in_the_one_atomic_write_module_only():
    offenders = []
    for folder in ("src", "examples", "benchmarks", "scripts"):
        for path in (REPO / folder).rglob("*.py"):
            if path == REPO / "src" / "diffusers_masked" / "utils" / "io.py":
                continue
            text = path.read_text()
            if "os.replace(" in text or "os.rename(" in text:
                offenders.append(str(path.relative_to(REPO)))
    assert offenders == []
