#!/usr/bin/env python
"""Train a MaskDiT (class-conditional, or unconditional with --num_classes 0) with accelerate: masked training, then
unmasking tuning.

    accelerate launch examples/train_maskdit.py                     # built-in default: scikit-learn digits, CPU, ~13 min
    accelerate launch examples/train_maskdit.py --dataset_name imagenet-1k --vae stabilityai/sd-vae-ft-mse \\
        --model_config XL/2 --resolution 256 --mask_ratio 0.5 --mae_loss_weight 0.1 --mixed_precision bf16

The recipe (Zheng et al. 2023): EDM denoising score matching on the visible tokens plus `mae_loss_weight` times
an MAE reconstruction of the noisy input on the removed ones, label dropout for classifier-free guidance, EMA of the
weights; then a short unmasking tuning (mask ratio 0, or the cosine-ratio schedule). The objective lives on the
scheduler (`EDMHeunScheduler.masked_training_loss`), so the saved pipeline samples with exactly the
preconditioning it was trained with.

Reproducibility and resume: the data order, the masks, the noise and the label dropout of a step are functions of
(`--seed`, step, process), not of a running random state, and checkpoints are written to a temporary folder and
renamed into place, so a run killed at any moment resumes from its last complete checkpoint and ends with the same
weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from accelerate.logging import get_logger
from tqdm.auto import tqdm

from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline, MaskedDiTTransformer2DModel
from diffusers_masked.masking import MASK_TYPES
from diffusers_masked.training_utils import (
    UNMASK_SCHEDULES,
    add_model_runtime_arguments,
    add_optimisation_arguments,
    add_output_arguments,
    apply_run_defaults,
    build_phases,
    check_batch_sizes,
    check_model_config,
    configure_model,
    finish_run,
    finite_float,
    int_at_least,
    load_checkpoint,
    load_start_model,
    load_training_data,
    masked_loss_fn,
    periodic_saves,
    prepare_training,
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

# The built-in default: what a run with no data flags trains. Tuned for recognisable digits in about ten minutes on
# two CPU cores (13 measured, docs/benchmarks.md); every value can still be overridden on the command line.
DIGITS_DEFAULTS = {
    "output_dir": "maskdit-digits",
    "resolution": 16,
    "model_config": json.dumps(
        {
            "sample_size": 16,
            "patch_size": 2,
            "in_channels": 1,
            "num_layers": 6,
            "num_attention_heads": 4,
            "attention_head_dim": 32,
            "decoder_num_layers": 2,
            "decoder_num_attention_heads": 2,
            "decoder_attention_head_dim": 32,
        }
    ),
    "train_batch_size": 128,
    "max_train_steps": 1000,
    "unmask_tuning_steps": 200,
    "unmask_batch_size": 64,
    "learning_rate": 1e-3,
    "lr_warmup_steps": 200,
    "ema_decay": 0.999,
    "ema_warmup": True,
    "validation_steps": 500,
    "checkpointing_steps": 500,
    "num_eval_samples_per_class": 36,
}
# Defaults for a user's own data: the paper's settings.
GENERAL_DEFAULTS = {
    "output_dir": "maskdit-output",
    "resolution": 256,
    "model_config": "XL/2",
    "train_batch_size": 32,
    "max_train_steps": 100_000,
    "unmask_tuning_steps": 0,
    "learning_rate": 1e-4,
    "lr_warmup_steps": 0,
    "ema_decay": 0.9999,
    "ema_warmup": False,
    "validation_steps": 5000,
    "checkpointing_steps": 5000,
    "num_eval_samples_per_class": 0,
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Data
    parser.add_argument("--dataset_name", type=str, default=None, help="A `datasets` Hub id or local dataset folder.")
    parser.add_argument("--dataset_config_name", type=str, default=None)
    parser.add_argument("--train_data_dir", type=str, default=None, help="An image folder; sub-folders are classes.")
    parser.add_argument("--image_column", type=str, default="image")
    parser.add_argument("--label_column", type=str, default="label")
    parser.add_argument("--cache_dir", type=str, default=None, help="Where datasets and latents are cached.")
    parser.add_argument("--resolution", type=int_at_least(1), default=None, help="Image side after resize and crop.")
    parser.add_argument("--random_crop", action="store_true", help="Random instead of centre crop.")
    parser.add_argument(
        "--random_flip",
        action="store_true",
        help="Random horizontal flips; with --vae the flipped images' latents are extracted too, one of the two "
        "drawn per sample and step.",
    )
    parser.add_argument("--max_train_samples", type=int_at_least(1), default=None)
    parser.add_argument(
        "--num_classes",
        type=int_at_least(0),
        default=None,
        help="Defaults to the label column's class count; 0 trains an unconditional model (data without labels, "
        "e.g. LSUN or FFHQ).",
    )
    parser.add_argument(
        "--skip_image_verification",
        action="store_true",
        help="Don't decode every image once before training (a corrupt file then fails when its batch is drawn).",
    )
    parser.add_argument("--vae", type=str, default=None, help="AutoencoderKL path or Hub id; enables latent space.")
    parser.add_argument("--vae_subfolder", type=str, default=None, help="e.g. 'vae' inside a full pipeline repo.")
    parser.add_argument(
        "--latent_batch_size", type=int_at_least(1), default=32, help="Batch size of latent pre-extraction."
    )
    # Model
    parser.add_argument(
        "--model_config",
        type=str,
        default=None,
        help="A preset ('S/2', 'B/2', 'L/2', 'XL/2'), a JSON config string or a path to a config.json.",
    )
    parser.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Start from a saved transformer (or a pipeline folder with a 'transformer' subfolder), e.g. to run "
        "the unmasking tuning separately.",
    )
    add_model_runtime_arguments(parser, "the encoder and decoder blocks")
    # Masked objective
    parser.add_argument(
        "--mask_ratio", type=finite_float(0, 1, high_open=True), default=0.5, help="Mask ratio of the masked phase."
    )
    parser.add_argument(
        "--mask_schedule",
        type=str,
        default=None,
        help="Mask-ratio schedule of the masked phase as JSON, e.g. "
        '\'{"type": "staged", "stages": [[5000, 0.75], [10000, 0.5]]}\' (types: constant, cosine_power, linear, '
        "staged). Overrides --mask_ratio.",
    )
    parser.add_argument("--mask_type", type=str, default="random", choices=MASK_TYPES)
    parser.add_argument("--mask_block_size", type=int_at_least(1), default=2, help="Block side for --mask_type block.")
    parser.add_argument("--mae_loss_weight", type=finite_float(0), default=0.1)
    parser.add_argument(
        "--class_dropout_prob", type=finite_float(0, 1), default=0.1, help="Label dropout for guidance."
    )
    parser.add_argument(
        "--P_mean", type=finite_float(), default=-1.2, help="EDM training noise: ln sigma ~ N(P_mean, P_std)."
    )
    parser.add_argument("--P_std", type=finite_float(0, low_open=True), default=1.2)
    parser.add_argument("--sigma_data", type=finite_float(0, low_open=True), default=0.5)
    # Unmasking tuning
    parser.add_argument(
        "--unmask_tuning_steps", type=int_at_least(0), default=None, help="Steps of the unmasking phase."
    )
    parser.add_argument(
        "--unmask_learning_rate",
        type=finite_float(0, low_open=True),
        default=None,
        help="Defaults to --learning_rate.",
    )
    parser.add_argument(
        "--unmask_batch_size", type=int_at_least(1), default=None, help="Defaults to --train_batch_size."
    )
    parser.add_argument(
        "--unmask_schedule",
        type=str,
        default="zero",
        choices=UNMASK_SCHEDULES,
        help="'zero': mask ratio 0; 'cosine': r = r0 cos(pi/2 i/n)^4 from the masked phase's last ratio.",
    )
    # Optimisation
    parser.add_argument("--train_batch_size", type=int_at_least(1), default=None, help="Per-process batch size.")
    parser.add_argument(
        "--max_train_steps", type=int_at_least(0), default=None, help="Optimizer steps of the masked phase."
    )
    parser.add_argument("--learning_rate", type=finite_float(0, low_open=True), default=None)
    parser.add_argument("--lr_warmup_steps", type=int_at_least(0), default=None)
    add_optimisation_arguments(parser, adam_beta1=0.9, adam_beta2=0.999, adam_weight_decay=0.0)
    # Checkpoints, logging, validation, output
    add_output_arguments(parser)
    parser.add_argument("--num_validation_images_per_class", type=int_at_least(1), default=4)
    parser.add_argument(
        "--validation_classes", type=int_at_least(1), default=10, help="How many classes the grids show."
    )
    parser.add_argument("--guidance_scale", type=finite_float(0), default=1.5)
    parser.add_argument("--num_inference_steps", type=int_at_least(1), default=40)
    parser.add_argument(
        "--num_eval_samples_per_class",
        type=int_at_least(0),
        default=None,
        help="Digits only: samples per class for the final FID / accuracy evaluation (0 skips it).",
    )
    args = parser.parse_args(argv)

    apply_run_defaults(parser, args, DIGITS_DEFAULTS, GENERAL_DEFAULTS)
    if args.builtin_digits and args.vae:
        parser.error("--vae needs image data (--dataset_name or --train_data_dir); the built-in digits are pixels")
    if args.max_train_steps + args.unmask_tuning_steps == 0:
        parser.error("nothing to train: --max_train_steps and --unmask_tuning_steps are both 0")
    resolve_schedule_and_model_config(parser, args, MaskedDiTTransformer2DModel)
    if args.unmask_learning_rate is None:
        args.unmask_learning_rate = args.learning_rate
    if args.unmask_batch_size is None:
        args.unmask_batch_size = args.train_batch_size
    return args


def build_model(args, start, in_channels: int, sample_size: int, num_classes: int) -> MaskedDiTTransformer2DModel:
    if start is not None:
        return load_start_model(start, MaskedDiTTransformer2DModel)
    config = dict(args.model_config_resolved)
    config.setdefault("sample_size", sample_size)
    config.setdefault("in_channels", in_channels)
    config.setdefault("num_classes", num_classes)
    if config["sample_size"] != sample_size or config["in_channels"] != in_channels:
        raise ValueError(
            f"--model_config has sample_size={config['sample_size']}, in_channels={config['in_channels']} but the "
            f"data is {in_channels}x{sample_size}x{sample_size}"
        )
    return MaskedDiTTransformer2DModel(**config)


def make_pipeline(model, scheduler, vae, id2label):
    pipeline = MaskDiTPipeline(
        transformer=model, scheduler=EDMHeunScheduler.from_config(scheduler.config), vae=vae, id2label=id2label
    )
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
    # One run per output folder; a checkpoint to resume is checked before any work (nothing in it can run code).
    run = start_run(accelerator, output_dir, args.resume_from_checkpoint, args.use_ema, sharded)
    start = args.pretrained_model_name_or_path
    if start:
        model_classes = start_model_config(start, MaskedDiTTransformer2DModel).get("num_classes")
    else:
        model_classes = args.model_config_resolved.get("num_classes")
    if args.num_classes is not None and model_classes is not None and args.num_classes != model_classes:
        raise ValueError(
            f"--num_classes {args.num_classes} contradicts the model config's num_classes={model_classes}"
        )

    # 1. Data
    data = load_training_data(
        accelerator,
        args.resolution,
        dataset_name=args.dataset_name,
        dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir,
        image_column=args.image_column,
        label_column=None if args.num_classes == 0 else args.label_column,
        cache_dir=args.cache_dir,
        max_train_samples=args.max_train_samples,
        verify=not args.skip_image_verification,
        random_crop=args.random_crop,
        random_flip=args.random_flip,
        num_workers=args.dataloader_num_workers,
        vae=args.vae,
        vae_subfolder=args.vae_subfolder,
        latent_cache_dir=args.cache_dir or output_dir / "latent-cache",
        latent_batch_size=args.latent_batch_size,
        num_classes=args.num_classes if args.num_classes is not None else model_classes,
    )
    args.num_classes = data.num_classes

    # 2. Model and scheduler (which carries the objective)
    model = build_model(args, start, data.in_channels, data.sample_size, args.num_classes)
    configure_model(
        model,
        gradient_checkpointing=args.gradient_checkpointing,
        attention_backend=args.attention_backend,
        torch_compile=args.torch_compile,
    )
    if run.resumed_state is not None:
        check_model_config(run.resumed_state["model_config"], model.config)
    scheduler = EDMHeunScheduler(P_mean=args.P_mean, P_std=args.P_std, sigma_data=args.sigma_data)

    # 3. Phases, optimizer and EMA, prepared
    phases = build_phases(
        args.max_train_steps,
        args.unmask_tuning_steps,
        batch_size=args.train_batch_size,
        learning_rate=args.learning_rate,
        mask_schedule=args.masked_schedule,
        warmup_steps=args.lr_warmup_steps,
        unmask_batch_size=args.unmask_batch_size,
        unmask_learning_rate=args.unmask_learning_rate,
        unmask_schedule=args.unmask_schedule,
    )
    check_batch_sizes(accelerator, len(data.dataset), [phase.batch_size for phase in phases])
    model, optimizer, ema = prepare_training(
        accelerator,
        model,
        sharded,
        learning_rate=args.learning_rate,
        adam_betas=(args.adam_beta1, args.adam_beta2),
        adam_weight_decay=args.adam_weight_decay,
        adam_epsilon=args.adam_epsilon,
        adam_fused=args.adam_fused,
        use_ema=args.use_ema,
        ema_decay=args.ema_decay,
        ema_warmup=args.ema_warmup,
    )

    # 4. Resume, then record the run (a run that fails to start overwrites nothing of an earlier one)
    global_step = 0
    if run.resume_path is not None:
        global_step = load_checkpoint(accelerator, run.resume_path, ema, sharded)["global_step"]
        logger.info(f"resumed from {run.resume_path} at step {global_step}")
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint to resume from; starting a new run")
    config = run_config(args, args.masked_schedule)
    training_state = record_run(accelerator, output_dir, run.run_id, model, config)
    if accelerator.is_main_process:
        flat = {k: v for k, v in config.items() if isinstance(v, (int, float, str, bool))}
        accelerator.init_trackers("train_maskdit", config=flat)
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
        data.dataset,
        data.collate_fn,
        global_step=global_step,
        seed=args.seed,
        compute_loss=masked_loss_fn(
            accelerator,
            model,
            scheduler,
            data,
            mask_type=args.mask_type,
            mask_block_size=args.mask_block_size,
            class_dropout_prob=args.class_dropout_prob,
            mae_loss_weight=args.mae_loss_weight,
        ),
        log_keys=("loss", "dsm_loss", "mae_loss"),
        after_step=periodic_saves(
            accelerator,
            model,
            ema,
            sharded,
            output_dir,
            training_state,
            end=total_steps,
            checkpointing_steps=args.checkpointing_steps,
            checkpoints_total_limit=args.checkpoints_total_limit,
            validation_steps=args.validation_steps,
            validation_grid=lambda ema_model: sample_grid_of(
                args,
                make_pipeline(ema_model, scheduler, data.vae, data.id2label),
                args.num_validation_images_per_class,
            ),
        ),
        progress=progress,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm,
        num_workers=args.dataloader_num_workers,
    )
    progress.close()

    # 6. Final checkpoint, EMA pipeline, sample grid, evaluation, model card
    per_class = args.num_validation_images_per_class * 2
    digits_evaluation = None
    if args.builtin_digits and args.num_eval_samples_per_class and args.num_classes:
        digits_evaluation = {
            "num_samples_per_class": args.num_eval_samples_per_class,
            "resolution": args.resolution,
            "seed": args.seed + 1,
            "grid_rows": grid_rows(args),
            "grid_cols": per_class,  # samples.png shows the first samples of each class that were evaluated
            "cache_dir": args.cache_dir,
            "guidance_scale": args.guidance_scale,
            "num_inference_steps": args.num_inference_steps,
        }
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
        make_pipeline=lambda final_model: make_pipeline(final_model, scheduler, data.vae, data.id2label),
        final_grid=lambda pipeline: sample_grid_of(args, pipeline, per_class),
        dataset_name="scikit-learn digits" if args.builtin_digits else (args.dataset_name or args.train_data_dir),
        digits_evaluation=digits_evaluation,
        repo_id=args.hub_model_id,
        push_to_hub=args.push_to_hub,
        hub_token=args.hub_token,
    )
    # Every rank waits until the main process has written the output. While a rank waits here without the GIL,
    # gloo's worker threads can free the tensors of earlier collectives; a rank that went straight on to exit
    # could deadlock in teardown (torch's ProcessGroupGloo destructor joins those threads while holding the GIL).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return global_step


if __name__ == "__main__":
    main(parse_args())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank has passed the final barrier and the output is written. Leave without the interpreter's teardown:
        # there torch's ProcessGroupGloo destructor joins gloo's worker threads while holding the GIL, which hung a
        # rank in about 1 of 25 two-process CPU runs even after the barrier (pytorch#56297).
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
