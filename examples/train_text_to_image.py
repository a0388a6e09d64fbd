#!/usr/bin/env python
"""Train a text-to-image diffusion transformer with accelerate: our MaskDiT with cross-attention over a `transformers`
text encoder (masked, routed or plain), or diffusers' own PixArt (plain or routed), on captioned images.

    accelerate launch examples/train_text_to_image.py            # built-in default: captioned digits, CPU
    accelerate launch examples/train_text_to_image.py --train_data_dir my_captioned_images \\
        --vae stabilityai/sd-vae-ft-mse --text_encoder_name_or_path google/flan-t5-base --model_config B/2
    accelerate launch examples/train_text_to_image.py --transformer pixart --train_data_dir my_captioned_images \\
        --vae stabilityai/sd-vae-ft-mse --text_encoder_name_or_path google/flan-t5-base --model_config S/2 \\
        --tread_routes '[{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -4}]'

The step, in `training_step` below: clean samples (pixels, or latents drawn from cached posteriors), one caption per
image from its captions (the empty prompt with `caption_dropout_prob`, for guidance), its embedding from the caption
cache (the text encoder runs once over the distinct captions before training, not at every step), then the
objective: MaskDiT's (EDM on the visible tokens + MAE on the removed ones, then unmasking tuning) with the text as
cross-attention context, or for PixArt the DDPM noise-prediction MSE. Text tokens are never masked or routed. The
saved folder is a `MaskDiTPipeline` with the tokenizer and text encoder, or a stock `PixArtAlphaPipeline` that loads
without this package.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from pathlib import Path

import torch
from accelerate.logging import get_logger
from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
from tqdm.auto import tqdm

from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline, MaskedDDPMScheduler, MaskedDiTTransformer2DModel
from diffusers_masked.masking import generate_mask, generated_mask_count
from diffusers_masked.routing import token_routing
from diffusers_masked.training import arguments, text
from diffusers_masked.training.arguments import finite_float, int_at_least
from diffusers_masked.training.batches import check_batch_sizes
from diffusers_masked.training.data import load_training_data
from diffusers_masked.training.distributed import end_training, exit_process, setup_accelerator
from diffusers_masked.training.loop import periodic_saves, train_phases
from diffusers_masked.training.models import build_model, configure_model, prepare_training
from diffusers_masked.training.phases import build_phases
from diffusers_masked.training.recipes import add_recipe_argument, parse_args_with_recipe
from diffusers_masked.training.run import finish_run, record_run, resume_run, start_run, start_trackers
from diffusers_masked.training.validation import image_grid, sample_grid

logger = get_logger(__name__)

DIGITS_PROMPTS = ["a handwritten zero", "a bold handwritten three", "a thin handwritten three", "the digit 7"]
DIGITS_PROMPTS += ["a handwritten nine"]
PIXART_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_argument(parser, "train_text_to_image")
    arguments.add_data_arguments(parser, label_column=None)
    group = parser.add_argument_group("text")
    group.add_argument("--transformer", choices=("maskdit", "pixart"), default="maskdit", help="Default: maskdit.")
    group.add_argument(
        "--caption_column", type=str, default="text", help="Captions: a string or list per image. Default: text."
    )
    group.add_argument(
        "--text_encoder_name_or_path",
        type=str,
        default=None,
        help="A transformers text encoder (T5, CLIP text, ...); required with your own data.",
    )
    group.add_argument("--text_encoder_subfolder", type=str, default=None)
    group.add_argument("--tokenizer_name_or_path", type=str, default=None, help="Defaults to the text encoder's.")
    group.add_argument("--tokenizer_subfolder", type=str, default=None)
    group.add_argument("--max_sequence_length", type=int_at_least(1), default=None, help="Tokens per caption.")
    group.add_argument("--caption_dropout_prob", type=finite_float(0, 1, high_open=True), default=None)
    group.add_argument("--validation_prompts", type=str, nargs="+", default=None, help="One grid row each.")
    arguments.add_model_arguments(parser, presets="'S/2', 'B/2', 'L/2', 'XL/2'", blocks="the repeated blocks")
    arguments.add_masking_arguments(parser, mask_ratio=0.5, mask_type="patch")
    arguments.add_routing_arguments(parser)
    group = parser.add_argument_group("MaskDiT objective and unmasking tuning (--transformer maskdit)")
    group.add_argument("--mae_loss_weight", type=finite_float(0), default=0.1, help="lambda of the MAE term.")
    group.add_argument("--unmask_tuning_steps", type=int_at_least(0), default=None)
    group.add_argument("--unmask_batch_size", type=int_at_least(1), default=None)
    arguments.add_optimisation_arguments(parser, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0)
    arguments.add_output_arguments(parser)
    arguments.add_sampling_arguments(parser, guidance_scale=3.0, num_inference_steps=20)
    group = parser.add_argument_group("validation grids")
    group.add_argument("--num_validation_images_per_class", type=int_at_least(1), default=4, help="Per prompt.")
    args = parse_args_with_recipe(parser, argv, "train_text_to_image")
    pixart = args.transformer == "pixart"
    if pixart and not args.vae:
        parser.error("--transformer pixart needs --vae: PixArtAlphaPipeline always decodes latents")
    if args.builtin_digits and args.vae:
        parser.error("--vae needs image data (--dataset_name or --train_data_dir); the built-in digits are pixels")
    if not args.builtin_digits and not args.text_encoder_name_or_path:
        parser.error("--text_encoder_name_or_path is required with your own data (a pretrained transformers encoder)")
    if pixart:
        args.mask_ratio, args.mask_schedule = 0.0, None  # PixArt takes no mask: plain or routed
        args.unmask_tuning_steps = 0
    if args.max_train_steps + args.unmask_tuning_steps == 0:
        parser.error("nothing to train: --max_train_steps and --unmask_tuning_steps are both 0")
    model_cls = PixArtTransformer2DModel if pixart else MaskedDiTTransformer2DModel
    presets = text.pixart_preset_config if pixart else None
    arguments.resolve_schedule_and_model_config(parser, args, model_cls, presets=presets)
    args.validation_prompts = args.validation_prompts or (DIGITS_PROMPTS if args.builtin_digits else ["a photo"])
    args.unmask_batch_size = args.unmask_batch_size or args.train_batch_size
    return args


def training_step(
    batch, generator, mask_ratio: float, *, model, scheduler, data, args, device, grid_size, conditioning, routing
):
    """One micro-batch: clean samples, then one caption per image (two draws: which caption, and the dropout to the
    empty prompt) looked up in the caption cache, then MaskDiT's mask at this step's ratio and its objective with the
    text as cross-attention context, or PixArt's DDPM objective (with --tread_routes, routed ids are drawn last).
    Every draw comes from `generator`, in this order, so a step is a function of (seed, step, process)."""
    clean = data.clean_samples(batch, generator, device)
    model_kwargs = conditioning.model_kwargs(batch, generator, device)
    if args.transformer == "pixart":
        model_kwargs.update(text.pixart_model_kwargs(len(clean), args.resolution, device))
        if routing is not None:
            routing.generator = generator
        return scheduler.masked_training_loss(model, clean, generator=generator, model_kwargs=model_kwargs)
    mask, num_masked = None, None
    if mask_ratio > 0:
        mask = generate_mask(
            args.mask_type, len(clean), grid_size, mask_ratio, args.mask_block_size, generator=generator, device=device
        )
        num_masked = generated_mask_count(args.mask_type, grid_size, mask_ratio, args.mask_block_size)
    return scheduler.masked_training_loss(
        model,
        clean,
        mask=mask,
        num_masked=num_masked,
        mae_loss_weight=args.mae_loss_weight,
        generator=generator,
        routes=args.tread_routes,
        model_kwargs=model_kwargs,
    )


def text_components(args):
    return text.load_text_components(
        args.text_encoder_name_or_path,
        args.tokenizer_name_or_path,
        args.text_encoder_subfolder,
        args.tokenizer_subfolder,
        args.max_sequence_length,
        seed=args.seed,
    )


def make_pipeline(args, model, scheduler, data, tokenizer=None, text_encoder=None):
    if args.transformer == "pixart":
        sampler = DPMSolverMultistepScheduler.from_config(scheduler.config)
        parts = dict(tokenizer=tokenizer, text_encoder=text_encoder, vae=data.vae, transformer=model)
        pipeline = PixArtAlphaPipeline(**parts, scheduler=sampler)
    else:
        sampler = EDMHeunScheduler.from_config(scheduler.config)
        parts = dict(vae=data.vae, tokenizer=tokenizer, text_encoder=text_encoder)
        pipeline = MaskDiTPipeline(transformer=model, scheduler=sampler, **parts)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def grid(args, pipeline, per_prompt: int, prompt_embeds=None):
    """One row per validation prompt, `per_prompt` samples each: from the prompts' cached embeddings during training
    (the text encoder is not loaded then), from the prompts themselves at the end."""
    kwargs = {"guidance_scale": args.guidance_scale, "num_inference_steps": args.num_inference_steps}
    if args.transformer == "pixart":
        kwargs.update(use_resolution_binning=False, clean_caption=False)
    if prompt_embeds is None:
        if args.transformer == "pixart":
            kwargs["max_sequence_length"] = pipeline.tokenizer.model_max_length
        return sample_grid(pipeline, 0, per_prompt, seed=args.seed, prompts=args.validation_prompts, **kwargs)
    embeds, mask, negative, negative_mask = (t.repeat_interleave(per_prompt, 0) for t in prompt_embeds)
    if args.transformer == "pixart":
        kwargs["negative_prompt"] = None  # PixArt's default "" would clash with the embeddings given
    images = pipeline(
        prompt_embeds=embeds,
        prompt_attention_mask=mask,
        negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask,
        generator=torch.Generator(device=pipeline.device).manual_seed(args.seed),
        output_type="pil",
        **kwargs,
    ).images
    return image_grid(images, rows=len(args.validation_prompts), cols=per_prompt)


def main(args):
    output_dir = Path(args.output_dir)
    accelerator, sharded = setup_accelerator(output_dir, **arguments.accelerator_options(args))
    config = arguments.run_config(args, args.mask_schedule_resolved)
    end = args.max_train_steps + args.unmask_tuning_steps
    run = start_run(
        accelerator,
        output_dir,
        args.resume_from_checkpoint,
        args.use_ema,
        sharded,
        config=config,
        end=end,
        overwrite_output_dir=args.overwrite_output_dir,
    )

    # 1. Data and captions: the latents and the caption embeddings cached once, beside each other
    cache_dir = args.cache_dir or output_dir / "latent-cache"
    data_options = {**arguments.data_options(args), "label_column": None}
    data = load_training_data(
        accelerator, **data_options, latent_cache_dir=cache_dir, num_classes=0, caption_column=args.caption_column
    )
    tokenizer, text_encoder = text_components(args)
    length = args.max_sequence_length or tokenizer.model_max_length
    prompts = (args.validation_prompts, tokenizer, text_encoder, length, accelerator.device)
    prompt_embeds = text.encode_prompts(*prompts)
    conditioning = text.cache_caption_embeddings(
        accelerator, data.captions, tokenizer, text_encoder, cache_dir, length, args.caption_dropout_prob
    )
    del text_encoder  # not in memory while the transformer trains; loaded again to save the pipeline
    width = conditioning.embeddings.shape[-1]

    # 2. The transformer and its objective's scheduler
    start = args.pretrained_model_name_or_path
    if args.transformer == "pixart":
        model = text.build_pixart(data, width, start=start, config=args.model_config_resolved)
        scheduler = MaskedDDPMScheduler(**PIXART_SCHEDULE)
    else:
        model_config = {**(args.model_config_resolved or {}), "cross_attention_dim": width}
        model = build_model(MaskedDiTTransformer2DModel, data, start=start, config=model_config)
        scheduler = EDMHeunScheduler()
    configure_model(model, **arguments.runtime_options(args))
    grid_size = (data.sample_size // model.config.patch_size,) * 2

    # 3. Phases, optimizer and EMA
    phases = build_phases(
        args.max_train_steps,
        args.unmask_tuning_steps,
        batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        mask_schedule=args.mask_schedule_resolved,
        warmup_steps=args.lr_warmup_steps,
        unmask_batch_size=args.unmask_batch_size,
    )
    check_batch_sizes(accelerator, len(data.dataset), [phase.batch_size for phase in phases])
    model, optimizer, ema = prepare_training(
        accelerator, model, sharded, learning_rate=args.learning_rate, **arguments.optimizer_options(args)
    )

    # 4. Resume, record
    global_step = resume_run(accelerator, run, model, ema, sharded)
    state = record_run(accelerator, output_dir, run, model, config, owned_dirs=[args.logging_dir, cache_dir])
    start_trackers(accelerator, "train_text_to_image", config)
    logger.info(
        f"{len(data.dataset)} images, {len(data.captions) - 1} distinct captions, text {conditioning.embeddings.shape}"
        f", {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters ({args.transformer})"
    )

    # 5. Train
    progress = tqdm(range(end), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    pixart_routes = args.transformer == "pixart" and args.tread_routes
    with token_routing(model, args.tread_routes) if pixart_routes else contextlib.nullcontext() as routing:
        step = functools.partial(
            training_step,
            model=model,
            scheduler=scheduler,
            data=data,
            args=args,
            device=accelerator.device,
            grid_size=grid_size,
            conditioning=conditioning,
            routing=routing,
        )
        global_step = train_phases(
            accelerator,
            model,
            optimizer,
            ema,
            phases,
            data,
            step,
            global_step=global_step,
            log_keys=("loss", "dsm_loss", "mae_loss"),
            after_step=periodic_saves(
                accelerator,
                model,
                ema,
                sharded,
                output_dir,
                state,
                end=end,
                validation_grid=lambda m: grid(args, make_pipeline(args, m, scheduler, data), 2, prompt_embeds),
                **arguments.saving_options(args),
            ),
            progress=progress,
            **arguments.loop_options(args),
        )
    progress.close()

    # 6. Final checkpoint, the EMA pipeline with its tokenizer and text encoder, evaluation (digits), model card
    tokenizer, text_encoder = text_components(args)
    per_prompt = args.num_validation_images_per_class
    sampling = {"guidance_scale": args.guidance_scale}
    finish_run(
        accelerator,
        model,
        ema,
        sharded,
        output_dir,
        global_step,
        state,
        model_cls=PixArtTransformer2DModel if args.transformer == "pixart" else MaskedDiTTransformer2DModel,
        checkpoints_total_limit=args.checkpoints_total_limit,
        make_pipeline=lambda final: make_pipeline(args, final, scheduler, data, tokenizer, text_encoder),
        final_grid=lambda pipeline: grid(args, pipeline, per_prompt),
        dataset_name=arguments.dataset_label(args),
        digits_evaluation=arguments.digits_evaluation_options(args, 10, per_prompt, **sampling),
        **arguments.hub_options(args),
    )
    end_training(accelerator)
    return global_step


if __name__ == "__main__":
    main(parse_args())
    exit_process()
