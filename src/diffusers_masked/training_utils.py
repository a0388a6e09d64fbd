"""What every training script of this package shares: the pieces that make a run resumable to the bit.

- Phases (`Phase`, `build_phases`, `learning_rate_factor`): masked training, then a stretch at another mask ratio
  (MaskDiT's unmasking tuning, MaskDM's fine-tuning), each with its own batch size and learning rate.
- Deterministic batches and randomness (`StepBatchSampler`, `step_generator`): the data order, masks, noise and
  label dropout of a step are functions of ``(seed, step, process)``, not of a running random state.
- Checkpoints (`save_checkpoint`, `list_checkpoints`, `resolve_resume`, `load_checkpoint`): written into a
  temporary folder and renamed into place once every rank has written its part, so a run killed at any moment
  resumes from its last complete checkpoint and ends with the weights of an uninterrupted run.
- EMA (`save_sharded_ema`, `load_sharded_ema`, `ema_weights`, `export_ema_model`): diffusers' `EMAModel`, also
  when its shadow parameters are FSDP2 shards.
- Data (`load_training_data`), sample grids (`sample_grid`, `image_grid`), and process
  set-up (`configure_cpu_threads`, `check_distributed_launch`, `check_ranks_agree`).
- Command lines (`int_at_least`, `finite_float`, `apply_run_defaults`, `resolve_schedule_and_model_config`).
- A run from start to end (`setup_accelerator`, `start_run`, `load_start_model`, `configure_model`,
  `prepare_training`, `record_run`, `train_phases` with `masked_loss_fn` and `periodic_saves`, `finish_run`): what a
  training script's `main()` calls in order.
"""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import math
import os
import pickle
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import (
    build_transforms,
    collate_fn,
    extract_latents,
    latent_collate_fn,
    load_digits_dataset,
    load_image_dataset,
    make_preprocess,
    verify_images,
)
from .masking import ConstantMaskSchedule, CosinePowerMaskSchedule, parse_mask_schedule

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"
SHARDED_EMA_DIR = "ema_fsdp"
EMA_WEIGHTS_FILE = "ema.safetensors"
EMA_STATE_FILE = "ema_state.json"
UNMASK_SCHEDULES = ("zero", "cosine")


# ---------------------------------------------------------------------------------------------------------
# Phases and the learning rate
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Phase:
    """A stretch of training with its own batch size, learning rate and mask-ratio schedule.

    Args:
        name (`str`): ``"masked"`` or ``"unmask"``; logged, and part of the phase's data-order seed.
        start (`int`): first global step of the phase.
        end (`int`): one past its last global step.
        batch_size (`int`): per-process batch size.
        learning_rate (`float`): peak learning rate.
        mask_schedule (`Callable[[int], float]`): mask ratio by step *within* the phase.
        warmup_steps (`int`, defaults to 0): linear warm-up from the phase's first step.
    """

    name: str
    start: int
    end: int
    batch_size: int
    learning_rate: float
    mask_schedule: Callable[[int], float]
    warmup_steps: int = 0

    def ratio(self, global_step: int) -> float:
        return self.mask_schedule(global_step - self.start)

    def learning_rate_at(self, global_step: int) -> float:
        if not self.warmup_steps:
            return self.learning_rate
        return self.learning_rate * min(1.0, (global_step - self.start + 1) / self.warmup_steps)


def build_phases(
    masked_steps: int,
    unmask_steps: int,
    *,
    batch_size: int,
    learning_rate: float,
    mask_schedule: Callable[[int], float],
    warmup_steps: int = 0,
    unmask_batch_size: int | None = None,
    unmask_learning_rate: float | None = None,
    unmask_schedule: str = "zero",
) -> list[Phase]:
    """The masked phase, then the unmasking phase; a phase of 0 steps is left out.

    Args:
        masked_steps (`int`): optimizer steps of masked training.
        unmask_steps (`int`): optimizer steps of the unmasking phase that follows.
        batch_size (`int`): per-process batch size of the masked phase.
        learning_rate (`float`): learning rate of the masked phase.
        mask_schedule (`Callable[[int], float]`): the masked phase's mask ratio by step.
        warmup_steps (`int`, defaults to 0): linear learning-rate warm-up of the masked phase.
        unmask_batch_size (`int`, *optional*): defaults to `batch_size`.
        unmask_learning_rate (`float`, *optional*): defaults to `learning_rate`.
        unmask_schedule (`str`, defaults to ``"zero"``): ``"zero"`` trains at mask ratio 0; ``"cosine"`` decays
            the masked phase's last ratio ``r0`` as ``r0 cos(pi/2 i/n)^4`` (MaskDiT's cosine-ratio schedule).
    """
    if unmask_schedule not in UNMASK_SCHEDULES:
        raise ValueError(f"unmask_schedule must be one of {UNMASK_SCHEDULES}, got {unmask_schedule!r}")
    unmask_batch_size = batch_size if unmask_batch_size is None else unmask_batch_size
    unmask_learning_rate = learning_rate if unmask_learning_rate is None else unmask_learning_rate
    phases = []
    if masked_steps:
        phases.append(Phase("masked", 0, masked_steps, batch_size, learning_rate, mask_schedule, warmup_steps))
    if unmask_steps:
        if unmask_schedule == "zero":
            schedule = ConstantMaskSchedule(0.0)
        else:
            last_ratio = mask_schedule(max(masked_steps - 1, 0))
            schedule = CosinePowerMaskSchedule(num_steps=unmask_steps, initial_ratio=last_ratio, power=4)
        phases.append(
            Phase(
                "unmask", masked_steps, masked_steps + unmask_steps, unmask_batch_size, unmask_learning_rate, schedule
            )
        )
    return phases


def learning_rate_at(phases: Sequence[Phase], step: int) -> float:
    """The learning rate of optimizer step `step` (0-based): its phase's, warmed up; past the end, the last one's.

    A function of the step alone, set before every step: no scheduler state to checkpoint, and a run resumed with
    other phases (say, more steps) follows its own schedule rather than the one the checkpoint's run had.
    """
    for phase in phases:
        if step < phase.end:
            return phase.learning_rate_at(step)
    return phases[-1].learning_rate


def set_learning_rate(optimizer: torch.optim.Optimizer, learning_rate: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = learning_rate


# ---------------------------------------------------------------------------------------------------------
# Deterministic batches and randomness
# ---------------------------------------------------------------------------------------------------------


class StepBatchSampler:
    """Yields this process's index batches from a given micro-batch onwards.

    Epoch `e` visits the examples in the order of a permutation seeded by (seed, e); micro-batch `b` of the run is
    slice `b mod batches_per_epoch` of epoch `b div batches_per_epoch`, split between processes. The batches are a
    function of `b` alone, which is what makes resuming exact.

    Args:
        num_examples (`int`): size of the dataset.
        batch_size (`int`): per-process batch size.
        num_processes (`int`): processes sharing each global batch.
        process_index (`int`): this process's slice of it.
        seed (`int`): seed of the epochs' permutations.
        start_batch (`int`, defaults to 0): the first micro-batch to yield.
    """

    def __init__(self, num_examples, batch_size, num_processes, process_index, seed, start_batch=0):
        self.num_examples = num_examples
        self.batch_size = batch_size
        self.num_processes = num_processes
        self.process_index = process_index
        self.seed = seed
        self.start_batch = start_batch
        self.global_batch = batch_size * num_processes
        self.batches_per_epoch = num_examples // self.global_batch
        if self.batches_per_epoch < 1:
            raise ValueError(
                f"the dataset has {num_examples} examples, fewer than one global batch "
                f"({batch_size} per process x {num_processes} processes); lower the batch size"
            )

    def _permutation(self, epoch):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.num_examples, generator=generator)

    def __iter__(self) -> Iterator[list[int]]:
        batch, epoch, order = self.start_batch, None, None
        while True:
            this_epoch, index = divmod(batch, self.batches_per_epoch)
            if this_epoch != epoch:
                epoch, order = this_epoch, self._permutation(this_epoch)
            begin = index * self.global_batch + self.process_index * self.batch_size
            yield order[begin : begin + self.batch_size].tolist()
            batch += 1


