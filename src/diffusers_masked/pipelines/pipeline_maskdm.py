"""MaskDMPipeline: pixel-space sampling from a MaskDM U-ViT (or any masked transformer) with a DDPM-family
scheduler."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Sequence

import diffusers
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import KarrasDiffusionSchedulers, SchedulerMixin

from ..models.masked_dit import MaskedDiTTransformer2DModel
from ..models.masked_uvit import MaskedUViTTransformer2DModel
from ..schedulers.masked_training import EDM_SCHEDULERS
from .pipeline_utils import MaskedDiffusionPipeline, check_guidance_scale, check_positive_int, class_label_ids

OUTPUT_TYPES = ("pil", "np", "pt")


@functools.cache
def ddpm_schedulers() -> tuple[type[SchedulerMixin], ...]:
    """diffusers' schedulers for discrete-time DDPM models (its `KarrasDiffusionSchedulers`, which `DDPMScheduler`
    lists as compatible) less the EDM ones, which that list also holds but which sample in sigma space with EDM
    preconditioning."""
    classes = (getattr(diffusers, scheduler.name) for scheduler in KarrasDiffusionSchedulers)
    return tuple(cls for cls in classes if not issubclass(cls, EDM_SCHEDULERS))


class MaskDMPipeline(MaskedDiffusionPipeline):
    r"""
    Sample images in pixel space from a [`MaskedUViTTransformer2DModel`] (MaskDM, Lei et al. 2023) or any
    noise-predicting masked transformer of this package, such as a [`MaskedDiTTransformer2DModel`].

    The pipeline only orchestrates: the transformer predicts the noise from `(x_t, t)`, the scheduler owns the noise
    schedule. MaskDM's own evaluation samples with DDIM, x0 clipped to [-1, 1], 250 steps and eta = 1; that is
    [`~MaskDMPipeline.default_scheduler`] with this pipeline's defaults. [`~diffusers.DDPMScheduler`] swaps in
    through `from_config`; for few-step sampling use [`~MaskDMPipeline.dpm_solver_scheduler`] (DPM-Solver++ with x0
    clipped as DDIM's), not a bare `DPMSolverMultistepScheduler.from_config`, whose unclipped x0 ruins the samples.

    An EDM scheduler is refused (see [`~MaskedDiffusionPipeline.check_scheduler`]): it works in sigma space with EDM
    preconditioning, not on the DDPM steps the transformer is trained on.

    Args:
        transformer ([`MaskedUViTTransformer2DModel`] or [`MaskedDiTTransformer2DModel`]): The noise predictor,
            working on images in [-1, 1].
        scheduler ([`~diffusers.SchedulerMixin`]): A DDPM-family sampler, e.g. [`~diffusers.DDIMScheduler`].
    """

    model_cpu_offload_seq = "transformer"
    _shim_module = "pipeline_maskdm"
    _model_card_tags = ["maskdm", "pixel-space"]
    _paper = (
        "MaskDM, Lei et al. 2023, "
        "[*Masked Diffusion Models Are Fast Distribution Learners*](https://arxiv.org/abs/2306.11363)"
    )
    _scheduler_requirement = (
        "the transformer predicts the noise of a discrete-time DDPM at integer steps t in [0, num_train_timesteps), "
        "which a scheduler working in sigma space with EDM preconditioning does not sample."
    )
    _scheduler_fix = (
        "Use `MaskDMPipeline.default_scheduler(config)` (DDIM, x0 clipped) or "
        "`MaskDMPipeline.dpm_solver_scheduler(config)`; pass `scheduler=...` to `from_pretrained` for a folder whose "
        "model_index.json names another."
    )

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

    @classmethod
    def compatible_schedulers(cls) -> tuple[type[SchedulerMixin], ...]:
        """diffusers' DDPM-family schedulers ([`ddpm_schedulers`]): DDIM, DDPM, DPM-Solver, Euler, ..."""
        return ddpm_schedulers()

    def _usage_example(self) -> str:
        if self.num_classes:
            return "images = pipe(class_labels=[0, 1], guidance_scale=2.0).images  # DDIM, 250 steps"
        return "images = pipe(batch_size=4).images  # DDIM, 250 steps"

    def _image_size(self) -> tuple[int, int]:
        size = self.transformer.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def check_inputs(
        self, batch_size, class_labels, guidance_scale, num_inference_steps, num_images_per_prompt, eta, output_type
    ) -> None:
        """Refuse bad arguments before anything is drawn, with a `ValueError` that names the argument and the allowed
        values (the labels themselves are checked by [`~pipeline_utils.class_label_ids`])."""
        check_positive_int("num_inference_steps", num_inference_steps)
        num_train_timesteps = self.scheduler.config.get("num_train_timesteps")
        if num_train_timesteps is not None and num_inference_steps > num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must be at most the scheduler's num_train_timesteps={num_train_timesteps}, "
                f"got {num_inference_steps}"
            )
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_guidance_scale(guidance_scale)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1:
            raise ValueError(f"eta must be a number in [0, 1] (0: deterministic DDIM, 1: DDPM-like), got {eta!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        check_positive_int("batch_size", batch_size)
        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError("class_labels were given but the transformer is unconditional (num_classes=0)")
            if guidance_scale != 1:
                raise ValueError(
                    f"guidance_scale applies to class-conditional transformers only; this one is unconditional "
                    f"(num_classes=0), so leave guidance_scale at 1.0 (got {guidance_scale})"
                )
        elif class_labels is None:
            raise ValueError(
                f"class_labels are required by this class-conditional transformer: ids in [0, {self.num_classes}), "
                "one image each (guidance_scale=0 samples the null class alone)"
            )

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        guidance_scale: float = 1.0,
        num_inference_steps: int = 250,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        num_images_per_prompt: int = 1,
        latents: torch.Tensor | None = None,
        callback_on_step_end: Callable[[MaskedDiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            batch_size (`int`, defaults to 1): Number of images from an unconditional transformer. With
                `class_labels` the batch is one image per label (`batch_size` may then only be 1 or their number).
            class_labels (`int`, a list of them, a `torch.Tensor` or numpy array of ints, *optional*): Class ids in
                `[0, num_classes)`, in any shape that flattens to one per image (`[3, 7]`, `[[3], [7]]`, a `(B, 1)`
                tensor), as diffusers' `DiTPipeline` takes them; required by (and only for) a class-conditional
                transformer.
            guidance_scale (`float`, defaults to 1.0): Classifier-free guidance scale `s`: the noise prediction is
                `uncond + s * (cond - uncond)`, the unconditional branch using the null class `num_classes`. At 1 the
                conditional prediction is used alone (one pass); 0 samples the null class. The official code's
                `guidance_weight` `w` is `s = 1 + w`.
            num_inference_steps (`int`, defaults to 250): Sampler steps, at most the scheduler's
                `num_train_timesteps`.
            eta (`float`, defaults to 1.0): DDIM's noise weight in [0, 1] (0: deterministic); passed to schedulers
                whose `step` takes it, ignored by the others.
            generator (`torch.Generator` or a list of them, *optional*): For the initial noise and the sampler's noise;
                a list has one generator per image of the final batch (after `num_images_per_prompt`).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` or `"pt"` (images in [0, 1]).
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` or a tuple.
            num_images_per_prompt (`int`, defaults to 1): Images per class label, next to each other in the output
                (`[a, a, b, b]` for labels `[a, b]` and 2); for an unconditional transformer it multiplies
                `batch_size`.
            latents (`torch.Tensor`, *optional*): Starting standard-normal noise `(batch, C, H, W)` of the final batch,
                in place of noise drawn from `generator`; it is scaled by the scheduler's `init_noise_sigma`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): Called
                after every scheduler step as in diffusers, `callback_on_step_end(pipe, step_index, timestep,
                callback_kwargs)`, and returns a dict; a `"latents"` entry in it (the current images in [-1, 1])
                replaces them.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): The tensors put in
                `callback_kwargs`, from `_callback_tensor_inputs`.

        Returns:
            [`~diffusers.ImagePipelineOutput`] with `images`, or a tuple `(images,)`.

        Raises:
            FloatingPointError: The final sample holds NaN or inf; the message names the likely cause (a
                `guidance_scale` too large for the transformer's dtype, the `latents` given, the model).
        """
        self.check_inputs(
            batch_size, class_labels, guidance_scale, num_inference_steps, num_images_per_prompt, eta, output_type
        )
        tensor_inputs = self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        if class_labels is not None:
            ids = class_label_ids(class_labels, self.num_classes)
            if batch_size not in (1, len(ids)):
                raise ValueError(
                    f"with class_labels the batch is one image per label ({len(ids)}); leave batch_size at 1 or set "
                    f"it to {len(ids)}, got {batch_size}"
                )
            labels = torch.tensor(ids, device=device, dtype=torch.long).repeat_interleave(num_images_per_prompt)
            batch = labels.shape[0]
        else:
            labels, batch = None, batch_size * num_images_per_prompt
        self._check_generator(generator, batch)

        height, width = self._image_size()
        shape = (batch, self.transformer.config.in_channels, height, width)
        given_latents = latents
        latents = self.prepare_latents(shape, self.transformer.dtype, device, generator, given_latents)
        guidance = float(guidance_scale) if labels is not None and guidance_scale != 1 else None
        step_parameters = inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"eta": eta} if "eta" in step_parameters else {}
        if "generator" in step_parameters:
            step_kwargs["generator"] = generator
        latents = self._denoise(
            latents, labels, guidance, num_inference_steps, step_kwargs, callback_on_step_end, tensor_inputs
        )
        self._check_finite(latents, guidance, given_latents, callback_on_step_end)

        images = self.image_processor.postprocess(latents.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
