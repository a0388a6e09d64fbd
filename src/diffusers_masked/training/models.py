"""The model a run trains: where it starts (a config, or saved weights: a run's online weights, a checkpoint, a
pipeline) and how it executes (gradient checkpointing, attention backend, regional compilation); then the optimizer
and the EMA, prepared by accelerate.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..utils.safe_loading import load_safetensors, shape_mismatch
from .checkpoints import TRAINING_STATE_FILE, read_training_state
from .ema import make_ema

ONLINE_DIR = "online"


def start_model_config(path: str | os.PathLike, model_cls) -> dict:
    """The config of the model `load_start_model` loads from `path`, without loading weights."""
    kind, location = _start_model_source(path)
    if kind == "checkpoint":
        return dict(read_training_state(location)["model_config"])
    return dict(model_cls.load_config(location[0], subfolder=location[1]))


def model_num_classes(model_cls, start=None, config: dict | None = None, requested: int | None = None) -> int | None:
    """The classes the trained model has: `requested` (``--num_classes``), else those of the start weights' config or
    of `config` (`None` where neither says: the data's then).

    Raises:
        ValueError: if `requested` contradicts the model's.
    """
    found = (start_model_config(start, model_cls) if start else (config or {})).get("num_classes")
    if requested is not None and found is not None and requested != found:
        raise ValueError(f"--num_classes {requested} contradicts the model config's num_classes={found}")
    return requested if requested is not None else found


def _start_model_source(path):
    folder = Path(path)
    if (folder / ONLINE_DIR / "config.json").is_file():
        return "saved", (str(folder / ONLINE_DIR), None)
    if (folder / TRAINING_STATE_FILE).is_file():
        return "checkpoint", folder
    return "saved", (str(path), "transformer" if (folder / "transformer").is_dir() else None)


def load_start_model(path: str | os.PathLike, model_cls):
    """The model a run starts from, with the *trained* (online) weights where there are both.

    `path` is one of: a training output folder that saved its online weights (``online/``, as
    `publish_run` writes them), a ``checkpoint-N`` folder (its ``model.safetensors`` and recorded model config;
    a sharded FSDP checkpoint is refused: use its run's output folder), or a saved model or pipeline folder or Hub
    id (its ``transformer`` subfolder if it has one).

    Raises:
        ValueError: for a sharded checkpoint, or one whose weights do not fit its recorded config.
    """
    kind, location = _start_model_source(path)
    if kind == "saved":
        return model_cls.from_pretrained(location[0], subfolder=location[1])
    weights = location / "model.safetensors"
    if not weights.is_file():
        raise ValueError(
            f"{location} holds no model.safetensors (a sharded FSDP checkpoint?); start from its run's output folder, "
            f"which holds the gathered online weights in {ONLINE_DIR}/"
        )
    model = model_cls.from_config(read_training_state(location)["model_config"])
    state_dict, _ = load_safetensors(weights)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    if found != expected:
        raise ValueError(f"{weights} does not fit the checkpoint's model config: {shape_mismatch(expected, found)}")
    model.load_state_dict(state_dict)
    return model


def reseed_for_init() -> None:
    """Rewind torch's global generator to the run's seed (the one `setup_accelerator` set) before a new model's
    initialisation, so that the initial weights depend on the seed only: what ran before, e.g. a first run's latent
    extraction, which a run with the cache in place skips, draws nothing from them."""
    torch.manual_seed(torch.initial_seed())


def build_model(model_cls, data, *, start=None, config: dict | None = None, preset: bool = False):
    """The model a run trains, checked to fit its data: `start`'s weights (`load_start_model`), or a new `model_cls`
    from `config`, with the data's ``sample_size``, ``in_channels`` and ``num_classes`` filled in where the config
    leaves them out (and always for a `preset`, which names a size of model, not of data).

    Raises:
        ValueError: naming what the model has and what the data is.
    """
    if start is not None:
        model = load_start_model(start, model_cls)
    else:
        shape = {"sample_size": data.sample_size, "in_channels": data.in_channels, "num_classes": data.num_classes}
        reseed_for_init()
        model = model_cls(**({**config, **shape} if preset else {**shape, **config}))
    config = model.config
    size = config.sample_size if isinstance(config.sample_size, int) else tuple(config.sample_size)
    if size in ((data.sample_size,) * 2,):
        size = data.sample_size
    if (size, config.in_channels, config.num_classes) != (data.sample_size, data.in_channels, data.num_classes):
        raise ValueError(
            f"the model has sample_size={size}, in_channels={config.in_channels}, num_classes={config.num_classes} "
            f"but the data is {data.in_channels}x{data.sample_size}x{data.sample_size} with {data.num_classes} "
            "classes (0: unconditional): pass a --model_config or start weights that fit it"
        )
    return model


# diffusers' DiTPipeline samples with the null class id 1000 (ImageNet's label count), whatever the model's classes.
DIT_NULL_CLASS = 1000


def dit_preset_config(name: str) -> dict:
    """diffusers' `DiTTransformer2DModel` config of a DiT size (``"S/2"``, ``"B/4"``, ``"XL/2"``, ...): DiT's depth,
    heads and width (Peebles & Xie 2023, Table 1), noise prediction only (`out_channels` = `in_channels`, filled in
    by `build_dit`) and `DiTPipeline`'s 1000-class label table."""
    from ..models.masked_dit import DIT_ENCODER_SIZES, MaskedDiTTransformer2DModel

    MaskedDiTTransformer2DModel._check_preset(name)
    size, _, patch = name.partition("/")
    num_layers, width, heads = DIT_ENCODER_SIZES[size]
    return {
        "num_layers": num_layers,
        "num_attention_heads": heads,
        "attention_head_dim": width // heads,
        "patch_size": int(patch),
        "num_embeds_ada_norm": DIT_NULL_CLASS,
    }


def build_dit(data, *, start=None, config: dict | None = None):
    """A diffusers `DiTTransformer2DModel` for `data` (latents): `start`'s weights (`load_start_model`) or a new one
    from `config`, with the data's `sample_size` and `in_channels` and ``out_channels = in_channels`` filled in where
    the config leaves them out. The label embedders' own dropout is switched off (`disable_label_dropout`).

    Raises:
        ValueError: a model that does not fit the data (size, channels, a noise-only output, the 1000-class table
            `DiTPipeline` samples with, more classes than the table).
    """
    from diffusers import DiTTransformer2DModel

    if start is not None:
        model = load_start_model(start, DiTTransformer2DModel)
    else:
        config = {"sample_size": data.sample_size, "in_channels": data.in_channels, **(config or {})}
        config.setdefault("out_channels", config["in_channels"])
        config.setdefault("num_embeds_ada_norm", DIT_NULL_CLASS)
        reseed_for_init()
        model = DiTTransformer2DModel(**config)
    c = model.config
    problems = []
    if (c.sample_size, c.in_channels) != (data.sample_size, data.in_channels):
        problems.append(
            f"it takes {c.in_channels}x{c.sample_size}x{c.sample_size} inputs, the data is "
            f"{data.in_channels}x{data.sample_size}x{data.sample_size}"
        )
    if c.out_channels != c.in_channels:
        problems.append(
            f"out_channels={c.out_channels}: this script trains noise prediction only (out_channels = in_channels); "
            "DiT's learned variance (out_channels = 2 x in_channels) needs its VLB term, which it does not implement"
        )
    if c.num_embeds_ada_norm != DIT_NULL_CLASS:
        problems.append(
            f"num_embeds_ada_norm={c.num_embeds_ada_norm}: DiTPipeline samples with the null class {DIT_NULL_CLASS}, "
            f"so the label table must have {DIT_NULL_CLASS} classes (unused rows cost nothing)"
        )
    if not 1 <= data.num_classes <= DIT_NULL_CLASS:
        problems.append(f"the data has {data.num_classes} classes; DiT is class-conditional with at most 1000")
    if problems:
        raise ValueError("the DiT does not fit the data: " + "; ".join(problems))
    return disable_label_dropout(model)


def disable_label_dropout(model):
    """Switch off the label dropout of every diffusers `LabelEmbedding` in `model` (a stock DiT has one per block,
    each dropping labels on its own in train mode, so blocks would see different labels); the trainer drops labels
    once, with `drop_class_labels`. The tables keep their null row, and the setting is not saved: a loaded model
    drops again in train mode. Returns the model."""
    from diffusers.models.embeddings import LabelEmbedding

    for module in model.modules():
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def configure_model(
    model, *, gradient_checkpointing: bool = False, attention_backend: str | None = None, torch_compile: bool = False
):
    """The model's training options, before `accelerator.prepare`: gradient checkpointing, a diffusers attention
    backend (`set_attention_backend`, e.g. ``"flash"``) and regional compilation of its repeated blocks
    (`compile_repeated_blocks`, one compiled graph for all blocks of a kind). Returns the model.

    diffusers' `DiTTransformer2DModel` and `PixArtTransformer2DModel` name no repeated blocks and compute attention
    with `AttnProcessor2_0` (torch's SDPA), not the dispatcher that `set_attention_backend` configures: for them an
    attention backend is refused (diffusers would silently ignore it), and compilation compiles the ``forward`` of
    each block in `transformer_blocks`, leaving the modules' hooks, and so [`token_routing`], in eager Python.

    Raises:
        ValueError: an attention backend for a model whose attention does not go through diffusers' dispatcher.
    """
    if attention_backend and not _uses_attention_dispatcher(model):
        raise ValueError(
            f"--attention_backend {attention_backend}: {type(model).__name__} computes attention with diffusers' "
            "AttnProcessor2_0 (torch's scaled_dot_product_attention), not the attention dispatcher that "
            "set_attention_backend configures, so the backend would be silently ignored; leave it unset"
        )
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if attention_backend:
        model.set_attention_backend(attention_backend)
    if torch_compile:
        if model._repeated_blocks:
            model.compile_repeated_blocks()
        else:
            for block in model.transformer_blocks:
                block.forward = torch.compile(block.forward)
    return model


def _uses_attention_dispatcher(model) -> bool:
    from diffusers.models.attention import AttentionModuleMixin

    return any(isinstance(module, AttentionModuleMixin) for module in model.modules())


def prepare_training(
    accelerator,
    model,
    sharded: bool,
    *,
    learning_rate: float,
    adam_betas: tuple[float, float] = (0.9, 0.999),
    adam_weight_decay: float = 0.0,
    adam_epsilon: float = 1e-8,
    adam_fused: bool = True,
    use_ema: bool = True,
    ema_decay: float = 0.9999,
    ema_warmup: bool = False,
):
    """AdamW and diffusers' `EMAModel` for `model`, prepared by `accelerator`.

    Unsharded, the EMA averages the model's own parameters; under FSDP each rank keeps the average of its own shards
    (the shadow parameters are sharded like the prepared model's), saved and loaded with
    `torch.distributed.checkpoint` beside accelerate's state. The learning rate is set from the phases before every
    step (`train_phases`), so the checkpoint needs no scheduler object.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        model (`torch.nn.Module`): the model, not yet prepared.
        sharded (`bool`): the run is FSDP (`setup_accelerator`).
        learning_rate (`float`): AdamW's initial learning rate.
        adam_betas, adam_weight_decay, adam_epsilon: AdamW's.
        adam_fused (`bool`, defaults to `True`): torch's fused AdamW kernel.
        use_ema (`bool`, defaults to `True`): keep an EMA.
        ema_decay (`float`, defaults to 0.9999), ema_warmup (`bool`, defaults to `False`): `EMAModel`'s `decay` and
            `use_ema_warmup`.

    Returns:
        `tuple`: ``(model, optimizer, ema)``, the first two prepared; `ema` is `None` without EMA.
    """
    # The class and config before `prepare`, which may wrap the model (DDP) or change its class (FSDP2).
    model_cls, model_config = type(model), model.config
    ema = (
        make_ema(model.parameters(), model_cls, model_config, ema_decay, ema_warmup)
        if use_ema and not sharded
        else None
    )
    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=learning_rate,
        betas=adam_betas,
        weight_decay=adam_weight_decay,
        eps=adam_epsilon,
        fused=adam_fused or None,
    )
    model, optimizer = accelerator.prepare(model, optimizer)
    if use_ema and sharded:
        ema = make_ema(model.parameters(), model_cls, model_config, ema_decay, ema_warmup)
    if ema is not None:
        ema.to(accelerator.device)
    return model, optimizer, ema
