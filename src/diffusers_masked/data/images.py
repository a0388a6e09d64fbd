"""Images: decoding every file the same way (8-bit, 16-bit scaled by its range, deeper refused by path), checking a
whole set before training, and turning images into the ``[-1, 1]`` tensors the models train on (PIL and numpy only;
torchvision is not needed)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import PIL.Image
import torch

# PIL raises OSError (truncated data, unknown format), SyntaxError (broken PNG chunks), EOFError or
# ValueError for files that are not readable images.
_IMAGE_DECODE_ERRORS = (OSError, SyntaxError, EOFError, ValueError)


# PIL modes whose samples are 8-bit (or 1-bit): PIL converts them to "L" and "RGB" as they are.
_8_BIT_MODES = ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "HSV")


# 16-bit unsigned samples in PIL's byte orders. PIL's own conversion to "L" clips them at 255 (an all-white image), so
# they are scaled by 255 / 65535 here.
_16_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_8_bit(image: PIL.Image.Image, where: str) -> PIL.Image.Image:
    """The image with 8-bit samples that the transforms read: as it is, or 16-bit gray scaled to "L".

    A 16-bit mode (``I;16`` and its byte orders) is scaled by its range, ``round(v * 255 / 65535)``. Mode ``I`` (32-bit
    signed integers) holds 16-bit data only in a PNG, which has no deeper gray (Pillow before 10.3 opens 16-bit gray
    PNGs as ``I``), and is scaled the same way there; elsewhere (a TIFF, a PGM, an image in memory) its range is
    unknown, as is that of ``F`` (32-bit floats): they are refused rather than guessed.
    """
    if image.mode in _8_BIT_MODES:
        return image
    if image.mode in _16_BIT_MODES or (image.mode == "I" and image.format == "PNG"):
        samples = np.asarray(image).astype(np.uint32)
        return PIL.Image.fromarray(((samples * 255 + 32767) // 65535).astype(np.uint8))
    if image.mode in ("I", "F"):
        what = "32-bit integer" if image.mode == "I" else "32-bit float"
        reason = f"{what} samples (PIL mode {image.mode!r}) whose range is unknown"
    else:
        reason = f"PIL mode {image.mode!r}, which is not converted to grayscale or RGB here"
    raise ValueError(f"image {where!r} has {reason}; save it as an 8-bit (or 16-bit PNG) grayscale or RGB image")


def open_image(value: PIL.Image.Image | Mapping[str, Any] | str) -> PIL.Image.Image:
    """Decode one image: a PIL image, a ``{"bytes", "path"}`` record or a file path, as 8-bit samples.

    16-bit images are scaled to 8 bits by their range; 32-bit ones (PIL modes ``I`` outside a PNG, and ``F``) and modes
    PIL cannot convert to RGB are refused (see `_to_8_bit`).

    Raises:
        ValueError: naming the file (or saying it came from in-memory bytes) if it is not a readable image, or its mode
            cannot be converted.
    """
    if isinstance(value, PIL.Image.Image):
        return _to_8_bit(value, getattr(value, "filename", None) or "<image in memory>")
    import datasets

    if isinstance(value, (str, os.PathLike)):
        value = {"path": str(value), "bytes": None}
    where = value.get("path") or "<image bytes without a path>"
    try:
        image = datasets.Image().decode_example(dict(value))
    except _IMAGE_DECODE_ERRORS as err:
        raise ValueError(f"Could not decode image {where!r}: {err}") from err
    return _to_8_bit(image, where)


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
        if "caption_ids" in batch:
            out["caption_ids"] = batch["caption_ids"]
        return out

    return preprocess


def collate_fn(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """Stack rows from `make_preprocess` into ``{"pixel_values": (B, C, H, W) float, "class_labels": (B,) long}``
    (and ``"caption_ids": (B, K)`` long, padded with -1, for captioned data)."""
    batch = {"pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous().float()}
    if "class_labels" in examples[0]:
        batch["class_labels"] = torch.tensor([int(e["class_labels"]) for e in examples], dtype=torch.long)
    if "caption_ids" in examples[0]:
        batch["caption_ids"] = pad_ids([e["caption_ids"] for e in examples])
    return batch


def pad_ids(rows) -> torch.Tensor:
    """Rows of ids (caption ids, several per image) as one ``(N, K)`` long tensor, padded with -1."""
    rows = [torch.as_tensor(row, dtype=torch.long).reshape(-1) for row in rows]
    out = torch.full((len(rows), max(len(row) for row in rows)), -1, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = row
    return out
