#!/usr/bin/env python
"""Train a MaskDiT (class-conditional, or unconditional with --num_classes 0) with accelerate: masked training, then
unmasking tuning.

    accelerate launch examples/train_maskdit.py               # built-in default: scikit-learn digits, CPU
    accelerate launch examples/train_maskdit.py --dataset_name imagenet-1k --vae stabilityai/sd-vae-ft-mse \\
        --model_config XL/2 --resolution 256 --mask_ratio 0.5 --mae_loss_weight 0.1 --mixed_precision bf16

The recipe (Zheng et al. 2023), in `training_step` below: EDM denoising score matching on the visible tokens plus
`mae_loss_weight` times an MAE reconstruction of the noisy input on the removed ones, label dropout for
classifier-free guidance, EMA of the weights; then a short unmasking tuning (mask ratio 0, or the cosine-ratio
schedule). The objective lives on the scheduler (`EDMHeunScheduler.masked_training_loss`), so the saved pipeline
samples with exactly the preconditioning it was trained with. Everything that does not change between methods
(batches, accumulation, checkpoints, EMA, the output folder) is `diffusers_masked.training`'s.

Reproducibility and resume: the data order, the masks, the noise and the label dropout of a step are functions of
(`--seed`, step, process), and checkpoints are renamed into place complete, so a run killed at any moment resumes
from its last checkpoint and ends with the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline, MaskedDiTTransformer2DModel, drop_class_labels
from diffusers_masked.masking import generate_mask, generated_mask_count
from diffusers_masked.training import arguments
from diffusers_masked.training.arguments import finite_float, int_at_least
from diffusers_masked.training.batches import check_batch_sizes
from diffusers_masked.training.data import load_training_data
from diffusers_masked.training.distributed import end_training, exit_process, setup_accelerator
from diffusers_masked.training.loop import periodic_saves, train_phases
from diffusers_masked.training.models import build_model, configure_model, model_num_classes, prepare_training
from diffusers_masked.training.phases import UNMASK_SCHEDULES, build_phases
from diffusers_masked.training.recipes import add_recipe_argument, parse_args_with_recipe
from diffusers_masked.training.run import finish_run, record_run, resume_run, start_run, start_trackers
from diffusers_masked.training.validation import sample_grid

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_argument(parser, "train_maskdit")
    arguments.add_data_arguments(parser)
    arguments.add_model_arguments(
        parser, presets="'S/2', 'B/2', 'L/2', 'XL/2'", blocks="the encoder and decoder blocks"
    )
    arguments.add_masking_arguments(parser, mask_ratio=0.5, mask_type="patch")
    arguments.add_routing_arguments(parser)
    parser.add_argument(
        "--paper_decoder",
        action="store_true",
        help="With a preset: MaskDiT's 8x512 decoder instead of the preset's own (sized to XL/2's FLOP share).",
    )
    group = parser.add_argument_group("MaskDiT objective")
    group.add_argument("--mae_loss_weight", type=finite_float(0), default=0.1, help="lambda of the MAE term.")
    group.add_argument(
        "--P_mean", type=finite_float(), default=-1.2, help="EDM training noise: ln sigma ~ N(P_mean, P_std)."
    )
    group.add_argument("--P_std", type=finite_float(0, low_open=True), default=1.2)
    group.add_argument("--sigma_data", type=finite_float(0, low_open=True), default=0.5)
    group = parser.add_argument_group("unmasking tuning")
    group.add_argument(
        "--unmask_tuning_steps", type=int_at_least(0), default=None, help="Steps of the unmasking phase."
    )
    group.add_argument(
        "--unmask_learning_rate",
        type=finite_float(0, low_open=True),
        default=None,
        help="Defaults to --learning_rate.",
    )
    group.add_argument(
        "--unmask_batch_size", type=int_at_least(1), default=None, help="Defaults to --train_batch_size."
    )
    group.add_argument(
        "--unmask_schedule",
        type=str,
        default="zero",
        choices=UNMASK_SCHEDULES,
        help="'zero': mask ratio 0; 'cosine': r = r0 cos(pi/2 i/n)^4 from the masked phase's last ratio.",
    )
    arguments.add_optimisation_arguments(parser, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0)
    arguments.add_output_arguments(parser)
    arguments.add_sampling_arguments(parser, guidance_scale=1.5, num_inference_steps=40)
    group = parser.add_argument_group("validation grids")
    group.add_argument("--num_validation_images_per_class", type=int_at_least(1), default=4)
    group.add_argument(
        "--validation_classes", type=int_at_least(1), default=10, help="How many classes the grids show."
    )
    args = parse_args_with_recipe(parser, argv, "train_maskdit")
    if args.builtin_digits and args.vae:
        parser.error("--vae needs image data (--dataset_name or --train_data_dir); the built-in digits are pixels")
    if args.max_train_steps + args.unmask_tuning_steps == 0:
        parser.error("nothing to train: --max_train_steps and --unmask_tuning_steps are both 0")
    arguments.resolve_schedule_and_model_config(parser, args, MaskedDiTTransformer2DModel)
    if args.paper_decoder and args.model_config_resolved is not None:
        try:
            args.model_config_resolved.update(MaskedDiTTransformer2DModel.preset_config(args.model_config, True))
        except ValueError:
            parser.error(f"--paper_decoder applies to a preset --model_config, got {args.model_config}")
    if args.unmask_learning_rate is None:
        args.unmask_learning_rate = args.learning_rate
    if args.unmask_batch_size is None:
        args.unmask_batch_size = args.train_batch_size
    return args


def training_step(batch, generator, mask_ratio: float, *, model, scheduler, data, args, device, grid_size):
    """MaskDiT on one micro-batch: clean samples (pixels, or latents drawn from their posteriors), labels dropped to
    the null class with `class_dropout_prob` (guidance), a mask of the model's `grid_size` token grid at this step's
    ratio, and the scheduler's objective: EDM denoising on the visible tokens + `mae_loss_weight` x MAE on the removed
    ones; with --tread_routes, routed tokens skip a span of encoder blocks (ids drawn last). Every draw comes from
    `generator`, in this order, so a step is a function of (seed, step, process)."""
    clean = data.clean_samples(batch, generator, device)
    labels = None
    if data.num_classes:
        labels = drop_class_labels(
            batch["class_labels"].to(device), data.num_classes, args.class_dropout_prob, generator=generator
        )
    mask, num_masked = None, None
    if mask_ratio > 0:
        mask = generate_mask(
            args.mask_type, len(clean), grid_size, mask_ratio, args.mask_block_size, generator=generator, device=device
        )
        # The count goes with the mask, so that neither the loss nor the model reads the mask on the host.
        num_masked = generated_mask_count(args.mask_type, grid_size, mask_ratio, args.mask_block_size)
    return scheduler.masked_training_loss(
        model,
        clean,
        class_labels=labels,
        mask=mask,
        num_masked=num_masked,
        mae_loss_weight=args.mae_loss_weight,
        generator=generator,
        routes=args.tread_routes,
    )


def make_pipeline(model, scheduler, data):
    scheduler = EDMHeunScheduler.from_config(scheduler.config)
    pipeline = MaskDiTPipeline(transformer=model, scheduler=scheduler, vae=data.vae, id2label=data.id2label)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def grid_rows(args) -> int:
    """Rows of a sample grid: one per class shown, or as many rows of unconditional samples."""
    return min(args.num_classes, args.validation_classes) if args.num_classes else args.validation_classes


def sample_grid_of(args, pipeline, per_class: int):
    kwargs = {"guidance_scale": args.guidance_scale, "num_inference_steps": args.num_inference_steps}
    return sample_grid(pipeline, grid_rows(args), per_class, seed=args.seed, **kwargs)


def main(args):
    output_dir = Path(args.output_dir)
    accelerator, sharded = setup_accelerator(output_dir, **arguments.accelerator_options(args))
    # One run per output folder; a checkpoint to resume is checked before any work (nothing in it can run code).
    run = start_run(
        accelerator,
        output_dir,
        args.resume_from_checkpoint,
        args.use_ema,
        sharded,
        config=arguments.run_config(args, args.mask_schedule_resolved),
        end=args.max_train_steps + args.unmask_tuning_steps,
        overwrite_output_dir=args.overwrite_output_dir,
    )
    start = args.pretrained_model_name_or_path
    num_classes = model_num_classes(MaskedDiTTransformer2DModel, start, args.model_config_resolved, args.num_classes)

    # 1. Data
    latent_cache_dir = args.cache_dir or output_dir / "latent-cache"
    data_options = arguments.data_options(args)
    if args.num_classes == 0:
        data_options["label_column"] = None
    data = load_training_data(
        accelerator,
        **data_options,
        latent_cache_dir=latent_cache_dir,
        num_classes=num_classes,
    )
    args.num_classes = data.num_classes

    # 2. Model and scheduler (which carries the objective)
    model = build_model(MaskedDiTTransformer2DModel, data, start=start, config=args.model_config_resolved)
    configure_model(model, **arguments.runtime_options(args))
    grid_size = (data.sample_size // model.config.patch_size,) * 2
    scheduler = EDMHeunScheduler(P_mean=args.P_mean, P_std=args.P_std, sigma_data=args.sigma_data)

    # 3. Phases, optimizer and EMA, prepared
    phases = build_phases(
        args.max_train_steps,
        args.unmask_tuning_steps,
        batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        mask_schedule=args.mask_schedule_resolved,
        warmup_steps=args.lr_warmup_steps,
        unmask_batch_size=args.unmask_batch_size,
        unmask_learning_rate=args.unmask_learning_rate,
        unmask_schedule=args.unmask_schedule,
    )
    check_batch_sizes(accelerator, len(data.dataset), [phase.batch_size for phase in phases])
    model, optimizer, ema = prepare_training(
        accelerator, model, sharded, learning_rate=args.learning_rate, **arguments.optimizer_options(args)
    )

    # 4. Resume, then record the run (a run that fails to start overwrites nothing of an earlier one)
    global_step = resume_run(accelerator, run, model, ema, sharded)
    config = arguments.run_config(args, args.mask_schedule_resolved)
    training_state = record_run(
        accelerator, output_dir, run, model, config, owned_dirs=[args.logging_dir, latent_cache_dir]
    )
    start_trackers(accelerator, "train_maskdit", config)
    total_steps = phases[-1].end
    logger.info(
        f"{len(data.dataset)} examples, {args.num_classes} classes, input {data.in_channels}x{data.sample_size}x"
        f"{data.sample_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, phases "
        + ", ".join(f"{p.name} [{p.start}, {p.end}) batch {p.batch_size} lr {p.learning_rate:g}" for p in phases)
    )

    # 5. Train, phase by phase
    progress = tqdm(
        range(total_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process
    )
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
            grid_size=grid_size,
        ),
        global_step=global_step,
        log_keys=("loss", "dsm_loss", "mae_loss"),
        after_step=periodic_saves(
            accelerator,
            model,
            ema,
            sharded,
            output_dir,
            training_state,
            end=total_steps,
            validation_grid=lambda ema_model: sample_grid_of(
                args, make_pipeline(ema_model, scheduler, data), args.num_validation_images_per_class
            ),
            **arguments.saving_options(args),
        ),
        progress=progress,
        **arguments.loop_options(args),
    )
    progress.close()

    # 6. Final checkpoint, EMA pipeline, sample grid, evaluation, model card
    per_class = args.num_validation_images_per_class * 2
    digits_evaluation = None
    if args.num_classes:  # samples.png shows the first samples of each class that were evaluated
        sampling = {"guidance_scale": args.guidance_scale}
        digits_evaluation = arguments.digits_evaluation_options(args, grid_rows(args), per_class, **sampling)
    finish_run(
        accelerator,
        model,
        ema,
        sharded,
        output_dir,
        global_step,
        training_state,
        model_cls=MaskedDiTTransformer2DModel,
        checkpoints_total_limit=args.checkpoints_total_limit,
        make_pipeline=lambda final_model: make_pipeline(final_model, scheduler, data),
        final_grid=lambda pipeline: sample_grid_of(args, pipeline, per_class),
        dataset_name=arguments.dataset_label(args),
        digits_evaluation=digits_evaluation,
        **arguments.hub_options(args),
    )
    end_training(accelerator)
    return global_step


if __name__ == "__main__":
    main(parse_args())
    exit_process()
