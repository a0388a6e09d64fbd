"""Text-to-image: captions and their embedding cache, the text-conditioned MaskDiT, the pipeline's prompts, the
training script for our model and for diffusers' PixArt, and the CLIP score.

The text encoders here are tiny `transformers` models built in the test from a config, with a tokenizer built from a
word list: nothing is downloaded."""

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline, MaskedDiTTransformer2DModel
from diffusers_masked.data.captions import (
    EMPTY_CAPTION_ID,
    caption_table,
    digit_captions,
    encode_captions,
    extract_text_embeddings,
    pick_captions,
    stroke_weights,
)
from diffusers_masked.masking import unpatchify
from diffusers_masked.routing import Route, draw_route_ids
from tests.launch import env, launch
from tests.tiny import TINY_TRANSFORMER, tiny_vae

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "examples" / "train_text_to_image.py"
WORDS = ["a", "cat", "dog", "red", "blue", "photo", "of", "the"]


def tiny_text_pair(width=16, seed=0, max_length=8):
    """A T5 tokenizer of `WORDS` and a random 1-layer T5 encoder `width` wide, both built here."""
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)] + [("\u2581" + w, -3.0) for w in WORDS]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = max_length
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=width, d_ff=2 * width, d_kv=width // 2, num_heads=2, num_layers=1,
        relative_attention_num_buckets=8, dropout_rate=0.0,
    )  # fmt: skip
    return tokenizer, T5EncoderModel(config).eval()


def text_model(seed=0, **overrides):
    from tests.tiny import _perturbed

    torch.manual_seed(seed)
    config = {**TINY_TRANSFORMER, "num_classes": 0, "cross_attention_dim": 16, "num_layers": 3, **overrides}
    return _perturbed(MaskedDiTTransformer2DModel(**config), 0.2, seed)


# ------------------------------------------------------------------------------------------------ captions


def test_caption_table_puts_the_empty_prompt_first_and_refuses_a_missing_caption():
    captions, ids = caption_table(["a cat", ["a dog", "a cat"], "a red cat"])
    assert captions == ["", "a cat", "a dog", "a red cat"]
    assert ids == [[1], [2, 1], [3]]
    with pytest.raises(ValueError, match="row 1 has no caption"):
        caption_table(["a cat", None])
    with pytest.raises(ValueError, match="row 0 has no caption"):
        caption_table([[]])


def test_pick_captions_picks_among_a_rows_own_captions_and_drops_to_the_empty_prompt():
    ids = torch.tensor([[5, 6, -1], [7, -1, -1], [1, 2, 3]]).repeat(400, 1)
    a = pick_captions(ids, torch.Generator().manual_seed(0), 0.0)
    b = pick_captions(ids, torch.Generator().manual_seed(0), 0.0)
    assert torch.equal(a, b)
    assert set(a[0::3].tolist()) == {5, 6} and set(a[1::3].tolist()) == {7} and set(a[2::3].tolist()) == {1, 2, 3}
    assert abs((a[0::3] == 5).float().mean().item() - 0.5) < 0.08  # uniform among the row's captions
    dropped = pick_captions(ids, torch.Generator().manual_seed(1), 0.25)
    assert abs((dropped == EMPTY_CAPTION_ID).float().mean().item() - 0.25) < 0.05


def test_digit_captions_name_the_digit_and_a_stroke_weight_that_matches_the_ink():
    from diffusers_masked.data import load_digits_arrays

    images, labels = load_digits_arrays(16, seed=0, holdout_fraction=0.2)["train"]
    captions = digit_captions(images, labels)
    assert len(captions) == len(images) and all(len(c) == 4 for c in captions)
    i = int(np.flatnonzero(labels == 7)[0])
    assert captions[i][0] == "a handwritten seven" and captions[i][1] == "the digit 7"
    weights = np.array(stroke_weights(images, labels))
    ink = images.reshape(len(images), -1).sum(axis=1)
    for label in range(10):
        bold, thin = ink[(labels == label) & (weights == "bold")], ink[(labels == label) & (weights == "thin")]
        assert abs(len(bold) - len(thin)) <= 1 and bold.min() >= thin.max()


