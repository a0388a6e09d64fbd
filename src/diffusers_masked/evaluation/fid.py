"""FID and Inception Score at real scale: feature statistics of samples and of reference data, through torchmetrics.

FID compares Gaussians fitted to features of real and generated images,
``|mu_r - mu_g|^2 + tr(S_r + S_g - 2 (S_r S_g)^(1/2))``, in a feature space of `diffusers_masked.evaluation.features`
(Inception-v3 by default, the offline digits classifier for the digits). Images come through
`diffusers_masked.evaluation.images` (tensors, a sample ``.npz`` or a folder, streamed). Reference statistics are
saved in ADM's layout (``mu``, ``sigma``), plus the feature extractor's name and the image count.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..utils.io import atomic_write
from .features import DEFAULT_CACHE_DIR, _extractor_name, _single_threaded, get_feature_extractor
from .images import _NPZ_ERRORS, _check_images, _damaged_npz, _image_files, image_batches

logger = logging.getLogger(__name__)

# How far loaded statistics may be from a covariance before they are refused, relative to sigma's largest entry
# (symmetry) and largest eigenvalue (negative eigenvalues). A covariance computed in float64 and stored in float32
# stays exactly symmetric and, even when singular (fewer images than features), has no eigenvalue below about -1e-5
# of the largest; anything further off is not a covariance.
SYMMETRY_RTOL = 1e-6
PSD_RTOL = 1e-4


@dataclass
class FeatureStatistics:
    """The Gaussian fitted to a set's features: what FID compares.

    Args:
        mu (`np.ndarray`): ``(d,)`` float64 mean.
        sigma (`np.ndarray`): ``(d, d)`` float64 covariance (unbiased, ``N - 1``).
        num_images (`int`, *optional*): the set's size.
        feature_extractor (`str`, *optional*): the features' name (e.g. ``"inception-v3-compat-2048"``); `None`
            when unknown, as in ADM's reference files.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_images: int | None = None
    feature_extractor: str | None = None

    @classmethod
    def from_features(cls, features: torch.Tensor | np.ndarray, feature_extractor: str | None = None):
        """Fit ``(N, d)`` features (N >= 2)."""
        accumulator = _StatisticsAccumulator()
        accumulator.update(torch.as_tensor(np.asarray(features)))
        return accumulator.result(feature_extractor)

    def save(self, path: str | os.PathLike) -> None:
        """Write ADM's statistics layout (``mu``, ``sigma``) plus ``num_images`` and ``feature_extractor``,
        atomically (a temporary file renamed into place)."""
        extra = {} if self.num_images is None else {"num_images": np.int64(self.num_images)}
        if self.feature_extractor is not None:
            extra["feature_extractor"] = np.str_(self.feature_extractor)
        atomic_write(path, lambda tmp: np.savez(tmp, mu=self.mu, sigma=self.sigma, **extra), suffix=".npz")

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureStatistics:
        """Read ``mu`` and ``sigma`` (ADM's reference files, or `save`'s), without unpickling anything.

        Raises:
            ValueError: naming the file, if it is truncated or damaged, or its statistics are not those of a Gaussian:
                ``mu`` not ``(d,)`` or ``sigma`` not ``(d, d)``, a value not finite, or ``sigma`` not symmetric
                positive semi-definite (up to `SYMMETRY_RTOL` and `PSD_RTOL`).
        """
        try:
            with np.load(path, allow_pickle=False) as data:
                if "mu" not in data or "sigma" not in data:
                    raise ValueError(f"{path} holds no reference statistics (mu, sigma); it has {sorted(data.keys())}")
                mu, sigma = data["mu"].astype(np.float64), data["sigma"].astype(np.float64)
                num_images = int(data["num_images"]) if "num_images" in data else None
                name = str(data["feature_extractor"]) if "feature_extractor" in data else None
        except _NPZ_ERRORS as err:
            raise ValueError(_damaged_npz(path, err)) from err
        problem = _not_a_gaussian(mu, sigma)
        if problem:
            raise ValueError(
                f"{path} holds invalid reference statistics: {problem}; compute them again (e.g. examples/"
                "evaluate_fid.py --reference REAL_IMAGES --save_reference_statistics FILE)"
            )
        return cls(mu, sigma, num_images, name)


