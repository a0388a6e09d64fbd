"""Official MaskDM checkpoints into this package: `convert_maskdm_checkpoint` turns a checkpoint of Lei et al. 2023 (a
``GaussianDiffusion``-wrapped U-ViT) into a `MaskDMPipeline` on the checkpoint's own noise schedule."""

from __future__ import annotations

import os

import torch

from ..models.masked_uvit import MaskedUViTTransformer2DModel
from ..pipelines.pipeline_maskdm import MaskDMPipeline
from ..utils.safe_loading import load_torch_file
from .common import WEIGHTS, _check_heads, _check_keys, _is_state_dict, _load_converted, _num_blocks, select_state_dict

# The official checkpoint (`train_step.py`) is `{step, model, opt, ema, scaler}`. `model` is the GaussianDiffusion's
# state dict: the U-ViT under `model.` beside the schedule buffers it registers; `ema` is ema-pytorch's, the same
# under `ema_model.`, plus its own bookkeeping (and, in older ema-pytorch versions, the online copy again under
# `online_model.`).
MASKDM_PREFIXES = {"model": "", "ema": "ema_model."}


MASKDM_SCHEDULE_BUFFERS = (
    "betas",
    "alphas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "loss_weight",
)


_EMA_BOOKKEEPING = ("initted", "step")


_EMA_ONLINE_COPY = "online_model."


# The official betas are computed in float64 and stored as float32.
BETAS_ATOL = 1e-6


# Parts of the official MaskedUViT this package's model does not have (see docs/maskdm.md).
_MASKDM_UNSUPPORTED = {
    "encoder_to_decoder": "a ViT decoder (decoder_depth > 0)",
    "decoder": "a ViT decoder (decoder_depth > 0)",
    "final_layer": "the final convolution (use_final_conv)",
    "encoder.blocks": "a plain ViT encoder",
}


_MASKDM_BLOCK = {
    "norm1": "norm1",
    "norm2": "norm2",
    "attn.proj": "attn.to_out",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}


