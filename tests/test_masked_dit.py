import json

import pytest
import torch

from diffusers_masked.masking import random_mask
from diffusers_masked.models.masked_dit import MaskedDiTTransformer2DModel
from tests.tiny import BAD_TRANSFORMER_INPUTS, TINY_TRANSFORMER, tiny_transformer

TINY = TINY_TRANSFORMER


def tiny_model(**overrides):
    return tiny_transformer(**overrides)


def _inputs(batch=2, size=8, channels=3):
    return torch.randn(batch, channels, size, size), torch.rand(batch) - 0.5, torch.tensor([3, 10][:batch])


@pytest.mark.parametrize("preset", ["S/2", "B/2", "L/2", "XL/2"])
def test_every_preset_gives_full_size_output_and_echoes_the_mask(preset):
    # Real preset widths and depths, a tiny 8x8 grid (4x4 tokens) to stay fast.
    model = MaskedDiTTransformer2DModel.from_preset(preset, sample_size=8, in_channels=4, num_classes=10).eval()
    x = torch.randn(2, 4, 8, 8)
    mask = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.zeros(2), torch.tensor([1, 2]), mask=mask)
    assert out.sample.shape == (2, 4, 8, 8)
    assert torch.equal(out.mask, mask)


def test_preset_sizes_match_dit_and_the_maskdit_decoder():
    cfg = MaskedDiTTransformer2DModel.preset_config("XL/2")
    assert (cfg["num_layers"], cfg["num_attention_heads"] * cfg["attention_head_dim"], cfg["num_attention_heads"]) == (
        28,
        1152,
        16,
    )
    assert (cfg["decoder_num_layers"], cfg["decoder_num_attention_heads"] * cfg["decoder_attention_head_dim"]) == (
        8,
        512,
    )
    assert MaskedDiTTransformer2DModel.preset_config("S/4")["patch_size"] == 4
    with pytest.raises(ValueError, match="preset"):
        MaskedDiTTransformer2DModel.from_preset("M/2")


def test_preset_overrides_give_a_lighter_decoder():
    model = MaskedDiTTransformer2DModel.from_preset(
        "S/2", sample_size=8, decoder_num_layers=2, decoder_num_attention_heads=4, decoder_attention_head_dim=32
    )
    assert len(model.decoder_blocks) == 2 and model.decoder_dim == 128


def _analytic_param_count(D, Dd, L, Ld, patch, c_in, c_out, classes, freq=256, mlp=4):
    """Parameters from the layer shapes, written independently of the model code."""
    linear = lambda i, o: i * o + o  # noqa: E731
    time = linear(freq, D) + linear(D, D)
    labels = (classes + 1) * D
    patch_embed = c_in * patch * patch * D + D
    block = lambda w: 4 * linear(w, w) + linear(w, mlp * w) + linear(mlp * w, w) + linear(D, 6 * w)  # noqa: E731
    decoder_layer = linear(D, 2 * D) + linear(D, Dd)  # adaLN shift/scale of the encoder width, then D -> Dd
    decoder = decoder_layer + Dd + Ld * block(Dd)  # + the mask token
    final = linear(D, 2 * Dd) + linear(Dd, patch * patch * c_out)
    return time + labels + patch_embed + L * block(D) + decoder + final


def test_xl2_parameter_count_matches_analytic_count():
    # MaskDiT XL/2 with the paper's 8x512 decoder, 4 latent channels, 1000 classes (+ the null row): 730,116,368
    # parameters (the paper quotes ~730M against DiT-XL/2's 675M).
    with torch.device("meta"):
        model = MaskedDiTTransformer2DModel.from_preset("XL/2", sample_size=32, in_channels=4, num_classes=1000)
    count = sum(p.numel() for p in model.parameters())
    expected = _analytic_param_count(D=1152, Dd=512, L=28, Ld=8, patch=2, c_in=4, c_out=4, classes=1000)
    assert count == expected == 730_116_368


def test_masked_output_ignores_content_of_removed_patches():
    model = tiny_model()
    x, t, y = _inputs()
    mask = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(1))
    removed_pixels = mask.view(2, 4, 1, 4, 1).expand(2, 4, 2, 4, 2).reshape(2, 1, 8, 8).expand_as(x)
    changed = torch.where(removed_pixels, torch.randn_like(x) * 10, x)
    with torch.no_grad():
        a = model(x, t, y, mask=mask).sample
        b = model(changed, t, y, mask=mask).sample
    assert torch.equal(a, b)


def test_masked_output_depends_on_a_visible_patch():
    model = tiny_model()
    x, t, y = _inputs()
    mask = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(1))
    token = int((~mask[0]).nonzero()[0])
    row, col = divmod(token, 4)
    changed = x.clone()
    changed[0, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2] += 1.0
    with torch.no_grad():
        a = model(x, t, y, mask=mask).sample
        b = model(changed, t, y, mask=mask).sample
    assert not torch.allclose(a[0], b[0])
    assert torch.equal(a[1], b[1])  # samples do not interact


