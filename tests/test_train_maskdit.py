"""examples/train_maskdit.py: its flags, and tiny end-to-end runs through `accelerate launch`.

The machinery it shares with the other training scripts is tested in test_training.py."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_masked.training.checkpoints import TRAINING_STATE_FILE, list_checkpoints
from diffusers_masked.training.ema import SHARDED_EMA_DIR
from diffusers_masked.training.outputs import LOCK_FILE
from tests.launch import assert_same_weights, env, kill_when, launch, launch_cmd, weights
from tests.tiny import tiny_vae

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_maskdit.py"
TINY_MODEL = json.dumps(
    {
        "patch_size": 2,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "decoder_num_layers": 1,
        "decoder_num_attention_heads": 2,
        "decoder_attention_head_dim": 16,
    }
)
TINY_RUN = [
    "--model_config", TINY_MODEL,
    "--resolution", "8",
    "--train_batch_size", "16",
    "--num_inference_steps", "2",
    "--num_validation_images_per_class", "1",
    "--validation_classes", "3",
    "--num_eval_samples_per_class", "0",
    "--validation_steps", "0",
    "--report_to", "none",
    "--cpu_threads", "1",
]  # fmt: skip


def _load_script():
    """The script as a module, to test its command line (`parse_args`) in this process."""
    spec = importlib.util.spec_from_file_location("train_maskdit", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


train = _load_script()


def _launch_cmd(*args, num_processes=1, fsdp=False):
    return launch_cmd(SCRIPT, *TINY_RUN, *args, num_processes=num_processes, fsdp=fsdp)


def _launch(*args, num_processes=1, fsdp=False, timeout=600, check=True, **extra_env):
    return launch(
        SCRIPT, *TINY_RUN, *args, num_processes=num_processes, fsdp=fsdp, timeout=timeout, check=check, **extra_env
    )


_env, _weights, _assert_same_weights = env, weights, assert_same_weights


# ------------------------------------------------------------------------------------------------ pieces


def test_built_in_default_applies_the_digits_recipe_and_user_flags_win():
    args = train.parse_args([])
    assert args.builtin_digits and args.output_dir == "maskdit-digits" and args.resolution == 16
    assert train.parse_args(["--resolution", "24"]).resolution == 24
    assert train.parse_args(["--train_data_dir", "x"]).ema_decay == 0.9999  # the paper's EMA for real data


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--mask_ratio", "1.0"], "mask_ratio"),
        (["--mask_schedule", '{"type": "staged", "stages": [[5, 0.9], [2, 0.5]]}'], "increasing"),
        (["--mask_schedule", "often"], "mask_schedule"),
        (["--class_dropout_prob", "1.5"], "class_dropout_prob"),
        (["--max_train_steps", "0", "--unmask_tuning_steps", "0"], "nothing to train"),
        (["--dataset_name", "a", "--train_data_dir", "b"], "not both"),
        (["--cpu_threads", "0"], "cpu_threads"),
        (["--learning_rate", "0"], "--learning_rate"),
        (["--unmask_learning_rate", "-0.001"], "--unmask_learning_rate"),
        (["--unmask_learning_rate", "0"], "--unmask_learning_rate"),
        (["--train_batch_size", "0"], "--train_batch_size"),
        (["--train_batch_size", "-4"], "--train_batch_size"),
        (["--unmask_batch_size", "0"], "--unmask_batch_size"),
        (["--gradient_accumulation_steps", "0"], "--gradient_accumulation_steps"),
        (["--num_classes", "-1"], "--num_classes"),
        (["--num_inference_steps", "0"], "--num_inference_steps"),
        (["--guidance_scale", "-1"], "--guidance_scale"),
        (["--guidance_scale", "inf"], "--guidance_scale"),
        (["--guidance_scale", "nan"], "--guidance_scale"),
        (["--ema_decay", "1.5"], "--ema_decay"),
        (["--P_std", "0"], "--P_std"),
        (["--sigma_data", "0"], "--sigma_data"),
        (["--mae_loss_weight", "nan"], "--mae_loss_weight"),
        (["--max_grad_norm", "0"], "--max_grad_norm"),
        (["--adam_beta2", "1"], "--adam_beta2"),
        (["--num_validation_images_per_class", "0"], "--num_validation_images_per_class"),
        (["--seed", "-1"], "--seed"),
        (["--model_config", "/nowhere/config.json"], "no such config file"),
        (["--model_config", '{"num_layers": 2'], "not valid JSON"),
        (["--model_config", '{"num_layer": 2}'], "num_layer"),
    ],
)
def test_bad_flags_exit_with_a_message_naming_them(argv, match, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(argv)
    assert match in capsys.readouterr().err


def test_given_unmask_phase_flags_are_kept_and_missing_ones_take_the_masked_phase_values():
    args = train.parse_args(["--unmask_learning_rate", "2e-4", "--unmask_batch_size", "3"])
    assert (args.unmask_learning_rate, args.unmask_batch_size) == (2e-4, 3)
    args = train.parse_args(["--train_data_dir", "x"])  # the digits recipe sets its own unmasking batch size
    assert (args.unmask_learning_rate, args.unmask_batch_size) == (args.learning_rate, args.train_batch_size)


# ------------------------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_tiny_run_leaves_a_loadable_pipeline_grid_card_logs_and_limited_checkpoints(tmp_path):
    out = tmp_path / "run"
    _launch(
        "--output_dir", str(out),
        "--max_train_steps", "4",
        "--unmask_tuning_steps", "2",
        "--checkpointing_steps", "1",
        "--checkpoints_total_limit", "2",
        "--validation_steps", "3",
        "--report_to", "tensorboard",
        "--num_eval_samples_per_class", "2",
    )  # fmt: skip
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-5", "checkpoint-6"]
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["num_fake"] == 20 and 0 <= metrics["accuracy"] <= 1 and metrics["num_inference_steps"] == 2
    assert not list(out.glob(".partial-*"))
    assert (out / "samples.png").exists() and (out / "validation" / "step-0000003.png").exists()
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    card = (out / "README.md").read_text()
    assert "library_name: diffusers" in card and "maskdit" in card and '"mae_loss_weight": 0.1' in card
    assert "model-index" in card and "accuracy" in card.lower()
    with Image.open(out / "samples.png") as grid:  # the first 2 evaluated samples of 3 classes
        assert grid.size == (10 * 2, 10 * 3)  # 8x8 samples, each with a 1-pixel border

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[0, 9], num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()
    assert json.loads((out / "checkpoint-6" / TRAINING_STATE_FILE).read_text())["global_step"] == 6


@pytest.mark.slow
def test_resume_from_latest_continues_the_step_count(tmp_path):
    out = tmp_path / "run"
    _launch(
        "--output_dir", str(out), "--max_train_steps", "3", "--unmask_tuning_steps", "0", "--checkpointing_steps", "2"
    )
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-2", "checkpoint-3"]
    result = _launch(
        "--output_dir", str(out),
        "--max_train_steps", "5",
        "--unmask_tuning_steps", "0",
        "--checkpointing_steps", "2",
        "--resume_from_checkpoint", "latest",
    )  # fmt: skip
    assert "at step 3" in result.stderr
    assert [p.name for p in list_checkpoints(out)][-1] == "checkpoint-5"


@pytest.mark.slow
def test_kill_minus_9_then_resume_ends_with_the_weights_of_an_uninterrupted_run(tmp_path):
    common = ["--max_train_steps", "60", "--unmask_tuning_steps", "20", "--checkpointing_steps", "10"]
    reference = tmp_path / "reference"
    _launch("--output_dir", str(reference), *common)

    killed = tmp_path / "killed"
    kill_when(SCRIPT, [*TINY_RUN, "--output_dir", str(killed), *common], killed / "checkpoint-30")
    assert not (killed / "model_index.json").exists()

    result = _launch("--output_dir", str(killed), *common, "--resume_from_checkpoint", "latest")
    assert "resumed from" in result.stderr
    _assert_same_weights(
        _weights(killed / "transformer" / "diffusion_pytorch_model.safetensors"),
        _weights(reference / "transformer" / "diffusion_pytorch_model.safetensors"),
    )
    _assert_same_weights(
        _weights(killed / "checkpoint-80" / "model.safetensors"),
        _weights(reference / "checkpoint-80" / "model.safetensors"),
    )


@pytest.mark.slow
def test_two_process_ddp_runs_both_phases_without_searching_for_unused_parameters(tmp_path):
    # The script leaves DDP's find_unused_parameters off: a parameter without a gradient in some step (the mask
    # token of the unmasking phase, were it not kept in the graph) would stop the next step with a reduction error.
    out = tmp_path / "ddp"
    result = _launch(
        "--output_dir", str(out), "--max_train_steps", "3", "--unmask_tuning_steps", "2", "--train_batch_size", "8",
        "--checkpointing_steps", "1", "--checkpoints_total_limit", "5",
        num_processes=2,
    )  # fmt: skip
    assert "all 2 ranks hold identical weights" in result.stderr
    assert (out / "model_index.json").exists()
    # Each rank writes its own random state into the checkpoint; the folder must be renamed only after both have.
    for checkpoint in list_checkpoints(out):
        assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {
            "random_states_0.pkl",
            "random_states_1.pkl",
        }


FSDP_RUN = [
    "--train_batch_size",
    "8",
    "--unmask_tuning_steps",
    "0",
    "--checkpointing_steps",
    "2",
    "--validation_steps",
    "2",
]


@pytest.mark.slow
def test_fsdp2_on_cpu_trains_exactly_like_ddp_and_an_extended_resume_matches_too(tmp_path):
    # FSDP2 through accelerate on two CPU processes (tests/fsdp_on_cpu.py): sharded weights, optimizer state and EMA,
    # sharded checkpoints, gathered final (EMA) weights, validation grids sampled by every rank. Stopped after 2 steps
    # and resumed with --max_train_steps 4, it must end where an uninterrupted 4-step data-parallel run ends, to the
    # bit, with the same validation grids (the data-parallel run samples on the main process alone).
    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _launch("--output_dir", str(ddp), *FSDP_RUN, "--max_train_steps", "4", num_processes=2)
    _launch("--output_dir", str(fsdp), *FSDP_RUN, "--max_train_steps", "2", num_processes=2, fsdp=True)
    checkpoint = fsdp / "checkpoint-2"
    assert (checkpoint / "pytorch_model_fsdp_0").is_dir() and (checkpoint / "optimizer_0").is_dir()
    assert {p.name for p in (checkpoint / SHARDED_EMA_DIR).glob("*.distcp")} == {"__0_0.distcp", "__1_0.distcp"}
    assert {p.name for p in checkpoint.glob("random_states_*.pkl")} == {"random_states_0.pkl", "random_states_1.pkl"}
    result = _launch(
        "--output_dir", str(fsdp), *FSDP_RUN, "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
        num_processes=2, fsdp=True,
    )  # fmt: skip
    assert "resumed from" in result.stderr and "at step 2" in result.stderr
    final = "transformer/diffusion_pytorch_model.safetensors"
    _assert_same_weights(_weights(fsdp / final), _weights(ddp / final))
    for step in ("step-0000002.png", "step-0000004.png"):
        with Image.open(ddp / "validation" / step) as expected, Image.open(fsdp / "validation" / step) as grid:
            np.testing.assert_array_equal(np.asarray(grid), np.asarray(expected))
    raw = _weights(ddp / "checkpoint-4" / "model.safetensors")
    assert any(not torch.equal(raw[key], value) for key, value in _weights(ddp / final).items())  # the EMA, not raw

    from diffusers_masked import MaskDiTPipeline

    pipe = MaskDiTPipeline.from_pretrained(fsdp)
    pipe.set_progress_bar_config(disable=True)
    assert pipe(class_labels=[1], num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)


@pytest.mark.slow
def test_ema_under_fsdp_version_1_is_refused_with_the_flag_to_use(tmp_path):
    out = tmp_path / "out"
    result = _launch(
        "--output_dir", str(out), "--max_train_steps", "2", "--train_batch_size", "8",
        num_processes=2, fsdp=True, check=False, FSDP_ON_CPU_VERSION="1",
    )  # fmt: skip
    assert result.returncode != 0
    assert "FSDP version 2" in result.stderr and "--no-use_ema" in result.stderr
    assert not list(out.glob("checkpoint-*"))


@pytest.mark.slow
def test_resuming_with_a_longer_run_follows_the_new_learning_rate_schedule(tmp_path):
    # The first run's checkpoint holds the learning rate it scheduled for step 2: past its end, so without warm-up.
    common = ["--unmask_tuning_steps", "0", "--checkpointing_steps", "2", "--lr_warmup_steps", "10"]
    _launch("--output_dir", str(tmp_path / "full"), *common, "--max_train_steps", "4")
    _launch("--output_dir", str(tmp_path / "split"), *common, "--max_train_steps", "2")
    _launch(
        "--output_dir",
        str(tmp_path / "split"),
        *common,
        "--max_train_steps",
        "4",
        "--resume_from_checkpoint",
        "latest",
    )
    final = "transformer/diffusion_pytorch_model.safetensors"
    _assert_same_weights(_weights(tmp_path / "split" / final), _weights(tmp_path / "full" / final))


@pytest.mark.slow
def test_a_config_that_does_not_distribute_on_this_machine_fails_instead_of_training_twice(tmp_path):
    # accelerate ignores an FSDP config without a GPU (distributed type NO); both launched processes would then
    # train alone and overwrite each other's checkpoints.
    config = tmp_path / "fsdp.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\nnum_processes: 2\n"
        "machine_rank: 0\nmixed_precision: 'no'\nrdzv_backend: static\nsame_network: true\nfsdp_config:\n"
        "  fsdp_version: 2\n  fsdp_sync_module_states: false\n  fsdp_cpu_ram_efficient_loading: false\n"
    )
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), str(SCRIPT), *TINY_RUN]
    cmd += ["--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", "--no-use_ema"]
    result = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "2 processes were launched but accelerate set up 1" in result.stderr
    assert not list((tmp_path / "out").glob("checkpoint-*"))


def _write_imagefolder(root, num_per_class=8, size=12, rgb=True):
    rng = np.random.default_rng(0)
    for label in ("cat", "dog"):
        (root / label).mkdir(parents=True)
        for i in range(num_per_class):
            shape = (size, size, 3) if rgb else (size, size)
            Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)).save(root / label / f"{i}.png")


@pytest.mark.slow
def test_a_corrupt_image_in_an_imagefolder_fails_naming_the_file(tmp_path):
    data = tmp_path / "data"
    _write_imagefolder(data)
    (data / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    result = _launch(
        "--train_data_dir", str(data), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "2", check=False
    )
    assert result.returncode != 0
    assert "broken.png" in result.stderr


@pytest.mark.slow
def test_vae_run_extracts_latents_once_and_reuses_the_cache(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    data = tmp_path / "data"
    _write_imagefolder(data, size=16)
    cache = tmp_path / "cache"
    args = [
        "--train_data_dir", str(data), "--vae", str(tmp_path / "vae"), "--cache_dir", str(cache),
        "--resolution", "16", "--max_train_steps", "2", "--unmask_tuning_steps", "1",
    ]  # fmt: skip
    _launch(*args, "--output_dir", str(tmp_path / "a"))
    caches = sorted(p.name for p in cache.iterdir() if p.name.startswith("latents-"))
    assert len(caches) == 1
    stamp = (cache / caches[0]).stat().st_mtime_ns
    _launch(*args, "--output_dir", str(tmp_path / "b"))
    assert sorted(p.name for p in cache.iterdir() if p.name.startswith("latents-")) == caches
    assert (cache / caches[0]).stat().st_mtime_ns == stamp  # reused, not rewritten

    from diffusers_masked import MaskDiTPipeline

    pipe = MaskDiTPipeline.from_pretrained(tmp_path / "b")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.in_channels == 4 and pipe.vae is not None
    assert pipe(class_labels=["cat"], num_inference_steps=2, output_type="np").images.shape == (1, 16, 16, 3)


@pytest.mark.slow
def test_a_non_finite_loss_stops_the_run_naming_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    # An absurd learning rate makes the weights overflow after the first update.
    result = _launch(
        "--output_dir", str(out), "--max_train_steps", "6", "--unmask_tuning_steps", "0",
        "--checkpointing_steps", "1", "--learning_rate", "1e30", "--lr_warmup_steps", "0",
        check=False,
    )  # fmt: skip
    assert result.returncode != 0
    assert "non-finite loss at step 1" in result.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1"]
    weights = _weights(out / "checkpoint-1" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert not (out / "model_index.json").exists()


# ------------------------------------------------------------------------------------------------ failure behaviour


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run with checkpoints at steps 1 and 2; tests copy it before changing anything."""
    out = tmp_path_factory.mktemp("finished") / "run"
    _launch(
        "--output_dir", str(out), "--max_train_steps", "2", "--unmask_tuning_steps", "0", "--checkpointing_steps", "1"
    )
    return out


