"""The offline digits harness: a small digits classifier as FID feature space, class accuracy, and the evaluation
of a class-conditional digits pipeline against the real digits and their held-out floor.

Inception features mean little on 16×16 grayscale digits and need a download. Offline, a small digits classifier
(`DigitsClassifier`, trained once in seconds on the scikit-learn digits and cached as safetensors) provides the
features instead, and also scores whether a sample generated for class ``c`` is recognised as ``c``. FID itself
is `diffusers_masked.evaluation.fid`'s.

All images handed to this module are float tensors ``(B, C, H, W)`` with values in [0, 1] and ``C`` 1 (gray)
or 3 (RGB), i.e. what a pipeline returns with ``output_type="pt"``; `images_to_tensor` converts numpy or PIL
outputs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import fid
from .fid import _check_images, _fids_against, images_to_tensor

logger = logging.getLogger(__name__)

# Share of the digits kept out of the classifier's training data; the same split gives the FID floor.
DIGITS_HOLDOUT_FRACTION = 0.2
# Part of the cache file name: bump when the classifier's architecture or training recipe changes.
_CLASSIFIER_VERSION = 1


def _to_gray(images: torch.Tensor, resolution: int) -> torch.Tensor:
    """``(B, 1|3, H, W)`` in [0, 1] → ``(B, 1, resolution, resolution)`` gray (ITU-R 601 luma)."""
    if images.shape[1] == 3:
        luma = images.new_tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        images = (images * luma).sum(dim=1, keepdim=True)
    if images.shape[-2:] != (resolution, resolution):
        images = F.interpolate(images, size=(resolution, resolution), mode="bilinear", antialias=True)
    return images


# ---------------------------------------------------------------------------------------------------------
# Digits classifier
# ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device | str = "cpu"):
    """Run the digits network on one CPU thread: it is so small that more threads only add synchronisation, which
    stalls badly (10x and more) when the machine is busy. No effect on other devices."""
    if torch.device(device).type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


class DigitsClassifier(nn.Module):
    """A small CNN that classifies grayscale digits; its penultimate layer is the offline FID feature space.

    Two 3×3 conv stages (the first max-pooled), average-pooled to 4×4, then a ``num_features``-wide hidden layer
    and the class logits.

    Args:
        resolution (`int`, defaults to 16): input side in pixels; inputs are ``(B, 1, resolution, resolution)``
            floats in [0, 1].
        width (`int`, defaults to 16): channels of the first stage (the second has twice as many).
        num_features (`int`, defaults to 128): width of the feature layer used for FID.
        num_classes (`int`, defaults to 10): the number of classes (logits).
    """

    def __init__(self, resolution: int = 16, width: int = 16, num_features: int = 128, num_classes: int = 10):
        super().__init__()
        self.resolution = resolution
        self.num_features = num_features
        self.conv = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.hidden = nn.Linear(2 * width * 16, num_features)
        self.head = nn.Linear(num_features, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, R, R)`` in [0, 1] → ``(B, num_features)``, the hidden layer before its ReLU.

        Taken before the ReLU because units that never fire on digits would otherwise be constant and make the
        feature covariance singular, and because pre-activations are closer to the Gaussian FID assumes.
        """
        return self.hidden(self.conv(images * 2 - 1).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 1, R, R)`` in [0, 1] → ``(B, num_classes)`` logits."""
        return self.head(F.relu(self.features(images)))


class DigitsFeatureExtractor(nn.Module):
    """Wraps a `DigitsClassifier` in the form torchmetrics' `FrechetInceptionDistance(feature=...)` takes.

    Input: float ``(B, 1|3, H, W)`` in [0, 1] of any size (converted to gray and resized to the classifier's
    resolution). Output: ``(B, num_features)``.
    """

    def __init__(self, classifier: DigitsClassifier):
        super().__init__()
        self.classifier = classifier.eval()
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> DigitsFeatureExtractor:
        return super().train(False)  # a fixed feature space: never in training mode

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        with _one_cpu_thread(images.device):
            return self.classifier.features(_to_gray(images.float(), self.classifier.resolution))

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The features and the classifier's ``(B, num_classes)`` logits (for a digits Inception Score)."""
        features = self(images)
        return features, self.classifier.head(F.relu(features))


