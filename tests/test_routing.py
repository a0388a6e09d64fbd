"""Token routing (TREAD): route parsing and validation, our models' routed forward, the hooks on diffusers' own DiT
and PixArt, and the objective's draws.

References are written from the method's description with advanced indexing (not the package's gather/scatter):
before block `start` the sequence is kept and `x[b, ids[b]]` goes on; after block `end` a copy of the kept sequence
gets the blocks' outputs written at `ids`.
"""

import contextlib

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from diffusers.models.embeddings import LabelEmbedding

from diffusers_masked import EDMHeunScheduler, MaskedDDPMScheduler
from diffusers_masked.masking import unpatchify
from diffusers_masked.routing import (
    Route,
    default_route,
    draw_route_ids,
    parse_routes,
    resolve_routes,
    routed_fraction,
    routes_to_json,
    token_routing,
)
from tests.tiny import tiny_transformer, tiny_uvit

BATCH = 3


# ----------------------------------------------------------------------------------------------------------------
# Routes
# ----------------------------------------------------------------------------------------------------------------


def test_parse_routes_takes_the_json_form_and_resolves_negative_indices():
    routes = parse_routes('[{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -4}]')
    assert routes == (Route(0.5, 2, -4),)
    assert resolve_routes(routes, 12) == (Route(0.5, 2, 8),)
    assert resolve_routes(routes, 28) == (Route(0.5, 2, 24),)
    assert parse_routes(None) == parse_routes("none") == parse_routes("[]") == ()
    assert parse_routes({"selection_ratio": 0.25, "start_layer_idx": 0, "end_layer_idx": 0}) == (Route(0.25, 0, 0),)
    assert routes_to_json(routes) == '[{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": -4}]'
    assert routes_to_json(None) is None


def test_default_route_is_the_authors_placement():
    assert default_route(12) == Route(0.5, 2, 8)  # DiT-B/2, the TREAD config
    assert default_route(28) == Route(0.5, 2, 24)  # DiT-XL/2, "i = 2, j = B - 4"
    assert default_route(4) == Route(0.5, 0, 0)


@pytest.mark.parametrize(
    "routes, match",
    [
        (
            '[{"selection_ratio": 1.0, "start_layer_idx": 2, "end_layer_idx": 4}]',
            r"route 0 .*selection_ratio.*\[0, 1\)",
        ),
        ('[{"selection_ratio": -0.1, "start_layer_idx": 2, "end_layer_idx": 4}]', r"selection_ratio.*\[0, 1\)"),
        ('[{"selection_ratio": true, "start_layer_idx": 2, "end_layer_idx": 4}]', "selection_ratio"),
        ('[{"selection_ratio": 0.5, "start_layer_idx": 2.0, "end_layer_idx": 4}]', "start_layer_idx must be an int"),
        ('[{"selection_ratio": 0.5, "start_layer_idx": 2}]', r"route 0 .*missing: \['end_layer_idx'\]"),
        ('[{"ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 4}]', r"unknown: \['ratio'\]"),
        ("[{selection_ratio: 0.5}]", "must be JSON"),
        ("[1, 2]", "route 0 must be a dict"),
        ("3", "must be a list of routes"),
    ],
)
def test_malformed_routes_raise_value_error_naming_the_route_and_rule(routes, match):
    with pytest.raises(ValueError, match=match):
        parse_routes(routes)


@pytest.mark.parametrize(
    "routes, match",
    [
        ([Route(0.5, 4, 2)], r"start_layer_idx \(4\) must be <= end_layer_idx \(2\)"),
        ([Route(0.5, 2, 6)], r"end_layer_idx must name one of the 6 routable blocks"),
        ([Route(0.5, -7, 3)], r"start_layer_idx must name one of the 6"),
        ([Route(0.5, 0, 2), Route(0.5, 2, 4)], "must start after the previous route"),
        ([Route(0.5, 3, 4), Route(0.5, 0, 1)], "block order"),
    ],
)
def test_routes_that_do_not_fit_the_model_raise_value_error(routes, match):
    with pytest.raises(ValueError, match=match) as info:
        resolve_routes(routes, 6)
    assert '"selection_ratio"' in str(info.value)  # the route is named


