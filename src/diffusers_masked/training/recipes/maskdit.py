"""The recipes of ``examples/train_maskdit.py`` (see `diffusers_masked.training.recipes`).

The paper's ImageNet-256 run (Zheng et al. 2023, section 4.1 and appendix A) as three recipes: masked training, then
the unmasking tuning as its own run (the paper tunes in full precision, TF32, which a mixed-precision run's
`accelerate` forward cannot switch off mid-run): zero-ratio for guided sampling (FID 2.28), or cosine-ratio for
unguided (5.69). Per-process batches are for 8 GPUs, the paper's A100 x 8.
"""

from __future__ import annotations

import json

# The paper's masked-training settings (D = maskdit-zheng2023.txt, the lines cited): data and model (D:135, D:297),
# mask 0.5, MAE weight 0.1, label dropout 0.1, batch 1024 (D:168), AdamW lr 1e-4 constant, no weight decay, EMA
# 0.9999 (D:137), no augmentation (D:168), mixed precision (D:297), 2M steps (D:180).
IMAGENET256 = {
    "dataset_name": "ILSVRC/imagenet-1k",
    "vae": "stabilityai/sd-vae-ft-mse",
    "resolution": 256,
    "model_config": "XL/2",
    "mask_type": "patch",
    "mask_ratio": 0.5,
    "mae_loss_weight": 0.1,
    "class_dropout_prob": 0.1,
    "train_batch_size": 128,
    "learning_rate": 1e-4,
    "lr_warmup_steps": 0,
    "adam_weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "ema_decay": 0.9999,
    "ema_warmup": False,
    "mixed_precision": "bf16",
    "guidance_scale": 1.5,
    "num_inference_steps": 40,
    "validation_steps": 50_000,
    "checkpointing_steps": 50_000,
    "num_eval_samples_per_class": 0,
}
# The unmasking tuning (D:115, D:168, D:297): lr 5e-5, full precision with TF32, a smaller batch.
IMAGENET256_TUNE = {
    **IMAGENET256,
    "max_train_steps": 0,
    "unmask_learning_rate": 5e-5,
    "unmask_batch_size": 64,
    "mixed_precision": "no",
    "allow_tf32": True,
    "checkpointing_steps": 5000,
    "validation_steps": 5000,
}

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
    {
        "name": "imagenet256-xl2",
        "summary": "the paper's main run, masked training: ImageNet-256 latents, XL/2, mask 0.5, 2M steps, batch 1024",
        "flags": {
            **IMAGENET256,
            "output_dir": "maskdit-imagenet256",
            "max_train_steps": 2_000_000,
            "unmask_tuning_steps": 0,
        },
        "source": "MaskDiT sections 4.1 and 4.3, Table 1 (ImageNet 256): FID 2.28 with guidance 1.5, 5.69 without, "
        "after the unmasking tuning (recipes imagenet256-xl2-tune and -tune-unguided); 257 h on 8 A100",
        "ours": (
            "adam_beta1",
            "adam_beta2",
            "mixed_precision",
            "train_batch_size",
            "validation_steps",
            "checkpointing_steps",
        ),
        "notes": "The paper gives the global batch (1024 on 8 A100s: 128 per process here), 'mixed precision' without "
        "its dtype (bf16 here: no loss scaling), and keeps DiT's other training details (AdamW's default betas "
        "here). The latent scale (0.18215) is the VAE's config. The official configs set random_flip but "
        "xflip off; the paper says no augmentation, and the paper is the method.",
    },
    {
        "name": "imagenet256-xl2-tune",
        "summary": "its unmasking tuning for guided sampling: zero ratio, 75k steps at lr 5e-5, full precision (TF32)",
        "flags": {
            **IMAGENET256_TUNE,
            "output_dir": "maskdit-imagenet256-tuned",
            "unmask_tuning_steps": 75_000,
            "unmask_schedule": "zero",
        },
        "source": "MaskDiT sections 4.3 and 4.4: FID 2.28 with guidance 1.5 after 75k zero-ratio steps (16 h)",
        "ours": ("unmask_batch_size", "validation_steps", "checkpointing_steps"),
        "notes": "Start it from the masked run: --pretrained_model_name_or_path maskdit-imagenet256. The paper says "
        "only 'a smaller batch size'; 64 per process (512) is the official config's.",
    },
    {
        "name": "imagenet256-xl2-tune-unguided",
        "summary": "its unmasking tuning for unguided sampling: cosine ratio from 0.5, 37.5k steps at lr 5e-5",
        "flags": {
            **IMAGENET256_TUNE,
            "output_dir": "maskdit-imagenet256-tuned-unguided",
            "unmask_tuning_steps": 37_500,
            "unmask_schedule": "cosine",
            "guidance_scale": 1.0,
        },
        "source": "MaskDiT sections 4.3 and 6.5: FID 5.95 -> 5.69 without guidance after 37.5k cosine-ratio steps",
        "ours": ("unmask_batch_size", "validation_steps", "checkpointing_steps"),
        "notes": "Start it from the masked run: --pretrained_model_name_or_path maskdit-imagenet256.",
    },
    {
        "name": "imagenet512-xl2",
        "summary": "ImageNet-512 masked training, from the official code (the paper has no 512 run): 1M steps, 1024",
        "flags": {
            **IMAGENET256,
            "output_dir": "maskdit-imagenet512",
            "resolution": 512,
            "train_batch_size": 32,
            "max_train_steps": 1_000_000,
            "unmask_tuning_steps": 0,
        },
        "source": "official MaskDiT code (configs/train/imagenet512-latent.yaml, README): FID 2.50 with guidance "
        "1.5 after 50k tuning steps, 10.79 without; not in the paper",
        "ours": ("*",),
        "notes": "The paper (2023) has no ImageNet-512 run: every value is the official repository's, for 32 GPUs "
        "(32 per process, 1024 in all). Its config runs to 2M steps; its README reports about 1M updates (210 A100 "
        "days), which this recipe takes. Tune with imagenet256-xl2-tune's flags and --resolution 512 "
        "--unmask_tuning_steps 50000 --unmask_batch_size 16.",
    },
]
