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
- Data (`load_training_data`), sample grids (`sample_grid`, `image_grid`), and process set-up
  (`configure_cpu_threads`, `check_distributed_launch`, `check_ranks_agree`).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
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
from .masking import ConstantMaskSchedule, CosinePowerMaskSchedule

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_FILE = "training_state.json"
SHARDED_EMA_DIR = "ema_fsdp"
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
            Phase("unmask", masked_steps, masked_steps + unmask_steps, unmask_batch_size, unmask_learning_rate, schedule)
        )
    return phases


def learning_rate_factor(phases: Sequence[Phase], step: int, base_learning_rate: float) -> float:
    """The learning rate of optimizer step `step` as a multiple of `base_learning_rate` (for `LambdaLR`)."""
    for phase in phases:
        if step < phase.end:
            return phase.learning_rate_at(step) / base_learning_rate
    return phases[-1].learning_rate / base_learning_rate


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
                f"({batch_size} per process x {num_processes} processes); lower --train_batch_size"
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


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first (partial ones are never named `checkpoint-N`)."""
    found = []
    for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*"):
        suffix = path.name[len(CHECKPOINT_PREFIX) :]
        if suffix.isdigit() and (path / TRAINING_STATE_FILE).exists():
            found.append((int(suffix), path))
    return [path for _, path in sorted(found)]


def save_checkpoint(
    accelerator,
    output_dir: str | os.PathLike,
    global_step: int,
    total_limit: int | None,
    run_config: dict,
    sharded_ema=None,
) -> Path:
    """Save the full training state atomically: into a temporary folder, then one rename. Every rank calls this.

    Args:
        accelerator (`accelerate.Accelerator`): its `save_state` writes the model, optimizer, registered objects
            and every rank's random states.
        output_dir (`str` or `os.PathLike`): the run's folder; the checkpoint becomes ``checkpoint-<global_step>``.
        global_step (`int`): optimizer steps done; recorded in ``training_state.json``.
        total_limit (`int`, *optional*): keep only this many newest checkpoints.
        run_config (`dict`): the run's configuration, recorded beside the step.
        sharded_ema (`EMAModel`, *optional*): an EMA of FSDP shards, saved by every rank (`save_sharded_ema`).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
    partial = output_dir / f".partial-{CHECKPOINT_PREFIX}{global_step}"
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    if sharded_ema is not None:
        save_sharded_ema(accelerator, sharded_ema, partial)
    # Every rank writes into the folder (its random states, its shard under FSDP): rename only once all are done.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": global_step, "run": run_config}
        (partial / TRAINING_STATE_FILE).write_text(json.dumps(state, indent=2, sort_keys=True, default=str))
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        if total_limit is not None:
            for old in list_checkpoints(output_dir)[:-total_limit]:
                shutil.rmtree(old)
        logger.info(f"saved checkpoint {final}")
    accelerator.wait_for_everyone()
    return final


def save_sharded_ema(accelerator, ema, folder: str | os.PathLike) -> None:
    """An EMA whose shadow parameters are FSDP shards: every rank writes its own with torch.distributed.checkpoint
    (accelerate's custom-object checkpointing writes from the main process only)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    state = ema.state_dict()
    shadows = {f"shadow_{i}": tensor for i, tensor in enumerate(state.pop("shadow_params"))}
    dcp.save(shadows, checkpoint_id=str(folder / SHARDED_EMA_DIR))
    if accelerator.is_main_process:
        (folder / SHARDED_EMA_DIR / "ema_state.json").write_text(json.dumps(state))


def load_sharded_ema(ema, folder: str | os.PathLike) -> None:
    """Load `save_sharded_ema`'s files into `ema`, whose shadow parameters are sharded like the saved ones."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    if not (folder / SHARDED_EMA_DIR).is_dir():
        raise ValueError(f"{folder} has no sharded EMA ({SHARDED_EMA_DIR}/): it was not saved by an FSDP run with EMA")
    dcp.load({f"shadow_{i}": tensor for i, tensor in enumerate(ema.shadow_params)}, checkpoint_id=str(folder / SHARDED_EMA_DIR))
    for key, value in json.loads((folder / SHARDED_EMA_DIR / "ema_state.json").read_text()).items():
        setattr(ema, key, value)


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


def load_checkpoint(accelerator, path: str | os.PathLike, sharded_ema=None) -> int:
    """Restore what `save_checkpoint` saved (every rank calls this); returns the checkpoint's global step."""
    path = Path(path)
    accelerator.load_state(str(path))
    if sharded_ema is not None:
        load_sharded_ema(sharded_ema, path)
    return json.loads((path / TRAINING_STATE_FILE).read_text())["global_step"]


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


