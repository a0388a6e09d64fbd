#!/usr/bin/env python
"""Train a MaskDM U-ViT with accelerate: masked pre-training, then fine-tuning without masks.

    accelerate launch examples/train_maskdm.py                      # built-in default: unconditional digits, CPU
    accelerate launch examples/train_maskdm.py --train_data_dir celebahq256/ --resolution 256 --model_config MaskDM-B \\
        --mask_type block --mask_block_size 4 --mask_ratio 0.9 --max_train_steps 200000 --finetune_steps 0 \\
        --train_batch_size 32 --learning_rate 2e-4 --max_grad_norm 1.0 --mixed_precision bf16

The recipe (Lei et al. 2023): stage 1 trains the DDPM noise-prediction loss on the visible patches of masked images
(patch, block or crop masks, a constant or staged ratio, e.g. 90% then 50%); stage 2 fine-tunes at mask ratio 0
from stage 1's *online* weights with a fresh optimizer, warm-up and EMA, optionally on another dataset or a subset
(`--max_train_samples`, the paper's 1% / 10% transfer runs). With both `--max_train_steps` and `--finetune_steps`
one run does both: stage 1 into `<output_dir>-pretrain` (beside, so that the final folder holds one pipeline), stage 2
into `<output_dir>`. With one of them 0 it does one
stage; pass stage 2 `--pretrained_model_name_or_path` a stage-1 output folder or checkpoint.

Each stage is resumable to the bit (`--resume_from_checkpoint latest`): batches, masks and noise are functions of
(`--seed`, step, process), checkpoints are atomic. The objective is `MaskedDDPMScheduler.masked_training_loss`; the
saved `MaskDMPipeline` samples with DDIM on the same betas (250 steps, as the official evaluation).
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_masked import MaskDMPipeline, MaskedDDPMScheduler, MaskedUViTTransformer2DModel
from diffusers_masked.masking import parse_mask_schedule
from diffusers_masked.models.masked_uvit import MASKDM_SIZES
from diffusers_masked.training_utils import (
    ONLINE_DIR,
    Phase,
    add_model_runtime_arguments,
    add_optimisation_arguments,
    add_output_arguments,
    apply_run_defaults,
    check_batch_sizes,
    check_model_config,
    configure_model,
    finish_run,
    finite_float,
    int_at_least,
    list_checkpoints,
    load_checkpoint,
    load_start_model,
    load_training_data,
    masked_loss_fn,
    periodic_saves,
    prepare_training,
    read_training_state,
    record_run,
    resolve_schedule_and_model_config,
    run_config,
    sample_grid,
    setup_accelerator,
    start_model_config,
    start_run,
    train_phases,
)

logger = get_logger(__name__)

# MaskDM's names for the masks; "patch" is this package's "random".
MASK_TYPES = {"patch": "random", "block": "block", "crop": "crop"}
BETA_SCHEDULES = ("linear", "squaredcos_cap_v2")
PRETRAIN_SUFFIX = "-pretrain"

# The built-in default: both stages on the digits, unconditional as the paper. Sized from per-step timings on two
# shared CPU cores (docs/maskdm.md); every value can be overridden on the command line.
DIGITS_DEFAULTS = {
    "output_dir": "maskdm-digits",
    "resolution": 16,
    "model_config": json.dumps(
        {
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 1,
            "num_layers": 7,
            "num_attention_heads": 4,
            "attention_head_dim": 32,
        }
    ),
    "train_batch_size": 128,
    "max_train_steps": 1000,
    "mask_type": "patch",
    "mask_ratio": 0.5,
    "finetune_steps": 300,
    "learning_rate": 1e-3,
    "lr_warmup_steps": 100,
    "finetune_learning_rate": 5e-4,
    "finetune_warmup_steps": 50,
    "adam_weight_decay": 0.0,
    "ema_decay": 0.995,
    "ema_warmup": True,
    "validation_steps": 500,
    "checkpointing_steps": 500,
    "num_inference_steps": 50,
    "num_eval_samples_per_class": 36,
    # The paper's betas (0.99, 0.99) suit its 200k-step runs; over 1,300 steps they left the model at twice the loss
    # and samples of noise (digits-FID 396), where AdamW's usual (0.9, 0.999) gave 52 (docs/maskdm.md).
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
}
# Defaults for a user's own data: the paper's CelebA-HQ 256 MaskDM-B settings (official configs/celebahq_base_90p.yml
# and celebahq_base.yml; docs/maskdm.md lists the flag sets of each paper run).
GENERAL_DEFAULTS = {
    "output_dir": "maskdm-output",
    "resolution": 256,
    "model_config": "MaskDM-B",
    "train_batch_size": 32,
    "max_train_steps": 200_000,
    "mask_type": "block",
    "mask_ratio": 0.9,
    "finetune_steps": 0,
    "learning_rate": 2e-4,
    "lr_warmup_steps": 0,
    "finetune_learning_rate": 1e-5,
    "finetune_warmup_steps": 5000,
    "adam_weight_decay": 0.03,
    "adam_beta1": 0.99,
    "adam_beta2": 0.99,
    "ema_decay": 0.999,
    "ema_warmup": False,
    "validation_steps": 10_000,
    "checkpointing_steps": 10_000,
    "num_inference_steps": 250,
    "num_eval_samples_per_class": 0,
}


def parse_args(argv=None):
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Data
    parser.add_argument("--dataset_name", type=str, default=None, help="A `datasets` Hub id or local dataset folder.")
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--train_data_dir", type=str, default=None, help="An image folder.")
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument(
        "--label_column",
        type=str,
        default=None,
        help="Train class-conditionally on this label column (sub-folders for --train_data_dir: 'label'). Default: "
        "unconditional, as the paper.",
    )
    parser.add_argument("--cache_dir", type=str, default=None)
    parser.add_argument("--resolution", type=int_at_least(1), default=None, help="Image side after resize and crop.")
    parser.add_argument("--random_crop", action="store_true")
    parser.add_argument(
        "--random_flip", action="store_true", help="Random horizontal flips (the 1%%/10%% transfer runs)."
    )
    parser.add_argument(
        "--max_train_samples", type=int_at_least(1), default=None, help="Train on the first N examples."
    )
    parser.add_argument("--num_classes", type=int_at_least(1), default=None, help="With --label_column.")
    parser.add_argument("--skip_image_verification", action="store_true")
    # Model
    parser.add_argument(
        "--model_config", type=str, default=None, help="'MaskDM-S', 'MaskDM-B', a JSON config or a config.json."
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Start from these weights: a stage-1 output folder or checkpoint (its online weights), or a saved "
        "transformer or pipeline (e.g. a converted official checkpoint).",
    )
    add_model_runtime_arguments(parser, "the U-ViT blocks")
    parser.add_argument("--beta_schedule", type=str, default="squaredcos_cap_v2", choices=BETA_SCHEDULES)
    # Stage 1: masked pre-training
    parser.add_argument("--max_train_steps", type=int_at_least(0), default=None, help="Stage-1 steps (0 skips it).")
    parser.add_argument("--mask_type", type=str, default=None, choices=tuple(MASK_TYPES))
    parser.add_argument(
        "--mask_block_size", type=int_at_least(1), default=4, help="Block side (patches), --mask_type block."
    )
    parser.add_argument("--mask_ratio", type=finite_float(0, 1, high_open=True), default=None)
    parser.add_argument(
        "--mask_schedule",
        type=str,
        default=None,
        help="Staged ratios, e.g. '0.9@0-200000,0.5@200000-', or a JSON schedule; overrides --mask_ratio.",
    )
    parser.add_argument("--train_batch_size", type=int_at_least(1), default=None, help="Per-process batch size.")
    parser.add_argument("--learning_rate", type=finite_float(0, low_open=True), default=None)
    parser.add_argument("--lr_warmup_steps", type=int_at_least(0), default=None)
    # Stage 2: fine-tuning
    parser.add_argument("--finetune_steps", type=int_at_least(0), default=None, help="Stage-2 steps (0 skips it).")
    parser.add_argument("--finetune_learning_rate", type=finite_float(0, low_open=True), default=None)
    parser.add_argument(
        "--finetune_batch_size", type=int_at_least(1), default=None, help="Defaults to --train_batch_size."
    )
    parser.add_argument("--finetune_warmup_steps", type=int_at_least(0), default=None)
    # Optimisation (both stages)
    parser.add_argument(
        "--class_dropout_prob", type=finite_float(0, 1), default=0.15, help="Label dropout (conditional)."
    )
    add_optimisation_arguments(parser)  # AdamW betas and weight decay: the recipe defaults
    # Checkpoints, logging, validation, output
    add_output_arguments(parser)
    parser.add_argument(
        "--num_validation_images", type=int_at_least(1), default=16, help="Images per grid (rows of 8)."
    )
    parser.add_argument("--guidance_scale", type=finite_float(0), default=1.0, help="Conditional models only.")
    parser.add_argument(
        "--num_inference_steps", type=int_at_least(1), default=None, help="DDIM steps of grids and evaluation."
    )
    parser.add_argument(
        "--num_eval_samples_per_class", type=int_at_least(0), default=None, help="Digits only: FID samples / 10."
    )
    args = parser.parse_args(argv)

    apply_run_defaults(parser, args, DIGITS_DEFAULTS, GENERAL_DEFAULTS)
    if args.max_train_steps + args.finetune_steps == 0:
        parser.error("nothing to train: --max_train_steps and --finetune_steps are both 0")
    if args.num_inference_steps > 1000:
        parser.error(
            f"--num_inference_steps must be at most the 1000 training timesteps, got {args.num_inference_steps}"
        )
    if args.num_classes is not None and args.label_column is None:
        parser.error("--num_classes needs --label_column (MaskDM trains unconditionally by default)")
    if args.guidance_scale != 1 and args.label_column is None:
        parser.error(
            "--guidance_scale needs a class-conditional run (--label_column); unconditional sampling has none"
        )
    resolve_schedule_and_model_config(parser, args, MaskedUViTTransformer2DModel)
    if args.finetune_batch_size is None:
        args.finetune_batch_size = args.train_batch_size
    return args


def stages_of(args) -> list[tuple[str, Path]]:
    """The stages this run trains and the folder of each."""
    output_dir = Path(args.output_dir)
    if args.max_train_steps and args.finetune_steps:
        return [("pretrain", output_dir.parent / f"{output_dir.name}{PRETRAIN_SUFFIX}"), ("finetune", output_dir)]
    return [("pretrain" if args.max_train_steps else "finetune", output_dir)]


def stage_phase(args, stage: str) -> Phase:
    if stage == "pretrain":
        return Phase(
            "masked",
            0,
            args.max_train_steps,
            args.train_batch_size,
            args.learning_rate,
            args.masked_schedule,
            args.lr_warmup_steps,
        )
    return Phase(
        "finetune",
        0,
        args.finetune_steps,
        args.finetune_batch_size,
        args.finetune_learning_rate,
        parse_mask_schedule(0.0),
        args.finetune_warmup_steps,
    )


def stage_is_complete(folder: Path, steps: int) -> bool:
    """A stage-1 run that ended: its online weights are saved and its newest checkpoint is at its last step."""
    checkpoints = list_checkpoints(folder)
    return (
        (folder / ONLINE_DIR / "config.json").is_file()
        and bool(checkpoints)
        and (read_training_state(checkpoints[-1])["global_step"] >= steps)
    )


def build_model(args, start, in_channels: int, sample_size: int, num_classes: int) -> MaskedUViTTransformer2DModel:
    if start is not None:
        model = load_start_model(start, MaskedUViTTransformer2DModel)
    else:
        data_config = {"sample_size": sample_size, "in_channels": in_channels, "num_classes": num_classes}
        # A preset names a size of model, not of data: it takes the data's; an explicit config must match it.
        preset = args.model_config in MASKDM_SIZES
        config = (
            {**args.model_config_resolved, **data_config} if preset else {**data_config, **args.model_config_resolved}
        )
        model = MaskedUViTTransformer2DModel(**config)
    config = model.config
    size = config.sample_size if isinstance(config.sample_size, int) else tuple(config.sample_size)
    if (size, config.in_channels, config.num_classes) != (sample_size, in_channels, num_classes):
        raise ValueError(
            f"the model has sample_size={size}, in_channels={config.in_channels}, num_classes={config.num_classes} "
            f"but the data is {in_channels}x{sample_size}x{sample_size} with {num_classes} classes (0: unconditional)"
        )
    return model


def make_pipeline(model, scheduler):
    pipeline = MaskDMPipeline(transformer=model, scheduler=MaskDMPipeline.default_scheduler(scheduler.config))
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def validation_grid(args, pipeline):
    rows, cols = max(1, args.num_validation_images // 8), min(8, args.num_validation_images)
    kwargs = {"num_inference_steps": args.num_inference_steps}
    if pipeline.num_classes:
        rows = min(pipeline.num_classes, 10)
        kwargs["guidance_scale"] = args.guidance_scale
    return sample_grid(pipeline, rows, cols, seed=args.seed, **kwargs)


def run_stage(args, accelerator, sharded, stage, folder, run, data, start, log_step_offset, final):
    """Train one stage into `folder`; returns its global step."""
    # 1. Model and scheduler (which carries the objective)
    phase = stage_phase(args, stage)
    model = build_model(args, start, data.in_channels, data.sample_size, data.num_classes)
    configure_model(
        model,
        gradient_checkpointing=args.gradient_checkpointing,
        attention_backend=args.attention_backend,
        torch_compile=args.torch_compile,
    )
    if run.resumed_state is not None:
        check_model_config(run.resumed_state["model_config"], model.config)
    scheduler = MaskedDDPMScheduler(beta_schedule=args.beta_schedule)

    # 2. A fresh optimizer and EMA, prepared
    model, optimizer, ema = prepare_training(
        accelerator,
        model,
        sharded,
        learning_rate=phase.learning_rate,
        adam_betas=(args.adam_beta1, args.adam_beta2),
        adam_weight_decay=args.adam_weight_decay,
        adam_epsilon=args.adam_epsilon,
        adam_fused=args.adam_fused,
        use_ema=args.use_ema,
        ema_decay=args.ema_decay,
        ema_warmup=args.ema_warmup,
    )

    # 3. Resume, then record the stage
    global_step = 0
    if run.resume_path is not None:
        global_step = load_checkpoint(accelerator, run.resume_path, ema, sharded)["global_step"]
        logger.info(f"{stage}: resumed from {run.resume_path} at step {global_step}")
    config = run_config(
        args, phase.mask_schedule, stage=stage, start_weights=str(start) if start is not None else None
    )
    training_state = record_run(accelerator, folder, run.run_id, model, config)
    logger.info(
        f"{stage}: {len(data.dataset)} examples, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
        f"{phase.end} steps, batch {phase.batch_size}, lr {phase.learning_rate:g}, start {start or 'scratch'}"
    )

    # 4. Train
    progress = tqdm(range(phase.end), initial=global_step, desc=stage, disable=not accelerator.is_local_main_process)
    global_step = train_phases(
        accelerator,
        model,
        optimizer,
        ema,
        [phase],
        data.dataset,
        data.collate_fn,
        global_step=global_step,
        seed=args.seed,
        compute_loss=masked_loss_fn(
            accelerator,
            model,
            scheduler,
            data,
            mask_type=MASK_TYPES[args.mask_type],
            mask_block_size=args.mask_block_size,
            class_dropout_prob=args.class_dropout_prob,
        ),
        log_keys=("loss",),
        after_step=periodic_saves(
            accelerator,
            model,
            ema,
            sharded,
            folder,
            training_state,
            end=phase.end,
            checkpointing_steps=args.checkpointing_steps,
            checkpoints_total_limit=args.checkpoints_total_limit,
            validation_steps=args.validation_steps,
            validation_grid=lambda ema_model: validation_grid(args, make_pipeline(ema_model, scheduler)),
            tag=f"{stage}/validation",
        ),
        progress=progress,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        num_workers=args.dataloader_num_workers,
        log_step_offset=log_step_offset,
    )
    progress.close()

    # 5. Final checkpoint, EMA pipeline and online weights, sample grid, evaluation, model card
    rows, cols = max(1, args.num_validation_images // 8), min(8, args.num_validation_images)
    digits_evaluation = None
    if final and args.builtin_digits and args.num_eval_samples_per_class:
        digits_evaluation = {
            "num_samples_per_class": args.num_eval_samples_per_class,
            "resolution": args.resolution,
            "seed": args.seed + 1,
            "grid_rows": rows,
            "grid_cols": cols,
            "cache_dir": args.cache_dir,
            "num_inference_steps": args.num_inference_steps,
        }
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
        make_pipeline=lambda final_model: make_pipeline(final_model, scheduler),
        final_grid=lambda pipeline: validation_grid(args, pipeline),
        dataset_name="scikit-learn digits" if args.builtin_digits else (args.dataset_name or args.train_data_dir),
        digits_evaluation=digits_evaluation,
        save_online=True,
        log_step=log_step_offset + global_step,
        repo_id=args.hub_model_id,
        push_to_hub=args.push_to_hub and final,
        hub_token=args.hub_token,
    )
    accelerator.wait_for_everyone()
    accelerator.free_memory()  # the next stage prepares a new model and optimizer; save_state must see only those
    return global_step


def main(args):
    output_dir = Path(args.output_dir)
    accelerator, sharded = setup_accelerator(
        output_dir,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        report_to=args.report_to,
        logging_dir=args.logging_dir,
        use_ema=args.use_ema,
        cpu_threads=args.cpu_threads,
        seed=args.seed,
    )
    stages = stages_of(args)
    # Every stage's folder is claimed and its checkpoint checked before any work. A stage-1 run that ended is not
    # trained again when the two-stage run is resumed.
    runs = {}
    for stage, folder in stages:
        resume = args.resume_from_checkpoint
        if resume not in (None, "latest") and Path(resume).resolve().parent != folder.resolve():
            resume = "latest"  # an explicit checkpoint belongs to the other stage; this one continues where it is
        runs[stage] = start_run(accelerator, folder, resume, args.use_ema, sharded)
    start = args.pretrained_model_name_or_path
    model_classes = start_model_config(start, MaskedUViTTransformer2DModel).get("num_classes") if start else None
    if start is None:
        model_classes = args.model_config_resolved.get("num_classes")
    if args.label_column is None and model_classes:
        raise ValueError(f"the model is class-conditional (num_classes={model_classes}); pass --label_column")

    # 1. Data, shared by both stages
    data = load_training_data(
        accelerator,
        args.resolution,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        image_column=args.image_column,
        label_column=args.label_column,
        cache_dir=args.cache_dir,
        max_train_samples=args.max_train_samples,
        verify=not args.skip_image_verification,
        random_crop=args.random_crop,
        random_flip=args.random_flip,
        num_classes=(args.num_classes or model_classes) if args.label_column is not None else 0,
    )
    check_batch_sizes(accelerator, len(data.dataset), [stage_phase(args, stage).batch_size for stage, _ in stages])
    if accelerator.is_main_process:
        flat = {k: v for k, v in vars(args).items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("train_maskdm", config={k: v for k, v in flat.items() if k != "hub_token"})

    # 2. The stages
    offset = 0
    for i, (stage, folder) in enumerate(stages):
        run = runs[stage]
        if (
            stage == "pretrain"
            and len(stages) == 2
            and run.resume_path is not None
            and stage_is_complete(folder, args.max_train_steps)
        ):
            logger.info(
                f"pretrain: {folder} finished at step {args.max_train_steps}; fine-tuning from its online weights"
            )
        else:
            run_stage(args, accelerator, sharded, stage, folder, run, data, start, offset, final=i == len(stages) - 1)
        # Stage 2 starts from stage 1's online weights (the official fine-tuning loads the checkpoint's `model`).
        start = folder
        offset += args.max_train_steps if stage == "pretrain" else 0
    # See train_maskdit.py: every rank waits here until the main process has written the output.
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(parse_args())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # As train_maskdit.py: leave without the interpreter's teardown, which can hang in gloo (pytorch#56297).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
