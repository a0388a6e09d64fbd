"""diffusers-masked: masked training (MaskDiT, MaskDM) for diffusion transformers in the diffusers family.

Public names are imported lazily, so ``import diffusers_masked`` stays cheap and the training-only
dependencies (datasets, torchmetrics, ...) are only needed by the parts that use them.
"""

import importlib
from typing import TYPE_CHECKING

from .version import __version__

_LAZY = {
    "masking": [
        "random_mask",
        "block_mask",
        "crop_mask",
        "generate_mask",
        "patchify",
        "unpatchify",
        "ConstantMaskSchedule",
        "CosinePowerMaskSchedule",
        "LinearMaskSchedule",
        "StagedMaskSchedule",
        "mask_schedule_from_dict",
        "parse_mask_schedule",
    ],
    "routing": ["Route", "parse_routes", "token_routing"],
    "models.masked_dit": ["MaskedDiTTransformer2DModel", "MaskedDiTTransformer2DModelOutput"],
    "models.masked_uvit": ["MaskedUViTTransformer2DModel", "MaskedUViTTransformer2DModelOutput"],
    "schedulers.masked_training": [
        "MaskedTrainingMixin",
        "MaskedTrainingOutput",
        "MaskedDDPMScheduler",
        "drop_class_labels",
    ],
    "schedulers.scheduling_edm_heun": ["EDMHeunScheduler"],
    "pipelines.pipeline_maskdit": ["MaskDiTPipeline"],
    "pipelines.pipeline_maskdm": ["MaskDMPipeline"],
}

_NAME_TO_MODULE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["__version__", *_NAME_TO_MODULE]


def __getattr__(name):
    if name in _NAME_TO_MODULE:
        module = importlib.import_module(f".{_NAME_TO_MODULE[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(__all__)


if TYPE_CHECKING:
    from .masking import (  # noqa: F401
        ConstantMaskSchedule,
        CosinePowerMaskSchedule,
        LinearMaskSchedule,
        StagedMaskSchedule,
        block_mask,
        crop_mask,
        generate_mask,
        mask_schedule_from_dict,
        parse_mask_schedule,
        patchify,
        random_mask,
        unpatchify,
    )
    from .models.masked_dit import MaskedDiTTransformer2DModel, MaskedDiTTransformer2DModelOutput  # noqa: F401
    from .models.masked_uvit import MaskedUViTTransformer2DModel, MaskedUViTTransformer2DModelOutput  # noqa: F401
    from .pipelines.pipeline_maskdit import MaskDiTPipeline  # noqa: F401
    from .pipelines.pipeline_maskdm import MaskDMPipeline  # noqa: F401
    from .routing import Route, parse_routes, token_routing  # noqa: F401
    from .schedulers.masked_training import (  # noqa: F401
        MaskedDDPMScheduler,
        MaskedTrainingMixin,
        MaskedTrainingOutput,
        drop_class_labels,
    )
    from .schedulers.scheduling_edm_heun import EDMHeunScheduler  # noqa: F401