def test_the_digits_tokenizer_knows_every_caption_word():
    from diffusers_masked.training.text import load_text_components

    tokenizer, encoder = load_text_components(None)
    from diffusers_masked.data import load_digits_arrays

    images, labels = load_digits_arrays(16, seed=0, holdout_fraction=0.2)["train"]
    for caption in {c for row in digit_captions(images[:200], labels[:200]) for c in row}:
        ids = tokenizer(caption).input_ids
        assert tokenizer.unk_token_id not in ids and len(ids) <= tokenizer.model_max_length, caption
    assert encoder.config.d_model == 64 and not any(p.requires_grad for p in encoder.parameters())


# ------------------------------------------------------------------------------------------------ the cache


def test_the_embedding_cache_holds_the_encoders_outputs_and_is_reused_without_encoding(tmp_path):
    tokenizer, encoder = tiny_text_pair()
    captions = ["", "a cat", "a red dog", "the photo of a blue cat"]
    calls = []
    encoder.register_forward_hook(lambda *a: calls.append(1))
    cached = extract_text_embeddings(captions, tokenizer, encoder, tmp_path, 8, batch_size=2, shard_size=3)[:]
    embeds, mask = encode_captions(captions, tokenizer, encoder, 8)
    torch.testing.assert_close(cached["prompt_embeds"], embeds)
    assert torch.equal(cached["prompt_attention_mask"], mask)
    assert mask[0].tolist() == [1, 0, 0, 0, 0, 0, 0, 0]  # the empty prompt is its end-of-sequence token
    calls.clear()
    again = extract_text_embeddings(captions, tokenizer, encoder, tmp_path, 8, batch_size=2, shard_size=3)[:]
    assert calls == [] and torch.equal(again["prompt_embeds"], cached["prompt_embeds"])
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("text-")] != []
    assert not list(tmp_path.glob(".text-*"))  # no shard folder left


