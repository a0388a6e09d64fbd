"""Text conditioning for a run: the tokenizer and text encoder (a pretrained `transformers` pair, or the built-in
digits' small one), the caption embedding cache, one caption's embedding per sample and step, and diffusers' PixArt as
the stock text-to-image transformer."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from ..data.captions import (
    EMPTY_CAPTION_ID,
    build_tiny_text_encoder,
    build_word_tokenizer,
    digits_vocabulary,
    encode_captions,
    extract_text_embeddings,
    pick_captions,
)
from ..utils.safe_loading import check_path_or_hub_id

# The built-in digits' prompts are at most 7 words; with T5's end-of-sequence token, 12 leaves room.
DIGITS_MAX_SEQUENCE_LENGTH = 12
# Text encoders by `config.model_type`: the encoder half for encoder-decoder families, else `AutoModel`.
ENCODER_CLASSES = {
    "t5": "T5EncoderModel",
    "mt5": "MT5EncoderModel",
    "umt5": "UMT5EncoderModel",
    "clip": "CLIPTextModel",
    "clip_text_model": "CLIPTextModel",
}


def load_text_components(
    text_encoder_name_or_path: str | None,
    tokenizer_name_or_path: str | None = None,
    text_encoder_subfolder: str | None = None,
    tokenizer_subfolder: str | None = None,
    max_sequence_length: int | None = None,
    seed: int = 0,
):
    """The run's tokenizer and (frozen, eval-mode) text encoder: from a folder or Hub id (any `transformers` encoder
    whose output has `last_hidden_state`; no remote code is run), or with no path the built-in digits' pair: a T5
    tokenizer of the captions' words and a small random T5 encoder (`build_tiny_text_encoder`, from `seed`). The
    tokenizer's `model_max_length` becomes `max_sequence_length`, so a saved pipeline pads prompts as training did.

    Raises:
        ValueError: a local path that does not exist, or an encoder without `last_hidden_state`.
    """
    import transformers

    if text_encoder_name_or_path is None:
        length = max_sequence_length or DIGITS_MAX_SEQUENCE_LENGTH
        tokenizer = build_word_tokenizer(digits_vocabulary(), length)
        encoder = build_tiny_text_encoder(len(tokenizer), seed=seed)
    else:
        tokenizer_path = tokenizer_name_or_path or text_encoder_name_or_path
        check_path_or_hub_id(text_encoder_name_or_path, "text_encoder_name_or_path")
        check_path_or_hub_id(tokenizer_path, "tokenizer_name_or_path")
        tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path, subfolder=tokenizer_subfolder or "")
        config = transformers.AutoConfig.from_pretrained(
            text_encoder_name_or_path, subfolder=text_encoder_subfolder or ""
        )
        encoder_cls = getattr(transformers, ENCODER_CLASSES.get(config.model_type, "AutoModel"))
        encoder = encoder_cls.from_pretrained(text_encoder_name_or_path, subfolder=text_encoder_subfolder or "")
        if max_sequence_length:
            tokenizer.model_max_length = max_sequence_length
    encoder.requires_grad_(False).eval()
    return tokenizer, encoder


def text_width(text_encoder) -> int:
    """The width of the encoder's `last_hidden_state` (a T5's `d_model`, a CLIP text model's `hidden_size`)."""
    config = text_encoder.config
    width = getattr(config, "d_model", None) or getattr(config, "hidden_size", None)
    if not isinstance(width, int):
        raise ValueError(f"cannot tell the hidden width of {type(text_encoder).__name__} from its config")
    return width


