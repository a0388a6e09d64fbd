"""Official MaskDiT checkpoints and diffusers' DiT into this package.

* `convert_maskdit_checkpoint` turns a released MaskDiT ``.pt`` file (Zheng et al. 2023, an ``EDMPrecond``-wrapped
  DiT with a decoder) into a `MaskDiTPipeline` that samples what the official EDM sampler samples.
* `convert_dit_transformer` turns a diffusers `DiTTransformer2DModel` (e.g. ``facebook/DiT-XL-2-256``) into the
  encoder of a `MaskedDiTTransformer2DModel`, so a released DiT can be masked-fine-tuned.
"""

from __future__ import annotations

import os
import re

import torch
from diffusers import DiTTransformer2DModel

from ..models.masked_dit import DIT_ENCODER_SIZES, MASKDIT_DECODER, MaskedDiTTransformer2DModel
from ..pipelines.pipeline_maskdit import MaskDiTPipeline
from ..schedulers.scheduling_edm_heun import EDMHeunScheduler
from ..utils.safe_loading import load_torch_file
from .common import (
    _check_heads,
    _check_keys,
    _check_positions,
    _load_converted,
    _num_blocks,
    imagenet_id2label,
    logger,
    select_state_dict,
)

# The SD v1 KL-f8 autoencoder's latent scale; MaskDiT's autoencoder.py decodes z / 0.18215.
MASKDIT_VAE_SCALING_FACTOR = 0.18215


# The official code's encoder sizes (its models/maskdit.py): width and heads of DiT's S, B, L and XL, and its own H.
OFFICIAL_ENCODER_SIZES = {
    **{size: (width, heads) for size, (_, width, heads) in DIT_ENCODER_SIZES.items()},
    "H": (1280, 16),
}
# The official decoder, at every size: 512 wide, 16 heads.
_OFFICIAL_DECODER_WIDTH = (
    MASKDIT_DECODER["decoder_num_attention_heads"] * MASKDIT_DECODER["decoder_attention_head_dim"]
)
# A model type as the official configs and command lines name it: "DiT-XL/2".
_MODEL_TYPE = re.compile(r"DiT-(S|B|L|XL|H)/(\d+)")


# Per-block parameters: timm Attention and Mlp, the adaLN-Zero modulation -> ours.
_OFFICIAL_BLOCK = {
    "attn.qkv": "attn1.to_qkv",
    "attn.proj": "attn1.to_out",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "modulation",
}


_OFFICIAL_PROJECTION = {"adaLN_modulation.1": "modulation", "linear": "proj"}


def _strip_precond_prefix(state_dict: dict) -> dict:
    # EDMPrecond keeps the DiT as `self.model`; a DiT's own state dict (no prefix) is accepted too.
    prefixed = [key for key in state_dict if key.startswith("model.")]
    if not prefixed:
        return dict(state_dict)
    if len(prefixed) != len(state_dict):
        unexpected = sorted(key for key in state_dict if not key.startswith("model."))
        raise ValueError(
            f"the checkpoint mixes EDMPrecond's 'model.' parameters with others; unexpected keys: {unexpected}"
        )
    return {key[len("model.") :]: value for key, value in state_dict.items()}


def recorded_model_type(checkpoint) -> str | None:
    """
    The model type (``"DiT-XL/2"``) a training checkpoint records in its pickled ``args``, if it records one.

    Read from what [`~diffusers_masked.utils.safe_loading.load_torch_file`] returned: ``args`` is an inert stub
    whose ``state`` holds the pickled attributes (or a plain dict); a ``model_type`` or ``model`` attribute naming a
    DiT size is taken. `None` when there is no ``args`` or it names no model type.
    """
    args = checkpoint.get("args") if isinstance(checkpoint, dict) else None
    fields = args if isinstance(args, dict) else getattr(args, "state", None)
    if not isinstance(fields, dict):
        return None
    for key in ("model_type", "model"):
        value = fields.get(key)
        if isinstance(value, str) and _MODEL_TYPE.fullmatch(value):
            return value
    return None