@pytest.mark.slow
def test_a_killed_extraction_resumes_without_recomputing_finished_shards(tmp_path):
    captions = [""] + [f"{a} {b} {c}" for a in WORDS for b in WORDS for c in ("cat", "dog")]  # 129 captions
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        import diffusers_masked.data.captions as captions_module
        from tests.test_text_to_image import tiny_text_pair
        original = captions_module.encode_captions
        def slow(*args, **kwargs):
            out = original(*args, **kwargs)
            time.sleep(0.5)  # each shard takes a while: the kill lands between shards
            return out
        captions_module.encode_captions = slow
        tokenizer, encoder = tiny_text_pair()
        captions_module.extract_text_embeddings({captions!r}, tokenizer, encoder, {str(tmp_path)!r}, 8, shard_size=10)
        """
    )
    process = subprocess.Popen([sys.executable, "-c", script], env=env(), start_new_session=True)
    deadline = time.time() + 120
    while len(list(tmp_path.glob(".text-*-shards/shard-*"))) < 3:
        assert process.poll() is None and time.time() < deadline, "the extraction ended before it could be killed"
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished = sorted(p.name for p in tmp_path.glob(".text-*-shards/shard-*"))
    assert 3 <= len(finished) < 13

    tokenizer, encoder = tiny_text_pair()
    batches = []
    encoder.register_forward_hook(lambda module, args, kwargs, out: batches.append(1), with_kwargs=True)
    cached = extract_text_embeddings(captions, tokenizer, encoder, tmp_path, 8, batch_size=64, shard_size=10)[:]
    assert len(batches) == 13 - len(finished)  # one batch per unfinished shard, none for the finished ones
    embeds, _ = encode_captions(captions, tokenizer, encoder, 8)
    torch.testing.assert_close(cached["prompt_embeds"], embeds)


# ------------------------------------------------------------------------------------------------ the model


def _take(x, ids):
    return x[torch.arange(x.shape[0])[:, None], ids]


def cross_attention(block, x, context, mask):
    """Multi-head attention from the tokens to the text, written out: softmax(q k^T / sqrt(d)) v over the real text
    tokens only."""
    attn = block.attn2
    batch, length, _ = x.shape
    heads, d = attn.num_heads, attn.head_dim
    q = attn.to_q(x).view(batch, length, heads, d).transpose(1, 2)
    k, v = attn.to_kv(context).view(batch, context.shape[1], 2, heads, d).unbind(2)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(d)
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, length, heads * d)
    return attn.to_out(out)


def text_block(block, x, cond, context, mask):
    mod = block.modulation(F.silu(cond))[:, None].chunk(6, dim=2)
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod
    x = x + gate_msa * block.attn1(block.norm1(x) * (1 + scale_msa) + shift_msa)
    x = x + cross_attention(block, block.norm_cross(x), context, mask)
    return x + gate_mlp * block.ff(block.norm2(x) * (1 + scale_mlp) + shift_mlp)


def test_the_text_models_masked_forward_is_cross_attention_over_text_on_the_visible_tokens():
    model = text_model(decoder_num_layers=0).train()
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 3, 8, 8, generator=generator), torch.rand(2, generator=generator)
    text = torch.randn(2, 5, 16, generator=generator)
    text_mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, :8], mask[1, 8:] = True, True
    out = model(x, t, mask=mask, encoder_hidden_states=text, encoder_attention_mask=text_mask).sample

    cond = model.timestep_embedder(model.time_proj(t))
    context = model.caption_projection(text)
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    visible = torch.stack([torch.arange(8, 16), torch.arange(0, 8)])
    tokens = _take(tokens, visible)
    for block in model.transformer_blocks:
        tokens = text_block(block, tokens, cond, context, text_mask.bool())
    tokens = model.final_layer(tokens, cond)
    full = torch.zeros(2, 16, tokens.shape[-1])
    full[torch.arange(2)[:, None], visible] = tokens
    torch.testing.assert_close(out, unpatchify(full, 2, 8, 8), rtol=1e-5, atol=1e-5)


def test_text_tokens_are_never_masked_or_routed_and_padding_is_ignored():
    model = text_model().train()
    generator = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 3, 8, 8, generator=generator), torch.rand(2, generator=generator)
    text = torch.randn(2, 6, 16, generator=generator)
    text_mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, ::2] = True
    seen = []
    hooks = [b.attn2.register_forward_pre_hook(lambda m, a: seen.append(a[1])) for b in model.transformer_blocks]
    route = Route(0.5, 1, 1)
    (ids,) = draw_route_ids((route,), 2, 8, torch.Generator().manual_seed(0))
    kwargs = dict(mask=mask, routes=[route], route_ids=(ids,), encoder_attention_mask=text_mask)
    out = model(x, t, encoder_hidden_states=text, **kwargs).sample
    for handle in hooks:
        handle.remove()
    projected = model.caption_projection(text)
    assert len(seen) == 3 and all(torch.equal(c, projected) for c in seen)  # the whole text, in every block
    changed = text.clone()
    changed[0, 4:] = 100.0  # padding: masked out of the cross-attention
    torch.testing.assert_close(model(x, t, encoder_hidden_states=changed, **kwargs).sample, out)
    changed[0, 0] += 1.0  # a real token
    assert not torch.allclose(model(x, t, encoder_hidden_states=changed, **kwargs).sample, out)


def test_a_model_without_text_keeps_its_weights_and_refuses_text():
    plain = MaskedDiTTransformer2DModel(**TINY_TRANSFORMER)
    keys = set(plain.state_dict())
    assert not any("attn2" in k or "caption" in k or "norm_cross" in k for k in keys)
    with_text = MaskedDiTTransformer2DModel(**TINY_TRANSFORMER, cross_attention_dim=16)
    assert keys < set(with_text.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="without text conditioning"):
        plain(x, torch.zeros(2), torch.tensor([0, 1]), encoder_hidden_states=torch.randn(2, 4, 16))
    with pytest.raises(ValueError, match=r"encoder_hidden_states of shape \(2, text_tokens, 16\) are required"):
        with_text(x, torch.zeros(2), torch.tensor([0, 1]))
    # A fresh text model starts with the text silent (zero cross-attention output projections), like adaLN-Zero.
    assert all(b.attn2.to_out.weight.abs().sum() == 0 for b in with_text.transformer_blocks)


def test_text_model_checkpointing_gives_the_same_gradients():
    generator = torch.Generator().manual_seed(2)
    x, t, text = (
        torch.randn(2, 3, 8, 8, generator=generator),
        torch.rand(2),
        torch.randn(2, 4, 16, generator=generator),
    )
    grads = []
    for checkpointing in (False, True):
        model = text_model().train()
        if checkpointing:
            model.enable_gradient_checkpointing()
        model(x, t, encoder_hidden_states=text).sample.square().mean().backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def text_pipeline():
    tokenizer, encoder = tiny_text_pair()
    pipe = MaskDiTPipeline(text_model(), EDMHeunScheduler(), tokenizer=tokenizer, text_encoder=encoder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_prompts_and_their_embeddings_give_the_same_images_and_the_negative_prompt_defaults_to_empty(text_pipeline):
    pipe = text_pipeline
    call = dict(num_inference_steps=3, guidance_scale=2.0, output_type="pt")
    by_prompt = pipe(prompt=["a red cat", "a dog"], generator=torch.Generator().manual_seed(0), **call).images
    embeds, mask = pipe.encode_prompt(["a red cat", "a dog"])
    negative, negative_mask = pipe.encode_prompt(["", ""])
    by_embeds = pipe(
        prompt_embeds=embeds, prompt_attention_mask=mask, negative_prompt_embeds=negative,
        negative_prompt_attention_mask=negative_mask, generator=torch.Generator().manual_seed(0), **call,
    ).images  # fmt: skip
    torch.testing.assert_close(by_prompt, by_embeds)
    other = pipe(
        prompt=["a red cat", "a dog"], negative_prompt="blue", generator=torch.Generator().manual_seed(0), **call
    )
    assert not torch.allclose(other.images, by_prompt)
    two = pipe(prompt="a cat", num_images_per_prompt=2, generator=torch.Generator().manual_seed(0), **call).images
    assert two.shape == (2, 3, 8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one of prompt and prompt_embeds"),
        ({"prompt": "a cat", "prompt_embeds": torch.zeros(1, 8, 16)}, "exactly one of"),
        ({"prompt": "a cat", "batch_size": 2}, "batch_size is for unconditional"),
        ({"prompt": "a cat", "class_labels": [1]}, "no classes"),
        ({"prompt": 3}, "prompt must be a string"),
        ({"prompt_embeds": torch.zeros(1, 8, 15)}, r"prompt_embeds must have shape \(batch, text_tokens, 16\)"),
    ],
)
def test_bad_prompt_arguments_raise_naming_them(text_pipeline, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        text_pipeline(num_inference_steps=2, **kwargs)


def test_a_class_pipeline_refuses_prompts_and_a_text_pipeline_without_encoder_asks_for_embeddings(text_pipeline):
    from tests.tiny import tiny_transformer

    classes = MaskDiTPipeline(tiny_transformer(seed=0), EDMHeunScheduler())
    with pytest.raises(ValueError, match="not text-conditioned"):
        classes(prompt="a cat", num_inference_steps=2)
    bare = MaskDiTPipeline(text_pipeline.transformer, EDMHeunScheduler())
    with pytest.raises(ValueError, match="pass prompt_embeds"):
        bare(prompt="a cat", num_inference_steps=2)
    card = text_pipeline.create_model_card("me/t2i")
    assert card.data.pipeline_tag == "text-to-image" and "prompt=" in card.text


def test_a_saved_text_pipeline_loads_in_a_fresh_process_and_samples_from_a_prompt(text_pipeline, tmp_path):
    text_pipeline.save_pretrained(tmp_path / "t2i")
    index = json.loads((tmp_path / "t2i" / "model_index.json").read_text())
    assert index["tokenizer"] == ["transformers", "T5Tokenizer"]
    assert index["text_encoder"] == ["transformers", "T5EncoderModel"]
    expected = text_pipeline(
        prompt=["a blue dog"], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    torch.save(expected, tmp_path / "expected.pt")
    script = f"""
