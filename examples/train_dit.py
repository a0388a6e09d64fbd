#!/usr/bin/env python
"""Train diffusers' own DiTTransformer2DModel (class-conditional, in a VAE's latent space) with accelerate, plainly or
with token routing (TREAD), and save a stock DiTPipeline.

    accelerate launch examples/train_dit.py --train_data_dir my_images --vae stabilityai/sd-vae-ft-mse
    accelerate launch examples/train_dit.py --recipe imagenet256-tread-b2        # DiT-B/2 + TREAD, 400k steps

The recipe (Peebles & Xie 2023), in `training_step` below: latents of the data through the VAE, labels dropped once
to DiTPipeline's null class 1000 for classifier-free guidance, t uniform over 1000 DDPM steps with DiT's linear betas,
and the MSE of the predicted noise (DiT's learned variance and its VLB term are left out: out_channels =
in_channels). With --tread_routes, `token_routing` hooks diffusers' DiT so that a share of the tokens skips a span of
blocks in training (Krause et al. 2025); the model class is untouched, and the folder this run saves is a plain
DiTPipeline that `DiffusionPipeline.from_pretrained` loads without this package or `trust_remote_code`.

Everything else (data and latent cache, resume bit for bit, EMA, checkpoints, FSDP2, the output folder's safety,
model card and push) is `diffusers_masked.training`'s, as for the MaskDiT and MaskDM scripts.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
from pathlib import Path

from accelerate.logging import get_logger
from diffusers import DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from tqdm.auto import tqdm

from diffusers_masked import MaskedDDPMScheduler, drop_class_labels
from diffusers_masked.routing import token_routing
from diffusers_masked.training import arguments
from diffusers_masked.training.batches import check_batch_sizes
from diffusers_masked.training.data import load_training_data
from diffusers_masked.training.distributed import end_training, exit_process, setup_accelerator
from diffusers_masked.training.loop import periodic_saves, train_phases
from diffusers_masked.training.models import (
    DIT_NULL_CLASS,
    build_dit,
    configure_model,
    dit_preset_config,
    prepare_training,
)
from diffusers_masked.training.phases import Phase
from diffusers_masked.training.recipes import add_recipe_argument, parse_args_with_recipe
from diffusers_masked.training.run import finish_run, record_run, resume_run, start_run, start_trackers
from diffusers_masked.training.validation import sample_grid

logger = get_logger(__name__)

# DiT's noise schedule: 1000 steps, betas linear from 1e-4 to 0.02 (ADM's).
DIT_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "linear", "beta_start": 1e-4, "beta_end": 0.02}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_argument(parser, "train_dit")
    arguments.add_data_arguments(parser)
    arguments.add_model_arguments(
        parser, presets="'S/2', 'B/2', 'L/2', 'XL/2' (DiT's sizes)", blocks="each block's forward"
    )
    arguments.add_routing_arguments(parser)
    arguments.add_optimisation_arguments(parser, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0)
    arguments.add_output_arguments(parser)
    arguments.add_sampling_arguments(parser, guidance_scale=1.5, num_inference_steps=50)
    group = parser.add_argument_group("validation grids")
    group.add_argument("--num_validation_images_per_class", type=arguments.int_at_least(1), default=4)
    group.add_argument(
        "--validation_classes", type=arguments.int_at_least(1), default=10, help="How many classes the grids show."
    )
    # No masking here: the run config records a constant ratio of 0 like the other scripts' unmasked phases.
    parser.set_defaults(mask_ratio=0.0, mask_schedule=None)
    args = parse_args_with_recipe(parser, argv, "train_dit")
    if not args.vae:
        parser.error("--vae is required: DiT trains on latents and DiTPipeline always decodes them with its VAE")
    if args.max_train_steps == 0:
        parser.error("nothing to train: --max_train_steps is 0")
    if args.num_classes == 0:
        parser.error("--num_classes 0: diffusers' DiT is class-conditional (its label embedding is in every block)")
    arguments.resolve_schedule_and_model_config(parser, args, DiTTransformer2DModel, presets=dit_preset_config)
    return args


def training_step(batch, generator, mask_ratio: float, *, model, scheduler, data, args, device, grid_size, routing):
    """DiT on one micro-batch: latents drawn from their cached posteriors, labels dropped to the null class 1000 with
    `class_dropout_prob`, then the scheduler's DDPM objective (t, noise, the noise-prediction MSE over every token);
    under --tread_routes the routed ids are drawn last, at the model's forward. Every draw comes from `generator`, in
    this order, so a step is a function of (seed, step, process). `mask_ratio` is always 0."""
    clean = data.clean_samples(batch, generator, device)
    labels = drop_class_labels(
        batch["class_labels"].to(device), DIT_NULL_CLASS, args.class_dropout_prob, generator=generator
    )
    if routing is not None:
        routing.generator = generator
    return scheduler.masked_training_loss(model, clean, class_labels=labels, generator=generator)


def make_pipeline(model, scheduler, data):
    # Noise prediction without a learned variance: DDIM over the training betas, no x0 clipping (latents).
    sampler = DDIMScheduler.from_config(scheduler.config, clip_sample=False)
    pipeline = DiTPipeline(transformer=model, vae=data.vae, scheduler=sampler, id2label=data.id2label)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_grid_of(args, pipeline, per_class: int):
    kwargs = {"guidance_scale": args.guidance_scale, "num_inference_steps": args.num_inference_steps}
    rows = min(args.num_classes, args.validation_classes)
    return sample_grid(pipeline, rows, per_class, seed=args.seed, **kwargs)


def main(args):
    output_dir = Path(args.output_dir)
    accelerator, sharded = setup_accelerator(output_dir, **arguments.accelerator_options(args))
    config = arguments.run_config(args, args.mask_schedule_resolved)
    run = start_run(
        accelerator,
        output_dir,
        args.resume_from_checkpoint,
        args.use_ema,
        sharded,
        config=config,
        end=args.max_train_steps,
        overwrite_output_dir=args.overwrite_output_dir,
    )

    # 1. Data: latents through the VAE, cached
    latent_cache_dir = args.cache_dir or output_dir / "latent-cache"
    data_options = arguments.data_options(args)
    data = load_training_data(accelerator, **data_options, latent_cache_dir=latent_cache_dir, num_classes=None)
    args.num_classes = data.num_classes

    # 2. diffusers' DiT and DiT's DDPM schedule (which carries the objective)
    model = build_dit(data, start=args.pretrained_model_name_or_path, config=args.model_config_resolved)
    configure_model(model, **arguments.runtime_options(args))
    scheduler = MaskedDDPMScheduler(**DIT_SCHEDULE)

    # 3. One phase, optimizer and EMA, prepared
    steps, batch, lr, warmup = args.max_train_steps, args.train_batch_size, args.learning_rate, args.lr_warmup_steps
    phases = [Phase("train", 0, steps, batch, lr, args.mask_schedule_resolved, warmup)]
    check_batch_sizes(accelerator, len(data.dataset), [phase.batch_size for phase in phases])
    model, optimizer, ema = prepare_training(
        accelerator, model, sharded, learning_rate=args.learning_rate, **arguments.optimizer_options(args)
    )

    # 4. Resume, then record the run
    global_step = resume_run(accelerator, run, model, ema, sharded)
    training_state = record_run(
        accelerator, output_dir, run, model, config, owned_dirs=[args.logging_dir, latent_cache_dir]
    )
    start_trackers(accelerator, "train_dit", config)
    logger.info(
        f"{len(data.dataset)} examples, {data.num_classes} classes, latents {data.in_channels}x{data.sample_size}x"
        f"{data.sample_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, routes "
        f"{args.tread_routes or 'none'}"
    )

    # 5. Train, with the routing hooks installed around every step's forward and backward
    progress = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    routed = token_routing(model, args.tread_routes) if args.tread_routes else contextlib.nullcontext()
    with routed as routing:
        global_step = train_phases(
            accelerator,
            model,
            optimizer,
            ema,
            phases,
            data,
            functools.partial(
                training_step,
                model=model,
                scheduler=scheduler,
                data=data,
                args=args,
                device=accelerator.device,
                grid_size=None,
                routing=routing,
            ),
            global_step=global_step,
            log_keys=("loss",),
            after_step=periodic_saves(
                accelerator,
                model,
                ema,
                sharded,
                output_dir,
                training_state,
                end=args.max_train_steps,
                validation_grid=lambda ema_model: sample_grid_of(
                    args, make_pipeline(ema_model, scheduler, data), args.num_validation_images_per_class
                ),
                **arguments.saving_options(args),
            ),
            progress=progress,
            **arguments.loop_options(args),
        )
    progress.close()

    # 6. Final checkpoint, the EMA weights as a stock DiTPipeline, sample grid, model card
    finish_run(
        accelerator,
        model,
        ema,
        sharded,
        output_dir,
        global_step,
        training_state,
        model_cls=DiTTransformer2DModel,
        checkpoints_total_limit=args.checkpoints_total_limit,
        make_pipeline=lambda final_model: make_pipeline(final_model, scheduler, data),
        final_grid=lambda pipeline: sample_grid_of(args, pipeline, args.num_validation_images_per_class * 2),
        dataset_name=arguments.dataset_label(args),
        **arguments.hub_options(args),
    )
    end_training(accelerator)
    return global_step


if __name__ == "__main__":
    main(parse_args())
    exit_process()
