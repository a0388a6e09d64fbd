"""Conversion of official MaskDiT checkpoints and diffusers' DiT, against float64 references written here from the
architecture description (timm attention, tanh-GELU MLP, adaLN-Zero blocks, one-hot label Linear, MAE-style
unmasking) and against diffusers' own DiT."""

import argparse
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiffusionPipeline, DiTTransformer2DModel

from diffusers_masked import MaskDiTPipeline, MaskedDiTTransformer2DModel
from diffusers_masked.conversion import (
    convert_dit_transformer,
    convert_maskdit_checkpoint,
    convert_maskdit_state_dict,
    imagenet_id2label,
    load_vae,
    maskdit_config_from_state_dict,
    maskdit_scheduler,
    recorded_model_type,
    select_state_dict,
)
from diffusers_masked.utils.safe_loading import load_torch_file
from tests.tiny import tiny_vae

REPO = Path(__file__).resolve().parents[1]

# A tiny official MaskDiT: encoder 24 wide (2 heads), decoder 16 wide (2 heads), 4 latent channels, 8x8 input.
TINY_OFFICIAL = dict(
    width=24, depth=2, decoder_width=16, decoder_depth=1, in_channels=4, patch=2, input_size=8, num_classes=10
)
HEADS = dict(num_attention_heads=2, decoder_num_attention_heads=2)


# ---------------------------------------------------------------------------------------------------------------
# The official model, from its description


