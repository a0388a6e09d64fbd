"""examples/sample.py and diffusers_masked.evaluation.sampling: seeds, labels, shards, resume, processes, layout."""

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline, MaskDMPipeline
from diffusers_masked.evaluation import sampling
from tests.tiny import tiny_transformer, tiny_uvit

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "sample.py"
spec = importlib.util.spec_from_file_location("sample_script", SCRIPT)
sample_script = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sample_script)

STEPS = ["--num_inference_steps", "2"]


@pytest.fixture(scope="module")
def maskdit_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("maskdit") / "pipeline"
    MaskDiTPipeline(tiny_transformer(seed=0), EDMHeunScheduler()).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def maskdm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("maskdm")
    for num_classes in (0, 10):
        pipe = MaskDMPipeline(tiny_uvit(seed=0, num_classes=num_classes), MaskDMPipeline.default_scheduler())
        pipe.save_pretrained(root / f"classes{num_classes}")
    return root


def _run(pipeline, out, *args):
    return sample_script.main(["--pipeline", str(pipeline), "--output_dir", str(out), *STEPS, *args])


def _npz(out):
    [path] = Path(out).glob("samples_*.npz")
    with np.load(path, allow_pickle=False) as data:
        return path.name, {k: data[k] for k in data.keys()}


# ------------------------------------------------------------------------------------------------ layout and seeds


def test_the_npz_is_adms_reference_batch_layout(maskdit_dir, tmp_path):
    _run(maskdit_dir, tmp_path, "--num_samples", "7", "--shard_size", "3", "--batch_size", "2")
    name, data = _npz(tmp_path)
    assert name == "samples_7x8x8x3.npz" and sorted(data) == ["arr_0", "arr_1"]
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (7, 8, 8, 3)
    assert data["arr_1"].tolist() == [0, 1, 2, 3, 4, 5, 6]  # every class in turn


def test_each_sample_is_the_pipeline_output_for_its_own_seed_and_label(maskdit_dir, tmp_path):
    _run(maskdit_dir, tmp_path, "--num_samples", "5", "--shard_size", "2", "--seed", "3", "--output_format", "both")
    pipe = MaskDiTPipeline.from_pretrained(maskdit_dir)
    for i in (0, 4):
        generator = torch.Generator().manual_seed(3 * 2**32 + i)
        [expected] = pipe(class_labels=[i % 10], num_inference_steps=2, generator=generator).images
        np.testing.assert_array_equal(
            np.asarray(PIL.Image.open(tmp_path / "images" / f"{i:06d}.png")), np.asarray(expected)
        )
    np.testing.assert_array_equal(
        _npz(tmp_path)[1]["arr_0"][4], np.asarray(PIL.Image.open(tmp_path / "images" / "000004.png"))
    )


def test_images_do_not_depend_on_the_batch_size(maskdit_dir, tmp_path):
    _run(maskdit_dir, tmp_path / "a", "--num_samples", "6", "--batch_size", "1")
    _run(maskdit_dir, tmp_path / "b", "--num_samples", "6", "--batch_size", "4")
    a, b = _npz(tmp_path / "a")[1]["arr_0"], _npz(tmp_path / "b")[1]["arr_0"]
    # Batched matrix products may round differently; after quantisation to uint8 that is at most one level.
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_given_class_labels_are_cycled():
    assert sampling.sample_labels(range(5), 10, [7, 2]) == [7, 2, 7, 2, 7]
    assert sampling.sample_labels(range(8, 13), 10) == [8, 9, 0, 1, 2]


def test_maskdm_samples_unconditionally_and_class_conditionally(maskdm_dirs, tmp_path):
    _run(maskdm_dirs / "classes0", tmp_path / "uncond", "--num_samples", "3", "--eta", "0.5")
    name, data = _npz(tmp_path / "uncond")
    assert name == "samples_3x8x8x3.npz" and sorted(data) == ["arr_0"]  # no labels for unconditional samples
    _run(
        maskdm_dirs / "classes10",
        tmp_path / "cond",
        "--num_samples",
        "3",
        "--class_labels",
        "4",
        "--guidance_scale",
        "2",
    )
    assert _npz(tmp_path / "cond")[1]["arr_1"].tolist() == [4, 4, 4]


# ------------------------------------------------------------------------------------------------ resume


class FailingAfter:
    """Wraps a pipeline; its call number `fail_at` raises, as a kill in the middle of a shard would stop it."""

    def __init__(self, pipeline, fail_at=None):
        self.pipeline, self.fail_at, self.calls = pipeline, fail_at, 0

    def __call__(self, **kwargs):
        self.calls += 1
        if self.calls == self.fail_at:
            raise KeyboardInterrupt
        return self.pipeline(**kwargs)


