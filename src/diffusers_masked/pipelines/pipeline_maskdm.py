"""MaskDMPipeline: pixel-space sampling from a MaskDM U-ViT (or any masked transformer) with a DDPM-family
scheduler."""

from __future__ import annotations

import inspect
import math

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..models.masked_dit import MaskedDiTTransformer2DModel
from ..models.masked_uvit import MaskedUViTTransformer2DModel
from .pipeline_utils import MaskedDiffusionPipeline

OUTPUT_TYPES = ("pil", "np", "pt")


class MaskDMPipeline(MaskedDiffusionPipeline):
    r"""
    Sample images in pixel space from a [`MaskedUViTTransformer2DModel`] (MaskDM, Lei et al. 2023) or any
    noise-predicting masked transformer of this package, such as a [`MaskedDiTTransformer2DModel`].

    The pipeline only orchestrates: the transformer predicts the noise from `(x_t, t)`, the scheduler owns the noise
    schedule. MaskDM's own evaluation samples with DDIM, x0 clipped to [-1, 1], 250 steps and eta = 1; that is
    [`~MaskDMPipeline.default_scheduler`] with this pipeline's defaults. [`~diffusers.DDPMScheduler`] swaps in
    through `from_config`; for few-step sampling use [`~MaskDMPipeline.dpm_solver_scheduler`] (DPM-Solver++ with x0
    clipped as DDIM's), not a bare `DPMSolverMultistepScheduler.from_config`, whose unclipped x0 ruins the samples.

    Args:
        transformer ([`MaskedUViTTransformer2DModel`] or [`MaskedDiTTransformer2DModel`]): The noise predictor,
            working on images in [-1, 1].
        scheduler ([`~diffusers.SchedulerMixin`]): A DDPM-family sampler, e.g. [`~diffusers.DDIMScheduler`].
    """

    model_cpu_offload_seq = "transformer"
    _shim_module = "pipeline_maskdm"
    _model_card_tags = ["maskdm", "pixel-space"]
    _paper = "https://arxiv.org/abs/2306.11363"

    def __init__(
        self,
        transformer: MaskedUViTTransformer2DModel | MaskedDiTTransformer2DModel,
        scheduler: SchedulerMixin,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(do_normalize=True)

    @staticmethod
    def default_scheduler(config: dict | None = None) -> DDIMScheduler:
        """MaskDM's evaluation sampler: [`~diffusers.DDIMScheduler`] with x0 clipped to [-1, 1] and the official
        step spacing (`"trailing"`: 999, 995, ..., 3 for 250 steps, the last step landing on x0), on the noise
        schedule of `config` (e.g. the training scheduler's config), or on MaskDM's default cosine betas
        (`"squaredcos_cap_v2"`, 1000 steps) without one."""
        base = dict(config) if config is not None else {"beta_schedule": "squaredcos_cap_v2"}
        return DDIMScheduler.from_config(
            base, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True, timestep_spacing="trailing"
        )

    @staticmethod
    def dpm_solver_scheduler(config: dict | None = None) -> DPMSolverMultistepScheduler:
        """DPM-Solver++ (2M) for few-step sampling: [`~diffusers.DPMSolverMultistepScheduler`] with x0 clipped to
        [-1, 1] (`thresholding=True, sample_max_value=1.0`: DPM-Solver's name for DDIM's `clip_sample`; the range is
        `config`'s `clip_sample_range` where it has one), on the noise schedule of `config` (e.g. the pipeline's
        scheduler's) or on MaskDM's default cosine betas without one.

        The clipping is not optional for an epsilon-predicting model. At the first step (t = 999 on the cosine
        schedule) x0 is predicted as `(x_t - sqrt(1 - a) * eps) / sqrt(a)` with `sqrt(a)` about 5e-5, so any error
        in `eps` is multiplied by 2e4; unclipped, that x0 pushes the sample far outside what the model was trained
        on, and it never recovers. On the digits default a bare `DPMSolverMultistepScheduler.from_config` gave
        samples of noise (digits-FID 690 at 25 steps) where this one gives 61 (docs/maskdm.md)."""
        base = dict(config) if config is not None else {"beta_schedule": "squaredcos_cap_v2"}
        return DPMSolverMultistepScheduler.from_config(
            base,
            algorithm_type="dpmsolver++",
            solver_order=2,
            thresholding=True,
            sample_max_value=float(base.get("clip_sample_range", 1.0)),
        )

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    def _usage_example(self) -> str:
        if self.num_classes:
            return "images = pipe(class_labels=[0, 1], guidance_scale=2.0).images  # DDIM, 250 steps"
        return "images = pipe(batch_size=4).images  # DDIM, 250 steps"

    def _image_size(self) -> tuple[int, int]:
        size = self.transformer.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def _check_inputs(self, batch_size, class_labels, guidance_scale, num_inference_steps, eta, output_type):
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        num_train_timesteps = self.scheduler.config.get("num_train_timesteps")
        if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be at most the scheduler's num_train_timesteps={num_train_timesteps}, "
                f"got {num_inference_steps}"
            )
        if (
            isinstance(guidance_scale, bool)
            or not isinstance(guidance_scale, (int, float))
            or not math.isfinite(guidance_scale)
            or guidance_scale < 0
        ):
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")

        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError("class_labels were given but the transformer is unconditional (num_classes=0)")
            if guidance_scale != 1:
                raise ValueError(
                    f"guidance_scale applies to class-conditional transformers only; this one is unconditional "
                    f"(num_classes=0), so leave guidance_scale at 1.0 (got {guidance_scale})"
                )
            return None, batch_size
        if class_labels is None:
            raise ValueError(
                f"class_labels are required by this class-conditional transformer: ids in [0, {self.num_classes}), "
                "one image each (guidance_scale=0 samples the null class alone)"
            )
        if isinstance(class_labels, torch.Tensor):
            if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool or class_labels.ndim > 1:
                raise TypeError(f"class_labels must be integer ids, got a {class_labels.dtype} tensor")
            class_labels = class_labels.reshape(-1).tolist()
        elif isinstance(class_labels, int):
            class_labels = [class_labels]
        labels = list(class_labels)
        if not labels:
            raise ValueError("class_labels must not be empty")
        for label in labels:
            if isinstance(label, bool) or not isinstance(label, int):
                raise TypeError(f"class_labels must be int ids, got {label!r}")
            if not 0 <= label < self.num_classes:
                raise ValueError(f"class label {label} is out of range: ids must be in [0, {self.num_classes})")
        if batch_size not in (1, len(labels)):
            raise ValueError(
                f"with class_labels the batch is one image per label ({len(labels)}); leave batch_size at 1 or set it "
                f"to {len(labels)}, got {batch_size}"
            )
        return labels, len(labels)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | list[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 250,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            batch_size (`int`, defaults to 1): Number of images from an unconditional transformer. With
                `class_labels` the batch is one image per label.
            class_labels (`int`, a list of them or a `torch.Tensor`, *optional*): Class ids in `[0, num_classes)`,
                required by (and only for) a class-conditional transformer.
            guidance_scale (`float`, defaults to 1.0): Classifier-free guidance scale `s`: the noise prediction is
                `uncond + s * (cond - uncond)`, the unconditional branch using the null class `num_classes`. At 1 the
                conditional prediction is used alone (one pass); 0 samples the null class. The official code's
                `guidance_weight` `w` is `s = 1 + w`.
            num_inference_steps (`int`, defaults to 250): Sampler steps, at most the scheduler's
                `num_train_timesteps`.
            eta (`float`, defaults to 1.0): DDIM's noise weight in [0, 1] (0: deterministic); passed to schedulers
                whose `step` takes it, ignored by the others.
            generator (`torch.Generator` or a list of them, *optional*): For the initial noise and the sampler's noise.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"` (images in [0, 1]).
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` or a tuple.

        Returns:
            [`~diffusers.ImagePipelineOutput`] with `images`, or a tuple `(images,)`.
        """
        labels, batch = self._check_inputs(
            batch_size, class_labels, guidance_scale, num_inference_steps, eta, output_type
        )
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} images")

        device = self._execution_device
        dtype = self.transformer.dtype
        height, width = self._image_size()
        shape = (batch, self.transformer.config.in_channels, height, width)
        sample = randn_tensor(shape, generator=generator, device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        guided = labels is not None and guidance_scale != 1
        if labels is not None:
            labels = torch.tensor(labels, device=device, dtype=torch.long)
            model_labels = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels
        else:
            model_labels = None
        step_parameters = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"eta": eta} if "eta" in step_parameters else {}
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([sample, sample]) if guided else sample
            model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = torch.as_tensor(t, device=device).expand(model_input.shape[0])
            noise_pred = self.transformer(model_input, timestep, class_labels=model_labels).sample
            if guided:
                cond, uncond = noise_pred.chunk(2)
                noise_pred = uncond + guidance_scale * (cond - uncond)
            sample = self.scheduler.step(noise_pred, t, sample, **step_kwargs).prev_sample

        images = self.image_processor.postprocess(sample.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
