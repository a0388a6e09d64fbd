"""Captions for text-to-image training: a text encoder's embeddings of every distinct caption, computed once and
cached on disk (resumably, shard by shard, like the latent cache), and the captioned digits of the built-in default.

A dataset's rows keep their captions as ids into that cache (``caption_ids``, several per image when it has several
captions); each step picks one per image from the step's generator, and caption dropout swaps in the empty prompt's
embedding (id 0), which is also what a pipeline's negative prompt defaults to, as PixArt-alpha trains and samples.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..utils.io import save_dataset
from .latents import _weights_fingerprint

_TEXT_CACHE_VERSION = 1
EMPTY_CAPTION_ID = 0  # the empty prompt: caption dropout and the default negative prompt
TEXT_COLUMNS = ["prompt_embeds", "prompt_attention_mask"]

# ---------------------------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------------------------


def encode_captions(
    captions: Sequence[str],
    tokenizer,
    text_encoder,
    max_sequence_length: int | None = None,
    device=None,
    batch_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`text_encoder`'s `last_hidden_state` for `captions`, padded (or cut) to `max_sequence_length` tokens
    (defaults to the tokenizer's `model_max_length`), and the padding mask: ``(embeds (N, T, D) float32, mask (N, T)
    long)``. Any `transformers` encoder that returns `last_hidden_state` (a T5 encoder, a CLIP text model) works."""
    length = max_sequence_length or tokenizer.model_max_length
    if not isinstance(length, int) or not 1 <= length <= 100_000:
        raise ValueError(
            f"max_sequence_length must be a positive int (the tokenizer's model_max_length is "
            f"{tokenizer.model_max_length!r}); pass it explicitly"
        )
    device = device if device is not None else text_encoder.device
    embeds, masks = [], []
    for start in range(0, len(captions), batch_size):
        tokens = tokenizer(
            list(captions[start : start + batch_size]),
            padding="max_length",
            max_length=length,
            truncation=True,
            return_tensors="pt",
        )
        ids, mask = tokens.input_ids.to(device), tokens.attention_mask.to(device)
        with torch.no_grad():
            hidden = text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        embeds.append(hidden.float().cpu())
        masks.append(mask.long().cpu())
    if not embeds:
        raise ValueError("encode_captions got no captions")
    return torch.cat(embeds), torch.cat(masks)


def text_cache_key(captions: Sequence[str], tokenizer, text_encoder, max_sequence_length: int) -> str:
    """The key of `extract_text_embeddings`' cache: the captions, the tokenizer (class, vocabulary, special tokens),
    the encoder (class, config without private entries, a hash of its weights) and the sequence length."""
    encoder_config = {k: v for k, v in text_encoder.config.to_dict().items() if not str(k).startswith("_")}
    payload = {
        "version": _TEXT_CACHE_VERSION,
        "captions": hashlib.sha256("\x00".join(captions).encode()).hexdigest(),
        "tokenizer": [type(tokenizer).__name__, sorted(tokenizer.get_vocab().items()), tokenizer.all_special_tokens],
        "encoder": [type(text_encoder).__name__, encoder_config, _weights_fingerprint(text_encoder)],
        "max_sequence_length": max_sequence_length,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:20]


