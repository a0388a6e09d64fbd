"""MaskDiTPipeline: sampling from a MaskDiT transformer, class-conditional with classifier-free guidance or
unconditional."""

from __future__ import annotations

import math

import torch
from diffusers import AutoencoderKL
from diffusers.image_processor import VaeImageProcessor
from diffusers.pipelines.pipeline_utils import ImagePipelineOutput
from diffusers.schedulers import SchedulerMixin
from diffusers.utils.torch_utils import randn_tensor

from ..models.masked_dit import MaskedDiTTransformer2DModel
from .pipeline_utils import MaskedDiffusionPipeline

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


class MaskDiTPipeline(MaskedDiffusionPipeline):
    r"""
    Sample images from a [`MaskedDiTTransformer2DModel`] (MaskDiT, Zheng et al. 2023).

    The pipeline only orchestrates: the transformer predicts, the scheduler owns the noise schedule and its
    preconditioning (EDM Heun by default; [`~diffusers.EDMEulerScheduler`] and
    [`~diffusers.EDMDPMSolverMultistepScheduler`] are drop-in replacements via `from_config`), and the optional VAE
    decodes latents.

    Args:
        transformer ([`MaskedDiTTransformer2DModel`]): The denoiser.
        scheduler ([`~diffusers.SchedulerMixin`]): Sampler, e.g. [`EDMHeunScheduler`].
        vae ([`~diffusers.AutoencoderKL`], *optional*): Decodes latents to images; without one the transformer works
            in pixel space with values in [-1, 1].
        id2label (`dict[int, str]`, *optional*): Class names; a name may list synonyms separated by commas.
    """

    model_cpu_offload_seq = "transformer->vae"
    _optional_components = ["vae"]
    _shim_module = "pipeline_maskdit"
    _paper = "https://arxiv.org/abs/2306.09305"

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

    @property
    def num_classes(self) -> int:
        return self.transformer.config.num_classes

    @property
    def _model_card_tags(self) -> list[str]:
        return ["maskdit", "class-conditional" if self.num_classes else "unconditional"]

    def get_label_ids(self, label: str | list[str]) -> list[int]:
        """Map label names (see `id2label`) to class ids."""
        names = [label] if isinstance(label, str) else list(label)
        missing = [name for name in names if name not in self.labels]
        if missing:
            raise ValueError(f"unknown label names {missing}; known labels: {sorted(self.labels)}")
        return [self.labels[name] for name in names]

    def _usage_example(self) -> str:
        if self.num_classes:
            return "images = pipe(class_labels=[0, 1], guidance_scale=1.5, num_inference_steps=40).images"
        return "images = pipe(batch_size=4, num_inference_steps=40).images"

    def _class_label_tensor(self, class_labels, batch_size):
        if self.num_classes == 0:
            if class_labels is not None:
                raise ValueError(
                    "class_labels were given but the transformer is unconditional (num_classes=0); pass batch_size"
                )
            if batch_size is None or int(batch_size) < 1:
                raise ValueError(f"batch_size must be a positive int for an unconditional model, got {batch_size}")
            return None, int(batch_size)
        if class_labels is None:
            raise ValueError(f"class_labels are required: ids in [0, {self.num_classes}) or label names")
        if batch_size is not None:
            raise ValueError("pass either class_labels (class-conditional) or batch_size (unconditional), not both")
        if hasattr(class_labels, "tolist"):
            class_labels = class_labels.tolist()
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        class_labels = list(class_labels)
        if not class_labels:
            raise ValueError("class_labels must not be empty")
        ids = []
        for label in class_labels:
            if isinstance(label, str):
                ids.extend(self.get_label_ids(label))
            elif isinstance(label, int) and not isinstance(label, bool):
                if not 0 <= label < self.num_classes:
                    raise ValueError(f"class label {label} is out of range: ids must be in [0, {self.num_classes})")
                ids.append(label)
            else:
                raise TypeError(f"class_labels must be ints or label names, got {label!r}")
        return torch.tensor(ids, device=self._execution_device, dtype=torch.long), len(ids)

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | list[int | str] | None = None,
        guidance_scale: float = 1.5,
        num_inference_steps: int = 40,
        generator=None,
        latents=None,
        output_type: str = "pil",
        return_dict: bool = True,
        batch_size: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            class_labels (`int`, `str` or a list of them): One image per entry, by id or by name (`id2label`).
            guidance_scale (`float`, defaults to 1.5): Classifier-free guidance weight `w` in
                `uncond + w * (cond - uncond)`, the unconditional branch using the null class `num_classes`;
                `w <= 1` is plain conditional sampling without the unconditional half of the batch.
            num_inference_steps (`int`, defaults to 40): Sampler steps (EDM Heun: `2 * steps - 1` evaluations).
            generator (`torch.Generator` or a list, *optional*): For reproducible noise.
            latents (`torch.Tensor`, *optional*): Starting standard-normal noise `(batch, C, H, W)`; it is scaled by
                the scheduler's `init_noise_sigma`.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` (images in [0, 1]) or `"latent"`.
            return_dict (`bool`, defaults to `True`): Return an `ImagePipelineOutput` or a tuple.
            batch_size (`int`, *optional*): Number of images, for unconditional models only.

        Returns:
            [`~diffusers.ImagePipelineOutput`] with `images`, or a tuple `(images,)`.
        """
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
            raise TypeError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if not math.isfinite(guidance_scale) or guidance_scale < 0:
            # inf turns every image into NaNs and NaN would silently switch guidance off.
            raise ValueError(f"guidance_scale must be a finite number >= 0, got {guidance_scale!r}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        labels, batch = self._class_label_tensor(class_labels, batch_size)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"got {len(generator)} generators for a batch of {batch} images")

        config = self.transformer.config
        device = self._execution_device
        dtype = self.transformer.dtype
        shape = (batch, config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

        # As in diffusers, guidance_scale <= 1 means plain conditional sampling: no unconditional half-batch.
        guided = labels is not None and guidance_scale > 1
        model_labels = torch.cat([labels, torch.full_like(labels, self.num_classes)]) if guided else labels

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        for t in self.progress_bar(self.scheduler.timesteps):
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            timestep = (
                t.to(device).expand(model_input.shape[0])
                if torch.is_tensor(t)
                else torch.full((model_input.shape[0],), t, device=device)
            )
            output = self.transformer(model_input, timestep, class_labels=model_labels).sample
            # A model that also predicts a variance (DiT's learned sigma) guides and steps on its first channels.
            output = output[:, : config.in_channels]
            if guided:
                cond, uncond = output.chunk(2)
                output = uncond + guidance_scale * (cond - uncond)
            latents = self.scheduler.step(output, t, latents).prev_sample

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
