"""Datasets for training and evaluating masked diffusion transformers.

Three sources, one shape: every loader returns a `datasets.Dataset` with an ``image`` column and, for
class-conditional data, a ``label`` column (a `datasets.ClassLabel`), together with ``id2label``.

- `load_digits_dataset`: scikit-learn's bundled 8×8 handwritten digits, upsampled. Offline, seconds to build;
  the default data of the training examples and the reference set of the offline FID.
- `load_image_dataset`: a Hub dataset (`datasets.load_dataset(name)`) or a local image folder whose
  sub-folders are the classes.
- `extract_latents`: the VAE posterior of every image, encoded once and cached on disk, as MaskDiT trains on
  ImageNet latents; `sample_latents` draws a fresh latent from it at every step.

Images are turned into tensors by `build_transforms` (PIL and numpy only; torchvision is not needed) and
batched by `make_preprocess` + `collate_fn`:

```python
dataset, id2label = load_digits_dataset(resolution=16)
transform = build_transforms(16, num_channels=1)
dataset = dataset.with_transform(make_preprocess(transform))
loader = torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=True, collate_fn=collate_fn)
batch = next(iter(loader))  # {"pixel_values": (64, 1, 16, 16) in [-1, 1], "class_labels": (64,) long}
```
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch

from .utils.io import commit_dir

DIGITS_ID2LABEL = {i: str(i) for i in range(10)}
DIGITS_SPLITS = ("train", "heldout")

# PIL raises OSError (truncated data, unknown format), SyntaxError (broken PNG chunks), EOFError or
# ValueError for files that are not readable images.
_IMAGE_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError)

# Bump when the layout of the latent cache changes, so old caches are not read as new ones.
_LATENT_CACHE_VERSION = 2  # 2: built from shards, optionally with the flipped images' posteriors
LATENT_COLUMNS = ["latent_mean", "latent_std"]
FLIPPED_LATENT_COLUMNS = ["flipped_latent_mean", "flipped_latent_std"]


# ---------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------


def load_digits_arrays(
    resolution: int = 16, seed: int = 0, holdout_fraction: float = 0.0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The digits of `load_digits_dataset` as numpy arrays, without building a `datasets.Dataset`.

    Returns:
        `dict`: ``{"train": (images, labels)}``, plus ``"heldout"`` when ``holdout_fraction > 0``; ``images`` is
        ``(N, resolution, resolution)`` uint8, ``labels`` ``(N,)`` int64. Same images, order and split as
        `load_digits_dataset` with the same arguments.
    """
    from sklearn.datasets import load_digits

    if resolution < 8:
        raise ValueError(f"resolution must be at least 8 (the digits are 8x8), got {resolution}")
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # (1797, 8, 8)
    labels = digits.target.astype(np.int64)
    images = np.stack(
        [
            np.asarray(PIL.Image.fromarray(p).resize((resolution, resolution), PIL.Image.Resampling.BICUBIC))
            for p in pixels
        ]
    )

    if holdout_fraction == 0.0:
        return {"train": (images, labels)}
    from sklearn.model_selection import train_test_split

    train_idx, heldout_idx = train_test_split(
        np.arange(len(labels)), test_size=holdout_fraction, stratify=labels, random_state=seed
    )
    return {
        name: (images[np.sort(idx)], labels[np.sort(idx)])
        for name, idx in zip(DIGITS_SPLITS, (train_idx, heldout_idx))
    }