def extract_text_embeddings(
    captions: Sequence[str],
    tokenizer,
    text_encoder,
    cache_dir: str | os.PathLike,
    max_sequence_length: int,
    batch_size: int = 64,
    device=None,
    shard_size: int = 4096,
    process_index: int = 0,
    num_processes: int = 1,
    wait_for_everyone: Callable[[], None] | None = None,
):
    """Encode every caption once and cache the embeddings on disk, as `extract_latents` caches latents.

    The captions (distinct, the empty prompt first: see `caption_table`) are cut into shards of `shard_size`; each
    process encodes its share (shard ``i`` goes to process ``i mod num_processes``), each shard written under a
    temporary name and renamed when complete, so that an interrupted run (a kill included) keeps its finished shards
    and the next call encodes only the others. The main process then merges them into one `datasets` folder,
    ``cache_dir/text-<key>`` (`text_cache_key`); a later call with the same inputs loads it and encodes nothing.

    Returns:
        `datasets.Dataset`: ``prompt_embeds`` ``(T, D)`` float32 and ``prompt_attention_mask`` ``(T,)`` int64, one
        row per caption in the given order, in torch format.
    """
    import datasets
    from tqdm.auto import tqdm

    captions = list(captions)
    if not captions:
        raise ValueError("extract_text_embeddings got no captions")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"shard_size must be a positive int, got {shard_size!r}")
    if num_processes > 1 and wait_for_everyone is None:
        raise ValueError("extract_text_embeddings with num_processes > 1 needs wait_for_everyone (a barrier)")
    barrier = wait_for_everyone or (lambda: None)
    cache_dir = Path(cache_dir)
    final_dir = cache_dir / f"text-{text_cache_key(captions, tokenizer, text_encoder, max_sequence_length)}"
    if final_dir.is_dir():
        return _load_text_cache(final_dir).with_format("torch")
    text_encoder.eval()
    if device is not None:
        text_encoder.to(device)
    shard_dir = cache_dir / f".{final_dir.name}-shards"
    num_shards = math.ceil(len(captions) / shard_size)
    shard_paths = [shard_dir / f"shard-{index:05d}-of-{num_shards:05d}" for index in range(num_shards)]
    mine = [index for index in range(process_index, num_shards, num_processes) if not shard_paths[index].is_dir()]
    shard_dir.mkdir(parents=True, exist_ok=True)
    progress = tqdm(total=len(mine), desc="caption embeddings (shards)", disable=process_index != 0)
    try:
        for index in mine:
            part = captions[index * shard_size : (index + 1) * shard_size]
            embeds, masks = encode_captions(part, tokenizer, text_encoder, max_sequence_length, device, batch_size)
            features = datasets.Features(
                {
                    "prompt_embeds": datasets.Array2D(shape=tuple(embeds.shape[1:]), dtype="float32"),
                    "prompt_attention_mask": datasets.Sequence(datasets.Value("int64")),
                }
            )
            shard = datasets.Dataset.from_dict(
                {"prompt_embeds": embeds.numpy(), "prompt_attention_mask": masks.numpy()}, features=features
            )
            save_dataset(shard, shard_paths[index])
            progress.update(1)
    except BaseException:
        if not any(shard_dir.iterdir()):
            shard_dir.rmdir()
        raise
    finally:
        progress.close()
    barrier()
    if process_index == 0 and not final_dir.is_dir():
        save_dataset(datasets.concatenate_datasets([_load_text_cache(p) for p in shard_paths]), final_dir, cache_dir)
        shutil.rmtree(shard_dir, ignore_errors=True)
    barrier()
    return _load_text_cache(final_dir).with_format("torch")


def _load_text_cache(path: Path):
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as err:
        raise ValueError(
            f"the caption embedding cache {path} cannot be loaded ({type(err).__name__}: {err}); delete that folder "
            "and run again to encode the captions anew"
        ) from err


# ---------------------------------------------------------------------------------------------------------------
# Captions of a dataset
# ---------------------------------------------------------------------------------------------------------------


def caption_table(rows_captions: Sequence[str | Sequence[str]]) -> tuple[list[str], list[list[int]]]:
    """The distinct captions (the empty prompt first, id 0) and each row's caption ids.

    Args:
        rows_captions: per row, one caption or a list of them (a dataset's caption column).

    Raises:
        ValueError: naming the first row without a caption (`None`, an empty list, or not text).
    """
    captions, index, ids = [""], {"": EMPTY_CAPTION_ID}, []
    for row, value in enumerate(rows_captions):
        values = [value] if isinstance(value, str) else value
        if not isinstance(values, (list, tuple)) or not values or not all(isinstance(v, str) for v in values):
            raise ValueError(
                f"row {row} has no caption ({value!r}); every image needs a caption (a string or a list of strings "
                "in the caption column; an imagefolder's metadata.jsonl gives them in its 'text' field)"
            )
        row_ids = []
        for caption in values:
            if caption not in index:
                index[caption] = len(captions)
                captions.append(caption)
            row_ids.append(index[caption])
        ids.append(row_ids)
    return captions, ids


