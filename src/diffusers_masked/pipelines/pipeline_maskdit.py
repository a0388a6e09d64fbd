"""MaskDiTPipeline: sampling from a MaskDiT transformer, class-conditional with classifier-free guidance or
unconditional."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from diffusers import AutoencoderKL
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin

from ..models.masked_dit import MaskedDiTTransformer2DModel
from ..schedulers.masked_training import EDM_SCHEDULERS
from ..schedulers.scheduling_edm_heun import EDMHeunScheduler
from .pipeline_utils import MaskedDiffusionPipeline, check_guidance_scale, check_positive_int, class_label_ids

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class MaskDiTPipeline(MaskedDiffusionPipeline):
    r"""
    Sample images from a [`MaskedDiTTransformer2DModel`] (MaskDiT, Zheng et al. 2023).

    The pipeline only orchestrates: the transformer predicts, the scheduler owns the noise schedule and its
    preconditioning (EDM Heun by default; [`~diffusers.EDMEulerScheduler`] and
    [`~diffusers.EDMDPMSolverMultistepScheduler`] are drop-in replacements via `from_config`), and the optional VAE
    decodes latents. Any other scheduler is refused (see [`~MaskedDiffusionPipeline.check_scheduler`]): the
    transformer is trained with EDM preconditioning in sigma space, which only the EDM schedulers apply.

    Args:
        transformer ([`MaskedDiTTransformer2DModel`]): The denoiser.
        scheduler ([`~diffusers.SchedulerMixin`]): An EDM sampler, e.g. [`EDMHeunScheduler`].
        vae ([`~diffusers.AutoencoderKL`], *optional*): Decodes latents to images; without one the transformer works
            in pixel space with values in [-1, 1].
        id2label (`dict[int, str]`, *optional*): Class names; a name may list synonyms separated by commas.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _shim_module = "pipeline_maskdit"
    _model_card_tags = ["maskdit"]
    _paper = (
        "MaskDiT, Zheng et al. 2023, "
        "[*Fast Training of Diffusion Models with Masked Transformers*](https://arxiv.org/abs/2306.09305)"
    )
    _scheduler_requirement = (
        "the transformer is trained with EDM preconditioning in sigma space, which the scheduler applies (c_in, "
        "c_skip, c_out); a scheduler without it samples noise."
    )
    _scheduler_fix = (
        "Swap one in with `pipe.scheduler = EDMHeunScheduler.from_config(pipe.scheduler.config)`, or pass "
        "`scheduler=EDMHeunScheduler()` to `from_pretrained` for a folder whose model_index.json names another."
    )

    def __init__(
        self,
        transformer: MaskedDiTTransformer2DModel,
        scheduler: SchedulerMixin,
        vae: AutoencoderKL | None = None,
        id2label: dict | None = None,
    ):
        super().__init__()
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae)
        # JSON turns the integer keys into strings; the saved config keeps them as given.
        id2label = {int(k): str(v) for k, v in id2label.items()} if id2label else None
        self.register_to_config(id2label=id2label)
        self.labels = {}
        for label_id, names in (id2label or {}).items():
            for name in names.split(","):
                self.labels[name.strip()] = label_id
        self.image_processor = VaeImageProcessor(do_normalize=True)

    @classmethod
    def compatible_schedulers(cls) -> tuple[type[SchedulerMixin], ...]:
        """[`EDMHeunScheduler`] and diffusers' EDM schedulers: the ones that apply EDM preconditioning."""
        return (EDMHeunScheduler, *EDM_SCHEDULERS)

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map label names (see `id2label`) to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        not_names = [name for name in names if not isinstance(name, str)]
        if not_names:
            raise TypeError(f"get_label_ids takes label names, got {not_names}")
        return class_label_ids(names, self.num_classes, self.labels)

    def _usage_example(self) -> str:
        if self.num_classes:
            return "images = pipe(class_labels=[0, 1], guidance_scale=1.5, num_inference_steps=40).images"
        return "images = pipe(batch_size=4, num_inference_steps=40).images"

    def check_inputs(
        self, class_labels, batch_size, guidance_scale, num_inference_steps, num_images_per_prompt, output_type
    ) -> None:
        """Refuse bad arguments before anything is drawn, with a `ValueError` that names the argument and the allowed
        values (the labels themselves are checked by [`~pipeline_utils.class_label_ids`])."""
        check_positive_int("num_inference_steps", num_inference_steps)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_guidance_scale(guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError(
                    "class_labels were given but the transformer is unconditional (num_classes=0); pass batch_size"
                )
            if batch_size is None:
                raise ValueError("batch_size is required by an unconditional transformer (num_classes=0)")
            check_positive_int("batch_size", batch_size)
            return
        if class_labels is None:
            raise ValueError(f"class_labels are required: ids in [0, {self.num_classes}) or label names")
        if batch_size is not None:
            raise ValueError("pass either class_labels (class-conditional) or batch_size (unconditional), not both")

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor | None = None,
        guidance_scale: float = 1.5,
        num_inference_steps: int = 40,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int | None = None,
        num_images_per_prompt: int = 1,
        callback_on_step_end: Callable[[MaskedDiffusionPipeline, int, torch.Tensor, dict], dict]
        | PipelineCallback
        | MultiPipelineCallbacks
        | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            class_labels (`int`, `str`, a list of them, a `torch.Tensor` or numpy array of ints, *optional*): The
                classes, by id or by name (`id2label`), in any shape that flattens to one entry per image (`[3, 7]`,
                `[[3], [7]]`, a `(B, 1)` tensor), as diffusers' `DiTPipeline` takes them. Required by a
                class-conditional transformer.
            guidance_scale (`float`, defaults to 1.5): Classifier-free guidance weight `w` in
                `uncond + w * (cond - uncond)`, the unconditional branch using the null class `num_classes`;
                `w <= 1` is plain conditional sampling without the unconditional half of the batch.
            num_inference_steps (`int`, defaults to 40): Sampler steps (EDM Heun: `2 * steps - 1` evaluations).
            generator (`torch.Generator` or a list, *optional*): For reproducible noise; a list has one generator per
                image of the final batch (after `num_images_per_prompt`).
            latents (`torch.Tensor`, *optional*): Starting standard-normal noise `(batch, C, H, W)` of the final batch;
                it is scaled by the scheduler's `init_noise_sigma`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` (images in [0, 1]) or `"latent"`.
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` or a tuple.
            batch_size (`int`, *optional*): Number of images, for unconditional models only.
            num_images_per_prompt (`int`, defaults to 1): Images per class label, next to each other in the output
                (`[a, a, b, b]` for labels `[a, b]` and 2); for an unconditional model it multiplies `batch_size`.
            callback_on_step_end (`Callable`, `PipelineCallback` or `MultiPipelineCallbacks`, *optional*): Called
                after every scheduler step as in diffusers, `callback_on_step_end(pipe, step_index, timestep,
                callback_kwargs)`, and returns a dict; a `"latents"` entry in it replaces the current latents. With
                EDM Heun a step is one of the `2 * steps - 1` model evaluations.
            callback_on_step_end_tensor_inputs (`list[str]`, defaults to `["latents"]`): The tensors put in
                `callback_kwargs`, from `_callback_tensor_inputs`.

        Returns:
            [`~diffusers.ImagePipelineOutput`] with `images`, or a tuple `(images,)`.

        Raises:
            FloatingPointError: The final latents hold NaN or inf; the message names the likely cause (a
                `guidance_scale` too large for the transformer's dtype, the `latents` given, the model).
        """
        self.check_inputs(
            class_labels, batch_size, guidance_scale, num_inference_steps, num_images_per_prompt, output_type
        )
        tensor_inputs = self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        if class_labels is not None:
            ids = class_label_ids(class_labels, self.num_classes, self.labels)
            labels = torch.tensor(ids, device=device, dtype=torch.long).repeat_interleave(num_images_per_prompt)
            batch = labels.shape[0]
        else:
            labels, batch = None, batch_size * num_images_per_prompt
        self._check_generator(generator, batch)

        config = self.transformer.config
        shape = (batch, config.in_channels, config.sample_size, config.sample_size)
        given_latents = latents
        latents = self.prepare_latents(shape, self.transformer.dtype, device, generator, given_latents)
        # As in diffusers, guidance_scale <= 1 means plain conditional sampling: no unconditional half-batch.
        guidance = float(guidance_scale) if labels is not None and guidance_scale > 1 else None
        latents = self._denoise(
            latents, labels, guidance, num_inference_steps, {}, callback_on_step_end, tensor_inputs
        )
        self._check_finite(latents, guidance, given_latents, callback_on_step_end)

        if output_type == "latent":
            images = latents
        else:
            if self.vae is not None:
                images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample
            else:
                images = latents
            images = self.image_processor.postprocess(images.float(), output_type=output_type)

        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)
