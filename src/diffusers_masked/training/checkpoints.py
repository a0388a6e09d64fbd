"""Checkpoints: saved into a temporary folder and renamed into place once every rank has written its part, so a run
killed at any moment resumes from its last complete checkpoint; checked before anything in them is loaded (nothing in
a checkpoint can run code); listed by lineage, so one run never resumes or prunes another's.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from ..utils.io import commit_dir
from ..utils.safe_loading import check_dcp_metadata, check_safetensors, check_torch_archive, read_json
from .ema import (
    EMA_STATE_FILE,
    EMA_WEIGHTS_FILE,
    SHARDED_EMA_DIR,
    load_ema,
    load_sharded_ema,
    save_ema,
    save_sharded_ema,
)

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"
_EARLIER_CHECKPOINT = "resume from an earlier checkpoint (--resume_from_checkpoint PATH) or delete this one"


def read_training_state(checkpoint: str | os.PathLike) -> dict:
    """A checkpoint's ``training_state.json``: ``global_step``, ``run_id`` (its run's lineage), ``model_config``
    and ``run`` (the run's flags).

    Raises:
        ValueError: naming the file, if it is missing, not JSON or lacks those keys.
    """
    path = Path(checkpoint) / TRAINING_STATE_FILE
    try:
        state = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: {path.parent} is not a complete checkpoint") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}); {_EARLIER_CHECKPOINT}") from err
    missing = (
        [key for key in ("global_step", "run_id", "model_config") if key not in state]
        if isinstance(state, dict)
        else None
    )
    if missing is None or missing:
        raise ValueError(
            f"{path} is not a training state of this version (it needs global_step, run_id and model_config; "
            f"missing: {missing}); {_EARLIER_CHECKPOINT}"
        )
    step, folder = state["global_step"], path.parent.name
    named = int(folder[len(CHECKPOINT_PREFIX) :]) if folder[len(CHECKPOINT_PREFIX) :].isdigit() else None
    problems = []
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        problems.append(f"global_step must be an int >= 0, got {step!r}")
    elif named is not None and folder.startswith(CHECKPOINT_PREFIX) and step != named:
        problems.append(f"global_step is {step} but the folder is {folder}")
    if not isinstance(state["run_id"], str) or not state["run_id"]:
        problems.append(f"run_id must be a non-empty string, got {state['run_id']!r}")
    if not isinstance(state["model_config"], dict) or not isinstance(state.get("run", {}), dict):
        problems.append("model_config and run must be JSON objects")
    if problems:
        raise ValueError(f"{path} is not a valid training state ({'; '.join(problems)}); {_EARLIER_CHECKPOINT}")
    return state


def list_checkpoints(output_dir: str | os.PathLike, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints, oldest first (partial ones are never named `checkpoint-N`); with `run_id`, only those
    of that run's lineage (a checkpoint whose state cannot be read belongs to none)."""
    found = []
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (path / TRAINING_STATE_FILE).exists():
            if run_id is not None and _run_id_of(path) != run_id:
                continue
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def _run_id_of(checkpoint: Path) -> str | None:
    try:
        return read_training_state(checkpoint)["run_id"]
    except ValueError:
        return None


def new_run_id() -> str:
    return uuid.uuid4().hex


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    global_step: int,
    total_limit: int | None,
    training_state: dict,
    ema=None,
    sharded: bool = False,
) -> Path:
    """Save the full training state atomically: into a temporary folder, then one rename. Every rank calls this.

    Nothing in a checkpoint needs code to load: `accelerator.save_state` writes the model (safetensors, or
    torch.distributed.checkpoint shards under FSDP), the optimizer and every rank's random states (read back with
    ``weights_only=True``); the EMA goes to safetensors + JSON; the learning rate is a function of the step
    (`learning_rate_at`), so no scheduler object is saved. Files and folder are fsynced before the rename, so the
    rename is atomic across a power loss too.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        output_dir (`str` or `os.PathLike`): the run's folder; the checkpoint becomes ``checkpoint-<global_step>``.
        global_step (`int`): optimizer steps done; recorded in ``training_state.json``.
        total_limit (`int`, *optional*): keep only this many newest checkpoints of this run's lineage.
        training_state (`dict`): ``run_id``, ``model_config`` and ``run`` (the flags), recorded beside the step.
        ema (`EMAModel`, *optional*): the moving average of the weights.
        sharded (`bool`, defaults to `False`): `ema`'s shadow parameters are FSDP shards (every rank saves its own).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
    partial = output_dir / f".partial-{CHECKPOINT_PREFIX}{global_step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    with _out_of_space_reported(final, partial):
        accelerator.save_state(str(partial))
        if ema is not None and sharded:
            save_sharded_ema(accelerator, ema, partial)
        elif ema is not None and accelerator.is_main_process:
            save_ema(ema, partial)
    # Every rank writes into the folder (its random states, its shard under FSDP): rename only once all are done.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": global_step, **training_state}
        with _out_of_space_reported(final, partial):
            (partial / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
            commit_dir(partial, final, replace=True)
        if total_limit is not None:
            for old in list_checkpoints(output_dir, run_id=training_state["run_id"])[:-total_limit]:
                shutil.rmtree(old)
        logger.info(f"saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


# What a full disk or an exceeded quota looks like from inside torch's archive writer (it reports neither errno).
_TORCH_WRITE_FAILURES = ("unexpected pos", "PytorchStreamWriter failed", "file write failed")


@contextlib.contextmanager
def _out_of_space_reported(final: Path, partial: Path):
    """Turn a full disk or an exceeded quota while writing `partial` into one clear error; the partial folder goes,
    the earlier checkpoints stay."""
    try:
        yield
    except (OSError, RuntimeError) as err:
        out_of_space = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
        out_of_space |= isinstance(err, RuntimeError) and any(s in str(err) for s in _TORCH_WRITE_FAILURES)
        if not out_of_space:
            raise
        shutil.rmtree(partial, ignore_errors=True)
        raise OSError(
            errno.ENOSPC,
            f"disk full or over quota while saving {final.name} in {final.parent} ({err}); the earlier checkpoints "
            "are intact: free space and resume with --resume_from_checkpoint latest",
        ) from err


def check_checkpoint(checkpoint: str | os.PathLike, ema: bool = False, sharded: bool = False) -> dict:
    """Check, without loading anything that could run code, that a checkpoint is complete and loadable as this
    run would load it; returns its training state (`read_training_state`).

    Refused: a missing file, a damaged safetensors header or zip archive, a ``custom_checkpoint_*.pkl`` (this
    package never writes one; `accelerate` would unpickle it with ``weights_only=False``), a
    torch.distributed.checkpoint index that refers to anything but checkpoint metadata.

    Args:
        checkpoint (`str` or `os.PathLike`): a ``checkpoint-N`` folder.
        ema (`bool`, defaults to `False`): the run has an EMA, so the checkpoint must hold one.
        sharded (`bool`, defaults to `False`): the run is FSDP's: sharded model, optimizer (and EMA) folders.

    Raises:
        ValueError: naming the checkpoint's file and what to do.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        raise ValueError(f"{checkpoint} is not a checkpoint folder")
    state = read_training_state(checkpoint)
    planted = sorted(p.name for p in checkpoint.glob("custom_checkpoint_*.pkl"))
    if planted:
        raise ValueError(
            f"refusing to load {checkpoint}: it holds {planted}, which this package never writes and accelerate "
            "would unpickle with code execution allowed; delete those files if you trust this checkpoint"
        )
    if sharded:
        required = ["pytorch_model_fsdp_0", "optimizer_0"] + ([f"{SHARDED_EMA_DIR}/{EMA_STATE_FILE}"] if ema else [])
    else:
        required = ["model.safetensors", "optimizer.bin"] + ([EMA_WEIGHTS_FILE, EMA_STATE_FILE] if ema else [])
    for name in required:
        if not (checkpoint / name).exists():
            kind = "a sharded (FSDP) run's" if sharded else "a single-process or data-parallel run's"
            raise ValueError(
                f"{checkpoint / name} is missing: {checkpoint} is not a complete checkpoint of {kind} training"
                f"{' with EMA' if ema else ''}; {_EARLIER_CHECKPOINT}"
            )
    for path in sorted(checkpoint.rglob("*")):
        if path.name == ".metadata":
            check_dcp_metadata(path, _EARLIER_CHECKPOINT)
        elif path.suffix == ".safetensors":
            check_safetensors(path, _EARLIER_CHECKPOINT)
        elif path.suffix in (".bin", ".pkl", ".pt"):
            check_torch_archive(path, _EARLIER_CHECKPOINT)
        elif path.suffix == ".json":
            read_json(path, _EARLIER_CHECKPOINT)
    return state