def pick_captions(
    caption_ids: torch.Tensor, generator: torch.Generator | None, dropout_prob: float = 0.0
) -> torch.Tensor:
    """One caption id per row of ``caption_ids`` ``(B, K)`` (padded with -1), uniformly among the row's captions, then
    replaced by the empty prompt (id 0) with probability `dropout_prob` (caption dropout for classifier-free
    guidance). Two draws from `generator`, on its device: ``rand(B)`` for the pick, ``rand(B)`` for the dropout."""
    rand_device = generator.device if generator is not None else "cpu"
    ids = caption_ids.to(rand_device)
    counts = (ids >= 0).sum(dim=1)
    pick = (torch.rand(len(ids), generator=generator, device=rand_device) * counts).long().clamp(max=counts - 1)
    chosen = ids.gather(1, pick[:, None])[:, 0]
    drop = torch.rand(len(ids), generator=generator, device=rand_device) < dropout_prob
    return torch.where(drop, torch.full_like(chosen, EMPTY_CAPTION_ID), chosen)


# ---------------------------------------------------------------------------------------------------------------
# The captioned digits
# ---------------------------------------------------------------------------------------------------------------

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
WEIGHTS = ("bold", "thin")
# Several templates per image: two name the stroke weight, two do not; one is picked per step.
DIGIT_TEMPLATES = (
    "a handwritten {word}",
    "the digit {digit}",
    "a {weight} handwritten {word}",
    "the digit {digit} with {weight} strokes",
)


def stroke_weights(images: np.ndarray, labels: np.ndarray) -> list[str]:
    """``"bold"`` for an image whose ink (the sum of its pixel values) is above its class's median, else ``"thin"``:
    half of each digit's images each, an attribute the image shows."""
    ink = images.reshape(len(images), -1).astype(np.float64).sum(axis=1)
    weights = []
    medians = {label: np.median(ink[labels == label]) for label in np.unique(labels)}
    for value, label in zip(ink, labels):
        weights.append("bold" if value > medians[label] else "thin")
    return weights


def digit_captions(images: np.ndarray, labels: np.ndarray) -> list[list[str]]:
    """Every template of `DIGIT_TEMPLATES` for each digit image (its class and `stroke_weights`)."""
    weights = stroke_weights(images, labels)
    return [
        [t.format(word=DIGIT_WORDS[int(label)], digit=int(label), weight=weight) for t in DIGIT_TEMPLATES]
        for label, weight in zip(labels, weights)
    ]


def digits_vocabulary() -> list[str]:
    """Every word the digit captions use."""
    words = []
    for template in DIGIT_TEMPLATES:
        for word in template.replace("{word}", "").replace("{digit}", "").replace("{weight}", "").split():
            words.append(word)
    return sorted(set(words) | set(DIGIT_WORDS) | set(WEIGHTS) | {str(d) for d in range(10)})


def build_word_tokenizer(words: Sequence[str], max_length: int):
    """A T5 tokenizer (`transformers.T5Tokenizer`, built in memory, nothing downloaded) whose vocabulary is `words`,
    one token each, plus T5's ``<pad>``, ``</s>`` and ``<unk>``; prompts are padded to `max_length`. It saves and
    loads as any `transformers` tokenizer."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [("\u2581" + word, -3.0) for word in sorted(set(words))]
    tokenizer = T5Tokenizer(vocab=vocab, extra_ids=0)
    tokenizer.model_max_length = max_length
    return tokenizer


def build_tiny_text_encoder(vocab_size: int, width: int = 64, num_layers: int = 2, seed: int = 0):
    """A small random `transformers.T5EncoderModel` (`width` wide, `num_layers` layers, no dropout), initialised from
    `seed` whatever torch's global generator holds. The built-in default trains against it frozen: its outputs are a
    fixed random encoding of the words, which the transformer's cross-attention learns to read. Real use passes a
    pretrained encoder (`--text_encoder_name_or_path`, e.g. a T5 or CLIP text model)."""
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=vocab_size,
        d_model=width,
        d_ff=2 * width,
        d_kv=width // 4,
        num_heads=4,
        num_layers=num_layers,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return T5EncoderModel(config).eval()
