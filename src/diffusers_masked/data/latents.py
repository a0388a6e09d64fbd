"""Latent-space training data: every image's VAE posterior encoded once and cached on disk (resumably, shard by
shard, each process its share), and a fresh latent drawn from it at every step, as MaskDiT trains on ImageNet
latents."""

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

import torch

from ..utils.io import commit_dir, save_dataset
from .images import ImageTransform, pad_ids

# Bump when the layout of the latent cache changes, so old caches are not read as new ones.
_LATENT_CACHE_VERSION = 2  # 2: built from shards, optionally with the flipped images' posteriors


LATENT_COLUMNS = ["latent_mean", "latent_std"]


FLIPPED_LATENT_COLUMNS = ["flipped_latent_mean", "flipped_latent_std"]


def latent_collate_fn(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows of `extract_latents`' cache into ``{"latent_mean", "latent_std": (B, C, h, w),
    "class_labels": (B,) long}`` (labels only when the rows have them; ``flipped_latent_mean`` and
    ``flipped_latent_std`` too when the cache holds the flipped images' posteriors), for `sample_latents`."""
    keys = [key for key in LATENT_COLUMNS + FLIPPED_LATENT_COLUMNS if key in rows[0]]
    batch = {key: torch.stack([torch.as_tensor(row[key]) for row in rows]) for key in keys}
    if "label" in rows[0]:
        batch["class_labels"] = torch.tensor([int(row["label"]) for row in rows], dtype=torch.long)
    if "caption_ids" in rows[0]:
        batch["caption_ids"] = pad_ids([row["caption_ids"] for row in rows])
    return batch


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
        return _load_latent_cache(final_dir).with_format("torch")
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
        # A concurrent run that finished first is fine: its folder is kept. The merged dataset, which maps the
        # shards, is released when save_dataset returns, before the shards are deleted.
        save_dataset(datasets.concatenate_datasets([_load_latent_cache(p) for p in shard_paths]), final_dir, cache_dir)
        shutil.rmtree(shard_dir, ignore_errors=True)
    barrier()
    return _load_latent_cache(final_dir).with_format("torch")


def _load_latent_cache(path: Path):
    """A finished latent cache folder (or shard) as a `datasets.Dataset`.

    Raises:
        ValueError: naming the folder and saying to delete it, if `datasets` cannot load it (a file deleted, truncated
            or overwritten since it was written).
    """
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:  # a damaged folder fails in many ways (missing file, bad JSON, bad Arrow data)
        raise ValueError(
            f"the latent cache {path} cannot be loaded ({type(err).__name__}: {err}); delete that folder and run "
            "again to extract the latents anew"
        ) from err


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