def resolve_resume(resume_from_checkpoint: str | None, output_dir: str | os.PathLike) -> Path | None:
    """The checkpoint to resume from: `None` for a fresh run, ``"latest"`` for the newest complete one in
    `output_dir` (`None` if there is none), else the given folder, which must be a complete checkpoint."""
    if not resume_from_checkpoint:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not (path / TRAINING_STATE_FILE).exists():
        raise ValueError(f"--resume_from_checkpoint {path} is not a complete checkpoint (no {TRAINING_STATE_FILE})")
    return path


# What a resumed run may change, each taking effect from the resumed step and recorded there in the run's config
# (``resumed``): the run's length, its learning rates and clipping, precision and execution, and everything about
# saving, logging, sampling and publishing. Anything else that differs from the checkpoint's recorded flags is refused.
RESUMABLE_FLAGS = frozenset(
    {
        "max_train_steps",
        "unmask_tuning_steps",
        "finetune_steps",
        "learning_rate",
        "unmask_learning_rate",
        "finetune_learning_rate",
        "max_grad_norm",
        "mixed_precision",
        "allow_tf32",
        "adam_fused",
        "gradient_checkpointing",
        "torch_compile",
        "attention_backend",
        "cpu_threads",
        "dataloader_num_workers",
        "checkpointing_steps",
        "checkpoints_total_limit",
        "validation_steps",
        "report_to",
        "logging_dir",
        "resume_from_checkpoint",
        "output_dir",
        "overwrite_output_dir",
        "pretrained_model_name_or_path",
        "push_to_hub",
        "hub_model_id",
        "recipe",
        "num_eval_samples_per_class",
        "num_validation_images_per_class",
        "validation_classes",
        "num_validation_images",
        "guidance_scale",
        "num_inference_steps",
        "cache_dir",
        "skip_image_verification",
        "latent_batch_size",
    }
)
# Recorded for the record, compared elsewhere (the model config, with its own check) or bookkeeping: where the run
# was asked to resume from and write to says nothing about what it trained.
_NOT_COMPARED = frozenset(
    {"model_config", "model_config_resolved", "resumed", "builtin_digits", "hub_token", "resume_from_checkpoint"}
    | {"output_dir", "overwrite_output_dir"}
)


