"""Running the example training scripts through `accelerate launch` in the tests, comparing their weights, and
loading saved pipelines in a fresh interpreter."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
FSDP_ON_CPU = REPO / "tests" / "fsdp_on_cpu.py"


def env(**extra):
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}
    environment.pop("ACCELERATE_CONFIG_FILE", None)
    return environment


def launch_cmd(script, *args, num_processes=1, fsdp=False):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--num_processes", str(num_processes)]
    if num_processes > 1:
        cmd += ["--multi_gpu"]  # with ACCELERATE_USE_CPU=true: torchrun + gloo on the CPU
    if fsdp:
        cmd += [str(FSDP_ON_CPU)]  # runs the script with accelerate's state switched to FSDP (2 by default)
    return cmd + [str(script), *args]


def launch(script, *args, num_processes=1, fsdp=False, timeout=600, check=True, **extra_env):
    result = subprocess.run(
        launch_cmd(script, *args, num_processes=num_processes, fsdp=fsdp),
        env=env(ACCELERATE_USE_CPU="true", **extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stderr[-6000:]}")
    return result


def kill_when(script, args, ready: Path, timeout=300):
    """Start a run, SIGKILL its process group once `ready` exists; asserts it was still running then."""
    process = subprocess.Popen(
        launch_cmd(script, *args),
        env=env(ACCELERATE_USE_CPU="true"),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + timeout
    while not ready.exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline, f"no {ready} within {timeout} s"
        time.sleep(0.02)
    still_running = process.poll() is None
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    assert still_running, "the run finished before the kill; the test proved nothing"


def weights(path):
    return load_file(str(path))


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def assert_loads_in_a_fresh_process(folder, pipeline_class: str, call: str, expected, checks: str = ""):
    """In a new interpreter, the pipeline saved in `folder` loads both through `DiffusionPipeline.from_pretrained(...,
    trust_remote_code=True)` and `<pipeline_class>.from_pretrained`, is a `pipeline_class`, and
    ``pipe(<call>, output_type="pt", generator=seed 0)`` gives `expected`; `checks` are more statements run on each
    loaded ``pipe``."""
    torch.save(expected, Path(folder) / "expected.pt")
    script = textwrap.dedent(
        f"""
        import torch
        from diffusers import DiffusionPipeline
        from diffusers_masked import {pipeline_class}
        for pipe in (
            DiffusionPipeline.from_pretrained({str(folder)!r}, trust_remote_code=True),
            {pipeline_class}.from_pretrained({str(folder)!r}),
        ):
            assert type(pipe) is {pipeline_class}, type(pipe)
            {checks}
            pipe.set_progress_bar_config(disable=True)
            images = pipe({call}, output_type="pt", generator=torch.Generator().manual_seed(0)).images
            torch.testing.assert_close(images, torch.load({str(Path(folder) / "expected.pt")!r}, weights_only=True))
        print("LOADED-OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert "LOADED-OK" in result.stdout, result.stderr[-3000:]