def _copy(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


RESUME = ["--max_train_steps", "3", "--unmask_tuning_steps", "0", "--resume_from_checkpoint", "latest"]


@pytest.mark.slow
def test_a_planted_code_running_custom_checkpoint_is_refused_on_resume_without_running(finished_run, tmp_path):
    import pickle

    out = _copy(finished_run, tmp_path)
    marker = tmp_path / "marker"

    class RunsCode:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('ran')",))

    torch.save({"state": RunsCode()}, out / "checkpoint-2" / "custom_checkpoint_0.pkl", pickle_module=pickle)
    result = _launch("--output_dir", str(out), *RESUME, check=False)
    assert result.returncode != 0 and "custom_checkpoint_0.pkl" in result.stderr
    assert not marker.exists()


@pytest.mark.slow
def test_a_failed_resume_leaves_the_finished_runs_config_untouched(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    before = (out / "training_config.json").read_text()
    result = _launch("--output_dir", str(out), *RESUME[:-1], str(tmp_path / "no-such-checkpoint"), check=False)
    assert result.returncode != 0 and "no-such-checkpoint" in result.stderr
    assert (out / "training_config.json").read_text() == before


@pytest.mark.slow
def test_resuming_with_another_head_split_of_the_same_shapes_is_refused_naming_the_keys(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    four_by_eight = json.dumps({**json.loads(TINY_MODEL), "num_attention_heads": 4, "attention_head_dim": 8})
    result = _launch("--output_dir", str(out), *RESUME, "--model_config", four_by_eight, check=False)
    assert result.returncode != 0
    assert "num_attention_heads" in result.stderr and "attention_head_dim" in result.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.slow
def test_a_second_run_into_a_folder_in_use_is_refused(tmp_path):
    import fcntl

    out = tmp_path / "run"
    out.mkdir()
    with open(out / LOCK_FILE, "a+") as held:  # what a live run holds
        fcntl.flock(held, fcntl.LOCK_EX)
        result = _launch("--output_dir", str(out), "--max_train_steps", "2", check=False)
    assert result.returncode != 0 and "in use by another training run" in result.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "training_config.json").exists()


@pytest.mark.slow
def test_a_new_run_into_a_folder_with_another_runs_checkpoints_is_refused(finished_run, tmp_path):
    out = _copy(finished_run, tmp_path)
    result = _launch("--output_dir", str(out), "--max_train_steps", "2", "--checkpoints_total_limit", "1", check=False)
    assert result.returncode != 0 and "checkpoints of another run" in result.stderr
    assert [p.name for p in list_checkpoints(out)] == ["checkpoint-1", "checkpoint-2"]


@pytest.mark.slow
def test_num_classes_below_the_datas_labels_is_refused_before_training(tmp_path):
    result = _launch(
        "--output_dir", str(tmp_path / "run"), "--num_classes", "9", "--max_train_steps", "2", check=False
    )
    assert result.returncode != 0 and "num_classes is 9 but the data has labels up to 9" in result.stderr
    assert not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.slow
def test_unconditional_latent_run_with_flipped_latents_leaves_an_unconditional_pipeline(tmp_path):
    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    data = tmp_path / "data"
    _write_imagefolder(data, size=16)
    out = tmp_path / "run"
    _launch(
        "--train_data_dir", str(data), "--vae", str(tmp_path / "vae"), "--cache_dir", str(tmp_path / "cache"),
        "--random_flip", "--num_classes", "0", "--resolution", "16", "--max_train_steps", "2",
        "--unmask_tuning_steps", "1", "--output_dir", str(out),
    )  # fmt: skip
    (cache,) = [p for p in (tmp_path / "cache").iterdir() if p.name.startswith("latents-")]
    import datasets

    assert "flipped_latent_mean" in datasets.load_from_disk(str(cache)).column_names
    assert "label" not in datasets.load_from_disk(str(cache)).column_names

    from diffusers_masked import MaskDiTPipeline

    pipe = MaskDiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.transformer.config.num_classes == 0
    assert pipe(batch_size=2, num_inference_steps=2, output_type="np").images.shape == (2, 16, 16, 3)
    card = (out / "README.md").read_text()
    assert "- unconditional" in card and "class-conditional" not in card
