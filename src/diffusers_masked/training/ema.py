"""The exponential moving average of the weights (diffusers' `EMAModel`), also when its shadow parameters are FSDP2
shards: saved without pickles, loaded with checks, swapped in for validation, exported as the final model.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager
from pathlib import Path

import torch

from ..utils.safe_loading import check_dcp_metadata, read_json, shape_mismatch

SHARDED_EMA_DIR = "ema_fsdp"
EMA_WEIGHTS_FILE = "ema.safetensors"
EMA_STATE_FILE = "ema_state.json"
_EMA_STATE_KEYS = (
    "decay",
    "min_decay",
    "optimization_step",
    "update_after_step",
    "use_ema_warmup",
    "inv_gamma",
    "power",
)


def make_ema(parameters, model_cls: type, model_config, decay: float, warmup: bool):
    """diffusers' `EMAModel` of `parameters` (the model's own, or its FSDP shards), with the model's class and
    config (what `EMAModel.save_pretrained` would need)."""
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=decay, use_ema_warmup=warmup, model_cls=model_cls, model_config=model_config)


def save_ema(ema, folder: str | os.PathLike) -> None:
    """`EMAModel`'s state without pickles: shadow parameters in ``ema.safetensors``, the rest in ``ema_state.json``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    state = ema.state_dict()
    shadows = {f"shadow_{i}": t.detach().to("cpu").contiguous() for i, t in enumerate(state.pop("shadow_params"))}
    save_file(shadows, str(folder / EMA_WEIGHTS_FILE))
    (folder / EMA_STATE_FILE).write_text(json.dumps({key: state[key] for key in _EMA_STATE_KEYS}))


