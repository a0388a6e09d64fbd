"""What the converters share: reading the state dict out of a checkpoint, strict loading of converted weights with
every mismatch reported at once, the checks of stored positions and head counts, the VAE of latent-space
checkpoints, and ImageNet's class names."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from diffusers.utils import logging

from ..utils.safe_loading import check_model_folder, check_path_or_hub_id

logger = logging.get_logger(__name__)

IMAGENET_ID2LABEL_FILE = Path(__file__).parents[1] / "imagenet_id2label.json"
WEIGHTS = ("ema", "model")


# Tolerance for the checkpoints' stored sine-cosine positions against ours: the official code computes them in
# float64 and stores float32, ours are computed in float32.
POSITIONS_ATOL = 1e-5


def imagenet_id2label() -> dict[int, str]:
    """The ImageNet-1k class names in class-index order (``207 -> "golden retriever"``), shipped with the package
    (made by ``scripts/make_imagenet_id2label.py``)."""
    return {int(k): v for k, v in json.loads(IMAGENET_ID2LABEL_FILE.read_text(encoding="utf-8")).items()}


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def select_state_dict(checkpoint, weights: str = "ema") -> dict[str, torch.Tensor]:
    """
    The state dict to convert from what `load_torch_file` returned.

    Args:
        checkpoint: A state dict, or a dict holding state dicts under keys such as ``"ema"`` and ``"model"``.
        weights (`str`, defaults to `"ema"`): Which of those to take when `checkpoint` holds several: ``"ema"`` (the
            averaged weights the official sampler uses) or ``"model"`` (the online weights). Ignored for a file that
            is a single state dict.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if _is_state_dict(checkpoint):
        return dict(checkpoint)
    if isinstance(checkpoint, dict) and _is_state_dict(checkpoint.get(weights)):
        return dict(checkpoint[weights])
    keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(
        f"the checkpoint holds no state dict under {weights!r}; its top-level keys are {keys}. Pass weights= one of "
        f"{WEIGHTS} that it holds."
    )


def _check_keys(found, expected, source: str):
    unexpected = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if unexpected or missing:
        raise ValueError(
            f"{source} does not have the expected parameters; unexpected keys: {unexpected}; missing keys: {missing}"
        )


def _load_converted(model: torch.nn.Module, converted: dict[str, torch.Tensor], source: str):
    """Load `converted` into `model` strictly, reporting every shape mismatch at once."""
    own = model.state_dict()
    _check_keys(converted, own, source)
    mismatched = [
        f"{key}: {tuple(value.shape)} vs {tuple(own[key].shape)}"
        for key, value in converted.items()
        if value.shape != own[key].shape
    ]
    if mismatched:
        raise ValueError(f"{source} has parameters of unexpected shape (converted vs expected): {mismatched}")
    model.load_state_dict(converted, strict=True)


def _num_blocks(keys, prefix: str) -> int:
    indices = {int(m.group(1)) for key in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _check_positions(stored: torch.Tensor, ours: torch.Tensor, name: str):
    stored = stored.reshape(-1, stored.shape[-1]).float()
    if stored.shape != ours.shape or not torch.allclose(stored, ours, atol=POSITIONS_ATOL, rtol=0):
        detail = (
            f"max difference {(stored - ours).abs().max().item():.3g}"
            if stored.shape == ours.shape
            else f"shape {tuple(stored.shape)} vs {tuple(ours.shape)}"
        )
        raise ValueError(
            f"the checkpoint's {name} is not the fixed 2-D sine-cosine table this model computes ({detail}); "
            "it was not made with MaskDiT's positions (e.g. it has a cls token) and cannot be converted"
        )


def _check_heads(width: int, heads: int, name: str) -> int:
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
        raise ValueError(f"{name} must be a positive int dividing the width {width}, got {heads!r}")
    return width // heads


def load_vae(vae: str | os.PathLike, subfolder: str | None = None, config: str | None = None):
    """
    Load the autoencoder a pipeline decodes with.

    Args:
        vae (`str` or `os.PathLike`): A diffusers model folder or Hub id, or a single LDM-format file (such as the
            official ``autoencoder_kl.pth``), read through [`~diffusers.AutoencoderKL.from_single_file`] (safetensors
            or `weights_only=True`). A local path must exist, and a folder's ``config.json`` must name an
            ``AutoencoderKL``, or nothing is loaded.
        subfolder (`str`, *optional*): The folder inside a Hub repo that holds the VAE (e.g. ``"vae"``).
        config (`str`, *optional*): For a single file: a diffusers config (Hub id or folder) describing it; without
            one diffusers infers the Stable Diffusion v1 autoencoder's config.
    """
    from diffusers import AutoencoderKL

    if os.path.isfile(vae):
        kwargs = {"config": config} if config else {}
        if subfolder:
            kwargs["subfolder"] = subfolder
        check_path_or_hub_id(config, "vae_config")
        return AutoencoderKL.from_single_file(os.fspath(vae), **kwargs)
    if config:
        raise ValueError("config describes a single-file VAE; a folder or Hub id carries its own config")
    check_model_folder(vae, "AutoencoderKL", subfolder, name="vae", subfolder_name="vae_subfolder")
    return AutoencoderKL.from_pretrained(vae, subfolder=subfolder)
