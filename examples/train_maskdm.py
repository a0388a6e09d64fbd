#!/usr/bin/env python
"""Train a MaskDM U-ViT with accelerate: masked pre-training, then fine-tuning without masks.

    accelerate launch examples/train_maskdm.py                      # built-in default: unconditional digits, CPU
    accelerate launch examples/train_maskdm.py --train_data_dir celebahq256/ --mixed_precision bf16  # MaskDM-B

The recipe (Lei et al. 2023): stage 1 trains the DDPM noise-prediction loss on the visible patches of masked images
(patch, block or crop masks, a constant or staged ratio, e.g. 90% then 50%); stage 2 fine-tunes at mask ratio 0
from stage 1's *online* weights with a fresh optimizer, warm-up and EMA, optionally on another dataset or a subset
(`--max_train_samples`, the paper's 1% / 10% transfer runs). With both `--max_train_steps` and `--finetune_steps`
one run does both: stage 1 into `<output_dir>-pretrain` (beside, so that the final folder holds one pipeline), stage 2
into `<output_dir>`. With one of them 0 it does one stage; pass stage 2 `--pretrained_model_name_or_path` a stage-1
output folder or checkpoint.

Each stage is resumable to the bit (`--resume_from_checkpoint latest`): batches, masks and noise are functions of
(`--seed`, step, process), checkpoints are atomic. The objective is `MaskedDDPMScheduler.masked_training_loss`; the
saved `MaskDMPipeline` samples with DDIM on the same betas (250 steps, as the official evaluation).
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_masked import MaskDMPipeline, MaskedDDPMScheduler, MaskedUViTTransformer2DModel, drop_class_labels
from diffusers_masked.evaluation import sampling
from diffusers_masked.masking import generate_mask, generated_mask_count, parse_mask_schedule
from diffusers_masked.models.masked_uvit import MASKDM_SIZES
from diffusers_masked.training import arguments
from diffusers_masked.training.arguments import finite_float, int_at_least
from diffusers_masked.training.batches import check_batch_sizes
from diffusers_masked.training.data import load_training_data
from diffusers_masked.training.distributed import end_training, exit_process, setup_accelerator
from diffusers_masked.training.loop import periodic_saves, train_phases
from diffusers_masked.training.models import build_model, configure_model, model_num_classes, prepare_training
from diffusers_masked.training.phases import Phase, phases_mask_schedule, staged_phases
from diffusers_masked.training.recipes import add_recipe_argument, parse_args_with_recipe
from diffusers_masked.training.run import finish_run, record_run, resume_run, run_finished, start_run, start_trackers
from diffusers_masked.training.validation import sample_grid

logger = get_logger(__name__)

BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
PRETRAIN_SUFFIX = "-pretrain"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_argument(parser, "train_maskdm")
    arguments.add_data_arguments(parser, label_column=None, latents=False, class_dropout_prob=0.15)
    arguments.add_model_arguments(parser, presets="'MaskDM-S', 'MaskDM-B'", blocks="the U-ViT blocks")
    parser.add_argument("--beta_schedule", type=str, default="squaredcos_cap_v2", choices=BETA_SCHEDULES)
    parser.add_argument(
        "--finetune_beta_schedule", default=None, choices=BETA_SCHEDULES, help="Defaults to --beta_schedule."
    )
    arguments.add_masking_arguments(parser, mask_block_size=4)
    arguments.add_routing_arguments(parser)
    parser.add_argument(
        "--pretrain_stages",
        type=str,
        default=None,
        help='Staged pre-training, each stage with its own settings, as JSON: e.g. \'[{"steps": 200000, '
        '"mask_ratio": 0.9, "batch_size": 128, "learning_rate": 2e-4}, {"steps": 500000, "mask_ratio": 0.5, '
        '"batch_size": 64, "learning_rate": 2e-4, "warmup_steps": 5000, "max_grad_norm": 1.0}]\'. Replaces '
        "--max_train_steps, --mask_ratio, --mask_schedule, --train_batch_size, --learning_rate, --lr_warmup_steps.",
    )
    group = parser.add_argument_group("stage 2: fine-tuning")
    group.add_argument("--finetune_steps", type=int_at_least(0), default=None, help="Stage-2 steps (0 skips it).")
    group.add_argument("--finetune_learning_rate", type=finite_float(0, low_open=True), default=None)
    group.add_argument(
        "--finetune_batch_size", type=int_at_least(1), default=None, help="Defaults to --train_batch_size."
    )
    group.add_argument("--finetune_warmup_steps", type=int_at_least(0), default=None)
    group.add_argument("--finetune_max_grad_norm", type=finite_float(0, low_open=True), default=None)
    arguments.add_optimisation_arguments(parser)  # AdamW betas and weight decay: the recipe defaults
    arguments.add_output_arguments(parser)
    arguments.add_sampling_arguments(parser, guidance_scale=1.0)
    parser.add_argument(
        "--num_validation_images", type=int_at_least(1), default=16, help="Images per grid (rows of 8)."
    )
    parser.add_argument(
        "--sampler",
        default="ddim",
        choices=("ddim", "ddpm", "dpmsolver"),
        help="The saved pipeline's sampler, also of grids and evaluation: DDIM (x0 clipped), DDPM (ancestral), or "
        "DPM-Solver++ with x0 clipped (few steps).",
    )
    args = parse_args_with_recipe(parser, argv, "train_maskdm")
    if args.max_train_steps + args.finetune_steps == 0:
        parser.error("nothing to train: --max_train_steps and --finetune_steps are both 0")
    if args.num_inference_steps > 1000:
        parser.error(f"--num_inference_steps must be at most the 1000 training steps, got {args.num_inference_steps}")
    if args.label_column is None and (args.num_classes or args.guidance_scale != 1):
        flag = "--num_classes" if args.num_classes else "--guidance_scale"
        parser.error(
            f"{flag} needs a class-conditional run (--label_column); MaskDM trains unconditionally by default"
        )
    arguments.resolve_pretrain_stages(parser, args)
    arguments.resolve_schedule_and_model_config(parser, args, MaskedUViTTransformer2DModel)
    if args.finetune_batch_size is None:
        args.finetune_batch_size = args.train_batch_size
    return args


def stages_of(args) -> list[tuple[str, Path]]:
    """The stages this run trains and the folder of each."""
    output_dir = Path(args.output_dir)
    if args.max_train_steps and args.finetune_steps:
        # Named from the folder's real name: `--output_dir .` must not give a folder called "-pretrain".
        pretrain = output_dir.resolve().parent / f"{output_dir.resolve().name}{PRETRAIN_SUFFIX}"
        return [("pretrain", pretrain), ("finetune", output_dir)]
    return [("pretrain" if args.max_train_steps else "finetune", output_dir)]


def stage_phases(args, stage: str) -> list[Phase]:
    """The phases of a stage: pre-training as one phase at --mask_ratio/--mask_schedule, or one per
    --pretrain_stages entry; fine-tuning as one unmasked phase."""
    if stage == "pretrain" and args.pretrain_stages:
        return staged_phases(args.pretrain_stages)
    if stage == "pretrain":
        steps, batch, lr = args.max_train_steps, args.train_batch_size, args.learning_rate
        return [Phase("masked", 0, steps, batch, lr, args.mask_schedule_resolved, args.lr_warmup_steps)]
    steps, batch, lr = args.finetune_steps, args.finetune_batch_size, args.finetune_learning_rate
    warmup, clip = args.finetune_warmup_steps, args.finetune_max_grad_norm
    return [Phase("finetune", 0, steps, batch, lr, parse_mask_schedule(0.0), warmup, clip)]


def stage_config(args, stage: str, start) -> dict:
    """The stage's flags as its folder records them: the run's, its mask schedule, the stage and its start weights."""
    start_weights = str(start) if start is not None else None
    schedule = phases_mask_schedule(stage_phases(args, stage))
    return arguments.run_config(args, schedule, stage=stage, start_weights=start_weights)


def training_step(batch, generator, mask_ratio: float, *, model, scheduler, data, args, device, grid_size):
    """MaskDM on one micro-batch: clean images, labels dropped to the null class with `class_dropout_prob` (a
    class-conditional run), a mask of the model's `grid_size` patch grid at this step's ratio (none in fine-tuning),
    and the scheduler's DDPM objective: the noise-prediction MSE on the visible patches only. Every draw comes from
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
        model, clean, labels, mask, generator=generator, num_masked=num_masked, routes=args.tread_routes
    )


