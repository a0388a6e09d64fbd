"""Drawing many samples for an evaluation: seeded per sample, split into shards, resumable, in ADM's ``.npz`` layout.

Sample ``i`` is drawn from its own generator, seeded with ``seed * 2**32 + i`` on the CPU, and gets label
``class_labels[i % len(class_labels)]`` (``i % num_classes`` by default: class-balanced). The samples are cut into
shards of ``shard_size`` consecutive indices, and each shard into batches of ``batch_size``; a shard is the unit
that processes share out and that a resumed run skips. So an image depends on its index, the seed and the sampling
settings, not on how many processes drew it; nor, up to floating-point rounding in batched matrix products, on the
batch size.

Layout of an output folder::

    sampling_config.json                  the settings; a resumed run must match them
    shards/shard-000000.npz ...           one per finished shard: indices, labels and (for npz output) images
    images/000000.png ...                 for PNG output
    samples_<N>x<H>x<W>x<C>.npz           arr_0: uint8 (N, H, W, C); arr_1: int64 labels (class-conditional only)

A shard's file is written to a temporary name and renamed when complete (after its PNGs), so a killed run leaves
only finished shards, which the next run keeps.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import PIL.Image
import torch

from ..utils.io import atomic_write
from ..utils.safe_loading import read_json

CONFIG_NAME = "sampling_config.json"
OUTPUT_FORMATS = ("npz", "png", "both")
# Scheduler choices by name, swapped in with `from_config` of the pipeline's own scheduler.
SCHEDULERS = {
    "edm_heun": "diffusers_masked.schedulers.scheduling_edm_heun:EDMHeunScheduler",
    "edm_euler": "diffusers:EDMEulerScheduler",
    "edm_dpmsolver": "diffusers:EDMDPMSolverMultistepScheduler",
    "ddim": "diffusers:DDIMScheduler",
    "ddpm": "diffusers:DDPMScheduler",
    "dpmsolver": "diffusers:DPMSolverMultistepScheduler",
}
# Settings that change what a sample looks like: a resumed run must use the same ones. (Not the batch size, nor
# the number of samples, which may grow.)
CONTENT_SETTINGS = (
    "pipeline",
    "seed",
    "shard_size",
    "class_labels",
    "prompts",
    "num_classes",
    "output_format",
    "pipeline_kwargs",
    "scheduler",
)


def sample_seed(seed: int, index: int) -> int:
    """The seed of sample `index`: distinct across indices below 2**32 and across run seeds."""
    return seed * 2**32 + index


def sample_labels(indices: Sequence[int], num_classes: int, class_labels: Sequence[int] | None = None) -> list[int]:
    """Labels of the samples at `indices`: ``class_labels`` cycled, or every class in turn (``i % num_classes``)."""
    if class_labels:
        return [int(class_labels[i % len(class_labels)]) for i in indices]
    return [i % num_classes for i in indices]


def shard_ranges(num_samples: int, shard_size: int) -> list[range]:
    """The consecutive index ranges of the shards."""
    return [range(start, min(start + shard_size, num_samples)) for start in range(0, num_samples, shard_size)]


def pipeline_num_classes(pipeline) -> int:
    """The number of classes a pipeline's transformer is conditioned on (0: unconditional)."""
    num_classes = getattr(pipeline, "num_classes", None)
    if num_classes is None:
        num_classes = getattr(pipeline.transformer.config, "num_classes", 0)
    return int(num_classes or 0)


def load_pipeline(name_or_path: str | os.PathLike, trust_remote_code: bool = False, **kwargs):
    """Load a saved `MaskDiTPipeline` or `MaskDMPipeline` (a folder or a Hub id) with our class's `from_pretrained`.

    The class is read from ``model_index.json`` (JSON only), and our classes check the code files before loading
    (see `MaskedDiffusionPipeline.from_pretrained`). A stock diffusers pipeline of diffusers and transformers
    components (what `train_dit.py` and `train_text_to_image.py --transformer pixart` save) loads as diffusers loads
    it, running no code from the folder. Any other pipeline loads only with
    ``trust_remote_code=True``, through `DiffusionPipeline.from_pretrained`, which runs the repo's code.

    Raises:
        ValueError: the folder or repo holds another pipeline and ``trust_remote_code`` is `False`, or its
            ``model_index.json`` is missing or damaged.
    """
    from diffusers import DiffusionPipeline
    from huggingface_hub import hf_hub_download

    from ..pipelines.pipeline_maskdit import MaskDiTPipeline
    from ..pipelines.pipeline_maskdm import MaskDMPipeline
    from ..pipelines.pipeline_utils import read_model_index

    ours = {cls.__name__: cls for cls in (MaskDiTPipeline, MaskDMPipeline)}
    if os.path.isdir(name_or_path):
        index_file = Path(name_or_path) / "model_index.json"
    else:
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only") if k in kwargs}
        index_file = hf_hub_download(str(name_or_path), "model_index.json", **hub_kwargs)
    index = read_model_index(index_file)
    class_name = index.get("_class_name")
    class_name = class_name[-1] if isinstance(class_name, (list, tuple)) else class_name
    if class_name in ours:
        if trust_remote_code:
            kwargs["trust_remote_code"] = True
        return ours[class_name].from_pretrained(name_or_path, **kwargs)
    if _is_stock(index):  # diffusers' own pipeline of diffusers / transformers components: no repo code runs
        return DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
    if not trust_remote_code:
        raise ValueError(
            f"{name_or_path} holds a {class_name}, not a MaskDiTPipeline or MaskDMPipeline; loading it would run the "
            "code it names. Pass trust_remote_code=True (command line: --trust_remote_code) only if you trust it."
        )
    return DiffusionPipeline.from_pretrained(name_or_path, trust_remote_code=True, **kwargs)