def test_without_decoder_removed_tokens_output_zeros():
    model = tiny_model(decoder_num_layers=0)
    x, t, y = _inputs()
    mask = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = model(x, t, y, mask=mask).sample
    removed = mask.view(2, 4, 1, 4, 1).expand(2, 4, 2, 4, 2).reshape(2, 1, 8, 8).expand_as(out)
    assert torch.all(out[removed] == 0)
    assert torch.all(out[~removed] != 0)


def test_empty_mask_equals_no_mask():
    model = tiny_model()
    x, t, y = _inputs()
    with torch.no_grad():
        a = model(x, t, y).sample
        b = model(x, t, y, mask=torch.zeros(2, 16, dtype=torch.bool)).sample
    torch.testing.assert_close(a, b)


def test_fresh_model_predicts_zero_because_adaln_zero():
    model = MaskedDiTTransformer2DModel(**TINY)
    x, t, y = _inputs()
    assert torch.count_nonzero(model(x, t, y).sample) == 0
    assert model.class_embedder.num_embeddings == 11  # ten classes + the null class


def test_non_square_input_is_supported():
    model = tiny_model()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 8, 12), torch.zeros(2), torch.tensor([0, 1]))
    assert out.sample.shape == (2, 3, 8, 12)


def test_unconditional_model_takes_no_labels():
    model = tiny_model(num_classes=0)
    x, t, _ = _inputs()
    assert model(x, t).sample.shape == x.shape
    with pytest.raises(ValueError, match="unconditional"):
        model(x, t, torch.tensor([0, 1]))


def test_save_and_load_round_trip_gives_identical_outputs(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    loaded = MaskedDiTTransformer2DModel.from_pretrained(tmp_path).eval()
    public = lambda cfg: {k: v for k, v in cfg.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(model.config)
    x, t, y = _inputs()
    mask = random_mask(2, 16, 0.25, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(x, t, y, mask=mask).sample, loaded(x, t, y, mask=mask).sample)


def test_config_round_trip():
    model = tiny_model()
    rebuilt = MaskedDiTTransformer2DModel.from_config(model.config)
    assert dict(rebuilt.config) == dict(model.config)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    x, t, y = _inputs()
    mask = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(0))

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
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-5, rtol=1e-5, msg=name)


def test_bf16_autocast_forward_is_finite():
    model = tiny_model()
    x, t, y = _inputs()
    mask = random_mask(2, 16, 0.5, generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t * 10, y, mask=mask).sample
    assert torch.isfinite(out.float()).all()


@pytest.mark.parametrize("call,match", BAD_TRANSFORMER_INPUTS)
def test_bad_input_is_a_clear_value_error(call, match):
    model = tiny_model()
    with pytest.raises(ValueError, match=match):
        call(model)


def test_mask_of_wrong_dtype_is_a_type_error():
    model = tiny_model()
    with pytest.raises(TypeError, match="dtype"):
        model(
            torch.randn(2, 3, 8, 8), torch.zeros(2), torch.tensor([0, 1]), mask=torch.zeros(2, 16, dtype=torch.int64)
        )


def test_bad_config_is_a_value_error():
    with pytest.raises(ValueError, match="sample_size"):
        MaskedDiTTransformer2DModel(sample_size=9, patch_size=2)
    with pytest.raises(ValueError, match="num_classes"):
        MaskedDiTTransformer2DModel(**{**TINY, "num_classes": -1})


def test_unmasked_encoder_stream_is_token_major_contiguous():
    # A strided [B, D, N] residual stream made every LayerNorm copy its input (a ~4% step-time cost at B/2).
    model = tiny_model()
    seen = []
    model.transformer_blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(*_inputs())
    assert seen == [True]


def _reference_attention(attention, x, w_qkv, b_qkv):
    """softmax(Q K^T / sqrt(d)) V per head, then the output projection, in x's dtype, from the given qkv weights."""
    heads, head_dim = attention.num_heads, attention.head_dim
    q, k, v = (x @ w_qkv.T + b_qkv).chunk(3, dim=-1)  # each [B, L, H*d], heads side by side
    split = lambda t: t.unflatten(-1, (heads, head_dim)).transpose(1, 2)  # noqa: E731  [B, H, L, d]
    weights = torch.softmax(split(q) @ split(k).transpose(-1, -2) / head_dim**0.5, dim=-1)
    out = (weights @ split(v)).transpose(1, 2).flatten(2)
    return out @ attention.to_out.weight.detach().to(x.dtype).T + attention.to_out.bias.detach().to(x.dtype)