def test_kept_count_is_n_minus_floor_n_ratio_and_at_least_one():
    assert Route(0.5, 0, 0).num_kept(256) == 128
    assert Route(0.5, 0, 0).num_kept(9) == 5  # floor(4.5) = 4 routed
    assert Route(0.3, 0, 0).num_kept(10) == 7  # 0.3 * 10 is 2.9999999999999996 in floats
    assert Route(0.99, 0, 0).num_kept(3) == 1
    assert routed_fraction([Route(0.5, 2, 8)], 12) == pytest.approx(0.5 * 7 / 12)


def test_drawn_ids_are_a_sorted_uniform_subset_per_sample():
    ids = draw_route_ids((Route(0.5, 0, 0), Route(0.25, 1, 1)), 4, 9, torch.Generator().manual_seed(0))
    assert [tuple(t.shape) for t in ids] == [(4, 5), (4, 7)]
    for tensor in ids:
        assert tensor.dtype == torch.long
        assert (tensor.diff(dim=1) > 0).all() and tensor.min() >= 0 and tensor.max() < 9
    # The same recipe, drawn here: one rand per route, the `kept` smallest noises.
    generator = torch.Generator().manual_seed(0)
    first = torch.rand(4, 9, generator=generator).argsort(dim=1)[:, :5]
    assert torch.equal(ids[0], first.sort(dim=1).values)
    # Over many draws every token is kept about equally often.
    many = draw_route_ids((Route(0.5, 0, 0),), 4000, 9, torch.Generator().manual_seed(1))[0]
    counts = torch.bincount(many.flatten(), minlength=9).float() / 4000
    torch.testing.assert_close(counts, torch.full((9,), 5 / 9), atol=0.03, rtol=0)


# ----------------------------------------------------------------------------------------------------------------
# Our models
# ----------------------------------------------------------------------------------------------------------------


def _take(x, ids):
    return x[torch.arange(x.shape[0])[:, None], ids]


def _put(base, ids, values):
    out = base.clone()
    out[torch.arange(base.shape[0])[:, None], ids] = values
    return out


def dit_reference(model, x, t, y, route, ids):
    """MaskedDiT without a mask, routed, from its parts: embed, blocks with the route, (decoder,) final layer."""
    cond = model.timestep_embedder(model.time_proj(t)) + model.class_embedder(y)
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    for i, block in enumerate(model.transformer_blocks):
        if i == route.start_layer_idx:
            saved, tokens = tokens, _take(tokens, ids)
        tokens = block(tokens, cond)
        if i == route.end_layer_idx:
            tokens = _put(saved, ids, tokens)
    if model.decoder_layer is not None:
        tokens = model.decoder_layer(tokens, cond) + model.decoder_pos_embed
        for block in model.decoder_blocks:
            tokens = block(tokens, cond)
    return unpatchify(model.final_layer(tokens, cond), model.config.patch_size, x.shape[2], x.shape[3])


def dit_inputs(size=8, channels=3):
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(BATCH, channels, size, size, generator=generator)
    return x, torch.rand(BATCH, generator=generator), torch.tensor([1, 4, 10])[:BATCH]


