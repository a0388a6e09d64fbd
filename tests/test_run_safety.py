"""What a run will and will not touch: its output folder, the checkpoint it resumes, the flags it checks first.

The rules (docs/training.md, "What a run will and will not touch"): a run never deletes or overwrites a file it did
not write; a resumed run changes only what a resume may change and records it; state files read back are checked
like flags. The end-to-end runs of the issue's reproductions are at the bottom (slow)."""

import argparse
import errno
import json
import os
import random
import string
from pathlib import Path

import pytest
import torch

from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline
from diffusers_masked.training.arguments import add_output_arguments, check_common_flags
from diffusers_masked.training.checkpoints import check_resume, read_training_state, save_checkpoint
from diffusers_masked.training.outputs import (
    MANIFEST,
    check_output_folder,
    claim_output_folder,
    publish_files,
    record_outputs,
)
from diffusers_masked.training.run import publish_pipeline
from tests.launch import launch
from tests.tiny import tiny_transformer

REPO = Path(__file__).resolve().parents[1]
NAMES = ["README.md", "model_index.json", "samples.png", "notes.txt", "transformer", "scheduler", "vae", "online"]


def _random_user_tree(root: Path, rng: random.Random) -> dict[Path, bytes]:
    """Files a user might keep in a folder, some named like what a run writes."""
    files = {}
    for _ in range(rng.randint(1, 6)):
        parts = [rng.choice(NAMES + ["".join(rng.choices(string.ascii_lowercase, k=5))])]
        if parts[0] in ("transformer", "scheduler", "vae", "online") or rng.random() < 0.3:
            parts.append(rng.choice(["config.json", "mine.py", "notes.txt", "diffusion_pytorch_model.safetensors"]))
        path = root.joinpath(*parts)
        if path.parent.is_file() or path.is_dir() or any(p.is_file() for p in path.parents if root in p.parents):
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        files[path] = rng.randbytes(rng.randint(0, 64))
        path.write_bytes(files[path])
    return files


def _unchanged(files: dict[Path, bytes]) -> bool:
    return all(path.is_file() and path.read_bytes() == content for path, content in files.items())


# ------------------------------------------------------------------------------------------ the output folder


@pytest.mark.parametrize("seed", range(12))
def test_a_folder_holding_any_user_file_is_refused_for_a_new_run_naming_every_file(tmp_path, seed):
    files = _random_user_tree(tmp_path, random.Random(seed))
    message = check_output_folder(tmp_path, None)
    assert message is not None and "--overwrite_output_dir" in message
    for path in files:
        assert path.relative_to(tmp_path).as_posix() in message
    assert _unchanged(files)


@pytest.mark.parametrize("seed", range(12))
def test_publishing_beside_user_files_replaces_only_same_named_files_and_deletes_nothing(tmp_path, seed):
    # --overwrite_output_dir: the run writes its pipeline into a folder of user files.
    files = _random_user_tree(tmp_path / "out", random.Random(seed))
    pipeline = MaskDiTPipeline(transformer=tiny_transformer(seed=0), scheduler=EDMHeunScheduler())
    try:
        written = set(publish_pipeline(pipeline, tmp_path / "out"))
    except ValueError as err:  # a user folder where the pipeline writes a file: refused, nothing touched
        assert "is in the way of this run's" in str(err) and "nothing was written" in str(err)
        written = set()
    kept = {
        path: content
        for path, content in files.items()
        if path.relative_to(tmp_path / "out").as_posix() not in written
    }
    assert _unchanged(kept)
    if written and not any(path.suffix == ".py" for path in kept):
        assert MaskDiTPipeline.from_pretrained(tmp_path / "out").transformer.config.num_layers == 2
    elif written:  # a user's code file beside the pipeline: loading without trust_remote_code refuses it
        with pytest.raises(ValueError, match="not a diffusers-masked shim"):
            MaskDiTPipeline.from_pretrained(tmp_path / "out")


