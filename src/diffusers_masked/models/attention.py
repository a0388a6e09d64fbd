"""The pieces both masked transformers are built from: attention through diffusers' dispatcher, DiT's adaLN-Zero
block and adaLN projection, and the gather / scatter of a subset of tokens (the visible tokens of a mask, the kept
tokens of a route).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import AttentionModuleMixin, FeedForward
from diffusers.models.attention_dispatch import dispatch_attention_fn
from torch import nn


def gather_tokens(tokens: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The tokens at `ids` of each sample: ``(B, N, D)`` and ``(B, K)`` -> ``(B, K, D)``."""
    return torch.gather(tokens, 1, ids[..., None].expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(base: torch.Tensor, ids: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """`base` ``(B, N, D)`` with its tokens at `ids` ``(B, K)`` replaced by `tokens` ``(B, K, D)``; a new tensor,
    through which gradients flow to both `base` (elsewhere) and `tokens`."""
    return base.scatter(1, ids[..., None].expand(-1, -1, tokens.shape[-1]), tokens)


class FusedQKVAttnProcessor:
    """The attention of [`SelfAttention`], through diffusers' attention dispatcher: the backend is the one chosen with
    `model.set_attention_backend(...)` (stored on the processor as diffusers' processors store it), else diffusers'
    active default (torch's `scaled_dot_product_attention`, or `DIFFUSERS_ATTN_BACKEND`)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(self, attn: SelfAttention, hidden_states: torch.Tensor) -> torch.Tensor:
        batch, length, _ = hidden_states.shape  # [B, L, D]
        qkv = attn.to_qkv(hidden_states).view(batch, length, 3, attn.num_heads, attn.head_dim)
        # The dispatcher takes [B, L, H, d], which is what unbinding the fused projection gives, with no copy; in
        # backward autograd stacks the three gradients straight into qkv's [B, L, 3, H, d] layout.
        query, key, value = qkv.unbind(2)  # each [B, L, H, d]
        out = dispatch_attention_fn(
            query, key, value, backend=self._attention_backend, parallel_config=self._parallel_config
        )  # [B, L, H, d]
        return attn.to_out(out.reshape(batch, length, -1))


class SelfAttention(nn.Module, AttentionModuleMixin):
    """Multi-head self-attention with one fused query-key-value projection (the layout of DiT's and MaskDiT's own
    code), computed by diffusers' attention dispatcher (see [`FusedQKVAttnProcessor`]), so that
    `model.set_attention_backend("flash")` and diffusers' other backends apply to it.

    One ``dim -> 3 * dim`` matrix multiply instead of three ``dim -> dim`` ones means fewer, larger operations, and
    official checkpoints load without splitting ``qkv``. The projection is fused already, so diffusers'
    `fuse_qkv_projections` has nothing to do here.

    ``bias=False`` drops the query-key-value bias (U-ViT's and MaskDM's layout); the output projection keeps its
    own."""

    _default_processor_cls = FusedQKVAttnProcessor
    _available_processors = [FusedQKVAttnProcessor]
    _supports_qkv_fusion = False
    fused_projections = True

    def __init__(self, dim: int, num_heads: int, head_dim: int, bias: bool = True):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.to_qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=bias)
        self.to_out = nn.Linear(num_heads * head_dim, dim)
        self.set_processor(FusedQKVAttnProcessor())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.processor(self, x)


class CrossAttnProcessor:
    """The attention of [`CrossAttention`], through diffusers' attention dispatcher like [`FusedQKVAttnProcessor`]
    (the backend set with `set_attention_backend`); the context's padding mask goes to the backend as a boolean
    ``(B, T)`` mask (torch's SDPA takes it; a backend without masks refuses it)."""

    _attention_backend = None
    _parallel_config = None

    def __call__(
        self,
        attn: CrossAttention,
        hidden_states: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch, length, _ = hidden_states.shape
        query = attn.to_q(hidden_states).view(batch, length, attn.num_heads, attn.head_dim)  # [B, L, H, d]
        key, value = attn.to_kv(context).view(batch, context.shape[1], 2, attn.num_heads, attn.head_dim).unbind(2)
        out = dispatch_attention_fn(
            query,
            key,
            value,
            attn_mask=context_mask,
            backend=self._attention_backend,
            parallel_config=self._parallel_config,
        )  # [B, L, H, d]
        return attn.to_out(out.reshape(batch, length, -1))


class CrossAttention(nn.Module, AttentionModuleMixin):
    """Multi-head attention from a sequence to a context (text tokens): queries from the sequence, keys and values
    from the context in one fused projection, computed by diffusers' attention dispatcher (see
    [`CrossAttnProcessor`])."""

    _default_processor_cls = CrossAttnProcessor
    _available_processors = [CrossAttnProcessor]
    _supports_qkv_fusion = False

    def __init__(self, dim: int, context_dim: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = head_dim
        self.to_q = nn.Linear(dim, num_heads * head_dim)
        self.to_kv = nn.Linear(context_dim, 2 * num_heads * head_dim)
        self.to_out = nn.Linear(num_heads * head_dim, dim)
        self.set_processor(CrossAttnProcessor())

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.processor(self, x, context, context_mask)


class AdaLNZeroBlock(nn.Module):
    """A DiT block: self-attention and MLP, each behind a LayerNorm modulated (shift, scale) by the
    conditioning vector and followed by a gate; the modulation starts at zero so the block starts as identity.

    With `cross_attention`, a cross-attention over the (projected) text tokens sits between the two, behind its own
    LayerNorm and unmodulated, as in PixArt-alpha's blocks; its output projection starts at zero (the model's
    initialisation), so a text block too starts as identity.

    The conditioning embedding is computed once per model and shared by all blocks."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        head_dim: int,
        cond_dim: int,
        mlp_ratio: float,
        norm_eps: float,
        cross_attention: bool = False,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.attn1 = SelfAttention(dim, num_heads, head_dim)
        if cross_attention:
            self.norm_cross = nn.LayerNorm(dim, eps=norm_eps)
            self.attn2 = CrossAttention(dim, dim, num_heads, head_dim)
        else:
            self.norm_cross = self.attn2 = None
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.ff = FeedForward(dim, inner_dim=int(dim * mlp_ratio), activation_fn="gelu-approximate", bias=True)
        self.modulation = nn.Linear(cond_dim, 6 * dim)

    def forward(
        self,
        x: torch.Tensor,
        cond: torch.Tensor,
        context: torch.Tensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # x: [B, L, D], cond: [B, cond_dim], context: [B, T, D], context_mask: [B, T] bool (True = a real token)
        # addcmul fuses each multiply-add into one pass over the tokens (one intermediate fewer, in and backward).
        mod = self.modulation(F.silu(cond))[:, None].chunk(6, dim=2)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
        h = torch.addcmul(shift_msa, self.norm1(x), 1 + scale_msa)
        x = torch.addcmul(x, gate_msa, self.attn1(h))
        if self.attn2 is not None:
            x = x + self.attn2(self.norm_cross(x), context, context_mask)
        h = torch.addcmul(shift_mlp, self.norm2(x), 1 + scale_mlp)
        return torch.addcmul(x, gate_mlp, self.ff(h))


class AdaLNProjection(nn.Module):
    """LayerNorm (no affine), modulated by a shift and scale from the conditioning vector, then a linear map.

    MaskDiT uses it twice: as the *decoder layer* that takes the encoder's tokens into the decoder's width, and as
    the *final layer* that maps tokens to ``patch_size**2 * out_channels`` values. Both start at zero (modulation
    and projection), as in the paper."""

    def __init__(self, dim: int, cond_dim: int, out_features: int, norm_eps: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim, elementwise_affine=False, eps=norm_eps)
        self.modulation = nn.Linear(cond_dim, 2 * dim)
        self.proj = nn.Linear(dim, out_features)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        # x: [B, L, D], cond: [B, cond_dim]
        shift, scale = self.modulation(F.silu(cond))[:, None].chunk(2, dim=2)
        return self.proj(torch.addcmul(shift, self.norm(x), 1 + scale))