@pytest.mark.parametrize("decoder_num_layers", [0, 1])
@pytest.mark.parametrize("size", [8, 6])  # 16 tokens, and an odd count: 9
def test_masked_dit_routed_forward_matches_gather_blocks_scatter(decoder_num_layers, size):
    model = tiny_transformer(seed=0, num_layers=5, decoder_num_layers=decoder_num_layers, sample_size=size).train()
    x, t, y = dit_inputs(size)
    route = Route(0.5, 1, 3)
    num_tokens = (size // 2) ** 2
    (ids,) = draw_route_ids((route,), BATCH, num_tokens, torch.Generator().manual_seed(5))
    assert ids.shape == (BATCH, num_tokens - num_tokens // 2)
    out = model(x, t, y, routes=[route], route_ids=(ids,)).sample
    torch.testing.assert_close(out, dit_reference(model, x, t, y, route, ids), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out, model(x, t, y).sample, atol=1e-4)  # routing changed something


def test_masked_dit_routing_off_in_eval_or_no_grad_is_the_unrouted_forward():
    model = tiny_transformer(seed=0, num_layers=4, decoder_num_layers=0)
    x, t, y = dit_inputs()
    routes = [Route(0.5, 1, 2)]
    model.eval()
    assert torch.equal(model(x, t, y, routes=routes).sample, model(x, t, y).sample)
    model.train()
    with torch.no_grad():
        assert torch.equal(model(x, t, y, routes=routes).sample, model(x, t, y).sample)


def _block_io(blocks, start, end):
    """Hooks that record the sequence entering block `start` (as the previous block left it) and leaving block
    `end` (as the next block gets it)."""
    seen = {}
    handles = [
        blocks[start - 1].register_forward_hook(lambda m, a, o: seen.__setitem__("in", o)),
        blocks[end + 1].register_forward_pre_hook(lambda m, a: seen.__setitem__("out", a[0])),
    ]
    return seen, handles


def test_masked_dit_routed_tokens_skip_the_span_and_get_no_gradient_from_it():
    model = tiny_transformer(seed=0, num_layers=6, decoder_num_layers=0).train()
    x, t, y = dit_inputs()
    route = Route(0.5, 2, 3)
    (ids,) = draw_route_ids((route,), BATCH, 16, torch.Generator().manual_seed(2))
    routed = torch.ones(BATCH, 16, dtype=torch.bool)
    routed[torch.arange(BATCH)[:, None], ids] = False

    # The sequence entering block 2 becomes a leaf, so gradients can be read at it.
    leaf = {}

    def make_leaf(module, args, output):
        leaf["x"] = output.detach().requires_grad_()
        return leaf["x"]

    seen, handles = _block_io(model.transformer_blocks, 2, 3)
    handles.append(model.transformer_blocks[1].register_forward_hook(make_leaf))
    try:
        model(x, t, y, routes=[route], route_ids=(ids,))
    finally:
        for handle in handles:
            handle.remove()
    entered, left = leaf["x"], seen["out"]
    assert torch.equal(left[routed], entered[routed])  # routed tokens leave exactly as they entered
    assert not torch.allclose(left[~routed], entered[~routed])  # kept tokens were computed
    (grad,) = torch.autograd.grad(left[~routed].square().sum(), entered)
    assert torch.count_nonzero(grad[routed]) == 0
    assert torch.count_nonzero(grad[~routed]) > 0


def test_masked_dit_routes_the_visible_tokens_of_a_mask():
    model = tiny_transformer(seed=0, num_layers=4, decoder_num_layers=1).train()
    x, t, y = dit_inputs()
    mask = torch.zeros(BATCH, 16, dtype=torch.bool)
    mask[:, ::2] = True  # 8 visible
    route = Route(0.5, 1, 2)
    (ids,) = draw_route_ids((route,), BATCH, 8, torch.Generator().manual_seed(0))
    out = model(x, t, y, mask=mask, routes=[route], route_ids=(ids,)).sample
    # Reference: the encoder on the visible tokens with the route, the decoder as usual.
    cond = model.timestep_embedder(model.time_proj(t)) + model.class_embedder(y)
    tokens = (model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed)[:, 1::2]
    for i, block in enumerate(model.transformer_blocks):
        if i == 1:
            saved, tokens = tokens, _take(tokens, ids)
        tokens = block(tokens, cond)
        if i == 2:
            tokens = _put(saved, ids, tokens)
    tokens = model.decoder_layer(tokens, cond)
    full = model.mask_token.expand(BATCH, 16, -1).clone()
    full[:, 1::2] = tokens
    full = model.decoder_blocks[0](full + model.decoder_pos_embed, cond)
    expected = unpatchify(model.final_layer(full, cond), 2, 8, 8)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match=r"route_ids .* shape \(3, 4\)"):
        model(x, t, y, mask=mask, routes=[route], route_ids=(torch.zeros(BATCH, 8, dtype=torch.long),))


def uvit_reference(model, x, t, y, route, ids):
    """U-ViT, routed over its patch tokens (time and label tokens always computed), from its parts."""
    extras = model.num_extra_tokens
    patches = model.patch_embed(x).flatten(2).transpose(1, 2)
    tokens = torch.cat([model.class_embedder(y)[:, None], model.time_proj(t)[:, None], patches], 1) + model.pos_embed
    blocks = [*model.in_blocks, model.mid_block, *model.out_blocks]
    skips = []
    for i, block in enumerate(blocks):
        if i == route.start_layer_idx:
            saved = tokens
            tokens = torch.cat([tokens[:, :extras], _take(tokens[:, extras:], ids)], 1)
        if i < len(model.in_blocks):
            tokens = block(tokens)
            skips.append(tokens)
        elif i == len(model.in_blocks):
            tokens = block(tokens)
        else:
            tokens = block(tokens, skips.pop())
        if i == route.end_layer_idx:
            tokens = torch.cat([tokens[:, :extras], _put(saved[:, extras:], ids, tokens[:, extras:])], 1)
    out = model.proj_out(model.norm_out(tokens[:, extras:]))
    return unpatchify(out, model.config.patch_size, x.shape[2], x.shape[3])


def test_uvit_routed_forward_matches_reference_and_never_routes_the_extra_tokens():
    model = tiny_uvit(seed=0, num_layers=7).train()
    x, t, y = dit_inputs()
    t = t * 900
    route = Route(0.5, 1, 5)
    (ids,) = draw_route_ids((route,), BATCH, 16, torch.Generator().manual_seed(4))
    out = model(x, t, y, routes=[route], route_ids=(ids,)).sample
    torch.testing.assert_close(out, uvit_reference(model, x, t, y, route, ids), rtol=1e-5, atol=1e-6)
    model.eval()
    assert torch.equal(model(x, t, y, routes=[route]).sample, model(x, t, y).sample)


@pytest.mark.parametrize("route", [Route(0.5, 1, 4), Route(0.5, 0, 3), Route(0.5, 4, 6)])
def test_uvit_refuses_a_route_that_splits_a_long_skip(route):
    model = tiny_uvit(seed=0, num_layers=7).train()
    x, t, y = dit_inputs()
    with pytest.raises(ValueError, match=r"splits a long skip.*start_layer_idx \+ end_layer_idx == 6"):
        model(x, t, y, routes=[route])


@pytest.mark.parametrize("make", [lambda: tiny_transformer(seed=0, num_layers=4), lambda: tiny_uvit(seed=0)])
def test_our_models_checkpointing_on_and_off_give_the_same_routed_outputs_and_gradients(make):
    x, t, y = dit_inputs()
    t = t * 900
    routes = [Route(0.5, 1, 3)]
    (ids,) = draw_route_ids(tuple(routes), BATCH, 16, torch.Generator().manual_seed(0))
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = make().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        out = model(x, t, y, routes=routes, route_ids=(ids,)).sample
        out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------------
# The objective
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mask_ratio", [0.0, 0.5])
def test_loss_draws_route_ids_after_mask_sigma_and_noise(mask_ratio):
    model = tiny_transformer(seed=0, num_layers=4).train()
    scheduler = EDMHeunScheduler()
    clean = torch.randn(BATCH, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 3, 9])
    routes = [Route(0.5, 1, 2)]
    seen = {}
    handle = model.register_forward_pre_hook(lambda m, a, k: seen.update(args=a, kwargs=k), with_kwargs=True)
    try:
        plain_gen = torch.Generator().manual_seed(7)
        plain = scheduler.masked_training_loss(model, clean, labels, mask_ratio=mask_ratio, generator=plain_gen)
        plain_input = seen["args"][0]
        routed_gen = torch.Generator().manual_seed(7)
        routed = scheduler.masked_training_loss(
            model, clean, labels, mask_ratio=mask_ratio, generator=routed_gen, routes=routes
        )
    finally:
        handle.remove()
    assert torch.equal(plain.mask, routed.mask)
    assert torch.equal(seen["args"][0], plain_input)  # the same sigma and noise
    num_visible = 16 - int(plain.mask[0].sum())
    expected = torch.rand(BATCH, num_visible, generator=plain_gen).argsort(dim=1)[:, : num_visible - num_visible // 2]
    assert torch.equal(seen["kwargs"]["route_ids"][0], expected.sort(dim=1).values)
    assert torch.equal(routed_gen.get_state(), plain_gen.get_state())
    assert not torch.allclose(plain.loss, routed.loss)


def test_loss_in_eval_draws_nothing_for_routes_and_equals_the_unrouted_loss():
    model = tiny_transformer(seed=0, num_layers=4).eval()
    scheduler = EDMHeunScheduler()
    clean = torch.randn(BATCH, 3, 8, 8)
    labels = torch.tensor([0, 3, 9])
    a = scheduler.masked_training_loss(model, clean, labels, generator=torch.Generator().manual_seed(1))
    gen = torch.Generator().manual_seed(1)
    b = scheduler.masked_training_loss(model, clean, labels, generator=gen, routes="[]")
    c = scheduler.masked_training_loss(
        model, clean, labels, generator=torch.Generator().manual_seed(1), routes=[Route(0.5, 1, 2)]
    )
    assert torch.equal(a.loss, b.loss) and torch.equal(a.loss, c.loss)


def test_loss_routes_on_a_stock_model_point_to_token_routing():
    model = tiny_dit().train()
    with pytest.raises(TypeError, match="token_routing"):
        MaskedDDPMScheduler().masked_training_loss(
            model, torch.randn(2, 4, 8, 8), torch.tensor([0, 1]), routes=[Route(0.5, 1, 2)]
        )


# ----------------------------------------------------------------------------------------------------------------
# diffusers' DiT and PixArt, by hooks
# ----------------------------------------------------------------------------------------------------------------


def tiny_dit(num_layers=6, sample_size=8, seed=0):
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=2,
        num_embeds_ada_norm=10,
    )
    with torch.no_grad():  # adaLN-Zero and the zero output layer would make every output zero
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape))
    for module in model.modules():  # deterministic train-mode labels (the trainer drops labels once itself)
        if isinstance(module, LabelEmbedding):
            module.dropout_prob = 0.0
    return model