def _encoder_heads(width: int, patch_size: int, model_type: str | None) -> int:
    """The official model's encoder heads: from its model type if one is recorded (which must match the weights),
    else from the DiT size its width identifies."""
    flag = "pass num_attention_heads (command line: --num_attention_heads)"
    if model_type is not None:
        match = _MODEL_TYPE.fullmatch(model_type)
        if match is None:
            raise ValueError(f"model_type must name a DiT size like 'DiT-XL/2' (S, B, L, XL or H), got {model_type!r}")
        recorded_width, heads = OFFICIAL_ENCODER_SIZES[match.group(1)]
        if (recorded_width, int(match.group(2))) != (width, patch_size):
            raise ValueError(
                f"the checkpoint records model type {model_type!r} ({recorded_width} wide, patch {match.group(2)}), "
                f"but its weights are {width} wide with patch {patch_size}; if the weights are right, {flag}"
            )
        return heads
    for recorded_width, heads in OFFICIAL_ENCODER_SIZES.values():
        if recorded_width == width:
            return heads
    sizes = ", ".join(f"{size} {w} wide with {h}" for size, (w, h) in OFFICIAL_ENCODER_SIZES.items())
    raise ValueError(
        f"the encoder is {width} wide, which is no DiT size ({sizes} heads), and the checkpoint records no model "
        f"type, so its head count is unknown: {flag}"
    )


def maskdit_config_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    model_type: str | None = None,
) -> dict:
    """
    The [`MaskedDiTTransformer2DModel`] config of an official MaskDiT state dict, read from its shapes.

    Depth, widths, patch size, channels, input size, classes and MLP ratio are in the shapes; the head counts are not.
    By default they are the official model's: the encoder's from the recorded ``model_type`` if given (it must match
    the weights' width and patch), else from the DiT size the width identifies (S: 384 wide, 6 heads; B: 768, 12;
    L: 1024, 16; XL: 1152, 16; the official code's H: 1280, 16); the decoder's 16 at the official width of 512. A
    width that identifies no size needs the head count given.

    Args:
        state_dict (`dict[str, torch.Tensor]`): The official parameters, with or without EDMPrecond's ``model.``.
        num_attention_heads (`int`, *optional*): Encoder heads.
        decoder_num_attention_heads (`int`, *optional*): Decoder heads.
        model_type (`str`, *optional*): The official model type, e.g. ``"DiT-XL/2"`` (see [`recorded_model_type`]).

    Raises:
        ValueError: if the heads cannot be inferred, or do not divide the width.
    """
    state_dict = _strip_precond_prefix(state_dict)
    needed = ["x_embedder.proj.weight", "pos_embed", "t_embedder.mlp.0.weight", "blocks.0.mlp.fc1.weight"]
    needed += ["final_layer.linear.weight"]
    _check_keys(set(state_dict) & set(needed), needed, "the MaskDiT checkpoint")
    width, in_channels, patch_size, _ = state_dict["x_embedder.proj.weight"].shape
    num_tokens = state_dict["pos_embed"].shape[-2]
    grid = round(num_tokens**0.5)
    if grid * grid != num_tokens:
        raise ValueError(f"pos_embed has {num_tokens} positions, not a square grid")
    decoder_num_layers = _num_blocks(state_dict, "decoder_blocks")
    decoder_width = state_dict["decoder_layer.linear.weight"].shape[0] if decoder_num_layers else 0
    out_features = state_dict["final_layer.linear.weight"].shape[0]
    if out_features % (patch_size * patch_size):
        raise ValueError(f"final_layer.linear has {out_features} outputs, not a multiple of patch_size**2")
    labels = state_dict.get("y_embedder.embedding_table.weight")
    num_classes = labels.shape[1] if labels is not None else 0
    if num_attention_heads is None:
        num_attention_heads = _encoder_heads(width, patch_size, model_type)
    attention_head_dim = _check_heads(width, num_attention_heads, "num_attention_heads")
    if decoder_num_attention_heads is None:
        if decoder_num_layers and decoder_width != _OFFICIAL_DECODER_WIDTH:
            raise ValueError(
                f"the decoder is {decoder_width} wide, not the official {_OFFICIAL_DECODER_WIDTH}, so its head count "
                "is unknown: pass decoder_num_attention_heads (command line: --decoder_num_attention_heads)"
            )
        decoder_num_attention_heads = MASKDIT_DECODER["decoder_num_attention_heads"]
    return {
        "sample_size": grid * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": out_features // (patch_size * patch_size),
        "num_layers": _num_blocks(state_dict, "blocks"),
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": attention_head_dim,
        "decoder_num_layers": decoder_num_layers,
        "decoder_num_attention_heads": decoder_num_attention_heads,
        "decoder_attention_head_dim": (
            _check_heads(decoder_width, decoder_num_attention_heads, "decoder_num_attention_heads")
            if decoder_num_layers
            else MASKDIT_DECODER["decoder_attention_head_dim"]
        ),
        "num_classes": num_classes,
        "mlp_ratio": state_dict["blocks.0.mlp.fc1.weight"].shape[0] / width,
        "norm_eps": 1e-6,
        "frequency_embedding_size": state_dict["t_embedder.mlp.0.weight"].shape[1],
        "freq_shift": 0,
    }