def _plain(value):
    return json.loads(json.dumps(value, default=str))


def compare_run_configs(recorded: dict, current: dict) -> tuple[dict, dict]:
    """How the flags of a resumed run differ from those its checkpoint recorded: ``(changes, refused)``, each a dict
    of flag -> ``[recorded, now]``. `changes` are `RESUMABLE_FLAGS`; `refused` is everything else. A flag that is
    `None` now (to be filled from the data, e.g. ``num_classes``) is not compared."""
    changes, refused = {}, {}
    for key in sorted(set(recorded) | set(current)):
        if key in _NOT_COMPARED or current.get(key, 0) is None:
            continue
        old, new = _plain(recorded.get(key)), _plain(current.get(key))
        if old != new:
            (changes if key in RESUMABLE_FLAGS else refused)[key] = [old, new]
    return changes, refused


def check_resume(state: dict, current: dict, end: int | None = None) -> tuple[dict, str | None]:
    """Whether a run with the flags `current` (as `run_config` records them) may resume the checkpoint whose
    training state is `state`, ending at step `end`: ``(changes, error)``; `changes` as `compare_run_configs`'s."""
    step = state["global_step"]
    if end is not None and step > end:
        return {}, (
            f"the checkpoint is at step {step}, after this run's last step ({end}): resuming would publish "
            f"{step} steps' weights as a {end}-step run; ask for {step} or more steps, or start a new run in another "
            "--output_dir"
        )
    changes, refused = compare_run_configs(state.get("run") or {}, current)
    if refused:
        details = ", ".join(f"{key}: {old!r} in the checkpoint, {new!r} now" for key, (old, new) in refused.items())
        return changes, (
            f"the checkpoint's run was trained with other settings ({details}); a resumed run may change only its "
            "length, learning rates, clipping, precision and its saving, logging and sampling flags: resume with the "
            "checkpoint's settings, or start a new run in another --output_dir"
        )
    return changes, None


