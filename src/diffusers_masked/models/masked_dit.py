"""MaskedDiTTransformer2DModel: the asymmetric encoder-decoder diffusion transformer of MaskDiT.

Encoder: a DiT (adaLN-Zero blocks) that, given a token mask, runs on the *visible* tokens only.
Decoder: a narrower MAE-style transformer, also adaLN-conditioned, that runs on all tokens, with one shared
learnable mask token standing in for every removed one. ``decoder_num_layers=0`` removes the decoder.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import (
    PixArtAlphaTextProjection,
    TimestepEmbedding,
    Timesteps,
    get_2d_sincos_pos_embed_from_grid,
)
from diffusers.models.modeling_utils import ModelMixin  # noqa: F401  (see below)
from diffusers.utils import BaseOutput
from torch import nn

from ..masking import check_mask, unpatchify, visible_token_ids
from ..routing import plan_routes, routing_active
from .attention import AdaLNProjection, AdaLNZeroBlock, gather_tokens, scatter_tokens
from .modeling_utils import MaskedTransformerMixin, check_positive_ints

# ModelMixin is imported above for folders saved by diffusers-masked 0.1: they name this module as their transformer's
# library, and diffusers looks the loadable base classes up in that module's namespace.

# Encoder sizes of the DiT paper (Peebles & Xie 2023, table 1): num_layers, hidden size, heads.
DIT_ENCODER_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
# MaskDiT's decoder (Zheng et al. 2023): 8 blocks, 512 wide, 16 heads.
MASKDIT_DECODER = {"decoder_num_layers": 8, "decoder_num_attention_heads": 16, "decoder_attention_head_dim": 32}
# The latent side the presets are sized for: a 256 x 256 image through an 8x VAE.
PRESET_LATENT_SIZE = 32


def _flops_per_token(width: int, tokens: int) -> int:
    """A transformer block's forward FLOPs per token: 24 w^2 in its linear maps, 4 N w in attention."""
    return 24 * width * width + 4 * tokens * width


