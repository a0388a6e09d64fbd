"""Weights from elsewhere into this package: the official MaskDiT and MaskDM checkpoints and diffusers' DiT.

* `convert_maskdit_checkpoint` (`conversion.maskdit`) turns a released MaskDiT ``.pt`` file into a `MaskDiTPipeline`
  that samples what the official EDM sampler samples; `convert_dit_transformer` turns a diffusers
  `DiTTransformer2DModel` into the encoder of a `MaskedDiTTransformer2DModel`.
* `convert_maskdm_checkpoint` (`conversion.maskdm`) turns an official MaskDM checkpoint into a `MaskDMPipeline` on the
  checkpoint's own noise schedule.

No file is unpickled with code: checkpoints are read by `diffusers_masked.utils.safe_loading.load_torch_file`
(safetensors, ``torch.load(weights_only=True)``, or, for training checkpoints that also pickle a config object, an
unpickler that rebuilds tensors and nothing else).
"""

from .common import WEIGHTS, imagenet_id2label, load_vae, select_state_dict
from .maskdit import (
    MASKDIT_VAE_SCALING_FACTOR,
    convert_dit_transformer,
    convert_maskdit_checkpoint,
    convert_maskdit_state_dict,
    maskdit_config_from_state_dict,
    maskdit_scheduler,
    recorded_model_type,
)
from .maskdm import (
    convert_maskdm_checkpoint,
    convert_maskdm_state_dict,
    maskdm_beta_schedule,
    maskdm_config_from_state_dict,
    split_maskdm_checkpoint,
)

__all__ = [
    "MASKDIT_VAE_SCALING_FACTOR",
    "WEIGHTS",
    "convert_dit_transformer",
    "convert_maskdit_checkpoint",
    "convert_maskdit_state_dict",
    "convert_maskdm_checkpoint",
    "convert_maskdm_state_dict",
    "imagenet_id2label",
    "load_vae",
    "maskdit_config_from_state_dict",
    "maskdit_scheduler",
    "maskdm_beta_schedule",
    "maskdm_config_from_state_dict",
    "recorded_model_type",
    "select_state_dict",
    "split_maskdm_checkpoint",
]
