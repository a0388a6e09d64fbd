"""The command line of the training scripts: flag groups defined once, checks that name the flag, and the mapping
from parsed flags to the keyword arguments of the rest of `diffusers_masked.training`.

This is the only module of the training library that sees an `argparse.Namespace`; every other one takes plain
values. A script adds the groups it needs, then its own method's flags::

    parser = argparse.ArgumentParser()
    add_data_arguments(parser)
    add_model_arguments(parser, presets="'S/2', 'B/2', 'L/2', 'XL/2'", blocks="the encoder and decoder blocks")
    add_masking_arguments(parser, mask_ratio=0.5)
    ...  # the method's own flags
    add_optimisation_arguments(parser)
    add_output_arguments(parser)
    args = parse_args_with_recipe(parser, argv, "train_maskdit")

A flag whose default is `None` takes its value from the recipe (`diffusers_masked.training.recipes`: the built-in
digits, the defaults for a user's own data, or a paper's run), so one definition serves scripts with different
defaults and its help never drifts.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from ..masking import MASK_TYPES, parse_mask_schedule
from ..utils.safe_loading import check_path_or_hub_id

# ---------------------------------------------------------------------------------------------------------
# Value types
# ---------------------------------------------------------------------------------------------------------


def int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type`` for integers >= `minimum` (a count: 1, a step number: 0)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    return parse


def finite_float(low: float = -math.inf, high: float = math.inf, low_open: bool = False, high_open: bool = False):
    """An argparse ``type`` for finite floats in an interval (``low_open``/``high_open`` exclude its ends)."""
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        inside = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
        if not math.isfinite(value) or not inside:
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    return parse


# ---------------------------------------------------------------------------------------------------------
# Flag groups
# ---------------------------------------------------------------------------------------------------------


def add_data_arguments(
    parser: argparse.ArgumentParser,
    label_column: str | None = "label",
    latents: bool = True,
    class_dropout_prob: float = 0.1,
):
    """Where the images come from and how they are prepared. Without ``--dataset_name`` or ``--train_data_dir`` a
    script trains on the built-in digits.

    Args:
        label_column (`str`, *optional*): the default class-label column; `None` trains unconditionally unless the
            user names one.
        latents (`bool`, defaults to `True`): add the latent-space flags (``--vae`` ...).
        class_dropout_prob (`float`, defaults to 0.1): the default label dropout.
    """
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", type=str, default=None, help="A `datasets` Hub id or local dataset folder.")
    group.add_argument("--dataset_config_name", type=str, default=None)
    group.add_argument(
        "--train_data_dir", type=str, default=None, help="An image folder; with labels, its sub-folders are classes."
    )
    group.add_argument("--image_column", type=str, default="image")
    group.add_argument(
        "--label_column",
        type=str,
        default=label_column,
        help="The class-label column (image folders: 'label', from the sub-folders). Default: %(default)s; without "
        "one the model is unconditional.",
    )
    group.add_argument(
        "--num_classes",
        type=int_at_least(0),
        default=None,
        help="Defaults to the label column's class count; 0 trains an unconditional model (data without labels, "
        "e.g. FFHQ).",
    )
    group.add_argument(
        "--class_dropout_prob",
        type=finite_float(0, 1, high_open=True),
        default=class_dropout_prob,
        help="Label dropout for classifier-free guidance (class-conditional runs), below 1 (at 1 the model never sees "
        "a label). Default: %(default)s.",
    )
    group.add_argument("--cache_dir", type=str, default=None, help="Where datasets and latents are cached.")
    group.add_argument("--resolution", type=int_at_least(1), default=None, help="Image side after resize and crop.")
    group.add_argument("--random_crop", action="store_true", help="Random instead of centre crops.")
    group.add_argument(
        "--random_flip",
        action="store_true",
        help="Random horizontal flips; with --vae the flipped images' latents are extracted too, one of the two "
        "drawn per sample and step.",
    )
    group.add_argument(
        "--max_train_samples", type=int_at_least(1), default=None, help="Train on the first N examples."
    )
    group.add_argument(
        "--skip_image_verification",
        action="store_true",
        help="Don't decode every image once before training (a corrupt file then fails when its batch is drawn).",
    )
    if latents:
        group.add_argument("--vae", type=str, default=None, help="AutoencoderKL path or Hub id; enables latent space.")
        group.add_argument("--vae_subfolder", type=str, default=None, help="e.g. 'vae' inside a full pipeline repo.")
        group.add_argument(
            "--latent_batch_size", type=int_at_least(1), default=32, help="Batch size of latent pre-extraction."
        )


def add_model_arguments(parser: argparse.ArgumentParser, presets: str, blocks: str) -> None:
    """What is trained (a config or start weights) and how it executes (checkpointing, compile, attention).

    Args:
        presets (`str`): the model's preset names, for the help.
        blocks (`str`): what ``--torch_compile`` compiles, for the help.
    """
    group = parser.add_argument_group("model", f"Presets: {presets}. --torch_compile compiles {blocks}.")
    group.add_argument(
        "--model_config",
        type=str,
        default=None,
        help="A preset (above), a JSON config string or a path to a config.json.",
    )
    group.add_argument(
        "--pretrained_model_name_or_path",
        type=str,
        default=None,
        help="Start from these weights: a training output folder or checkpoint (its online weights), or a saved "
        "transformer or pipeline (its 'transformer' subfolder), e.g. a converted official checkpoint.",
    )
    group.add_argument("--gradient_checkpointing", action="store_true")
    group.add_argument(
        "--torch_compile",
        action="store_true",
        help="Compile the model's repeated blocks with torch.compile (diffusers' regional compile_repeated_blocks).",
    )
    group.add_argument(
        "--attention_backend",
        type=str,
        default=None,
        help="A diffusers attention backend for the model, e.g. 'flash' or '_native_cudnn' (set_attention_backend).",
    )


def add_masking_arguments(
    parser: argparse.ArgumentParser,
    mask_ratio: float | None = None,
    mask_type: str | None = None,
    mask_block_size: int = 2,
) -> None:
    """The masks of the masked phase: type, ratio or schedule, block size."""
    group = parser.add_argument_group("masking")
    group.add_argument("--mask_type", type=str, default=mask_type, choices=MASK_TYPES, help="Default: %(default)s.")
    group.add_argument(
        "--mask_ratio",
        type=finite_float(0, 1, high_open=True),
        default=mask_ratio,
        help="Share of the tokens removed in the masked phase. Default: %(default)s.",
    )
    group.add_argument(
        "--mask_schedule",
        type=str,
        default=None,
        help="The masked phase's ratio by step instead of --mask_ratio: staged ratios such as "
        '\'0.9@0-200000,0.5@200000-\', or JSON such as \'{"type": "cosine_power", "num_steps": 1000}\' (types: '
        "constant, cosine_power, linear, staged).",
    )
    group.add_argument(
        "--mask_block_size",
        type=int_at_least(1),
        default=mask_block_size,
        help="Side of a --mask_type block block, in patches. Default: %(default)s.",
    )


def routes_argument(text: str) -> str | None:
    """``--tread_routes``'s value: routes in their JSON form (`diffusers_masked.routing.parse_routes`), normalised, or
    `None` for ``none`` / ``[]``."""
    from ..routing import routes_to_json

    try:
        return routes_to_json(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def add_routing_arguments(parser: argparse.ArgumentParser) -> None:
    """``--tread_routes``: token routing (TREAD) at every training step."""
    group = parser.add_argument_group("token routing (TREAD)")
    group.add_argument(
        "--tread_routes",
        type=routes_argument,
        default=None,
        metavar="JSON",
        help="Route tokens past a span of blocks in training, e.g. "
        '\'[{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -4}]\': that share of the tokens skips '
        "blocks start..end (inclusive; negative counts from the end) at every training step. MaskDiT: the encoder's "
        "blocks, over its visible tokens; MaskDM's U-ViT: a span symmetric about the mid-block; a stock DiT: its "
        "transformer_blocks. The saved model is the plain model. Recorded in the run config and model card.",
    )


def add_optimisation_arguments(
    parser: argparse.ArgumentParser, adam_beta1=None, adam_beta2=None, adam_weight_decay=None
):
    """The masked phase's batch, steps and learning rate, and the optimizer, EMA, precision and process flags. The
    AdamW betas and weight decay default to the given values (`None`: filled from the script's defaults)."""
    group = parser.add_argument_group("optimisation")
    group.add_argument("--train_batch_size", type=int_at_least(1), default=None, help="Per-process batch size.")
    group.add_argument(
        "--max_train_steps",
        type=int_at_least(0),
        default=None,
        help="Optimizer steps of the masked phase (MaskDiT's masked training, MaskDM's pre-training); 0 skips it.",
    )
    group.add_argument("--learning_rate", type=finite_float(0, low_open=True), default=None)
    group.add_argument("--lr_warmup_steps", type=int_at_least(0), default=None)
    group.add_argument("--gradient_accumulation_steps", type=int_at_least(1), default=1)
    group.add_argument("--adam_beta1", type=finite_float(0, 1, high_open=True), default=adam_beta1)
    group.add_argument("--adam_beta2", type=finite_float(0, 1, high_open=True), default=adam_beta2)
    group.add_argument("--adam_weight_decay", type=finite_float(0), default=adam_weight_decay)
    group.add_argument("--adam_epsilon", type=finite_float(0, low_open=True), default=1e-8)
    group.add_argument(
        "--adam_fused",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch's fused AdamW kernel (CPU and CUDA). On CPU torch's default AdamW loops over the parameters, "
        "several times slower (docs/benchmarks.md); --no-adam_fused restores it.",
    )
    group.add_argument(
        "--max_grad_norm", type=finite_float(0, low_open=True), default=None, help="Clip gradients to this norm."
    )
    group.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--ema_decay", type=finite_float(0, 1), default=None)
    group.add_argument(
        "--ema_warmup", action=argparse.BooleanOptionalAction, default=None, help="EMAModel's decay warm-up."
    )
    group.add_argument("--mixed_precision", type=str, default=None, choices=("no", "fp16", "bf16"))
    group.add_argument(
        "--allow_tf32",
        action="store_true",
        help="TF32 matmuls on Ampere and newer GPUs (full-precision runs, such as MaskDiT's unmasking tuning).",
    )
    group.add_argument("--seed", type=int_at_least(0), default=0)
    group.add_argument("--dataloader_num_workers", type=int_at_least(0), default=0)
    group.add_argument(
        "--cpu_threads",
        type=int_at_least(1),
        default=None,
        help="Torch threads per process when training on CPU. Default: this machine's cores / processes on it. "
        "`accelerate launch` sets OMP_NUM_THREADS=1 for CPU runs unless it was configured for CPU, which would "
        "leave all but one core idle; this flag is applied after it.",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """Where a run writes and what it keeps: output folder, checkpoints and resuming, trackers, the validation
    period, and the Hub upload of the final pipeline."""
    group = parser.add_argument_group("output")
    group.add_argument("--output_dir", type=str, default=None)
    group.add_argument(
        "--overwrite_output_dir",
        action="store_true",
        help="Write the run's outputs into a folder that holds other files: same-named files are replaced, nothing "
        "else is touched. Without it such a folder is refused before training starts.",
    )
    group.add_argument("--checkpointing_steps", type=int_at_least(0), default=None, help="0: no periodic ones.")
    group.add_argument("--checkpoints_total_limit", type=int_at_least(1), default=3)
    group.add_argument("--resume_from_checkpoint", type=str, default=None, help="'latest' or a checkpoint path.")
    group.add_argument("--report_to", type=str, default="tensorboard")
    group.add_argument("--logging_dir", type=str, default="logs")
    group.add_argument("--validation_steps", type=int_at_least(0), default=None, help="0: no validation grids.")
    group.add_argument("--push_to_hub", action="store_true", help="Upload the final pipeline, card and samples.")
    group.add_argument("--hub_model_id", type=str, default=None, help="Defaults to --output_dir's name.")
    group.add_argument("--hub_token", type=str, default=None)


def add_sampling_arguments(parser: argparse.ArgumentParser, guidance_scale: float, num_inference_steps=None) -> None:
    """How validation grids and the final evaluation sample."""
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--guidance_scale",
        type=finite_float(0),
        default=guidance_scale,
        help="Classifier-free guidance of grids and evaluation (class-conditional models). Default: %(default)s.",
    )
    group.add_argument(
        "--num_inference_steps", type=int_at_least(1), default=num_inference_steps, help="Sampler steps of grids."
    )
    group.add_argument(
        "--num_eval_samples_per_class",
        type=int_at_least(0),
        default=None,
        help="Built-in digits only: samples per class (unconditional: per tenth) of the final FID / accuracy "
        "evaluation; 0 skips it.",
    )


# ---------------------------------------------------------------------------------------------------------
# After parsing
# ---------------------------------------------------------------------------------------------------------


TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive", "swanlab", "trackio")


def check_common_flags(parser, args) -> None:
    """The checks every script's flags need before any work, exiting through `parser.error` naming the flag: one
    data source, the built-in digits' own label column, trackers that are installed, and a Hub upload that can
    happen (online, with a token the Hub accepts)."""
    if args.dataset_name and args.train_data_dir:
        parser.error("give either --dataset_name or --train_data_dir, not both")
    if args.builtin_digits and args.label_column not in (None, "label"):
        parser.error(
            f"--label_column {args.label_column}: the built-in digits' labels are their 'label' column; "
            "--label_column names a column of --dataset_name or --train_data_dir"
        )
    for flag in ("pretrained_model_name_or_path", "vae"):
        try:
            check_path_or_hub_id(getattr(args, flag, None), f"--{flag}")
        except ValueError as err:
            parser.error(str(err))
    resume = args.resume_from_checkpoint
    if resume not in (None, "latest") and not os.path.exists(resume):
        parser.error(f"--resume_from_checkpoint: no such file or folder: {resume} (a checkpoint folder, or 'latest')")
    _check_trackers(parser, args.report_to)
    if args.push_to_hub:
        _check_hub_access(parser, args.hub_token)


def _check_trackers(parser, report_to: str) -> None:
    from accelerate import tracking

    names = [name.strip() for name in str(report_to).split(",") if name.strip()]
    if names in ([], ["none"], ["all"]):
        return
    for name in names:
        if name not in TRACKERS:
            choices = ", ".join(TRACKERS)
            parser.error(f"--report_to {report_to}: {name!r} is not a tracker; choose from none, all, {choices}")
        if not getattr(tracking, f"is_{name}_available")():
            install = name.replace("_", "-")
            parser.error(f"--report_to {name}: it is not installed (pip install {install}), or pass --report_to none")


def _check_hub_access(parser, token: str | None) -> None:
    """`--push_to_hub` fails at the end of a run if the Hub cannot be reached or the token is missing; find out now,
    as `huggingface_hub`'s own `whoami` does."""
    from huggingface_hub import HfApi, get_token
    from huggingface_hub.constants import is_offline_mode

    if is_offline_mode():
        parser.error("--push_to_hub needs the Hub, but HF_HUB_OFFLINE is set: unset it, or drop --push_to_hub")
    token = token or get_token()
    if not token:
        parser.error("--push_to_hub needs a Hugging Face token: run `hf auth login` or pass --hub_token")
    try:
        HfApi().whoami(token=token)
    except Exception as err:  # no connection, a rejected token: either way the upload would fail after training
        parser.error(f"--push_to_hub: the Hub did not accept the token ({type(err).__name__}: {err})")


def resolve_model_config(spec: str, model_cls, presets=None) -> dict:
    """A model config from a preset name, a JSON string or a path to a ``config.json``; private keys dropped.

    Raises:
        ValueError: saying which of the three `spec` was taken for and what is wrong with it (a missing file, the
            position of a JSON error, an unknown preset, keys `model_cls` does not take).
    """
    text = spec.strip()
    if text.startswith("{"):
        source = "the JSON string"
        try:
            config = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"{source} is not valid JSON ({err})") from None
    elif os.path.isfile(text):
        source = text
        try:
            config = json.loads(Path(text).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{text} is not a readable JSON config ({err})") from None
    else:
        try:
            return dict((presets or model_cls.preset_config)(text))
        except ValueError as err:
            if text.endswith(".json") or os.sep in text:
                raise ValueError(f"no such config file: {text} (nor is it a preset: {err})") from None
            raise
    if not isinstance(config, dict):
        raise ValueError(
            f"{source} must be a JSON object of {model_cls.__name__} arguments, got {type(config).__name__}"
        )
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    accepted = set(inspect.signature(model_cls.__init__).parameters) - {"self"}
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(
            f"{source} has keys {model_cls.__name__} does not take: {unknown}; it takes {sorted(accepted)}"
        )
    # Build it once on the meta device (no memory, no init work) so that an inconsistent config (heads that do not
    # divide, a negative depth) fails here, before any data is read. The data's size fills in a missing sample_size
    # later; for the probe any size that the patch divides will do.
    probe = dict(config)
    if "sample_size" not in probe:
        patch = probe.get("patch_size", inspect.signature(model_cls.__init__).parameters["patch_size"].default)
        probe["sample_size"] = 8 * patch if isinstance(patch, int) and patch > 0 else 8
    try:
        with torch.device("meta"):
            model_cls(**probe)
    except (ValueError, TypeError, ZeroDivisionError) as err:
        raise ValueError(f"{source} does not make a {model_cls.__name__}: {err}") from None
    return config


def resolve_schedule_and_model_config(parser, args, model_cls, presets=None) -> None:
    """Check ``--mask_schedule`` / ``--mask_ratio`` and ``--model_config`` before any work, into
    ``args.mask_schedule_resolved`` and ``args.model_config_resolved`` (`None` with start weights); exits through
    `parser.error` naming the flag."""
    try:
        args.mask_schedule_resolved = parse_mask_schedule(args.mask_schedule, default_ratio=args.mask_ratio)
    except (ValueError, TypeError) as err:
        parser.error(f"--mask_schedule / --mask_ratio: {err}")
    args.model_config_resolved = None
    if args.pretrained_model_name_or_path is None:
        try:
            args.model_config_resolved = resolve_model_config(args.model_config, model_cls, presets)
        except (ValueError, TypeError, KeyError) as err:
            parser.error(f"--model_config: {err}")
    if getattr(args, "tread_routes", None):
        check_routes_flag(parser, args, model_cls)


def check_routes_flag(parser, args, model_cls) -> None:
    """``--tread_routes`` against the depth of the model the run trains (its config, or its start weights'), before
    any work: a route off the model's blocks, out of order or (U-ViT) splitting a long skip exits naming the route and
    the rule."""
    from ..routing import resolve_routes
    from .models import start_model_config

    config = args.model_config_resolved
    if config is None:
        try:
            config = start_model_config(args.pretrained_model_name_or_path, model_cls)
        except Exception:  # unreadable here (e.g. a Hub id offline): the model's forward checks the routes instead
            return
    default = inspect.signature(model_cls.__init__).parameters.get("num_layers")
    num_layers = config.get("num_layers", default.default if default is not None else None)
    if not isinstance(num_layers, int):
        return
    try:
        getattr(model_cls, "resolve_routes", resolve_routes)(args.tread_routes, num_layers)
    except ValueError as err:
        parser.error(f"--tread_routes: {err}")


# ---------------------------------------------------------------------------------------------------------
# Parsed flags -> library arguments
# ---------------------------------------------------------------------------------------------------------


def accelerator_options(args) -> dict:
    """`setup_accelerator`'s keyword arguments."""
    return {
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "mixed_precision": args.mixed_precision,
        "report_to": args.report_to,
        "logging_dir": args.logging_dir,
        "use_ema": args.use_ema,
        "cpu_threads": args.cpu_threads,
        "seed": args.seed,
        "allow_tf32": args.allow_tf32,
    }


def data_options(args) -> dict:
    """`load_training_data`'s keyword arguments (but `num_classes` and `latent_cache_dir`, which a script decides)."""
    return {
        "resolution": args.resolution,
        "dataset_name": args.dataset_name,
        "dataset_config_name": args.dataset_config_name,
        "train_data_dir": args.train_data_dir,
        "image_column": args.image_column,
        "label_column": args.label_column,
        "cache_dir": args.cache_dir,
        "max_train_samples": args.max_train_samples,
        "verify": not args.skip_image_verification,
        "random_crop": args.random_crop,
        "random_flip": args.random_flip,
        "num_workers": args.dataloader_num_workers,
        "vae": getattr(args, "vae", None),
        "vae_subfolder": getattr(args, "vae_subfolder", None),
        "latent_batch_size": getattr(args, "latent_batch_size", 32),
    }


def runtime_options(args) -> dict:
    """`configure_model`'s keyword arguments."""
    return {
        "gradient_checkpointing": args.gradient_checkpointing,
        "attention_backend": args.attention_backend,
        "torch_compile": args.torch_compile,
    }


def optimizer_options(args) -> dict:
    """`prepare_training`'s keyword arguments but the learning rate (a phase's)."""
    return {
        "adam_betas": (args.adam_beta1, args.adam_beta2),
        "adam_weight_decay": args.adam_weight_decay,
        "adam_epsilon": args.adam_epsilon,
        "adam_fused": args.adam_fused,
        "use_ema": args.use_ema,
        "ema_decay": args.ema_decay,
        "ema_warmup": args.ema_warmup,
    }


def loop_options(args) -> dict:
    """`train_phases`' keyword arguments that come from flags."""
    return {
        "seed": args.seed,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "max_grad_norm": args.max_grad_norm,
        "num_workers": args.dataloader_num_workers,
    }


def saving_options(args) -> dict:
    """`periodic_saves`' keyword arguments that come from flags."""
    return {
        "checkpointing_steps": args.checkpointing_steps,
        "checkpoints_total_limit": args.checkpoints_total_limit,
        "validation_steps": args.validation_steps,
    }


def hub_options(args) -> dict:
    """`finish_run`'s Hub arguments."""
    return {"repo_id": args.hub_model_id, "push_to_hub": args.push_to_hub, "hub_token": args.hub_token}


STAGE_KEYS = {"steps": int, "mask_ratio": float, "batch_size": int, "learning_rate": float}
STAGE_OPTIONAL_KEYS = {"warmup_steps": int, "max_grad_norm": float}


def resolve_pretrain_stages(parser, args) -> None:
    """Parse ``--pretrain_stages`` (`parse_stages`) in place, the pre-training's length their sum; exits through
    `parser.error` naming the flag."""
    if not args.pretrain_stages:
        return
    try:
        args.pretrain_stages = parse_stages(args.pretrain_stages)
    except ValueError as err:
        parser.error(f"--pretrain_stages: {err}")
    args.max_train_steps = sum(stage["steps"] for stage in args.pretrain_stages)


def parse_stages(text: str) -> list[dict]:
    """Stage settings from JSON (``--pretrain_stages``): a non-empty list of objects with ``steps`` (>= 1),
    ``mask_ratio`` (in [0, 1)), ``batch_size`` (>= 1), ``learning_rate`` (> 0) and optionally ``warmup_steps``
    (>= 0) and ``max_grad_norm`` (> 0).

    Raises:
        ValueError: naming the stage and the key.
    """
    try:
        stages = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"not valid JSON ({err})") from None
    if not isinstance(stages, list) or not stages or not all(isinstance(s, dict) for s in stages):
        raise ValueError(f"must be a non-empty JSON list of objects, got {text!r}")
    for i, stage in enumerate(stages, 1):
        unknown = sorted(set(stage) - set(STAGE_KEYS) - set(STAGE_OPTIONAL_KEYS))
        missing = sorted(set(STAGE_KEYS) - set(stage))
        if unknown or missing:
            keys = [*STAGE_KEYS, *STAGE_OPTIONAL_KEYS]
            raise ValueError(f"stage {i}: unknown keys {unknown}, missing keys {missing}; keys: {keys}")
        for key, value in stage.items():
            kind = {**STAGE_KEYS, **STAGE_OPTIONAL_KEYS}[key]
            number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            if not number or (kind is int and not isinstance(value, int)):
                raise ValueError(f"stage {i}: {key} must be a{'n int' if kind is int else ' number'}, got {value!r}")
        low = {"steps": 1, "batch_size": 1, "warmup_steps": 0}
        for key, minimum in low.items():
            if key in stage and stage[key] < minimum:
                raise ValueError(f"stage {i}: {key} must be >= {minimum}, got {stage[key]}")
        if not 0 <= stage["mask_ratio"] < 1:
            raise ValueError(f"stage {i}: mask_ratio must be in [0, 1), got {stage['mask_ratio']}")
        for key in ("learning_rate", "max_grad_norm"):
            if key in stage and stage[key] <= 0:
                raise ValueError(f"stage {i}: {key} must be > 0, got {stage[key]}")
    return stages


