"""What the diffusers-masked models share on top of diffusers' `ModelMixin`: strict loading, presets by name,
gradient checkpointing block by block, and the checks of `forward`'s inputs."""

from __future__ import annotations

import os

import torch
from diffusers.models.modeling_utils import ModelMixin


class StrictLoadingMixin(ModelMixin):
    """`from_pretrained` that refuses weights which do not fit the config, instead of diffusers' warning.

    diffusers leaves a parameter the file lacks uninitialised (on the meta device, so sampling crashes much later)
    and drops weights the config has no place for (a silently different model). Both mean the config and the weights
    were saved apart or edited by hand; the error names the keys so the user can tell which.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args, **kwargs):
        wants_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
        problems = []
        for kind, keys in (
            ("missing from the weights", info["missing_keys"]),
            ("not in the model", info["unexpected_keys"]),
        ):
            if keys:
                problems.append(
                    f"{len(keys)} parameters {kind}: {', '.join(sorted(keys)[:8])}{', ...' * (len(keys) > 8)}"
                )
        if problems:
            where = os.path.join(str(pretrained_model_name_or_path), kwargs.get("subfolder") or "")
            raise ValueError(
                f"the weights in {where} do not fit its config ({cls.__name__}): "
                + "; ".join(problems)
                + ". Was config.json edited, or saved from another model? Save the model again with save_pretrained."
            )
        return (model, info) if wants_info else model


def check_positive_ints(**values) -> None:
    """Refuse a config value that is not a positive `int` (a bool, float or string included), naming the argument.

    Raises:
        ValueError: naming the first such argument and its value.
    """
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


class MaskedTransformerMixin(StrictLoadingMixin):
    """The base of both masked transformers (with `ConfigMixin`): strict `from_pretrained`, presets by name
    (`preset_config` is the subclass's), gradient checkpointing per block and `forward`'s input checks."""

    @classmethod
    def preset_config(cls, name: str) -> dict:
        raise NotImplementedError

    @classmethod
    def from_preset(cls, name: str, **overrides):
        """Build a model from a preset name (see `preset_config`); any config argument can be overridden."""
        return cls(**{**cls.preset_config(name), **overrides})

    @classmethod
    def resolve_routes(cls, routes, num_layers: int):
        """Token routes (any form `diffusers_masked.routing.parse_routes` takes) resolved against a model of
        `num_layers` blocks, or a `ValueError` naming the route and the rule."""
        from ..routing import resolve_routes

        return resolve_routes(routes, num_layers)

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def _run_block(self, block: torch.nn.Module, *args) -> torch.Tensor:
        if torch.is_grad_enabled() and self.gradient_checkpointing:
            return self._gradient_checkpointing_func(block, *args)
        return block(*args)

    def _check_inputs(self, hidden_states, timestep, class_labels) -> tuple[torch.Tensor, torch.Tensor | None]:
        # Values are read in eval mode only: a training step must not make the host wait for the device.
        config = self.config
        return check_transformer_inputs(
            hidden_states,
            timestep,
            class_labels,
            config.in_channels,
            config.patch_size,
            config.num_classes,
            check_values=not self.training,
        )


def check_transformer_inputs(
    hidden_states,
    timestep,
    class_labels,
    in_channels: int,
    patch_size: int,
    num_classes: int,
    check_values: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Validate a masked transformer's `forward` inputs; return the timestep as a `(batch,)` tensor and the labels
    as `long` ids (or `None` for an unconditional model, `num_classes=0`).

    Shapes and dtypes are always checked (they cost nothing). The labels' range is checked only with
    `check_values`: reading values makes the host wait for the device, which a training step must not do at every
    forward (and which breaks `torch.compile` graphs)."""
    if not isinstance(hidden_states, torch.Tensor) or hidden_states.ndim != 4:
        raise ValueError(
            f"hidden_states must be a (batch, channels, height, width) tensor, got "
            f"{tuple(hidden_states.shape) if isinstance(hidden_states, torch.Tensor) else type(hidden_states)}"
        )
    batch, channels, height, width = hidden_states.shape
    if batch == 0:
        raise ValueError("hidden_states must hold at least one sample")
    if channels != in_channels:
        raise ValueError(f"hidden_states must have in_channels={in_channels} channels, got {channels}")
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"hidden_states height and width ({height}x{width}) must be divisible by patch_size={patch_size}"
        )

    timestep = torch.as_tensor(timestep, device=hidden_states.device)
    if timestep.ndim == 0:
        timestep = timestep.expand(batch)
    if timestep.shape != (batch,):
        raise ValueError(f"timestep must be a scalar or a ({batch},) tensor, got shape {tuple(timestep.shape)}")

    if num_classes == 0:
        if class_labels is not None:
            raise ValueError("class_labels were given to an unconditional model (num_classes=0)")
    else:
        if class_labels is None:
            raise ValueError(
                f"class_labels are required by this class-conditional model; use id {num_classes} "
                "for the null (unconditional) class"
            )
        class_labels = torch.as_tensor(class_labels, device=hidden_states.device)
        if class_labels.dtype.is_floating_point or class_labels.dtype == torch.bool:
            raise TypeError(f"class_labels must be integer ids, got dtype {class_labels.dtype}")
        if class_labels.shape != (batch,):
            raise ValueError(f"class_labels must have shape ({batch},), got {tuple(class_labels.shape)}")
        if check_values:
            low, high = torch.stack(torch.aminmax(class_labels.long())).tolist()
            if low < 0 or high > num_classes:
                raise ValueError(
                    f"class_labels must be in [0, {num_classes}] ({num_classes} = null class), got values in "
                    f"[{low}, {high}]"
                )
        class_labels = class_labels.long()
    return timestep, class_labels