def make_pipeline(model, scheduler, sampler: str = "ddim"):
    # DDIM with x0 clipped as the official evaluation; DDPM (ancestral) and DPM-Solver++ keep the clipping.
    pipeline = MaskDMPipeline(transformer=model, scheduler=MaskDMPipeline.default_scheduler(scheduler.config))
    if sampler != "ddim":
        sampling.set_scheduler(pipeline, sampler)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def grid_shape(args) -> tuple[int, int]:
    return max(1, args.num_validation_images // 8), min(8, args.num_validation_images)


def validation_grid(args, pipeline):
    rows, cols = grid_shape(args)
    kwargs = {"num_inference_steps": args.num_inference_steps}
    if pipeline.num_classes:
        rows = min(pipeline.num_classes, 10)
        kwargs["guidance_scale"] = args.guidance_scale
    return sample_grid(pipeline, rows, cols, seed=args.seed, **kwargs)


def run_stage(args, accelerator, sharded, stage, folder, run, data, start, log_step_offset, final):
    """Train one stage into `folder`; returns its global step."""
    # 1. Model and scheduler (which carries the objective)
    phases = stage_phases(args, stage)
    end = phases[-1].end
    preset = args.model_config in MASKDM_SIZES
    model = build_model(
        MaskedUViTTransformer2DModel, data, start=start, config=args.model_config_resolved, preset=preset
    )
    configure_model(model, **arguments.runtime_options(args))
    grid_size = tuple(side // model.config.patch_size for side in (data.sample_size, data.sample_size))
    beta_schedule = args.finetune_beta_schedule if stage == "finetune" else args.beta_schedule
    scheduler = MaskedDDPMScheduler(beta_schedule=beta_schedule or args.beta_schedule)

    # 2. A fresh optimizer and EMA, prepared
    model, optimizer, ema = prepare_training(
        accelerator, model, sharded, learning_rate=phases[0].learning_rate, **arguments.optimizer_options(args)
    )

    # 3. Resume, then record the stage
    global_step = resume_run(accelerator, run, model, ema, sharded, stage=stage)
    config = stage_config(args, stage, start)
    training_state = record_run(accelerator, folder, run, model, config, owned_dirs=[args.logging_dir])
    logger.info(
        f"{stage}: {len(data.dataset)} examples, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"start {start or 'scratch'}, phases "
        + ", ".join(f"{p.name} [{p.start}, {p.end}) batch {p.batch_size} lr {p.learning_rate:g}" for p in phases)
    )

    # 4. Train
    progress = tqdm(range(end), initial=global_step, desc=stage, disable=not accelerator.is_local_main_process)
    step = functools.partial(
        training_step,
        model=model,
        scheduler=scheduler,
        data=data,
        args=args,
        device=accelerator.device,
        grid_size=grid_size,
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
        after_step=periodic_saves(
            accelerator,
            model,
            ema,
            sharded,
            folder,
            training_state,
            end=end,
            validation_grid=lambda ema_model: validation_grid(args, make_pipeline(ema_model, scheduler, args.sampler)),
            tag=f"{stage}/validation",
            **arguments.saving_options(args),
        ),
        progress=progress,
        log_step_offset=log_step_offset,
        **arguments.loop_options(args),
    )
    progress.close()

    # 5. Final checkpoint, EMA pipeline and online weights, sample grid, evaluation, model card
    digits_evaluation = arguments.digits_evaluation_options(args, *grid_shape(args)) if final else None
    finish_run(
        accelerator,
        model,
        ema,
        sharded,
        folder,
        global_step,
        training_state,
        model_cls=MaskedUViTTransformer2DModel,
        checkpoints_total_limit=args.checkpoints_total_limit,
        make_pipeline=lambda final_model: make_pipeline(final_model, scheduler, args.sampler),
        final_grid=lambda pipeline: validation_grid(args, pipeline),
        dataset_name=arguments.dataset_label(args),
        digits_evaluation=digits_evaluation,
        save_online=True,
        log_step=log_step_offset + global_step,
        **{**arguments.hub_options(args), "push_to_hub": args.push_to_hub and final},
    )
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the next stage prepares a new model and optimizer; save_state must see only those
    return global_step


def main(args):
    output_dir = Path(args.output_dir)
    accelerator, sharded = setup_accelerator(output_dir, **arguments.accelerator_options(args))
    stages = stages_of(args)
    # Every stage's folder is claimed and its checkpoint checked before any work. A stage-1 run that ended is not
    # trained again when the two-stage run is resumed.
    runs = {}
    for i, (stage, folder) in enumerate(stages):
        resume = args.resume_from_checkpoint
        if resume not in (None, "latest") and Path(resume).resolve().parent != folder.resolve():
            resume = "latest"  # an explicit checkpoint belongs to the other stage; this one continues where it is
        start = stages[0][1] if i == 1 else args.pretrained_model_name_or_path
        runs[stage] = start_run(
            accelerator,
            folder,
            resume,
            args.use_ema,
            sharded,
            config=stage_config(args, stage, start),
            end=stage_phases(args, stage)[-1].end,
            overwrite_output_dir=args.overwrite_output_dir,
        )
    start = args.pretrained_model_name_or_path
    model_classes = model_num_classes(
        MaskedUViTTransformer2DModel, start, args.model_config_resolved, args.num_classes
    )
    if args.label_column is None and model_classes:
        raise ValueError(f"the model is class-conditional (num_classes={model_classes}); pass --label_column")

    # 1. Data, shared by both stages
    data = load_training_data(
        accelerator,
        **arguments.data_options(args),
        num_classes=model_classes if args.label_column is not None else 0,
    )
    batch_sizes = [phase.batch_size for stage, _ in stages for phase in stage_phases(args, stage)]
    check_batch_sizes(accelerator, len(data.dataset), batch_sizes)
    start_trackers(accelerator, "train_maskdm", vars(args))

    # 2. The stages
    offset = 0
    for i, (stage, folder) in enumerate(stages):
        run = runs[stage]
        resumed = stage == "pretrain" and len(stages) == 2 and run.resume_path is not None
        if resumed and run_finished(folder, args.max_train_steps):
            logger.info(
                f"pretrain: {folder} ended at step {args.max_train_steps}; fine-tuning from its online weights"
            )
        else:
            run_stage(args, accelerator, sharded, stage, folder, run, data, start, offset, final=i == len(stages) - 1)
        # Stage 2 starts from stage 1's online weights (the official fine-tuning loads the checkpoint's `model`).
        start = folder
        offset += args.max_train_steps if stage == "pretrain" else 0
    end_training(accelerator)


if __name__ == "__main__":
    main(parse_args())
    exit_process()