def _sample_all(pipeline, out, num_samples=7, shard_size=3):
    for shard in sampling.pending_shards(out, num_samples, shard_size):
        sampling.sample_shard(
            pipeline, out, shard, sampling.shard_ranges(num_samples, shard_size)[shard], seed=0, batch_size=2,
            num_classes=10, pipeline_kwargs={"num_inference_steps": 2},
        )  # fmt: skip


def test_an_interrupted_run_resumes_keeping_its_finished_shards(maskdit_dir, tmp_path):
    pipe = MaskDiTPipeline.from_pretrained(maskdit_dir)
    pipe.set_progress_bar_config(disable=True)
    _sample_all(pipe, tmp_path / "reference")
    reference = sampling.assemble_npz(tmp_path / "reference", 7, 3)

    out = tmp_path / "interrupted"
    with pytest.raises(KeyboardInterrupt):
        _sample_all(FailingAfter(pipe, fail_at=4), out)  # shard 0 is two calls, shard 1 dies in its second
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-000000.npz"]  # no partial file left
    finished = (out / "shards" / "shard-000000.npz").stat().st_mtime_ns
    assert sampling.pending_shards(out, 7, 3) == [1, 2]

    resumed = FailingAfter(pipe)
    _sample_all(resumed, out)
    assert resumed.calls == 2 + 1  # shards 1 and 2 only (3 and 1 samples in batches of 2)
    assert (out / "shards" / "shard-000000.npz").stat().st_mtime_ns == finished
    with np.load(reference) as a, np.load(sampling.assemble_npz(out, 7, 3)) as b:
        np.testing.assert_array_equal(a["arr_0"], b["arr_0"])