def tiny_pixart(num_layers=4, seed=0):
    torch.manual_seed(seed)
    model = PixArtTransformer2DModel(
        sample_size=8,
        num_layers=num_layers,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=16,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
    )
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.2 * torch.randn(parameter.shape))
    return model


def dit_call(model, size=8):
    generator = torch.Generator().manual_seed(11)
    x = torch.randn(BATCH, 4, size, size, generator=generator)
    t = torch.randint(0, 1000, (BATCH,), generator=generator)
    y = torch.tensor([1, 4, 9])
    return (x,), {"timestep": t, "class_labels": y}


def pixart_call(model, size=8):
    generator = torch.Generator().manual_seed(12)
    x = torch.randn(BATCH, 4, size, size, generator=generator)
    text = torch.randn(BATCH, 5, 16, generator=generator)
    text_mask = torch.ones(BATCH, 5)
    text_mask[0, 3:] = 0
    t = torch.randint(0, 1000, (BATCH,), generator=generator)
    kwargs = {
        "encoder_hidden_states": text,
        "encoder_attention_mask": text_mask,
        "timestep": t,
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    return (x,), kwargs


STOCK = [(tiny_dit, dit_call), (tiny_pixart, pixart_call)]


def dit_stock_reference(model, x, t, y, route, ids):
    """diffusers' DiT forward, written out, with the route."""
    tokens = model.pos_embed(x)
    for i, block in enumerate(model.transformer_blocks):
        if i == route.start_layer_idx:
            saved, tokens = tokens, _take(tokens, ids)
        tokens = block(tokens, timestep=t, class_labels=y)
        if i == route.end_layer_idx:
            tokens = _put(saved, ids, tokens)
    conditioning = model.transformer_blocks[0].norm1.emb(t, y, hidden_dtype=tokens.dtype)
    shift, scale = model.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
    tokens = model.proj_out_2(model.norm_out(tokens) * (1 + scale[:, None]) + shift[:, None])
    return unpatchify(tokens, model.config.patch_size, x.shape[2], x.shape[3])


@pytest.mark.parametrize("size", [8, 6])  # 16 tokens, and 9
def test_stock_dit_routed_forward_matches_gather_blocks_scatter(size):
    model = tiny_dit(sample_size=size).train()
    (x,), kwargs = dit_call(model, size)
    route = Route(0.5, 1, 4)
    with token_routing(model, [route], generator=torch.Generator().manual_seed(0)) as routing:
        out = model(x, **kwargs).sample
    (ids,) = routing.last_ids
    num_tokens = (size // 2) ** 2
    assert ids.shape == (BATCH, num_tokens - num_tokens // 2)
    (expected_ids,) = draw_route_ids((route,), BATCH, num_tokens, torch.Generator().manual_seed(0))
    assert torch.equal(ids, expected_ids)
    expected = dit_stock_reference(model, x, kwargs["timestep"], kwargs["class_labels"], route, ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_stock_pixart_routed_forward_matches_gather_blocks_scatter():
    model = tiny_pixart().train()
    (x,), kwargs = pixart_call(model)
    route = Route(0.5, 1, 2)
    # The reference: the model's own forward, with the route done by hand inside its block list.
    blocks = model.transformer_blocks
    with token_routing(model, [route], generator=torch.Generator().manual_seed(0)) as routing:
        out = model(x, **kwargs).sample
    (ids,) = routing.last_ids
    saved = {}

    def gather(module, args, kw):
        saved["x"] = args[0]
        return (_take(args[0], ids), *args[1:]), kw

    handles = [
        blocks[1].register_forward_pre_hook(gather, with_kwargs=True),
        blocks[2].register_forward_hook(lambda m, a, o: _put(saved["x"], ids, o)),
    ]
    try:
        expected = model(x, **kwargs).sample
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    assert not torch.allclose(out, model(x, **kwargs).sample, atol=1e-4)


@pytest.mark.parametrize("make, call", STOCK)
def test_stock_routing_off_in_eval_or_no_grad_is_bit_identical(make, call):
    model = make()
    args, kwargs = call(model)
    routes = '[{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]'
    for mode in ("eval", "no_grad"):
        model.train(mode != "eval")
        context = torch.no_grad() if mode == "no_grad" else contextlib.nullcontext()
        with context:
            stock = model(*args, **kwargs).sample
            with token_routing(model, routes) as routing:
                routed = model(*args, **kwargs).sample
        assert torch.equal(stock, routed), mode
        assert routing.last_ids is None


def _hook_count(model):
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


@pytest.mark.parametrize("make, call", STOCK)
def test_stock_hooks_are_gone_after_the_block_also_on_an_exception(make, call):
    model = make().train()
    args, kwargs = call(model)
    before = _hook_count(model)
    with token_routing(model, [Route(0.5, 0, 1)]):
        assert _hook_count(model) == before + 4
    assert _hook_count(model) == before
    with pytest.raises(KeyError):
        with token_routing(model, [Route(0.5, 0, 1)]):
            raise KeyError("boom")
    assert _hook_count(model) == before
    torch.manual_seed(0)
    with torch.no_grad():
        model.eval()
        reference = model(*args, **kwargs).sample
        with token_routing(model, [Route(0.5, 0, 1)]):
            pass
        assert torch.equal(model(*args, **kwargs).sample, reference)


def test_stock_dit_routed_tokens_skip_the_span_and_get_no_gradient_from_it():
    model = tiny_dit().train()
    (x,), kwargs = dit_call(model)
    leaf = {}

    def make_leaf(module, args, output):
        leaf["x"] = output.detach().requires_grad_()
        return leaf["x"]

    seen, handles = _block_io(model.transformer_blocks, 2, 3)
    handles.append(model.transformer_blocks[1].register_forward_hook(make_leaf))
    try:
        with token_routing(model, [Route(0.5, 2, 3)]) as routing:
            model(x, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
    (ids,) = routing.last_ids
    routed = torch.ones(BATCH, 16, dtype=torch.bool)
    routed[torch.arange(BATCH)[:, None], ids] = False
    entered, left = leaf["x"], seen["out"]
    assert torch.equal(left[routed], entered[routed])
    (grad,) = torch.autograd.grad(left[~routed].square().sum(), entered)
    assert torch.count_nonzero(grad[routed]) == 0 and torch.count_nonzero(grad[~routed]) > 0


@pytest.mark.parametrize("make, call", STOCK)
def test_stock_checkpointing_on_and_off_give_the_same_routed_outputs_and_gradients(make, call):
    results = []
    for checkpointing in (False, True):
        model = make().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        args, kwargs = call(model)
        with token_routing(model, [Route(0.5, 1, 2)], generator=torch.Generator().manual_seed(3)):
            out = model(*args, **kwargs).sample
            out.square().mean().backward()
        results.append((out.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (out_a, grads_a), (out_b, grads_b) = results
    assert torch.equal(out_a, out_b)
    assert len(grads_a) == len(grads_b) > 0
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_stock_checkpointing_refuses_a_second_routed_forward_before_backward():
    model = tiny_dit().train()
    model.enable_gradient_checkpointing()
    args, kwargs = dit_call(model)
    with token_routing(model, [Route(0.5, 1, 2)]):
        first = model(*args, **kwargs).sample
        with torch.no_grad():
            model(*args, **kwargs)  # not routed, so allowed
        with pytest.raises(RuntimeError, match="second routed forward before the backward"):
            model(*args, **kwargs)
        first.sum().backward()
        model(*args, **kwargs).sample.sum().backward()  # fine after the backward


def test_stock_pixart_refuses_an_image_attention_mask():
    model = tiny_pixart().train()
    args, kwargs = pixart_call(model)
    with token_routing(model, [Route(0.5, 1, 2)]):
        with pytest.raises(ValueError, match="attention_mask"):
            model(*args, attention_mask=torch.ones(BATCH, 16), **kwargs)


def test_token_routing_refuses_other_models_naming_the_supported_ones():
    sd3 = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
    )
    with pytest.raises(TypeError, match="DiTTransformer2DModel and PixArtTransformer2DModel.*SD3Transformer2DModel"):
        with token_routing(sd3, [Route(0.5, 0, 0)]):
            pass
    with pytest.raises(TypeError, match="routes= to its forward"):
        with token_routing(tiny_transformer(), [Route(0.5, 0, 0)]):
            pass
    with pytest.raises(ValueError, match="end_layer_idx must name one of the 6"):
        with token_routing(tiny_dit(), [Route(0.5, 0, 6)]):
            pass


def test_stock_dit_trains_with_the_objective_under_token_routing():
    model = tiny_dit().train()
    scheduler = MaskedDDPMScheduler()
    latents = torch.randn(BATCH, 4, 8, 8)
    labels = torch.tensor([1, 2, 3])
    with token_routing(model, [Route(0.5, 1, -2)], generator=torch.Generator().manual_seed(0)) as routing:
        loss = scheduler.masked_training_loss(model, latents, labels, generator=torch.Generator().manual_seed(1))
        loss.loss.backward()
    assert routing.last_ids[0].shape == (BATCH, 8)
    assert torch.isfinite(loss.loss)
    assert all(p.grad is not None for p in model.transformer_blocks[2].parameters() if p.requires_grad)


# ----------------------------------------------------------------------------------------------------------------
# The scripts' --tread_routes
# ----------------------------------------------------------------------------------------------------------------


def _script(name):
    from tests.test_scripts import _script as load

    return load(name)


def test_scripts_check_tread_routes_against_the_model_before_any_work(capsys):
    maskdit, maskdm = _script("train_maskdit"), _script("train_maskdm")
    args = maskdit.parse_args(
        ["--tread_routes", '{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}']
    )
    assert args.tread_routes == '[{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]'
    assert maskdit.parse_args(["--tread_routes", "none"]).tread_routes is None
    assert maskdm.parse_args(
        ["--tread_routes", '[{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]']
    )
    for script, routes, match in [
        (maskdit, '[{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 6}]', "one of the 6 routable"),
        (maskdit, "[{", "must be JSON"),
        (maskdm, '[{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": 3}]', "splits a long skip"),
    ]:
        with pytest.raises(SystemExit):
            script.parse_args(["--tread_routes", routes])
        assert match in capsys.readouterr().err


@pytest.mark.slow
def test_a_tread_run_of_our_dit_records_its_routes_in_the_config_and_card_not_the_model(tmp_path):
    import json

    from tests.launch import launch

    out = tmp_path / "tread"
    routes = '[{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]'
    model = {"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 16, "decoder_num_layers": 0}
    launch(
        _script("train_maskdit").__file__,
        "--output_dir", str(out), "--model_config", json.dumps(model), "--mask_ratio", "0",
        "--mae_loss_weight", "0", "--max_train_steps", "3", "--unmask_tuning_steps", "0", "--resolution", "8",
        "--train_batch_size", "8", "--num_inference_steps", "2", "--num_eval_samples_per_class", "0",
        "--validation_steps", "0", "--report_to", "none", "--cpu_threads", "1", "--tread_routes", routes,
    )  # fmt: skip
    assert json.loads((out / "training_config.json").read_text())["tread_routes"] == routes
    assert "token routing (TREAD" in (out / "README.md").read_text()
    assert "tread" not in (out / "transformer" / "config.json").read_text()


def test_the_strategies_pages_python_snippets_run():
    import re
    from pathlib import Path

    page = (Path(__file__).resolve().parents[1] / "docs" / "strategies.md").read_text()
    snippets = re.findall(r"```python\n(.*?)```", page, flags=re.S)
    assert len(snippets) == 3
    for snippet in snippets:
        exec(compile(snippet, "docs/strategies.md", "exec"), {})