def digits_evaluation_options(args, grid_rows: int, grid_cols: int, **sampling) -> dict | None:
    """`evaluate_on_digits`' keyword arguments for a run on the built-in digits with
    ``--num_eval_samples_per_class`` > 0 (`None` otherwise): the evaluation's size, seed and cache, the rows and
    columns of ``samples.png`` (drawn from the evaluated samples) and the pipeline's `sampling` arguments."""
    if not (args.builtin_digits and args.num_eval_samples_per_class):
        return None
    return {
        "num_samples_per_class": args.num_eval_samples_per_class,
        "resolution": args.resolution,
        "seed": args.seed + 1,
        "grid_rows": grid_rows,
        "grid_cols": grid_cols,
        "cache_dir": args.cache_dir,
        "num_inference_steps": args.num_inference_steps,
        **sampling,
    }


def dataset_label(args) -> str:
    """The data's name on the model card."""
    return "scikit-learn digits" if args.builtin_digits else (args.dataset_name or args.train_data_dir)


def run_config(args, mask_schedule, **extra) -> dict:
    """The run's flags as recorded in ``training_config.json``, the checkpoints and the model card: the parsed
    arguments without secrets (``hub_token``) or private entries, the resolved `mask_schedule` and `extra`."""
    config = {
        k: v
        for k, v in vars(args).items()
        if k not in ("mask_schedule_resolved", "hub_token") and not k.startswith("_")
    }
    config.update(extra)
    config["mask_schedule_resolved"] = mask_schedule.to_dict()
    return config
