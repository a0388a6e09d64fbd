"""The recipes of ``examples/train_maskdit.py`` (see `diffusers_masked.training.recipes`)."""

from __future__ import annotations

import json

# The built-in default's model: 6 x 128 encoder, 2 x 64 decoder, patch 2 on 16x16 digits (64 tokens).
DIGITS_MODEL = {
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

RECIPES = [
    {
        "name": "digits",
        "summary": "the built-in default: scikit-learn's digits at 16x16, a 2M-parameter MaskDiT, CPU, minutes",
        "flags": {
            "output_dir": "maskdit-digits",
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
            "validation_steps": 500,
            "checkpointing_steps": 500,
            "num_eval_samples_per_class": 36,
        },
        "source": "ours: tuned for recognisable digits on 2 CPU cores (docs/training.md, the built-in default)",
        "ours": ("*",),
    },
    {
        "name": "default",
        "summary": "for your own data: the paper's XL/2 model and optimiser at 32 images per process",
        "flags": {
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
        },
        "source": "MaskDiT (Zheng et al. 2023) section 4.1: lr 1e-4 constant, EMA 0.9999, mask 0.5, lambda 0.1",
        "ours": ("train_batch_size", "max_train_steps", "validation_steps", "checkpointing_steps"),
    },
]
