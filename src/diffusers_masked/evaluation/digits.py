"""The offline digits evaluation: FID of generated digits against the real ones, its real-vs-real floor, and the
class accuracy of class-conditional samples, in the digits classifier's feature space
(`diffusers_masked.evaluation.features`); results as model-card entries.

Images are float tensors ``(B, C, H, W)`` with values in [0, 1] (`diffusers_masked.evaluation.images`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data.captions import DIGIT_WORDS
from .features import _digits_tensors, classification_accuracy, get_digits_classifier
from .fid import _fids_against
from .images import _check_images, images_to_tensor

# The prompt a text-conditioned pipeline is evaluated with, per digit (one of the captioned digits' templates).
DIGIT_PROMPT = "a handwritten {word}"


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
    text = results.get("prompt_template") is not None
    if text:
        task = {"task_type": "text-to-image", "task_name": "Text-to-image generation"}
    elif conditional:
        task = {"task_type": "image-generation", "task_name": "Class-conditional image generation"}
    else:
        task = {"task_type": "unconditional-image-generation", "task_name": "Unconditional image generation"}
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
                metric_name=(
                    f"Prompted-digit accuracy of samples ('{results['prompt_template']}', digits classifier)"
                    if text
                    else "Class accuracy of samples (digits classifier)"
                ),
                metric_value=round(results["accuracy"], 4),
                **common,
            )
        )
    if results.get("bold_heavier_share") is not None:
        entries.append(
            EvalResult(
                metric_type="accuracy",
                metric_name="Share of bold/thin prompt pairs whose bold sample has more ink",
                metric_value=round(results["bold_heavier_share"], 4),
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
    prompt_template: str = DIGIT_PROMPT,
) -> dict[str, Any] | tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    """Generate ``num_samples_per_class`` digits of each class with a class-conditional pipeline and evaluate them;
    an unconditional pipeline (its transformer has ``num_classes=0``) draws ``10 * num_samples_per_class`` digits.

    A class-conditional pipeline is called as ``pipeline(class_labels=[c] * n, guidance_scale=...,
    num_inference_steps=..., generator=..., output_type="pt").images`` (the `MaskDiTPipeline` interface), an
    unconditional one as ``pipeline(batch_size=n, num_inference_steps=..., generator=..., output_type="pt")`` (the
    `MaskDMPipeline` interface; no accuracy, no guidance), in batches of at most ``batch_size``. The real reference
    is the digits' ``"train"`` split and the floor uses the ``"heldout"``
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
        prompt_template (`str`, defaults to ``"a handwritten {word}"``): for a text-conditioned pipeline, the prompt
            of each digit (``{word}``: "seven", ``{digit}``: 7); the accuracy is then the share of samples the
            classifier assigns to the prompted digit.

    Returns:
        `dict`: `evaluate_digits_samples`' results plus the sampling settings; with ``return_samples=True``, the
        tuple ``(results, images, labels)``.
    """
    images, labels = [], []
    text = bool(getattr(pipeline, "is_text_conditioned", False))
    conditional = text or pipeline.transformer.config.num_classes > 0
    for label in range(10) if conditional else [None] * 10:
        remaining = num_samples_per_class
        while remaining > 0:
            n = min(batch_size, remaining)
            if text:
                prompt = prompt_template.format(word=DIGIT_WORDS[label], digit=label)
                call = {"prompt": [prompt] * n, "guidance_scale": guidance_scale}
            elif conditional:
                call = {"class_labels": [label] * n, "guidance_scale": guidance_scale}
            else:
                call = {"batch_size": n}
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
    if text:
        results["prompt_template"] = prompt_template
    if return_samples:
        return results, fake_images, labels
    return results


def evaluate_stroke_control(
    pipeline,
    num_samples_per_class: int = 8,
    generator_seed: int = 0,
    guidance_scale: float = 3.0,
    num_inference_steps: int = 40,
    templates: tuple[str, str] = ("a bold handwritten {word}", "a thin handwritten {word}"),
) -> dict[str, Any]:
    """Does a prompt's stroke attribute change the image? For each digit, `num_samples_per_class` samples prompted
    ``bold`` and as many prompted ``thin``, from the same starting noise (one generator seed per pair), and their ink:
    the mean pixel value in [0, 1] (the stroke mass). Returns the mean ink of each, their difference, and the share
    of pairs in which the bold sample has more ink than its thin twin (0.5: the attribute does nothing)."""
    inks = {}
    for weight, template in zip(("bold", "thin"), templates):
        values = []
        for label in range(10):
            prompt = [template.format(word=DIGIT_WORDS[label], digit=label)] * num_samples_per_class
            generators = [
                torch.Generator().manual_seed(generator_seed + 1000 * label + i) for i in range(num_samples_per_class)
            ]
            output = pipeline(
                prompt=prompt,
                generator=generators,
                guidance_scale=guidance_scale,
                num_inference_steps=num_inference_steps,
                output_type="pt",
            )
            values.append(images_to_tensor(output.images).flatten(1).mean(dim=1))
        inks[weight] = torch.cat(values)
    return {
        "mean_ink_bold": float(inks["bold"].mean()),
        "mean_ink_thin": float(inks["thin"].mean()),
        "ink_difference": float(inks["bold"].mean() - inks["thin"].mean()),
        "bold_heavier_share": float((inks["bold"] > inks["thin"]).float().mean()),
        "num_pairs": int(inks["bold"].numel()),
        "templates": list(templates),
    }
