"""The recipes of ``examples/train_maskdm.py`` (see `diffusers_masked.training.recipes`).

One recipe per column of MaskDM's hyper-parameter tables (Lei et al. 2023, appendix Tables 6-9, M = the paper's text
in shared/papers, lines cited), each with its pre-training and fine-tuning stages, and the from-scratch baselines its
captions state. What every column shares (M:110): AdamW with betas (0.99, 0.99), mixed precision, T = 1000, an EMA
model for sampling; MaskDM-S is U-ViT-Small, MaskDM-B U-ViT-Mid without five blocks (Table 5; 13 blocks reproduce its
44M and 102M parameters, 12 do not: docs/recipes.md).

Conventions, ours where the paper is silent:

* Batch sizes are the paper's totals split over 2 processes (Tables 2-4 ran on 2 V100 or 2 A100, M:186-193): launch
  with ``accelerate launch --num_processes 2``, or scale ``--train_batch_size`` to your process count.
* The data is yours to point at (``--train_data_dir`` or ``--dataset_name``): CelebA, CelebA-HQ, FFHQ, AFHQ and
  VGGFace2 have no canonical Hub copy; the recipe's ``data`` note says which set and size.
* Weight decay 0.03 (the official configs'; the paper gives none), bf16 for "mixed precision", the EMA of the
  pre-training stage the same as the fine-tuning's (the paper lists only the latter), DDPM's standard linear betas
  for "Linear", warm-up from 0 (the paper's starts at 5e-5, M:357), "VPSDE" trained and sampled as DDPM with linear
  betas and its ancestral sampler (the discrete form of the same SDE), "VPCosine" as the cosine betas.
"""

from __future__ import annotations

import json

# The built-in default's U-ViT: 7 blocks (3 in, mid, 3 out) x 128, patch 4 on 16x16 digits (16 tokens; the digits
# are 8x8 images upsampled, so a 4x4 patch is 2x2 of their pixels). Patch 2 (64 tokens) made each step 3.3 times
# dearer: the old default ended at digits-FID 60.2 in 10.9 min, twice its steps at 47.6 in 13.7 min, where this one
# gives 38.9 in 9.8 min (docs/maskdm.md, the tuning table).
DIGITS_MODEL = {
    "sample_size": 16,
    "patch_size": 4,
    "in_channels": 1,
    "num_layers": 7,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
}

# What every paper recipe shares (M:110), and what it sets as ours (see above).
PAPER = {
    "adam_beta1": 0.99,
    "adam_beta2": 0.99,
    "adam_weight_decay": 0.03,
    "mixed_precision": "bf16",
    "ema_warmup": False,
    "num_eval_samples_per_class": 0,
    "validation_steps": 10_000,
    "checkpointing_steps": 10_000,
}
OURS = ("adam_weight_decay", "mixed_precision", "train_batch_size", "validation_steps", "checkpointing_steps")