def load_digits_dataset(
    resolution: int = 16,
    split: str | None = None,
    seed: int = 0,
    holdout_fraction: float = 0.0,
):
    """scikit-learn's handwritten digits as a `datasets.Dataset` of upsampled grayscale images.

    The 1,797 images of `sklearn.datasets.load_digits` (8×8, values 0..16, classes 0..9) are mapped linearly to
    0..255 (``round(v * 255 / 16)``) and upsampled to ``resolution × resolution`` with PIL's **bicubic**
    filter (values clipped to 0..255), which keeps the strokes smooth rather than blocky. Nothing is
    downloaded: the digits ship inside scikit-learn.

    Args:
        resolution (`int`, defaults to 16): side of the square output images, in pixels (at least 8).
        split (`str`, *optional*): ``"train"`` or ``"heldout"`` to get one part of the split; `None` for all of
            it (a `datasets.DatasetDict` with both parts when ``holdout_fraction > 0``).
        seed (`int`, defaults to 0): seed of the split. The same ``(seed, holdout_fraction)`` always gives the
            same images in the same order.
        holdout_fraction (`float`, defaults to 0.0): share of the images kept out of ``"train"``, stratified by
            class (each digit keeps the same share). Held-out images give an FID floor (real vs real) and the
            digits classifier's accuracy. With 0.0 the whole set is ``"train"``.

    Returns:
        `tuple`: ``(dataset, id2label)``. ``dataset`` is a `datasets.Dataset` (or a `datasets.DatasetDict` with
        ``"train"`` and ``"heldout"``) with columns ``image`` (PIL, mode ``"L"``) and ``label``
        (`datasets.ClassLabel`, names ``"0"`` to ``"9"``); ``id2label`` maps ``0..9`` to ``"0".."9"``.
    """
    import datasets

    if split is not None and split not in DIGITS_SPLITS:
        raise ValueError(f"split must be one of {DIGITS_SPLITS} or None, got {split!r}")
    if split == "heldout" and holdout_fraction == 0.0:
        raise ValueError("split='heldout' needs holdout_fraction > 0")
    arrays = load_digits_arrays(resolution, seed=seed, holdout_fraction=holdout_fraction)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=list(DIGITS_ID2LABEL.values()))}
    )

    def build(images, labels):
        rows = {"image": [PIL.Image.fromarray(image) for image in images], "label": labels.tolist()}
        return datasets.Dataset.from_dict(rows, features=features)

    if split is not None:
        return build(*arrays[split]), dict(DIGITS_ID2LABEL)
    if len(arrays) == 1:
        return build(*arrays["train"]), dict(DIGITS_ID2LABEL)
    return datasets.DatasetDict({name: build(*parts) for name, parts in arrays.items()}), dict(DIGITS_ID2LABEL)


def load_image_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    cache_dir: str | os.PathLike | None = None,
    split: str = "train",
):
    """Load a Hub dataset or a local image folder for training.

    Give exactly one source: ``dataset_name`` (anything `datasets.load_dataset` accepts: a Hub id or a local
    dataset script/folder) or ``train_data_dir`` (an image folder; with one sub-folder per class, e.g.
    ``train_data_dir/cat/001.png``, the sub-folder names become the labels).

    The image and label columns are renamed to ``image`` and ``label``. Images are **not decoded** when loaded:
    the ``image`` column holds ``{"bytes", "path"}`` records (`datasets.Image(decode=False)`) that `open_image`
    and the transforms decode, so a corrupt file fails with a `ValueError` naming it instead of an anonymous PIL
    error deep inside a data loader. Call `verify_images` to check every file before a long run.

    Args:
        dataset_name (`str`, *optional*): Hub dataset id or local dataset path for `datasets.load_dataset`.
        dataset_config_name (`str`, *optional*): the dataset's configuration, if it has several.
        train_data_dir (`str` or `os.PathLike`, *optional*): root of an image folder.
        image_column (`str`, defaults to ``"image"``): column holding the images.
        label_column (`str`, *optional*, defaults to ``"label"``): column holding integer class labels; `None`
            for unconditional data (no ``label`` column in the result).
        cache_dir (`str` or `os.PathLike`, *optional*): `datasets` cache directory.
        split (`str`, defaults to ``"train"``): the split to load.

    Returns:
        `tuple`: ``(dataset, id2label)``; ``id2label`` comes from the label column's `datasets.ClassLabel` names
        (`None` when there is no label column or it is a plain integer column).

    Raises:
        ValueError: if neither or both sources are given, or a requested column is missing (the message lists
            the columns the dataset has).
    """
    import datasets

    if (dataset_name is None) == (train_data_dir is None):
        raise ValueError(
            "Give exactly one of `dataset_name` (a Hub dataset) or `train_data_dir` (a local image folder), got "
            f"dataset_name={dataset_name!r} and train_data_dir={train_data_dir!r}"
        )
    cache_dir = None if cache_dir is None else str(cache_dir)
    if dataset_name is not None:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
    else:
        if not Path(train_data_dir).is_dir():
            raise ValueError(f"train_data_dir {str(train_data_dir)!r} is not a directory")
        dataset = datasets.load_dataset("imagefolder", data_dir=str(train_data_dir), cache_dir=cache_dir, split=split)

    source = dataset_name if dataset_name is not None else str(train_data_dir)
    for role, column in (("image_column", image_column), ("label_column", label_column)):
        if column is not None and column not in dataset.column_names:
            hint = " (pass label_column=None for unconditional data)" if role == "label_column" else ""
            raise ValueError(
                f"{role}={column!r} is not a column of {source!r}; available columns: {dataset.column_names}{hint}"
            )
    if not isinstance(dataset.features[image_column], datasets.Image):
        raise ValueError(
            f"image_column={image_column!r} of {source!r} is not an image column (its feature is "
            f"{dataset.features[image_column]}); available columns: {dataset.column_names}"
        )

    keep = [image_column] + ([label_column] if label_column is not None else [])
    dataset = dataset.select_columns(keep)
    renames = {image_column: "image", label_column: "label"}
    dataset = dataset.rename_columns({old: new for old, new in renames.items() if old in keep and old != new})
    dataset = dataset.cast_column("image", datasets.Image(decode=False))

    id2label = None
    if label_column is not None and isinstance(dataset.features["label"], datasets.ClassLabel):
        id2label = dict(enumerate(dataset.features["label"].names))
    return dataset, id2label