def sincos_table(dim, grid):
    """MAE's fixed positions in float64: row-major tokens, first half of the channels from the column index,
    second half from the row index, each half [sin | cos] over frequencies 1 / 10000^(k / (dim / 4))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def one_axis(pos):
        out = pos[:, None] * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    rows, cols = torch.meshgrid(
        torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij"
    )
    return torch.cat([one_axis(cols.reshape(-1)), one_axis(rows.reshape(-1))], dim=1)


def official_state_dict(
    seed=0,
    width=24,
    depth=2,
    decoder_width=16,
    decoder_depth=1,
    in_channels=4,
    patch=2,
    input_size=8,
    num_classes=10,
    out_channels=None,
    prefix="model.",
    meta=False,
):
    """An EDMPrecond-wrapped MaskDiT state dict with the official names and shapes and random values (with `meta`,
    shapes only: tensors on the meta device, for the real sizes)."""
    generator = torch.Generator().manual_seed(seed)
    out_channels = out_channels or in_channels
    grid = input_size // patch

    def rand(*shape):
        return torch.empty(*shape, device="meta") if meta else 0.3 * torch.randn(*shape, generator=generator)

    sd = {}

    def linear(name, n_in, n_out, bias=True):
        sd[f"{name}.weight"] = rand(n_out, n_in)
        if bias:
            sd[f"{name}.bias"] = rand(n_out)

    def block(name, dim):
        linear(f"{name}.attn.qkv", dim, 3 * dim)
        linear(f"{name}.attn.proj", dim, dim)
        linear(f"{name}.mlp.fc1", dim, 4 * dim)
        linear(f"{name}.mlp.fc2", 4 * dim, dim)
        linear(f"{name}.adaLN_modulation.1", width, 6 * dim)

    sd["x_embedder.proj.weight"] = rand(width, in_channels, patch, patch)
    sd["x_embedder.proj.bias"] = rand(width)
    sd["pos_embed"] = sincos_table(width, grid).float()[None]
    linear("t_embedder.mlp.0", 256, width)
    linear("t_embedder.mlp.2", width, width)
    if num_classes:
        sd["y_embedder.embedding_table.weight"] = rand(width, num_classes)
    for i in range(depth):
        block(f"blocks.{i}", width)
    final_width = width
    if decoder_depth:
        linear("decoder_layer.adaLN_modulation.1", width, 2 * width)
        linear("decoder_layer.linear", width, decoder_width)
        sd["decoder_pos_embed"] = sincos_table(decoder_width, grid).float()[None]
        sd["mask_token"] = rand(1, 1, decoder_width)
        for i in range(decoder_depth):
            block(f"decoder_blocks.{i}", decoder_width)
        final_width = decoder_width
    linear("final_layer.adaLN_modulation.1", width, 2 * final_width)
    linear("final_layer.linear", final_width, patch * patch * out_channels)
    return {prefix + key: value for key, value in sd.items()}


def official_forward(sd, x, c_noise, y_onehot, heads=2, decoder_heads=2, ids_shuffle=None, num_keep=None):
    """The official DiT-with-decoder forward in float64. `ids_shuffle` (B, N) with `num_keep` kept: the training
    path, the first `num_keep` of each row kept in that order, the rest replaced after the decoder layer by the mask
    token (official `unmask_tokens`: concatenate, gather by the inverse permutation)."""
    sd = {k.removeprefix("model."): v.double() for k, v in sd.items()}
    x, c_noise = x.double(), c_noise.double()
    p = sd["x_embedder.proj.weight"].shape[-1]

    def lin(name, h):
        return h @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def layer_norm(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    def modulate(h, shift, scale):
        return h * (1 + scale[:, None]) + shift[:, None]

    def attention(name, h, num_heads):
        b, n, d = h.shape
        qkv = lin(f"{name}.qkv", h).reshape(b, n, 3, num_heads, d // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1) * (d // num_heads) ** -0.5).softmax(-1)
        return lin(f"{name}.proj", (attn @ v).transpose(1, 2).reshape(b, n, d))

    def dit_block(name, h, c, num_heads):
        mod = lin(f"{name}.adaLN_modulation.1", F.silu(c)).chunk(6, dim=1)
        h = h + mod[2][:, None] * attention(f"{name}.attn", modulate(layer_norm(h), mod[0], mod[1]), num_heads)
        mlp = lin(
            f"{name}.mlp.fc2",
            F.gelu(lin(f"{name}.mlp.fc1", modulate(layer_norm(h), mod[3], mod[4])), approximate="tanh"),
        )
        return h + mod[5][:, None] * mlp

    def adaln_projection(name, h, c):
        shift, scale = lin(f"{name}.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
        return lin(f"{name}.linear", modulate(layer_norm(h), shift, scale))

    def unmask(h, token):
        ids_restore = ids_shuffle.argsort(dim=1)
        filler = token.expand(h.shape[0], ids_shuffle.shape[1] - h.shape[1], h.shape[2])
        full = torch.cat([h, filler], dim=1)
        return torch.gather(full, 1, ids_restore[..., None].expand(-1, -1, h.shape[2]))

    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p).flatten(2).transpose(1, 2)
    h = h + sd["pos_embed"]
    if ids_shuffle is not None:
        h = torch.gather(h, 1, ids_shuffle[:, :num_keep, None].expand(-1, -1, h.shape[2]))
    # The official timestep features are computed in float32 whatever the model's dtype.
    half = sd["t_embedder.mlp.0.weight"].shape[1] // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = c_noise.float()[:, None] * freqs[None]
    features = torch.cat([args.cos(), args.sin()], dim=1).double()
    c = lin("t_embedder.mlp.2", F.silu(lin("t_embedder.mlp.0", features)))
    if "y_embedder.embedding_table.weight" in sd:
        c = c + y_onehot.double() @ sd["y_embedder.embedding_table.weight"].T
    for i in range(len({k.split(".")[1] for k in sd if k.startswith("blocks.")})):
        h = dit_block(f"blocks.{i}", h, c, heads)
    if "decoder_layer.linear.weight" in sd:
        h = adaln_projection("decoder_layer", h, c)
        if ids_shuffle is not None:
            h = unmask(h, sd.get("mask_token", torch.zeros(1, 1, h.shape[2], dtype=torch.float64)))
        h = h + sd["decoder_pos_embed"]
        for i in range(len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})):
            h = dit_block(f"decoder_blocks.{i}", h, c, decoder_heads)
        h = adaln_projection("final_layer", h, c)
    else:
        h = adaln_projection("final_layer", h, c)
        if ids_shuffle is not None:
            h = unmask(h, torch.zeros(1, 1, h.shape[2], dtype=torch.float64))
    b, n, _ = h.shape
    grid = int(n**0.5)
    channels = h.shape[2] // (p * p)
    h = h.reshape(b, grid, grid, p, p, channels)
    return torch.einsum("nhwpqc->nchpwq", h).reshape(b, channels, grid * p, grid * p)


def inputs(batch=3, seed=1, num_classes=10, in_channels=4, size=8):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, in_channels, size, size, generator=generator)
    sigma = torch.tensor([0.05, 1.0, 20.0])[:batch]
    labels = torch.tensor([3, 7, 0])[:batch] % max(num_classes, 1)
    return x, torch.log(sigma) / 4, labels


def random_shuffle(batch, num_tokens, seed=2):
    generator = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(num_tokens, generator=generator) for _ in range(batch)])


# ---------------------------------------------------------------------------------------------------------------
# Official MaskDiT -> MaskedDiTTransformer2DModel


def test_maskdit_config_is_inferred_from_shapes():
    sd = official_state_dict(**TINY_OFFICIAL)
    config = maskdit_config_from_state_dict(sd, **HEADS)
    assert (config["num_layers"], config["num_attention_heads"] * config["attention_head_dim"]) == (2, 24)
    assert (
        config["decoder_num_layers"],
        config["decoder_num_attention_heads"] * config["decoder_attention_head_dim"],
    ) == (1, 16)
    assert (config["sample_size"], config["patch_size"], config["in_channels"], config["out_channels"]) == (8, 2, 4, 4)
    assert (config["num_classes"], config["mlp_ratio"], config["freq_shift"]) == (10, 4.0, 0)


def test_maskdit_unmasked_output_equals_reference():
    sd = official_state_dict(**TINY_OFFICIAL)
    model = convert_maskdit_state_dict(sd, **HEADS).double()  # compared in float64 with the reference
    x, c_noise, labels = inputs()
    expected = official_forward(sd, x, c_noise, F.one_hot(labels, 10))
    with torch.no_grad():
        got = model(x.double(), c_noise.double(), class_labels=labels).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_maskdit_null_class_is_the_zero_one_hot_vector():
    sd = official_state_dict(**TINY_OFFICIAL)
    model = convert_maskdit_state_dict(sd, **HEADS).double()  # compared in float64 with the reference
    x, c_noise, _ = inputs()
    expected = official_forward(sd, x, c_noise, torch.zeros(3, 10))
    with torch.no_grad():
        got = model(x.double(), c_noise.double(), class_labels=torch.full((3,), 10)).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("decoder_depth", [1, 0], ids=["decoder", "no_decoder"])
def test_maskdit_masked_output_equals_reference(decoder_depth):
    sd = official_state_dict(**{**TINY_OFFICIAL, "decoder_depth": decoder_depth})
    model = convert_maskdit_state_dict(sd, **HEADS).double()  # compared in float64 with the reference
    x, c_noise, labels = inputs()
    ids_shuffle = random_shuffle(3, 16)
    mask = torch.ones(3, 16, dtype=torch.bool)
    mask.scatter_(1, ids_shuffle[:, :8], False)
    expected = official_forward(sd, x, c_noise, F.one_hot(labels, 10), ids_shuffle=ids_shuffle, num_keep=8)
    with torch.no_grad():
        got = model(x.double(), c_noise.double(), class_labels=labels, mask=mask).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_maskdit_without_mask_token_fills_removed_tokens_with_zeros():
    sd = official_state_dict(**TINY_OFFICIAL)
    del sd["model.mask_token"]  # trained without the MAE loss: the official decoder then pads with zeros
    model = convert_maskdit_state_dict(sd, **HEADS).double()  # compared in float64 with the reference
    x, c_noise, labels = inputs()
    ids_shuffle = random_shuffle(3, 16)
    mask = torch.ones(3, 16, dtype=torch.bool).scatter_(1, ids_shuffle[:, :8], False)
    expected = official_forward(sd, x, c_noise, F.one_hot(labels, 10), ids_shuffle=ids_shuffle, num_keep=8)
    with torch.no_grad():
        got = model(x.double(), c_noise.double(), class_labels=labels, mask=mask).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_maskdit_unknown_key_is_refused_by_name():
    sd = official_state_dict(**TINY_OFFICIAL)
    sd["model.cls_token"] = torch.zeros(1, 1, 24)
    with pytest.raises(ValueError, match=r"unexpected keys: \['cls_token'\]; missing keys: \[\]"):
        convert_maskdit_state_dict(sd, **HEADS)


def test_maskdit_missing_key_is_refused_by_name():
    sd = official_state_dict(**TINY_OFFICIAL)
    del sd["model.blocks.1.attn.proj.bias"]
    with pytest.raises(ValueError, match=r"unexpected keys: \[\]; missing keys: \['blocks.1.attn.proj.bias'\]"):
        convert_maskdit_state_dict(sd, **HEADS)


def test_maskdit_positions_other_than_sincos_are_refused():
    sd = official_state_dict(**TINY_OFFICIAL)
    sd["model.decoder_pos_embed"] = sd["model.decoder_pos_embed"] + 0.01
    with pytest.raises(ValueError, match="decoder_pos_embed is not the fixed 2-D sine-cosine table"):
        convert_maskdit_state_dict(sd, **HEADS)


def test_maskdit_heads_must_divide_the_width():
    with pytest.raises(ValueError, match="num_attention_heads must be a positive int dividing the width 24"):
        convert_maskdit_state_dict(official_state_dict(**TINY_OFFICIAL), num_attention_heads=5)


# The official code's sizes: DiT's S, B, L, XL and its own H (width, heads).
OFFICIAL_SIZES = {"S": (384, 6), "B": (768, 12), "L": (1024, 16), "XL": (1152, 16), "H": (1280, 16)}


@pytest.mark.parametrize("size", OFFICIAL_SIZES)
def test_maskdit_heads_are_those_of_the_dit_size_the_width_identifies(size):
    width, heads = OFFICIAL_SIZES[size]
    sd = official_state_dict(width=width, depth=1, decoder_width=512, meta=True)
    config = maskdit_config_from_state_dict(sd)
    assert (config["num_attention_heads"], config["attention_head_dim"]) == (heads, width // heads)
    assert (config["decoder_num_attention_heads"], config["decoder_attention_head_dim"]) == (16, 32)


# A DiT-S/2 with one block and the official decoder (512 wide, 16 heads), in the official layout.
DIT_S = dict(width=384, depth=1, decoder_width=512, decoder_depth=1, num_classes=10)


def test_an_official_dit_s_converts_without_head_flags_into_the_official_forward():
    sd = official_state_dict(**DIT_S)
    model = convert_maskdit_state_dict(sd).double()  # compared in float64 with the reference
    x, c_noise, labels = inputs()
    expected = official_forward(sd, x, c_noise, F.one_hot(labels, 10), heads=6, decoder_heads=16)
    with torch.no_grad():
        got = model(x.double(), c_noise.double(), class_labels=labels).sample
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)


def test_maskdit_widths_of_no_dit_size_need_the_head_counts():
    sd = official_state_dict(**TINY_OFFICIAL)
    with pytest.raises(ValueError, match=r"24 wide, which is no DiT size .* \(command line: --num_attention_heads\)$"):
        convert_maskdit_state_dict(sd)
    with pytest.raises(ValueError, match="decoder is 16 wide, not the official 512, .* --decoder_num_attention_heads"):
        convert_maskdit_state_dict(sd, num_attention_heads=2)


def save_official_checkpoint(path, args, **sizes):
    """A training checkpoint as the official train.py writes it, with `args` pickled beside the weights."""
    sd = official_state_dict(**sizes)
    torch.save({"model": sd, "ema": sd, "args": args}, path)
    return sd


def test_a_recorded_model_type_is_read_safely_and_sets_the_heads(tmp_path):
    save_official_checkpoint(tmp_path / "s.pt", argparse.Namespace(model="DiT-S/2", lr=1e-4), **DIT_S)
    assert recorded_model_type(load_torch_file(tmp_path / "s.pt")) == "DiT-S/2"
    pipe = convert_maskdit_checkpoint(tmp_path / "s.pt")
    assert (pipe.transformer.config.num_attention_heads, pipe.transformer.config.attention_head_dim) == (6, 64)
    # The pickled config object of the older training scripts, and a plain dict.
    assert recorded_model_type({"args": {"model_type": "DiT-XL/2"}}) == "DiT-XL/2"
    assert recorded_model_type({"args": argparse.Namespace(config="configs/train.yaml")}) is None


def test_a_recorded_model_type_that_contradicts_the_weights_is_refused(tmp_path):
    save_official_checkpoint(tmp_path / "s.pt", argparse.Namespace(model="DiT-XL/2"), **DIT_S)
    with pytest.raises(
        ValueError, match=r"records model type 'DiT-XL/2' \(1152 wide, patch 2\), but its weights are 384"
    ):
        convert_maskdit_checkpoint(tmp_path / "s.pt")
    pipe = convert_maskdit_checkpoint(tmp_path / "s.pt", num_attention_heads=6)  # the flag decides
    assert pipe.transformer.config.num_attention_heads == 6


def load_script(name):
    spec = importlib.util.spec_from_file_location(Path(name).stem, REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_maskdit_script_converts_a_dit_s_checkpoint_with_its_6_heads(tmp_path):
    save_official_checkpoint(tmp_path / "s.pt", argparse.Namespace(lr=1e-4), **DIT_S)
    tiny_vae().save_pretrained(tmp_path / "vae")
    script = load_script("convert_maskdit_to_diffusers.py")
    argv = ["--checkpoint", str(tmp_path / "s.pt"), "--vae", str(tmp_path / "vae")]
    script.main(argv + ["--output_dir", str(tmp_path / "out")])
    config = MaskedDiTTransformer2DModel.load_config(tmp_path / "out" / "transformer")
    assert (config["num_attention_heads"], config["decoder_num_attention_heads"]) == (6, 16)


def test_a_missing_or_truncated_checkpoint_is_refused_in_one_line_naming_it(tmp_path):
    with pytest.raises(ValueError, match=f"checkpoint: no such file or folder: {tmp_path / 'missing.pt'}$"):
        convert_maskdit_checkpoint(tmp_path / "missing.pt")
    save_official_checkpoint(tmp_path / "full.pt", argparse.Namespace(lr=1e-4), **TINY_OFFICIAL)
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"^{tmp_path / 'cut.pt'} is not a readable torch checkpoint: truncated") as e:
        convert_maskdit_checkpoint(tmp_path / "cut.pt", **HEADS)
    assert "\n" not in str(e.value)


def test_the_maskdit_script_refuses_a_missing_checkpoint_before_loading_the_vae(tmp_path, monkeypatch):
    script = load_script("convert_maskdit_to_diffusers.py")
    monkeypatch.setattr(script, "load_vae", lambda *args, **kwargs: pytest.fail("the VAE was loaded"))
    with pytest.raises(ValueError, match="--checkpoint: no such file or folder: ./missing.pt$"):
        script.main(["--checkpoint", "./missing.pt", "--vae", "some/vae", "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("vae", ["./missing-vae", "autoencoder_kl.pth", "/nope/vae"])
def test_load_vae_says_no_such_file_or_folder_for_a_missing_local_path(vae, no_network):
    with pytest.raises(ValueError, match=f"vae: no such file or folder: {vae}$"):
        load_vae(vae)


def test_load_vae_refuses_a_folder_that_holds_another_model(tmp_path):
    tiny_dit().save_pretrained(tmp_path / "dit")
    with pytest.raises(
        ValueError, match="must be a diffusers AutoencoderKL folder, but .* describes a DiTTransformer"
    ):
        load_vae(tmp_path / "dit")


def test_select_state_dict_takes_the_requested_weights():
    ema, online = official_state_dict(seed=0), official_state_dict(seed=1)
    checkpoint = {"model": online, "ema": ema, "opt": {"state": {}, "param_groups": []}}
    assert torch.equal(select_state_dict(checkpoint, "ema")["model.pos_embed"], ema["model.pos_embed"])
    assert torch.equal(select_state_dict(checkpoint, "model")["model.mask_token"], online["model.mask_token"])
    with pytest.raises(ValueError, match=r"weights must be one of \('ema', 'model'\)"):
        select_state_dict(checkpoint, "opt")


# ---------------------------------------------------------------------------------------------------------------
# Reading training checkpoints without running code


class TrainingConfig:
    """Stands for the config object a training script pickles next to its weights."""

    def __init__(self):
        self.lr, self.model_type = 1e-4, "DiT-XL/2"


class Payload:
    """Unpickling this with plain pickle runs `exec`, which writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def save_training_checkpoint(path, extra):
    """A checkpoint as MaskDiT's train.py writes it; returns the EMA state dict (the online one is seed 1's)."""
    sd = official_state_dict(**TINY_OFFICIAL)
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    online = official_state_dict(seed=1, **TINY_OFFICIAL)
    torch.save({"model": online, "ema": sd, "opt": optimizer.state_dict(), "args": extra}, path)
    return sd


