"""The recipes of ``examples/train_maskdm.py`` (see `diffusers_masked.training.recipes`)."""

from __future__ import annotations

import json

# The built-in default's U-ViT: 7 blocks (3 in, mid, 3 out) x 128, patch 2 on 16x16 digits (64 tokens).
DIGITS_MODEL = {
    "sample_size": 16,
    "patch_size": 2,
    "in_channels": 1,
    "num_layers": 7,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
}

RECIPES = [
    {
        "name": "digits",
        "summary": "the built-in default: both stages on scikit-learn's digits at 16x16, unconditional, CPU",
        "flags": {
            "output_dir": "maskdm-digits",
            "resolution": 16,
            "model_config": json.dumps(DIGITS_MODEL),
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
            # The paper's betas (0.99, 0.99) suit its 200k-step runs; over 1,300 steps they left the model at twice
            # the loss and samples of noise (digits-FID 396), where AdamW's usual (0.9, 0.999) gave 52.
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
        },
        "source": "ours: sized from per-step timings on two CPU cores (docs/maskdm.md)",
        "ours": ("*",),
    },
    {
        "name": "default",
        "summary": "for your own data: MaskDM-B pre-training at 256 px, 90% 4x4 block masks (CelebA-HQ's first stage)",
        "flags": {
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
        },
        "source": "MaskDM (Lei et al. 2023) Table 6, CelebA-HQ 256 column, first pre-training stage",
        "ours": ("train_batch_size", "adam_weight_decay", "validation_steps", "checkpointing_steps"),
    },
]
