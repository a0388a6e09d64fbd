"""What a run shows and measures of its model: sample grids (every class in a row), saved to the output folder and
TensorBoard, and the built-in digits run's final evaluation (FID against the real digits, its floor, accuracy).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from ..utils.io import atomic_write
from .outputs import record_outputs

logger = logging.getLogger(__name__)


def sample_grid(pipeline, num_classes: int, per_class: int, seed: int, prompts=None, **pipeline_kwargs):
    """One row per class (``0 .. num_classes - 1``), `per_class` samples each, from a fixed seed.

    An unconditional pipeline (``pipeline.num_classes == 0``) fills the same grid with ``batch_size`` samples; with
    `prompts` (a text-to-image pipeline) each row is one prompt, and `num_classes` is ignored.

    Args:
        pipeline: a class-conditional pipeline taking ``class_labels``, or an unconditional one.
        num_classes (`int`): rows of the grid.
        per_class (`int`): columns.
        seed (`int`): seed of the generator on the pipeline's device.
        pipeline_kwargs: passed on, e.g. ``guidance_scale``, ``num_inference_steps``.
    """
    if prompts is not None:
        inputs, num_classes = {"prompt": [p for p in prompts for _ in range(per_class)]}, len(prompts)
    elif getattr(pipeline, "num_classes", None) == 0:
        inputs = {"batch_size": num_classes * per_class}
    else:
        inputs = {"class_labels": [c for c in range(num_classes) for _ in range(per_class)]}
    images = pipeline(
        **inputs,
        generator=torch.Generator(device=pipeline.device).manual_seed(seed),
        output_type="pil",
        **pipeline_kwargs,
    ).images
    return image_grid(images, rows=num_classes, cols=per_class)


def image_grid(images, rows: int, cols: int):
    """`make_image_grid` with a 1-pixel grey border around each image (small digits otherwise run together)."""
    from diffusers.utils import make_image_grid
    from PIL import ImageOps

    def border(image):
        bands = len(image.getbands())
        return ImageOps.expand(image, border=1, fill=(128,) * bands if bands > 1 else 128)

    return make_image_grid([border(image) for image in images], rows=rows, cols=cols)


def save_validation_grid(
    accelerator, grid, output_dir: str | os.PathLike, global_step: int, run_id: str, tag: str = "validation"
):
    """Write a validation grid to ``output_dir/validation/step-N.png`` (recorded as the run's `run_id`'s) and to
    TensorBoard (main process only)."""
    if not accelerator.is_main_process:
        return
    name = f"validation/step-{global_step:07d}.png"
    atomic_write(Path(output_dir) / name, lambda tmp: grid.save(tmp, format="PNG"))
    record_outputs(output_dir, run_id, [name])
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images(tag, np.asarray(grid)[None], global_step, dataformats="NHWC")


def evaluate_on_digits(
    pipeline,
    *,
    num_samples_per_class: int,
    resolution: int,
    seed: int,
    grid_rows: int,
    grid_cols: int,
    cache_dir=None,
    **sampling_kwargs,
):
    """The built-in digits run's final evaluation (`evaluate_pipeline_on_digits`: FID against the real set, the
    real-vs-real floor and, class- or text-conditional, the accuracy; text-conditional, also the bold/thin control of
    `evaluate_stroke_control`).

    Returns:
        `tuple`: ``(metrics, eval_results, grid)``: the numbers, their model-card entries, and a grid of exactly the
        samples evaluated (class-conditional: the first `grid_cols` of the first `grid_rows` classes; unconditional:
        the first `grid_rows * grid_cols`), or `None` if fewer were drawn.
    """
    from diffusers.utils import numpy_to_pil

    from ..evaluation import eval_results_for_model_card, evaluate_pipeline_on_digits
    from ..evaluation.digits import evaluate_stroke_control

    metrics, samples, labels = evaluate_pipeline_on_digits(
        pipeline,
        num_samples_per_class=num_samples_per_class,
        resolution=resolution,
        generator=torch.Generator().manual_seed(seed),
        cache_dir=cache_dir,
        return_samples=True,
        **sampling_kwargs,
    )
    if getattr(pipeline, "is_text_conditioned", False):  # the captioned digits: does "bold"/"thin" work?
        stroke = evaluate_stroke_control(
            pipeline,
            num_samples_per_class=max(1, num_samples_per_class // 4),
            generator_seed=seed,
            guidance_scale=sampling_kwargs.get("guidance_scale", 3.0),
            num_inference_steps=sampling_kwargs.get("num_inference_steps", 40),
        )
        metrics.update({k: v for k, v in stroke.items() if k != "templates"}, stroke_templates=stroke["templates"])
    if labels is not None:  # samples come class by class
        chosen = torch.cat([samples[c * num_samples_per_class :][:grid_cols] for c in range(grid_rows)])
        enough = grid_cols <= num_samples_per_class
    else:
        chosen = samples[: grid_rows * grid_cols]
        enough = grid_rows * grid_cols <= len(samples)
    grid = (
        image_grid(numpy_to_pil(chosen.permute(0, 2, 3, 1).cpu().numpy()), rows=grid_rows, cols=grid_cols)
        if enough
        else None
    )
    logger.info("evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    return metrics, eval_results_for_model_card(metrics), grid
