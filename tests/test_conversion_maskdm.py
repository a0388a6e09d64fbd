"""Conversion of official MaskDM checkpoints, against a float64 reference of the official U-ViT written here from its
description (timm PatchEmbed, [label, time, patches] tokens with learned positions, bias-free-qkv pre-LN blocks with
long skips, `encoder_to_output`) and the official noise schedules computed here in float64."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DiffusionPipeline

from diffusers_masked import MaskDMPipeline
from diffusers_masked.conversion import (
    convert_maskdm_checkpoint,
    convert_maskdm_state_dict,
    maskdm_beta_schedule,
    maskdm_config_from_state_dict,
    split_maskdm_checkpoint,
)

REPO = Path(__file__).resolve().parents[1]
WIDTH, HEADS, DEPTH, PATCH, SIZE = 16, 2, 5, 2, 8  # official encoder_depth 5: 2 in-blocks, a mid-block, 2 out-blocks


def official_uvit(seed=0, num_classes=0, mlp_time_embed=False, in_chans=3, width=WIDTH, depth=DEPTH):
    """A random official U-ViT state dict with the official names (`models/mask_uvit.py`, decoder_depth 0)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return 0.3 * torch.randn(*shape, generator=g)

    extras = 2 if num_classes else 1
    num_patches = (SIZE // PATCH) ** 2
    sd = {
        "encoder.patch_embed.proj.weight": r(width, in_chans, PATCH, PATCH),
        "encoder.patch_embed.proj.bias": r(width),
        "encoder.encoder_pos_embed": r(1, extras + num_patches, width),
        "encoder.norm.weight": 1 + r(width),
        "encoder.norm.bias": r(width),
        "encoder_to_output.weight": r(PATCH * PATCH * in_chans, width),
        "encoder_to_output.bias": r(PATCH * PATCH * in_chans),
    }
    if mlp_time_embed:
        sd.update({
            "encoder.time_embed.0.weight": r(4 * width, width), "encoder.time_embed.0.bias": r(4 * width),
            "encoder.time_embed.2.weight": r(width, 4 * width), "encoder.time_embed.2.bias": r(width),
        })  # fmt: skip
    if num_classes:
        sd["encoder.label_emb.weight"] = r(num_classes, width)
        sd["encoder.uncond_embed"] = r(1, width)
    blocks = (
        [f"in_blocks.{i}" for i in range(depth // 2)] + ["mid_block"] + [f"out_blocks.{i}" for i in range(depth // 2)]
    )
    for block in blocks:
        p = f"encoder.{block}."
        sd.update({
            p + "norm1.weight": 1 + r(width), p + "norm1.bias": r(width),
            p + "attn.qkv.weight": r(3 * width, width),
            p + "attn.proj.weight": r(width, width), p + "attn.proj.bias": r(width),
            p + "norm2.weight": 1 + r(width), p + "norm2.bias": r(width),
            p + "mlp.fc1.weight": r(4 * width, width), p + "mlp.fc1.bias": r(4 * width),
            p + "mlp.fc2.weight": r(width, 4 * width), p + "mlp.fc2.bias": r(width),
        })  # fmt: skip
        if block.startswith("out_blocks"):
            sd[p + "skip_linear.weight"] = r(width, 2 * width)
            sd[p + "skip_linear.bias"] = r(width)
    return sd


def official_forward(sd, x, t, y=None, keep=None, heads=HEADS):
    """The official MaskedUViT forward in float64. `y=None` with labels uses `uncond_embed`; `keep` (B, N_vis) are the
    visible patch ids, in which case the visible tokens' predictions (B, N_vis, p*p*C) are returned."""
    sd = {k: v.double() for k, v in sd.items()}
    x = x.double()
    width = sd["encoder.patch_embed.proj.weight"].shape[0]
    patches = F.conv2d(x, sd["encoder.patch_embed.proj.weight"], sd["encoder.patch_embed.proj.bias"], stride=PATCH)
    patches = patches.flatten(2).transpose(1, 2)
    # The official time features are float32 (its `timestep_embedding`); the rest of the forward runs in float64.
    half = width // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    time = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).double()
    if "encoder.time_embed.0.weight" in sd:
        time = F.linear(F.silu(F.linear(time, sd["encoder.time_embed.0.weight"], sd["encoder.time_embed.0.bias"])),
                        sd["encoder.time_embed.2.weight"], sd["encoder.time_embed.2.bias"])  # fmt: skip
    tokens = [time[:, None]]
    if "encoder.label_emb.weight" in sd:
        label = sd["encoder.uncond_embed"].expand(x.shape[0], -1) if y is None else sd["encoder.label_emb.weight"][y]
        tokens.insert(0, label[:, None])
    h = torch.cat([*tokens, patches], dim=1) + sd["encoder.encoder_pos_embed"]
    extras = len(tokens)
    if keep is not None:
        visible = torch.stack([h[b, extras:][keep[b]] for b in range(h.shape[0])])
        h = torch.cat([h[:, :extras], visible], dim=1)

    def block(p, h, skip=None):
        if skip is not None:
            h = F.linear(torch.cat([h, skip], -1), sd[p + "skip_linear.weight"], sd[p + "skip_linear.bias"])
        a = F.layer_norm(h, (width,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-5)
        B, L, _ = a.shape
        qkv = F.linear(a, sd[p + "attn.qkv.weight"]).reshape(B, L, 3, heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = ((q * (width // heads) ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
        a = (attn @ v).transpose(1, 2).reshape(B, L, width)
        h = h + F.linear(a, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        m = F.layer_norm(h, (width,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-5)
        m = F.linear(
            F.gelu(F.linear(m, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
            sd[p + "mlp.fc2.weight"],
            sd[p + "mlp.fc2.bias"],
        )
        return h + m

    num_in = len({k.split(".")[2] for k in sd if k.startswith("encoder.in_blocks.")})
    skips = []
    for i in range(num_in):
        h = block(f"encoder.in_blocks.{i}.", h)
        skips.append(h)
    h = block("encoder.mid_block.", h)
    for i in range(num_in):
        h = block(f"encoder.out_blocks.{i}.", h, skips.pop())
    h = F.layer_norm(h, (width,), sd["encoder.norm.weight"], sd["encoder.norm.bias"], eps=1e-5)
    out = F.linear(h, sd["encoder_to_output.weight"], sd["encoder_to_output.bias"])[:, extras:]
    if keep is not None:
        return out
    B, N, _ = out.shape
    g, C = int(N**0.5), x.shape[1]
    # 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)'
    return out.reshape(B, g, g, PATCH, PATCH, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, g * PATCH, g * PATCH)


def official_betas(schedule, T=1000):
    """`gaussian_ddpm.py`'s schedules in float64."""
    if schedule == "linear":
        return torch.linspace(1000 / T * 1e-4, 1000 / T * 0.02, T, dtype=torch.float64)
    s = 0.008
    x = torch.linspace(0, T, T + 1, dtype=torch.float64)
    alphas_cumprod = torch.cos(((x / T) + s) / (1 + s) * math.pi * 0.5) ** 2
    alphas_cumprod = alphas_cumprod / alphas_cumprod[0]
    return torch.clip(1 - alphas_cumprod[1:] / alphas_cumprod[:-1], 0, 0.999)


def diffusion_buffers(schedule="squaredcos_cap_v2", T=1000):
    betas = official_betas("linear" if schedule == "linear" else "cosine", T)
    alphas_cumprod = torch.cumprod(1 - betas, 0)
    prev = F.pad(alphas_cumprod[:-1], (1, 0), value=1.0)
    posterior_variance = betas * (1 - prev) / (1 - alphas_cumprod)
    buffers = {
        "betas": betas, "alphas": 1 - betas, "alphas_cumprod": alphas_cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1 / alphas_cumprod - 1).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1 - alphas_cumprod),
        "posterior_mean_coef2": (1 - prev) * (1 - betas).sqrt() / (1 - alphas_cumprod),
        "loss_weight": torch.ones(T, dtype=torch.float64),
    }  # fmt: skip
    return {k: v.float() for k, v in buffers.items()}


def official_checkpoint(schedule="squaredcos_cap_v2", ema_seed=0, online_seed=1, old_ema_pytorch=False, **uvit):
    """`train_step.py`'s `{step, model, opt, ema, scaler}` around a GaussianDiffusion and an ema-pytorch EMA."""
    buffers = diffusion_buffers(schedule)
    online = {**{f"model.{k}": v for k, v in official_uvit(online_seed, **uvit).items()}, **buffers}
    ema = {
        f"ema_model.{k}": v
        for k, v in {**{f"model.{k}": v for k, v in official_uvit(ema_seed, **uvit).items()}, **buffers}.items()
    }
    ema.update(initted=torch.tensor([True]), step=torch.tensor([200000]))
    if old_ema_pytorch:
        ema.update({f"online_model.{k}": v for k, v in online.items()})
    return {"step": 200000, "model": online, "ema": ema, "opt": {"state": {}, "param_groups": []}, "scaler": None}


def inputs(batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, SIZE, SIZE, generator=g), torch.tensor([0, 421, 999])[:batch]


def convert(sd):
    return convert_maskdm_state_dict(sd, num_attention_heads=HEADS).double()


# ---------------------------------------------------------------------------------------------------------------
# The model


def test_config_is_inferred_from_shapes():
    config = maskdm_config_from_state_dict(official_uvit(num_classes=10, mlp_time_embed=True), num_attention_heads=2)
    assert config == {
        "sample_size": 8, "patch_size": 2, "in_channels": 3, "out_channels": 3, "num_layers": 5,
        "num_attention_heads": 2, "attention_head_dim": 8, "num_classes": 10, "mlp_ratio": 4.0, "norm_eps": 1e-5,
        "time_embedding_mlp": True,
    }  # fmt: skip


def test_heads_default_to_the_official_head_width_of_64():
    sd = official_uvit(width=128, depth=3)
    assert maskdm_config_from_state_dict(sd)["num_attention_heads"] == 2


@pytest.mark.parametrize("mlp_time_embed", [False, True])
def test_unconditional_output_equals_reference(mlp_time_embed):
    sd = official_uvit(mlp_time_embed=mlp_time_embed)
    x, t = inputs()
    with torch.no_grad():
        torch.testing.assert_close(
            convert(sd)(x.double(), t).sample, official_forward(sd, x, t), atol=1e-10, rtol=1e-10
        )


def test_conditional_output_and_the_null_class_equal_reference():
    sd = official_uvit(num_classes=10)
    x, t = inputs()
    y = torch.tensor([3, 0, 9])
    model = convert(sd)
    with torch.no_grad():
        torch.testing.assert_close(
            model(x.double(), t, class_labels=y).sample, official_forward(sd, x, t, y), atol=1e-10, rtol=1e-10
        )
        null = torch.full((3,), 10)
        torch.testing.assert_close(
            model(x.double(), t, class_labels=null).sample, official_forward(sd, x, t, None), atol=1e-10, rtol=1e-10
        )


def test_masked_output_equals_reference_on_visible_tokens():
    sd = official_uvit()
    x, t = inputs()
    keep = torch.stack(
        [torch.randperm(16, generator=torch.Generator().manual_seed(b))[:5].sort().values for b in range(3)]
    )
    mask = torch.ones(3, 16, dtype=torch.bool).scatter(1, keep, False)
    with torch.no_grad():
        ours = convert(sd)(x.double(), t, mask=mask).sample
    # ours is the full image with zeros at removed patches; read its tokens as 'B C (h p1) (w p2) -> B (h w) (p1 p2 C)'
    tokens = ours.reshape(3, 3, 4, PATCH, 4, PATCH).permute(0, 2, 4, 3, 5, 1).reshape(3, 16, -1)
    visible = torch.stack([tokens[b][keep[b]] for b in range(3)])
    torch.testing.assert_close(visible, official_forward(sd, x, t, keep=keep), atol=1e-10, rtol=1e-10)


def test_unknown_key_is_refused_by_name():
    sd = {**official_uvit(), "encoder.in_blocks.0.attn.q_bias": torch.zeros(WIDTH)}
    with pytest.raises(ValueError, match=r"unexpected keys: \['encoder.in_blocks.0.attn.q_bias'\]"):
        convert(sd)


def test_missing_key_is_refused_by_name():
    sd = official_uvit()
    del sd["encoder.out_blocks.1.skip_linear.bias"]
    with pytest.raises(ValueError, match=r"missing keys: \['encoder.out_blocks.1.skip_linear.bias'\]"):
        convert(sd)


def test_a_vit_decoder_is_refused_naming_it():
    sd = {**official_uvit(), "encoder_to_decoder.weight": torch.zeros(8, WIDTH)}
    with pytest.raises(ValueError, match="ViT decoder"):
        convert(sd)


# ---------------------------------------------------------------------------------------------------------------
# The checkpoint: weights and schedule


@pytest.mark.parametrize("weights,seed", [("ema", 0), ("model", 1)])
def test_split_takes_the_requested_weights(weights, seed):
    parameters, buffers = split_maskdm_checkpoint(official_checkpoint(old_ema_pytorch=True), weights)
    expected = official_uvit(seed)
    assert parameters.keys() == expected.keys() and all(torch.equal(parameters[k], expected[k]) for k in expected)
    assert set(buffers) == set(diffusion_buffers())


def test_an_unknown_key_in_the_checkpoint_is_refused_by_name():
    checkpoint = official_checkpoint()
    checkpoint["ema"]["ema_model.cls_token"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"unexpected keys: \['ema_model.cls_token'\]"):
        split_maskdm_checkpoint(checkpoint, "ema")


def test_missing_schedule_buffers_are_refused_by_name():
    checkpoint = official_checkpoint()
    del checkpoint["model"]["betas"]
    with pytest.raises(ValueError, match=r"missing keys: \['betas'\]"):
        split_maskdm_checkpoint(checkpoint, "model")


@pytest.mark.parametrize("official,expected", [("linear", "linear"), ("cosine", "squaredcos_cap_v2")])
def test_beta_schedule_is_read_from_the_buffers(official, expected):
    buffers = diffusion_buffers("linear" if official == "linear" else "squaredcos_cap_v2")
    config = maskdm_beta_schedule(buffers)
    assert config["beta_schedule"] == expected and config["num_train_timesteps"] == 1000
    ours = DDIMScheduler.from_config(config).betas.double()
    torch.testing.assert_close(ours, official_betas(official), atol=1e-6, rtol=0)


def test_a_shifted_cosine_schedule_is_refused():
    buffers = diffusion_buffers()
    ac = buffers["alphas_cumprod"].double()
    shifted = torch.sigmoid(torch.log(0.25 * ac / (1 - ac)))  # simple diffusion's shift for 128 px
    betas = 1 - shifted / F.pad(shifted[:-1], (1, 0), value=1.0)
    with pytest.raises(ValueError, match="shifted cosine"):
        maskdm_beta_schedule({"betas": betas.float(), "alphas_cumprod": shifted.float()})


def test_converted_pipeline_samples_with_the_official_evaluation_sampler(tmp_path):
    path = tmp_path / "model-20.pt"
    torch.save(official_checkpoint(schedule="linear"), path)
    pipe = convert_maskdm_checkpoint(path, num_attention_heads=HEADS)
    config = pipe.scheduler.config
    assert isinstance(pipe.scheduler, DDIMScheduler) and config.beta_schedule == "linear"
    assert config.clip_sample and config.clip_sample_range == 1.0 and config.timestep_spacing == "trailing"


def test_a_missing_or_truncated_checkpoint_is_refused_in_one_line_naming_it(tmp_path):
    with pytest.raises(ValueError, match=f"checkpoint: no such file or folder: {tmp_path / 'model-20.pt'}$"):
        convert_maskdm_checkpoint(tmp_path / "model-20.pt")
    torch.save(official_checkpoint(), tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"^{tmp_path / 'cut.pt'} is not a readable torch checkpoint: truncated") as e:
        convert_maskdm_checkpoint(tmp_path / "cut.pt", num_attention_heads=HEADS)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------------------
# The script, end to end


@pytest.mark.slow
def test_convert_maskdm_script_writes_a_folder_both_loaders_load(tmp_path):
    checkpoint = tmp_path / "pretrain_m90block4_20.pt"
    torch.save(official_checkpoint(num_classes=10), checkpoint)
    env = {
        **os.environ,
        "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "HF_HUB_OFFLINE": "1",
    }
    result = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "convert_maskdm_to_diffusers.py"), "--checkpoint", str(checkpoint),
         "--output_dir", str(tmp_path / "out"), "--weights", "model", "--num_attention_heads", "2"],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    reference = convert_maskdm_state_dict(official_uvit(1, num_classes=10), num_attention_heads=HEADS).state_dict()
    outputs = []
    for pipe in (
        MaskDMPipeline.from_pretrained(tmp_path / "out"),
        DiffusionPipeline.from_pretrained(tmp_path / "out", trust_remote_code=True),
    ):
        assert type(pipe).__name__ == "MaskDMPipeline"
        assert all(torch.equal(v, reference[k]) for k, v in pipe.transformer.state_dict().items())
        pipe.set_progress_bar_config(disable=True)
        outputs.append(
            pipe(
                class_labels=[1, 2],
                num_inference_steps=2,
                generator=torch.Generator().manual_seed(0),
                output_type="np",
            ).images
        )
    assert outputs[0].shape == (2, 8, 8, 3)
    assert (outputs[0] == outputs[1]).all()