def test_training_checkpoint_with_a_config_object_loads_its_tensors(tmp_path):
    path = tmp_path / "0100000.pt"
    sd = save_training_checkpoint(path, TrainingConfig())
    with pytest.raises(Exception, match="Weights only load failed"):
        torch.load(path, weights_only=True)
    checkpoint = load_torch_file(path)
    assert type(checkpoint["args"]).__name__ == "TrainingConfig" and not isinstance(checkpoint["args"], TrainingConfig)
    assert all(torch.equal(checkpoint["ema"][k], v) for k, v in sd.items())
    assert torch.is_tensor(checkpoint["opt"]["state"][0]["exp_avg"])


def test_training_checkpoint_with_a_malicious_reduce_runs_nothing(tmp_path):
    path, marker = tmp_path / "evil.pt", tmp_path / "marker"
    sd = save_training_checkpoint(path, Payload(marker))
    checkpoint = load_torch_file(path)
    assert not marker.exists()
    assert all(torch.equal(checkpoint["ema"][k], v) for k, v in sd.items())
    # The payload is live: plain unpickling does run it.
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"


# ---------------------------------------------------------------------------------------------------------------
# The converted pipeline


def official_edm_heun(denoise, latents, num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's deterministic sampler (Karras et al. 2022, Algorithm 1) in float64, as MaskDiT's `edm_sampler`."""
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / (num_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    t = torch.cat([t, torch.zeros(1, dtype=torch.float64)])
    x = latents.double() * t[0]
    for n in range(num_steps):
        d = (x - denoise(x, t[n])) / t[n]
        x_next = x + (t[n + 1] - t[n]) * d
        if n < num_steps - 1:
            x_next = x + (t[n + 1] - t[n]) * 0.5 * (d + (x_next - denoise(x_next, t[n + 1])) / t[n + 1])
        x = x_next
    return x


def test_pipeline_samples_what_the_official_sampler_computes():
    sd = official_state_dict(**TINY_OFFICIAL)
    pipe = MaskDiTPipeline(convert_maskdit_state_dict(sd, **HEADS), maskdit_scheduler())
    labels, cfg, sigma_data = torch.tensor([3, 7]), 1.5, 0.5
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    def denoise(x, sigma):  # EDMPrecond + forward_with_cfg: guidance on F, null class = zero one-hot
        c_in = 1 / (sigma_data**2 + sigma**2).sqrt()
        c_noise = (sigma.log() / 4).expand(2)
        cond = official_forward(sd, c_in * x, c_noise, F.one_hot(labels, 10))
        uncond = official_forward(sd, c_in * x, c_noise, torch.zeros(2, 10))
        f = uncond + cfg * (cond - uncond)
        return (
            sigma_data**2 / (sigma**2 + sigma_data**2) * x + sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt() * f
        )

    expected = official_edm_heun(denoise, noise, num_steps=4)
    got = pipe(
        class_labels=labels.tolist(), guidance_scale=cfg, num_inference_steps=4, latents=noise, output_type="latent"
    ).images
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-4)


def make_converted_pipeline_folder(folder: Path, num_classes: int = 10) -> Path:
    """Convert a tiny official checkpoint (training format, with a pickled config object) with a tiny VAE and save
    the pipeline to `folder`; returns `folder`. Reusable for loading it from elsewhere (e.g. a Hub stand-in)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    checkpoint = folder.parent / f"{folder.name}-checkpoint.pt"
    torch.save(
        {
            "ema": official_state_dict(**{**TINY_OFFICIAL, "num_classes": num_classes}),
            "args": argparse.Namespace(lr=1e-4),
        },
        checkpoint,
    )
    pipe = convert_maskdit_checkpoint(checkpoint, vae=tiny_vae(), **HEADS)
    pipe.save_pretrained(folder)
    return folder


@pytest.fixture
def converted_maskdit_folder(tmp_path):
    return make_converted_pipeline_folder(tmp_path / "converted")


@pytest.mark.parametrize("loader", ["DiffusionPipeline", "MaskDiTPipeline"])
def test_converted_pipeline_folder_loads_and_generates(converted_maskdit_folder, loader):
    if loader == "DiffusionPipeline":
        pipe = DiffusionPipeline.from_pretrained(converted_maskdit_folder, trust_remote_code=True)
    else:
        pipe = MaskDiTPipeline.from_pretrained(converted_maskdit_folder)
    assert isinstance(pipe, MaskDiTPipeline) and pipe.vae is not None
    images = pipe(
        class_labels=[1, 2], num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 16, 16, 3) and ((images >= 0) & (images <= 1)).all()


def test_imagenet_checkpoint_gets_imagenet_class_names(tmp_path):
    path = tmp_path / "imagenet.pt"
    torch.save({"ema": official_state_dict(**{**TINY_OFFICIAL, "num_classes": 1000})}, path)
    pipe = convert_maskdit_checkpoint(path, vae=tiny_vae(), **HEADS)
    assert pipe.get_label_ids(["golden retriever", "tench", "Tinca tinca"]) == [207, 0, 0]
    assert len(imagenet_id2label()) == 1000


def test_vae_outside_maskdits_latent_space_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    torch.save({"ema": official_state_dict(**TINY_OFFICIAL)}, path)
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.13025)
    with pytest.raises(ValueError, match="scaling_factor is 0.13025"):
        convert_maskdit_checkpoint(path, vae=vae, **HEADS)