def test_a_kill_minus_9_resumes_from_the_finished_shards(maskdit_dir, tmp_path):
    out = tmp_path / "killed"
    args = [sys.executable, str(SCRIPT), "--pipeline", str(maskdit_dir), "--output_dir", str(out), *STEPS]
    args += ["--num_samples", "400", "--shard_size", "4", "--batch_size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        shards = out / "shards"
        while not (shards.is_dir() and len(list(shards.glob("shard-*.npz"))) >= 2):
            assert process.poll() is None, "the run ended before it could be killed"
            time.sleep(0.01)
    finally:
        process.kill()
        process.wait()
    kept = {p.name: p.stat().st_mtime_ns for p in shards.glob("shard-*.npz")}
    assert 2 <= len(kept) < 100, "the run finished before the kill; the test proved nothing"
    _run(maskdit_dir, out, "--num_samples", "400", "--shard_size", "4", "--batch_size", "4")
    assert all((shards / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())
    assert _npz(out)[1]["arr_0"].shape == (400, 8, 8, 3)


def test_resuming_with_other_settings_is_refused(maskdit_dir, tmp_path):
    _run(maskdit_dir, tmp_path, "--num_samples", "2")
    with pytest.raises(ValueError, match="seed: 0 -> 1"):
        _run(maskdit_dir, tmp_path, "--num_samples", "2", "--seed", "1")


def test_more_samples_extend_a_finished_run(maskdit_dir, tmp_path):
    _run(maskdit_dir, tmp_path / "grown", "--num_samples", "3", "--shard_size", "2")
    _run(maskdit_dir, tmp_path / "grown", "--num_samples", "5", "--shard_size", "2")
    _run(maskdit_dir, tmp_path / "direct", "--num_samples", "5", "--shard_size", "2")
    np.testing.assert_array_equal(_npz(tmp_path / "grown")[1]["arr_0"], _npz(tmp_path / "direct")[1]["arr_0"])


# ------------------------------------------------------------------------------------------------ processes


def test_a_two_process_launch_draws_the_images_of_a_one_process_run(maskdit_dir, tmp_path):
    common = ["--num_samples", "10", "--shard_size", "3", "--batch_size", "2", *STEPS]
    _run(maskdit_dir, tmp_path / "one", *common[:-2])
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_machines", "1", "--mixed_precision", "no"]
    cmd += ["--dynamo_backend", "no", "--num_processes", "2", "--multi_gpu", str(SCRIPT)]
    cmd += ["--pipeline", str(maskdit_dir), "--output_dir", str(tmp_path / "two"), *common]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("ACCELERATE_CONFIG_FILE", None)
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "process 0/2" in result.stderr  # really two processes, sharing the shards
    one, two = _npz(tmp_path / "one")[1], _npz(tmp_path / "two")[1]
    np.testing.assert_array_equal(one["arr_0"], two["arr_0"])
    np.testing.assert_array_equal(one["arr_1"], two["arr_1"])


# ------------------------------------------------------------------------------------------------ flags and loading


@pytest.mark.parametrize(
    "flag, value",
    [
        ("--num_samples", "0"),
        ("--batch_size", "0"),
        ("--shard_size", "-1"),
        ("--seed", "-1"),
        ("--guidance_scale", "-1"),
        ("--guidance_scale", "inf"),
        ("--num_inference_steps", "0"),
        ("--eta", "1.5"),
        ("--class_labels", "3,x"),
    ],
)
def test_flags_are_checked_before_anything_is_loaded(flag, value, tmp_path):
    with pytest.raises(ValueError, match=flag):
        sample_script.main(["--pipeline", str(tmp_path / "missing"), "--output_dir", str(tmp_path), flag, value])


@pytest.mark.parametrize(
    "pipeline, flag, value",
    [
        ("classes0", "--class_labels", "1"),
        ("classes0", "--guidance_scale", "2"),
        ("classes10", "--class_labels", "10"),
        ("classes10", "--scheduler", "edm_heun"),
    ],
)
def test_flags_that_do_not_fit_the_pipeline_are_refused(maskdm_dirs, tmp_path, pipeline, flag, value):
    with pytest.raises(ValueError, match=flag):
        _run(maskdm_dirs / pipeline, tmp_path, flag, value)
    assert not (tmp_path / "shards").exists()


def test_eta_and_ddpm_schedulers_are_refused_for_maskdit(maskdit_dir, tmp_path):
    with pytest.raises(ValueError, match="--eta"):
        _run(maskdit_dir, tmp_path, "--eta", "0.5")
    with pytest.raises(ValueError, match="--scheduler"):
        _run(maskdit_dir, tmp_path, "--scheduler", "ddim")


def test_a_swapped_scheduler_is_used_and_recorded(maskdit_dir, tmp_path):
    _run(maskdit_dir, tmp_path, "--num_samples", "1", "--scheduler", "edm_dpmsolver")
    assert json.loads((tmp_path / "sampling_config.json").read_text())["scheduler"] == "EDMDPMSolverMultistepScheduler"


def test_a_stock_pipeline_loads_as_diffusers_loads_it_and_one_naming_code_needs_trust_remote_code(tmp_path):
    unet = UNet2DModel(
        sample_size=8, block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    DDPMPipeline(unet, DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    # diffusers' own pipeline of diffusers components: loading it runs no code from the folder.
    assert isinstance(sampling.load_pipeline(tmp_path / "ddpm"), DDPMPipeline)
    # A pipeline class or component named by a module in the folder is code that loading would run.
    for key, entry in (("_class_name", ["pipeline_custom", "CustomPipeline"]), ("unet", ["unet_custom", "MyUNet"])):
        index = json.loads((tmp_path / "ddpm" / "model_index.json").read_text())
        index[key] = entry
        (tmp_path / "custom").mkdir(exist_ok=True)
        (tmp_path / "custom" / "model_index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match="--trust_remote_code"):
            sampling.load_pipeline(tmp_path / "custom")


def test_our_pipelines_load_with_their_own_class(maskdit_dir, maskdm_dirs):
    assert type(sampling.load_pipeline(maskdit_dir)) is MaskDiTPipeline
    assert type(sampling.load_pipeline(maskdm_dirs / "classes0")) is MaskDMPipeline


# ------------------------------------------------------------------------------------------------ damaged files


@pytest.mark.parametrize("content", ['{"seed": ', "[1, 2]"], ids=["not-json", "not-an-object"])
def test_a_damaged_sampling_config_stops_the_run_naming_the_file(maskdit_dir, tmp_path, content):
    (tmp_path / "sampling_config.json").write_text(content)
    with pytest.raises(ValueError, match=r"sampling_config.json is damaged .*sample into another folder") as error:
        _run(maskdit_dir, tmp_path, "--num_samples", "1")
    assert "\n" not in str(error.value)
    assert not (tmp_path / "shards").exists()


def test_a_damaged_model_index_stops_loading_naming_the_file(maskdit_dir, tmp_path):
    import shutil

    folder = Path(shutil.copytree(maskdit_dir, tmp_path / "pipeline"))
    (folder / "model_index.json").write_text('{"_class_name": ')
    with pytest.raises(ValueError, match=r"pipeline/model_index.json is damaged") as error:
        sampling.load_pipeline(folder)
    assert "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ schedulers


def test_the_scheduler_choices_are_those_the_pipeline_itself_accepts(maskdit_dir, maskdm_dirs):
    maskdit = sampling.load_pipeline(maskdit_dir)
    maskdm = sampling.load_pipeline(maskdm_dirs / "classes0")
    assert sampling.compatible_scheduler_names(maskdit) == ["edm_dpmsolver", "edm_euler", "edm_heun"]
    assert sampling.compatible_scheduler_names(maskdm) == ["ddim", "ddpm", "dpmsolver"]
    with pytest.raises(ValueError, match="MaskDiTPipeline cannot sample with DDIMScheduler"):
        sampling.set_scheduler(maskdit, "ddim")
    with pytest.raises(ValueError, match="MaskDMPipeline cannot sample with EDMHeunScheduler"):
        sampling.set_scheduler(maskdm, "edm_heun")
