"""MaskDiTPipeline: sampling from a MaskDiT transformer, class-conditional or text-conditional with classifier-free
guidance, or unconditional."""

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
        tokenizer (`transformers.PreTrainedTokenizerBase`, *optional*), text_encoder (`transformers.PreTrainedModel`,
            *optional*): For a text-conditioned transformer (`cross_attention_dim` set): they turn `prompt` into the
            `last_hidden_state` the transformer attends to. Saved and loaded as `transformers` components, as diffusers
            saves Stable Diffusion's. Without them, pass `prompt_embeds`.
        id2label (`dict[int, str]`, *optional*): Class names; a name may list synonyms separated by commas.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "tokenizer", "text_encoder"]
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
        tokenizer=None,
        text_encoder=None,
        id2label: dict | None = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer, scheduler=scheduler, vae=vae, tokenizer=tokenizer, text_encoder=text_encoder
        )
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

    @property
    def is_text_conditioned(self) -> bool:
        """Whether the transformer attends to text (its `cross_attention_dim` is set)."""
        return getattr(self.transformer.config, "cross_attention_dim", None) is not None

    def encode_prompt(
        self,
        prompt: str | Sequence[str],
        device=None,
        max_sequence_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The text encoder's `last_hidden_state` for `prompt` and the attention mask of the padded tokens:
        ``(embeds (B, T, D), mask (B, T))``, padded to `max_sequence_length` (defaults to the tokenizer's
        `model_max_length`), as the training scripts' caption cache encodes captions.

        Raises:
            ValueError: without a tokenizer and text encoder (pass `prompt_embeds` instead).
        """
        if self.tokenizer is None or self.text_encoder is None:
            raise ValueError(
                "prompt needs the pipeline's tokenizer and text_encoder components; this pipeline has none, so pass "
                "prompt_embeds (and prompt_attention_mask) from your own encoder instead"
            )
        from ..data.captions import encode_captions

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        device = device or self._execution_device
        return encode_captions(prompts, self.tokenizer, self.text_encoder, max_sequence_length, device=device)

    def _usage_example(self) -> str:
        if self.is_text_conditioned:
            return 'images = pipe(prompt=["a bold handwritten seven"], guidance_scale=3.0).images'
        if self.num_classes:
            return "images = pipe(class_labels=[0, 1], guidance_scale=1.5, num_inference_steps=40).images"
        return "images = pipe(batch_size=4, num_inference_steps=40).images"

    def check_inputs(
        self,
        class_labels,
        batch_size,
        guidance_scale,
        num_inference_steps,
        num_images_per_prompt,
        output_type,
        prompt=None,
        prompt_embeds=None,
        negative_prompt=None,
        negative_prompt_embeds=None,
    ) -> None:
        """Refuse bad arguments before anything is drawn, with a `ValueError` that names the argument and the allowed
        values (the labels themselves are checked by [`~pipeline_utils.class_label_ids`])."""
        check_positive_int("num_inference_steps", num_inference_steps)
        check_positive_int("num_images_per_prompt", num_images_per_prompt)
        check_guidance_scale(guidance_scale)
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        text_given = prompt is not None or prompt_embeds is not None
        if not self.is_text_conditioned:
            if text_given or negative_prompt is not None or negative_prompt_embeds is not None:
                raise ValueError(
                    "prompt / prompt_embeds were given but the transformer is not text-conditioned "
                    "(cross_attention_dim=None); pass class_labels or batch_size"
                )
        else:
            if (prompt is None) == (prompt_embeds is None):
                raise ValueError("pass exactly one of prompt and prompt_embeds to this text-conditioned transformer")
            if negative_prompt is not None and negative_prompt_embeds is not None:
                raise ValueError("pass at most one of negative_prompt and negative_prompt_embeds")
            if prompt is not None and not (
                isinstance(prompt, str) or (isinstance(prompt, Sequence) and all(isinstance(p, str) for p in prompt))
            ):
                raise TypeError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
            if batch_size is not None:
                raise ValueError("batch_size is for unconditional models; a text-conditioned one takes prompt")
            if self.num_classes == 0:
                if class_labels is not None:
                    raise ValueError("class_labels were given but the transformer has no classes (num_classes=0)")
                return
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

    def _prompt_inputs(
        self,
        prompt,
        prompt_embeds,
        prompt_attention_mask,
        negative_prompt,
        negative_prompt_embeds,
        negative_prompt_attention_mask,
        max_sequence_length,
        device,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The prompt's and the negative prompt's embeddings and masks, one row per prompt: encoded here, or the ones
        given (checked against each other); the negative prompt defaults to the empty prompt, what caption dropout
        trains the unconditional branch on."""
        if prompt_embeds is None:
            prompt_embeds, prompt_attention_mask = self.encode_prompt(prompt, device, max_sequence_length)
        width = self.transformer.config.cross_attention_dim
        if not isinstance(prompt_embeds, torch.Tensor) or prompt_embeds.ndim != 3 or prompt_embeds.shape[2] != width:
            found = tuple(prompt_embeds.shape) if isinstance(prompt_embeds, torch.Tensor) else type(prompt_embeds)
            raise ValueError(f"prompt_embeds must have shape (batch, text_tokens, {width}), got {found}")
        if prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long)
        batch, length = prompt_embeds.shape[:2]
        if negative_prompt_embeds is None:
            negative = negative_prompt if negative_prompt is not None else ""
            negative = [negative] * batch if isinstance(negative, str) else list(negative)
            if len(negative) != batch:
                raise ValueError(f"negative_prompt must be one string or {batch} of them, got {len(negative)}")
            negative_prompt_embeds, negative_prompt_attention_mask = self.encode_prompt(negative, device, length)
        elif negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(negative_prompt_embeds.shape[:2], dtype=torch.long)
        if tuple(negative_prompt_embeds.shape) != tuple(prompt_embeds.shape):
            raise ValueError(
                f"negative_prompt_embeds must have the shape of prompt_embeds {tuple(prompt_embeds.shape)}, got "
                f"{tuple(negative_prompt_embeds.shape)}"
            )
        for name, mask in (
            ("prompt_attention_mask", prompt_attention_mask),
            ("negative", negative_prompt_attention_mask),
        ):
            if tuple(mask.shape) != (batch, length):
                raise ValueError(f"{name} must have shape {(batch, length)}, got {tuple(mask.shape)}")
        dtype = self.transformer.dtype
        return (
            prompt_embeds.to(device, dtype),
            prompt_attention_mask.to(device),
            negative_prompt_embeds.to(device, dtype),
            negative_prompt_attention_mask.to(device),
        )

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
        prompt: str | Sequence[str] | None = None,
        negative_prompt: str | Sequence[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        max_sequence_length: int | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""
        Args:
            class_labels (`int`, `str`, a list of them, a `torch.Tensor` or numpy array of ints, *optional*): The
                classes, by id or by name (`id2label`), in any shape that flattens to one entry per image (`[3, 7]`,
                `[[3], [7]]`, a `(B, 1)` tensor), as diffusers' `DiTPipeline` takes them. Required by a
                class-conditional transformer.
            guidance_scale (`float`, defaults to 1.5): Classifier-free guidance weight `w` in
                `uncond + w * (cond - uncond)`, the unconditional branch using the null class `num_classes` and,
                for text, the negative prompt; `w <= 1` is plain conditional sampling without the unconditional
                half of the batch.
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
            prompt (`str` or `list[str]`, *optional*): For a text-conditioned transformer: one image per prompt
                (times `num_images_per_prompt`), encoded by the pipeline's tokenizer and text encoder.
            negative_prompt (`str` or `list[str]`, *optional*): The unconditional branch of guidance; defaults to
                the empty prompt, which caption dropout trains it on.
            prompt_embeds, negative_prompt_embeds (`torch.Tensor` of shape `(batch, text_tokens, width)`,
                *optional*): Text encoder outputs instead of `prompt` / `negative_prompt`.
            prompt_attention_mask, negative_prompt_attention_mask (`torch.Tensor` of shape `(batch, text_tokens)`,
                *optional*): Their padding masks (1 = a real token); all ones when not given.
            max_sequence_length (`int`, *optional*): Tokens the prompts are padded or cut to; defaults to the
                tokenizer's `model_max_length`, which the training script sets to its `--max_sequence_length`.

        Returns:
            [`~diffusers.ImagePipelineOutput`] with `images`, or a tuple `(images,)`.

        Raises:
            FloatingPointError: The final latents hold NaN or inf; the message names the likely cause (a
                `guidance_scale` too large for the transformer's dtype, the `latents` given, the model).
        """
        self.check_inputs(
            class_labels,
            batch_size,
            guidance_scale,
            num_inference_steps,
            num_images_per_prompt,
            output_type,
            prompt,
            prompt_embeds,
            negative_prompt,
            negative_prompt_embeds,
        )
        tensor_inputs = self._check_callback(callback_on_step_end, callback_on_step_end_tensor_inputs)
        device = self._execution_device
        text = None
        if self.is_text_conditioned:
            text = self._prompt_inputs(
                prompt,
                prompt_embeds,
                prompt_attention_mask,
                negative_prompt,
                negative_prompt_embeds,
                negative_prompt_attention_mask,
                max_sequence_length,
                device,
            )
            text = tuple(t.repeat_interleave(num_images_per_prompt, dim=0) for t in text)
        if class_labels is not None:
            ids = class_label_ids(class_labels, self.num_classes, self.labels)
            labels = torch.tensor(ids, device=device, dtype=torch.long).repeat_interleave(num_images_per_prompt)
            batch = labels.shape[0]
            if text is not None and text[0].shape[0] != batch:
                raise ValueError(
                    f"class_labels give {len(ids)} labels but there are {text[0].shape[0] // num_images_per_prompt} "
                    "prompts; a text- and class-conditioned transformer takes one label per prompt"
                )
        elif text is not None:
            labels, batch = None, text[0].shape[0]
        else:
            labels, batch = None, batch_size * num_images_per_prompt
        self._check_generator(generator, batch)

        config = self.transformer.config
        shape = (batch, config.in_channels, config.sample_size, config.sample_size)
        given_latents = latents
        latents = self.prepare_latents(shape, self.transformer.dtype, device, generator, given_latents)
        # As in diffusers, guidance_scale <= 1 means plain conditional sampling: no unconditional half-batch.
        conditional = labels is not None or text is not None
        guidance = float(guidance_scale) if conditional and guidance_scale > 1 else None
        latents = self._denoise(
            latents, labels, guidance, num_inference_steps, {}, callback_on_step_end, tensor_inputs, text=text
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