# ---------------------------------------------------------------------------------------------------------------
# diffusers' DiT -> MaskedDiTTransformer2DModel


def tiny_dit(norm_eps=1e-6, seed=0, out_channels=8):
    """A random diffusers DiT whose per-block embedders are copies, as in every released DiT."""
    torch.manual_seed(seed)
    dit = DiTTransformer2DModel(
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=out_channels,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        num_embeds_ada_norm=10,
        norm_eps=norm_eps,
    )
    with torch.no_grad():
        for parameter in dit.parameters():
            parameter.add_(0.2 * torch.randn_like(parameter))
        shared = dit.transformer_blocks[0].norm1.emb.state_dict()
        for block in dit.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    return dit.eval()


def test_dit_without_decoder_equals_diffusers_output():
    dit = tiny_dit()
    model = convert_dit_transformer(dit)
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    timesteps, labels = torch.tensor([0, 500, 999]), torch.tensor([3, 9, 10])  # 10: the null class
    with torch.no_grad():
        expected = dit(x, timestep=timesteps, class_labels=labels).sample[:, :4]
        got = model(x, timesteps, class_labels=labels).sample
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_dit_per_block_embedders_must_be_copies():
    dit = tiny_dit()
    with torch.no_grad():
        dit.transformer_blocks[1].norm1.emb.timestep_embedder.linear_2.bias.add_(1.0)
    with pytest.raises(
        ValueError,
        match=r"these differ from block 0's: \['transformer_blocks.1.norm1.emb.timestep_embedder.linear_2.bias'\]",
    ):
        convert_dit_transformer(dit)


