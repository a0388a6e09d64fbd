"""CLIP score of text-to-image samples: how well each image matches its prompt, by torchmetrics' `CLIPScore`
(``100 * max(cos(image, text), 0)`` averaged over the samples) with a CLIP model loaded here from a folder or Hub id
(`transformers.CLIPModel` and `CLIPProcessor`, no remote code)."""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch


def load_clip(name_or_path: str | os.PathLike, allow_download: bool = False):
    """A `transformers` CLIP model and processor from a local folder or, with `allow_download`, a Hub id.

    Raises:
        ValueError: a path that does not exist, or a Hub id without `allow_download`.
    """
    from transformers import CLIPModel, CLIPProcessor

    from ..utils.safe_loading import check_path_or_hub_id

    check_path_or_hub_id(str(name_or_path), "clip_model")
    local = os.path.isdir(name_or_path)
    if not local and not allow_download:
        raise ValueError(
            f"clip_model {str(name_or_path)!r} is not a local folder; pass allow_download=True (command line: "
            "--allow_download) to fetch it from the Hub, e.g. openai/clip-vit-large-patch14"
        )
    model = CLIPModel.from_pretrained(name_or_path, local_files_only=local).eval()
    processor = CLIPProcessor.from_pretrained(name_or_path, local_files_only=local)
    return model, processor


class _ProjectedFeatures(torch.nn.Module):
    """A `CLIPModel` whose `get_image_features` / `get_text_features` return the projected feature tensor: transformers
    5 returns an output object (the features in its `pooler_output`), which torchmetrics 1.9's CLIP score does not
    read; with a transformers that returns the tensor this passes it through."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self.config = model.config

    @staticmethod
    def _tensor(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.pooler_output

    def get_image_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs) -> torch.Tensor:
        return self._tensor(self.model.get_text_features(*args, **kwargs))


def clip_score(
    images: np.ndarray | torch.Tensor,
    prompts: Sequence[str],
    clip_model: str | os.PathLike,
    batch_size: int = 64,
    device: str | torch.device | None = None,
    allow_download: bool = False,
) -> float:
    """torchmetrics' CLIP score of `images` (uint8 ``(N, H, W, C)``, the layout of ``examples/sample.py``'s .npz, or
    ``(N, C, H, W)``) against their `prompts` (one per image), with the CLIP model of `clip_model` (`load_clip`)."""
    from torchmetrics.multimodal.clip_score import CLIPScore

    if len(images) != len(prompts):
        raise ValueError(f"clip_score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    if len(images) == 0:
        raise ValueError("clip_score got no images")
    model, processor = load_clip(clip_model, allow_download)
    metric = CLIPScore(model_name_or_path=lambda: (_ProjectedFeatures(model), processor))
    if device is not None:
        metric = metric.to(device)
    images = torch.as_tensor(np.asarray(images))
    if images.shape[-1] in (1, 3) and images.shape[1] not in (1, 3):
        images = images.permute(0, 3, 1, 2)  # NHWC -> NCHW
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        metric.update(batch.to(metric.device), list(prompts[start : start + batch_size]))
    return float(metric.compute())