def _not_a_gaussian(mu: np.ndarray, sigma: np.ndarray) -> str:
    """What makes ``(mu, sigma)`` not the mean and covariance of a Gaussian; an empty string if nothing does."""
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        return f"mu must be (d,) and sigma (d, d), got {mu.shape} and {sigma.shape}"
    for name, value in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(value).all():
            return f"{name} has {int((~np.isfinite(value)).sum())} values that are NaN or infinite"
    scale = np.abs(sigma).max()
    asymmetry = np.abs(sigma - sigma.T).max()
    if asymmetry > SYMMETRY_RTOL * scale:
        return f"sigma is not symmetric (largest |sigma - sigma^T| is {asymmetry:.3g}, largest |sigma| {scale:.3g})"
    eigenvalues = np.linalg.eigvalsh(sigma)
    if eigenvalues[0] < -PSD_RTOL * max(eigenvalues[-1], 0.0):
        return (
            f"sigma is not positive semi-definite (its smallest eigenvalue is {eigenvalues[0]:.3g}, its largest "
            f"{eigenvalues[-1]:.3g})"
        )
    return ""


class _StatisticsAccumulator:
    """Streaming float64 sums of features and of their outer products."""

    def __init__(self):
        self.total, self.outer, self.count = None, None, 0

    def update(self, features: torch.Tensor) -> None:
        features = features.detach().to("cpu", torch.float64)
        if self.total is None:
            self.total = torch.zeros(features.shape[1], dtype=torch.float64)
            self.outer = torch.zeros(features.shape[1], features.shape[1], dtype=torch.float64)
        self.total += features.sum(0)
        self.outer += features.T @ features
        self.count += len(features)

    def result(self, feature_extractor: str | None) -> FeatureStatistics:
        if self.count < 2:
            raise ValueError(f"statistics need at least 2 images, got {self.count}")
        mu = self.total / self.count
        sigma = (self.outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return FeatureStatistics(mu.numpy(), sigma.numpy(), self.count, feature_extractor)


def frechet_distance(a: FeatureStatistics, b: FeatureStatistics) -> float:
    """``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` in float64.

    ``tr((S_a S_b)^(1/2))`` is the sum of the square roots of the eigenvalues of ``S_a S_b`` (real and >= 0 for
    covariances; rounding below 0 is clipped), as torchmetrics computes it.

    Raises:
        ValueError: the two come from different feature spaces (dimension, or recorded extractor names).
    """
    if a.mu.shape != b.mu.shape:
        raise ValueError(
            f"the statistics have different feature dimensions ({a.mu.shape[0]} and {b.mu.shape[0]}); compute both "
            "with the same feature extractor (ADM's reference statistics are Inception's 2048-d pool features)"
        )
    if a.feature_extractor and b.feature_extractor and a.feature_extractor != b.feature_extractor:
        raise ValueError(
            f"the statistics come from different feature extractors ({a.feature_extractor!r} and "
            f"{b.feature_extractor!r}); FID is only defined within one feature space"
        )
    diff = a.mu - b.mu
    eigenvalues = np.linalg.eigvals(a.sigma @ b.sigma).real
    trace_sqrt = np.sqrt(np.clip(eigenvalues, 0, None)).sum()
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * trace_sqrt)


def inception_score(logits: torch.Tensor | np.ndarray, splits: int = 10) -> tuple[float, float]:
    """``exp(E_x KL(p(y|x) || p(y)))`` over ``splits`` equal parts of the logits, in float64: (mean, std).

    Args:
        logits (`torch.Tensor` or `np.ndarray`): ``(N, classes)`` unnormalised class scores.
        splits (`int`, defaults to 10): the standard protocol's 10 (on 50,000 samples).
    """
    logits = torch.as_tensor(np.asarray(logits), dtype=torch.float64)
    if isinstance(splits, bool) or not isinstance(splits, int) or not 1 <= splits <= len(logits):
        raise ValueError(f"splits must be an int in [1, {len(logits)}] (the number of samples), got {splits!r}")
    scores = []
    for part in logits.chunk(splits):
        log_p = torch.log_softmax(part, dim=1)
        log_marginal = torch.logsumexp(log_p, dim=0) - np.log(len(part))
        kl = (log_p.exp() * (log_p - log_marginal)).sum(1).mean()
        scores.append(float(kl.exp()))
    return float(np.mean(scores)), float(np.std(scores))