def _official_key_map(config: dict) -> dict[str, str]:
    """Official parameter name -> ours, for everything that is copied unchanged."""
    names = {
        "x_embedder.proj": "patch_embed",
        "t_embedder.mlp.0": "timestep_embedder.linear_1",
        "t_embedder.mlp.2": "timestep_embedder.linear_2",
        **{f"final_layer.{a}": f"final_layer.{b}" for a, b in _OFFICIAL_PROJECTION.items()},
    }
    for i in range(config["num_layers"]):
        names.update({f"blocks.{i}.{a}": f"transformer_blocks.{i}.{b}" for a, b in _OFFICIAL_BLOCK.items()})
    if config["decoder_num_layers"]:
        names.update({f"decoder_layer.{a}": f"decoder_layer.{b}" for a, b in _OFFICIAL_PROJECTION.items()})
        for i in range(config["decoder_num_layers"]):
            names.update({f"decoder_blocks.{i}.{a}": f"decoder_blocks.{i}.{b}" for a, b in _OFFICIAL_BLOCK.items()})
    key_map = {f"{a}.{p}": f"{b}.{p}" for a, b in names.items() for p in ("weight", "bias")}
    if config["decoder_num_layers"]:
        key_map["mask_token"] = "mask_token"
    return key_map


def convert_maskdit_state_dict(
    state_dict: dict[str, torch.Tensor],
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    model_type: str | None = None,
) -> MaskedDiTTransformer2DModel:
    """
    Build a [`MaskedDiTTransformer2DModel`] from an official MaskDiT state dict (see
    [`maskdit_config_from_state_dict`] for the arguments).

    Every official parameter is accounted for: a key this conversion does not know, or one it expects and does not
    find, is an error listing them. The fixed positions (``pos_embed``, ``decoder_pos_embed``) are checked against
    ours. The label embedding, a bias-free ``Linear`` over one-hot labels whose null class is the zero vector,
    becomes the rows of our table with a zero row for the null class (id `num_classes`). A checkpoint trained without
    the MAE loss has no ``mask_token``; the official model then fills removed tokens with zeros, and so does ours.
    """
    config = maskdit_config_from_state_dict(state_dict, num_attention_heads, decoder_num_attention_heads, model_type)
    state_dict = _strip_precond_prefix(state_dict)
    key_map = _official_key_map(config)
    expected = set(key_map) | {"pos_embed"}
    if config["num_classes"]:
        expected.add("y_embedder.embedding_table.weight")
    if config["decoder_num_layers"]:
        expected.add("decoder_pos_embed")
        if "mask_token" not in state_dict:
            expected.discard("mask_token")
    _check_keys(state_dict, expected, "the MaskDiT checkpoint")

    model = MaskedDiTTransformer2DModel(**config)
    converted = {ours: state_dict[official] for official, ours in key_map.items() if official in state_dict}
    if config["num_classes"]:
        table = state_dict["y_embedder.embedding_table.weight"]  # [D, num_classes]: one-hot label -> embedding
        converted["class_embedder.weight"] = torch.cat([table.T, table.new_zeros(1, table.shape[0])])
    if config["decoder_num_layers"] and "mask_token" not in state_dict:
        converted["mask_token"] = torch.zeros_like(model.mask_token)
    _load_converted(model, converted, "the MaskDiT checkpoint")
    _check_positions(state_dict["pos_embed"], model.pos_embed, "pos_embed")
    if config["decoder_num_layers"]:
        _check_positions(state_dict["decoder_pos_embed"], model.decoder_pos_embed, "decoder_pos_embed")
    return model.eval()


