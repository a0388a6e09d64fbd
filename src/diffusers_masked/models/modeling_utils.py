"""What the diffusers-masked models share on top of diffusers' `ModelMixin`."""

from __future__ import annotations

import os

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