def split_maskdm_checkpoint(checkpoint, weights: str = "ema") -> tuple[dict, dict]:
    """
    The U-ViT parameters and the schedule buffers of an official MaskDM checkpoint.

    Args:
        checkpoint: What `load_torch_file` returned: the training checkpoint ``{step, model, opt, ema, scaler}``,
            or one GaussianDiffusion state dict (``model.…`` parameters beside the buffers).
        weights (`str`, defaults to `"ema"`): ``"ema"`` (``ema["ema_model.model.…"]``, what the official
            evaluation samples with) or ``"model"`` (the online weights, ``model["model.…"]``, what the official
            fine-tuning starts from).

    Returns:
        `tuple`: ``(parameters, buffers)``: the U-ViT's state dict with official names (``encoder.…``,
        ``encoder_to_output.…``) and the GaussianDiffusion buffers by name (``betas``, ``alphas_cumprod``, …).

    Raises:
        ValueError: listing every key that is neither a U-ViT parameter nor a known buffer, and the buffers missing.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    single = _is_state_dict(checkpoint) and any(key.startswith("model.") for key in checkpoint)
    state_dict = dict(checkpoint) if single else select_state_dict(checkpoint, weights)
    prefix = "" if single else MASKDM_PREFIXES[weights]
    parameters, buffers, unexpected = {}, {}, []
    for key, value in state_dict.items():
        if weights == "ema" and not single and (key in _EMA_BOOKKEEPING or key.startswith(_EMA_ONLINE_COPY)):
            continue
        name = key[len(prefix) :] if key.startswith(prefix) else None
        if name is not None and name.startswith("model."):
            parameters[name[len("model.") :]] = value
        elif name in MASKDM_SCHEDULE_BUFFERS:
            buffers[name] = value
        else:
            unexpected.append(key)
    missing = [f"{prefix}{name}" for name in ("betas", "alphas_cumprod") if name not in buffers]
    if unexpected or missing or not parameters:
        raise ValueError(
            f"the MaskDM checkpoint's {weights!r} weights are not a GaussianDiffusion state dict (U-ViT parameters "
            f"under '{prefix}model.' beside its schedule buffers); unexpected keys: {sorted(unexpected)}; missing "
            f"keys: {missing}{'' if parameters else f'; no parameters under {prefix}model.'}"
        )
    return parameters, buffers


def maskdm_beta_schedule(buffers: dict[str, torch.Tensor]) -> dict:
    """
    The noise schedule of an official MaskDM checkpoint, as a diffusers scheduler config, read from its buffers.

    The official ``GaussianDiffusion`` has two schedules: linear (betas ``1e-4 … 0.02`` scaled by ``1000 / T``) and
    the cosine one of Nichol & Dhariwal (diffusers' ``"squaredcos_cap_v2"``). The stored ``betas`` must be one of them
    for the checkpoint's ``T`` and ``alphas_cumprod`` their cumulative product; a shifted cosine (``shift: true``)
    is neither and is refused.

    Returns:
        `dict`: ``{"num_train_timesteps": T, "beta_schedule": ...}`` (plus ``beta_start``/``beta_end`` for linear).
    """
    from diffusers import DDPMScheduler

    betas = buffers["betas"].double().flatten()
    num_train_timesteps = betas.numel()
    scale = 1000 / num_train_timesteps
    candidates = {
        "linear": {"beta_schedule": "linear", "beta_start": scale * 1e-4, "beta_end": scale * 0.02},
        "cosine": {"beta_schedule": "squaredcos_cap_v2"},
    }
    for config in candidates.values():
        config = {"num_train_timesteps": num_train_timesteps, **config}
        reference = DDPMScheduler(**config).betas.double()
        if torch.allclose(betas, reference, atol=BETAS_ATOL, rtol=0):
            alphas_cumprod = buffers["alphas_cumprod"].double().flatten()
            expected = torch.cumprod(1 - betas, dim=0)
            if alphas_cumprod.shape != expected.shape or not torch.allclose(alphas_cumprod, expected, atol=1e-5):
                raise ValueError("the checkpoint's alphas_cumprod is not the cumulative product of its 1 - betas")
            return config
    raise ValueError(
        f"the checkpoint's {num_train_timesteps} betas are neither the official linear schedule nor the cosine one; "
        "a shifted cosine schedule (shift: true) has no diffusers equivalent and cannot be converted"
    )


def maskdm_config_from_state_dict(state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None) -> dict:
    """
    The [`MaskedUViTTransformer2DModel`] config of an official MaskDM U-ViT state dict (names ``encoder.…``), read
    from its shapes.

    Args:
        state_dict (`dict[str, torch.Tensor]`): The U-ViT's parameters (see [`split_maskdm_checkpoint`]).
        num_attention_heads (`int`, *optional*): Heads, which shapes do not store. Defaults to width / 64, the head
            width of every official config (8 heads at 512, 12 at 768).
    """
    unsupported = sorted(
        {what for key in state_dict for part, what in _MASKDM_UNSUPPORTED.items() if key.startswith(part + ".")}
    )
    if unsupported:
        raise ValueError(f"the MaskDM checkpoint has {' and '.join(unsupported)}, which this package's U-ViT does not")
    needed = ["encoder.patch_embed.proj.weight", "encoder.encoder_pos_embed", "encoder.mid_block.mlp.fc1.weight"]
    needed += ["encoder_to_output.weight"]
    _check_keys(set(state_dict) & set(needed), needed, "the MaskDM checkpoint")
    width, in_channels, patch_size, _ = state_dict["encoder.patch_embed.proj.weight"].shape
    labels = state_dict.get("encoder.label_emb.weight")
    num_classes = labels.shape[0] if labels is not None else 0
    extras = 2 if num_classes else 1
    num_patches = state_dict["encoder.encoder_pos_embed"].shape[-2] - extras
    grid = round(num_patches**0.5)
    if num_patches < 1 or grid * grid != num_patches:
        raise ValueError(
            f"encoder_pos_embed has {num_patches} patch positions (after {extras} extra), not a square grid"
        )
    out_features = state_dict["encoder_to_output.weight"].shape[0]
    if out_features % (patch_size * patch_size):
        raise ValueError(f"encoder_to_output has {out_features} outputs, not a multiple of patch_size**2")
    if num_attention_heads is None:
        num_attention_heads = max(width // 64, 1)
    return {
        "sample_size": grid * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": out_features // (patch_size * patch_size),
        "num_layers": 2 * _num_blocks(state_dict, "encoder.in_blocks") + 1,
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": _check_heads(width, num_attention_heads, "num_attention_heads"),
        "num_classes": num_classes,
        "mlp_ratio": state_dict["encoder.mid_block.mlp.fc1.weight"].shape[0] / width,
        "norm_eps": 1e-5,
        "time_embedding_mlp": "encoder.time_embed.0.weight" in state_dict,
    }


def _maskdm_key_map(config: dict) -> dict[str, str]:
    """Official parameter name -> ours, for everything copied unchanged."""
    names = {"encoder.patch_embed.proj": "patch_embed", "encoder.norm": "norm_out", "encoder_to_output": "proj_out"}
    if config["time_embedding_mlp"]:
        names.update(
            {"encoder.time_embed.0": "time_embedding.linear_1", "encoder.time_embed.2": "time_embedding.linear_2"}
        )
    blocks = [f"in_blocks.{i}" for i in range(config["num_layers"] // 2)] + ["mid_block"]
    blocks += [f"out_blocks.{i}" for i in range(config["num_layers"] // 2)]
    for block in blocks:
        names.update({f"encoder.{block}.{a}": f"{block}.{b}" for a, b in _MASKDM_BLOCK.items()})
        if block.startswith("out_blocks"):
            names[f"encoder.{block}.skip_linear"] = f"{block}.skip_linear"
    key_map = {f"{a}.{p}": f"{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}
    # qkv has no bias in every official config (qkv_bias: False).
    key_map.update({f"encoder.{block}.attn.qkv.weight": f"{block}.attn.to_qkv.weight" for block in blocks})
    key_map["encoder.encoder_pos_embed"] = "pos_embed"
    return key_map


def convert_maskdm_state_dict(
    state_dict: dict[str, torch.Tensor], num_attention_heads: int | None = None
) -> MaskedUViTTransformer2DModel:
    """
    Build a [`MaskedUViTTransformer2DModel`] from an official MaskDM U-ViT state dict (see
    [`maskdm_config_from_state_dict`] for the arguments).

    Every official parameter is accounted for: a key this conversion does not know, or one it expects and does not
    find, is an error listing them (BEiT-style ``q_bias``/``v_bias`` from ``qkv_bias: True`` among them). The label
    table ``encoder.label_emb`` and the separate unconditional embedding ``encoder.uncond_embed`` become our one table
    with the null class (id `num_classes`) last.
    """
    config = maskdm_config_from_state_dict(state_dict, num_attention_heads)
    key_map = _maskdm_key_map(config)
    expected = set(key_map)
    if config["num_classes"]:
        expected |= {"encoder.label_emb.weight", "encoder.uncond_embed"}
    _check_keys(state_dict, expected, "the MaskDM checkpoint")
    model = MaskedUViTTransformer2DModel(**config)
    converted = {ours: state_dict[official] for official, ours in key_map.items()}
    if config["num_classes"]:
        uncond = state_dict["encoder.uncond_embed"].reshape(1, -1)
        converted["class_embedder.weight"] = torch.cat([state_dict["encoder.label_emb.weight"], uncond])
    _load_converted(model, converted, "the MaskDM checkpoint")
    return model.eval()


def convert_maskdm_checkpoint(
    checkpoint: str | os.PathLike, weights: str = "ema", num_attention_heads: int | None = None
) -> MaskDMPipeline:
    """
    Convert an official MaskDM checkpoint (e.g. ``pretrain_celebahq_m90block4_20.pt``) into a [`MaskDMPipeline`].

    The transformer comes from the chosen weights (see [`split_maskdm_checkpoint`]), the sampler is MaskDM's
    evaluation one ([`MaskDMPipeline.default_scheduler`]: DDIM, x0 clipped to [-1, 1], trailing steps) on the noise
    schedule read from the checkpoint's buffers ([`maskdm_beta_schedule`]).

    Args:
        checkpoint (`str` or `os.PathLike`): The file (see `load_torch_file`).
        weights (`str`, defaults to `"ema"`): ``"ema"`` or ``"model"`` (the online weights, to fine-tune from).
        num_attention_heads (`int`, *optional*): Heads; defaults to width / 64 as in every official config.
    """
    parameters, buffers = split_maskdm_checkpoint(load_torch_file(checkpoint), weights)
    transformer = convert_maskdm_state_dict(parameters, num_attention_heads)
    scheduler = MaskDMPipeline.default_scheduler(maskdm_beta_schedule(buffers))
    return MaskDMPipeline(transformer=transformer, scheduler=scheduler)