def test_a_resumed_run_finds_only_what_it_wrote_and_refuses_an_added_or_edited_file(tmp_path):
    (tmp_path / "training_config.json").write_text("{}")
    (tmp_path / "logs" / "run").mkdir(parents=True)
    (tmp_path / "logs" / "run" / "events").write_text("tensorboard")
    claim_output_folder(tmp_path, "run-a")
    record_outputs(tmp_path, "run-a", ["training_config.json"], dirs=["logs"])
    assert check_output_folder(tmp_path, "run-a") is None
    (tmp_path / "logs" / "run" / "more-events").write_text("an owned folder grows")
    assert check_output_folder(tmp_path, "run-a") is None
    (tmp_path / "notes.txt").write_text("mine")
    assert "notes.txt" in check_output_folder(tmp_path, "run-a")
    (tmp_path / "notes.txt").unlink()
    os.utime(tmp_path / "training_config.json", ns=(1, 1))  # edited since the run wrote it
    assert "training_config.json" in check_output_folder(tmp_path, "run-a")
    assert "training_config.json" in check_output_folder(tmp_path, "run-b")  # another lineage's file


def test_a_new_run_may_take_over_an_attempt_that_saved_nothing_but_not_a_finished_run(tmp_path):
    (tmp_path / "training_config.json").write_text("{}")
    claim_output_folder(tmp_path, "crashed-early")
    record_outputs(tmp_path, "crashed-early", ["training_config.json"])
    assert check_output_folder(tmp_path, None) is None  # no checkpoint, nothing published: its leftovers
    claim_output_folder(tmp_path, "new")
    assert json.loads((tmp_path / MANIFEST).read_text())["files"].keys() == {"training_config.json"}
    # A finished run whose checkpoints were deleted: its pipeline is another run's work.
    (tmp_path / "model_index.json").write_text("{}")
    record_outputs(tmp_path, "new", ["model_index.json"], published=["model_index.json"])
    message = check_output_folder(tmp_path, None)
    assert "model_index.json" in message and "training_config.json" in message


def test_an_output_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "out").write_text("a file")
    assert "is a file" in check_output_folder(tmp_path / "out", None)


def test_publishing_again_removes_only_the_stale_files_of_the_same_lineage(tmp_path):
    staging = tmp_path / "stage"
    (staging / "vae").mkdir(parents=True)
    (staging / "vae" / "config.json").write_text("old vae")
    (staging / "model_index.json").write_text("{}")
    out = tmp_path / "out"
    out.mkdir()
    (out / "user.txt").write_text("mine")
    first = publish_files(staging, out)
    assert first == ["model_index.json", "vae/config.json"]
    staging.mkdir(exist_ok=True)
    (staging / "model_index.json").write_text("{}")
    publish_files(staging, out, previous=first)
    assert not (out / "vae" / "config.json").exists() and (out / "user.txt").read_text() == "mine"


# ------------------------------------------------------------------------------------------------- resuming


def _state(step=4, **run):
    base = {"ema_decay": 0.999, "ema_warmup": True, "learning_rate": 1e-3, "max_train_steps": 4, "seed": 0}
    return {"global_step": step, "run_id": "run", "model_config": {}, "run": {**base, **run}}


def test_resuming_with_other_ema_settings_is_refused_naming_both_values():
    current = {**_state()["run"], "ema_decay": 0.5, "ema_warmup": False, "max_train_steps": 6}
    changes, error = check_resume(_state(), current, end=6)
    assert "ema_decay: 0.999 in the checkpoint, 0.5 now" in error and "ema_warmup" in error
    assert changes == {"max_train_steps": [4, 6]}


def test_a_resume_may_lengthen_the_run_and_lower_the_learning_rate_which_it_records():
    current = {**_state()["run"], "learning_rate": 5e-4, "max_train_steps": 8, "num_classes": None}
    changes, error = check_resume(_state(), current, end=8)
    assert error is None and changes == {"learning_rate": [1e-3, 5e-4], "max_train_steps": [4, 8]}


