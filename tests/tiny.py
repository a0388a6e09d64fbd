"""Tiny random components shared by the tests (offline, fast on a CPU)."""

import torch
from diffusers import AutoencoderKL

from diffusers_masked import MaskedDiTTransformer2DModel, MaskedUViTTransformer2DModel

TINY_TRANSFORMER = dict(
    sample_size=8,
    patch_size=2,
    in_channels=3,
    num_layers=2,
    num_attention_heads=2,
    attention_head_dim=8,
    decoder_num_layers=1,
    decoder_num_attention_heads=2,
    decoder_attention_head_dim=8,
    num_classes=10,
)


TINY_UVIT = dict(
    sample_size=8,
    patch_size=2,
    in_channels=3,
    num_layers=5,
    num_attention_heads=2,
    attention_head_dim=8,
    num_classes=10,
)


# Calls that both tiny transformers (3x8x8 inputs, patch 2, 10 classes) must refuse with a ValueError matching the
# second entry: each is `(call(model), match)`.
BAD_TRANSFORMER_INPUTS = [
    (lambda m: m(torch.randn(2, 3, 7, 8), torch.zeros(2), torch.tensor([0, 1])), "divisible by patch_size"),
    (lambda m: m(torch.randn(2, 4, 8, 8), torch.zeros(2), torch.tensor([0, 1])), "in_channels"),
    (lambda m: m(torch.randn(2, 3, 8, 8), torch.zeros(2), torch.tensor([0, 11])), "class_labels"),
    (lambda m: m(torch.randn(2, 3, 8, 8), torch.zeros(2), torch.tensor([-1, 1])), "class_labels"),
    (lambda m: m(torch.randn(2, 3, 8, 8), torch.zeros(2)), "class_labels are required"),
    (lambda m: m(torch.randn(2, 3, 8, 8), torch.zeros(3), torch.tensor([0, 1])), "timestep"),
    (
        lambda m: m(
            torch.randn(2, 3, 8, 8), torch.zeros(2), torch.tensor([0, 1]), mask=torch.zeros(2, 15, dtype=torch.bool)
        ),
        "mask must have shape",
    ),
    (
        lambda m: m(
            torch.randn(2, 3, 8, 8),
            torch.zeros(2),
            torch.tensor([0, 1]),
            mask=torch.tensor([[True] * 2 + [False] * 14, [True] * 3 + [False] * 13]),
        ),
        "same number",
    ),
]


def _perturbed(model, scale: float, seed: int | None):
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_transformer(scale: float = 0.2, seed: int | None = None, **overrides) -> MaskedDiTTransformer2DModel:
    """A tiny MaskDiT with every parameter given a random value of size `scale` (adaLN-Zero would otherwise make a
    fresh model predict zeros everywhere). `seed` makes the values independent of torch's global generator."""
    return _perturbed(MaskedDiTTransformer2DModel(**{**TINY_TRANSFORMER, **overrides}), scale, seed)


def tiny_uvit(scale: float = 0.2, seed: int | None = None, **overrides) -> MaskedUViTTransformer2DModel:
    """A tiny MaskDM U-ViT (two in-blocks, a mid-block, two out-blocks) with every parameter moved by a random value
    of size `scale`,
    so that zero biases and unit LayerNorm gains do not hide a wrong term."""
    return _perturbed(MaskedUViTTransformer2DModel(**{**TINY_UVIT, **overrides}), scale, seed)


def tiny_vae(num_blocks: int = 2, seed: int = 0) -> AutoencoderKL:
    """A random AutoencoderKL: 3 channels in and out, 4 latent channels, downsampling by 2**(num_blocks - 1)."""
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=(8,) * num_blocks,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=16,
        layers_per_block=1,
    ).eval()