def test_dit_with_decoder_keeps_the_encoder_and_starts_a_new_decoder():
    dit = tiny_dit()
    model = convert_dit_transformer(
        dit, decoder_num_layers=1, decoder_num_attention_heads=2, decoder_attention_head_dim=8
    )
    block, source = model.transformer_blocks[1], dit.transformer_blocks[1]
    assert torch.equal(
        block.attn1.to_qkv.weight,
        torch.cat([source.attn1.to_q.weight, source.attn1.to_k.weight, source.attn1.to_v.weight]),
    )
    assert torch.equal(block.modulation.weight, source.norm1.linear.weight)
    # The paper's initialisation: decoder layer and final layer start at zero.
    assert not model.decoder_layer.proj.weight.any() and not model.final_layer.proj.weight.any()


def test_convert_dit_transformer_refuses_a_model_that_is_not_a_diffusers_dit():
    with pytest.raises(TypeError, match="dit must be a diffusers DiTTransformer2DModel, got MaskedDiTTransformer2D"):
        convert_dit_transformer(convert_maskdit_state_dict(official_state_dict(**TINY_OFFICIAL), **HEADS))


def test_the_dit_script_refuses_a_maskdit_pipeline_before_loading_it(tmp_path):
    folder = make_converted_pipeline_folder(tmp_path / "maskdit")
    script = load_script("convert_dit_to_maskdit.py")
    argv = ["--pretrained_model_name_or_path", str(folder), "--output_dir", str(tmp_path / "out")]
    with pytest.raises(ValueError, match="must be a diffusers DiTTransformer2DModel folder, but .* MaskedDiT"):
        script.main(argv)
    with pytest.raises(ValueError, match="is not a diffusers DiTTransformer2DModel folder: .* has no config.json"):
        script.main(argv + ["--subfolder", "scheduler_missing"])
    with pytest.raises(ValueError, match="--pretrained_model_name_or_path: no such file or folder: ./no-dit$"):
        script.main(["--pretrained_model_name_or_path", "./no-dit", "--output_dir", str(tmp_path / "out")])


