"""MaskedUViTTransformer2DModel: the U-ViT that MaskDM (Lei et al. 2023) trains on masked pixel patches.

U-ViT (Bao et al. 2023) treats everything as a token: the timestep (and the class label) join the patch tokens, all
tokens get learned positions, and pre-LN transformer blocks run as in-blocks, one mid-block and out-blocks, each
out-block taking an in-block's output through a long skip. MaskDM removes masked patch tokens after positions are
added, so the blocks compute only the visible ones; the extra (time, label) tokens are always kept.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from ..masking import check_mask, unpatchify, visible_token_ids
from ..routing import plan_routes, resolve_routes, routing_active
from .attention import SelfAttention, gather_tokens, scatter_tokens
from .masked_dit import MaskedDiTTransformer2DModelOutput
from .modeling_utils import MaskedTransformerMixin, check_positive_ints

# MaskDM's sizes (its configs: width 512, 8 heads at 64 px; 768, 12 heads at 256 px; patch 4). Both have 13 blocks:
# the official `encoder_depth` (13 for S, 12 for B) builds depth // 2 in-blocks, a mid-block and depth // 2 out-blocks.
MASKDM_SIZES = {
    "MaskDM-S": {"sample_size": 64, "num_layers": 13, "num_attention_heads": 8, "attention_head_dim": 64},
    "MaskDM-B": {"sample_size": 256, "num_layers": 13, "num_attention_heads": 12, "attention_head_dim": 64},
}
MASKDM_PATCH_SIZE = 4

# The official initialisation: truncated normal with std 0.02 (bounds +-2 in absolute value, as timm's), zero biases.
INIT_STD = 0.02


@dataclass
class MaskedUViTTransformer2DModelOutput(MaskedDiTTransformer2DModelOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch, out_channels, height, width)`):
            The prediction for every pixel; zeros at removed tokens' pixels.
        mask (`torch.BoolTensor` of shape `(batch, num_tokens)` or `None`):
            The token mask used (`True` = removed), or `None` when every token was visible.
    """


class UViTBlock(nn.Module):
    """A pre-LN transformer block (LayerNorm, bias-free-qkv attention, LayerNorm, exact-GELU MLP, both residual).

    An out-block (``skip=True``) first merges its long skip: ``Linear(2 * dim -> dim)`` on ``concat([x, skip])``."""

    def __init__(self, dim: int, num_heads: int, head_dim: int, mlp_ratio: float, norm_eps: float, skip: bool = False):
        super().__init__()
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = SelfAttention(dim, num_heads, head_dim, bias=False)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.ff = FeedForward(dim, inner_dim=int(dim * mlp_ratio), activation_fn="gelu", bias=True)

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None = None) -> torch.Tensor:
        # x, skip: [B, L, D]
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        return x + self.ff(self.norm2(x))


def _check_sample_size(sample_size) -> tuple[int, int]:
    if isinstance(sample_size, int) and not isinstance(sample_size, bool):
        sample_size = (sample_size, sample_size)
    if (
        not isinstance(sample_size, (tuple, list))
        or len(sample_size) != 2
        or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sample_size)
    ):
        raise ValueError(f"sample_size must be a positive int or a (height, width) pair of them, got {sample_size!r}")
    return int(sample_size[0]), int(sample_size[1])