def test_resuming_past_the_requested_end_is_refused():
    _, error = check_resume(_state(step=4), {**_state()["run"], "max_train_steps": 2}, end=2)
    assert "step 4, after this run's last step (2)" in error


def _write_state(folder: Path, state: dict) -> Path:
    folder.mkdir(parents=True)
    (folder / "training_state.json").write_text(json.dumps(state))
    return folder


@pytest.mark.parametrize(
    "change, match",
    [
        ({"global_step": 999999}, "global_step is 999999 but the folder is checkpoint-4"),
        ({"global_step": -1}, "global_step must be an int >= 0"),
        ({"global_step": True}, "global_step must be an int >= 0"),
        ({"run_id": 3}, "run_id must be a non-empty string"),
        ({"model_config": []}, "model_config and run must be JSON objects"),
    ],
)
def test_a_tampered_training_state_is_refused_like_a_bad_flag(tmp_path, change, match):
    folder = _write_state(tmp_path / "checkpoint-4", {**_state(), **change})
    with pytest.raises(ValueError, match=match):
        read_training_state(folder)


@pytest.mark.parametrize(
    "key, value, match",
    [("decay", 5.0, "decay must be a number in"), ("optimization_step", -3, "optimization_step must be an int"),
     ("use_ema_warmup", "yes", "use_ema_warmup must be true or false"), ("power", 0, "power must be a number > 0")],
)  # fmt: skip
def test_a_tampered_ema_state_is_refused_like_a_bad_flag(tmp_path, key, value, match):
    from diffusers.training_utils import EMAModel

    from diffusers_masked.training.ema import EMA_STATE_FILE, load_ema, save_ema

    model = torch.nn.Linear(2, 2)
    ema = EMAModel(model.parameters(), decay=0.999)
    save_ema(ema, tmp_path)
    state = json.loads((tmp_path / EMA_STATE_FILE).read_text())
    (tmp_path / EMA_STATE_FILE).write_text(json.dumps({**state, key: value}))
    with pytest.raises(ValueError, match=match):
        load_ema(EMAModel(model.parameters(), decay=0.999), tmp_path)


class _FullDisk:
    """An accelerator whose `save_state` fails as torch's archive writer does on a full disk."""

    is_main_process, num_processes = True, 1

    def __init__(self, error):
        self.error = error

    def wait_for_everyone(self):
        pass

    def save_state(self, folder):
        Path(folder).mkdir()
        Path(folder, "model.safetensors").write_bytes(b"half")
        raise self.error


TORCH_WRITER = (
    "[enforce fail at inline_container.cc:778] . PytorchStreamWriter failed writing file data/0: file write failed"
)


@pytest.mark.parametrize(
    "error",
    [RuntimeError(TORCH_WRITER), RuntimeError("unexpected pos 7168 vs 7056"), OSError(errno.EDQUOT, "quota exceeded")],
)
def test_a_full_disk_while_saving_says_so_and_leaves_the_earlier_checkpoints(tmp_path, error):
    earlier = _write_state(tmp_path / "checkpoint-2", {**_state(step=2)})
    with pytest.raises(
        OSError, match="disk full or over quota while saving checkpoint-4.*earlier checkpoints are intact"
    ):
        save_checkpoint(_FullDisk(error), tmp_path, 4, None, {"run_id": "run", "model_config": {}, "run": {}})
    assert not (tmp_path / ".partial-checkpoint-4").exists() and not (tmp_path / "checkpoint-4").exists()
    assert read_training_state(earlier)["global_step"] == 2


def test_an_unrelated_error_while_saving_is_not_called_a_full_disk(tmp_path):
    with pytest.raises(RuntimeError, match="something else"):
        save_checkpoint(_FullDisk(RuntimeError("something else")), tmp_path, 4, None, {"run_id": "r"})


# ---------------------------------------------------------------------------------------------- flags, early