def maskdit_scheduler() -> EDMHeunScheduler:
    """The official sampler's settings: EDM preconditioning with sigma_data 0.5 (``EDMPrecond``), Heun's method on the
    Karras schedule from sigma_max 80 to sigma_min 0.002 with rho 7, then to 0 (``edm_sampler``)."""
    return EDMHeunScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, rho=7.0, final_sigmas_type="zero")


def convert_maskdit_checkpoint(
    checkpoint: str | os.PathLike,
    vae=None,
    weights: str = "ema",
    num_attention_heads: int | None = None,
    decoder_num_attention_heads: int | None = None,
    id2label: dict[int, str] | None = None,
) -> MaskDiTPipeline:
    """
    Convert an official MaskDiT checkpoint (e.g. ``imagenet256-ckpt-best_with_guidance.pt``) into a pipeline.

    The pipeline computes what the official ``edm_sampler`` does: the same preconditioning and noise levels
    ([`maskdit_scheduler`]), guidance on the network output with the null class, and decoding by ``z / 0.18215``.

    Args:
        checkpoint (`str` or `os.PathLike`): The file (see `load_torch_file`).
        vae ([`~diffusers.AutoencoderKL`], *optional*): The autoencoder to decode latents with (see [`load_vae`]);
            its latent space must be the Stable Diffusion one MaskDiT was trained in (4 channels, scale 0.18215).
        weights (`str`, defaults to `"ema"`): ``"ema"`` or ``"model"`` (see [`select_state_dict`]).
        num_attention_heads (`int`, *optional*): Encoder heads, which the weights do not store; by default from the
            model type a training checkpoint records (``args.model_type``), else from the DiT size of the width (see
            [`maskdit_config_from_state_dict`]).
        decoder_num_attention_heads (`int`, *optional*): Decoder heads; by default the official decoder's 16.
        id2label (`dict[int, str]`, *optional*): Class names; defaults to ImageNet's for a 1000-class model.
    """
    loaded = load_torch_file(checkpoint)
    state_dict = select_state_dict(loaded, weights)
    transformer = convert_maskdit_state_dict(
        state_dict, num_attention_heads, decoder_num_attention_heads, recorded_model_type(loaded)
    )
    if vae is not None:
        if vae.config.latent_channels != transformer.config.in_channels:
            raise ValueError(
                f"the VAE has {vae.config.latent_channels} latent channels, the transformer "
                f"{transformer.config.in_channels}"
            )
        if vae.config.scaling_factor != MASKDIT_VAE_SCALING_FACTOR:
            raise ValueError(
                f"the VAE's scaling_factor is {vae.config.scaling_factor}; MaskDiT's latents are those of the Stable "
                f"Diffusion autoencoder scaled by {MASKDIT_VAE_SCALING_FACTOR}"
            )
    if id2label is None and transformer.config.num_classes == 1000:
        id2label = imagenet_id2label()
    return MaskDiTPipeline(transformer=transformer, scheduler=maskdit_scheduler(), vae=vae, id2label=id2label)