import torch
from diffusers import DiffusionPipeline
from diffusers_masked import MaskDiTPipeline
for pipe in (DiffusionPipeline.from_pretrained({str(tmp_path / "t2i")!r}, trust_remote_code=True),
             MaskDiTPipeline.from_pretrained({str(tmp_path / "t2i")!r})):
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a blue dog"], num_inference_steps=3, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(images, torch.load({str(tmp_path / "expected.pt")!r}))
print("DONE")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env())
    assert "DONE" in result.stdout, result.stderr[-3000:]


FIXTURE = REPO / "tests" / "fixtures" / "maskdit-class-0.2"


def test_a_class_conditional_pipeline_saved_before_text_support_still_loads_and_samples_the_same():
    # Saved by the package before this change (tests/fixtures/README.md says how), with the images it gave then.
    pipe = MaskDiTPipeline.from_pretrained(FIXTURE / "pipeline")
    pipe.set_progress_bar_config(disable=True)
    assert pipe.tokenizer is None and pipe.text_encoder is None and not pipe.is_text_conditioned
    images = pipe(
        class_labels=[3, 7], num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    torch.testing.assert_close(images, torch.load(FIXTURE / "expected.pt"))


# ------------------------------------------------------------------------------------------------ the script


def _load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_text_to_image", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


train = _load_script()


def test_the_built_in_text_default_and_its_checks(tmp_path, capsys):
    args = train.parse_args([])
    assert args.recipe == "digits@v1" and args.builtin_digits and args.transformer == "maskdit"
    assert args.caption_dropout_prob == 0.1 and args.validation_prompts[0] == "a handwritten zero"
    for argv, match in [
        (["--transformer", "pixart"], "--transformer pixart needs --vae"),
        (["--train_data_dir", str(tmp_path)], "needs --text_encoder_name_or_path"),
        (["--caption_dropout_prob", "1"], "--caption_dropout_prob"),
    ]:
        with pytest.raises(SystemExit):
            train.parse_args(argv)
        assert match in capsys.readouterr().err, argv


TINY_TEXT_MAASKDIT = json.dumps(
    {"patch_size": 2, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16, "decoder_num_layers": 1,
     "decoder_num_attention_heads": 2, "decoder_attention_head_dim": 16}
)  # fmt: skip
COMMON = ["--report_to", "none", "--cpu_threads", "1", "--validation_steps", "0", "--num_inference_steps", "2"]


@pytest.mark.slow
def test_a_tiny_text_default_run_saves_a_pipeline_that_samples_from_prompts_with_its_evaluation(tmp_path):
    out = tmp_path / "t2i"
    launch(
        SCRIPT, "--output_dir", str(out), "--model_config", TINY_TEXT_MAASKDIT, "--resolution", "8",
        "--max_train_steps", "3", "--unmask_tuning_steps", "1", "--train_batch_size", "16", "--unmask_batch_size", "8",
        "--num_eval_samples_per_class", "4", "--num_validation_images_per_class", "1", *COMMON,
    )  # fmt: skip
    metrics = json.loads((out / "eval_results.json").read_text())
    assert metrics["prompt_template"] == "a handwritten {word}" and 0 <= metrics["accuracy"] <= 1
    assert 0 <= metrics["bold_heavier_share"] <= 1 and metrics["num_pairs"] == 10
    card = (out / "README.md").read_text()
    assert "pipeline_tag: text-to-image" in card and "Prompted-digit accuracy" in card
    assert list((out / "latent-cache").glob("text-*"))  # the caption embeddings, cached beside the latents
    pipe = MaskDiTPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(prompt=["a bold handwritten seven"], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 1) and np.isfinite(images).all()


def _captioned_imagefolder(root: Path, size=16):
    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    lines = []
    for i in range(8):
        name = f"{i}.png"
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / name)
        # A list per image (one column type for Arrow): one caption, or two to pick from.
        text = [["a red cat"], ["a blue dog"]][i % 2] if i % 3 else ["a photo of a cat", "the cat"]
        lines.append(json.dumps({"file_name": name, "text": text}))
    (root / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.mark.slow
def test_a_routed_pixart_run_saves_a_stock_pipeline_that_loads_without_this_package(tmp_path):
    data, vae, encoder_dir = tmp_path / "images", tmp_path / "vae", tmp_path / "t5"
    _captioned_imagefolder(data)
    tiny_vae().save_pretrained(vae)
    tokenizer, encoder = tiny_text_pair()
    tokenizer.save_pretrained(encoder_dir)
    encoder.save_pretrained(encoder_dir)
    out = tmp_path / "pixart"
    pixart = json.dumps({"num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 8, "patch_size": 2})
    launch(
        SCRIPT, "--transformer", "pixart", "--train_data_dir", str(data), "--vae", str(vae),
        "--text_encoder_name_or_path", str(encoder_dir), "--max_sequence_length", "8", "--resolution", "16",
        "--model_config", pixart, "--max_train_steps", "3", "--train_batch_size", "4", "--output_dir", str(out),
        "--tread_routes", '[{"selection_ratio": 0.5, "start_layer_idx": 1, "end_layer_idx": -2}]',
        "--validation_prompts", "a red cat", "a blue dog", "--num_validation_images_per_class", "1", *COMMON,
    )  # fmt: skip
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "PixArtAlphaPipeline" and not list(out.rglob("*.py"))
    assert {v[0] for k, v in index.items() if not k.startswith("_")} == {"diffusers", "transformers"}
    assert "token routing (TREAD" in (out / "README.md").read_text()
    script = f"""
import sys
sys.modules["diffusers_masked"] = None
from diffusers import DiffusionPipeline, PixArtAlphaPipeline
pipe = DiffusionPipeline.from_pretrained({str(out)!r})
assert type(pipe) is PixArtAlphaPipeline
pipe.set_progress_bar_config(disable=True)
images = pipe("a red cat", num_inference_steps=2, use_resolution_binning=False, clean_caption=False,
              max_sequence_length=8, output_type="np").images
assert images.shape == (1, 16, 16, 3), images.shape
print("DONE")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env())
    assert "DONE" in result.stdout, result.stderr[-3000:]


# ------------------------------------------------------------------------------------------------ CLIP score


def tiny_clip(folder: Path):
    """A random CLIP model with a character-level BPE tokenizer (no merges), saved to `folder`."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    folder.mkdir(parents=True)
    chars = list(bytes_to_unicode().values())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(token, len(vocab))
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    images = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=16, patch_size=8),
        projection_dim=8,
    )  # fmt: skip
    CLIPModel(config).save_pretrained(folder)


def test_clip_score_matches_a_cosine_written_out(tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    from diffusers_masked.evaluation.clip import clip_score

    tiny_clip(tmp_path / "clip")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (4, 16, 16, 3), dtype=np.uint8)
    prompts = ["a red cat", "a dog", "blue", "the photo"]
    score = clip_score(images, prompts, tmp_path / "clip", batch_size=3)
    model, processor = CLIPModel.from_pretrained(tmp_path / "clip"), CLIPProcessor.from_pretrained(tmp_path / "clip")
    inputs = processor(text=prompts, images=list(images), return_tensors="pt", padding=True)
    with torch.no_grad():  # the projected embeddings, written out: the pooled output through each projection
        image = model.visual_projection(model.vision_model(pixel_values=inputs.pixel_values).pooler_output)
        text = model.text_projection(
            model.text_model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask).pooler_output
        )
    cosine = F.cosine_similarity(image, text).clamp(min=0)
    assert score == pytest.approx(float(100 * cosine.mean()), abs=1e-3)
    with pytest.raises(ValueError, match="not a local folder"):
        clip_score(images, prompts, "openai/clip-vit-large-patch14")


