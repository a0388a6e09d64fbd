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


def configure_model(
    model, *, gradient_checkpointing: bool = False, attention_backend: str | None = None, torch_compile: bool = False
):
    """The model's training options, before `accelerator.prepare`: gradient checkpointing, a diffusers attention
    backend (`set_attention_backend`, e.g. ``"flash"``) and regional compilation of its repeated blocks
    (`compile_repeated_blocks`, one compiled graph for all blocks of a kind). Returns the model."""
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if attention_backend:
        model.set_attention_backend(attention_backend)
    if torch_compile:
        model.compile_repeated_blocks()
    return model


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
