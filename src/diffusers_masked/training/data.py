"""The training set of a run: a Hub dataset, an image folder or the built-in digits, checked (labels, images) before
any training, optionally as cached VAE posteriors for latent-space training.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from numbers import Integral
from typing import Any

import torch

from ..data import (
    build_transforms,
    collate_fn,
    extract_latents,
    latent_collate_fn,
    load_digits_arrays,
    load_digits_dataset,
    load_image_dataset,
    make_preprocess,
    sample_latents,
    verify_images,
)
from ..data.captions import caption_table, digit_captions
from ..utils.safe_loading import check_model_folder


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
        captions (`list[str]`, *optional*): captioned data's distinct captions, the empty prompt first; each row's
            ``caption_ids`` index them (`diffusers_masked.data.captions.caption_table`).
    """

    dataset: Any
    id2label: dict | None
    collate_fn: Callable
    in_channels: int
    sample_size: int
    num_classes: int
    vae: Any = None
    captions: list[str] | None = None

    def clean_samples(self, batch: dict, generator: torch.Generator | None, device) -> torch.Tensor:
        """A batch's clean samples on `device`: its pixels, or latents drawn from its cached posteriors
        (`sample_latents`, from `generator`)."""
        if self.vae is None:
            return batch["pixel_values"].to(device)
        batch = {name: value.to(device) for name, value in batch.items()}
        return sample_latents(batch, self.vae.config.scaling_factor, generator=generator)


def check_labels(dataset, id2label: dict | None, num_classes: int | None) -> int:
    """The class count to train with: `num_classes`, or the data's (its label names, else its largest label + 1).

    The label ``num_classes`` is the null class of classifier-free guidance, so a real label there (or above) would
    be trained as "no class": refused.

    ``num_classes=0`` asks for an unconditional model: any labels are ignored.

    Raises:
        ValueError: if the data has no labels, a label is missing (`None`) or not an integer (a string, a float), a
            label is negative, or one is >= `num_classes`.
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
    bad = next(((i, label) for i, label in enumerate(labels) if not isinstance(label, Integral)), None)
    if bad is not None:
        index, label = bad
        what = "missing (None)" if label is None else f"{label!r}, a {type(label).__name__}"
        raise ValueError(
            f"the label of example {index} is {what}; class labels must be integers 0 .. num_classes - 1 (a "
            "`datasets.ClassLabel` column gives them). Pass --label_column naming a column of integer class labels, "
            "or --num_classes 0 to train an unconditional model"
        )
    low, high = min(labels), max(labels)
    if low < 0:
        raise ValueError(
            f"the data has a negative label ({low}; a `datasets.ClassLabel` marks a missing label with -1); labels "
            "must be 0 .. num_classes - 1"
        )
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
    caption_column: str | None = None,
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
        vae (`str`, *optional*): `AutoencoderKL` path or Hub id; enables latent space. A local folder is checked
            before any data is read: it must exist and its ``config.json`` must name an ``AutoencoderKL``.
        vae_subfolder (`str`, *optional*): e.g. ``"vae"`` inside a pipeline repo.
        latent_cache_dir (`str` or `os.PathLike`, *optional*): where the latents are cached; required with `vae`.
        latent_batch_size (`int`, defaults to 32): batch size of the extraction.
        num_classes (`int`, *optional*): the model's classes; checked against the labels before any image is
            decoded (`check_labels`). Defaults to the data's; 0 trains unconditionally: no labels are read
            (`label_column` is ignored, the digits' are dropped).
        num_workers (`int`, defaults to 0): `DataLoader` workers of the latent extraction.
        caption_column (`str`, *optional*): captioned data: the column of captions (`load_image_dataset`); on the
            built-in digits any value gives their generated captions (`digit_captions`). The rows get
            ``caption_ids`` into `TrainingData.captions`.
    """
    builtin_digits = dataset_name is None and train_data_dir is None
    if vae:
        if builtin_digits:
            raise ValueError("a VAE needs image data (a dataset or an image folder); the built-in digits are pixels")
        if random_crop:
            raise ValueError(
                "random crops cannot be used with a VAE: latents are extracted once (flips can: --random_flip)"
            )
        if latent_cache_dir is None:
            raise ValueError("latent_cache_dir is required with a VAE")
        check_model_folder(vae, "AutoencoderKL", vae_subfolder, name="--vae", subfolder_name="--vae_subfolder")
    if builtin_digits:
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
            caption_column=caption_column,
        )
        num_channels = 3
    if max_train_samples is not None:
        dataset = dataset.select(range(min(max_train_samples, len(dataset))))
    num_classes = check_labels(dataset, id2label, num_classes)
    captions = caption_ids = None
    if caption_column is not None:
        if builtin_digits:
            images, labels = load_digits_arrays(resolution, seed=0, holdout_fraction=0.2)["train"]
            rows = digit_captions(images[: len(dataset)], labels[: len(dataset)])
        else:
            rows = dataset["caption"]
            dataset = dataset.remove_columns("caption")
        captions, caption_ids = caption_table(rows)
    if not builtin_digits and verify:
        with accelerator.main_process_first():
            verify_images(dataset)

    transform = build_transforms(
        resolution, center_crop=not random_crop, random_flip=random_flip, num_channels=num_channels
    )
    if not vae:
        if caption_ids is not None:
            dataset = dataset.add_column("caption_ids", caption_ids)
        dataset = dataset.with_transform(make_preprocess(transform))
        return TrainingData(dataset, id2label, collate_fn, num_channels, resolution, num_classes, captions=captions)

    from diffusers import AutoencoderKL

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
    if caption_ids is not None:  # the latent rows are the image rows, in order
        dataset = dataset.with_format(None).add_column("caption_ids", caption_ids).with_format("torch")
    downsampling = 2 ** (len(autoencoder.config.block_out_channels) - 1)
    return TrainingData(
        dataset,
        id2label,
        latent_collate_fn,
        autoencoder.config.latent_channels,
        resolution // downsampling,
        num_classes,
        autoencoder,
        captions=captions,
    )