def preset_decoder(size: str, patch: int) -> dict:
    """The decoder of the preset ``<size>/<patch>``: at XL, MaskDiT's own (8 x 512, 16 heads); at any other size one
    that costs the same share of the masked encoder's forward FLOPs at mask 0.5 as MaskDiT's decoder does at XL (about
    12%: the paper sized it for XL/2, where an 8 x 512 decoder on an S/2 encoder would cost 2.4 times the masked
    encoder). Width 4/9 of the encoder's (512 / 1152) in heads of 32 as the paper's, depth the whole number of blocks
    nearest to that share, on a 256-px image's latent (S/2: 3 x 160, B/2: 3 x 352, L/2: 7 x 448)."""
    if size == "XL":
        return dict(MASKDIT_DECODER)
    tokens = max(1, PRESET_LATENT_SIZE // patch) ** 2
    visible = max(1, tokens // 2)

    def masked_encoder(num_layers, width):
        return num_layers * _flops_per_token(width, visible) * visible

    xl_layers, xl_width, _ = DIT_ENCODER_SIZES["XL"]
    paper_width = MASKDIT_DECODER["decoder_num_attention_heads"] * MASKDIT_DECODER["decoder_attention_head_dim"]
    share = MASKDIT_DECODER["decoder_num_layers"] * _flops_per_token(paper_width, tokens) * tokens
    share /= masked_encoder(xl_layers, xl_width)
    num_layers, width, _ = DIT_ENCODER_SIZES[size]
    head_dim = MASKDIT_DECODER["decoder_attention_head_dim"]
    decoder_width = max(head_dim, round(width * paper_width / xl_width / head_dim) * head_dim)
    per_block = _flops_per_token(decoder_width, tokens) * tokens
    depth = max(1, round(share * masked_encoder(num_layers, width) / per_block))
    return {
        "decoder_num_layers": depth,
        "decoder_num_attention_heads": decoder_width // head_dim,
        "decoder_attention_head_dim": head_dim,
    }


@dataclass
class MaskedDiTTransformer2DModelOutput(BaseOutput):
    """
    Args:
        sample (`torch.Tensor` of shape `(batch, out_channels, height, width)`):
            The prediction for every pixel. Where the model has no decoder, removed tokens' pixels are zeros.
        mask (`torch.BoolTensor` of shape `(batch, num_tokens)` or `None`):
            The token mask used (`True` = removed), or `None` when every token was visible.
    """

    sample: torch.Tensor
    mask: torch.Tensor | None = None


def sincos_positions(embed_dim: int, grid_h: int, grid_w: int, device=None) -> torch.Tensor:
    """Fixed 2-D sine-cosine positions ``(grid_h * grid_w, embed_dim)`` in row-major token order, with the
    MAE/DiT layout (first half of the channels encodes the column, second half the row)."""
    cols = torch.arange(grid_w, dtype=torch.float32, device=device)
    rows = torch.arange(grid_h, dtype=torch.float32, device=device)
    grid = torch.stack(torch.meshgrid(cols, rows, indexing="xy"), dim=0)  # [2, grid_h, grid_w]
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid.reshape(2, -1)).float()


class MaskedDiTTransformer2DModel(MaskedTransformerMixin, ConfigMixin):
    r"""
    The MaskDiT transformer: a DiT encoder that sees only the visible tokens and a light decoder over all tokens.

    Parameters:
        sample_size (`int`, defaults to 32): Height and width of the (latent) input the positions are cached for.
            Other sizes work if both sides divide by `patch_size`.
        patch_size (`int`, defaults to 2): Side of the square patches that become tokens.
        in_channels (`int`, defaults to 4): Channels of the input.
        out_channels (`int`, *optional*): Channels of the output; defaults to `in_channels`.
        num_layers (`int`, defaults to 28): Encoder depth.
        num_attention_heads (`int`, defaults to 16): Encoder heads.
        attention_head_dim (`int`, defaults to 72): Encoder head width; the encoder is
            `num_attention_heads * attention_head_dim` wide.
        decoder_num_layers (`int`, defaults to 8): Decoder depth; 0 means no decoder (removed tokens' outputs
            are zeros).
        decoder_num_attention_heads (`int`, defaults to 16): Decoder heads.
        decoder_attention_head_dim (`int`, defaults to 32): Decoder head width.
        num_classes (`int`, defaults to 1000): Number of classes; 0 makes the model unconditional. The label table
            has `num_classes + 1` rows; id `num_classes` is the null class used for classifier-free guidance.
        mlp_ratio (`float`, defaults to 4.0): MLP hidden width over block width.
        norm_eps (`float`, defaults to 1e-6): LayerNorm epsilon.
        frequency_embedding_size (`int`, defaults to 256): Width of the sinusoidal timestep features.
        freq_shift (`int`, defaults to 0): Shift of the timestep features' frequency exponent, as in diffusers'
            `Timesteps(downscale_freq_shift=...)`: 0 is DiT's and MaskDiT's own embedding; 1 is what diffusers'
            `DiTTransformer2DModel` computes, kept by models converted from it so they compute the same function.
        cross_attention_dim (`int`, *optional*): Width of a text encoder's hidden states; with it the model is
            text-conditioned: the text tokens are projected to the encoder's width (PixArt-alpha's caption
            projection, Linear-GELU-Linear) and every encoder block attends to them between its self-attention and
            MLP. Text tokens are keys and values only, never masked or routed. `None` (the default) adds nothing:
            the weights of a class-conditional model are the same as before.
    """

    _supports_gradient_checkpointing = True
    _skip_layerwise_casting_patterns = ["norm"]
    _no_split_modules = ["AdaLNZeroBlock"]
    # What diffusers' regional compilation (`compile_repeated_blocks`) compiles: every encoder and decoder block.
    _repeated_blocks = ["AdaLNZeroBlock"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int | None = None,
        num_layers: int = 28,
        num_attention_heads: int = 16,
        attention_head_dim: int = 72,
        decoder_num_layers: int = 8,
        decoder_num_attention_heads: int = 16,
        decoder_attention_head_dim: int = 32,
        num_classes: int = 1000,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-6,
        frequency_embedding_size: int = 256,
        freq_shift: int = 0,
        cross_attention_dim: int | None = None,
    ):
        super().__init__()
        check_positive_ints(
            sample_size=sample_size,
            patch_size=patch_size,
            in_channels=in_channels,
            num_layers=num_layers,
            num_attention_heads=num_attention_heads,
            attention_head_dim=attention_head_dim,
        )
        if sample_size % patch_size:
            raise ValueError(f"sample_size={sample_size} must be divisible by patch_size={patch_size}")
        if decoder_num_layers < 0:
            raise ValueError(f"decoder_num_layers must be >= 0 (0 = no decoder), got {decoder_num_layers}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        if cross_attention_dim is not None:
            check_positive_ints(cross_attention_dim=cross_attention_dim)
        self.out_channels = out_channels if out_channels is not None else in_channels
        self.inner_dim = num_attention_heads * attention_head_dim
        self.decoder_dim = decoder_num_attention_heads * decoder_attention_head_dim if decoder_num_layers else 0
        if self.inner_dim % 4 or (self.decoder_dim and self.decoder_dim % 4):
            raise ValueError("encoder and decoder widths must be divisible by 4 for 2-D sine-cosine positions")
        self.gradient_checkpointing = False

        # Conditioning: one timestep embedder and one label table shared by every block.
        self.time_proj = Timesteps(frequency_embedding_size, flip_sin_to_cos=True, downscale_freq_shift=freq_shift)
        self.timestep_embedder = TimestepEmbedding(frequency_embedding_size, self.inner_dim)
        self.class_embedder = nn.Embedding(num_classes + 1, self.inner_dim) if num_classes > 0 else None
        self.caption_projection = (
            PixArtAlphaTextProjection(cross_attention_dim, self.inner_dim, act_fn="gelu_tanh")
            if cross_attention_dim
            else None
        )

        # Encoder
        self.patch_embed = nn.Conv2d(in_channels, self.inner_dim, kernel_size=patch_size, stride=patch_size)
        grid = sample_size // patch_size
        self.register_buffer("pos_embed", sincos_positions(self.inner_dim, grid, grid), persistent=False)
        self.transformer_blocks = nn.ModuleList(
            [
                AdaLNZeroBlock(
                    self.inner_dim,
                    num_attention_heads,
                    attention_head_dim,
                    self.inner_dim,
                    mlp_ratio,
                    norm_eps,
                    cross_attention=cross_attention_dim is not None,
                )
                for _ in range(num_layers)
            ]
        )

        # Decoder: narrower, over all tokens, a shared mask token where the encoder saw nothing.
        if decoder_num_layers:
            # The paper's decoder layer: the encoder's residual stream is normalised and modulated before the
            # projection into the decoder's width.
            self.decoder_layer = AdaLNProjection(self.inner_dim, self.inner_dim, self.decoder_dim, norm_eps)
            self.mask_token = nn.Parameter(torch.zeros(1, 1, self.decoder_dim))
            self.register_buffer("decoder_pos_embed", sincos_positions(self.decoder_dim, grid, grid), persistent=False)
            self.decoder_blocks = nn.ModuleList(
                [
                    AdaLNZeroBlock(
                        self.decoder_dim,
                        decoder_num_attention_heads,
                        decoder_attention_head_dim,
                        self.inner_dim,
                        mlp_ratio,
                        norm_eps,
                    )
                    for _ in range(decoder_num_layers)
                ]
            )
        else:
            self.decoder_layer = None
            self.mask_token = None
            self.decoder_pos_embed = None
            self.decoder_blocks = nn.ModuleList()
        self.final_layer = AdaLNProjection(
            self.decoder_dim or self.inner_dim, self.inner_dim, patch_size * patch_size * self.out_channels, norm_eps
        )
        self._initialize_weights()

    def _initialize_weights(self):
        # As in DiT: xavier linears, N(0, 0.02) embeddings, zero adaLN modulations and output projection.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for block in [*self.transformer_blocks, *self.decoder_blocks]:
            # Query, key and value each as its own square map (diffusers' DiT has three separate linears).
            for weight in block.attn1.to_qkv.weight.chunk(3, dim=0):
                nn.init.xavier_uniform_(weight)
        nn.init.xavier_uniform_(self.patch_embed.weight.view(self.patch_embed.weight.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.timestep_embedder.linear_1.weight, std=0.02)
        nn.init.normal_(self.timestep_embedder.linear_2.weight, std=0.02)
        if self.class_embedder is not None:
            nn.init.normal_(self.class_embedder.weight, std=0.02)
        if self.mask_token is not None:
            nn.init.normal_(self.mask_token, std=0.02)
        if self.caption_projection is not None:
            # As PixArt-alpha: the caption projection N(0, 0.02); each cross-attention's output projection starts at
            # zero, so that the text enters through gradients, not through noise at initialisation.
            for layer in (self.caption_projection.linear_1, self.caption_projection.linear_2):
                nn.init.normal_(layer.weight, std=0.02)
            for block in self.transformer_blocks:
                nn.init.zeros_(block.attn2.to_out.weight)
                nn.init.zeros_(block.attn2.to_out.bias)
        for block in [*self.transformer_blocks, *self.decoder_blocks]:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        for projection in (self.decoder_layer, self.final_layer):
            if projection is not None:
                for layer in (projection.modulation, projection.proj):
                    nn.init.zeros_(layer.weight)
                    nn.init.zeros_(layer.bias)

    @classmethod
    def from_preset(cls, name: str, paper_decoder: bool = False, **overrides) -> MaskedDiTTransformer2DModel:
        """Build a model from a DiT size name (``"S/2"``, ``"B/4"``, ``"XL/2"``, ...): DiT's encoder of that size
        and a decoder sized to it (`preset_decoder`; MaskDiT's own 8 x 512 at XL), or with ``paper_decoder=True``
        MaskDiT's at any size; any config argument can be overridden, e.g. a lighter decoder::

            MaskedDiTTransformer2DModel.from_preset("S/2", decoder_num_layers=2, decoder_attention_head_dim=16)
        """
        return cls(**{**cls.preset_config(name, paper_decoder), **overrides})

    @staticmethod
    def _check_preset(name: str):
        size, _, patch = str(name).partition("/")
        if size not in DIT_ENCODER_SIZES or not patch.isdigit():
            raise ValueError(
                f"preset name must be '<size>/<patch>' with size in {list(DIT_ENCODER_SIZES)}, e.g. 'XL/2'; "
                f"got {name!r}"
            )

    @classmethod
    def preset_config(cls, name: str, paper_decoder: bool = False) -> dict:
        """The config dict of a preset (see :meth:`from_preset`)."""
        cls._check_preset(name)
        size, _, patch = name.partition("/")
        num_layers, width, heads = DIT_ENCODER_SIZES[size]
        return {
            "patch_size": int(patch),
            "num_layers": num_layers,
            "num_attention_heads": heads,
            "attention_head_dim": width // heads,
            **(dict(MASKDIT_DECODER) if paper_decoder else preset_decoder(size, int(patch))),
        }

    def _conditioning(self, timestep: torch.Tensor, class_labels: torch.Tensor | None, dtype) -> torch.Tensor:
        cond = self.timestep_embedder(self.time_proj(timestep).to(dtype))
        if self.class_embedder is not None:
            cond = cond + self.class_embedder(class_labels)
        return cond  # [B, D]

    def _text(self, states, mask, batch: int, dtype, device) -> tuple:
        """The projected text tokens and their boolean padding mask, as the encoder blocks take them (``()`` for a
        model without text)."""
        if self.caption_projection is None:
            if states is not None or mask is not None:
                raise ValueError(
                    "encoder_hidden_states were given to a model without text conditioning (cross_attention_dim=None)"
                )
            return ()
        width = self.config.cross_attention_dim
        if (
            not isinstance(states, torch.Tensor)
            or states.ndim != 3
            or states.shape[0] != batch
            or states.shape[2] != width
        ):
            found = tuple(states.shape) if isinstance(states, torch.Tensor) else type(states).__name__
            raise ValueError(
                f"encoder_hidden_states of shape ({batch}, text_tokens, {width}) are required by this "
                f"text-conditioned model (cross_attention_dim={width}), got {found}"
            )
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(states.shape[:2]):
                found = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
                raise ValueError(f"encoder_attention_mask must have shape {tuple(states.shape[:2])}, got {found}")
            mask = mask.to(device=device, dtype=torch.bool)
        return self.caption_projection(states.to(device=device, dtype=dtype)), mask

    def _positions(self, buffer: torch.Tensor, dim: int, grid_h: int, grid_w: int, device) -> torch.Tensor:
        if buffer.shape[0] == grid_h * grid_w and grid_h == grid_w:
            return buffer
        return sincos_positions(dim, grid_h, grid_w, device=device)

    def _run_blocks(
        self, blocks: nn.ModuleList, x: torch.Tensor, cond: torch.Tensor, plan=None, text=()
    ) -> torch.Tensor:
        for index, block in enumerate(blocks):
            if plan is not None:
                x = plan.enter(index, x)
            x = self._run_block(block, x, cond, *text)
            if plan is not None:
                x = plan.leave(index, x)
        return x

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
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> MaskedDiTTransformer2DModelOutput | tuple:
        """
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, in_channels, height, width)`): The (preconditioned)
                noisy input.
            timestep (`torch.Tensor` of shape `(batch,)`, or a scalar): The noise level as the scheduler gives it,
                a float such as EDM's `c_noise = ln(sigma) / 4` or an integer DDPM step.
            class_labels (`torch.LongTensor` of shape `(batch,)`, *optional*): Class ids in `[0, num_classes]`,
                `num_classes` being the null class. Required iff `num_classes > 0`. Their range is checked in eval
                mode; in train mode no tensor value is read (see below).
            mask (`torch.BoolTensor` of shape `(batch, num_tokens)`, *optional*): `True` marks a removed token, in
                row-major order of the `(height / patch_size) x (width / patch_size)` grid, the same count in every
                sample. The encoder then computes only the visible tokens.
            return_dict (`bool`, defaults to `True`): Return a `MaskedDiTTransformer2DModelOutput` or a tuple
                `(sample, mask)`.
            num_masked (`int`, *optional*): The count of removed tokens per sample, when the caller knows it (e.g.
                [`~diffusers_masked.masking.generated_mask_count`]); it must be the mask's. Without it the mask's
                counts are read and checked, one device-to-host copy.
            routes (`str`, `list` of [`~diffusers_masked.routing.Route`] or dicts, *optional*): Token routing (TREAD)
                over the encoder blocks, in any form [`~diffusers_masked.routing.parse_routes`] takes: the routed
                tokens of each route skip its blocks. Routes apply to the encoder's (visible) tokens, never the
                decoder's, and only in train mode with gradients enabled; otherwise the forward ignores them.
            route_ids (`tuple` of `torch.LongTensor`, *optional*): For each route, the `(batch, kept)` ids of the
                tokens its blocks compute, among the encoder's tokens (e.g. from
                [`~diffusers_masked.routing.draw_route_ids`]); drawn from torch's global generator when not given.
            encoder_hidden_states (`torch.Tensor` of shape `(batch, text_tokens, cross_attention_dim)`, *optional*):
                A text encoder's hidden states (its `last_hidden_state`); required by a text-conditioned model
                (`cross_attention_dim` set), refused by others.
            encoder_attention_mask (`torch.Tensor` of shape `(batch, text_tokens)`, *optional*): 1 (or `True`) for
                the real text tokens, 0 for padding, which the cross-attention then ignores; every row needs at
                least one real token (a tokenizer's end-of-sequence token is one).

        In train mode, given `num_masked`, the forward reads no tensor values, so a training step does not make the
        host wait for the device and `torch.compile` sees one graph; the training scripts check the data's labels
        once, before the first step.
        """
        timestep, class_labels = self._check_inputs(hidden_states, timestep, class_labels)
        batch, _, height, width = hidden_states.shape
        patch = self.config.patch_size
        grid_h, grid_w = height // patch, width // patch
        num_tokens = grid_h * grid_w
        device = hidden_states.device
        dtype = self.patch_embed.weight.dtype

        if mask is not None:
            num_removed = check_mask(mask, batch, num_tokens, num_masked)
            mask = mask.to(device)
        else:
            num_removed = 0
        num_visible = num_tokens - num_removed

        cond = self._conditioning(timestep, class_labels, dtype)
        text = self._text(encoder_hidden_states, encoder_attention_mask, batch, dtype, device)

        # Encoder: positions are added before dropping, so each visible token keeps its place in the image.
        # contiguous: the transposed conv output would keep a [B, D, N] layout through every residual add.
        x = self.patch_embed(hidden_states.to(dtype)).flatten(2).transpose(1, 2).contiguous()  # [B, N, D]
        x = x + self._positions(self.pos_embed, self.inner_dim, grid_h, grid_w, device).to(x.dtype)
        if num_removed:
            ids_keep = visible_token_ids(mask, num_visible)  # [B, N_vis]
            x = gather_tokens(x, ids_keep)  # [B, N_vis, D]
        plan = None
        if routes is not None and routing_active(self):
            plan = plan_routes(routes, route_ids, self.config.num_layers, batch, num_visible, device)
        x = self._run_blocks(self.transformer_blocks, x, cond, plan, text)

        if self.decoder_layer is not None:
            # Decoder: visible tokens at their places, the shared mask token everywhere else.
            x = self.decoder_layer(x, cond)  # [B, N_vis, D_dec]
            if num_removed:
                full = self.mask_token.to(x.dtype).expand(batch, num_tokens, -1)  # [B, N, D_dec]
                x = scatter_tokens(full, ids_keep, x)
            elif self.training and torch.is_grad_enabled():
                # Without removed tokens the mask token is idle; a zero-weight term keeps it in the graph (as the
                # official code does), so that DDP need not search for unused parameters at every step.
                x = x + 0.0 * self.mask_token.to(x.dtype).sum()
            x = x + self._positions(self.decoder_pos_embed, self.decoder_dim, grid_h, grid_w, device).to(x.dtype)
            x = self._run_blocks(self.decoder_blocks, x, cond)
            tokens = self.final_layer(x, cond)  # [B, N, p*p*C_out]
        else:
            tokens = self.final_layer(x, cond)  # [B, N_vis, p*p*C_out]
            if num_removed:
                tokens = scatter_tokens(tokens.new_zeros(batch, num_tokens, tokens.shape[-1]), ids_keep, tokens)

        sample = unpatchify(tokens, patch, height, width)
        if not return_dict:
            return (sample, mask)
        return MaskedDiTTransformer2DModelOutput(sample=sample, mask=mask)
