"""Feature extractors: the spaces FID compares images in, and the offline digits classifier.

- `InceptionFeatureExtractor`: the standard 2048-d pool features of Inception-v3 in torch-fidelity's port of the
  TensorFlow FID weights (what ADM's evaluator and most papers use). They need the weights file (see
  `resolve_inception_weights`), which is never downloaded unless asked.
- `DigitsClassifier` / `DigitsFeatureExtractor`: Inception features mean little on 16x16 grayscale digits and need a
  download. Offline, a small digits classifier, trained once in seconds on the scikit-learn digits and cached as
  safetensors, provides the features instead, and also scores whether a sample generated for class ``c`` is
  recognised as ``c`` (`classification_accuracy`).

`get_feature_extractor` maps a name to one of them; any `nn.Module` mapping images to ``(B, d)`` features can stand in.
Images are float ``(B, C, H, W)`` in [0, 1] (`diffusers_masked.evaluation.images`).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..utils.io import atomic_write
from ..utils.safe_loading import load_safetensors
from .images import _check_images, _to_gray

logger = logging.getLogger(__name__)

# Where the digits classifier and cached reference statistics go when no cache_dir is given; DIFFUSERS_MASKED_CACHE
# overrides it.
DEFAULT_CACHE_DIR = Path(os.environ.get("DIFFUSERS_MASKED_CACHE", "~/.cache/diffusers_masked"))


INCEPTION_WEIGHTS_FILENAME = "weights-inception-2015-12-05-6726825d.pth"


INCEPTION_WEIGHTS_URL = (
    f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_WEIGHTS_FILENAME}"
)

# Share of the digits kept out of the classifier's training data; the same split gives the FID floor.
DIGITS_HOLDOUT_FRACTION = 0.2


# Part of the cache file name: bump when the classifier's architecture or training recipe changes.
_CLASSIFIER_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Inception-v3
# ---------------------------------------------------------------------------------------------------------


def _torch_fidelity_available() -> bool:
    return importlib.util.find_spec("torch_fidelity") is not None


def resolve_inception_weights(
    inception_weights_path: str | os.PathLike | None = None, allow_download: bool = False
) -> str | None:
    """Where the FID Inception-v3 weights are, without touching the network.

    Returns the local file to load: ``inception_weights_path`` if given, else torch-fidelity's file in the
    torch hub cache (``$TORCH_HOME/hub/checkpoints/weights-inception-2015-12-05-6726825d.pth``) if present, else
    `None` when ``allow_download`` (torch-fidelity then downloads it into that cache).

    Raises:
        ImportError: torch-fidelity (which holds the Inception network) is not installed.
        FileNotFoundError: the weights are not available locally and ``allow_download`` is `False`; the message
            says where to put them.
    """
    if not _torch_fidelity_available():
        raise ImportError(
            'feature_extractor="inception" needs torch-fidelity: `pip install torch-fidelity` (or '
            '`pip install "torchmetrics[image]"`). Offline, use feature_extractor="digits".'
        )
    if inception_weights_path is not None:
        if not Path(inception_weights_path).is_file():
            raise FileNotFoundError(f"inception_weights_path {str(inception_weights_path)!r} is not a file")
        return str(inception_weights_path)
    cached = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_WEIGHTS_FILENAME
    if cached.is_file():
        return str(cached)
    if allow_download:
        return None
    raise FileNotFoundError(
        f"The FID Inception-v3 weights are not available offline: {cached} does not exist. Either download "
        f"{INCEPTION_WEIGHTS_URL} to that path (or anywhere, and pass inception_weights_path=..., on the command "
        "line --inception_weights), or pass allow_download=True (on the command line --allow_download) to let "
        'torch-fidelity fetch it. Offline, use feature_extractor="digits".'
    )


class InceptionFeatureExtractor(nn.Module):
    """The standard FID features: torchmetrics' Inception-v3 (torch-fidelity's port of the TF FID weights).

    Input: float ``(B, 1|3, H, W)`` in [0, 1] (gray is repeated to RGB), quantised to uint8 and resized to
    299×299 with torch-fidelity's TensorFlow-1 compatible bilinear resize. `forward` returns the ``(B, 2048)`` pool
    features; `features_and_logits` also returns the ``(B, 1008)`` logits the Inception Score reads.

    Args:
        weights_path (`str`, *optional*): the local weights file (see `resolve_inception_weights`); `None` lets
            torch-fidelity download it.
    """

    num_features = 2048
    name = "inception-v3-compat-2048"

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3

        self.inception = NoTrainInceptionV3(
            name="inception-v3-compat",
            features_list=["2048", "logits_unbiased"],
            feature_extractor_weights_path=weights_path,
            antialias=False,
        )

    def train(self, mode: bool = True) -> InceptionFeatureExtractor:
        return super().train(False)  # a fixed feature space: never in training mode

    @torch.no_grad()
    def features_and_logits(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        images = images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images
        uint8 = (images.float() * 255).round().clamp(0, 255).to(torch.uint8)
        # torchmetrics' forward returns only the first of the requested outputs; this gives both from one pass.
        features, logits = self.inception._torch_fidelity_forward(uint8)
        return features.reshape(len(images), -1), logits

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.features_and_logits(images)[0]


# ---------------------------------------------------------------------------------------------------------
# The digits classifier
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


# `get_digits_classifier` is reached from inside `torch.no_grad` and `torch.inference_mode` (`compute_statistics`, an
# evaluation loop), and its first call trains: gradients are on here whatever the caller's mode.
@torch.inference_mode(False)
@torch.enable_grad()
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
    classifier = _new_digits_classifier(resolution, seed)
    try:
        state_dict, metadata = load_safetensors(path)
        heldout_accuracy = float(metadata["heldout_accuracy"])
        classifier.load_state_dict(state_dict)
    except (RuntimeError, KeyError, TypeError, ValueError) as err:
        logger.warning(f"Ignoring the unusable cached digits classifier {path} ({err}); training a new one")
        return None
    return classifier, heldout_accuracy


def _save_digits_classifier(classifier: DigitsClassifier, heldout_accuracy: float, path: Path) -> None:
    """Write atomically, so that no reader ever sees a partial file."""
    from safetensors.torch import save_file

    metadata = {"resolution": str(classifier.resolution), "heldout_accuracy": repr(heldout_accuracy)}
    atomic_write(path, lambda tmp: save_file(classifier.state_dict(), tmp, metadata=metadata))


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
    cache_dir = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser()
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
# By name
# ---------------------------------------------------------------------------------------------------------


def get_feature_extractor(
    feature_extractor: str | nn.Module = "inception",
    resolution: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    inception_weights_path: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> nn.Module:
    """The feature extractor a name stands for; a module is returned as it is.

    Args:
        feature_extractor (`str` or `nn.Module`, defaults to ``"inception"``): ``"inception"`` (an
            `InceptionFeatureExtractor`, weights from `resolve_inception_weights`), ``"digits"`` (the offline
            `DigitsFeatureExtractor` at ``resolution``) or a module mapping float ``(B, C, H, W)`` images in [0, 1]
            to ``(B, d)`` features.
        resolution (`int`, *optional*): the images' side, for ``"digits"``.
        cache_dir, inception_weights_path, allow_download: see `get_digits_classifier` and
            `resolve_inception_weights`.
    """
    if isinstance(feature_extractor, nn.Module):
        return feature_extractor
    if feature_extractor == "inception":
        return InceptionFeatureExtractor(resolve_inception_weights(inception_weights_path, allow_download))
    if feature_extractor == "digits":
        if resolution is None:
            raise ValueError('feature_extractor="digits" needs the images\' resolution (command line: --resolution)')
        extractor = DigitsFeatureExtractor(get_digits_classifier(resolution=resolution, cache_dir=cache_dir))
        extractor.name = f"digits-classifier-v{_CLASSIFIER_VERSION}-r{resolution}-s0"
        return extractor
    raise ValueError(f'feature_extractor must be "digits", "inception" or an nn.Module, got {feature_extractor!r}')


def _extractor_name(extractor: nn.Module) -> str | None:
    """The name recorded with statistics (and keying their cache); `None` for a module of the caller's."""
    return getattr(extractor, "name", None)


def _single_threaded(extractor: nn.Module):
    device = next(extractor.parameters(), torch.empty(0)).device
    return _one_cpu_thread(device) if isinstance(extractor, DigitsFeatureExtractor) else contextlib.nullcontext()