def _common(argv, **extra):
    parser = argparse.ArgumentParser()
    add_output_arguments(parser)
    args = parser.parse_args(argv)
    defaults = {"dataset_name": None, "train_data_dir": None, "builtin_digits": True, "label_column": "label"}
    for key, value in {**defaults, **extra}.items():
        setattr(args, key, value)
    check_common_flags(parser, args)


def test_a_tracker_that_is_not_installed_is_refused_before_any_work(capsys):
    with pytest.raises(SystemExit):
        _common(["--report_to", "wandb"])
    assert "--report_to wandb: it is not installed" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _common(["--report_to", "tensorbord"])
    assert "not a tracker" in capsys.readouterr().err
    _common(["--report_to", "tensorboard"])


def test_push_to_hub_offline_or_without_a_token_is_refused_before_any_work(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SystemExit):
        _common(["--push_to_hub"])
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    from tests.hub_stand_in import HubStandIn

    with HubStandIn() as hub:
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
        monkeypatch.delenv("HF_TOKEN", raising=False)
        import huggingface_hub.constants as constants

        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "ENDPOINT", hub.url)
        with pytest.raises(SystemExit):
            _common(["--push_to_hub"])
        assert "needs a Hugging Face token" in capsys.readouterr().err
        _common(["--push_to_hub", "--hub_token", "hf_test"])  # the stand-in accepts any token


def test_a_label_column_on_the_built_in_digits_is_refused(capsys):
    with pytest.raises(SystemExit):
        _common([], label_column="digit")
    assert "the built-in digits' labels are their 'label' column" in capsys.readouterr().err


def test_the_pretrain_folder_of_output_dir_dot_is_named_after_the_real_folder(tmp_path, monkeypatch):
    from tests.test_scripts import _script

    monkeypatch.chdir(tmp_path)
    args = argparse.Namespace(output_dir=".", max_train_steps=2, finetune_steps=2)
    stages = _script("train_maskdm").stages_of(args)
    assert stages[0][1] == tmp_path.parent / f"{tmp_path.name}-pretrain" and stages[1][1] == Path(".")


# -------------------------------------------------------------------------------- the reproductions

TINY = ["--model_config", json.dumps({"patch_size": 2, "num_layers": 2, "num_attention_heads": 2,
        "attention_head_dim": 16, "decoder_num_layers": 1, "decoder_num_attention_heads": 2,
        "decoder_attention_head_dim": 16})]  # fmt: skip
T = [*TINY, "--resolution", "8", "--train_batch_size", "16", "--num_inference_steps", "2"]
T += ["--num_validation_images_per_class", "1", "--validation_classes", "3", "--num_eval_samples_per_class", "0"]
T += ["--validation_steps", "0", "--report_to", "none", "--cpu_threads", "1", "--unmask_tuning_steps", "0"]
TDM = [
    "--model_config",
    json.dumps({"patch_size": 2, "num_layers": 3, "num_attention_heads": 2, "attention_head_dim": 16}),
]
TDM += ["--resolution", "8", "--train_batch_size", "16", "--num_inference_steps", "2", "--num_eval_samples_per_class"]
TDM += ["0", "--validation_steps", "0", "--report_to", "none", "--cpu_threads", "1", "--max_train_steps", "2"]
MASKDIT, MASKDM = REPO / "examples" / "train_maskdit.py", REPO / "examples" / "train_maskdm.py"


@pytest.mark.slow
def test_a_run_into_a_folder_of_user_files_is_refused_and_touches_none_of_them(tmp_path):
    files = {}
    for name, content in (("README.md", b"notes"), ("transformer/notes.txt", b"keep"), ("scheduler/mine.py", b"x")):
        (tmp_path / "d" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "d" / name).write_bytes(content)
        files[tmp_path / "d" / name] = content
    result = launch(MASKDIT, *T, "--max_train_steps", "2", "--output_dir", str(tmp_path / "d"), check=False)
    assert result.returncode != 0 and "--overwrite_output_dir" in result.stderr
    assert _unchanged(files) and not list((tmp_path / "d").glob("checkpoint-*"))
    # With the flag the run writes beside them: the same-named README is its card, the others stay as they were.
    launch(MASKDIT, *T, "--max_train_steps", "2", "--output_dir", str(tmp_path / "d"), "--overwrite_output_dir")
    assert (tmp_path / "d" / "transformer" / "notes.txt").read_bytes() == b"keep"
    assert (tmp_path / "d" / "scheduler" / "mine.py").read_bytes() == b"x"
    assert b"MaskDiTPipeline" in (tmp_path / "d" / "README.md").read_bytes()