_DIT_BLOCK = {
    "norm1.linear": "modulation",
    "attn1.to_out.0": "attn1.to_out",
    "ff.net.0.proj": "ff.net.0.proj",
    "ff.net.2": "ff.net.2",
}


_DIT_EMBEDDERS = {
    "norm1.emb.timestep_embedder.linear_1": "timestep_embedder.linear_1",
    "norm1.emb.timestep_embedder.linear_2": "timestep_embedder.linear_2",
}


_DIT_CLASS_TABLE = "norm1.emb.class_embedder.embedding_table.weight"


def convert_dit_transformer(
    dit,
    decoder_num_layers: int = 0,
    decoder_num_attention_heads: int = MASKDIT_DECODER["decoder_num_attention_heads"],
    decoder_attention_head_dim: int = MASKDIT_DECODER["decoder_attention_head_dim"],
) -> MaskedDiTTransformer2DModel:
    """
    Initialise a [`MaskedDiTTransformer2DModel`]'s encoder from a diffusers [`~diffusers.DiTTransformer2DModel`].

    * Each diffusers block carries its own copy of the timestep and label embedders; they must all be equal (they are
      in every released DiT) and become our one shared embedder. The label table has `num_classes + 1` rows with the
      null (guidance) class last, which is our layout.
    * The separate query, key and value projections are fused into ``to_qkv``.
    * DiT's learned-variance half of the output is dropped: per token, the first `in_channels` of every patch pixel's
      `2 * in_channels` outputs are kept.
    * diffusers' timestep features use ``downscale_freq_shift=1``; the converted model is made with `freq_shift=1`
      so it computes the same function (DiT's own code uses 0).
    * Without a decoder, DiT's final layer (``proj_out_1`` modulation, ``proj_out_2``) becomes ours and the model
      computes what the DiT computes (its first `in_channels` output channels). With a decoder, the decoder layer,
      mask token, decoder blocks and final layer are new and start from this package's initialisation.

    Args:
        dit ([`~diffusers.DiTTransformer2DModel`]): The pretrained DiT.
        decoder_num_layers (`int`, defaults to 0): Depth of the new decoder; 0 means none.
        decoder_num_attention_heads (`int`, defaults to 16): Heads of the new decoder.
        decoder_attention_head_dim (`int`, defaults to 32): Head width of the new decoder.
    """
    if not isinstance(dit, DiTTransformer2DModel):
        raise TypeError(f"dit must be a diffusers DiTTransformer2DModel, got {type(dit).__name__}")
    config = dit.config
    if config.norm_type != "ada_norm_zero" or config.activation_fn != "gelu-approximate":
        raise ValueError(
            f"only DiT's adaLN-Zero blocks with tanh-GELU MLPs convert; got norm_type={config.norm_type!r}, "
            f"activation_fn={config.activation_fn!r}"
        )
    in_channels, out_channels = config.in_channels, dit.out_channels
    if out_channels not in (in_channels, 2 * in_channels):
        raise ValueError(
            f"the DiT predicts {out_channels} channels from {in_channels}; only the mean (in_channels) or the mean "
            "and a learned variance (2 * in_channels) convert"
        )
    if config.norm_eps != 1e-6:
        logger.warning(
            f"the DiT's MLP LayerNorm uses norm_eps={config.norm_eps} (diffusers' default), its attention and final "
            "LayerNorms 1e-6, as DiT was trained; the converted model uses 1e-6 for all of them"
        )
    num_layers, width = config.num_layers, dit.inner_dim
    state = dit.state_dict()
    patch = config.patch_size

    ours = MaskedDiTTransformer2DModel(
        sample_size=config.sample_size,
        patch_size=patch,
        in_channels=in_channels,
        num_layers=num_layers,
        num_attention_heads=config.num_attention_heads,
        attention_head_dim=config.attention_head_dim,
        decoder_num_layers=decoder_num_layers,
        decoder_num_attention_heads=decoder_num_attention_heads,
        decoder_attention_head_dim=decoder_attention_head_dim,
        num_classes=config.num_embeds_ada_norm,
        mlp_ratio=state["transformer_blocks.0.ff.net.0.proj.weight"].shape[0] / width,
        norm_eps=1e-6,
        frequency_embedding_size=state["transformer_blocks.0.norm1.emb.timestep_embedder.linear_1.weight"].shape[1],
        freq_shift=1,
    )

    expected = {f"{name}.{p}" for name in ("pos_embed.proj", "proj_out_1", "proj_out_2") for p in ("weight", "bias")}
    for i in range(num_layers):
        names = [*_DIT_BLOCK, *_DIT_EMBEDDERS, *(f"attn1.to_{x}" for x in "qkv")]
        expected |= {f"transformer_blocks.{i}.{name}.{p}" for name in names for p in ("weight", "bias")}
        expected.add(f"transformer_blocks.{i}.{_DIT_CLASS_TABLE}")
    _check_keys(state, expected, "the DiT")

    converted = {
        "patch_embed.weight": state["pos_embed.proj.weight"],
        "patch_embed.bias": state["pos_embed.proj.bias"],
    }
    shared = [f"{name}.{p}" for name in _DIT_EMBEDDERS for p in ("weight", "bias")] + [_DIT_CLASS_TABLE]
    differing = [
        f"transformer_blocks.{i}.{name}"
        for i in range(1, num_layers)
        for name in shared
        if not torch.equal(state[f"transformer_blocks.{i}.{name}"], state[f"transformer_blocks.0.{name}"])
    ]
    if differing:
        raise ValueError(
            "the DiT's per-block timestep/label embedders are not copies of block 0's, so they cannot become one "
            f"shared embedder; these differ from block 0's: {differing}"
        )
    for name, target in _DIT_EMBEDDERS.items():
        for p in ("weight", "bias"):
            converted[f"{target}.{p}"] = state[f"transformer_blocks.0.{name}.{p}"]
    table = state[f"transformer_blocks.0.{_DIT_CLASS_TABLE}"]
    if table.shape[0] != config.num_embeds_ada_norm + 1:
        raise ValueError(
            f"the DiT's label table has {table.shape[0]} rows; {config.num_embeds_ada_norm} classes and the null "
            "class (trained with label dropout) are needed for guidance"
        )
    converted["class_embedder.weight"] = table
    for i in range(num_layers):
        block = f"transformer_blocks.{i}"
        for p in ("weight", "bias"):
            for name, target in _DIT_BLOCK.items():
                converted[f"{block}.{target}.{p}"] = state[f"{block}.{name}.{p}"]
            converted[f"{block}.attn1.to_qkv.{p}"] = torch.cat([state[f"{block}.attn1.to_{x}.{p}"] for x in "qkv"])
    if not decoder_num_layers:
        # proj_out_2's outputs per token are (patch row, patch column, channel), channel fastest.
        keep = (torch.arange(patch * patch * out_channels) % out_channels) < in_channels
        converted.update(
            {
                "final_layer.modulation.weight": state["proj_out_1.weight"],
                "final_layer.modulation.bias": state["proj_out_1.bias"],
                "final_layer.proj.weight": state["proj_out_2.weight"][keep],
                "final_layer.proj.bias": state["proj_out_2.bias"][keep],
            }
        )
    else:
        fresh = ours.state_dict()
        new_parts = ("decoder_layer.", "decoder_blocks.", "final_layer.", "mask_token")
        converted.update({key: value for key, value in fresh.items() if key.startswith(new_parts)})
    _load_converted(ours, converted, "the DiT")
    _check_positions(dit.pos_embed.pos_embed, ours.pos_embed, "pos_embed")
    return ours.eval()