def open_image(value: PIL.Image.Image | Mapping[str, Any] | str) -> PIL.Image.Image:
    """Decode one image: a PIL image (returned as is), a ``{"bytes", "path"}`` record or a file path.

    Raises:
        ValueError: naming the file (or saying it came from in-memory bytes) if it is not a readable image.
    """
    import datasets

    if isinstance(value, PIL.Image.Image):
        return value
    if isinstance(value, (str, os.PathLike)):
        value = {"path": str(value), "bytes": None}
    try:
        return datasets.Image().decode_example(dict(value))
    except _IMAGE_DECODE_ERRORS as err:
        where = value.get("path") or "<image bytes without a path>"
        raise ValueError(f"Could not decode image {where!r}: {err}") from err


def verify_images(dataset_or_data_dir, image_column: str = "image", max_reported: int = 20) -> int:
    """Fully decode every image once and report all that fail, before training starts.

    Args:
        dataset_or_data_dir: a `datasets.Dataset` (its ``image_column`` decoded or not) or the root of an image
            folder (loaded as `load_image_dataset(train_data_dir=...)` does).
        image_column (`str`, defaults to ``"image"``): the column to check.
        max_reported (`int`, defaults to 20): how many bad files the error message lists.

    Returns:
        `int`: the number of images checked.

    Raises:
        ValueError: listing the unreadable files and why.
    """
    import datasets

    if isinstance(dataset_or_data_dir, (str, os.PathLike)):
        dataset, _ = load_image_dataset(train_data_dir=dataset_or_data_dir, label_column=None)
    else:
        dataset = dataset_or_data_dir.select_columns([image_column])
        dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    failures = []
    for row in dataset:
        try:
            open_image(row[image_column])
        except ValueError as err:
            failures.append(str(err))
    if failures:
        listed = "\n  ".join(failures[:max_reported])
        more = f"\n  ... and {len(failures) - max_reported} more" if len(failures) > max_reported else ""
        raise ValueError(f"{len(failures)} of {len(dataset)} images could not be decoded:\n  {listed}{more}")
    return len(dataset)


# ---------------------------------------------------------------------------------------------------------
# Transforms and batching
# ---------------------------------------------------------------------------------------------------------