@pytest.mark.slow
def test_a_two_stage_maskdm_run_into_the_current_folder_of_user_files_is_refused(tmp_path):
    cwd = tmp_path / "work"
    (cwd / "transformer").mkdir(parents=True)
    (cwd / "README.md").write_text("notes")
    (cwd / "transformer" / "mine.txt").write_text("keep")
    import subprocess

    from tests.launch import env, launch_cmd

    result = subprocess.run(
        launch_cmd(MASKDM, *TDM, "--finetune_steps", "2", "--output_dir", "."),
        env=env(ACCELERATE_USE_CPU="true"),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode != 0 and "holds files this run did not write" in result.stderr
    assert (cwd / "README.md").read_text() == "notes" and (cwd / "transformer" / "mine.txt").read_text() == "keep"
    assert not (tmp_path / "-pretrain").exists() and not any((tmp_path / "work-pretrain").glob("checkpoint-*"))


@pytest.fixture(scope="module")
def four_step_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    launch(MASKDIT, *T, "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", str(out))
    return out


def _copy(run, tmp_path):
    import shutil

    shutil.copytree(run, tmp_path / "run")
    return tmp_path / "run"


@pytest.mark.slow
def test_resuming_with_other_ema_flags_is_refused_and_records_nothing(four_step_run, tmp_path):
    out = _copy(four_step_run, tmp_path)
    config = (out / "training_config.json").read_text()
    args = ["--max_train_steps", "6", "--resume_from_checkpoint", "latest", "--ema_decay", "0.5", "--no-ema_warmup"]
    result = launch(MASKDIT, *T, *args, "--output_dir", str(out), check=False)
    assert result.returncode != 0 and "ema_decay: 0.999 in the checkpoint, 0.5 now" in result.stderr
    assert (out / "training_config.json").read_text() == config


@pytest.mark.slow
def test_resuming_past_the_requested_end_is_refused_and_republishes_nothing(four_step_run, tmp_path):
    out = _copy(four_step_run, tmp_path)
    card = (out / "README.md").read_text()
    args = ["--max_train_steps", "2", "--resume_from_checkpoint", "latest", "--output_dir", str(out)]
    result = launch(MASKDIT, *T, *args, check=False)
    assert result.returncode != 0 and "after this run's last step (2)" in result.stderr
    assert (out / "README.md").read_text() == card


@pytest.mark.slow
def test_a_longer_resume_at_a_lower_learning_rate_records_the_change_where_it_took_effect(four_step_run, tmp_path):
    out = _copy(four_step_run, tmp_path)
    args = ["--max_train_steps", "6", "--learning_rate", "5e-4", "--resume_from_checkpoint", "latest"]
    launch(MASKDIT, *T, *args, "--checkpointing_steps", "2", "--output_dir", str(out))
    config = json.loads((out / "training_config.json").read_text())
    assert config["learning_rate"] == 5e-4 and config["max_train_steps"] == 6
    # The unmasking phase's learning rate follows --learning_rate unless given, so it changed too.
    changed = {"learning_rate": [1e-3, 5e-4], "unmask_learning_rate": [1e-3, 5e-4], "max_train_steps": [4, 6]}
    assert config["resumed"] == [{"at_step": 4, "changed": changed}]
    assert '"resumed"' in (out / "README.md").read_text()  # the card shows the run's config
    assert read_training_state(out / "checkpoint-6")["run"]["resumed"] == config["resumed"]