class MaskedUViTTransformer2DModel(MaskedTransformerMixin, ConfigMixin):
    r"""
    The MaskDM transformer: a U-ViT over [label, time, patch] tokens with long skips, which given a token mask
    computes only the visible patch tokens.

    Parameters:
        sample_size (`int` or `(int, int)`, defaults to 64): Height and width of the input. The positions are learned
            for this grid, so inputs must have this size.
        patch_size (`int`, defaults to 4): Side of the square patches that become tokens.
        in_channels (`int`, defaults to 3): Channels of the input.
        out_channels (`int`, *optional*): Channels of the output; defaults to `in_channels`.
        num_layers (`int`, defaults to 13): Number of transformer blocks, odd: `num_layers // 2` in-blocks, one
            mid-block, `num_layers // 2` out-blocks. The official `encoder_depth` `d` gives `2 * (d // 2) + 1`.
        num_attention_heads (`int`, defaults to 8): Attention heads.
        attention_head_dim (`int`, defaults to 64): Head width; the model is `num_attention_heads *
            attention_head_dim` wide.
        num_classes (`int`, defaults to 0): Number of classes; 0 makes the model unconditional (no label token). The
            label table has `num_classes + 1` rows; id `num_classes` is the null class for classifier-free guidance.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width over block width.
        norm_eps (`float`, defaults to 1e-5): LayerNorm epsilon.
        time_embedding_mlp (`bool`, defaults to `False`): Pass the sinusoidal timestep features through
            `Linear(D, 4D) -> SiLU -> Linear(4D, D)` before they become the time token (off in every MaskDM config).
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]
    _no_split_modules = ["UViTBlock"]
    # What diffusers' regional compilation (`compile_repeated_blocks`) compiles.
    _repeated_blocks = ["UViTBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 64,
        patch_size: int = 4,
        in_channels: int = 3,
        out_channels: int | None = None,
        num_layers: int = 13,
        num_attention_heads: int = 8,
        attention_head_dim: int = 64,
        num_classes: int = 0,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
        time_embedding_mlp: bool = False,
    ):
        super().__init__()
        height, width = _check_sample_size(sample_size)
        check_positive_ints(
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
        )
        if height % patch_size or width % patch_size:
            raise ValueError(f"sample_size={sample_size} must be divisible by patch_size={patch_size}")
        if num_layers % 2 == 0:
            raise ValueError(
                f"num_layers must be odd (num_layers // 2 in-blocks, a mid-block, num_layers // 2 out-blocks), got "
                f"{num_layers}; MaskDM's encoder_depth 12 or 13 is num_layers=13"
            )
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an int >= 0 (0 = unconditional), got {num_classes!r}")
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.grid_size = (height // patch_size, width // patch_size)
        self.num_extra_tokens = 2 if num_classes > 0 else 1  # [label,] time
        self.gradient_checkpointing = False

        # Tokens: [label, time, patches], with a learned position for each.
        self.patch_embed = nn.Conv2d(in_channels, self.inner_dim, kernel_size=patch_size, stride=patch_size)
        # MaskDM's time features: cos first, no frequency shift, max period 10000, of the raw step.
        self.time_proj = Timesteps(self.inner_dim, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = (
            TimestepEmbedding(self.inner_dim, 4 * self.inner_dim, out_dim=self.inner_dim)
            if time_embedding_mlp
            else None
        )
        self.class_embedder = nn.Embedding(num_classes + 1, self.inner_dim) if num_classes > 0 else None
        num_positions = self.num_extra_tokens + self.grid_size[0] * self.grid_size[1]
        self.pos_embed = nn.Parameter(torch.zeros(1, num_positions, self.inner_dim))

        block_args = (self.inner_dim, num_attention_heads, attention_head_dim, mlp_ratio, norm_eps)
        self.in_blocks = nn.ModuleList([UViTBlock(*block_args) for _ in range(num_layers // 2)])
        self.mid_block = UViTBlock(*block_args)
        self.out_blocks = nn.ModuleList([UViTBlock(*block_args, skip=True) for _ in range(num_layers // 2)])

        self.norm_out = nn.LayerNorm(self.inner_dim, eps=norm_eps)
        self.proj_out = nn.Linear(self.inner_dim, patch_size * patch_size * self.out_channels)
        self._initialize_weights()

    def _initialize_weights(self):
        # As MaskDM: every Linear trunc-normal(0.02) with zero bias, LayerNorms (1, 0), positions trunc-normal(0.02);
        # the patch convolution keeps PyTorch's default, and the label rows nn.Embedding's N(0, 1), while the null
        # row starts like the official code's separate unconditional embedding.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=INIT_STD)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.trunc_normal_(self.pos_embed, std=INIT_STD)
        if self.class_embedder is not None:
            with torch.no_grad():
                nn.init.trunc_normal_(self.class_embedder.weight[-1], std=INIT_STD)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> MaskedUViTTransformer2DModel:
        """Build a model from a MaskDM size, `"MaskDM-S"` (512 wide, 8 heads, 64 px) or `"MaskDM-B"` (768 wide, 12
        heads, 256 px), both 13 blocks with patch 4; any config argument can be overridden::

            MaskedUViTTransformer2DModel.from_preset("MaskDM-B", sample_size=128, num_classes=1000)
        """
        return super().from_preset(name, **overrides)

    @classmethod
    def preset_config(cls, name: str) -> dict:
        """The config dict of a preset (see [`~MaskedUViTTransformer2DModel.from_preset`])."""
        if name not in MASKDM_SIZES:
            raise ValueError(f"preset name must be one of {list(MASKDM_SIZES)}, got {name!r}")
        return {**MASKDM_SIZES[name], "patch_size": MASKDM_PATCH_SIZE}

    @classmethod
    def resolve_routes(cls, routes, num_layers: int):
        """`routes` resolved against `num_layers` blocks (in-blocks, mid-block, out-blocks), refusing a route that
        splits a long skip (its in-block's output would be shorter or longer than its out-block's input)."""
        resolved = resolve_routes(routes, num_layers)
        for route in resolved:
            if route.start_layer_idx + route.end_layer_idx != num_layers - 1:
                raise ValueError(
                    f"route {route._describe()} splits a long skip of this U-ViT ({num_layers} blocks: in-block i "
                    f"feeds out-block {num_layers - 1} - i); a route must be symmetric about the mid-block "
                    f"{num_layers // 2}: start_layer_idx + end_layer_idx == {num_layers - 1}"
                )
        return resolved

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor | float | int,
        class_labels: torch.LongTensor | None = None,
        mask: torch.BoolTensor | None = None,
        return_dict: bool = True,
        num_masked: int | None = None,
        routes=None,
        route_ids: tuple[torch.Tensor, ...] | None = None,
    ) -> MaskedUViTTransformer2DModelOutput | tuple:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, in_channels, height, width)`): The noisy input, at the
                config's `sample_size`.
            timestep (`torch.Tensor` of shape `(batch,)`, or a scalar): The raw DDPM step (0 ... T - 1); fractional
                values work too.
            class_labels (`torch.LongTensor` of shape `(batch,)`, *optional*): Class ids in `[0, num_classes]`,
                `num_classes` being the null class. Required iff `num_classes > 0`.
            mask (`torch.BoolTensor` of shape `(batch, num_tokens)`, *optional*): `True` marks a removed patch token,
                in row-major order of the `(height / patch_size) x (width / patch_size)` grid, the same count in
                every sample. The blocks then compute only the visible patch tokens (and the extra tokens); the
                output is zero at removed patches.
            return_dict (`bool`, defaults to `True`): Return a `MaskedUViTTransformer2DModelOutput` or a tuple
                `(sample, mask)`.
            num_masked (`int`, *optional*): The count of removed tokens per sample, when the caller knows it; as in
                [`MaskedDiTTransformer2DModel.forward`], with it a train-mode forward reads no tensor values.
            routes (*optional*): Token routing (TREAD) over the blocks, numbered in-blocks, mid-block, out-blocks
                (0 ... `num_layers - 1`), in any form [`~diffusers_masked.routing.parse_routes`] takes. A route must
                not split a long skip: it covers in-block `i` iff it covers out-block `num_layers - 1 - i`, i.e.
                `start_layer_idx + end_layer_idx == num_layers - 1`. The time and label tokens are never routed.
                Only in train mode with gradients enabled; otherwise ignored.
            route_ids (`tuple` of `torch.LongTensor`, *optional*): For each route, the `(batch, kept)` ids of the
                patch tokens its blocks compute, among the visible ones; drawn from torch's global generator when
                not given.
        """
        config = self.config
        timestep, class_labels = self._check_inputs(hidden_states, timestep, class_labels)
        batch, _, height, width = hidden_states.shape
        patch = config.patch_size
        if (height // patch, width // patch) != self.grid_size:
            expected = (self.grid_size[0] * patch, self.grid_size[1] * patch)
            raise ValueError(
                f"hidden_states must be {expected[0]}x{expected[1]} (the sample_size its positions are learned for), "
                f"got {height}x{width}"
            )
        num_tokens = self.grid_size[0] * self.grid_size[1]
        num_removed = check_mask(mask, batch, num_tokens, num_masked) if mask is not None else 0
        if mask is not None:
            mask = mask.to(hidden_states.device)
        num_visible = num_tokens - num_removed
        extras = self.num_extra_tokens
        dtype = self.patch_embed.weight.dtype

        # contiguous: the transposed conv output would keep a [B, D, N] layout through every residual add.
        patches = self.patch_embed(hidden_states.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # [B, N, D]
        time_token = self.time_proj(timestep).to(patches.dtype)  # [B, D]
        if self.time_embedding is not None:
            time_token = self.time_embedding(time_token)
        tokens = [time_token[:, None]]
        if self.class_embedder is not None:
            tokens.insert(0, self.class_embedder(class_labels)[:, None].to(patches.dtype))
        x = torch.cat([*tokens, patches], dim=1) + self.pos_embed.to(patches.dtype)  # [B, E + N, D]
        if num_removed:
            # Positions are added before dropping, so each visible token keeps its place; extra tokens always stay.
            ids_keep = visible_token_ids(mask, num_visible)  # [B, N_vis]
            x = torch.cat([x[:, :extras], gather_tokens(x[:, extras:], ids_keep)], dim=1)  # [B, E + N_vis, D]

        plan = None
        if routes is not None and routing_active(self):
            plan = plan_routes(
                self.resolve_routes(routes, config.num_layers),
                route_ids,
                config.num_layers,
                batch,
                num_visible,
                x.device,
                extras,
            )
        blocks = [*self.in_blocks, self.mid_block, *self.out_blocks]
        skips = []
        for index, block in enumerate(blocks):
            if plan is not None:
                x = plan.enter(index, x)
            if index < len(self.in_blocks):
                x = self._run_block(block, x)
                skips.append(x)
            elif index == len(self.in_blocks):
                x = self._run_block(block, x)
            else:
                x = self._run_block(block, x, skips.pop())
            if plan is not None:
                x = plan.leave(index, x)

        out = self.proj_out(self.norm_out(x[:, extras:]))  # [B, N_vis, p*p*C_out]
        if num_removed:
            out = scatter_tokens(out.new_zeros(batch, num_tokens, out.shape[-1]), ids_keep, out)
        sample = unpatchify(out, patch, height, width)
        if not return_dict:
            return (sample, mask)
        return MaskedUViTTransformer2DModelOutput(sample=sample, mask=mask)
