"""Weights from elsewhere into this package: the official MaskDiT and MaskDM checkpoints and diffusers' DiT.

* [`convert_maskdit_checkpoint`] turns a released MaskDiT ``.pt`` file (Zheng et al. 2023, an ``EDMPrecond``-wrapped
  DiT with a decoder) into a [`MaskDiTPipeline`] that samples what the official EDM sampler samples.
* [`convert_maskdm_checkpoint`] turns an official MaskDM checkpoint (Lei et al. 2023, a ``GaussianDiffusion``-wrapped
  U-ViT) into a [`MaskDMPipeline`] on the checkpoint's own noise schedule.
* [`convert_dit_transformer`] turns a diffusers [`~diffusers.DiTTransformer2DModel`] (e.g. ``facebook/DiT-XL-2-256``)
  into the encoder of a [`MaskedDiTTransformer2DModel`], so a released DiT can be masked-fine-tuned.

No file is unpickled with code: safetensors, ``torch.load(weights_only=True)``, or, for training checkpoints that also
pickle a config object, [`load_checkpoint`]'s restricted unpickler, which rebuilds tensors and nothing else.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import types
from collections import OrderedDict
from pathlib import Path

import torch
from diffusers.utils import logging

from .models.masked_dit import MASKDIT_DECODER, MaskedDiTTransformer2DModel
from .models.masked_uvit import MaskedUViTTransformer2DModel
from .pipelines.pipeline_maskdit import MaskDiTPipeline
from .pipelines.pipeline_maskdm import MaskDMPipeline
from .schedulers.scheduling_edm_heun import EDMHeunScheduler

logger = logging.get_logger(__name__)

IMAGENET_ID2LABEL_FILE = Path(__file__).with_name("imagenet_id2label.json")
WEIGHTS = ("ema", "model")
# The SD v1 KL-f8 autoencoder's latent scale; MaskDiT's autoencoder.py decodes z / 0.18215.
MASKDIT_VAE_SCALING_FACTOR = 0.18215
# Tolerance for the checkpoints' stored sine-cosine positions against ours: the official code computes them in
# float64 and stores float32, ours are computed in float32.
POSITIONS_ATOL = 1e-5


def imagenet_id2label() -> dict[int, str]:
    """The ImageNet-1k class names in class-index order (``207 -> "golden retriever"``), shipped with the package
    (made by ``scripts/make_imagenet_id2label.py``)."""
    return {int(k): v for k, v in json.loads(IMAGENET_ID2LABEL_FILE.read_text(encoding="utf-8")).items()}


# ----------------------------------------------------------------------------------------------------------------
# Reading checkpoint files without running code


class _Stub:
    """Stands in for any class or function a pickle names that is not a tensor-rebuild function: calling it,
    building it or filling it only records the arguments, so nothing the file names is imported or run."""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state, self.items = args, kwargs, None, []

    def __setstate__(self, state):
        self.state = state

    def __setitem__(self, key, value):
        self.items.append((key, value))

    def append(self, value):
        self.items.append(value)

    def extend(self, values):
        self.items.extend(values)

    def __repr__(self):
        return f"<stub {type(self).__module__}.{type(self).__qualname__}>"


def _allowed_global(module: str, name: str):
    """What a checkpoint may name and get the real object for: torch's tensor-rebuild functions, dtypes and the
    containers a state dict is made of. ``None`` for everything else."""
    allowed = {
        ("torch._utils", "_rebuild_tensor_v2"),
        ("torch._utils", "_rebuild_tensor_v3"),
        ("torch._utils", "_rebuild_parameter"),
        ("torch._utils", "_rebuild_parameter_with_state"),
        ("torch._tensor", "_rebuild_from_type_v2"),
        ("torch.nn.parameter", "Parameter"),
        ("torch", "Tensor"),
        ("torch", "Size"),
        ("collections", "OrderedDict"),
    }
    if (module, name) == ("collections", "OrderedDict"):
        return OrderedDict
    if (module, name) in allowed:
        return getattr(__import__(module, fromlist=[name]), name, None)
    if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
        return getattr(torch, name)
    return None


def _restricted_pickle_module(stubbed: set[str]) -> types.ModuleType:
    """A ``pickle``-like module for ``torch.load(pickle_module=...)`` whose unpickler resolves only
    [`_allowed_global`]s and turns every other global into an inert [`_Stub`] subclass (recorded in `stubbed`)."""

    class RestrictedUnpickler(pickle.Unpickler):
        def find_class(self, module, name):
            found = _allowed_global(module, name)
            if found is not None:
                return found
            stubbed.add(f"{module}.{name}")
            return type(name, (_Stub,), {"__module__": module, "__qualname__": name})

    module = types.ModuleType("diffusers_masked_restricted_pickle")
    module.Unpickler = RestrictedUnpickler
    module.load = lambda file, **kwargs: RestrictedUnpickler(file, **kwargs).load()
    return module


def load_checkpoint(path: str | os.PathLike):
    """
    Read a checkpoint file without executing anything it contains.

    ``.safetensors`` files are read with safetensors. Other files go to `torch.load(weights_only=True)`; a file that
    loader refuses because it also pickles other objects (a training checkpoint's ``args``, a config object) is read
    again with an unpickler that rebuilds tensors and turns every other object into an inert stub, so a malicious
    ``__reduce__`` cannot run.

    Args:
        path (`str` or `os.PathLike`): The file.

    Returns:
        What the file holds: a state dict, or a dict of them (``{"model", "ema", "opt", "args"}``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"checkpoint {str(path)!r} is not a file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        first_error = error
    stubbed: set[str] = set()
    checkpoint = torch.load(
        path, map_location="cpu", weights_only=False, pickle_module=_restricted_pickle_module(stubbed)
    )
    logger.info(
        f"{path.name} holds more than tensors ({first_error.__class__.__name__} from weights_only=True); read it with "
        f"tensor rebuilding only, these globals were replaced by inert stubs: {sorted(stubbed)}"
    )
    return checkpoint


def _is_state_dict(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, torch.Tensor) for v in value.values())


def select_state_dict(checkpoint, weights: str = "ema") -> dict[str, torch.Tensor]:
    """
    The state dict to convert from what [`load_checkpoint`] returned.

    Args:
        checkpoint: A state dict, or a dict holding state dicts under keys such as ``"ema"`` and ``"model"``.
        weights (`str`, defaults to `"ema"`): Which of those to take when `checkpoint` holds several: ``"ema"`` (the
            averaged weights the official sampler uses) or ``"model"`` (the online weights). Ignored for a file that
            is a single state dict.
    """
    if weights not in WEIGHTS:
        raise ValueError(f"weights must be one of {WEIGHTS}, got {weights!r}")
    if _is_state_dict(checkpoint):
        return dict(checkpoint)
    if isinstance(checkpoint, dict) and _is_state_dict(checkpoint.get(weights)):
        return dict(checkpoint[weights])
    keys = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
    raise ValueError(
        f"the checkpoint holds no state dict under {weights!r}; its top-level keys are {keys}. Pass weights= one of "
        f"{WEIGHTS} that it holds."
    )


def _check_keys(found, expected, source: str):
    unexpected = sorted(set(found) - set(expected))
    missing = sorted(set(expected) - set(found))
    if unexpected or missing:
        raise ValueError(
            f"{source} does not have the expected parameters; unexpected keys: {unexpected}; missing keys: {missing}"
        )


def _load_converted(model: torch.nn.Module, converted: dict[str, torch.Tensor], source: str):
    """Load `converted` into `model` strictly, reporting every shape mismatch at once."""
    own = model.state_dict()
    _check_keys(converted, own, source)
    mismatched = [
        f"{key}: {tuple(value.shape)} vs {tuple(own[key].shape)}"
        for key, value in converted.items()
        if value.shape != own[key].shape
    ]
    if mismatched:
        raise ValueError(f"{source} has parameters of unexpected shape (converted vs expected): {mismatched}")
    model.load_state_dict(converted, strict=True)


def _num_blocks(keys, prefix: str) -> int:
    indices = {int(m.group(1)) for key in keys if (m := re.match(rf"{re.escape(prefix)}\.(\d+)\.", key))}
    return max(indices) + 1 if indices else 0


def _check_positions(stored: torch.Tensor, ours: torch.Tensor, name: str):
    stored = stored.reshape(-1, stored.shape[-1]).float()
    if stored.shape != ours.shape or not torch.allclose(stored, ours, atol=POSITIONS_ATOL, rtol=0):
        detail = (
            f"max difference {(stored - ours).abs().max().item():.3g}"
            if stored.shape == ours.shape
            else f"shape {tuple(stored.shape)} vs {tuple(ours.shape)}"
        )
        raise ValueError(
            f"the checkpoint's {name} is not the fixed 2-D sine-cosine table this model computes ({detail}); "
            "it was not made with MaskDiT's positions (e.g. it has a cls token) and cannot be converted"
        )


def _check_heads(width: int, heads: int, name: str) -> int:
    if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1 or width % heads:
        raise ValueError(f"{name} must be a positive int dividing the width {width}, got {heads!r}")
    return width // heads


# ----------------------------------------------------------------------------------------------------------------
# Official MaskDiT

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


def maskdit_config_from_state_dict(
    state_dict: dict[str, torch.Tensor],
    num_attention_heads: int = 16,
    decoder_num_attention_heads: int = MASKDIT_DECODER["decoder_num_attention_heads"],
) -> dict:
    """
    The [`MaskedDiTTransformer2DModel`] config of an official MaskDiT state dict, read from its shapes.

    Depth, widths, patch size, channels, input size, classes and MLP ratio are in the shapes; the head counts are not,
    so they are arguments (the paper: 16 for XL/2's encoder and for the decoder).

    Args:
        state_dict (`dict[str, torch.Tensor]`): The official parameters, with or without EDMPrecond's ``model.``.
        num_attention_heads (`int`, defaults to 16): Encoder heads.
        decoder_num_attention_heads (`int`, defaults to 16): Decoder heads.
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
    return {
        "sample_size": grid * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": out_features // (patch_size * patch_size),
        "num_layers": _num_blocks(state_dict, "blocks"),
        "num_attention_heads": num_attention_heads,
        "attention_head_dim": _check_heads(width, num_attention_heads, "num_attention_heads"),
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
    num_attention_heads: int = 16,
    decoder_num_attention_heads: int = MASKDIT_DECODER["decoder_num_attention_heads"],
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
    config = maskdit_config_from_state_dict(state_dict, num_attention_heads, decoder_num_attention_heads)
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


def load_vae(vae: str | os.PathLike, subfolder: str | None = None, config: str | None = None):
    """
    Load the autoencoder a pipeline decodes with.

    Args:
        vae (`str` or `os.PathLike`): A diffusers model folder or Hub id, or a single LDM-format file (such as the
            official ``autoencoder_kl.pth``), read through [`~diffusers.AutoencoderKL.from_single_file`] (safetensors
            or `weights_only=True`).
        subfolder (`str`, *optional*): The folder inside a Hub repo that holds the VAE (e.g. ``"vae"``).
        config (`str`, *optional*): For a single file: a diffusers config (Hub id or folder) describing it; without
            one diffusers infers the Stable Diffusion v1 autoencoder's config.
    """
    from diffusers import AutoencoderKL

    if os.path.isfile(vae):
        kwargs = {"config": config} if config else {}
        if subfolder:
            kwargs["subfolder"] = subfolder
        return AutoencoderKL.from_single_file(os.fspath(vae), **kwargs)
    if config:
        raise ValueError("config describes a single-file VAE; a folder or Hub id carries its own config")
    return AutoencoderKL.from_pretrained(vae, subfolder=subfolder)


def convert_maskdit_checkpoint(
    checkpoint: str | os.PathLike,
    vae=None,
    weights: str = "ema",
    num_attention_heads: int = 16,
    decoder_num_attention_heads: int = MASKDIT_DECODER["decoder_num_attention_heads"],
    id2label: dict[int, str] | None = None,
) -> MaskDiTPipeline:
    """
    Convert an official MaskDiT checkpoint (e.g. ``imagenet256-ckpt-best_with_guidance.pt``) into a pipeline.

    The pipeline computes what the official ``edm_sampler`` does: the same preconditioning and noise levels
    ([`maskdit_scheduler`]), guidance on the network output with the null class, and decoding by ``z / 0.18215``.

    Args:
        checkpoint (`str` or `os.PathLike`): The file (see [`load_checkpoint`]).
        vae ([`~diffusers.AutoencoderKL`], *optional*): The autoencoder to decode latents with (see [`load_vae`]);
            its latent space must be the Stable Diffusion one MaskDiT was trained in (4 channels, scale 0.18215).
        weights (`str`, defaults to `"ema"`): ``"ema"`` or ``"model"`` (see [`select_state_dict`]).
        num_attention_heads (`int`, defaults to 16): Encoder heads (not stored in the checkpoint).
        decoder_num_attention_heads (`int`, defaults to 16): Decoder heads (not stored in the checkpoint).
        id2label (`dict[int, str]`, *optional*): Class names; defaults to ImageNet's for a 1000-class model.
    """
    state_dict = select_state_dict(load_checkpoint(checkpoint), weights)
    transformer = convert_maskdit_state_dict(state_dict, num_attention_heads, decoder_num_attention_heads)
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


# ----------------------------------------------------------------------------------------------------------------
# Official MaskDM

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
        checkpoint: What [`load_checkpoint`] returned: the training checkpoint ``{step, model, opt, ema, scaler}``,
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
        checkpoint (`str` or `os.PathLike`): The file (see [`load_checkpoint`]).
        weights (`str`, defaults to `"ema"`): ``"ema"`` or ``"model"`` (the online weights, to fine-tune from).
        num_attention_heads (`int`, *optional*): Heads; defaults to width / 64 as in every official config.
    """
    parameters, buffers = split_maskdm_checkpoint(load_checkpoint(checkpoint), weights)
    transformer = convert_maskdm_state_dict(parameters, num_attention_heads)
    scheduler = MaskDMPipeline.default_scheduler(maskdm_beta_schedule(buffers))
    return MaskDMPipeline(transformer=transformer, scheduler=scheduler)


# ----------------------------------------------------------------------------------------------------------------
# diffusers' DiT

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