def _is_stock(index: dict) -> bool:
    """A ``model_index.json`` naming one of diffusers' own pipeline classes (a plain name, no module) whose
    components all come from diffusers or transformers: `DiffusionPipeline.from_pretrained` loads it without running
    any code from the folder or repo (a stock `DiTPipeline` or `PixArtAlphaPipeline` trained by our scripts)."""
    import diffusers

    class_name = index.get("_class_name")
    if not isinstance(class_name, str) or not hasattr(diffusers, class_name):
        return False
    components = [v for k, v in index.items() if not k.startswith("_") and isinstance(v, list)]
    return all(v[0] in ("diffusers", "transformers", None) for v in components)


def scheduler_class(name: str) -> type:
    """The scheduler class of `SCHEDULERS[name]`."""
    import importlib

    if name not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {sorted(SCHEDULERS)}, got {name!r}")
    module, class_name = SCHEDULERS[name].split(":")
    return getattr(importlib.import_module(module), class_name)


def compatible_scheduler_names(pipeline) -> list[str]:
    """The names in `SCHEDULERS` that `pipeline` samples with: for our pipelines those its
    `is_compatible_scheduler` accepts (the check the pipeline itself makes when a scheduler is set), for any other
    pipeline all of them."""
    is_compatible = getattr(type(pipeline), "is_compatible_scheduler", None)
    return sorted(name for name in SCHEDULERS if is_compatible is None or is_compatible(scheduler_class(name)))


def set_scheduler(pipeline, name: str) -> None:
    """Swap the pipeline's scheduler for one of `SCHEDULERS` by name, built from the current one's config; our
    pipelines refuse one of the other parameterisation (`MaskedDiffusionPipeline.check_scheduler`).

    ``"dpmsolver"`` is `MaskDMPipeline.dpm_solver_scheduler`: DPM-Solver++ with x0 clipped to [-1, 1], without
    which an epsilon model's samples are noise."""
    if name == "dpmsolver":
        from ..pipelines.pipeline_maskdm import MaskDMPipeline

        pipeline.scheduler = MaskDMPipeline.dpm_solver_scheduler(pipeline.scheduler.config)
    else:
        pipeline.scheduler = scheduler_class(name).from_config(pipeline.scheduler.config)


def read_config(output_dir: str | os.PathLike) -> dict | None:
    """The settings recorded in `output_dir` (`None` for a new folder).

    Raises:
        ValueError: naming the file, if it is damaged (not JSON, or not a JSON object).
    """
    path = Path(output_dir) / CONFIG_NAME
    if not path.is_file():
        return None
    hint = "it records the settings of the samples in this folder; restore it, or sample into another folder"
    config = read_json(path, hint=hint)
    if not isinstance(config, dict):
        raise ValueError(f"{path} is damaged (a JSON {type(config).__name__}, not an object); {hint}")
    return config


def check_resume(output_dir: str | os.PathLike, config: dict) -> str | None:
    """Why `config` may not continue the samples in `output_dir` (`None` if it may, or if the folder is new)."""
    recorded = read_config(output_dir)
    if recorded is None:
        return None
    differ = [k for k in CONTENT_SETTINGS if recorded.get(k) != config.get(k)]
    if not differ:
        return None
    changes = ", ".join(f"{k}: {recorded.get(k)!r} -> {config.get(k)!r}" for k in differ)
    return (
        f"{output_dir} holds samples drawn with other settings ({changes}); use the same settings to resume, or "
        "choose another output folder"
    )


def write_config(output_dir: str | os.PathLike, config: dict) -> None:
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write(output_dir / CONFIG_NAME, lambda tmp: Path(tmp).write_text(json.dumps(config, indent=2) + "\n"))


def shard_path(output_dir: str | os.PathLike, shard: int) -> Path:
    return Path(output_dir) / "shards" / f"shard-{shard:06d}.npz"


