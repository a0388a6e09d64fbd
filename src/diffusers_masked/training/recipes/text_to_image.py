"""The recipes of ``examples/train_text_to_image.py`` (see `diffusers_masked.training.recipes`)."""

from __future__ import annotations

import json

from .maskdit import DIGITS_MODEL

RECIPES = [
    {
        "name": "digits",
        "summary": "the built-in default: captioned digits at 16x16, a small random T5 encoder, a text MaskDiT, CPU",
        "flags": {
            "output_dir": "t2i-digits",
            "resolution": 16,
            "model_config": json.dumps(DIGITS_MODEL),
            "train_batch_size": 128,
            "max_train_steps": 1000,
            "unmask_tuning_steps": 200,
            "unmask_batch_size": 64,
            "learning_rate": 1e-3,
            "lr_warmup_steps": 200,
            "ema_decay": 0.999,
            "ema_warmup": True,
            "caption_dropout_prob": 0.1,
            "guidance_scale": 3.0,
            "num_inference_steps": 20,
            "validation_steps": 500,
            "checkpointing_steps": 500,
            "num_eval_samples_per_class": 36,
        },
        "source": "ours: the MaskDiT digits default's model and schedule, with text in place of class labels",
        "ours": ("*",),
    },
    {
        "name": "default",
        "summary": "for your own captioned images (with --vae and --text_encoder_name_or_path): a text MaskDiT-B/2",
        "flags": {
            "output_dir": "t2i-output",
            "resolution": 256,
            "model_config": "B/2",
            "train_batch_size": 32,
            "max_train_steps": 100_000,
            "unmask_tuning_steps": 0,
            "learning_rate": 1e-4,
            "lr_warmup_steps": 1000,
            "ema_decay": 0.9999,
            "ema_warmup": False,
            "caption_dropout_prob": 0.1,
            "max_sequence_length": 120,
            "guidance_scale": 4.5,
            "num_inference_steps": 20,
            "validation_steps": 5000,
            "checkpointing_steps": 5000,
            "num_eval_samples_per_class": 0,
        },
        "source": "MaskDiT's objective and optimiser (lr 1e-4, EMA 0.9999, mask 0.5, lambda 0.1); PixArt-alpha's "
        "caption length (120 T5 tokens), caption dropout 0.1 and guidance 4.5",
        "ours": ("model_config", "train_batch_size", "max_train_steps", "lr_warmup_steps", "validation_steps"),
        "requires": ("data", "text_encoder_name_or_path"),
        "notes": "A text-to-image run needs captioned images (--caption_column; an imagefolder's metadata.jsonl "
        "'text') and a pretrained text encoder, e.g. --text_encoder_name_or_path google/flan-t5-base; --vae for "
        "latents (required with --transformer pixart).",
    },
]
