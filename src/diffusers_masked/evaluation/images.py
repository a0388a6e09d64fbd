"""Images in, float batches out: what every evaluation reads.

All evaluation code works on float tensors ``(B, C, H, W)`` with values in [0, 1] and ``C`` 1 (gray) or 3 (RGB),
i.e. what a pipeline returns with ``output_type="pt"``. This module converts pipeline outputs to that form
(`images_to_tensor`) and streams large sets from disk: a sample ``.npz`` in ADM's reference-batch layout (``arr_0``:
uint8 ``(N, H, W, C)``) is read in batches without loading the whole array, and a folder of images file by file
(`image_batches`).
"""

from __future__ import annotations

import os
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F

from ..data import ImageTransform, open_image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

# What reading a truncated or overwritten .npz raises: no zip directory, a bad CRC, a bad deflate stream, a short read.
_NPZ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)


def images_to_tensor(images: torch.Tensor | np.ndarray | Iterable[PIL.Image.Image]) -> torch.Tensor:
    """Pipeline outputs → float32 ``(B, C, H, W)`` tensor in [0, 1], on the CPU.

    Accepts a ``(B, C, H, W)`` tensor (``output_type="pt"``), a ``(B, H, W, C)`` array (``output_type="np"``,
    values in [0, 1]) or a list of PIL images (``output_type="pil"``, mode ``"L"`` or ``"RGB"``).
    """
    if isinstance(images, torch.Tensor):
        return images.detach().float().cpu()
    if isinstance(images, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    arrays = []
    for image in images:
        array = np.asarray(open_image(image), dtype=np.float32) / 255.0
        arrays.append(array[..., None] if array.ndim == 2 else array)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _check_images(images: torch.Tensor, name: str) -> torch.Tensor:
    """Validate a ``(B, C, H, W)`` batch and return it as float32 in [0, 1] (uint8 is rescaled)."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a (batch, 1 or 3, height, width) tensor, got {shape}")
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    images = images.float()
    low, high = float(images.min()), float(images.max())
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"{name} must have values in [0, 1] (got [{low:.3f}, {high:.3f}]); map [-1, 1] images with (x + 1) / 2"
        )
    return images.clamp(0, 1)


def _to_gray(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """``(B, 1|3, H, W)`` in [0, 1] → ``(B, 1, resolution, resolution)`` gray (ITU-R 601 luma)."""
    if images.shape[1] == 3:
        luma = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images * luma).sum(dim=1, keepdim=True)
    if images.shape[-2:] != (resolution, resolution):
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
    return images


def _damaged_npz(path: str | os.PathLike, err: Exception) -> str:
    """The message for an ``.npz`` that cannot be read: one line naming the file."""
    return f"{path} is not a readable .npz file: truncated or damaged ({type(err).__name__}: {err}); write it again"


def _read_npy_header(f, path: Path, key: str) -> tuple[tuple, bool, np.dtype]:
    try:
        version = np.lib.format.read_magic(f)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return read_header(f)
    except (*_NPZ_ERRORS, ValueError) as err:  # numpy says ValueError for a header cut short
        raise ValueError(_damaged_npz(f"{path}[{key!r}]", err)) from err


def _npz_uint8_batches(path: Path, key: str, batch_size: int) -> Iterator[np.ndarray]:
    """Batches of the uint8 array `key` of an ``.npz`` (compressed or not), read without loading all of it.

    Raises:
        ValueError: naming the file, if it is truncated or damaged, has no `key`, holds no images or other arrays.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            member = f"{key}.npy"
            if member not in archive.namelist():
                keys = sorted(n[: -len(".npy")] for n in archive.namelist() if n.endswith(".npy"))
                raise ValueError(f"{path} has no {key!r} array (it has {keys})")
            with archive.open(member) as f:
                shape, fortran_order, dtype = _read_npy_header(f, path, key)
                if dtype != np.uint8 or len(shape) != 4 or shape[-1] not in (1, 3) or fortran_order:
                    raise ValueError(
                        f"{path}[{key!r}] must be uint8 images (N, H, W, 1 or 3) as ADM's reference batches are, got "
                        f"{dtype} {shape}"
                    )
                if shape[0] == 0:
                    raise ValueError(f"{path}[{key!r}] holds no images (its shape is {shape})")
                per_image = int(np.prod(shape[1:]))
                for start in range(0, shape[0], batch_size):
                    count = min(batch_size, shape[0] - start)
                    data = f.read(count * per_image)
                    if len(data) != count * per_image:
                        raise EOFError(f"{key}.npy ends after {start * per_image + len(data)} of its bytes")
                    yield np.frombuffer(data, dtype=np.uint8).reshape(count, *shape[1:])
    except _NPZ_ERRORS as err:
        raise ValueError(_damaged_npz(path, err)) from err


def npz_image_count(path: str | os.PathLike, key: str = "arr_0") -> int:
    """The number of images in ``path[key]`` (read from the array header only)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as f:
            return int(_read_npy_header(f, Path(path), key)[0][0])
    except _NPZ_ERRORS as err:
        raise ValueError(_damaged_npz(path, err)) from err


def _image_files(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def _load_image(path: Path, resolution: int | None, num_channels: int | None) -> np.ndarray:
    """One image file as uint8 ``(H, W, C)``; center-cropped and resized to ``resolution`` when given.

    Decoded as the training data is (`open_image`: 16-bit images scaled to 8 bits, 32-bit ones refused by name).
    """
    image = open_image(path)
    channels = num_channels or (1 if image.mode in ("1", "L") else 3)
    if resolution is not None:
        # ImageTransform is the crop of the training data; its [-1, 1] floats map back to the exact uint8 values.
        array = ImageTransform(resolution, num_channels=channels)(image).permute(1, 2, 0).numpy()
        return np.round((array + 1) * 127.5).astype(np.uint8)
    if channels == 1:
        return np.asarray(image.convert("L"))[..., None]
    return np.asarray(image.convert("RGB"))


def image_batches(
    source: str | os.PathLike | torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 250,
    resolution: int | None = None,
    num_channels: int | None = None,
) -> Iterator[torch.Tensor]:
    """Stream images as float ``(B, C, H, W)`` batches in [0, 1].

    Args:
        source: an ``.npz`` whose ``arr_0`` holds uint8 ``(N, H, W, C)`` images (ADM's reference-batch layout, what
            ``examples/sample.py`` writes), a folder of image files (read in sorted order, recursively), a
            ``(N, C, H, W)`` tensor, or an iterable of such tensors.
        batch_size (`int`, defaults to 250): images per batch (for files and tensors).
        resolution (`int`, *optional*): folders only: resize the shorter side to this and crop the centre, as the
            training data is prepared; without it every image must already have the same size.
        num_channels (`int`, *optional*): folders only: 1 (gray) or 3 (RGB); defaults to each file's own.
    """
    if isinstance(source, torch.Tensor):
        for chunk in source.split(batch_size):
            yield _check_images(chunk, "images")
        return
    if not isinstance(source, (str, os.PathLike)):
        for chunk in source:
            yield _check_images(chunk, "images")
        return
    path = Path(source)
    if path.is_file() and path.suffix == ".npz":
        for batch in _npz_uint8_batches(path, "arr_0", batch_size):
            yield torch.from_numpy(batch.copy()).permute(0, 3, 1, 2).float().div_(255.0)
        return
    if path.is_dir():
        files = _image_files(path)
        for start in range(0, len(files), batch_size):
            arrays = [_load_image(f, resolution, num_channels) for f in files[start : start + batch_size]]
            if len({a.shape for a in arrays}) > 1:
                raise ValueError(
                    f"the images in {path} differ in size or channels ({sorted({a.shape for a in arrays})}); pass "
                    "resolution= (command line: --resolution) to crop and resize them"
                )
            yield torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0)
        return
    raise ValueError(f"{str(source)!r} is neither an .npz file nor a folder of images")