def export_ema_model(accelerator, model, ema, model_cls, sharded_ema=None):
    """The final model with the EMA weights (or the raw ones without EMA), in eval mode, on the main process;
    `None` on the others. Every rank calls this: under FSDP it gathers the shards (collectives).

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        model (`torch.nn.Module`): the prepared model.
        ema (`EMAModel`, *optional*): its moving average.
        model_cls (`type`): the model's class; the export is ``model_cls.from_config(config)``.
        sharded_ema (`EMAModel`, *optional*): `ema` when its shadow parameters are FSDP shards.
    """
    state_dict = accelerator.get_state_dict(model)
    if sharded_ema is not None:
        sharded_ema.shadow_params = [shadow.full_tensor() for shadow in sharded_ema.shadow_params]
    if not accelerator.is_main_process:
        return None
    final_model = model_cls.from_config(accelerator.unwrap_model(model).config)
    final_model.load_state_dict(state_dict)
    if ema is not None:
        ema.copy_to(final_model.parameters())
    return final_model.eval()


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

    Args:
        pipeline: a class-conditional pipeline taking ``class_labels``.
        num_classes (`int`): rows of the grid.
        per_class (`int`): columns.
        seed (`int`): seed of the generator on the pipeline's device.
        pipeline_kwargs: passed on, e.g. ``guidance_scale``, ``num_inference_steps``.
    """
    labels = [c for c in range(num_classes) for _ in range(per_class)]
    images = pipeline(
        class_labels=labels,
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
        vae (`AutoencoderKL`, *optional*): the VAE of latent-space training.
    """

    dataset: Any
    id2label: dict | None
    collate_fn: Callable
    in_channels: int
    sample_size: int
    vae: Any = None


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
) -> TrainingData:
    """The training set of a run: a Hub dataset or image folder, or with neither the built-in digits.

    The built-in digits are their 80% train split (so the held-out 20% gives an honest FID floor), one channel.
    Other data is RGB, every image decoded once first (`verify`) so that a corrupt file stops the run now, by name,
    not hours in when its batch comes up. With `vae`, every image's posterior is extracted once into a cache that
    later runs reuse (`extract_latents`); random crops and flips are refused there, as latents are extracted once.

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
    """
    builtin_digits = dataset_name is None and train_data_dir is None
    if builtin_digits:
        if vae:
            raise ValueError("a VAE needs image data (a dataset or an image folder); the built-in digits are pixels")
        dataset, id2label = load_digits_dataset(resolution=resolution, split="train", seed=0, holdout_fraction=0.2)
        num_channels = 1
    else:
        dataset, id2label = load_image_dataset(
            dataset_name=dataset_name,
            dataset_config_name=dataset_config_name,
            train_data_dir=train_data_dir,
            image_column=image_column,
            label_column=label_column,
            cache_dir=cache_dir,
        )
        num_channels = 3
    if max_train_samples is not None:
        dataset = dataset.select(range(min(max_train_samples, len(dataset))))
    if not builtin_digits and verify:
        with accelerator.main_process_first():
            verify_images(dataset)

    transform = build_transforms(resolution, center_crop=not random_crop, random_flip=random_flip, num_channels=num_channels)
    if not vae:
        return TrainingData(dataset.with_transform(make_preprocess(transform)), id2label, collate_fn, num_channels, resolution)

    from diffusers import AutoencoderKL

    if random_flip or random_crop:
        raise ValueError("random flips and crops cannot be used with a VAE: latents are extracted once")
    if latent_cache_dir is None:
        raise ValueError("latent_cache_dir is required with a VAE")
    autoencoder = AutoencoderKL.from_pretrained(vae, subfolder=vae_subfolder).eval()
    with accelerator.main_process_first():
        dataset = extract_latents(
            dataset, autoencoder, transform, latent_cache_dir, batch_size=latent_batch_size, device=accelerator.device
        )
    downsampling = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    return TrainingData(
        dataset, id2label, latent_collate_fn, autoencoder.config.latent_channels, resolution // downsampling, autoencoder
    )


def resolve_model_config(spec: str, preset_config: Callable[[str], dict]) -> dict:
    """A model config from a preset name, a JSON string or a path to a ``config.json``; private keys dropped."""
    if os.path.isfile(spec):
        config = json.loads(Path(spec).read_text())
    elif spec.lstrip().startswith("{"):
        config = json.loads(spec)
    else:
        config = preset_config(spec)
    return {k: v for k, v in config.items() if not k.startswith("_")}


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
