"""The recipes of ``examples/train_dit.py`` (see `diffusers_masked.training.recipes`): diffusers' own
``DiTTransformer2DModel`` with DiT's DDPM objective, plain or with token routing (TREAD).

DiT's values (Peebles & Xie 2023, section 5 "Training"; the paper is not in this repository's ``papers/``): AdamW, lr
1e-4 constant, no weight decay, batch 256, EMA 0.9999, label dropout 0.1, horizontal flips the only augmentation,
1000 linear betas from 1e-4 to 0.02, the SD VAE ft-MSE. DiT also learns the variance (its VLB term, out_channels 8);
this script trains the noise prediction only (out_channels = in_channels), so its models sample with DDIM rather
than DiT's 250-step learned-variance DDPM. TREAD's values (Krause et al. 2025, Table 2; code CompVis/tread): route 0.5
of the tokens from block 2 to block depth - 4, the rest of DiT's recipe unchanged, 400k steps. TREAD trains with an
EDM loss in its code; here the route sits on DiT's own objective. Per-process batches are for 8 GPUs.
"""

from __future__ import annotations

import json

IMAGENET256 = {
    "dataset_name": "ILSVRC/imagenet-1k",
    "vae": "stabilityai/sd-vae-ft-mse",
    "resolution": 256,
    "random_flip": True,
    "class_dropout_prob": 0.1,
    "train_batch_size": 32,
    "learning_rate": 1e-4,
    "lr_warmup_steps": 0,
    "adam_weight_decay": 0.0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "ema_decay": 0.9999,
    "ema_warmup": False,
    "mixed_precision": "bf16",
    "guidance_scale": 1.5,
    "num_inference_steps": 50,
    "validation_steps": 50_000,
    "checkpointing_steps": 50_000,
}
TREAD_NOTES = (
    "TREAD (Krause et al. 2025) routes with an EDM objective in its code; this recipe keeps DiT's DDPM epsilon "
    "objective and the DiT recipe, adding only the route, so it compares with imagenet256-dit-* at equal steps. "
    "Without DiT's learned variance (out_channels = in_channels) FIDs are not the papers'."
)


# TREAD's placement rule, start 2, end depth - 4 (B/2: blocks 2..8; XL/2: 2..24), as one route for any depth.
TREAD_ROUTE = json.dumps([{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -4}])


RECIPES = [
    {
        "name": "default",
        "summary": "for your own data (with --vae): DiT-B/2, DiT's optimiser, 32 images per process",
        "flags": {
            "output_dir": "dit-output",
            "model_config": "B/2",
            "resolution": 256,
            "random_flip": True,
            "train_batch_size": 32,
            "max_train_steps": 100_000,
            "learning_rate": 1e-4,
            "lr_warmup_steps": 0,
            "ema_decay": 0.9999,
            "ema_warmup": False,
            "validation_steps": 5000,
            "checkpointing_steps": 5000,
        },
        "source": "DiT (Peebles & Xie 2023) section 5: lr 1e-4 constant, no weight decay, EMA 0.9999, flips",
        "ours": ("model_config", "train_batch_size", "max_train_steps", "validation_steps", "checkpointing_steps"),
        "requires": ("data", "vae"),
        "notes": "train_dit.py trains in a VAE's latent space (DiTPipeline always decodes): give your images with "
        "--train_data_dir or --dataset_name, and the VAE with --vae.",
    },
    {
        "name": "imagenet256-dit-b2",
        "summary": "DiT-B/2 on ImageNet-256 latents, 400k steps at batch 256: TREAD's baseline",
        "flags": {
            **IMAGENET256,
            "output_dir": "dit-b2-imagenet256",
            "model_config": "B/2",
            "max_train_steps": 400_000,
        },
        "source": "DiT Table 4 / TREAD Table 2: DiT-B/2 at 400k steps, FID-50k 43.47 (unguided, learned variance)",
        "ours": ("mixed_precision", "train_batch_size", "validation_steps", "checkpointing_steps"),
        "notes": "Batch 256 in all = 32 per process on 8 GPUs. DiT trains in fp32 with TF32; bf16 here.",
    },
    {
        "name": "imagenet256-tread-b2",
        "summary": "the same with TREAD's route (0.5 of the tokens skip blocks 2..8)",
        "flags": {
            **IMAGENET256,
            "output_dir": "tread-b2-imagenet256",
            "model_config": "B/2",
            "max_train_steps": 400_000,
            "tread_routes": TREAD_ROUTE,
        },
        "source": "TREAD Table 2: DiT-B/2 + TREAD at 400k steps, FID 21.34 (unguided); route from configs/model/tread",
        "ours": ("mixed_precision", "train_batch_size", "validation_steps", "checkpointing_steps"),
        "notes": TREAD_NOTES,
    },
    {
        "name": "imagenet256-dit-xl2",
        "summary": "DiT-XL/2 on ImageNet-256 latents, batch 256, 400k steps (DiT trains to 7M)",
        "flags": {
            **IMAGENET256,
            "output_dir": "dit-xl2-imagenet256",
            "model_config": "XL/2",
            "max_train_steps": 400_000,
        },
        "source": "DiT Table 4: XL/2 at 400k steps FID 19.47 unguided; at 7M steps 9.62 unguided, 2.27 guided (1.5)",
        "ours": ("mixed_precision", "train_batch_size", "validation_steps", "checkpointing_steps"),
        "notes": "For DiT's full run pass --max_train_steps 7000000.",
    },
    {
        "name": "imagenet256-tread-xl2",
        "summary": "DiT-XL/2 with TREAD's route (0.5 of the tokens skip blocks 2..24), 400k steps",
        "flags": {
            **IMAGENET256,
            "output_dir": "tread-xl2-imagenet256",
            "model_config": "XL/2",
            "max_train_steps": 400_000,
            "tread_routes": TREAD_ROUTE,
        },
        "source": "TREAD Table 2: DiT-XL/2 + TREAD at 400k steps, FID 7.38 (unguided); placement i=2, j=B-4 (Table 6)",
        "ours": ("mixed_precision", "train_batch_size", "validation_steps", "checkpointing_steps"),
        "notes": TREAD_NOTES,
    },
]