def _stage(steps, ratio, batch, lr, warmup=0, clip=None) -> dict:
    stage = {"steps": steps, "mask_ratio": ratio, "batch_size": batch // 2, "learning_rate": lr}
    stage |= {"warmup_steps": warmup} if warmup else {}
    return stage | ({"max_grad_norm": clip} if clip else {})


def _recipe(name, summary, data, source, *, model, resolution, mask, pretrain, finetune, sampling, extra=(), **flags):
    """A recipe from a table column: `pretrain` a list of `_stage`s (empty: none), `finetune` ``(steps, lr, batch,
    ema, warmup, clip)`` (`None`: none), `mask` ``(type, block size)``, `sampling` ``(sampler, steps)``."""
    values = {**PAPER, "model_config": model, "resolution": resolution, "output_dir": f"maskdm-{name}"}
    values |= {"mask_type": mask[0], "mask_block_size": mask[1]}
    if pretrain:
        values |= {"pretrain_stages": json.dumps(pretrain), "mask_ratio": pretrain[0]["mask_ratio"]}
        values |= {"max_train_steps": sum(stage["steps"] for stage in pretrain)}
        values |= {"train_batch_size": pretrain[0]["batch_size"], "learning_rate": pretrain[0]["learning_rate"]}
    else:
        values |= {"max_train_steps": 0, "mask_ratio": 0.0}
    if finetune is None:
        values |= {"finetune_steps": 0}
    else:
        steps, lr, batch, ema, warmup, clip = finetune
        values |= {"finetune_steps": steps, "finetune_learning_rate": lr, "finetune_batch_size": batch // 2}
        values |= {"ema_decay": ema, "finetune_warmup_steps": warmup, "finetune_max_grad_norm": clip}
        values.setdefault("train_batch_size", batch // 2)
    values |= {"sampler": sampling[0], "num_inference_steps": sampling[1], **flags}
    values.setdefault("ema_decay", 0.999)
    requires = ("data",) + (("pretrained_model_name_or_path",) if not pretrain else ())
    return {"name": name, "summary": summary, "flags": values, "source": source, "ours": OURS + tuple(extra),
            "notes": data, "requires": requires}  # fmt: skip


def _scratch(name, like, steps, source):
    """A from-scratch baseline: the fine-tuning settings of `like` for `steps` steps, no pre-training."""
    base = next(r for r in RECIPES if r["name"] == like)["flags"]
    flags = {k: v for k, v in base.items() if k not in ("pretrain_stages",)}
    flags |= {"max_train_steps": 0, "finetune_steps": steps, "output_dir": f"maskdm-{name}", "mask_ratio": 0.0}
    summary = f"the from-scratch baseline of {like}: its fine-tuning settings for {steps // 1000}k steps"
    notes = "No pre-training: the baseline trains from scratch with the fine-tuning's settings (the tables' captions)."
    return {"name": name, "summary": summary, "flags": flags, "source": source, "ours": OURS, "notes": notes,
            "requires": ("data",)}  # fmt: skip


CELEBA64 = "Your CelebA at 64x64 (M:110; the paper gives neither the split nor the crop)."
CELEBA128 = "Your CelebA at 128x128 (M:184)."
CELEBAHQ = "Your CelebA-HQ at 256x256, all 30,000 images (M:184, M:207)."
LINEAR, COSINE = {"beta_schedule": "linear"}, {"beta_schedule": "squaredcos_cap_v2"}

RECIPES = [
    {
        "name": "digits",
        "summary": "the built-in default: both stages on scikit-learn's digits at 16x16, unconditional, CPU",
        "flags": {
            "output_dir": "maskdm-digits",
            "resolution": 16,
            "model_config": json.dumps(DIGITS_MODEL),
            "train_batch_size": 128,
            "max_train_steps": 2400,
            "mask_type": "patch",
            "mask_ratio": 0.5,
            "finetune_steps": 1200,
            "learning_rate": 1e-3,
            "lr_warmup_steps": 100,
            "finetune_learning_rate": 5e-4,
            "finetune_warmup_steps": 50,
            "adam_weight_decay": 0.0,
            "ema_decay": 0.995,
            "ema_warmup": True,
            "validation_steps": 1200,
            "checkpointing_steps": 1200,
            # Clipped DPM-Solver++ (2M), also the saved pipeline's sampler: on a tuning model 50 steps gave FID 41.0,
            # 25 steps 44.3 and DDPM's 100 ancestral steps 41.3 in twice the time.
            "sampler": "dpmsolver",
            "num_inference_steps": 50,
            "num_eval_samples_per_class": 36,
            # The paper's betas (0.99, 0.99) suit its 200k-step runs; over 1,300 steps they left the model at twice
            # the loss and samples of noise (digits-FID 396), where AdamW's usual (0.9, 0.999) gave 52.
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
        },
        "source": "ours: tuned for digits-FID <= 40 in the old default's wall-clock on two CPU cores (docs/maskdm.md)",
        "ours": ("*",),
        "version": 2,
    },
    {
        "name": "default",
        "summary": "for your own data: MaskDM-B pre-training at 256 px, 90% 4x4 block masks (CelebA-HQ's first stage)",
        "flags": {
            **PAPER,
            "mixed_precision": None,
            "output_dir": "maskdm-output",
            "resolution": 256,
            "model_config": "MaskDM-B",
            "train_batch_size": 32,
            "max_train_steps": 200_000,
            "mask_type": "block",
            "mask_block_size": 4,
            "mask_ratio": 0.9,
            "finetune_steps": 0,
            "learning_rate": 2e-4,
            "lr_warmup_steps": 0,
            "finetune_learning_rate": 1e-5,
            "finetune_warmup_steps": 5000,
            "ema_decay": 0.999,
            "num_inference_steps": 250,
        },
        "source": "MaskDM (Lei et al. 2023) Table 6, CelebA-HQ 256 column, first pre-training stage",
        "ours": OURS,
    },
    # Table 6, Table 1's columns: CelebA 64, MaskDM-S, pre-training 50k steps at 10 / 50 / 90%, then 200k fine-tuning
    # (M:132); 10k samples with DDIM 500 steps. "any" mask: the paper's default at 64 px, 2x2 blocks (M:110).
    _recipe(
        "celeba64-mask10",
        "Table 1 at 10%: 2x2 block masks, 50k + 200k steps (FID 6.77)",
        CELEBA64,
        "Table 1a, 2x2 block, 10%: FID 6.77 (10k samples)",
        model="MaskDM-S",
        resolution=64,
        mask=("block", 2),
        pretrain=[_stage(50_000, 0.1, 128, 1e-4)],
        finetune=(200_000, 1e-4, 128, 0.999, 0, None),
        sampling=("ddim", 500),
        **LINEAR,
    ),  # fmt: skip
    _recipe(
        "celeba64-mask50",
        "Table 1 at 50%: 2x2 block masks, 50k + 200k steps (FID 6.51)",
        CELEBA64,
        "Table 1a, 2x2 block, 50%: FID 6.51 (10k samples)",
        model="MaskDM-S",
        resolution=64,
        mask=("block", 2),
        pretrain=[_stage(50_000, 0.5, 256, 2e-4)],
        finetune=(200_000, 1e-4, 128, 0.999, 0, None),
        sampling=("ddim", 500),
        **LINEAR,
    ),  # fmt: skip
    _recipe(
        "celeba64-mask90",
        "Table 1 at 90%: 2x2 block masks, 50k + 200k steps (FID 8.99)",
        CELEBA64,
        "Table 1a, 2x2 block, 90%: FID 8.99 (10k samples)",
        model="MaskDM-S",
        resolution=64,
        mask=("block", 2),
        pretrain=[_stage(50_000, 0.9, 512, 2e-4)],
        finetune=(200_000, 1e-4, 128, 0.999, 0, None),
        sampling=("ddim", 500),
        **LINEAR,
    ),  # fmt: skip
    # Table 6, Table 2's column: the CelebA 64 result.
    _recipe(
        "celeba64",
        "Table 2: CelebA 64, 150k steps at 50% then 350k fine-tuning (FID 2.27)",
        CELEBA64,
        "Table 2: FID 2.27 (50k samples, Euler-Maruyama 1000 steps)",
        model="MaskDM-S",
        resolution=64,
        mask=("block", 2),
        pretrain=[_stage(150_000, 0.5, 256, 2e-4, warmup=5000)],
        finetune=(350_000, 2e-4, 128, 0.9999, 5000, None),
        sampling=("ddpm", 1000),
        random_flip=True,
        extra=("sampler",),
        **LINEAR,
    ),  # fmt: skip
    # Table 6, Table 3's column: CelebA 128, MaskDM-B, staged 70% -> 50% (the text, M:191, says 30%; Tables 6 and 7
    # agree on 50%).
    _recipe(
        "celeba128",
        "Table 3: CelebA 128, 50k at 70% + 350k at 50%, then 100k fine-tuning (FID 6.83)",
        CELEBA128,
        "Table 3: FID 6.83 (50k samples, DDIM 500 steps)",
        model="MaskDM-B",
        resolution=128,
        mask=("block", 4),
        pretrain=[_stage(50_000, 0.7, 256, 2e-4, 5000, 1.0), _stage(350_000, 0.5, 128, 1e-4, 5000, 1.0)],
        finetune=(100_000, 5e-5, 64, 0.999, 5000, 1.0),
        sampling=("ddim", 500),
        **COSINE,
    ),  # fmt: skip
    # Table 6, Table 4's column: CelebA-HQ 256, MaskDM-B, staged 90% -> 50% (the abstract says 6.73; Table 4 6.27).
    _recipe(
        "celebahq256",
        "Table 4: CelebA-HQ 256, 200k at 90% + 500k at 50%, then 100k fine-tuning (FID 6.27)",
        CELEBAHQ,
        "Table 4: FID 6.27 (50k samples, DDIM 500 steps)",
        model="MaskDM-B",
        resolution=256,
        mask=("block", 4),
        pretrain=[_stage(200_000, 0.9, 128, 2e-4), _stage(500_000, 0.5, 64, 2e-4, 5000, 1.0)],
        finetune=(100_000, 1e-5, 32, 0.999, 5000, 1.0),
        sampling=("ddim", 500),
        **COSINE,
    ),  # fmt: skip
    # Table 7 (Fig. 4, training efficiency): the CelebA 64 column differs from Table 1's 50% run by its EMA and
    # sampler; 128 and 256 are celeba128 and celebahq256 sampled with DDIM 250 steps.
    _recipe(
        "celeba64-fig4",
        "Fig. 4a: CelebA 64, 50k at 50% + 200k fine-tuning, EMA 0.9999, DDIM 250",
        CELEBA64,
        "Figure 4a (curves only: the paper reports 60-80% fewer training hours than DDPM, M:195)",
        model="MaskDM-S",
        resolution=64,
        mask=("block", 2),
        pretrain=[_stage(50_000, 0.5, 256, 2e-4)],
        finetune=(200_000, 1e-4, 128, 0.9999, 0, None),
        sampling=("ddim", 250),
        **LINEAR,
    ),  # fmt: skip
    # Table 8 (Fig. 5a, dataset and paradigm shift): CelebA 64 pre-training (as celeba64-mask50), fine-tuned on FFHQ
    # or AFHQ at 64 px, or on CelebA with the VPCosine schedule and DPM-Solver.
    _recipe(
        "ffhq64",
        "Fig. 5a: fine-tune the CelebA 64 pre-training on FFHQ 64 (--pretrained_model_name_or_path)",
        "Your FFHQ resized to 64x64 (M:205); start from a celeba64-mask50 run's pre-training folder.",
        "Figure 5a (bars only)",
        model="MaskDM-S",
        resolution=64,
        mask=("block", 2),
        pretrain=[],
        finetune=(200_000, 1e-4, 128, 0.999, 0, None),
        sampling=("ddim", 500),
        **LINEAR,
    ),  # fmt: skip
    _recipe(
        "afhq64",
        "Fig. 5a: fine-tune the CelebA 64 pre-training on AFHQ 64 (--pretrained_model_name_or_path)",
        "Your AFHQ resized to 64x64 (M:205); start from a celeba64-mask50 run's pre-training folder.",
        "Figure 5a (bars only)",
        model="MaskDM-S",
        resolution=64,
        mask=("block", 2),
        pretrain=[],
        finetune=(200_000, 1e-4, 128, 0.999, 0, None),
        sampling=("ddim", 500),
        **LINEAR,
    ),  # fmt: skip
    _recipe(
        "celeba64-vpcosine",
        "Fig. 5a: CelebA 64 pre-training (linear), fine-tuned with cosine betas, DPM-Solver 50",
        CELEBA64,
        "Figure 5a (bars only)",
        model="MaskDM-S",
        resolution=64,
        mask=("block", 2),
        pretrain=[_stage(50_000, 0.5, 256, 2e-4)],
        finetune=(200_000, 1e-4, 128, 0.999, 0, None),
        sampling=("dpmsolver", 50),
        random_flip=True,
        finetune_beta_schedule="squaredcos_cap_v2",
        extra=("finetune_beta_schedule",),
        **LINEAR,
    ),  # fmt: skip
    # Table 9 (Fig. 5b, limited data): MaskDM-S at 256 px; the 10% / 1% subset of CelebA-HQ (3000 / 300 images; ours:
    # the first N) pre-trained on itself, or VGGFace2 pre-training; 50k fine-tuning on the subset at lr 5e-4 as
    # printed (the official configs use 5e-5: the paper is the method).
    _recipe(
        "celebahq256-10pct",
        "Fig. 5b: 3000 CelebA-HQ images, 200k pre-training on them at 50%, 50k fine-tuning",
        CELEBAHQ + " The first 3000 images (10%).",
        "Figure 5b (bars only)",
        model="MaskDM-S",
        resolution=256,
        mask=("block", 4),
        pretrain=[_stage(200_000, 0.5, 64, 2e-4)],
        finetune=(50_000, 5e-4, 64, 0.999, 0, None),
        sampling=("ddim", 250),
        random_flip=True,
        max_train_samples=3000,
        **COSINE,
    ),  # fmt: skip
    _recipe(
        "celebahq256-1pct",
        "Fig. 5b: 300 CelebA-HQ images, 200k pre-training on them at 50%, 50k fine-tuning",
        CELEBAHQ + " The first 300 images (1%).",
        "Figure 5b (bars only)",
        model="MaskDM-S",
        resolution=256,
        mask=("block", 4),
        pretrain=[_stage(200_000, 0.5, 64, 2e-4)],
        finetune=(50_000, 5e-4, 64, 0.999, 0, None),
        sampling=("ddim", 250),
        random_flip=True,
        max_train_samples=300,
        **COSINE,
    ),  # fmt: skip
    _recipe(
        "vggface2-256",
        "Fig. 5b: VGGFace2 256 pre-training at 90% for 200k steps (fine-tune with -from-vggface2)",
        "Your VGGFace2 at 256x256, about 3M images (M:207).",
        "Figure 5b: the abstract's 46% better FID after fine-tuning on 10% of CelebA-HQ (M:14)",
        model="MaskDM-S",
        resolution=256,
        mask=("block", 4),
        pretrain=[_stage(200_000, 0.9, 256, 2e-4)],
        finetune=None,
        sampling=("ddim", 250),
        **COSINE,
    ),  # fmt: skip
    _recipe(
        "celebahq256-10pct-from-vggface2",
        "Fig. 5b: fine-tune the VGGFace2 pre-training on 3000 CelebA-HQ images",
        CELEBAHQ + " The first 3000 images (10%); start from a vggface2-256 run (--pretrained_model_name_or_path).",
        "Figure 5b and the abstract: 46% better FID than training from scratch (M:14)",
        model="MaskDM-S",
        resolution=256,
        mask=("block", 4),
        pretrain=[],
        finetune=(50_000, 5e-4, 64, 0.999, 0, None),
        sampling=("ddim", 250),
        random_flip=True,
        max_train_samples=3000,
        **COSINE,
    ),  # fmt: skip
]
# The from-scratch baselines of the captions: Table 1 (250k, M:132), Table 7 (250k, 550k, 800k, M:352), Table 8
# (250k, M:386), Table 9 (200k, M:422).
RECIPES += [
    _scratch("celeba64-scratch", "celeba64-mask50", 250_000, "Table 1a: FID 7.55 (10k samples)"),
    _scratch("celeba128-scratch", "celeba128", 550_000, "Table 3: FID 12.96 (50k samples, baseline)"),
    _scratch("celebahq256-scratch", "celebahq256", 800_000, "Table 4: FID 24.83 (baseline, 18.28 A100 days)"),
    _scratch("ffhq64-scratch", "ffhq64", 250_000, "Figure 5a (bars only)"),
    _scratch("celebahq256-10pct-scratch", "celebahq256-10pct", 200_000, "Figure 5b (bars only)"),
]