def load_ema(ema, folder: str | os.PathLike) -> None:
    """Load `save_ema`'s files into `ema`, checking that they hold one tensor of the right shape per parameter."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights = load_file(str(folder / EMA_WEIGHTS_FILE))
    expected = {f"shadow_{i}": tuple(t.shape) for i, t in enumerate(ema.shadow_params)}
    found = {key: tuple(t.shape) for key, t in weights.items()}
    if found != expected:
        raise ValueError(f"{folder / EMA_WEIGHTS_FILE} does not fit the model: {shape_mismatch(expected, found)}")
    with torch.no_grad():
        for i, shadow in enumerate(ema.shadow_params):
            shadow.copy_(weights[f"shadow_{i}"])
    _set_ema_state(ema, folder / EMA_STATE_FILE)


def _is_int(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# What each recorded EMA setting must be, checked as strictly as the command line checks its flags.
_EMA_STATE_RULES = {
    "decay": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "min_decay": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]"),
    "optimization_step": (_is_int, "an int >= 0"),
    "update_after_step": (_is_int, "an int >= 0"),
    "use_ema_warmup": (lambda v: isinstance(v, bool), "true or false"),
    "inv_gamma": (lambda v: _is_number(v) and v > 0, "a number > 0"),
    "power": (lambda v: _is_number(v) and v > 0, "a number > 0"),
}


def _set_ema_state(ema, path: Path) -> None:
    state = read_json(path)
    if not isinstance(state, dict):
        raise ValueError(f"{path} must be a JSON object of the EMA's settings")
    missing = [key for key in _EMA_STATE_KEYS if key not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}")
    bad = [
        f"{key} must be {rule[1]}, got {state[key]!r}"
        for key, rule in _EMA_STATE_RULES.items()
        if not rule[0](state[key])
    ]
    if bad:
        raise ValueError(f"{path} holds invalid EMA settings: {'; '.join(bad)}")
    for key in _EMA_STATE_KEYS:
        setattr(ema, key, state[key])


def save_sharded_ema(accelerator, ema, folder: str | os.PathLike) -> None:
    """An EMA whose shadow parameters are FSDP shards: every rank writes its own with torch.distributed.checkpoint
    (accelerate's custom-object checkpointing writes from the main process only)."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    state = ema.state_dict()
    shadows = {f"shadow_{i}": tensor for i, tensor in enumerate(state.pop("shadow_params"))}
    dcp.save(shadows, checkpoint_id=str(folder / SHARDED_EMA_DIR))
    if accelerator.is_main_process:
        (folder / SHARDED_EMA_DIR / EMA_STATE_FILE).write_text(
            json.dumps({key: state[key] for key in _EMA_STATE_KEYS})
        )


def load_sharded_ema(ema, folder: str | os.PathLike) -> None:
    """Load `save_sharded_ema`'s files into `ema`, whose shadow parameters are sharded like the saved ones."""
    import torch.distributed.checkpoint as dcp

    folder = Path(folder)
    if not (folder / SHARDED_EMA_DIR).is_dir():
        raise ValueError(f"{folder} has no sharded EMA ({SHARDED_EMA_DIR}/): it was not saved by an FSDP run with EMA")
    check_dcp_metadata(folder / SHARDED_EMA_DIR / ".metadata")
    shadows = {f"shadow_{i}": tensor for i, tensor in enumerate(ema.shadow_params)}
    dcp.load(shadows, checkpoint_id=str(folder / SHARDED_EMA_DIR))
    _set_ema_state(ema, folder / SHARDED_EMA_DIR / EMA_STATE_FILE)


@contextmanager
def ema_weights(ema, model: torch.nn.Module, sharded: bool = False):
    """Within the block, `model` holds the EMA weights and is in eval mode; afterwards its own weights and train
    mode are back. With ``ema=None`` the model's own weights are used.

    Args:
        ema (`EMAModel`, *optional*): the moving average of `model`'s parameters.
        model (`torch.nn.Module`): the (unwrapped) model being trained.
        sharded (`bool`, defaults to `False`): the parameters are FSDP shards. `EMAModel.store` would move them to
            the CPU and back; a copy on the rank's device costs 1/N of the model.
    """
    parameters = list(model.parameters())
    stored = None
    if ema is not None:
        if sharded:
            stored = [p.detach().clone() for p in parameters]
        else:
            ema.store(parameters)
        ema.copy_to(parameters)
    model.eval()
    try:
        yield model
    finally:
        if stored is not None:
            with torch.no_grad():
                for parameter, saved in zip(parameters, stored):
                    parameter.copy_(saved)
        elif ema is not None:
            ema.restore(parameters)
        model.train()


def export_ema_model(accelerator, model, ema, model_cls, sharded_ema=None, return_online=False):
    """The final model with the EMA weights (or the raw ones without EMA), in eval mode, on the main process;
    `None` on the others. Every rank calls this: under FSDP it gathers the shards (collectives).

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator.
        model (`torch.nn.Module`): the prepared model.
        ema (`EMAModel`, *optional*): its moving average.
        model_cls (`type`): the model's class; the export is ``model_cls.from_config(config)``.
        sharded_ema (`EMAModel`, *optional*): `ema` when its shadow parameters are FSDP shards.
        return_online (`bool`, defaults to `False`): return ``(ema_model, online_model)``, the second with the
            trained weights themselves (what a following fine-tuning starts from); ``(None, None)`` off the main
            process.
    """
    state_dict = accelerator.get_state_dict(model)
    if sharded_ema is not None:
        sharded_ema.shadow_params = [shadow.full_tensor() for shadow in sharded_ema.shadow_params]
    if not accelerator.is_main_process:
        return (None, None) if return_online else None
    final_model = model_cls.from_config(accelerator.unwrap_model(model).config)
    final_model.load_state_dict(state_dict)
    online = None
    if return_online:
        online = model_cls.from_config(final_model.config)
        online.load_state_dict(state_dict)
        online.eval()
    if ema is not None:
        ema.copy_to(final_model.parameters())
    return (final_model.eval(), online) if return_online else final_model.eval()