class ImageTransform:
    """Image → ``(C, resolution, resolution)`` float tensor in [-1, 1]; built by `build_transforms`.

    Steps: decode (`open_image`), convert to grayscale (``num_channels=1``) or RGB (``num_channels=3``), resize
    so the shorter side is ``resolution`` (bicubic), crop the centre (or a random square when
    ``center_crop=False``), flip left-right with probability 1/2 when ``random_flip``, scale 0..255 → [-1, 1].
    Randomness comes from torch's global generator, so `accelerate.utils.set_seed` makes it reproducible.
    """

    def __init__(self, resolution: int, center_crop: bool = True, random_flip: bool = False, num_channels: int = 3):
        if resolution < 1:
            raise ValueError(f"resolution must be positive, got {resolution}")
        if num_channels not in (1, 3):
            raise ValueError(f"num_channels must be 1 (grayscale) or 3 (RGB), got {num_channels}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.num_channels = num_channels

    @property
    def config(self) -> dict[str, Any]:
        """Everything that determines the output; part of the latent cache key."""
        return {
            "resolution": self.resolution,
            "center_crop": self.center_crop,
            "random_flip": self.random_flip,
            "num_channels": self.num_channels,
        }

    @property
    def is_deterministic(self) -> bool:
        return self.center_crop and not self.random_flip

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config.items())
        return f"{type(self).__name__}({args})"

    def __call__(self, image) -> torch.Tensor:
        image = open_image(image).convert("L" if self.num_channels == 1 else "RGB")
        size = self.resolution
        width, height = image.size
        scale = size / min(width, height)
        new_size = (max(size, round(width * scale)), max(size, round(height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, PIL.Image.Resampling.BICUBIC)
        width, height = image.size
        if self.center_crop:
            left, top = (width - size) // 2, (height - size) // 2
        else:
            left = int(torch.randint(0, width - size + 1, ()))
            top = int(torch.randint(0, height - size + 1, ()))
        image = image.crop((left, top, left + size, top + size))
        if self.random_flip and bool(torch.rand(()) < 0.5):
            image = image.transpose(PIL.Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        if array.ndim == 2:
            array = array[None]  # (1, H, W)
        else:
            array = array.transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
        return torch.from_numpy(np.ascontiguousarray(array))


def build_transforms(
    resolution: int, center_crop: bool = True, random_flip: bool = False, num_channels: int = 3
) -> ImageTransform:
    """The training image transform: resize (bicubic), crop, optional flip, to a [-1, 1] tensor.

    Args:
        resolution (`int`): output side in pixels.
        center_crop (`bool`, defaults to `True`): crop the centre; `False` crops a random square.
        random_flip (`bool`, defaults to `False`): flip left-right with probability 1/2.
        num_channels (`int`, defaults to 3): 3 for RGB, 1 for grayscale (the digits in pixel space).

    Returns:
        `ImageTransform`: callable on a PIL image or an undecoded ``{"bytes", "path"}`` record, returning a
        ``(num_channels, resolution, resolution)`` float32 tensor in [-1, 1].
    """
    return ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip, num_channels=num_channels)


def make_preprocess(
    transform: Callable[[Any], torch.Tensor], image_column: str = "image", label_column: str | None = "label"
) -> Callable[[dict[str, list]], dict[str, list]]:
    """A function for `datasets.Dataset.with_transform` that turns a batch of rows into model inputs.

    The returned function maps ``{image_column: [...], label_column: [...]}`` to ``{"pixel_values": [tensor,
    ...], "class_labels": [int, ...]}`` (``class_labels`` only when the label column is present); `collate_fn`
    stacks the rows the `DataLoader` draws into batch tensors.
    """

    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        out = {"pixel_values": [transform(image) for image in batch[image_column]]}
        if label_column is not None and label_column in batch:
            out["class_labels"] = [int(label) for label in batch[label_column]]
        return out

    return preprocess


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows from `make_preprocess` into ``{"pixel_values": (B, C, H, W) float, "class_labels": (B,) long}``."""
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous().float()}
    if "class_labels" in examples[0]:
        batch["class_labels"] = torch.tensor([int(e["class_labels"]) for e in examples], dtype=torch.long)
    return batch


def latent_collate_fn(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows of `extract_latents`' cache into ``{"latent_mean", "latent_std": (B, C, h, w),
    "class_labels": (B,) long}`` (labels only when the rows have them; ``flipped_latent_mean`` and
    ``flipped_latent_std`` too when the cache holds the flipped images' posteriors), for `sample_latents`."""
    keys = [key for key in LATENT_COLUMNS + FLIPPED_LATENT_COLUMNS if key in rows[0]]
    batch = {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in keys}
    if "label" in rows[0]:
        batch["class_labels"] = torch.tensor([int(row["label"]) for row in rows], dtype=torch.long)
    return batch


# ---------------------------------------------------------------------------------------------------------
# Latent pre-extraction
# ---------------------------------------------------------------------------------------------------------


def _weights_fingerprint(module: torch.nn.Module) -> str:
    hasher = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().to("cpu").contiguous()
        hasher.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        hasher.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return hasher.hexdigest()


def latent_cache_key(dataset, vae, transform, xflip: bool = False) -> str:
    """The key under which `extract_latents` caches ``dataset`` encoded by ``vae`` after ``transform``.

    A hash of: the VAE config (without private ``_``-prefixed entries such as the path it was loaded from), a
    hash of the VAE weights, the transform's ``config``, whether the flipped images are encoded too (``xflip``) and
    the dataset's `datasets` fingerprint (which changes with its files, split and every processing step applied to
    it).
    """
    if not isinstance(getattr(transform, "config", None), Mapping):
        raise TypeError(
            "extract_latents needs a transform with a `config` mapping (as returned by `build_transforms`) so the "
            f"cache can be keyed on it; got {transform!r}"
        )
    vae_config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    payload = {
        "version": _LATENT_CACHE_VERSION,
        "vae_class": type(vae).__name__,
        "vae_config": vae_config,
        "vae_weights": _weights_fingerprint(vae),
        "transform": dict(transform.config),
        "xflip": bool(xflip),
        "dataset": dataset._fingerprint,  # datasets' own content+history hash; there is no public accessor
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


class _TransformBatch:
    """A `DataLoader` collate function (picklable, for worker processes): decode and transform a batch of rows."""

    def __init__(self, transform, image_column: str, label_column: str | None):
        self.transform, self.image_column, self.label_column = transform, image_column, label_column

    def __call__(self, rows):
        pixels = torch.stack([self.transform(row[self.image_column]) for row in rows])
        labels = [row[self.label_column] for row in rows] if self.label_column is not None else None
        return pixels, labels


def extract_latents(
    dataset,
    vae,
    transform: ImageTransform,
    cache_dir: str | os.PathLike,
    batch_size: int = 32,
    device: str | torch.device | None = None,
    image_column: str = "image",
    label_column: str | None = "label",
    xflip: bool = False,
    num_workers: int = 0,
    shard_size: int = 4096,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] | None = None,
):
    """Encode every image with the VAE once and cache the posterior on disk (MaskDiT's latent pre-extraction).

    Each image is transformed, encoded with ``vae.encode(x).latent_dist`` and its diagonal Gaussian posterior is
    stored as ``latent_mean`` and ``latent_std`` (float32, ``(latent_channels, h, w)``), so that every training
    step can draw a fresh latent with `sample_latents` instead of freezing one draw. With ``xflip`` the
    left-right flipped image is encoded too, into ``flipped_latent_mean`` and ``flipped_latent_std`` (the official
    extractor's ``--xflip``), so that `sample_latents` can keep flip augmentation.

    The dataset is cut into shards of ``shard_size`` rows; with several processes each encodes its share of them
    (shard ``i`` goes to process ``i mod num_processes``), each written to disk under a temporary name and renamed
    when complete. Once every shard is done the main process merges them, in order, into one `datasets` folder,
    ``cache_dir/latents-<key>`` with `latent_cache_key` (VAE config + weights, transform, ``xflip``, dataset
    fingerprint). A later call with the same inputs loads that folder and encodes nothing; an interrupted one
    leaves its finished shards, and the next call encodes only the others.

    Args:
        dataset (`datasets.Dataset`): rows with an image column and optionally a label column.
        vae (`diffusers.AutoencoderKL` or any model whose ``encode(x).latent_dist`` has ``mean`` and ``std``):
            the encoder; it is put in eval mode and moved to ``device``.
        transform (`ImageTransform`): a deterministic transform from `build_transforms` (centre crop, no flip):
            cached latents would otherwise freeze one random crop or flip for the whole run; use ``xflip`` instead.
        cache_dir (`str` or `os.PathLike`): where cache folders live.
        batch_size (`int`, defaults to 32): images per `vae.encode` call.
        device (`str` or `torch.device`, *optional*): where to encode; defaults to the VAE's device.
        image_column (`str`, defaults to ``"image"``), label_column (`str`, *optional*): the columns to read;
            the label column, when the dataset has it, is copied with its feature (e.g. `datasets.ClassLabel`)
            as ``label``.
        xflip (`bool`, defaults to `False`): also store the posteriors of the flipped images.
        num_workers (`int`, defaults to 0): `DataLoader` worker processes decoding and transforming images.
        shard_size (`int`, defaults to 4096): rows per shard, the unit of work that an interrupted run keeps.
        process_index (`int`, defaults to 0), num_processes (`int`, defaults to 1): this process and how many
            share the work; every one of them must call this function.
        wait_for_everyone (`Callable`, *optional*): a barrier over those processes (e.g.
            `accelerator.wait_for_everyone`); required when ``num_processes > 1``.

    Returns:
        `datasets.Dataset`: columns ``latent_mean``, ``latent_std`` (and the flipped pair with ``xflip``) and
        ``label`` (if any), in torch format.
    """
    import datasets
    from tqdm.auto import tqdm

    if not getattr(transform, "is_deterministic", False):
        raise ValueError(
            f"extract_latents needs a deterministic transform (center_crop=True, random_flip=False), got {transform!r}"
            "; for flip augmentation pass xflip=True"
        )
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, num_processes={num_processes}), got {process_index}")
    if num_processes > 1 and wait_for_everyone is None:
        raise ValueError("extract_latents with num_processes > 1 needs wait_for_everyone (a barrier)")
    barrier = wait_for_everyone or (lambda: None)
    if label_column is not None and label_column not in dataset.column_names:
        label_column = None
    cache_dir = Path(cache_dir)
    final_dir = cache_dir / f"latents-{latent_cache_key(dataset, vae, transform, xflip)}"
    if final_dir.is_dir():
        return datasets.load_from_disk(str(final_dir)).with_format("torch")
    if len(dataset) == 0:
        raise ValueError("extract_latents got an empty dataset")

    device = torch.device(device) if device is not None else vae.device
    vae.eval().to(device)
    source = dataset.with_format(None).select_columns([image_column] + ([label_column] if label_column else []))
    source = source.cast_column(image_column, datasets.Image(decode=False))
    shard_dir = cache_dir / f".{final_dir.name}-shards"
    num_shards = math.ceil(len(source) / shard_size)
    shard_paths = [shard_dir / f"shard-{index:05d}-of-{num_shards:05d}" for index in range(num_shards)]
    mine = [index for index in range(process_index, num_shards, num_processes) if not shard_paths[index].is_dir()]
    shard_dir.mkdir(parents=True, exist_ok=True)
    progress = tqdm(
        total=sum(min(shard_size, len(source) - index * shard_size) for index in mine),
        desc="latent extraction" + (f" (process {process_index} of {num_processes})" if num_processes > 1 else ""),
        unit="img",
        disable=process_index != 0,
    )
    label_feature = dataset.features[label_column] if label_column is not None else None
    try:
        for index in mine:
            rows = source.select(range(index * shard_size, min((index + 1) * shard_size, len(source))))
            loader = torch.utils.data.DataLoader(
                rows,
                batch_size=batch_size,
                num_workers=num_workers,
                collate_fn=_TransformBatch(transform, image_column, label_column),
            )
            _write_latent_shard(loader, vae, device, xflip, label_feature, shard_paths[index], progress)
    except BaseException:
        if not any(shard_dir.iterdir()):
            shard_dir.rmdir()  # nothing finished to resume from
        raise
    finally:
        progress.close()

    barrier()
    if process_index == 0 and not final_dir.is_dir():
        merged = datasets.concatenate_datasets([datasets.load_from_disk(str(path)) for path in shard_paths])
        work_dir = Path(tempfile.mkdtemp(prefix=f".{final_dir.name}-", dir=cache_dir))
        try:
            merged.save_to_disk(str(work_dir / "dataset"))
            del merged  # release the memory maps of the shards before deleting them
            # A concurrent run that finished first is fine: its folder is kept.
            commit_dir(work_dir / "dataset", final_dir, durable=False)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
        shutil.rmtree(shard_dir, ignore_errors=True)
    barrier()
    return datasets.load_from_disk(str(final_dir)).with_format("torch")


def _write_latent_shard(loader, vae, device, xflip: bool, label_feature, path: Path, progress) -> None:
    """Encode one shard's batches and save them at ``path``, written under a temporary name and renamed."""
    import datasets

    def encode(pixels):
        with torch.no_grad():
            posterior = vae.encode(pixels.to(device, vae.dtype)).latent_dist
        return posterior.mean.float().cpu().numpy(), posterior.std.float().cpu().numpy()

    def encoded_batches():
        for pixels, labels in loader:
            columns = dict(zip(LATENT_COLUMNS, encode(pixels)))
            if xflip:
                columns.update(zip(FLIPPED_LATENT_COLUMNS, encode(pixels.flip(-1))))
            if labels is not None:
                columns["label"] = labels
            progress.update(len(pixels))
            yield columns

    # The first batch is encoded up front: its shape fixes the Array3D features the writer needs.
    batches = encoded_batches()
    first = next(batches)
    latent = datasets.Array3D(shape=first["latent_mean"].shape[1:], dtype="float32")
    names = LATENT_COLUMNS + (FLIPPED_LATENT_COLUMNS if xflip else [])
    features = {name: latent for name in names}
    if label_feature is not None:
        features["label"] = label_feature
    failures = []

    def rows():
        try:
            for columns in itertools.chain([first], batches):
                for i in range(len(columns["latent_mean"])):
                    yield {name: values[i] for name, values in columns.items()}
        except Exception as err:  # datasets would wrap it in a DatasetGenerationError that hides the cause
            failures.append(err)

    work_dir = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        shard = datasets.Dataset.from_generator(
            rows, features=datasets.Features(features), cache_dir=str(work_dir / "build"), fingerprint=path.name
        )
        if failures:
            raise failures[0]
        shard.save_to_disk(str(work_dir / "dataset"))
        del shard  # release the memory map of the build files before deleting them
        commit_dir(work_dir / "dataset", path, durable=False)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def sample_latents(
    batch: Mapping[str, torch.Tensor], scaling_factor: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Draw ``z = (mean + std · ε) · scaling_factor``, ε ~ N(0, I), from cached posteriors.

    MaskDiT samples a new latent from each image's posterior at every step instead of reusing one draw; this is
    the same reparameterised sample `diffusers.models.autoencoders.vae.DiagonalGaussianDistribution.sample`
    takes, scaled by the VAE's ``scaling_factor`` as diffusers' latent-space pipelines expect.

    With the flipped images' posteriors in the batch (``flipped_latent_mean``, ``flipped_latent_std``, from
    ``extract_latents(..., xflip=True)``), each sample is drawn from its flipped image's posterior with probability
    1/2: random flips, as the pixel-space transform makes them, at every step.

    Args:
        batch: a mapping with ``latent_mean`` and ``latent_std`` tensors of the same shape, e.g. ``(B, C, h, w)``,
            and optionally the flipped pair.
        scaling_factor (`float`): ``vae.config.scaling_factor``.
        generator (`torch.Generator`, *optional*): source of ε (``torch.randn(mean.shape)``) and then, with the
            flipped pair, of the flips (``torch.rand(B) < 0.5`` takes the flipped image).

    Returns:
        `torch.Tensor`: the scaled latents, shape and dtype of ``latent_mean``.
    """
    mean, std = batch["latent_mean"], batch["latent_std"]
    if mean.shape != std.shape:
        raise ValueError(f"latent_mean and latent_std must have the same shape, got {mean.shape} and {std.shape}")
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    if "flipped_latent_mean" in batch:
        rand_device = generator.device if generator is not None else mean.device
        flip = (torch.rand(mean.shape[0], generator=generator, device=rand_device) < 0.5).to(mean.device)
        flip = flip.view(-1, *([1] * (mean.ndim - 1)))
        mean = torch.where(flip, batch["flipped_latent_mean"], mean)
        std = torch.where(flip, batch["flipped_latent_std"], std)
    return (mean + std * eps) * scaling_factor
