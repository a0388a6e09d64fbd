"""MaskedUViTTransformer2DModel (MaskDM's U-ViT) against its description, recomputed here in float64, and the MaskDM
objective (MaskedDDPMScheduler) through it."""

import math

import pytest
import torch
import torch.nn.functional as F

from diffusers_masked import MaskedDDPMScheduler, MaskedUViTTransformer2DModel, generate_mask, random_mask
from tests.tiny import BAD_TRANSFORMER_INPUTS, TINY_UVIT, tiny_uvit

GRID = 4  # the tiny model: 8x8 inputs, patch 2
NUM_TOKENS = GRID * GRID


def _inputs(batch=2, size=8, channels=3):
    generator = torch.Generator().manual_seed(7)
    x = torch.randn(batch, channels, size, size, generator=generator)
    return x, torch.tensor([17, 912][:batch]), torch.tensor([3, 10][:batch])


def _removed_pixels(mask, like, patch=2):
    grid_h, grid_w = like.shape[-2] // patch, like.shape[-1] // patch
    pixels = mask.view(-1, 1, grid_h, 1, grid_w, 1).expand(-1, 1, grid_h, patch, grid_w, patch)
    return pixels.reshape(mask.shape[0], 1, grid_h * patch, grid_w * patch).expand_as(like)


# ---------------------------------------------------------------------------------------------------------------
# The float64 reference, written from the architecture description
# ---------------------------------------------------------------------------------------------------------------


def reference_forward(model, x, t, labels=None, mask=None):
    """U-ViT as MaskDM describes it: conv patch tokens (row-major), a time token of sinusoidal features of the raw
    step (cos first, max period 10000), an optional label token first, learned positions added before removed patch
    tokens are dropped, pre-LN blocks (LayerNorm eps 1e-5, bias-free qkv attention scaled by head_dim^-0.5,
    exact-GELU MLP), depth//2 in-blocks, a mid-block, depth//2 out-blocks each merging an in-block output (LIFO) with
    Linear(2D -> D) on concat([x, skip]); a final LayerNorm and Linear on the patch tokens, zeros where removed,
    the token values laid out (p, q, C)."""
    P = {name: value.detach().double() for name, value in model.named_parameters()}
    cfg = model.config
    heads, head_dim, p, eps = cfg.num_attention_heads, cfg.attention_head_dim, cfg.patch_size, 1e-5
    D = heads * head_dim
    x = x.double()
    B, C, H, W = x.shape
    gh, gw = H // p, W // p

    # Conv p x p, stride p == a matmul on each patch's (C, p, q) values; unfold walks the grid row-major.
    patches = F.unfold(x, p, stride=p).transpose(1, 2) @ P["patch_embed.weight"].reshape(D, -1).T
    patches = patches + P["patch_embed.bias"]  # [B, N, D]
    half = D // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float64) / half)
    angles = t.double()[:, None] * freqs
    time = torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)  # [B, D]
    if "time_embedding.linear_1.weight" in P:
        time = F.silu(time @ P["time_embedding.linear_1.weight"].T + P["time_embedding.linear_1.bias"])
        time = time @ P["time_embedding.linear_2.weight"].T + P["time_embedding.linear_2.bias"]
    extras = [time[:, None]]
    if labels is not None:
        extras.insert(0, P["class_embedder.weight"][labels][:, None])
    seq = torch.cat([*extras, patches], dim=1) + P["pos_embed"]
    E = len(extras)
    kept = [list(range(gh * gw)) if mask is None else (~mask[b]).nonzero().flatten().tolist() for b in range(B)]
    seq = torch.stack([torch.cat([seq[b, :E], seq[b, E:][kept[b]]]) for b in range(B)])

    def layer_norm(h, prefix):
        mean, var = h.mean(-1, keepdim=True), h.var(-1, unbiased=False, keepdim=True)
        return (h - mean) / torch.sqrt(var + eps) * P[f"{prefix}.weight"] + P[f"{prefix}.bias"]

    def attention(h, prefix):
        q, k, v = (h @ P[f"{prefix}.to_qkv.weight"].T).chunk(3, dim=-1)
        split = lambda a: a.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # noqa: E731
        weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) * head_dim**-0.5, dim=-1)
        out = (weights @ split(v)).transpose(1, 2).flatten(2)
        return out @ P[f"{prefix}.to_out.weight"].T + P[f"{prefix}.to_out.bias"]

    def mlp(h, prefix):
        h = h @ P[f"{prefix}.net.0.proj.weight"].T + P[f"{prefix}.net.0.proj.bias"]
        h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
        return h @ P[f"{prefix}.net.2.weight"].T + P[f"{prefix}.net.2.bias"]

    def block(h, prefix, skip=None):
        if skip is not None:
            h = torch.cat([h, skip], dim=-1) @ P[f"{prefix}.skip_linear.weight"].T + P[f"{prefix}.skip_linear.bias"]
        h = h + attention(layer_norm(h, f"{prefix}.norm1"), f"{prefix}.attn")
        return h + mlp(layer_norm(h, f"{prefix}.norm2"), f"{prefix}.ff")

    depth = cfg.num_layers // 2
    skips = []
    for i in range(depth):
        seq = block(seq, f"in_blocks.{i}")
        skips.append(seq)
    seq = block(seq, "mid_block")
    for i in range(depth):
        seq = block(seq, f"out_blocks.{i}", skips.pop())
    out = layer_norm(seq, "norm_out")[:, E:] @ P["proj_out.weight"].T + P["proj_out.bias"]  # [B, N_vis, p*p*C]

    tokens = torch.zeros(B, gh * gw, out.shape[-1], dtype=torch.float64)
    for b in range(B):
        tokens[b, kept[b]] = out[b]
    return tokens.view(B, gh, gw, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, H, W)


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "masked"])
@pytest.mark.parametrize("num_classes", [10, 0], ids=["conditional", "unconditional"])
def test_forward_equals_the_float64_reference(masked, num_classes):
    model = tiny_uvit(seed=1, num_classes=num_classes)
    x, t, labels = _inputs()
    labels = labels if num_classes else None  # the conditional case holds the null class 10
    mask = random_mask(2, NUM_TOKENS, 0.5, generator=torch.Generator().manual_seed(3)) if masked else None
    with torch.no_grad():
        out = model(x, t, labels, mask=mask).sample
    torch.testing.assert_close(out.double(), reference_forward(model, x, t, labels, mask), rtol=1e-4, atol=1e-5)