def check_model_config(recorded: dict, model_config) -> None:
    """Refuse to resume a checkpoint into a model of another configuration (same shapes can hide it: 2 heads of
    16 and 4 of 8 load the same weights), naming the keys that differ."""
    current = json.loads(
        json.dumps({k: v for k, v in dict(model_config).items() if not k.startswith("_")}, default=str)
    )
    recorded = {k: v for k, v in recorded.items() if not k.startswith("_")}
    differing = sorted(key for key in set(current) | set(recorded) if current.get(key) != recorded.get(key))
    if differing:
        details = ", ".join(
            f"{key}: {recorded.get(key)!r} in the checkpoint, {current.get(key)!r} now" for key in differing
        )
        raise ValueError(f"the checkpoint was trained with another model config ({details}); resume with its config")


def restore_checkpoint(accelerator, checkpoint: str | os.PathLike, ema=None, sharded: bool = False) -> dict:
    """Restore what `save_checkpoint` saved, after `check_checkpoint`; every rank calls this. Returns the
    checkpoint's training state (its ``global_step``, ``run_id``, ...).

    Raises:
        ValueError: naming the checkpoint and the file that failed to load.
    """
    checkpoint = Path(checkpoint)
    state = check_checkpoint(checkpoint, ema=ema is not None, sharded=sharded)
    try:
        accelerator.load_state(str(checkpoint))
    except Exception as err:
        raise ValueError(
            f"could not load the model or optimizer state of {checkpoint} ({type(err).__name__}: {err}); "
            f"{_EARLIER_CHECKPOINT}"
        ) from err
    if ema is not None:
        configured = {"--ema_decay": ema.decay, "--ema_warmup": ema.use_ema_warmup}
        try:
            load_sharded_ema(ema, checkpoint) if sharded else load_ema(ema, checkpoint)
        except Exception as err:
            raise ValueError(f"could not load the EMA of {checkpoint} ({err}); {_EARLIER_CHECKPOINT}") from err
        # The EMA's settings come back from the checkpoint; a run configured otherwise would record one decay and
        # apply another.
        loaded = {"--ema_decay": ema.decay, "--ema_warmup": ema.use_ema_warmup}
        if loaded != configured:
            details = ", ".join(
                f"{flag}: {loaded[flag]!r} in the checkpoint, {configured[flag]!r} now"
                for flag in loaded
                if loaded[flag] != configured[flag]
            )
            raise ValueError(
                f"the EMA of {checkpoint} was kept with other settings ({details}); they cannot change within a run: "
                "resume with the checkpoint's, or start a new run in another --output_dir"
            )
    return state