@pytest.mark.parametrize("flag", ["--decoder_num_attention_heads", "--decoder_attention_head_dim"])
def test_the_dit_script_refuses_zero_decoder_heads_before_any_work(flag, tmp_path, capsys):
    script = load_script("convert_dit_to_maskdit.py")
    with pytest.raises(SystemExit):
        script.main(["--pretrained_model_name_or_path", "org/dit", "--output_dir", str(tmp_path), flag, "0"])
    assert f"argument {flag}: must be an integer >= 1" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------------
# The scripts, end to end


def run_script(name, *args):
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
    }
    return subprocess.run(
        [sys.executable, str(REPO / "scripts" / name), *args], env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_convert_maskdit_script_writes_a_loadable_pipeline(tmp_path):
    checkpoint = tmp_path / "0050000.pt"
    save_training_checkpoint(checkpoint, TrainingConfig())
    tiny_vae().save_pretrained(tmp_path / "vae")
    result = run_script(
        "convert_maskdit_to_diffusers.py",
        "--checkpoint",
        str(checkpoint),
        "--output_dir",
        str(tmp_path / "out"),
        "--vae",
        str(tmp_path / "vae"),
        "--weights",
        "model",
        "--num_attention_heads",
        "2",
        "--decoder_num_attention_heads",
        "2",
    )
    assert result.returncode == 0, result.stderr
    pipe = MaskDiTPipeline.from_pretrained(tmp_path / "out")
    reference = convert_maskdit_state_dict(official_state_dict(seed=1, **TINY_OFFICIAL), **HEADS)
    assert all(
        torch.equal(a, b) for a, b in zip(pipe.transformer.state_dict().values(), reference.state_dict().values())
    )


@pytest.mark.slow
def test_convert_dit_script_writes_a_loadable_transformer(tmp_path):
    dit = tiny_dit()
    dit.save_pretrained(tmp_path / "dit" / "transformer")
    result = run_script(
        "convert_dit_to_maskdit.py",
        "--pretrained_model_name_or_path",
        str(tmp_path / "dit"),
        "--output_dir",
        str(tmp_path / "out"),
        "--decoder_num_layers",
        "0",
    )
    assert result.returncode == 0, result.stderr
    model = MaskedDiTTransformer2DModel.from_pretrained(tmp_path / "out")
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        expected = dit(x, timestep=torch.tensor([10, 900]), class_labels=torch.tensor([1, 2])).sample[:, :4]
        torch.testing.assert_close(
            model(x, torch.tensor([10, 900]), class_labels=torch.tensor([1, 2])).sample, expected, atol=1e-5, rtol=1e-5
        )