def pending_shards(output_dir: str | os.PathLike, num_samples: int, shard_size: int) -> list[int]:
    """The shards not finished yet, in order. A finished shard of other indices (the last one of a run with fewer
    samples) is pending again."""
    pending = []
    for k, expected in enumerate(shard_ranges(num_samples, shard_size)):
        path = shard_path(output_dir, k)
        if path.is_file():
            with np.load(path, allow_pickle=False) as shard:
                if shard["indices"].tolist() == list(expected):
                    continue
        pending.append(k)
    return pending


def to_uint8(images: np.ndarray) -> np.ndarray:
    """``(B, H, W, C)`` floats in [0, 1] → uint8, rounded as diffusers' `numpy_to_pil` does."""
    return (np.clip(images, 0, 1) * 255).round().astype(np.uint8)


def draw_samples(
    pipeline,
    indices: Sequence[int],
    seed: int,
    labels: Sequence[int] | None,
    pipeline_kwargs: dict | None = None,
    prompts: Sequence[str] | None = None,
) -> np.ndarray:
    """One batch: the uint8 ``(B, H, W, C)`` samples at `indices`, each from its own CPU generator; with `prompts`
    (a text-to-image pipeline) `labels` are indices into them.

    The generators are on the CPU whatever the pipeline's device, so the noise (and so the image) does not depend
    on the device type either, up to the model's own arithmetic.
    """
    generators = [torch.Generator("cpu").manual_seed(sample_seed(seed, i)) for i in indices]
    call = dict(pipeline_kwargs or {}, generator=generators, output_type="np")
    if prompts is not None:
        call["prompt"] = [prompts[label] for label in labels]
    elif labels is not None:
        call["class_labels"] = list(labels)
    else:
        call["batch_size"] = len(indices)
    return to_uint8(np.asarray(pipeline(**call).images))


def sample_shard(
    pipeline,
    output_dir: str | os.PathLike,
    shard: int,
    indices: range,
    seed: int,
    batch_size: int,
    num_classes: int,
    class_labels: Sequence[int] | None = None,
    output_format: str = "npz",
    pipeline_kwargs: dict | None = None,
    on_batch: Callable[[int], None] | None = None,
    prompts: Sequence[str] | None = None,
) -> None:
    """Draw one shard and write it (PNGs first, then the shard file, atomically). With `prompts`, sample ``i`` is
    prompted with ``prompts[i % len(prompts)]`` and its label is that index."""
    if prompts is not None:
        labels = [i % len(prompts) for i in indices]
    else:
        labels = sample_labels(indices, num_classes, class_labels) if num_classes else None
    images = []
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        batch_labels = labels[start : start + batch_size] if labels is not None else None
        images.append(draw_samples(pipeline, batch, seed, batch_labels, pipeline_kwargs, prompts))
        if on_batch is not None:
            on_batch(len(batch))
    images = np.concatenate(images)
    if output_format in ("png", "both"):
        folder = Path(output_dir) / "images"
        folder.mkdir(parents=True, exist_ok=True)
        for i, image in zip(indices, images):
            image = image[..., 0] if image.shape[-1] == 1 else image
            atomic_write(
                folder / f"{i:06d}.png", lambda tmp, im=image: PIL.Image.fromarray(im).save(tmp, "PNG"), ".png"
            )
    record = {
        "indices": np.asarray(indices, dtype=np.int64),
        "labels": np.asarray(labels if labels is not None else [], dtype=np.int64),
    }
    if output_format in ("npz", "both"):
        record["images"] = images
    atomic_write(shard_path(output_dir, shard), lambda tmp: np.savez(tmp, **record), ".npz")


def assemble_npz(output_dir: str | os.PathLike, num_samples: int, shard_size: int) -> Path:
    """Join the finished shards into ``samples_<N>x<H>x<W>x<C>.npz`` (``arr_0`` images, ``arr_1`` labels when
    class-conditional), the layout ADM's evaluator and `evaluate_samples` read, replacing the file of an earlier
    run with fewer samples; returns its path."""
    images, labels = [], []
    for k, expected in enumerate(shard_ranges(num_samples, shard_size)):
        with np.load(shard_path(output_dir, k), allow_pickle=False) as shard:
            if "images" not in shard:
                raise ValueError(f"shard {k} of {output_dir} holds no images (it was drawn for PNG output only)")
            if shard["indices"].tolist() != list(expected):
                raise ValueError(f"shard {k} of {output_dir} holds indices other than {expected}")
            images.append(shard["images"])
            labels.append(shard["labels"])
    images = np.concatenate(images)
    labels = np.concatenate(labels)
    path = Path(output_dir) / f"samples_{'x'.join(str(n) for n in images.shape)}.npz"
    arrays = {"arr_0": images} if len(labels) == 0 else {"arr_0": images, "arr_1": labels}
    atomic_write(path, lambda tmp: np.savez(tmp, **arrays), ".npz")
    for stale in Path(output_dir).glob("samples_*.npz"):
        if stale != path:
            stale.unlink()  # of an earlier run of this folder with fewer samples
    return path