class CaptionEmbeddings:
    """The cached caption embeddings, looked up by id: ``embeddings(ids) -> (embeds (B, T, D), mask (B, T))``.
    Held in memory when small (under `in_memory_bytes`), read from the memory-mapped cache otherwise."""

    def __init__(self, dataset, in_memory_bytes: int = 1 << 30):
        self.dataset = dataset
        first = dataset[0]["prompt_embeds"]
        self.shape = tuple(first.shape)
        self._tensors = None
        if len(dataset) * first.numel() * 4 <= in_memory_bytes:
            rows = dataset[:]  # every row, stacked (datasets' column access is lazy)
            self._tensors = (rows["prompt_embeds"], rows["prompt_attention_mask"])

    def __len__(self) -> int:
        return len(self.dataset)

    def __call__(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._tensors is not None:
            embeds, mask = self._tensors
            return embeds[ids.cpu()], mask[ids.cpu()]
        rows = self.dataset[ids.cpu().tolist()]
        return rows["prompt_embeds"], rows["prompt_attention_mask"]

    @property
    def empty(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The empty prompt's embedding and mask, ``(1, T, D)`` and ``(1, T)``."""
        return self(torch.tensor([EMPTY_CAPTION_ID]))


@dataclass
class TextConditioning:
    """What a text-conditioned run keeps: the caption embeddings and the caption dropout probability."""

    embeddings: CaptionEmbeddings
    dropout_prob: float

    def model_kwargs(self, batch: dict, generator: torch.Generator | None, device) -> dict:
        """A batch's text inputs: one caption per sample (`pick_captions`: two draws from `generator`), the empty
        prompt with `dropout_prob`, as ``{"encoder_hidden_states", "encoder_attention_mask"}`` on `device`."""
        ids = pick_captions(batch["caption_ids"], generator, self.dropout_prob)
        embeds, mask = self.embeddings(ids)
        return {"encoder_hidden_states": embeds.to(device), "encoder_attention_mask": mask.to(device)}


def cache_caption_embeddings(
    accelerator,
    captions: list[str],
    tokenizer,
    text_encoder,
    cache_dir: str | os.PathLike,
    max_sequence_length: int,
    dropout_prob: float,
) -> TextConditioning:
    """Encode the data's captions once into the cache (`extract_text_embeddings`, each process its share) and
    return what the steps look embeddings up in."""
    dataset = extract_text_embeddings(
        captions,
        tokenizer,
        text_encoder,
        cache_dir,
        max_sequence_length,
        device=accelerator.device,
        process_index=accelerator.process_index,
        num_processes=accelerator.num_processes,
        wait_for_everyone=accelerator.wait_for_everyone,
    )
    return TextConditioning(CaptionEmbeddings(dataset), dropout_prob)


def encode_prompts(prompts: list[str], tokenizer, text_encoder, max_sequence_length: int, device=None):
    """The validation prompts' and the empty prompt's embeddings, encoded once so that the text encoder need not
    stay in memory while the transformer trains: ``(embeds, mask, negative_embeds, negative_mask)``."""
    embeds, mask = encode_captions(prompts, tokenizer, text_encoder, max_sequence_length, device=device)
    negative, negative_mask = encode_captions(
        [""] * len(prompts), tokenizer, text_encoder, max_sequence_length, device
    )
    return embeds, mask, negative, negative_mask


# ---------------------------------------------------------------------------------------------------------------
# diffusers' PixArt
# ---------------------------------------------------------------------------------------------------------------


def pixart_preset_config(name: str) -> dict:
    """A `PixArtTransformer2DModel` config of a DiT size (``"S/2"`` ... ``"XL/2"``; PixArt-alpha is XL/2): DiT's depth,
    heads and width, PixArt-alpha's block (adaLN-single, cross-attention over the projected caption), noise
    prediction only (`out_channels` = `in_channels`, filled in by `build_pixart`)."""
    from .models import dit_preset_config

    config = dit_preset_config(name)
    del config["num_embeds_ada_norm"]  # PixArt conditions on text, not on class labels
    return config


def build_pixart(data, caption_channels: int, *, start=None, config: dict | None = None):
    """A diffusers `PixArtTransformer2DModel` for `data` (latents) and a text encoder `caption_channels` wide:
    `start`'s weights or a new model from `config` (PixArt-alpha's block settings filled in).

    Raises:
        ValueError: a model that does not fit the data or the text encoder, or predicts a variance.
    """
    from diffusers import PixArtTransformer2DModel

    from .models import load_start_model, reseed_for_init

    if start is not None:
        model = load_start_model(start, PixArtTransformer2DModel)
    else:
        config = dict(config or {})
        inner = config.get("num_attention_heads", 16) * config.get("attention_head_dim", 72)
        defaults = {
            "sample_size": data.sample_size,
            "in_channels": data.in_channels,
            "out_channels": data.in_channels,
            "caption_channels": caption_channels,
            "cross_attention_dim": inner,
            "attention_bias": True,
            "activation_fn": "gelu-approximate",
            "num_embeds_ada_norm": 1000,
            "norm_type": "ada_norm_single",
            "norm_elementwise_affine": False,
            "norm_eps": 1e-6,
        }
        reseed_for_init()
        model = PixArtTransformer2DModel(**{**defaults, **config})
    c = model.config
    problems = []
    if (c.sample_size, c.in_channels) != (data.sample_size, data.in_channels):
        problems.append(
            f"it takes {c.in_channels}x{c.sample_size}x{c.sample_size} inputs, the data is "
            f"{data.in_channels}x{data.sample_size}x{data.sample_size}"
        )
    if c.out_channels != c.in_channels:
        problems.append(f"out_channels={c.out_channels}: noise prediction only (out_channels = in_channels)")
    if c.caption_channels != caption_channels:
        problems.append(f"caption_channels={c.caption_channels} but the text encoder is {caption_channels} wide")
    if problems:
        raise ValueError("the PixArt transformer does not fit: " + "; ".join(problems))
    return model


def pixart_model_kwargs(batch_size: int, resolution: int, device) -> dict:
    """PixArt's size conditioning (used by its 1024-px configuration only): the image size and aspect ratio."""
    return {
        "added_cond_kwargs": {
            "resolution": torch.tensor([[resolution, resolution]] * batch_size, dtype=torch.float32, device=device),
            "aspect_ratio": torch.ones(batch_size, 1, device=device),
        }
    }
