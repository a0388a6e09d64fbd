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
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DistributedType, ProjectConfiguration, set_seed
from diffusers.training_utils import EMAModel
from diffusers.utils import numpy_to_pil
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline, MaskedDiTTransformer2DModel
from diffusers_masked.data import sample_latents
from diffusers_masked.masking import MASK_TYPES, generate_mask, generated_mask_count, parse_mask_schedule
from diffusers_masked.schedulers.masked_training import drop_class_labels
from diffusers_masked.training_utils import (
    UNMASK_SCHEDULES,
    StepBatchSampler,
    build_phases,
    check_checkpoint,
    check_distributed_launch,
    check_lineage,
    check_model_config,
    check_ranks_agree,
    configure_cpu_threads,
    ema_weights,
    export_ema_model,
    finite_float,
    image_grid,
    int_at_least,
    learning_rate_at,
    load_checkpoint,
    load_training_data,
    lock_output_dir,
    new_run_id,
    publish_pipeline,
    raise_on_every_rank,
    resolve_model_config,
    resolve_resume,
    sample_grid,
    save_checkpoint,
    set_learning_rate,
    step_generator,
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
    parser.add_argument("--latent_batch_size", type=int_at_least(1), default=32, help="Batch size of latent pre-extraction.")
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
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the encoder and decoder blocks with torch.compile (diffusers' regional compile_repeated_blocks).",
    )
    parser.add_argument(
        "--attention_backend",
        type=str,
        default=None,
        help="A diffusers attention backend for the model, e.g. 'flash' or '_native_cudnn' (model.set_attention_backend).",
    )
    # Masked objective
    parser.add_argument("--mask_ratio", type=finite_float(0, 1, high_open=True), default=0.5, help="Mask ratio of the masked phase.")
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
    parser.add_argument("--class_dropout_prob", type=finite_float(0, 1), default=0.1, help="Label dropout for guidance.")
    parser.add_argument("--P_mean", type=finite_float(), default=-1.2, help="EDM training noise: ln sigma ~ N(P_mean, P_std).")
    parser.add_argument("--P_std", type=finite_float(0, low_open=True), default=1.2)
    parser.add_argument("--sigma_data", type=finite_float(0, low_open=True), default=0.5)
    # Unmasking tuning
    parser.add_argument("--unmask_tuning_steps", type=int_at_least(0), default=None, help="Steps of the unmasking phase.")
    parser.add_argument("--unmask_learning_rate", type=finite_float(0, low_open=True), default=None, help="Defaults to --learning_rate.")
    parser.add_argument("--unmask_batch_size", type=int_at_least(1), default=None, help="Defaults to --train_batch_size.")
    parser.add_argument(
        "--unmask_schedule",
        type=str,
        default="zero",
        choices=UNMASK_SCHEDULES,
        help="'zero': mask ratio 0; 'cosine': r = r0 cos(pi/2 i/n)^4 from the masked phase's last ratio.",
    )
    # Optimisation
    parser.add_argument("--train_batch_size", type=int_at_least(1), default=None, help="Per-process batch size.")
    parser.add_argument("--max_train_steps", type=int_at_least(0), default=None, help="Optimizer steps of the masked phase.")
    parser.add_argument("--gradient_accumulation_steps", type=int_at_least(1), default=1)
    parser.add_argument("--learning_rate", type=finite_float(0, low_open=True), default=None)
    parser.add_argument("--lr_warmup_steps", type=int_at_least(0), default=None)
    parser.add_argument("--adam_beta1", type=finite_float(0, 1, high_open=True), default=0.9)
    parser.add_argument("--adam_beta2", type=finite_float(0, 1, high_open=True), default=0.999)
    parser.add_argument("--adam_weight_decay", type=finite_float(0), default=0.0)
    parser.add_argument("--adam_epsilon", type=finite_float(0, low_open=True), default=1e-8)
    parser.add_argument(
        "--adam_fused",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch's fused AdamW kernel (CPU and CUDA). On CPU torch's default AdamW loops over the parameters, "
        "4.6x slower at B/2 (docs/benchmarks.md); --no-adam_fused restores it.",
    )
    parser.add_argument("--max_grad_norm", type=finite_float(0, low_open=True), default=None, help="Clip gradients to this norm.")
    parser.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--ema_decay", type=finite_float(0, 1), default=None)
    parser.add_argument(
        "--ema_warmup", action=argparse.BooleanOptionalAction, default=None, help="EMAModel's decay warm-up."
    )
    parser.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"))
    parser.add_argument("--seed", type=int_at_least(0), default=0)
    parser.add_argument("--dataloader_num_workers", type=int_at_least(0), default=0)
    parser.add_argument(
        "--cpu_threads",
        type=int_at_least(1),
        default=None,
        help="Torch threads per process when training on CPU. Default: this machine's cores / processes on it. "
        "`accelerate launch` sets OMP_NUM_THREADS=1 for CPU runs unless it was configured for CPU, which would "
        "leave all but one core idle; this flag is applied after it.",
    )
    # Checkpoints, logging, validation, output
    parser.add_argument("--output_dir", type=str, default=None)
    parser.add_argument("--checkpointing_steps", type=int_at_least(0), default=None)
    parser.add_argument("--checkpoints_total_limit", type=int_at_least(1), default=3)
    parser.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint path.")
    parser.add_argument("--report_to", type=str, default="tensorboard")
    parser.add_argument("--logging_dir", type=str, default="logs")
    parser.add_argument("--validation_steps", type=int_at_least(0), default=None)
    parser.add_argument("--num_validation_images_per_class", type=int_at_least(1), default=4)
    parser.add_argument("--validation_classes", type=int_at_least(1), default=10, help="How many classes the grids show.")
    parser.add_argument("--guidance_scale", type=finite_float(0), default=1.5)
    parser.add_argument("--num_inference_steps", type=int_at_least(1), default=40)
    parser.add_argument(
        "--num_eval_samples_per_class",
        type=int_at_least(0),
        default=None,
        help="Digits only: samples per class for the final FID / accuracy evaluation (0 skips it).",
    )
    parser.add_argument("--push_to_hub", action="store_true")
    parser.add_argument("--hub_model_id", type=str, default=None)
    parser.add_argument("--hub_token", type=str, default=None)
    args = parser.parse_args(argv)

    if args.dataset_name and args.train_data_dir:
        parser.error("give either --dataset_name or --train_data_dir, not both")
    args.builtin_digits = args.dataset_name is None and args.train_data_dir is None
    defaults = DIGITS_DEFAULTS if args.builtin_digits else GENERAL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.builtin_digits and args.vae:
        parser.error("--vae needs image data (--dataset_name or --train_data_dir); the built-in digits are pixels")
    if args.max_train_steps + args.unmask_tuning_steps == 0:
        parser.error("nothing to train: --max_train_steps and --unmask_tuning_steps are both 0")
    try:
        args.masked_schedule = parse_mask_schedule(args.mask_schedule, default_ratio=args.mask_ratio)
    except (ValueError, TypeError) as err:
        parser.error(f"--mask_schedule / --mask_ratio: {err}")
    if args.pretrained_model_name_or_path is None:
        try:
            args.model_config_resolved = resolve_model_config(args.model_config, MaskedDiTTransformer2DModel)
        except (ValueError, TypeError, KeyError) as err:
            parser.error(f"--model_config: {err}")
    if args.unmask_learning_rate is None:
        args.unmask_learning_rate = args.learning_rate
    if args.unmask_batch_size is None:
        args.unmask_batch_size = args.train_batch_size
    return args


def build_model(args, in_channels: int, sample_size: int, num_classes: int) -> MaskedDiTTransformer2DModel:
    if args.pretrained_model_name_or_path:
        path = args.pretrained_model_name_or_path
        return MaskedDiTTransformer2DModel.from_pretrained(path, subfolder=pretrained_subfolder(path))
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


def pretrained_subfolder(path: str) -> str | None:
    return "transformer" if (Path(path) / "transformer").is_dir() else None


def make_pipeline(model, scheduler, vae, id2label):
    pipeline = MaskDiTPipeline(transformer=model, scheduler=scheduler, vae=vae, id2label=id2label)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def main(args):
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=args.report_to if args.report_to != "none" else None,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)),
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    check_distributed_launch(accelerator)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded and args.use_ema and not accelerator.is_fsdp2:
        raise ValueError(
            "--use_ema under FSDP needs FSDP version 2 (fsdp_version: 2 in the accelerate config), whose sharded "
            "parameters the EMA follows shard by shard; with FSDP version 1 pass --no-use_ema"
        )
    if accelerator.device.type == "cpu":
        logger.info(f"CPU training: {configure_cpu_threads(args.cpu_threads)} torch thread(s) per process")
    set_seed(args.seed)
    # One run per output folder; a checkpoint to resume is checked before any work (nothing in it can run code).
    lock = lock_output_dir(accelerator, output_dir)  # noqa: F841 (held until the process ends)
    resume_path = resolve_resume(args.resume_from_checkpoint, output_dir)
    resumed_state = check_checkpoint(resume_path, ema=args.use_ema, sharded=sharded) if resume_path else None
    run_id = resumed_state["run_id"] if resumed_state else new_run_id()  # used by the main process only
    lineage_error = None
    if accelerator.is_main_process:
        lineage_error = check_lineage(output_dir, run_id, resuming=resumed_state is not None)
    raise_on_every_rank(accelerator, lineage_error)
    if args.pretrained_model_name_or_path:
        model_classes = MaskedDiTTransformer2DModel.load_config(
            args.pretrained_model_name_or_path, subfolder=pretrained_subfolder(args.pretrained_model_name_or_path)
        ).get("num_classes")
    else:
        model_classes = args.model_config_resolved.get("num_classes")
    if args.num_classes is not None and model_classes is not None and args.num_classes != model_classes:
        raise ValueError(f"--num_classes {args.num_classes} contradicts the model config's num_classes={model_classes}")

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
    dataset, vae = data.dataset, data.vae
    args.num_classes = data.num_classes

    # 2. Model, scheduler (which carries the objective), EMA, optimizer
    model = build_model(args, data.in_channels, data.sample_size, args.num_classes)
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if args.attention_backend:
        model.set_attention_backend(args.attention_backend)
    if args.torch_compile:
        model.compile_repeated_blocks()
    if resumed_state is not None:
        check_model_config(resumed_state["model_config"], model.config)
    scheduler = EDMHeunScheduler(P_mean=args.P_mean, P_std=args.P_std, sigma_data=args.sigma_data)

    def make_ema(parameters):
        return EMAModel(
            parameters,
            decay=args.ema_decay,
            use_ema_warmup=args.ema_warmup,
            model_cls=MaskedDiTTransformer2DModel,
            model_config=model.config,
        )

    ema = make_ema(model.parameters()) if args.use_ema and not sharded else None
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        fused=args.adam_fused or None,
    )
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
    # The learning rate is set from the phases before every step; the checkpoint needs no scheduler object.
    for phase in phases:  # every phase's batch must fit the data now, not only once the masked phase is over
        StepBatchSampler(len(dataset), phase.batch_size, accelerator.num_processes, accelerator.process_index, seed=0)
    model, optimizer = accelerator.prepare(model, optimizer)
    if args.use_ema and sharded:
        # Under FSDP each rank keeps the average of its own shards (the shadow parameters are sharded like the
        # model's), saved and loaded with torch.distributed.checkpoint beside accelerate's state.
        ema = make_ema(model.parameters())
    if ema is not None:
        ema.to(accelerator.device)

    # 3. Resume, then record the run (a run that fails to start overwrites nothing of an earlier one)
    global_step = 0
    if resume_path is not None:
        global_step = load_checkpoint(accelerator, resume_path, ema, sharded)["global_step"]
        logger.info(f"resumed from {resume_path} at step {global_step}")
    elif args.resume_from_checkpoint:
        logger.info("no checkpoint to resume from; starting a new run")
    run_config = {
        k: v for k, v in vars(args).items() if k not in ("masked_schedule", "hub_token") and not k.startswith("_")
    }
    run_config["mask_schedule_resolved"] = args.masked_schedule.to_dict()
    model_config = {k: v for k, v in accelerator.unwrap_model(model).config.items() if not k.startswith("_")}
    training_state = {"run_id": run_id, "model_config": model_config, "run": run_config}
    if accelerator.is_main_process:
        accelerator.init_trackers("train_maskdit", config={k: v for k, v in run_config.items() if isinstance(v, (int, float, str, bool))})
        (output_dir / "training_config.json").write_text(json.dumps(run_config, indent=2, sort_keys=True, default=str))

    total_steps = phases[-1].end
    logger.info(
        f"{len(dataset)} examples, {args.num_classes} classes, input {data.in_channels}x{data.sample_size}x"
        f"{data.sample_size}, {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, phases "
        + ", ".join(f"{p.name} [{p.start}, {p.end}) batch {p.batch_size} lr {p.learning_rate:g}" for p in phases)
    )
    progress = tqdm(range(total_steps), initial=global_step, desc="steps", disable=not accelerator.is_local_main_process)
    unwrapped = accelerator.unwrap_model(model)
    grid_size = (data.sample_size // unwrapped.config.patch_size, data.sample_size // unwrapped.config.patch_size)
    scaling_factor = vae.config.scaling_factor if vae is not None else None

    # 4. Train, phase by phase
    for phase in phases:
        if global_step >= phase.end:
            continue
        sampler = StepBatchSampler(
            len(dataset),
            phase.batch_size,
            accelerator.num_processes,
            accelerator.process_index,
            seed=args.seed + 7919 * phases.index(phase),
            start_batch=(global_step - phase.start) * args.gradient_accumulation_steps,
        )
        loader = DataLoader(
            dataset, batch_sampler=sampler, collate_fn=data.collate_fn, num_workers=args.dataloader_num_workers
        )
        batches = iter(loader)
        model.train()
        while global_step < phase.end:
            tic = time.perf_counter()
            generator = step_generator(args.seed, global_step, accelerator.process_index, accelerator.device)
            learning_rate = learning_rate_at(phases, global_step)
            set_learning_rate(optimizer, learning_rate)
            mask_ratio = phase.ratio(global_step)
            logs = {"loss": 0.0, "dsm_loss": 0.0, "mae_loss": 0.0}
            for _ in range(args.gradient_accumulation_steps):
                batch = next(batches)
                with accelerator.accumulate(model):
                    if vae is not None:
                        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                        clean = sample_latents(batch, scaling_factor, generator=generator)
                    else:
                        clean = batch["pixel_values"].to(accelerator.device)
                    labels = None
                    if args.num_classes:
                        labels = drop_class_labels(
                            batch["class_labels"].to(accelerator.device),
                            args.num_classes,
                            args.class_dropout_prob,
                            generator=generator,
                        )
                    mask, num_masked = None, None
                    if mask_ratio > 0:
                        # Its count, known without reading the mask, keeps the step free of device-to-host reads.
                        num_masked = generated_mask_count(args.mask_type, grid_size, mask_ratio, args.mask_block_size)
                        mask = generate_mask(
                            args.mask_type,
                            clean.shape[0],
                            grid_size,
                            mask_ratio,
                            block_size=args.mask_block_size,
                            generator=generator,
                            device=accelerator.device,
                        )
                    with accelerator.autocast():
                        out = scheduler.masked_training_loss(
                            model,
                            clean,
                            class_labels=labels,
                            mask=mask,
                            mae_loss_weight=args.mae_loss_weight if mask is not None else 0.0,
                            generator=generator,
                            num_masked=num_masked,
                        )
                    finite = torch.isfinite(out.loss.detach()).float()
                    if accelerator.gather(finite[None]).min() < 1:
                        raise FloatingPointError(
                            f"non-finite loss at step {global_step} ({phase.name} phase, mask ratio {mask_ratio:.3f}); "
                            "nothing was saved after it - resume with --resume_from_checkpoint latest after lowering "
                            "--learning_rate or setting --max_grad_norm"
                        )
                    accelerator.backward(out.loss)
                    if accelerator.sync_gradients and args.max_grad_norm:
                        accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                for key in logs:
                    logs[key] += getattr(out, key).detach().float().item() / args.gradient_accumulation_steps

            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            progress.update(1)
            elapsed = time.perf_counter() - tic
            logs.update(
                mask_ratio=mask_ratio,
                lr=learning_rate,
                images_per_second=phase.batch_size * args.gradient_accumulation_steps * accelerator.num_processes / elapsed,
            )
            progress.set_postfix(loss=f"{logs['loss']:.4f}", r=f"{mask_ratio:.2f}")
            accelerator.log(logs, step=global_step)

            if args.checkpointing_steps and global_step % args.checkpointing_steps == 0 and global_step < total_steps:
                save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, training_state, ema, sharded)
            # Under FSDP every rank samples (each forward gathers the shards: collectives), the main one saves.
            if args.validation_steps and global_step % args.validation_steps == 0 and (sharded or accelerator.is_main_process):
                log_validation(args, accelerator, model, ema, scheduler, vae, data.id2label, global_step, output_dir, sharded)

    # 5. Final checkpoint, EMA pipeline, sample grid, evaluation, model card
    save_checkpoint(accelerator, output_dir, global_step, args.checkpoints_total_limit, training_state, ema, sharded)
    if not sharded:
        check_ranks_agree(accelerator, model)
    final_model = export_ema_model(accelerator, model, ema, MaskedDiTTransformer2DModel, ema if sharded else None)
    if accelerator.is_main_process:
        pipeline = make_pipeline(final_model, EDMHeunScheduler.from_config(scheduler.config), vae, data.id2label)
        per_class = args.num_validation_images_per_class * 2
        rows = grid_rows(args)
        eval_results, metrics, grid = [], {}, None
        if args.builtin_digits and args.num_eval_samples_per_class and args.num_classes:
            from diffusers_masked.evaluation import eval_results_for_model_card, evaluate_pipeline_on_digits

            metrics, samples, _ = evaluate_pipeline_on_digits(
                pipeline,
                num_samples_per_class=args.num_eval_samples_per_class,
                resolution=args.resolution,
                generator=torch.Generator().manual_seed(args.seed + 1),
                guidance_scale=args.guidance_scale,
                num_inference_steps=args.num_inference_steps,
                cache_dir=args.cache_dir,
                return_samples=True,
            )
            # samples.png shows the first samples of each class that were evaluated (they come class by class).
            n_eval = args.num_eval_samples_per_class
            if per_class <= n_eval:
                chosen = torch.cat([samples[c * n_eval : c * n_eval + per_class] for c in range(rows)])
                pixels = chosen.permute(0, 2, 3, 1).cpu().numpy()
                grid = image_grid(numpy_to_pil(pixels), rows=rows, cols=per_class)
            eval_results = eval_results_for_model_card(metrics)
            (output_dir / "eval_results.json").write_text(json.dumps(metrics, indent=2, sort_keys=True, default=str))
            logger.info("evaluation: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
            accelerator.log({f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=global_step)
        if grid is None:
            grid = sample_grid(pipeline, rows, per_class, seed=args.seed, **sampling_kwargs(args))
        grid.save(output_dir / "samples.png")
        repo_id = args.hub_model_id or output_dir.name
        card = pipeline.create_model_card(
            repo_id,
            training_config=run_config,
            eval_results=eval_results or None,
            dataset_name="scikit-learn digits" if args.builtin_digits else (args.dataset_name or args.train_data_dir),
            sample_image="samples.png",
        )
        publish_pipeline(pipeline, output_dir, model_card=card)
        logger.info(f"saved the EMA pipeline, samples.png and the model card to {output_dir}")
        if args.push_to_hub:
            pipeline.push_to_hub(repo_id, model_card=card, token=args.hub_token)
    # Every rank waits until the main process has written the output. While a rank waits here without the GIL,
    # gloo's worker threads can free the tensors of earlier collectives; a rank that went straight on to exit
    # could deadlock in teardown (torch's ProcessGroupGloo destructor joins those threads while holding the GIL).
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return global_step


def grid_rows(args) -> int:
    """Rows of a sample grid: one per class shown, or as many rows of unconditional samples."""
    return min(args.num_classes, args.validation_classes) if args.num_classes else args.validation_classes


def sampling_kwargs(args) -> dict:
    return {"guidance_scale": args.guidance_scale, "num_inference_steps": args.num_inference_steps}


def log_validation(args, accelerator, model, ema, scheduler, vae, id2label, global_step, output_dir, sharded=False):
    """A sample grid from the EMA weights (one row per class), as PNG and in TensorBoard.

    Unsharded, only the main process calls this. Under FSDP every rank must: each rank swaps its own EMA shards in,
    and all of them run the same sampling loop (same seed, same steps) so that their forwards' all-gathers pair up.
    """
    with ema_weights(ema, accelerator.unwrap_model(model), sharded) as ema_model:
        pipeline = make_pipeline(ema_model, EDMHeunScheduler.from_config(scheduler.config), vae, id2label)
        rows = grid_rows(args)
        grid = sample_grid(pipeline, rows, args.num_validation_images_per_class, seed=args.seed, **sampling_kwargs(args))
    if not accelerator.is_main_process:
        return
    (output_dir / "validation").mkdir(exist_ok=True)
    grid.save(output_dir / "validation" / f"step-{global_step:07d}.png")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            import numpy as np

            tracker.writer.add_images("validation", np.asarray(grid)[None], global_step, dataformats="NHWC")


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