def test_forward_with_the_time_embedding_mlp_equals_the_float64_reference():
    model = tiny_uvit(seed=2, time_embedding_mlp=True)
    x, t, labels = _inputs()
    with torch.no_grad():
        out = model(x, t, labels).sample
    torch.testing.assert_close(out.double(), reference_forward(model, x, t, labels), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mask_type,ratio", [("patch", 0.5), ("block", 0.5), ("crop", 0.75)])
def test_every_mask_generator_goes_through_the_model(mask_type, ratio):
    model = tiny_uvit(seed=4)
    x, t, labels = _inputs()
    mask = generate_mask(mask_type, 2, GRID, ratio, block_size=2, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        out = model(x, t, labels, mask=mask)
    assert torch.equal(out.mask, mask)
    torch.testing.assert_close(out.sample.double(), reference_forward(model, x, t, labels, mask), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------------------------


def analytic_param_count(D, num_layers, patch, channels, num_tokens, num_classes=0, time_mlp=False, mlp=4):
    """Parameters from the layer shapes, written independently of the model code."""
    linear = lambda i, o, bias=True: i * o + (o if bias else 0)  # noqa: E731
    norm = 2 * D
    block = norm + linear(D, 3 * D, bias=False) + linear(D, D) + norm + linear(D, mlp * D) + linear(mlp * D, D)
    skip = linear(2 * D, D)
    extras = 2 if num_classes else 1
    count = channels * patch * patch * D + D  # patch embedding
    count += (extras + num_tokens) * D  # positions
    count += (num_classes + 1) * D if num_classes else 0  # labels and the null class
    count += linear(D, 4 * D) + linear(4 * D, D) if time_mlp else 0
    count += num_layers * block + (num_layers // 2) * skip
    return count + norm + linear(D, patch * patch * channels)


@pytest.mark.parametrize(
    "preset,width,heads,pixels,approx_millions",
    [("MaskDM-S", 512, 8, 64, 44.3), ("MaskDM-B", 768, 12, 256, 102.4)],
)
def test_preset_has_maskdm_size_and_the_analytic_parameter_count(preset, width, heads, pixels, approx_millions):
    with torch.device("meta"):
        model = MaskedUViTTransformer2DModel.from_preset(preset)
    cfg = model.config
    assert (cfg.num_layers, cfg.num_attention_heads * cfg.attention_head_dim, cfg.num_attention_heads) == (
        13,
        width,
        heads,
    )
    assert (cfg.patch_size, cfg.sample_size, cfg.num_classes) == (4, pixels, 0)
    assert (len(model.in_blocks), len(model.out_blocks)) == (6, 6)
    count = sum(p.numel() for p in model.parameters())
    assert count == analytic_param_count(width, 13, 4, 3, (pixels // 4) ** 2)
    assert round(count / 1e6, 1) == approx_millions


def test_parameter_count_with_labels_and_time_mlp_matches_analytic_count():
    model = MaskedUViTTransformer2DModel(**{**TINY_UVIT, "num_layers": 7, "time_embedding_mlp": True})
    count = sum(p.numel() for p in model.parameters())
    assert count == analytic_param_count(16, 7, 2, 3, NUM_TOKENS, num_classes=10, time_mlp=True)


def test_unknown_preset_is_a_value_error():
    with pytest.raises(ValueError, match="MaskDM-S"):
        MaskedUViTTransformer2DModel.from_preset("MaskDM-L")


def test_preset_overrides_apply():
    model = MaskedUViTTransformer2DModel.from_preset("MaskDM-S", sample_size=16, num_classes=10)
    assert model.config.sample_size == 16 and model.class_embedder.num_embeddings == 11


# ---------------------------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------------------------


def test_initialisation_follows_maskdm():
    # Linears trunc-normal(0.02) with zero bias, LayerNorms (1, 0), positions trunc-normal(0.02); label rows keep
    # nn.Embedding's N(0, 1) as in the official code, the null row starts like its unconditional embedding (0.02).
    model = MaskedUViTTransformer2DModel(
        sample_size=32, patch_size=2, num_layers=3, num_attention_heads=2, attention_head_dim=64, num_classes=50
    )
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            assert module.weight.std().item() == pytest.approx(0.02, rel=0.05), name
            assert module.bias is None or torch.count_nonzero(module.bias) == 0, name
        if isinstance(module, torch.nn.LayerNorm):
            assert torch.all(module.weight == 1) and torch.all(module.bias == 0), name
    assert model.pos_embed.std().item() == pytest.approx(0.02, rel=0.05)
    labels = model.class_embedder.weight.detach()
    assert labels[:50].std().item() == pytest.approx(1.0, rel=0.05)
    assert labels[50].std().item() == pytest.approx(0.02, rel=0.25)


def test_attention_projects_query_key_value_without_bias():
    block = tiny_uvit().in_blocks[0]
    assert block.attn.to_qkv.bias is None and block.attn.to_out.bias is not None
    assert block.skip_linear is None and tiny_uvit().out_blocks[0].skip_linear.weight.shape == (16, 32)


# ---------------------------------------------------------------------------------------------------------------
# The model contract (as MaskedDiTTransformer2DModel's)
# ---------------------------------------------------------------------------------------------------------------


def test_masked_output_ignores_content_of_removed_patches():
    model = tiny_uvit()
    x, t, y = _inputs()
    mask = random_mask(2, NUM_TOKENS, 0.5, generator=torch.Generator().manual_seed(1))
    changed = torch.where(_removed_pixels(mask, x), torch.randn_like(x) * 10, x)
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask=mask).sample, model(changed, t, y, mask=mask).sample)


def test_masked_output_depends_on_a_visible_patch():
    model = tiny_uvit()
    x, t, y = _inputs()
    mask = random_mask(2, NUM_TOKENS, 0.5, generator=torch.Generator().manual_seed(1))
    row, col = divmod(int((~mask[0]).nonzero()[0]), GRID)
    changed = x.clone()
    changed[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2] += 1.0
    with torch.no_grad():
        a, b = model(x, t, y, mask=mask).sample, model(changed, t, y, mask=mask).sample
    assert not torch.allclose(a[0], b[0])
    assert torch.equal(a[1], b[1])  # samples do not interact


def test_removed_tokens_output_zeros_and_the_mask_is_returned():
    model = tiny_uvit()
    x, t, y = _inputs()
    mask = random_mask(2, NUM_TOKENS, 0.5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x, t, y, mask=mask)
    removed = _removed_pixels(mask, out.sample)
    assert torch.all(out.sample[removed] == 0) and torch.all(out.sample[~removed] != 0)
    assert torch.equal(out.mask, mask)
    assert model(x, t, y).mask is None


def test_blocks_see_the_extra_tokens_and_only_the_visible_patches():
    model = tiny_uvit()
    x, t, y = _inputs()
    lengths = []
    for block in [*model.in_blocks, model.mid_block, *model.out_blocks]:
        block.register_forward_pre_hook(lambda module, args: lengths.append(args[0].shape[1]))
    mask = random_mask(2, NUM_TOKENS, 0.75, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(x, t, y, mask=mask)
    assert lengths == [2 + 4] * 5  # label + time + the 4 visible of 16 patches


def test_empty_mask_equals_no_mask():
    model = tiny_uvit()
    x, t, y = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            model(x, t, y).sample, model(x, t, y, mask=torch.zeros(2, 16, dtype=torch.bool)).sample
        )


def test_non_square_input_is_supported_through_a_non_square_sample_size():
    model = tiny_uvit(sample_size=(8, 12))
    x = torch.randn(2, 3, 8, 12)
    mask = random_mask(2, 4 * 6, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([1, 2]), torch.tensor([0, 1]), mask=mask).sample
    assert out.shape == (2, 3, 8, 12)
    torch.testing.assert_close(
        out.double(),
        reference_forward(model, x, torch.tensor([1, 2]), torch.tensor([0, 1]), mask),
        rtol=1e-4,
        atol=1e-5,
    )


def test_unconditional_model_takes_no_labels():
    model = tiny_uvit(num_classes=0)
    x, t, _ = _inputs()
    assert model(x, t).sample.shape == x.shape and model.class_embedder is None
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.tensor([0, 1]))


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_uvit()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = MaskedUViTTransformer2DModel.from_pretrained(tmp_path).eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    x, t, y = _inputs()
    mask = random_mask(2, NUM_TOKENS, 0.25, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask=mask).sample, loaded(x, t, y, mask=mask).sample)


def test_config_round_trip():
    model = tiny_uvit(time_embedding_mlp=True)
    rebuilt = MaskedUViTTransformer2DModel.from_config(model.config)
    assert dict(rebuilt.config) == dict(model.config)
    assert rebuilt.time_embedding is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_uvit().train()
    x, t, y = _inputs()
    mask = random_mask(2, NUM_TOKENS, 0.5, generator=torch.Generator().manual_seed(0))

    def grads():
        model.zero_grad()
        model(x, t, y, mask=mask).sample.square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = grads()
    model.enable_gradient_checkpointing()
    assert model.gradient_checkpointing
    checkpointed = grads()
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def test_bf16_autocast_forward_is_finite():
    model = tiny_uvit()
    x, t, y = _inputs()
    mask = random_mask(2, NUM_TOKENS, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, y, mask=mask).sample
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize(
    "call,match",
    [
        *BAD_TRANSFORMER_INPUTS,
        # U-ViT's learned positions fix the input size; the error names it.
        (lambda m: m(torch.randn(2, 3, 12, 12), torch.zeros(2), torch.tensor([0, 1])), "must be 8x8"),
    ],
)
def test_bad_input_is_a_clear_value_error(call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_uvit())


def test_mask_of_wrong_dtype_is_a_type_error():
    with pytest.raises(TypeError, match="dtype"):
        tiny_uvit()(
            torch.randn(2, 3, 8, 8), torch.zeros(2), torch.tensor([0, 1]), mask=torch.zeros(2, 16, dtype=torch.int64)
        )


@pytest.mark.parametrize(
    "overrides,match",
    [
        ({"num_layers": 4}, "num_layers must be odd"),
        ({"sample_size": 9}, "sample_size"),
        ({"sample_size": (8, 0)}, "sample_size"),
        ({"num_classes": -1}, "num_classes"),
        ({"patch_size": 0}, "patch_size"),
    ],
)
def test_bad_config_is_a_value_error(overrides, match):
    with pytest.raises(ValueError, match=match):
        MaskedUViTTransformer2DModel(**{**TINY_UVIT, **overrides})


# ---------------------------------------------------------------------------------------------------------------
# The MaskDM objective through the U-ViT
# ---------------------------------------------------------------------------------------------------------------


def maskdm_alphas_cumprod(beta_schedule, T=1000):
    """MaskDM's own schedules (its gaussian_ddpm.py, from the formulas): linear 1e-4..0.02, or Nichol & Dhariwal's
    cosine with s = 0.008, normalised to alpha_bar(0) = 1 and betas clipped to 0.999."""
    if beta_schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, T, dtype=torch.float64)
    else:
        steps = torch.arange(T + 1, dtype=torch.float64)
        alpha_bar = torch.cos((steps / T + 0.008) / 1.008 * math.pi / 2) ** 2
        alpha_bar = alpha_bar / alpha_bar[0]
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clip(0, 0.999)
    return torch.cumprod(1 - betas, dim=0)


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
def test_scheduler_noise_schedules_equal_maskdm_formulas(beta_schedule):
    scheduler = MaskedDDPMScheduler(beta_schedule=beta_schedule)
    assert scheduler.config.num_train_timesteps == 1000 and scheduler.config.prediction_type == "epsilon"
    torch.testing.assert_close(
        scheduler.alphas_cumprod.double(), maskdm_alphas_cumprod(beta_schedule), rtol=1e-5, atol=1e-7
    )


def maskdm_loss_reference(model, clean, labels, mask, seed, beta_schedule):
    """MaskDM's loss, float64: t ~ U{0..999}, noise on the whole image, x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, the
    model's epsilon compared with eps by squared error averaged over each sample's visible tokens' values, then the
    batch; no weight, nothing from removed tokens. The draws follow the documented order (mask given: t, then eps)."""
    generator = torch.Generator().manual_seed(seed)
    t = torch.randint(0, 1000, (clean.shape[0],), generator=generator)
    eps = torch.randn(clean.shape, generator=generator).double()
    alpha_bar = maskdm_alphas_cumprod(beta_schedule)[t].view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * clean.double() + (1 - alpha_bar).sqrt() * eps
    with torch.no_grad():
        eps_hat = model(x_t.float(), t, class_labels=labels, mask=mask).sample.double()
    squared = F.unfold((eps_hat - eps) ** 2, 2, stride=2).transpose(1, 2)  # [B, N, C*p*p]
    visible = ~mask
    per_sample = torch.stack([squared[b][visible[b]].mean() for b in range(clean.shape[0])])
    return per_sample.mean()


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("mask_type,ratio", [("patch", 0.5), ("block", 0.75), ("crop", 0.75)])
def test_ddpm_loss_through_the_uvit_equals_the_maskdm_formula(beta_schedule, mask_type, ratio):
    model = tiny_uvit(seed=6).train()
    generator = torch.Generator().manual_seed(11)
    clean = torch.rand(4, 3, 8, 8, generator=generator) * 2 - 1
    labels = torch.tensor([0, 4, 9, 10])
    mask = generate_mask(mask_type, 4, GRID, ratio, block_size=2, generator=generator)
    scheduler = MaskedDDPMScheduler(beta_schedule=beta_schedule)

    output = scheduler.masked_training_loss(
        model, clean, labels, mask=mask, generator=torch.Generator().manual_seed(8)
    )

    expected = maskdm_loss_reference(model, clean, labels, mask, 8, beta_schedule)
    assert float(output.loss.detach()) == pytest.approx(float(expected), rel=1e-4)
    assert float(output.mae_loss) == 0.0 and torch.equal(output.mask, mask)


def test_ddpm_loss_has_no_gradient_to_removed_pixels():
    # Noise is added to the whole image, but neither the loss nor the model reads a removed patch.
    model = tiny_uvit(seed=6).train()
    clean = torch.randn(2, 3, 8, 8).requires_grad_()
    mask = generate_mask("block", 2, GRID, 0.5, block_size=2, generator=torch.Generator().manual_seed(0))
    output = MaskedDDPMScheduler().masked_training_loss(
        model, clean, torch.tensor([1, 2]), mask=mask, generator=torch.Generator().manual_seed(1)
    )
    output.loss.backward()
    removed = _removed_pixels(mask, clean)
    assert torch.all(clean.grad[removed] == 0) and torch.all(clean.grad[~removed] != 0)