def test_attention_equals_softmax_qk_v_in_float64():
    attention = tiny_model().transformer_blocks[0].attn1
    x = torch.randn(2, 5, attention.num_heads * attention.head_dim)
    with torch.no_grad():
        out = attention(x)
        expected = _reference_attention(
            attention, x.double(), attention.to_qkv.weight.double(), attention.to_qkv.bias.double()
        )
    torch.testing.assert_close(out.double(), expected, rtol=1e-5, atol=1e-6)


def test_attention_gradients_equal_the_float64_reference():
    # The backward of the fused projection's split (the part autograd assembles from three gradients) against the
    # same formula written out in float64, with one upstream gradient for both.
    attention = tiny_model().transformer_blocks[0].attn1
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, attention.num_heads * attention.head_dim, generator=generator).requires_grad_()
    upstream = torch.randn(x.shape, generator=generator)
    attention(x).backward(upstream)

    x64 = x.detach().double().requires_grad_()
    w_qkv = attention.to_qkv.weight.detach().double().requires_grad_()
    b_qkv = attention.to_qkv.bias.detach().double().requires_grad_()
    _reference_attention(attention, x64, w_qkv, b_qkv).backward(upstream.double())
    for ours, reference in [
        (x.grad, x64.grad),
        (attention.to_qkv.weight.grad, w_qkv.grad),
        (attention.to_qkv.bias.grad, b_qkv.grad),
    ]:
        # float32 sums over the 10 tokens: an absolute error of a few 1e-7 of the gradient's scale (a near-zero
        # entry then has a huge relative error; 1.7e-6 was seen on an AMD host with unseeded inputs).
        scale = reference.abs().max().item()
        torch.testing.assert_close(ours.double(), reference, rtol=1e-4, atol=1e-5 * scale)


def test_query_key_value_are_each_initialised_as_a_square_xavier_map():
    # Xavier on the fused (3D, D) matrix would shrink the init by sqrt(2); each D x D part must get sqrt(6 / 2D).
    model = MaskedDiTTransformer2DModel(**{**TINY, "num_attention_heads": 4, "attention_head_dim": 64})
    dim = 4 * 64
    for part in model.transformer_blocks[0].attn1.to_qkv.weight.detach().chunk(3, dim=0):
        bound = (6 / (2 * dim)) ** 0.5
        assert part.abs().max() <= bound
        assert part.abs().max() > 0.95 * bound  # 65k uniform draws reach within 5% of the bound
        assert part.std() == pytest.approx(bound / 3**0.5, rel=0.02)


def test_decoder_layer_is_the_papers_modulated_layernorm_then_projection_in_float64():
    # MaskDiT's decoder layer: LayerNorm without affine (eps 1e-6), x * (1 + scale) + shift with
    # (shift, scale) = Linear(SiLU(c)), then Linear(D -> D_dec); written here from that description.
    model = tiny_transformer(seed=3).double()
    layer = model.decoder_layer
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, model.inner_dim, generator=generator, dtype=torch.float64)
    cond = torch.randn(2, model.inner_dim, generator=generator, dtype=torch.float64)
    mean, var = x.mean(-1, keepdim=True), x.var(-1, unbiased=False, keepdim=True)
    normed = (x - mean) / torch.sqrt(var + 1e-6)
    shift, scale = (torch.nn.functional.silu(cond) @ layer.modulation.weight.T + layer.modulation.bias).chunk(2, dim=1)
    expected = (normed * (1 + scale[:, None]) + shift[:, None]) @ layer.proj.weight.T + layer.proj.bias
    assert layer.proj.weight.shape == (model.decoder_dim, model.inner_dim)
    torch.testing.assert_close(layer(x, cond), expected, rtol=1e-12, atol=1e-12)


def test_decoder_layer_starts_at_zero_so_the_decoder_first_sees_only_mask_token_and_positions():
    model = MaskedDiTTransformer2DModel(**TINY)
    for layer in (model.decoder_layer.modulation, model.decoder_layer.proj):
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0


def test_decoder_input_is_invariant_to_the_scale_of_the_encoder_stream():
    # The encoder's residual stream is layer-normalised before the projection (the bare Linear it replaces was not).
    model = tiny_transformer(seed=1).double()
    x = torch.randn(2, 7, model.inner_dim, dtype=torch.float64)
    cond = torch.randn(2, model.inner_dim, dtype=torch.float64)
    # (up to the 1e-6 epsilon under the square root)
    torch.testing.assert_close(model.decoder_layer(5.0 * x, cond), model.decoder_layer(x, cond), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_layers", [3, 1], ids=["weights-missing", "weights-left-over"])
def test_loading_weights_that_do_not_fit_the_config_fails_naming_the_keys(tmp_path, num_layers):
    # A config edited by hand (or saved apart from its weights): diffusers only warns and leaves meta tensors or
    # drops weights; we refuse at load.
    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["num_layers"] = num_layers
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"do not fit its config.*transformer_blocks\.[12]\."):
        MaskedDiTTransformer2DModel.from_pretrained(tmp_path)