@torch.no_grad()
def compute_statistics(
    images: str | os.PathLike | torch.Tensor | Iterable[torch.Tensor],
    feature_extractor: str | nn.Module = "inception",
    batch_size: int = 250,
    device: str | torch.device | None = None,
    resolution: int | None = None,
    num_channels: int | None = None,
    return_logits: bool = False,
    cache_dir: str | os.PathLike | None = None,
    inception_weights_path: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> FeatureStatistics | tuple[FeatureStatistics, torch.Tensor | None]:
    """Feature statistics of a set of images, streamed in batches.

    Args:
        images: anything `image_batches` reads (an ``.npz``, a folder, a tensor or batches of them).
        feature_extractor: see `get_feature_extractor` (``"digits"`` takes the resolution of the first batch).
        batch_size (`int`, defaults to 250): images per feature-extractor call.
        device (`str` or `torch.device`, *optional*, defaults to CPU): where features are computed.
        resolution, num_channels: folders only, see `image_batches`.
        return_logits (`bool`, defaults to `False`): also return the extractor's class logits ``(N, classes)``
            for `inception_score` (`None` for an extractor without `features_and_logits`).
        cache_dir, inception_weights_path, allow_download: see `get_feature_extractor`.

    Returns:
        `FeatureStatistics`, or ``(statistics, logits)`` with ``return_logits``.
    """
    batches = image_batches(images, batch_size, resolution, num_channels)
    first = next(batches, None)
    if first is None:
        raise ValueError("no images to compute statistics of")
    extractor = get_feature_extractor(
        feature_extractor, first.shape[-1], cache_dir, inception_weights_path, allow_download
    )
    extractor = extractor.to(device if device is not None else "cpu").eval()
    device = next(extractor.parameters(), torch.empty(0)).device
    with_logits = return_logits and hasattr(extractor, "features_and_logits")
    accumulator, logits = _StatisticsAccumulator(), []
    with _single_threaded(extractor):
        for batch in _chain(first, batches):
            batch = batch.to(device)
            if with_logits:
                features, batch_logits = extractor.features_and_logits(batch)
                logits.append(batch_logits.float().cpu())
            else:
                features = extractor(batch)
            accumulator.update(features)
    statistics = accumulator.result(_extractor_name(extractor))
    if not return_logits:
        return statistics
    return statistics, torch.cat(logits) if with_logits else None


def _chain(first, rest):
    yield first
    yield from rest


def _source_fingerprint(reference: Path) -> str:
    """What identifies a reference folder's content: every file's relative path, size and modification time."""
    digest = hashlib.sha256()
    for f in _image_files(reference):
        stat = f.stat()
        digest.update(f"{f.relative_to(reference).as_posix()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def reference_statistics(
    reference: str | os.PathLike | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    image_column: str = "image",
    feature_extractor: str | nn.Module = "inception",
    resolution: int | None = None,
    num_channels: int | None = None,
    batch_size: int = 250,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    inception_weights_path: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> FeatureStatistics:
    """The statistics of the real data to compare samples with.

    Give exactly one of ``reference`` or ``dataset_name``:

    - ``reference`` an ``.npz`` with ``mu`` and ``sigma`` (ADM's reference statistics, e.g.
      ``VIRTUAL_imagenet256_labeled.npz``, or `FeatureStatistics.save`'s files): read as they are.
    - ``reference`` an ``.npz`` with only ``arr_0`` (a reference batch of uint8 images): its statistics are computed.
    - ``reference`` a folder of images, or ``dataset_name`` a `datasets` dataset (a Hub id or a local dataset path;
      see `load_image_dataset`): the images are center-cropped and resized to ``resolution`` (the samples'
      resolution) as the training data is, and their statistics are computed once and cached as
      ``<cache_dir>/fid-statistics/<key>.npz``, keyed on the data (a folder's file names, sizes and modification
      times; a dataset's `datasets` fingerprint), the preprocessing and the feature extractor. A feature
      extractor module of the caller's (which has no ``name`` attribute) is not cached.

    Args:
        reference (`str` or `os.PathLike`, *optional*): see above.
        dataset_name, dataset_config_name, split, image_column: the `datasets` source (see `load_image_dataset`).
        feature_extractor: see `get_feature_extractor`.
        resolution (`int`, *optional*): side of the processed images; required for a dataset.
        num_channels (`int`, *optional*): 1 or 3; defaults to each image's own for folders, 3 for datasets.
        batch_size, device, cache_dir, inception_weights_path, allow_download: see `compute_statistics`.
    """
    if (reference is None) == (dataset_name is None):
        raise ValueError(
            f"give exactly one of reference (an .npz or an image folder) or dataset_name, got reference={reference!r} "
            f"and dataset_name={dataset_name!r}"
        )
    common = dict(
        feature_extractor=feature_extractor,
        batch_size=batch_size,
        device=device,
        cache_dir=cache_dir,
        inception_weights_path=inception_weights_path,
        allow_download=allow_download,
    )
    if reference is not None:
        path = Path(reference)
        if path.is_file() and path.suffix == ".npz":
            try:
                with np.load(path, allow_pickle=False) as data:
                    keys = set(data.keys())
            except _NPZ_ERRORS as err:
                raise ValueError(_damaged_npz(path, err)) from err
            if {"mu", "sigma"} <= keys:
                return FeatureStatistics.load(path)
            if "arr_0" in keys:
                return compute_statistics(path, **common)
            raise ValueError(
                f"{path} holds neither reference statistics (mu, sigma) nor images (arr_0): {sorted(keys)}"
            )
        if not path.is_dir():
            raise ValueError(f"reference {str(reference)!r} is neither an .npz file nor a folder of images")
        source = {"folder": str(path.resolve()), "files": _source_fingerprint(path)}
        # Without a resolution the images keep their own size, which the first one tells (for the digits features).
        side = resolution or next(image_batches(path, 1, num_channels=num_channels)).shape[-1]

        def compute():
            return compute_statistics(path, resolution=resolution, num_channels=num_channels, **common)

    else:
        if resolution is None:
            raise ValueError("resolution is required to prepare a dataset's images (the samples' side, e.g. 256)")
        from ..data import ImageTransform, load_image_dataset

        dataset, _ = load_image_dataset(
            dataset_name=dataset_name,
            dataset_config_name=dataset_config_name,
            image_column=image_column,
            label_column=None,
            split=split,
        )
        transform = ImageTransform(resolution, num_channels=num_channels or 3)
        source = {
            "dataset": dataset_name,
            "config": dataset_config_name,
            "split": split,
            "fingerprint": dataset._fingerprint,
        }

        def batches():
            for start in range(0, len(dataset), batch_size):
                rows = dataset[start : start + batch_size]["image"]
                yield (torch.stack([transform(image) for image in rows]) + 1) / 2

        def compute():
            return compute_statistics(batches(), **common)

        side = resolution

    extractor = get_feature_extractor(feature_extractor, side, cache_dir, inception_weights_path, allow_download)
    name = _extractor_name(extractor)
    common["feature_extractor"] = extractor
    if name is None:
        return compute()
    key = {**source, "resolution": resolution, "num_channels": num_channels, "feature_extractor": name, "version": 1}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    cached = Path(cache_dir if cache_dir is not None else DEFAULT_CACHE_DIR).expanduser() / "fid-statistics"
    cached = cached / f"{digest}.npz"
    if cached.is_file():
        try:
            return FeatureStatistics.load(cached)
        except ValueError as err:
            logger.warning(f"Ignoring unusable cached reference statistics ({err}); computing them again")
    statistics = compute()
    statistics.save(cached)
    return statistics


def evaluate_samples(
    samples: str | os.PathLike | torch.Tensor | Iterable[torch.Tensor],
    reference: str | os.PathLike | FeatureStatistics | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    split: str = "train",
    image_column: str = "image",
    feature_extractor: str | nn.Module = "inception",
    inception_score_splits: int | None = 10,
    batch_size: int = 250,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    inception_weights_path: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> dict[str, Any]:
    """FID of samples against real data, and their Inception Score.

    Args:
        samples: anything `image_batches` reads; typically the ``.npz`` or PNG folder of ``examples/sample.py``.
        reference: see `reference_statistics`, or ready `FeatureStatistics`.
        dataset_name, dataset_config_name, split, image_column: a `datasets` reference instead (see
            `reference_statistics`); its images are prepared at the samples' resolution and channel count.
        feature_extractor: see `get_feature_extractor`.
        inception_score_splits (`int`, *optional*, defaults to 10): splits of the Inception Score (computed on the
            logits of the feature extractor: Inception's 1008 classes, or the digits classifier's 10); `None` skips
            it.
        batch_size, device, cache_dir, inception_weights_path, allow_download: see `compute_statistics`.

    Returns:
        `dict`: ``fid``, ``inception_score`` and ``inception_score_std`` (`None` when skipped or not available),
        ``num_samples``, ``num_reference`` (`None` when the reference file does not record it),
        ``feature_extractor`` (its name, or the module's class name) and ``resolution``.
    """
    common = dict(
        batch_size=batch_size,
        device=device,
        cache_dir=cache_dir,
        inception_weights_path=inception_weights_path,
        allow_download=allow_download,
    )
    batches = image_batches(samples, batch_size)
    first = next(batches, None)
    if first is None:
        raise ValueError(f"{samples} holds no images" if isinstance(samples, (str, os.PathLike)) else "no samples")
    if not isinstance(samples, (str, os.PathLike, torch.Tensor)):
        samples = _chain(first, batches)  # an iterator is read once: go on from the batch already read
    resolution, channels = first.shape[-1], first.shape[1]
    extractor = get_feature_extractor(feature_extractor, resolution, cache_dir, inception_weights_path, allow_download)
    if inception_score_splits is not None:
        fake, logits = compute_statistics(samples, extractor, return_logits=True, **common)
    else:
        fake, logits = compute_statistics(samples, extractor, **common), None
    if isinstance(reference, FeatureStatistics):
        real = reference
    else:
        real = reference_statistics(
            reference,
            dataset_name=dataset_name,
            dataset_config_name=dataset_config_name,
            split=split,
            image_column=image_column,
            feature_extractor=extractor,
            resolution=resolution,
            num_channels=channels,
            **common,
        )
    score = inception_score(logits, inception_score_splits) if logits is not None else (None, None)
    return {
        "fid": frechet_distance(fake, real),
        "inception_score": score[0],
        "inception_score_std": score[1],
        "num_samples": fake.num_images,
        "num_reference": real.num_images,
        "feature_extractor": _extractor_name(extractor) or type(extractor).__name__,
        "resolution": resolution,
    }


# ---------------------------------------------------------------------------------------------------------
# FID between two image sets in memory (through torchmetrics' metric)
# ---------------------------------------------------------------------------------------------------------


def _fids_against(
    real_images: torch.Tensor,
    candidates: list[torch.Tensor],
    feature_extractor="digits",
    batch_size: int = 256,
    device=None,
    cache_dir=None,
    inception_weights_path=None,
    allow_download: bool = False,
) -> list[float]:
    """FID of each candidate set against one real set, extracting the real features once."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real_images = _check_images(real_images, "real_images")
    candidates = [_check_images(c, f"candidate set {i}") for i, c in enumerate(candidates)]
    extractor = get_feature_extractor(
        feature_extractor, real_images.shape[-1], cache_dir, inception_weights_path, allow_download
    )
    metric = FrechetInceptionDistance(
        feature=extractor, normalize=True, reset_real_features=False, input_img_size=tuple(real_images.shape[1:])
    )
    metric = metric.to(device if device is not None else "cpu")
    fids = []
    with _single_threaded(metric.inception):
        for chunk in real_images.split(batch_size):
            metric.update(chunk.to(metric.device), real=True)
        for images in candidates:
            metric.reset()
            for chunk in images.split(batch_size):
                metric.update(chunk.to(metric.device), real=False)
            fids.append(float(metric.compute()))
    return fids


def compute_fid(
    real_images: torch.Tensor,
    fake_images: torch.Tensor,
    feature_extractor: str | nn.Module = "digits",
    batch_size: int = 256,
    device: str | torch.device | None = None,
    cache_dir: str | os.PathLike | None = None,
    inception_weights_path: str | os.PathLike | None = None,
    allow_download: bool = False,
) -> float:
    """Fréchet distance between the features of two image sets, through torchmetrics' `FrechetInceptionDistance`.

    Args:
        real_images (`torch.Tensor`): float ``(B, 1|3, H, W)`` in [0, 1] (uint8 in 0..255 is also accepted). At least
            2 images; FID is biased upwards for small sets, so compare numbers computed with the same set sizes.
        fake_images (`torch.Tensor`): as ``real_images``.
        feature_extractor (`str` or `nn.Module`, defaults to ``"digits"``):
            ``"digits"``: the 128-d feature layer of `get_digits_classifier` (seed 0) at the real images'
            resolution, trained and cached on first use, offline; images become gray.
            ``"inception"``: the standard 2048-d Inception-v3 pool features (`InceptionFeatureExtractor`; needs
            torch-fidelity and the weights, see `resolve_inception_weights`).
            Or an `nn.Module` mapping the float images as given to ``(B, d)`` features (a ``num_features``
            attribute saves torchmetrics a dummy forward).
        batch_size (`int`, defaults to 256): images per feature-extractor call.
        device (`str` or `torch.device`, *optional*, defaults to CPU): where features are computed.
        cache_dir (`str` or `os.PathLike`, *optional*): cache of the digits classifier (see `get_digits_classifier`).
        inception_weights_path (`str` or `os.PathLike`, *optional*): see `resolve_inception_weights`.
        allow_download (`bool`, defaults to `False`): see `resolve_inception_weights`.

    Returns:
        `float`: the FID (0 for identical sets, larger is worse).
    """
    return _fids_against(
        real_images,
        [fake_images],
        feature_extractor=feature_extractor,
        batch_size=batch_size,
        device=device,
        cache_dir=cache_dir,
        inception_weights_path=inception_weights_path,
        allow_download=allow_download,
    )[0]