@pytest.mark.slow
def test_sample_py_with_a_prompts_file_then_evaluate_fid_with_a_clip_score(text_pipeline, tmp_path):
    text_pipeline.save_pretrained(tmp_path / "t2i")
    (tmp_path / "prompts.txt").write_text("a red cat\n\na blue dog\n")
    run = [sys.executable, str(REPO / "examples" / "sample.py"), "--pipeline", str(tmp_path / "t2i")]
    run += ["--prompts_file", str(tmp_path / "prompts.txt"), "--num_samples", "5", "--batch_size", "2"]
    run += ["--num_inference_steps", "2", "--output_dir", str(tmp_path / "samples")]
    result = subprocess.run(run, capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    with np.load(tmp_path / "samples" / "samples_5x8x8x3.npz") as arrays:
        assert arrays["arr_1"].tolist() == [0, 1, 0, 1, 0]
    assert json.loads((tmp_path / "samples" / "prompts.json").read_text()) == ["a red cat", "a blue dog"]
    tiny_clip(tmp_path / "clip")
    evaluate = [sys.executable, str(REPO / "examples" / "evaluate_fid.py"), "--samples"]
    evaluate += [str(tmp_path / "samples" / "samples_5x8x8x3.npz"), "--clip_model", str(tmp_path / "clip")]
    evaluate += ["--output_json", str(tmp_path / "scores.json")]
    result = subprocess.run(evaluate, capture_output=True, text=True, timeout=300, env=env())
    assert result.returncode == 0, result.stderr[-3000:]
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert 0 <= scores["clip_score"] <= 100 and "fid" not in scores


@pytest.mark.slow
def test_a_text_pipeline_loads_by_hub_repo_id_with_the_same_code_check(text_pipeline, tmp_path):
    from tests.hub_stand_in import HubStandIn
    from tests.test_hub_loading import run_fresh

    text_pipeline.save_pretrained(tmp_path / "t2i")
    expected = text_pipeline(
        prompt=["a red cat"], num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0)
    ).images
    torch.save(expected, tmp_path / "expected.pt")
    with HubStandIn() as hub:
        hub.add_folder("org/t2i", tmp_path / "t2i")
        run_fresh(
            f"""
            import torch
            from diffusers_masked import MaskDiTPipeline
            pipe = MaskDiTPipeline.from_pretrained("org/t2i")  # no trust_remote_code: the shims are checked
            pipe.set_progress_bar_config(disable=True)
            images = pipe(prompt=["a red cat"], num_inference_steps=2, output_type="pt",
                          generator=torch.Generator().manual_seed(0)).images
            torch.testing.assert_close(images, torch.load({str(tmp_path / "expected.pt")!r}))
            print("DONE")
            """,
            hub,
            tmp_path / "home",
        )


@pytest.mark.slow
def test_a_killed_text_run_resumes_to_the_weights_of_an_uninterrupted_one(tmp_path):
    from tests.launch import assert_same_weights, kill_when, weights

    common = [
        "--model_config", TINY_TEXT_MAASKDIT, "--resolution", "8", "--max_train_steps", "30",
        "--unmask_tuning_steps", "10", "--train_batch_size", "16", "--unmask_batch_size", "8",
        "--checkpointing_steps", "10", "--num_eval_samples_per_class", "0", "--num_validation_images_per_class", "1",
        *COMMON,
    ]  # fmt: skip
    launch(SCRIPT, "--output_dir", str(tmp_path / "reference"), *common)
    killed = tmp_path / "killed"
    kill_when(SCRIPT, ["--output_dir", str(killed), *common], killed / "checkpoint-20")
    launch(SCRIPT, "--output_dir", str(killed), *common, "--resume_from_checkpoint", "latest")
    final = "transformer/diffusion_pytorch_model.safetensors"
    assert_same_weights(weights(killed / final), weights(tmp_path / "reference" / final))