def step_generator(seed: int, step: int, process_index: int, device) -> torch.Generator:
    """The random source of one optimizer step on one process (masks, noise, label dropout)."""
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) * 1_009 + process_index)
    return generator


# ---------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------


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
    if missing is None or missing or not isinstance(state["global_step"], int) or state["global_step"] < 0:
        raise ValueError(
            f"{path} is not a training state of this version (it needs global_step, run_id and model_config; "
            f"missing: {missing}); {_EARLIER_CHECKPOINT}"
        )
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
    accelerator.save_state(str(partial))
    if ema is not None and sharded:
        save_sharded_ema(accelerator, ema, partial)
    elif ema is not None and accelerator.is_main_process:
        save_ema(ema, partial)
    # Every rank writes into the folder (its random states, its shard under FSDP): rename only once all are done.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": global_step, **training_state}
        (partial / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
        fsync_tree(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(output_dir)
        if total_limit is not None:
            for old in list_checkpoints(output_dir, run_id=training_state["run_id"])[:-total_limit]:
                shutil.rmtree(old)
        logger.info(f"saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def fsync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then every folder bottom-up, so a rename after it publishes durable data."""
    folder = Path(folder)
    for root, _, files in os.walk(folder, topdown=False):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def _fsync_dir(path) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


_EMA_STATE_KEYS = (
    "decay",
    "min_decay",
    "optimization_step",
    "update_after_step",
    "use_ema_warmup",
    "inv_gamma",
    "power",
)


def save_ema(ema, folder: str | os.PathLike) -> None:
    """`EMAModel`'s state without pickles: shadow parameters in ``ema.safetensors``, the rest in ``ema_state.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = ema.state_dict()
    shadows = {f"shadow_{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(state.pop("shadow_params"))}
    save_file(shadows, str(folder / EMA_WEIGHTS_FILE))
    (folder / EMA_STATE_FILE).write_text(json.dumps({key: state[key] for key in _EMA_STATE_KEYS}))


def load_ema(ema, folder: str | os.PathLike) -> None:
    """Load `save_ema`'s files into `ema`, checking that they hold one tensor of the right shape per parameter."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(folder / EMA_WEIGHTS_FILE))
    expected = {f"shadow_{i}": tuple(t.shape) for i, t in enumerate(ema.shadow_params)}
    found = {key: tuple(t.shape) for key, t in weights.items()}
    if found != expected:
        raise ValueError(f"{folder / EMA_WEIGHTS_FILE} does not fit the model: {_diff(expected, found)}")
    with torch.no_grad():
        for i, shadow in enumerate(ema.shadow_params):
            shadow.copy_(weights[f"shadow_{i}"])
    _set_ema_state(ema, folder / EMA_STATE_FILE)


def _set_ema_state(ema, path: Path) -> None:
    state = json.loads(path.read_text())
    missing = [key for key in _EMA_STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    for key in _EMA_STATE_KEYS:
        setattr(ema, key, state[key])


def _diff(expected: dict, found: dict) -> str:
    parts = []
    if missing := sorted(set(expected) - set(found)):
        parts.append(f"missing {missing[:5]}")
    if unexpected := sorted(set(found) - set(expected)):
        parts.append(f"unexpected {unexpected[:5]}")
    if changed := [key for key in expected if key in found and expected[key] != found[key]]:
        parts.append(
            "different " + ", ".join(f"{key}: {found[key]} instead of {expected[key]}" for key in changed[:5])
        )
    return "; ".join(parts)


def save_sharded_ema(accelerator, ema, folder: str | os.PathLike) -> None:
    """An EMA whose shadow parameters are FSDP shards: every rank writes its own with torch.distributed.checkpoint
    (accelerate's custom-object checkpointing writes from the main process only)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    state = ema.state_dict()
    shadows = {f"shadow_{i}": tensor for i, tensor in enumerate(state.pop("shadow_params"))}
    dcp.save(shadows, checkpoint_id=str(folder / SHARDED_EMA_DIR))
    if accelerator.is_main_process:
        (folder / SHARDED_EMA_DIR / EMA_STATE_FILE).write_text(
            json.dumps({key: state[key] for key in _EMA_STATE_KEYS})
        )


def load_sharded_ema(ema, folder: str | os.PathLike) -> None:
    """Load `save_sharded_ema`'s files into `ema`, whose shadow parameters are sharded like the saved ones."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    if not (folder / SHARDED_EMA_DIR).is_dir():
        raise ValueError(f"{folder} has no sharded EMA ({SHARDED_EMA_DIR}/): it was not saved by an FSDP run with EMA")
    check_dcp_metadata(folder / SHARDED_EMA_DIR / ".metadata")
    shadows = {f"shadow_{i}": tensor for i, tensor in enumerate(ema.shadow_params)}
    dcp.load(shadows, checkpoint_id=str(folder / SHARDED_EMA_DIR))
    _set_ema_state(ema, folder / SHARDED_EMA_DIR / EMA_STATE_FILE)


# torch.distributed.checkpoint stores its index (`.metadata`) as a plain pickle and reads it with `pickle.load`:
# a planted one would run code. These are the only globals its metadata refers to; `check_dcp_metadata` reads the
# file with an unpickler that resolves nothing else before torch reads it.
_DCP_METADATA_GLOBALS = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "PureWindowsPath"),
    ("collections", "OrderedDict"),
} | {
    ("torch.distributed.checkpoint.metadata", name)
    for name in (
        "Metadata",
        "MetadataIndex",
        "StorageMeta",
        "TensorProperties",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "ChunkStorageMetadata",
        "_MEM_FORMAT_ENCODING",
    )
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _DCP_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"it refers to {module}.{name}, which a checkpoint index never holds")


def check_dcp_metadata(path: str | os.PathLike) -> None:
    """Refuse a torch.distributed.checkpoint index (``.metadata``) that would run code when torch unpickles it.

    Raises:
        ValueError: naming the file, if it is missing, damaged, or refers to anything but checkpoint metadata.
    """
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            _MetadataUnpickler(handle).load()
    except FileNotFoundError:
        raise ValueError(f"{path} is missing: {path.parent} is not a complete sharded checkpoint") from None
    except Exception as err:  # a damaged pickle can fail in many ways; none of them may reach torch's pickle.load
        raise ValueError(f"refusing to load {path}: {err}; {_EARLIER_CHECKPOINT}") from err


_EARLIER_CHECKPOINT = "resume from an earlier checkpoint (--resume_from_checkpoint PATH) or delete this one"


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
            check_dcp_metadata(path)
        elif path.suffix == ".safetensors":
            _check_safetensors(path)
        elif path.suffix in (".bin", ".pkl", ".pt"):
            _check_torch_archive(path)
        elif path.suffix == ".json":
            _check_json(path)
    return state


def _check_safetensors(path: Path) -> None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt"):
            pass
    except Exception as err:
        raise ValueError(f"{path} is damaged ({err}); {_EARLIER_CHECKPOINT}") from err


def _check_torch_archive(path: Path) -> None:
    # Read as accelerate will (weights_only=True, its allowlist for numpy's random state), but memory-mapped: the
    # pickle is parsed, the tensor data not read. A truncated archive has no zip directory (it sits at the end).
    from accelerate.utils import load

    try:
        load(path, map_location="cpu", mmap=True)
    except Exception as err:
        raise ValueError(f"refusing to load {path} ({type(err).__name__}: {err}); {_EARLIER_CHECKPOINT}") from err


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is damaged ({err}); {_EARLIER_CHECKPOINT}") from err


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


def load_checkpoint(accelerator, checkpoint: str | os.PathLike, ema=None, sharded: bool = False) -> dict:
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
        try:
            load_sharded_ema(ema, checkpoint) if sharded else load_ema(ema, checkpoint)
        except Exception as err:
            raise ValueError(f"could not load the EMA of {checkpoint} ({err}); {_EARLIER_CHECKPOINT}") from err
    return state


# ---------------------------------------------------------------------------------------------------------
# EMA for validation and export
# ---------------------------------------------------------------------------------------------------------


@contextmanager
def ema_weights(ema, model: torch.nn.Module, sharded: bool = False):
    """Within the block, `model` holds the EMA weights and is in eval mode; afterwards its own weights and train
    mode are back. With ``ema=None`` the model's own weights are used.

    Args:
        ema (`EMAModel`, *optional*): the moving average of `model`'s parameters.
        model (`torch.nn.Module`): the (unwrapped) model being trained.
        sharded (`bool`, defaults to `False`): the parameters are FSDP shards. `EMAModel.store` would move them to
            the CPU and back; a copy on the rank's device costs 1/N of the model.
    """
    parameters = list(model.parameters())
    stored = None
    if ema is not None:
        if sharded:
            stored = [p.detach().clone() for p in parameters]
        else:
            ema.store(parameters)
        ema.copy_to(parameters)
    model.eval()
    try:
        yield model
    finally:
        if stored is not None:
            with torch.no_grad():
                for parameter, saved in zip(parameters, stored):
                    parameter.copy_(saved)
        elif ema is not None:
            ema.restore(parameters)
        model.train()


def export_ema_model(accelerator, model, ema, model_cls, sharded_ema=None, return_online=False):
    """The final model with the EMA weights (or the raw ones without EMA), in eval mode, on the main process;
    `None` on the others. Every rank calls this: under FSDP it gathers the shards (collectives).

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        model (`torch.nn.Module`): the prepared model.
        ema (`EMAModel`, *optional*): its moving average.
        model_cls (`type`): the model's class; the export is ``model_cls.from_config(config)``.
        sharded_ema (`EMAModel`, *optional*): `ema` when its shadow parameters are FSDP shards.
        return_online (`bool`, defaults to `False`): return ``(ema_model, online_model)``, the second with the
            trained weights themselves (what a following fine-tuning starts from); ``(None, None)`` off the main
            process.
    """
    state_dict = accelerator.get_state_dict(model)
    if sharded_ema is not None:
        sharded_ema.shadow_params = [shadow.full_tensor() for shadow in sharded_ema.shadow_params]
    if not accelerator.is_main_process:
        return (None, None) if return_online else None
    final_model = model_cls.from_config(accelerator.unwrap_model(model).config)
    final_model.load_state_dict(state_dict)
    online = None
    if return_online:
        online = model_cls.from_config(final_model.config)
        online.load_state_dict(state_dict)
        online.eval()
    if ema is not None:
        ema.copy_to(final_model.parameters())
    return (final_model.eval(), online) if return_online else final_model.eval()


def check_ranks_agree(accelerator, model) -> None:
    """Data-parallel ranks must end with identical weights; compare a checksum of every parameter."""
    if accelerator.num_processes == 1:
        return
    params = [p.detach().double().flatten() for p in accelerator.unwrap_model(model).parameters()]
    flat = torch.cat(params)
    positions = torch.arange(1, flat.numel() + 1, dtype=flat.dtype, device=flat.device)
    checksum = torch.stack([flat.sum(), (flat * positions).sum()])
    gathered = accelerator.gather(checksum[None])
    if not torch.equal(gathered, gathered[:1].expand_as(gathered)):
        raise RuntimeError(f"data-parallel ranks hold different weights: checksums {gathered.tolist()}")
    logger.info(f"all {accelerator.num_processes} ranks hold identical weights (checksum {checksum.tolist()})")


# ---------------------------------------------------------------------------------------------------------
# Sample grids
# ---------------------------------------------------------------------------------------------------------


def sample_grid(pipeline, num_classes: int, per_class: int, seed: int, **pipeline_kwargs):
    """One row per class (``0 .. num_classes - 1``), `per_class` samples each, from a fixed seed.

    An unconditional pipeline (``pipeline.num_classes == 0``) fills the same grid with ``batch_size`` samples.

    Args:
        pipeline: a class-conditional pipeline taking ``class_labels``, or an unconditional one.
        num_classes (`int`): rows of the grid.
        per_class (`int`): columns.
        seed (`int`): seed of the generator on the pipeline's device.
        pipeline_kwargs: passed on, e.g. ``guidance_scale``, ``num_inference_steps``.
    """
    if getattr(pipeline, "num_classes", None) == 0:
        inputs = {"batch_size": num_classes * per_class}
    else:
        inputs = {"class_labels": [c for c in range(num_classes) for _ in range(per_class)]}
    images = pipeline(
        **inputs,
        generator=torch.Generator(device=pipeline.device).manual_seed(seed),
        output_type="pil",
        **pipeline_kwargs,
    ).images
    return image_grid(images, rows=num_classes, cols=per_class)


def image_grid(images, rows: int, cols: int):
    """`make_image_grid` with a 1-pixel grey border around each image (small digits otherwise run together)."""
    from diffusers.utils import make_image_grid
    from PIL import ImageOps

    def border(image):
        bands = len(image.getbands())
        return ImageOps.expand(image, border=1, fill=(128,) * bands if bands > 1 else 128)

    return make_image_grid([border(image) for image in images], rows=rows, cols=cols)


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """What `load_training_data` returns.

    Args:
        dataset (`datasets.Dataset`): rows of pixels (through a transform) or of cached latent posteriors.
        id2label (`dict`, *optional*): class names, `None` for unlabelled data.
        collate_fn (`Callable`): batches the rows for a `DataLoader`.
        in_channels (`int`): channels the model sees (pixels, or the VAE's latent channels).
        sample_size (`int`): side the model sees (`resolution`, or divided by the VAE's downsampling).
        num_classes (`int`): classes of the model: the one asked for, else the data's.
        vae (`AutoencoderKL`, *optional*): the VAE of latent-space training.
    """

    dataset: Any
    id2label: dict | None
    collate_fn: Callable
    in_channels: int
    sample_size: int
    num_classes: int
    vae: Any = None


def check_labels(dataset, id2label: dict | None, num_classes: int | None) -> int:
    """The class count to train with: `num_classes`, or the data's (its label names, else its largest label + 1).

    The label ``num_classes`` is the null class of classifier-free guidance, so a real label there (or above) would
    be trained as "no class": refused.

    ``num_classes=0`` asks for an unconditional model: any labels are ignored.

    Raises:
        ValueError: if the data has no labels, a label is negative, or one is >= `num_classes`.
    """
    if num_classes == 0:
        return 0
    if "label" not in dataset.column_names:
        raise ValueError(
            "the data has no labels: pass --label_column naming its class-label column, or --num_classes 0 to train "
            "an unconditional model"
        )
    labels = dataset.select_columns(["label"])["label"]
    if len(labels) == 0:
        raise ValueError("the training data is empty")
    low, high = min(labels), max(labels)
    if low < 0:
        raise ValueError(f"the data has a negative label ({low}); labels must be 0 .. num_classes - 1")
    found = max(high + 1, len(id2label) if id2label else 0)
    if num_classes is None:
        return found
    if high >= num_classes:
        raise ValueError(
            f"num_classes is {num_classes} but the data has labels up to {high} ({found} classes); the label "
            "num_classes is the null class of classifier-free guidance, so every label must be below it: pass "
            f"--num_classes {found} or more"
        )
    return num_classes


def load_training_data(
    accelerator,
    resolution: int,
    *,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    cache_dir: str | os.PathLike | None = None,
    max_train_samples: int | None = None,
    verify: bool = True,
    random_crop: bool = False,
    random_flip: bool = False,
    vae: str | None = None,
    vae_subfolder: str | None = None,
    latent_cache_dir: str | os.PathLike | None = None,
    latent_batch_size: int = 32,
    num_classes: int | None = None,
    num_workers: int = 0,
) -> TrainingData:
    """The training set of a run: a Hub dataset or image folder, or with neither the built-in digits.

    The built-in digits are their 80% train split (so the held-out 20% gives an honest FID floor), one channel.
    Other data is RGB, every image decoded once first (`verify`) so that a corrupt file stops the run now, by name,
    not hours in when its batch comes up. With `vae`, every image's posterior is extracted once into a cache that
    later runs reuse (`extract_latents`, each process encoding its share); with `random_flip` the flipped images'
    posteriors too, one of the two drawn per sample and step; random crops are refused there, as latents are
    extracted once.

    Args:
        accelerator (`accelerate.Accelerator`): the main process verifies and extracts first, the others reuse.
        resolution (`int`): image side after resize and crop.
        dataset_name, dataset_config_name, train_data_dir, image_column, label_column, cache_dir: as in
            `load_image_dataset`.
        max_train_samples (`int`, *optional*): keep only the first this many examples.
        verify (`bool`, defaults to `True`): decode every image once before training.
        random_crop (`bool`, defaults to `False`): random instead of centre crops.
        random_flip (`bool`, defaults to `False`): random horizontal flips.
        vae (`str`, *optional*): `AutoencoderKL` path or Hub id; enables latent space.
        vae_subfolder (`str`, *optional*): e.g. ``"vae"`` inside a pipeline repo.
        latent_cache_dir (`str` or `os.PathLike`, *optional*): where the latents are cached; required with `vae`.
        latent_batch_size (`int`, defaults to 32): batch size of the extraction.
        num_classes (`int`, *optional*): the model's classes; checked against the labels before any image is
            decoded (`check_labels`). Defaults to the data's; 0 trains unconditionally: no labels are read
            (`label_column` is ignored, the digits' are dropped).
        num_workers (`int`, defaults to 0): `DataLoader` workers of the latent extraction.
    """
    builtin_digits = dataset_name is None and train_data_dir is None
    if builtin_digits:
        if vae:
            raise ValueError("a VAE needs image data (a dataset or an image folder); the built-in digits are pixels")
        dataset, id2label = load_digits_dataset(resolution=resolution, split="train", seed=0, holdout_fraction=0.2)
        num_channels = 1
        if num_classes == 0:
            dataset, id2label = dataset.remove_columns("label"), None
    else:
        dataset, id2label = load_image_dataset(
            dataset_name=dataset_name,
            dataset_config_name=dataset_config_name,
            train_data_dir=train_data_dir,
            image_column=image_column,
            label_column=label_column if num_classes != 0 else None,
            cache_dir=cache_dir,
        )
        num_channels = 3
    if max_train_samples is not None:
        dataset = dataset.select(range(min(max_train_samples, len(dataset))))
    num_classes = check_labels(dataset, id2label, num_classes)
    if not builtin_digits and verify:
        with accelerator.main_process_first():
            verify_images(dataset)

    transform = build_transforms(
        resolution, center_crop=not random_crop, random_flip=random_flip, num_channels=num_channels
    )
    if not vae:
        dataset = dataset.with_transform(make_preprocess(transform))
        return TrainingData(dataset, id2label, collate_fn, num_channels, resolution, num_classes)

    from diffusers import AutoencoderKL

    if random_crop:
        raise ValueError(
            "random crops cannot be used with a VAE: latents are extracted once (flips can: --random_flip)"
        )
    if latent_cache_dir is None:
        raise ValueError("latent_cache_dir is required with a VAE")
    autoencoder = AutoencoderKL.from_pretrained(vae, subfolder=vae_subfolder).eval()
    dataset = extract_latents(
        dataset,
        autoencoder,
        build_transforms(resolution, num_channels=num_channels),
        latent_cache_dir,
        batch_size=latent_batch_size,
        device=accelerator.device,
        label_column="label" if num_classes else None,
        xflip=random_flip,
        num_workers=num_workers,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        wait_for_everyone=accelerator.wait_for_everyone,
    )
    downsampling = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    return TrainingData(
        dataset,
        id2label,
        latent_collate_fn,
        autoencoder.config.latent_channels,
        resolution // downsampling,
        num_classes,
        autoencoder,
    )


def resolve_model_config(spec: str, model_cls) -> dict:
    """A model config from a preset name, a JSON string or a path to a ``config.json``; private keys dropped.

    Raises:
        ValueError: saying which of the three `spec` was taken for and what is wrong with it (a missing file, the
            position of a JSON error, an unknown preset, keys `model_cls` does not take).
    """
    text = spec.strip()
    if text.startswith("{"):
        source = "the JSON string"
        try:
            config = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid JSON ({err})") from None
    elif os.path.isfile(text):
        source = text
        try:
            config = json.loads(Path(text).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{text} is not a readable JSON config ({err})") from None
    else:
        try:
            return dict(model_cls.preset_config(text))
        except ValueError as err:
            if text.endswith(".json") or os.sep in text:
                raise ValueError(f"no such config file: {text} (nor is it a preset: {err})") from None
            raise
    if not isinstance(config, dict):
        raise ValueError(
            f"{source} must be a JSON object of {model_cls.__name__} arguments, got {type(config).__name__}"
        )
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    accepted = set(inspect.signature(model_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(
            f"{source} has keys {model_cls.__name__} does not take: {unknown}; it takes {sorted(accepted)}"
        )
    # Build it once on the meta device (no memory, no init work) so that an inconsistent config (heads that do not
    # divide, a negative depth) fails here, before any data is read. The data's size fills in a missing sample_size
    # later; for the probe any size that the patch divides will do.
    probe = dict(config)
    if "sample_size" not in probe:
        patch = probe.get("patch_size", inspect.signature(model_cls.__init__).parameters["patch_size"].default)
        probe["sample_size"] = 8 * patch if isinstance(patch, int) and patch > 0 else 8
    try:
        with torch.device("meta"):
            model_cls(**probe)
    except (ValueError, TypeError, ZeroDivisionError) as err:
        raise ValueError(f"{source} does not make a {model_cls.__name__}: {err}") from None
    return config


# ---------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------


def configure_cpu_threads(requested: int | None = None) -> int:
    """Use this process's share of the machine's cores (or `requested`) for torch's intra-op threads.

    `accelerate launch` exports ``OMP_NUM_THREADS=1`` for CPU runs unless it was configured for CPU, which would
    leave all but one core idle. Returns the thread count set.
    """
    if requested is None:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        requested = max(1, cores // local_processes)
    torch.set_num_threads(requested)
    return requested


def check_distributed_launch(accelerator) -> None:
    """Fail if accelerate set up fewer processes than were launched.

    e.g. an FSDP config on a CPU-only machine: accelerate falls back to no distribution, and every process would
    train alone and overwrite the others' checkpoints.
    """
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched != accelerator.num_processes:
        raise RuntimeError(
            f"{launched} processes were launched but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type.value}); this accelerate config does not distribute on this machine "
            "(FSDP needs a GPU; for CPU data parallelism use ACCELERATE_USE_CPU=true accelerate launch --multi_gpu)"
        )


def raise_on_every_rank(accelerator, message: str | None, error: type[Exception] = ValueError) -> None:
    """Raise `error(message)` on every rank when the main process found `message` (other ranks pass `None`), so no
    rank is left waiting for the others in a collective."""
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        message = broadcast_object_list([message], from_process=0)[0]
    if message is not None:
        raise error(message)


LOCK_FILE = ".lock"


def lock_output_dir(accelerator, output_dir: str | os.PathLike):
    """One run per output folder: the main process holds an exclusive `flock` on ``<output_dir>/.lock`` for the
    run's lifetime (keep the returned handle open). The kernel drops the lock when the process ends, however it
    ends, so a killed run's lock never blocks its resume. Every rank calls this.

    Raises:
        RuntimeError: on every rank, naming the process that holds the folder.
    """
    import fcntl

    output_dir = Path(output_dir)
    handle, message = None, None
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        handle = open(output_dir / LOCK_FILE, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            handle = None
            message = (
                f"{output_dir} is in use by another training run ({holder}); wait for it to end or choose another "
                "--output_dir"
            )
        else:
            handle.seek(0)
            handle.truncate()
            handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
            handle.flush()
    raise_on_every_rank(accelerator, message, RuntimeError)
    return handle


def check_lineage(output_dir: str | os.PathLike, run_id: str, resuming: bool) -> str | None:
    """Why this run may not use `output_dir` (`None` if it may): its checkpoints must all be this run's lineage,
    so that resuming and pruning never mix two runs."""
    foreign = [p.name for p in list_checkpoints(output_dir) if _run_id_of(p) != run_id]
    if not foreign:
        return None
    what = "this run resumes another run's checkpoint" if resuming else "this is a new run"
    return (
        f"{output_dir} holds checkpoints of another run ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}) "
        f"and {what}: continue that run with --resume_from_checkpoint latest, choose another --output_dir, or delete "
        "the folder to start over"
    )


def publish_pipeline(pipeline, output_dir: str | os.PathLike, **save_kwargs) -> None:
    """`pipeline.save_pretrained(output_dir)` made atomic for its loaders: saved into a temporary folder and
    fsynced, then moved in with ``model_index.json`` (what makes a folder a pipeline) removed first and renamed in
    last, so that at every moment the folder is either no pipeline or the complete new one."""
    output_dir = Path(output_dir)
    staging = output_dir / ".partial-pipeline"
    if staging.exists():
        shutil.rmtree(staging)
    pipeline.save_pretrained(staging, **save_kwargs)
    fsync_tree(staging)
    index = output_dir / "model_index.json"
    if index.exists():
        index.unlink()
        _fsync_dir(output_dir)
    for entry in sorted(staging.iterdir()):
        if entry.name == index.name:
            continue
        target = output_dir / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    _fsync_dir(output_dir)
    os.replace(staging / index.name, index)
    _fsync_dir(output_dir)
    staging.rmdir()


# ---------------------------------------------------------------------------------------------------------
# Command-line values
# ---------------------------------------------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= `minimum` (a count: 1, a step number: 0)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def finite_float(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """An argparse ``type`` for finite floats in an interval (``low_open``/``high_open`` exclude its ends)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    return parse


def add_model_runtime_arguments(parser: argparse.ArgumentParser, blocks: str) -> None:
    """How the model executes (not what it computes): ``--gradient_checkpointing``, ``--torch_compile`` (regional
    compilation of `blocks`, e.g. "the encoder and decoder blocks") and ``--attention_backend``."""
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--torch_compile",
        action="store_true",
        help=f"Compile {blocks} with torch.compile (diffusers' regional compile_repeated_blocks).",
    )
    parser.add_argument(
        "--attention_backend",
        type=str,
        default=None,
        help="A diffusers attention backend for the model, e.g. 'flash' or '_native_cudnn' (model.set_attention_backend).",
    )


def add_optimisation_arguments(
    parser: argparse.ArgumentParser, adam_beta1=None, adam_beta2=None, adam_weight_decay=None
) -> None:
    """The optimizer, EMA, precision and process flags both training scripts share. The AdamW betas and weight decay
    default to the given values (`None`: filled later from the recipe's defaults, `apply_run_defaults`)."""
    parser.add_argument("--gradient_accumulation_steps", type=int_at_least(1), default=1)
    parser.add_argument("--adam_beta1", type=finite_float(0, 1, high_open=True), default=adam_beta1)
    parser.add_argument("--adam_beta2", type=finite_float(0, 1, high_open=True), default=adam_beta2)
    parser.add_argument("--adam_weight_decay", type=finite_float(0), default=adam_weight_decay)
    parser.add_argument("--adam_epsilon", type=finite_float(0, low_open=True), default=1e-8)
    parser.add_argument(
        "--adam_fused",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch's fused AdamW kernel (CPU and CUDA). On CPU torch's default AdamW loops over the parameters, "
        "4.6x slower at B/2 (docs/benchmarks.md); --no-adam_fused restores it.",
    )
    parser.add_argument(
        "--max_grad_norm", type=finite_float(0, low_open=True), default=None, help="Clip gradients to this norm."
    )
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ema_decay", type=finite_float(0, 1), default=None)
    parser.add_argument(
        "--ema_warmup", action=argparse.BooleanOptionalAction, default=None, help="EMAModel's decay warm-up."
    )
    parser.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"))
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--dataloader_num_workers", type=int_at_least(0), default=0)
    parser.add_argument(
        "--cpu_threads",
        type=int_at_least(1),
        default=None,
        help="Torch threads per process when training on CPU. Default: this machine's cores / processes on it. "
        "`accelerate launch` sets OMP_NUM_THREADS=1 for CPU runs unless it was configured for CPU, which would "
        "leave all but one core idle; this flag is applied after it.",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a run writes and what it keeps: output folder, checkpoints and resuming, trackers, the validation
    period, and the Hub upload of the final pipeline."""
    parser.add_argument("--output_dir", type=str, default=None)
    parser.add_argument("--checkpointing_steps", type=int_at_least(0), default=None, help="0: no periodic ones.")
    parser.add_argument("--checkpoints_total_limit", type=int_at_least(1), default=3)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint path.")
    parser.add_argument("--report_to", type=str, default="tensorboard")
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--validation_steps", type=int_at_least(0), default=None, help="0: no validation grids.")
    parser.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline, card and samples.")
    parser.add_argument("--hub_model_id", type=str, default=None, help="Defaults to --output_dir's name.")
    parser.add_argument("--hub_token", type=str, default=None)


def apply_run_defaults(parser, args, digits_defaults: dict, general_defaults: dict) -> None:
    """Fill the flags left unset (`None`) from the built-in digits recipe or, with a dataset or image folder, from the
    defaults for a user's own data; ``args.builtin_digits`` says which. Exits through `parser.error` when both a
    dataset and an image folder are given."""
    if args.dataset_name and args.train_data_dir:
        parser.error("give either --dataset_name or --train_data_dir, not both")
    args.builtin_digits = args.dataset_name is None and args.train_data_dir is None
    for name, value in (digits_defaults if args.builtin_digits else general_defaults).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def resolve_schedule_and_model_config(parser, args, model_cls) -> None:
    """Check ``--mask_schedule`` / ``--mask_ratio`` and ``--model_config`` before any work, into
    ``args.masked_schedule`` and (without start weights) ``args.model_config_resolved``; exits through
    `parser.error` naming the flag."""
    try:
        args.masked_schedule = parse_mask_schedule(args.mask_schedule, default_ratio=args.mask_ratio)
    except (ValueError, TypeError) as err:
        parser.error(f"--mask_schedule / --mask_ratio: {err}")
    if args.pretrained_model_name_or_path is None:
        try:
            args.model_config_resolved = resolve_model_config(args.model_config, model_cls)
        except (ValueError, TypeError, KeyError) as err:
            parser.error(f"--model_config: {err}")


# ---------------------------------------------------------------------------------------------------------
# A run, from start to end
# ---------------------------------------------------------------------------------------------------------

ONLINE_DIR = "online"


def setup_accelerator(
    output_dir: str | os.PathLike,
    *,
    gradient_accumulation_steps: int = 1,
    mixed_precision: str | None = None,
    report_to: str = "tensorboard",
    logging_dir: str = "logs",
    use_ema: bool = True,
    cpu_threads: int | None = None,
    seed: int = 0,
):
    """The run's `Accelerator` and whether it shards the model (FSDP), after the checks every script needs: as many
    processes set up as launched, EMA only under FSDP version 2, this process's share of the CPU cores, the seed.

    Args:
        output_dir (`str` or `os.PathLike`): the run's folder; TensorBoard logs go to ``output_dir/logging_dir``.
        gradient_accumulation_steps, mixed_precision: passed to `Accelerator`.
        report_to (`str`, defaults to ``"tensorboard"``): a tracker name, or ``"none"``.
        logging_dir (`str`, defaults to ``"logs"``): the trackers' folder inside `output_dir`.
        use_ema (`bool`, defaults to `True`): the run keeps an EMA (refused under FSDP version 1).
        cpu_threads (`int`, *optional*): see `configure_cpu_threads`.
        seed (`int`, defaults to 0): `accelerate.utils.set_seed`.

    DDP runs without `find_unused_parameters`: the models keep every parameter in every training step's graph
    (MaskDiT's mask token too, unmasked), so DDP need not search the graph for unused ones each step.

    Returns:
        `tuple`: ``(accelerator, sharded)``.
    """
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, ProjectConfiguration, set_seed

    output_dir = Path(output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=gradient_accumulation_steps,
        mixed_precision=mixed_precision,
        log_with=report_to if report_to != "none" else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_distributed_launch(accelerator)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and use_ema and not accelerator.is_fsdp2:
        raise ValueError(
            "--use_ema under FSDP needs FSDP version 2 (fsdp_version: 2 in the accelerate config), whose sharded "
            "parameters the EMA follows shard by shard; with FSDP version 1 pass --no-use_ema"
        )
    if accelerator.device.type == "cpu":
        logger.info(f"CPU training: {configure_cpu_threads(cpu_threads)} torch thread(s) per process")
    set_seed(seed)
    return accelerator, sharded


@dataclass
class RunStart:
    """What `start_run` found.

    Args:
        lock: the output folder's lock; keep it referenced for the run's lifetime.
        resume_path (`Path`, *optional*): the checkpoint to resume, `None` for a new run.
        resumed_state (`dict`, *optional*): its training state (`read_training_state`).
        run_id (`str`): the run's lineage: the checkpoint's, or a new one.
    """

    lock: Any
    resume_path: Path | None
    resumed_state: dict | None
    run_id: str


def start_run(accelerator, output_dir, resume_from_checkpoint: str | None, use_ema: bool, sharded: bool) -> RunStart:
    """Claim `output_dir` for this run (`lock_output_dir`), find and check the checkpoint to resume before any work
    (nothing in it can run code: `check_checkpoint`), and refuse a folder holding another run's checkpoints
    (`check_lineage`). Every rank calls this."""
    lock = lock_output_dir(accelerator, output_dir)
    resume_path = resolve_resume(resume_from_checkpoint, output_dir)
    resumed_state = check_checkpoint(resume_path, ema=use_ema, sharded=sharded) if resume_path else None
    run_id = resumed_state["run_id"] if resumed_state else new_run_id()  # used by the main process only
    lineage_error = None
    if accelerator.is_main_process:
        lineage_error = check_lineage(output_dir, run_id, resuming=resumed_state is not None)
    raise_on_every_rank(accelerator, lineage_error)
    return RunStart(lock, resume_path, resumed_state, run_id)


def start_model_config(path: str | os.PathLike, model_cls) -> dict:
    """The config of the model `load_start_model` loads from `path`, without loading weights."""
    kind, location = _start_model_source(path)
    if kind == "checkpoint":
        return dict(read_training_state(location)["model_config"])
    return dict(model_cls.load_config(location[0], subfolder=location[1]))


def _start_model_source(path):
    folder = Path(path)
    if (folder / ONLINE_DIR / "config.json").is_file():
        return "saved", (str(folder / ONLINE_DIR), None)
    if (folder / TRAINING_STATE_FILE).is_file():
        return "checkpoint", folder
    return "saved", (str(path), "transformer" if (folder / "transformer").is_dir() else None)


def load_start_model(path: str | os.PathLike, model_cls):
    """The model a run starts from, with the *trained* (online) weights where there are both.

    `path` is one of: a training output folder that saved its online weights (``online/``, as
    `publish_run` writes them), a ``checkpoint-N`` folder (its ``model.safetensors`` and recorded model config;
    a sharded FSDP checkpoint is refused: use its run's output folder), or a saved model or pipeline folder or Hub
    id (its ``transformer`` subfolder if it has one).

    Raises:
        ValueError: for a sharded checkpoint, or one whose weights do not fit its recorded config.
    """
    kind, location = _start_model_source(path)
    if kind == "saved":
        return model_cls.from_pretrained(location[0], subfolder=location[1])
    from safetensors.torch import load_file

    weights = location / "model.safetensors"
    if not weights.is_file():
        raise ValueError(
            f"{location} holds no model.safetensors (a sharded FSDP checkpoint?); start from its run's output folder, "
            f"which holds the gathered online weights in {ONLINE_DIR}/"
        )
    model = model_cls.from_config(read_training_state(location)["model_config"])
    state_dict = load_file(str(weights))
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    if found != expected:
        raise ValueError(f"{weights} does not fit the checkpoint's model config: {_diff(expected, found)}")
    model.load_state_dict(state_dict)
    return model


def configure_model(
    model, *, gradient_checkpointing: bool = False, attention_backend: str | None = None, torch_compile: bool = False
):
    """The model's training options, before `accelerator.prepare`: gradient checkpointing, a diffusers attention
    backend (`set_attention_backend`, e.g. ``"flash"``) and regional compilation of its repeated blocks
    (`compile_repeated_blocks`, one compiled graph for all blocks of a kind). Returns the model."""
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if attention_backend:
        model.set_attention_backend(attention_backend)
    if torch_compile:
        model.compile_repeated_blocks()
    return model


def prepare_training(
    accelerator,
    model,
    sharded: bool,
    *,
    learning_rate: float,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_weight_decay: float = 0.0,
    adam_epsilon: float = 1e-8,
    adam_fused: bool = True,
    use_ema: bool = True,
    ema_decay: float = 0.9999,
    ema_warmup: bool = False,
):
    """AdamW and diffusers' `EMAModel` for `model`, prepared by `accelerator`.

    Unsharded, the EMA averages the model's own parameters; under FSDP each rank keeps the average of its own shards
    (the shadow parameters are sharded like the prepared model's), saved and loaded with
    `torch.distributed.checkpoint` beside accelerate's state. The learning rate is set from the phases before every
    step (`train_phases`), so the checkpoint needs no scheduler object.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        model (`torch.nn.Module`): the model, not yet prepared.
        sharded (`bool`): the run is FSDP (`setup_accelerator`).
        learning_rate (`float`): AdamW's initial learning rate.
        adam_betas, adam_weight_decay, adam_epsilon: AdamW's.
        adam_fused (`bool`, defaults to `True`): torch's fused AdamW kernel.
        use_ema (`bool`, defaults to `True`): keep an EMA.
        ema_decay (`float`, defaults to 0.9999), ema_warmup (`bool`, defaults to `False`): `EMAModel`'s `decay` and
            `use_ema_warmup`.

    Returns:
        `tuple`: ``(model, optimizer, ema)``, the first two prepared; `ema` is `None` without EMA.
    """
    from diffusers.training_utils import EMAModel

    model_cls, model_config = type(model), model.config

    def make_ema(parameters):
        return EMAModel(
            parameters, decay=ema_decay, use_ema_warmup=ema_warmup, model_cls=model_cls, model_config=model_config
        )

    ema = make_ema(model.parameters()) if use_ema and not sharded else None
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=learning_rate,
        betas=adam_betas,
        weight_decay=adam_weight_decay,
        eps=adam_epsilon,
        fused=adam_fused or None,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if use_ema and sharded:
        ema = make_ema(model.parameters())
    if ema is not None:
        ema.to(accelerator.device)
    return model, optimizer, ema


def check_batch_sizes(accelerator, num_examples: int, batch_sizes: Sequence[int]) -> None:
    """Every phase's batch must fit the data now, not hours in when its phase begins (`StepBatchSampler` raises)."""
    for batch_size in batch_sizes:
        StepBatchSampler(num_examples, batch_size, accelerator.num_processes, accelerator.process_index, seed=0)


def run_config(args, mask_schedule, **extra) -> dict:
    """The run's flags as recorded in ``training_config.json``, the checkpoints and the model card: the parsed
    arguments without secrets (``hub_token``) or private entries, the resolved `mask_schedule` and `extra`."""
    config = {
        k: v for k, v in vars(args).items() if k not in ("masked_schedule", "hub_token") and not k.startswith("_")
    }
    config.update(extra)
    config["mask_schedule_resolved"] = mask_schedule.to_dict()
    return config


def record_run(accelerator, output_dir: str | os.PathLike, run_id: str, model, config: dict) -> dict:
    """Write `config` to ``output_dir/training_config.json`` (main process) and return the training state that
    every checkpoint of the run carries: its lineage, the model config and the run config."""
    model_config = {k: v for k, v in accelerator.unwrap_model(model).config.items() if not k.startswith("_")}
    if accelerator.is_main_process:
        text = json.dumps(config, indent=2, sort_keys=True, default=str)
        (Path(output_dir) / "training_config.json").write_text(text)
    return {"run_id": run_id, "model_config": model_config, "run": config}


def masked_loss_fn(
    accelerator,
    model,
    scheduler,
    data: TrainingData,
    *,
    mask_type: str,
    mask_block_size: int = 2,
    class_dropout_prob: float = 0.0,
    **loss_kwargs,
) -> Callable:
    """The `compute_loss` of `train_phases`: a batch's clean samples (pixels, or latents drawn from their cached
    posteriors), its labels with dropout for classifier-free guidance (class-conditional data), a mask of the step's
    ratio, and ``scheduler.masked_training_loss`` (the scheduler's objective: EDM for MaskDiT, DDPM for MaskDM).

    The mask's count of removed tokens (`generated_mask_count`) goes into the loss as ``num_masked``, so the step
    reads no tensor value on the host.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator (its device).
        model (`torch.nn.Module`): the prepared model.
        scheduler: a scheduler with `MaskedTrainingMixin`.
        data (`TrainingData`): the run's data (`load_training_data`).
        mask_type (`str`): one of `MASK_TYPES`.
        mask_block_size (`int`, defaults to 2): block side of ``"block"`` masks.
        class_dropout_prob (`float`, defaults to 0.0): label dropout (`drop_class_labels`).
        loss_kwargs: passed to `masked_training_loss`, e.g. ``mae_loss_weight``.
    """
    from .data import sample_latents
    from .masking import generate_mask, generated_mask_count
    from .schedulers.masked_training import drop_class_labels

    patch_size = accelerator.unwrap_model(model).config.patch_size
    grid_size = (data.sample_size // patch_size, data.sample_size // patch_size)
    scaling_factor = data.vae.config.scaling_factor if data.vae is not None else None
    device = accelerator.device

    def compute_loss(batch, generator, mask_ratio, phase):
        if data.vae is not None:
            batch = {k: v.to(device) for k, v in batch.items()}
            clean = sample_latents(batch, scaling_factor, generator=generator)
        else:
            clean = batch["pixel_values"].to(device)
        labels = None
        if data.num_classes:
            labels = drop_class_labels(
                batch["class_labels"].to(device), data.num_classes, class_dropout_prob, generator=generator
            )
        mask, num_masked = None, None
        if mask_ratio > 0:
            num_masked = generated_mask_count(mask_type, grid_size, mask_ratio, mask_block_size)
            mask = generate_mask(
                mask_type,
                clean.shape[0],
                grid_size,
                mask_ratio,
                block_size=mask_block_size,
                generator=generator,
                device=device,
            )
        return scheduler.masked_training_loss(
            model, clean, class_labels=labels, mask=mask, generator=generator, num_masked=num_masked, **loss_kwargs
        )

    return compute_loss


def periodic_saves(
    accelerator,
    model,
    ema,
    sharded: bool,
    output_dir: str | os.PathLike,
    training_state: dict,
    *,
    end: int,
    checkpointing_steps: int,
    checkpoints_total_limit: int | None,
    validation_steps: int,
    validation_grid: Callable,
    tag: str = "validation",
) -> Callable[[int], None]:
    """The `after_step` of `train_phases`: a checkpoint every `checkpointing_steps` steps before `end` (the final one
    is `finish_run`'s), and every `validation_steps` steps a grid from the EMA weights, ``validation_grid(model)``,
    saved by `save_validation_grid` under `tag`.

    Unsharded, only the main process samples. Under FSDP every rank must: each rank swaps its own EMA shards in, and
    all of them run the same sampling loop (same seed, same steps) so that their forwards' all-gathers pair up."""

    def after_step(step: int) -> None:
        if checkpointing_steps and step % checkpointing_steps == 0 and step < end:
            save_checkpoint(accelerator, output_dir, step, checkpoints_total_limit, training_state, ema, sharded)
        if validation_steps and step % validation_steps == 0 and (sharded or accelerator.is_main_process):
            with ema_weights(ema, accelerator.unwrap_model(model), sharded) as ema_model:
                grid = validation_grid(ema_model)
            save_validation_grid(accelerator, grid, output_dir, step, tag=tag)

    return after_step


def train_phases(
    accelerator,
    model,
    optimizer,
    ema,
    phases: Sequence[Phase],
    dataset,
    collate_fn: Callable,
    *,
    global_step: int,
    seed: int,
    compute_loss: Callable,
    log_keys: Sequence[str],
    after_step: Callable[[int], None],
    progress=None,
    gradient_accumulation_steps: int = 1,
    max_grad_norm: float | None = None,
    num_workers: int = 0,
    log_step_offset: int = 0,
) -> int:
    """The training loop, phase by phase, from `global_step` to the last phase's end; returns the step reached.

    Each optimizer step: the learning rate from `learning_rate_at`, a `step_generator`, then per micro-batch
    ``out = compute_loss(batch, generator, mask_ratio, phase)`` (called under `accelerator.autocast`; `out.loss`
    is backpropagated, the `log_keys` attributes logged), a check that every rank's loss is finite, gradient
    clipping, the optimizer step and the EMA update; then ``after_step(global_step)`` (checkpoints, validation).
    Batches come from `StepBatchSampler`, so the run is a function of (`seed`, step, process).

    Raises:
        FloatingPointError: on every rank, at the first non-finite loss, before anything is saved after it.
    """
    from torch.utils.data import DataLoader

    for phase in phases:
        if global_step >= phase.end:
            continue
        sampler = StepBatchSampler(
            len(dataset),
            phase.batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            seed=seed + 7919 * list(phases).index(phase),
            start_batch=(global_step - phase.start) * gradient_accumulation_steps,
        )
        batches = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate_fn, num_workers=num_workers))
        model.train()
        while global_step < phase.end:
            tic = time.perf_counter()
            generator = step_generator(seed, global_step, accelerator.process_index, accelerator.device)
            learning_rate = learning_rate_at(phases, global_step)
            set_learning_rate(optimizer, learning_rate)
            mask_ratio = phase.ratio(global_step)
            logs = dict.fromkeys(log_keys, 0.0)
            for _ in range(gradient_accumulation_steps):
                batch = next(batches)
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        out = compute_loss(batch, generator, mask_ratio, phase)
                    finite = torch.isfinite(out.loss.detach()).float()
                    if accelerator.gather(finite[None]).min() < 1:
                        raise FloatingPointError(
                            f"non-finite loss at step {global_step} ({phase.name} phase, mask ratio {mask_ratio:.3f}); "
                            "nothing was saved after it - resume with --resume_from_checkpoint latest after lowering "
                            "--learning_rate or setting --max_grad_norm"
                        )
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for key in logs:
                    logs[key] += getattr(out, key).detach().float().item() / gradient_accumulation_steps

            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            elapsed = time.perf_counter() - tic
            logs.update(
                mask_ratio=mask_ratio,
                lr=learning_rate,
                images_per_second=phase.batch_size * gradient_accumulation_steps * accelerator.num_processes / elapsed,
            )
            if progress is not None:
                progress.update(1)
                progress.set_postfix(loss=f"{logs['loss']:.4f}", r=f"{mask_ratio:.2f}")
            accelerator.log(logs, step=log_step_offset + global_step)
            after_step(global_step)
    return global_step


def save_validation_grid(accelerator, grid, output_dir: str | os.PathLike, global_step: int, tag: str = "validation"):
    """Write a validation grid to ``output_dir/validation/step-N.png`` and to TensorBoard (main process only)."""
    if not accelerator.is_main_process:
        return
    folder = Path(output_dir) / "validation"
    folder.mkdir(exist_ok=True)
    grid.save(folder / f"step-{global_step:07d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images(tag, np.asarray(grid)[None], global_step, dataformats="NHWC")


def evaluate_on_digits(
    pipeline,
    output_dir: str | os.PathLike,
    *,
    num_samples_per_class: int,
    resolution: int,
    seed: int,
    grid_rows: int,
    grid_cols: int,
    cache_dir=None,
    **sampling_kwargs,
):
    """The built-in digits run's final evaluation (`evaluate_pipeline_on_digits`: FID against the real set, the
    real-vs-real floor and, class-conditional, the accuracy), written to ``eval_results.json``.

    Returns:
        `tuple`: ``(metrics, eval_results, grid)``: the numbers, their model-card entries, and a grid of exactly the
        samples evaluated (class-conditional: the first `grid_cols` of the first `grid_rows` classes; unconditional:
        the first `grid_rows * grid_cols`), or `None` if fewer were drawn.
    """
    from diffusers.utils import numpy_to_pil

    from .evaluation import eval_results_for_model_card, evaluate_pipeline_on_digits

    metrics, samples, labels = evaluate_pipeline_on_digits(
        pipeline,
        num_samples_per_class=num_samples_per_class,
        resolution=resolution,
        generator=torch.Generator().manual_seed(seed),
        cache_dir=cache_dir,
        return_samples=True,
        **sampling_kwargs,
    )
    if labels is not None:  # samples come class by class
        chosen = torch.cat([samples[c * num_samples_per_class :][:grid_cols] for c in range(grid_rows)])
        enough = grid_cols <= num_samples_per_class
    else:
        chosen = samples[: grid_rows * grid_cols]
        enough = grid_rows * grid_cols <= len(samples)
    grid = (
        image_grid(numpy_to_pil(chosen.permute(0, 2, 3, 1).cpu().numpy()), rows=grid_rows, cols=grid_cols)
        if enough
        else None
    )
    Path(output_dir, "eval_results.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
    logger.info("evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics, eval_results_for_model_card(metrics), grid


def publish_run(
    pipeline,
    output_dir: str | os.PathLike,
    *,
    grid,
    training_config: dict,
    dataset_name: str,
    eval_results: list | None = None,
    online_model=None,
    repo_id: str | None = None,
    push_to_hub: bool = False,
    hub_token: str | None = None,
):
    """The run's result in `output_dir` (main process only): ``samples.png``, the online weights in ``online/``
    (if given: what a following fine-tuning starts from, see `load_start_model`), and the pipeline with its model
    card, published atomically (`publish_pipeline`); then optionally pushed to the Hub."""
    output_dir = Path(output_dir)
    grid.save(output_dir / "samples.png")
    if online_model is not None:
        staging = output_dir / f".partial-{ONLINE_DIR}"
        if staging.exists():
            shutil.rmtree(staging)
        online_model.save_pretrained(staging)
        fsync_tree(staging)
        if (output_dir / ONLINE_DIR).exists():
            shutil.rmtree(output_dir / ONLINE_DIR)
        os.replace(staging, output_dir / ONLINE_DIR)
        _fsync_dir(output_dir)
    repo_id = repo_id or output_dir.name
    card = pipeline.create_model_card(
        repo_id,
        training_config=training_config,
        eval_results=eval_results or None,
        dataset_name=dataset_name,
        sample_image="samples.png",
    )
    publish_pipeline(pipeline, output_dir, model_card=card)
    logger.info(f"saved the EMA pipeline, samples.png and the model card to {output_dir}")
    if push_to_hub:
        pipeline.push_to_hub(
            repo_id, model_card=card, token=hub_token, extra_files={"samples.png": output_dir / "samples.png"}
        )


def finish_run(
    accelerator,
    model,
    ema,
    sharded: bool,
    output_dir: str | os.PathLike,
    global_step: int,
    training_state: dict,
    *,
    model_cls,
    checkpoints_total_limit: int | None,
    make_pipeline: Callable,
    final_grid: Callable,
    dataset_name: str,
    digits_evaluation: dict | None = None,
    save_online: bool = False,
    log_step: int | None = None,
    repo_id: str | None = None,
    push_to_hub: bool = False,
    hub_token: str | None = None,
):
    """The end of a run: the final checkpoint, a check that data-parallel ranks agree, the EMA weights gathered into
    ``make_pipeline(model)``, the optional digits evaluation (`evaluate_on_digits`), and `publish_run`. Every rank
    calls this; the main process writes.

    Args:
        model_cls (`type`): the model's class (`export_ema_model`).
        checkpoints_total_limit (`int`, *optional*): see `save_checkpoint`.
        make_pipeline (`Callable`): the pipeline around a final model.
        final_grid (`Callable`): ``samples.png`` from the pipeline, when the evaluation gives no grid of its samples.
        dataset_name (`str`): for the model card.
        digits_evaluation (`dict`, *optional*): `evaluate_on_digits`'s keyword arguments; its metrics are logged
            at `log_step` (defaults to `global_step`).
        save_online (`bool`, defaults to `False`): also save the trained (online) weights, what a following
            fine-tuning starts from.
        repo_id, push_to_hub, hub_token: see `publish_run`.
    """
    save_checkpoint(accelerator, output_dir, global_step, checkpoints_total_limit, training_state, ema, sharded)
    if not sharded:
        check_ranks_agree(accelerator, model)
    sharded_ema = ema if sharded else None
    if save_online:
        final_model, online = export_ema_model(accelerator, model, ema, model_cls, sharded_ema, return_online=True)
    else:
        final_model, online = export_ema_model(accelerator, model, ema, model_cls, sharded_ema), None
    if not accelerator.is_main_process:
        return
    pipeline = make_pipeline(final_model)
    eval_results, grid = None, None
    if digits_evaluation is not None:
        metrics, eval_results, grid = evaluate_on_digits(pipeline, output_dir, **digits_evaluation)
        accelerator.log(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)},
            step=global_step if log_step is None else log_step,
        )
    publish_run(
        pipeline,
        output_dir,
        grid=grid if grid is not None else final_grid(pipeline),
        training_config=training_state["run"],
        dataset_name=dataset_name,
        eval_results=eval_results,
        online_model=online if save_online else None,
        repo_id=repo_id,
        push_to_hub=push_to_hub,
        hub_token=hub_token,
    )