def _digits_tensors(resolution: int, split: str, seed: int, holdout_fraction: float = DIGITS_HOLDOUT_FRACTION):
    """The digits of one split as ``(images (N, 1, R, R) float in [0, 1], labels (N,) long)``."""
    from ..data import load_digits_arrays

    images, labels = load_digits_arrays(resolution, seed=seed, holdout_fraction=holdout_fraction)[split]
    return torch.from_numpy(images).float().div(255.0)[:, None], torch.from_numpy(labels)


def _random_translate(images: torch.Tensor, max_shift: float, generator: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` of half its side (bilinear, zero fill) in x and y."""
    theta = torch.eye(2, 3).repeat(len(images), 1, 1)
    theta[:, :, 2] = (torch.rand(len(images), 2, generator=generator) * 2 - 1) * max_shift
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def _new_digits_classifier(resolution: int, seed: int) -> DigitsClassifier:
    # Seeded on a forked generator so that building one leaves the caller's global RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return DigitsClassifier(resolution)


def _train_digits_classifier(resolution: int, seed: int) -> tuple[DigitsClassifier, float]:
    """Train on the digits' ``"train"`` split; return the classifier and its accuracy on ``"heldout"``."""
    images, labels = _digits_tensors(resolution, "train", seed)
    heldout_images, heldout_labels = _digits_tensors(resolution, "heldout", seed)
    generator = torch.Generator().manual_seed(seed)
    classifier = _new_digits_classifier(resolution, seed)
    epochs, batch_size, lr = 15, 64, 5e-3
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=lr, total_steps=epochs * math.ceil(len(images) / batch_size)
    )
    classifier.train()
    with _one_cpu_thread():
        for _ in range(epochs):
            for idx in torch.randperm(len(images), generator=generator).split(batch_size):
                # Small shifts (±7.5% of the side) make the features robust to imperfectly centred samples.
                batch = _random_translate(images[idx], 0.15, generator)
                loss = F.cross_entropy(classifier(batch), labels[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
    classifier.eval()
    return classifier, classification_accuracy(heldout_images, heldout_labels, classifier)


def _load_digits_classifier(path: Path, resolution: int, seed: int) -> tuple[DigitsClassifier, float] | None:
    """The cached classifier and its held-out accuracy, or `None` (with a warning) if the file is unusable."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

    classifier = _new_digits_classifier(resolution, seed)
    try:
        with safe_open(str(path), framework="pt") as f:
            heldout_accuracy = float(f.metadata()["heldout_accuracy"])
        classifier.load_state_dict(load_file(str(path)))
    except (SafetensorError, OSError, RuntimeError, KeyError, TypeError, ValueError) as err:
        logger.warning(f"Ignoring the unusable cached digits classifier {path} ({err}); training a new one")
        return None
    return classifier, heldout_accuracy


def _save_digits_classifier(classifier: DigitsClassifier, heldout_accuracy: float, path: Path) -> None:
    """Write to a temporary file and rename it, so that no reader ever sees a partial file."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    os.close(fd)
    try:
        metadata = {
            "resolution": str(classifier.resolution),
            "heldout_accuracy": repr(heldout_accuracy),
        }
        save_file(classifier.state_dict(), tmp_path, metadata=metadata)
        os.replace(tmp_path, path)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)


def get_digits_classifier(resolution: int = 16, cache_dir: str | os.PathLike | None = None, seed: int = 0):
    """The digits classifier for ``resolution``, trained once (a few seconds on a CPU) and cached.

    It is trained on the ``"train"`` part of `load_digits_dataset(resolution, seed=seed, holdout_fraction=0.2)`
    with small random shifts, and measured on the ``"heldout"`` part (about 99% at 16×16). The weights are saved as
    ``<cache_dir>/digits-classifier-v1-r<resolution>-s<seed>.safetensors`` (written to a temporary file and
    renamed, so concurrent runs never read a partial file) with the held-out accuracy in the file's metadata;
    later calls load that file instead of training. A file that cannot be loaded (corrupt, or from an
    incompatible version) is replaced by a freshly trained classifier, with a warning.

    Args:
        resolution (`int`, defaults to 16): input side of the classifier.
        cache_dir (`str` or `os.PathLike`, *optional*): defaults to ``~/.cache/diffusers_masked``.
        seed (`int`, defaults to 0): seed of the split, the initialisation and the batch order.

    Returns:
        `DigitsClassifier`: in eval mode, gradients off, with ``heldout_accuracy`` (`float`) set.
    """
    cache_dir = Path(cache_dir if cache_dir is not None else fid.DEFAULT_CACHE_DIR).expanduser()
    path = cache_dir / f"digits-classifier-v{_CLASSIFIER_VERSION}-r{resolution}-s{seed}.safetensors"
    loaded = _load_digits_classifier(path, resolution, seed) if path.is_file() else None
    if loaded is not None:
        classifier, heldout_accuracy = loaded
    else:
        classifier, heldout_accuracy = _train_digits_classifier(resolution, seed)
        logger.info(
            f"Trained the {resolution}x{resolution} digits classifier: held-out accuracy {heldout_accuracy:.4f}"
        )
        _save_digits_classifier(classifier, heldout_accuracy, path)
    classifier.eval().requires_grad_(False)
    classifier.heldout_accuracy = heldout_accuracy
    return classifier


@torch.no_grad()
def classification_accuracy(
    images: torch.Tensor,
    labels: torch.Tensor | Sequence[int],
    classifier: nn.Module,
    batch_size: int = 256,
    device: str | torch.device | None = None,
) -> float:
    """Share of ``images`` that ``classifier`` assigns to ``labels``.

    Args:
        images (`torch.Tensor`): ``(B, 1|3, H, W)`` in [0, 1]. For a classifier with a ``resolution`` attribute
            (such as `DigitsClassifier`) they are converted to gray at that resolution; any other module gets
            them as they are.
        labels: ``(B,)`` integer class labels.
        classifier (`torch.nn.Module`): returns ``(B, num_classes)`` logits.
        batch_size (`int`, defaults to 256): images per classifier call.
        device (`str` or `torch.device`, *optional*): defaults to the classifier's device.

    Returns:
        `float`: accuracy in [0, 1].
    """
    images = _check_images(images, "images")
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(images):
        raise ValueError(f"got {len(images)} images but {len(labels)} labels")
    if device is None:
        device = next(classifier.parameters(), images).device
    classifier = classifier.to(device)
    was_training = classifier.training
    classifier.eval()
    resolution = getattr(classifier, "resolution", None)
    correct = 0
    with _one_cpu_thread(device) if isinstance(classifier, DigitsClassifier) else contextlib.nullcontext():
        for chunk, chunk_labels in zip(images.split(batch_size), labels.split(batch_size)):
            chunk = chunk.to(device)
            if resolution is not None:
                chunk = _to_gray(chunk, resolution)
            correct += int((classifier(chunk).argmax(dim=-1).cpu() == chunk_labels).sum())
    classifier.train(was_training)
    return correct / len(labels)


# ---------------------------------------------------------------------------------------------------------
# Digits evaluation
# ---------------------------------------------------------------------------------------------------------


def evaluate_digits_samples(
    fake_images: torch.Tensor,
    fake_labels: torch.Tensor | Sequence[int] | None,
    real_images: torch.Tensor,
    heldout_images: torch.Tensor | None = None,
    feature_extractor: str | nn.Module = "digits",
    classifier: nn.Module | None = None,
    seed: int = 0,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    inception_weights_path: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> dict[str, Any]:
    """FID of generated digits, the real-vs-real FID floor and class-conditional accuracy.

    Args:
        fake_images (`torch.Tensor`): generated images, float ``(B, 1|3, H, W)`` in [0, 1].
        fake_labels: the class each image was generated for, ``(B,)``; `None` for unconditional samples (no
            accuracy).
        real_images (`torch.Tensor`): the reference set (e.g. the digits' ``"train"`` split).
        heldout_images (`torch.Tensor`, *optional*): real images not in ``real_images`` (the ``"heldout"``
            split). ``len(fake_images)`` of them (all of them if there are fewer), drawn with ``seed``, give
            ``fid_floor``: the FID a perfect generator would get with this many samples.
        feature_extractor: see `compute_fid`.
        classifier (`torch.nn.Module`, *optional*): scores accuracy; defaults to `get_digits_classifier` at the
            fake images' resolution with ``seed``.
        seed (`int`, defaults to 0): seed of the held-out subset and of the default classifier.
        batch_size, device, cache_dir, inception_weights_path, allow_download: see `compute_fid`.

    Returns:
        `dict`: ``fid``, ``fid_floor`` (`None` without held-out images), ``accuracy`` (`None` without labels),
        ``classifier_heldout_accuracy`` (the default classifier's own accuracy on real held-out digits, `None`
        for a given classifier), ``num_fake``, ``num_real``, ``num_heldout`` (images used for the floor) and
        ``feature_extractor`` (its name).
    """
    fake_images = _check_images(fake_images, "fake_images")
    candidates = [fake_images]
    num_heldout = 0
    if heldout_images is not None:
        num_heldout = min(len(heldout_images), len(fake_images))
        subset = torch.randperm(len(heldout_images), generator=torch.Generator().manual_seed(seed))[:num_heldout]
        candidates.append(heldout_images[subset])
    fids = _fids_against(
        real_images,
        candidates,
        feature_extractor=feature_extractor,
        batch_size=batch_size,
        device=device,
        cache_dir=cache_dir,
        inception_weights_path=inception_weights_path,
        allow_download=allow_download,
    )

    accuracy = classifier_heldout_accuracy = None
    if fake_labels is not None:
        if classifier is None:
            classifier = get_digits_classifier(resolution=fake_images.shape[-1], cache_dir=cache_dir, seed=seed)
            classifier_heldout_accuracy = classifier.heldout_accuracy
        accuracy = classification_accuracy(fake_images, fake_labels, classifier, batch_size=batch_size, device=device)

    return {
        "fid": fids[0],
        "fid_floor": fids[1] if heldout_images is not None else None,
        "accuracy": accuracy,
        "classifier_heldout_accuracy": classifier_heldout_accuracy,
        "num_fake": len(fake_images),
        "num_real": len(real_images),
        "num_heldout": num_heldout,
        "feature_extractor": feature_extractor
        if isinstance(feature_extractor, str)
        else type(feature_extractor).__name__,
    }


def eval_results_for_model_card(results: dict[str, Any], dataset_split: str = "train") -> list:
    """Turn `evaluate_digits_samples` results into `huggingface_hub.EvalResult` entries for a model card.

    The FID entry records the feature extractor, the number of generated samples and the FID floor in
    ``metric_args`` (the floor is a property of the data, not of the model, so it gets no entry of its own);
    accuracy gets an entry when the samples were class-conditional. ``dataset_split`` names the real reference set.

    Returns:
        `list[huggingface_hub.EvalResult]`, e.g. for ``ModelCardData(eval_results=..., model_name=...)``.
    """
    from huggingface_hub import EvalResult

    conditional = results.get("accuracy") is not None
    task = (
        {"task_type": "image-generation", "task_name": "Class-conditional image generation"}
        if conditional
        else {"task_type": "unconditional-image-generation", "task_name": "Unconditional image generation"}
    )
    common = dict(
        dataset_type="sklearn-digits", dataset_name="scikit-learn digits", dataset_split=dataset_split, **task
    )
    extractor = results.get("feature_extractor", "digits")
    fid_args = {"feature_extractor": extractor, "num_samples": results["num_fake"]}
    if results.get("fid_floor") is not None:
        fid_args["fid_floor"] = round(results["fid_floor"], 4)
    entries = [
        EvalResult(
            metric_type="fid",
            metric_name=f"FID ({'Inception-v3' if extractor == 'inception' else extractor + ' features'})",
            metric_value=round(results["fid"], 4),
            metric_args=fid_args,
            **common,
        )
    ]
    if conditional:
        entries.append(
            EvalResult(
                metric_type="accuracy",
                metric_name="Class accuracy of samples (digits classifier)",
                metric_value=round(results["accuracy"], 4),
                **common,
            )
        )
    return entries


def evaluate_pipeline_on_digits(
    pipeline,
    num_samples_per_class: int = 36,
    resolution: int | None = None,
    generator: torch.Generator | None = None,
    guidance_scale: float = 1.5,
    num_inference_steps: int = 40,
    batch_size: int = 64,
    feature_extractor: str | nn.Module = "digits",
    seed: int = 0,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    inception_weights_path: str | os.PathLike | None = None,
    allow_download: bool = False,
    return_samples: bool = False,
    pipeline_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any] | tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Generate ``num_samples_per_class`` digits of each class with a class-conditional pipeline and evaluate them;
    an unconditional pipeline (its transformer has ``num_classes=0``) draws ``10 * num_samples_per_class`` digits.

    A class-conditional pipeline is called as ``pipeline(class_labels=[c] * n, guidance_scale=...,
    num_inference_steps=..., generator=..., output_type="pt").images`` (the `MaskDiTPipeline` interface), an
    unconditional one as ``pipeline(batch_size=n, num_inference_steps=..., generator=..., output_type="pt")`` (the
    `MaskDMPipeline` interface; no accuracy, no guidance), in batches of at most ``batch_size``. The real reference is the digits' ``"train"`` split and the floor uses the ``"heldout"``
    split (`load_digits_dataset(..., seed=seed, holdout_fraction=0.2)`, 360 images), so train the model on the
    ``"train"`` split to keep the floor honest. The default of 36 per class makes the fake set as large as the
    held-out set, so ``fid`` and ``fid_floor`` have the same sample-size bias.

    Args:
        pipeline: a class-conditional image pipeline with the interface above.
        num_samples_per_class (`int`, defaults to 36): samples generated for each digit.
        resolution (`int`, *optional*): resolution of the real digits; defaults to that of the samples.
        generator (`torch.Generator`, *optional*): passed to every pipeline call.
        guidance_scale (`float`, defaults to 1.5): classifier-free guidance of the samples.
        num_inference_steps (`int`, defaults to 40): sampler steps.
        batch_size (`int`, defaults to 64): samples per pipeline call (and per feature-extractor call).
        feature_extractor, seed, device, cache_dir, inception_weights_path, allow_download: see
            `evaluate_digits_samples`.
        return_samples (`bool`, defaults to `False`): also return the generated images ``(N, C, H, W)`` in
            ``[0, 1]`` and their labels ``(N,)``, class by class (e.g. to show exactly what was evaluated); the labels
            are `None` for an unconditional pipeline.
        pipeline_kwargs (`dict`, *optional*): further arguments of every pipeline call, e.g. ``{"eta": 0.0}`` for
            a `MaskDMPipeline` sampling with DDIM.

    Returns:
        `dict`: `evaluate_digits_samples`' results plus the sampling settings; with ``return_samples=True``, the
        tuple ``(results, images, labels)``.
    """
    images, labels = [], []
    conditional = pipeline.transformer.config.num_classes > 0
    for label in range(10) if conditional else [None] * 10:
        remaining = num_samples_per_class
        while remaining > 0:
            n = min(batch_size, remaining)
            call = (
                {"class_labels": [label] * n, "guidance_scale": guidance_scale} if conditional else {"batch_size": n}
            )
            call.update(pipeline_kwargs or {})
            output = pipeline(**call, num_inference_steps=num_inference_steps, generator=generator, output_type="pt")
            images.append(images_to_tensor(output.images))
            labels += [label] * n
            remaining -= n
    fake_images = torch.cat(images)
    labels = torch.tensor(labels) if conditional else None
    resolution = resolution if resolution is not None else fake_images.shape[-1]
    real_images, _ = _digits_tensors(resolution, "train", seed)
    heldout_images, _ = _digits_tensors(resolution, "heldout", seed)
    results = evaluate_digits_samples(
        fake_images,
        labels,
        real_images,
        heldout_images,
        feature_extractor=feature_extractor,
        seed=seed,
        batch_size=batch_size,
        device=device,
        cache_dir=cache_dir,
        inception_weights_path=inception_weights_path,
        allow_download=allow_download,
    )
    results.update(
        num_samples_per_class=num_samples_per_class,
        guidance_scale=guidance_scale if conditional else None,
        num_inference_steps=num_inference_steps,
        resolution=resolution,
    )
    if return_samples:
        return results, fake_images, labels
    return results
