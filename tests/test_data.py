import math
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL
from sklearn.datasets import load_digits

from diffusers_masked.data import (
    build_transforms,
    collate_fn,
    extract_latents,
    latent_cache_key,
    load_digits_dataset,
    load_image_dataset,
    make_preprocess,
    open_image,
    sample_latents,
    verify_images,
)
from tests.tiny import tiny_vae

# ---------------------------------------------------------------------------------------------------------
# Digits
# ---------------------------------------------------------------------------------------------------------


def _rows(dataset):
    return sorted((row["label"], np.asarray(row["image"]).tobytes()) for row in dataset)


def test_digits_at_native_resolution_are_the_sklearn_digits_scaled_to_0_255():
    dataset, id2label = load_digits_dataset(resolution=8)
    reference = load_digits()
    assert len(dataset) == 1797
    assert id2label == {i: str(i) for i in range(10)}
    assert dataset.features["label"].names == [str(i) for i in range(10)]
    for i in (0, 1, 500, 1796):
        image = dataset[i]["image"]
        assert image.mode == "L" and image.size == (8, 8)
        np.testing.assert_array_equal(np.asarray(image), np.rint(reference.images[i] * 255 / 16).astype(np.uint8))
        assert dataset[i]["label"] == reference.target[i]


def test_digits_are_upsampled_to_the_requested_resolution():
    dataset, _ = load_digits_dataset(resolution=16, split="heldout", holdout_fraction=0.1)
    image = dataset[0]["image"]
    assert image.mode == "L" and image.size == (16, 16)
    assert np.asarray(image).max() > 200  # the strokes survive the bicubic upsampling


def test_digits_split_partitions_the_set_and_is_stratified():
    splits, _ = load_digits_dataset(resolution=8, holdout_fraction=0.2, seed=3)
    assert set(splits) == {"train", "heldout"}
    assert len(splits["train"]) + len(splits["heldout"]) == 1797
    full, _ = load_digits_dataset(resolution=8)
    assert sorted(_rows(splits["train"]) + _rows(splits["heldout"])) == _rows(full)
    totals = np.bincount(full["label"], minlength=10)
    heldout_counts = np.bincount(splits["heldout"]["label"], minlength=10)
    assert np.all(np.abs(heldout_counts - 0.2 * totals) <= 1)


def test_digits_split_is_deterministic_in_the_seed():
    first, _ = load_digits_dataset(resolution=8, split="heldout", holdout_fraction=0.2, seed=1)
    again, _ = load_digits_dataset(resolution=8, split="heldout", holdout_fraction=0.2, seed=1)
    other, _ = load_digits_dataset(resolution=8, split="heldout", holdout_fraction=0.2, seed=2)
    assert first["label"] == again["label"]
    assert _rows(first) == _rows(again)
    assert _rows(first) != _rows(other)
    assert first._fingerprint == again._fingerprint  # so latent caches built on it are found again


def test_digits_reject_bad_arguments():
    with pytest.raises(ValueError, match="holdout_fraction > 0"):
        load_digits_dataset(split="heldout")
    with pytest.raises(ValueError, match="resolution"):
        load_digits_dataset(resolution=4)
    with pytest.raises(ValueError, match="split"):
        load_digits_dataset(split="test", holdout_fraction=0.2)


# ---------------------------------------------------------------------------------------------------------
# Transforms and batching
# ---------------------------------------------------------------------------------------------------------


def test_transform_resizes_the_shorter_side_and_crops_the_centre():
    # A 3:1 image whose middle third is white: the centre crop of the resized image is all white.
    array = np.zeros((10, 30), np.uint8)
    array[:, 10:20] = 255
    out = build_transforms(8, num_channels=1)(PIL.Image.fromarray(array))
    assert out.shape == (1, 8, 8) and out.dtype == torch.float32
    torch.testing.assert_close(out[:, :, 2:6], torch.ones(1, 8, 4))


def test_transform_maps_0_255_to_minus_one_one_and_converts_channels():
    gray = PIL.Image.fromarray(np.array([[0, 255], [255, 0]], np.uint8))
    rgb = build_transforms(2, num_channels=3)(gray)
    assert rgb.shape == (3, 2, 2)
    torch.testing.assert_close(rgb[0], torch.tensor([[-1.0, 1.0], [1.0, -1.0]]))
    torch.testing.assert_close(rgb[0], rgb[2])
    color = PIL.Image.new("RGB", (4, 4), (255, 0, 0))
    expected = round(0.299 * 255) / 127.5 - 1  # PIL's ITU-R 601 luma of pure red
    torch.testing.assert_close(build_transforms(4, num_channels=1)(color), torch.full((1, 4, 4), expected))


def test_random_flip_flips_about_half_the_time_and_only_when_asked():
    array = np.zeros((4, 4), np.uint8)
    array[:, :2] = 255
    image = PIL.Image.fromarray(array)
    flipping = build_transforms(4, random_flip=True, num_channels=1)
    left_bright = [bool(flipping(image)[0, 0, 0] > 0) for _ in range(200)]
    assert 60 < sum(left_bright) < 140
    steady = build_transforms(4, num_channels=1)
    assert all(steady(image)[0, 0, 0] > 0 for _ in range(20))


def test_transform_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_channels"):
        build_transforms(16, num_channels=2)


def test_preprocess_and_collate_give_model_batches():
    dataset, _ = load_digits_dataset(resolution=16)
    dataset = dataset.select(range(10)).with_transform(make_preprocess(build_transforms(16, num_channels=1)))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate_fn)
    batch = next(iter(loader))
    assert batch["pixel_values"].shape == (4, 1, 16, 16) and batch["pixel_values"].dtype == torch.float32
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["class_labels"].dtype == torch.long
    assert batch["class_labels"].tolist() == load_digits().target[:4].tolist()


# ---------------------------------------------------------------------------------------------------------
# Image folders and Hub-style datasets
# ---------------------------------------------------------------------------------------------------------


def _write_image(path: Path, seed: int, size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    PIL.Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    for i, name in enumerate(["cat", "dog"]):
        for j in range(3):
            _write_image(root / name / f"{j}.png", seed=10 * i + j)
    return root


def test_image_folder_labels_come_from_sub_folders(image_folder, tmp_path):
    dataset, id2label = load_image_dataset(train_data_dir=image_folder, cache_dir=tmp_path / "hf")
    assert id2label == {0: "cat", 1: "dog"}
    assert dataset.column_names == ["image", "label"]
    assert sorted(dataset["label"]) == [0, 0, 0, 1, 1, 1]
    pixels = build_transforms(8)(dataset[0]["image"])
    assert pixels.shape == (3, 8, 8)


def test_image_folder_without_labels_is_unconditional(image_folder, tmp_path):
    dataset, id2label = load_image_dataset(train_data_dir=image_folder, label_column=None, cache_dir=tmp_path / "hf")
    assert dataset.column_names == ["image"] and id2label is None


def test_dataset_columns_are_renamed_to_image_and_label(tmp_path):
    features = datasets.Features(
        {"img": datasets.Image(), "digit": datasets.ClassLabel(names=["a", "b"]), "extra": datasets.Value("string")}
    )
    images = [PIL.Image.new("L", (8, 8), value) for value in (0, 255)]
    source = datasets.Dataset.from_dict({"img": images, "digit": [0, 1], "extra": ["x", "y"]}, features=features)
    (tmp_path / "repo").mkdir()
    source.to_parquet(str(tmp_path / "repo" / "train.parquet"))
    dataset, id2label = load_image_dataset(
        dataset_name=str(tmp_path / "repo"), image_column="img", label_column="digit", cache_dir=tmp_path / "hf"
    )
    assert dataset.column_names == ["image", "label"]
    assert id2label == {0: "a", 1: "b"}
    assert open_image(dataset[1]["image"]).getpixel((0, 0)) == 255


def test_missing_column_error_names_the_available_columns(image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"label_column='class'.*available columns: \['image', 'label'\]"):
        load_image_dataset(train_data_dir=image_folder, label_column="class", cache_dir=tmp_path / "hf")
    with pytest.raises(ValueError, match="image_column='picture'"):
        load_image_dataset(train_data_dir=image_folder, image_column="picture", cache_dir=tmp_path / "hf")


def test_exactly_one_source_is_required(image_folder):
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset()
    with pytest.raises(ValueError, match="exactly one"):
        load_image_dataset(dataset_name="some/dataset", train_data_dir=image_folder)


@pytest.fixture
def folder_with_corrupt_files(image_folder):
    good = (image_folder / "dog" / "0.png").read_bytes()
    (image_folder / "dog" / "truncated.png").write_bytes(good[: len(good) // 2])
    (image_folder / "cat" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    return image_folder


def test_corrupt_image_fails_with_its_path_when_decoded(folder_with_corrupt_files, tmp_path):
    dataset, _ = load_image_dataset(train_data_dir=folder_with_corrupt_files, cache_dir=tmp_path / "hf")
    paths = [row["image"]["path"] for row in dataset]
    truncated = next(i for i, path in enumerate(paths) if path.endswith("truncated.png"))
    transform = build_transforms(8)
    with pytest.raises(ValueError, match=r"truncated\.png"):
        transform(dataset[truncated]["image"])
    loader = dataset.with_transform(make_preprocess(transform))
    with pytest.raises(ValueError, match=r"(truncated|garbage)\.png"):
        [loader[i] for i in range(len(loader))]


def test_verify_images_lists_every_unreadable_file(folder_with_corrupt_files, image_folder, tmp_path):
    with pytest.raises(ValueError, match=r"2 of 8 images") as excinfo:
        verify_images(folder_with_corrupt_files)
    assert "truncated.png" in str(excinfo.value) and "garbage.png" in str(excinfo.value)


def test_verify_images_counts_a_clean_dataset(image_folder, tmp_path):
    dataset, _ = load_image_dataset(train_data_dir=image_folder, cache_dir=tmp_path / "hf")
    assert verify_images(dataset) == 6


# ---------------------------------------------------------------------------------------------------------
# Images deeper than 8 bits
# ---------------------------------------------------------------------------------------------------------

# 16-bit gray levels across the range, multiples of 257 (exact 8-bit levels) and not.
SIXTEEN_BIT = np.array(
    [[0, 257, 32768, 65535], [1000, 30000, 40000, 65000], [128, 129, 65407, 65408], [12345, 23456, 34567, 45678]],
    dtype=np.uint16,
)


def _expected_8_bit(values: np.ndarray) -> np.ndarray:
    return np.round(values.astype(np.float64) * 255 / 65535)


def _sixteen_bit_png(path: Path) -> Path:
    PIL.Image.fromarray(SIXTEEN_BIT).save(path)
    return path


def _sixteen_bit_source(kind: str, tmp_path: Path):
    """The 16-bit image as a record or a PIL image of the given PIL mode."""
    if kind == "I;16 png":
        return {"path": str(_sixteen_bit_png(tmp_path / "deep.png")), "bytes": None}
    if kind == "I;16B tiff":
        PIL.Image.fromarray(SIXTEEN_BIT.astype(">u2")).save(tmp_path / "deep.tif")
        assert PIL.Image.open(tmp_path / "deep.tif").mode == "I;16B"
        return {"path": str(tmp_path / "deep.tif"), "bytes": None}
    mode, order = {"I;16L in memory": ("I;16L", "<u2"), "I;16N in memory": ("I;16N", "=u2")}[kind]
    return PIL.Image.frombytes(mode, SIXTEEN_BIT.shape[::-1], SIXTEEN_BIT.astype(order).tobytes())


@pytest.mark.parametrize("kind", ["I;16 png", "I;16B tiff", "I;16L in memory", "I;16N in memory"])
def test_16_bit_images_are_scaled_by_their_range_not_clipped(kind, tmp_path):
    source = _sixteen_bit_source(kind, tmp_path)
    expected = _expected_8_bit(SIXTEEN_BIT)
    np.testing.assert_array_equal(np.asarray(open_image(source)), expected)
    for channels in (1, 3):  # 4x4 already: no resize, so the transform is exactly 0..255 -> [-1, 1]
        pixels = build_transforms(4, num_channels=channels)(source)
        torch.testing.assert_close(pixels, torch.from_numpy(expected / 127.5 - 1).float().expand(channels, 4, 4))


def test_16_bit_pngs_opened_as_mode_i_by_old_pillow_are_scaled_too(tmp_path, monkeypatch):
    from PIL import PngImagePlugin

    path = _sixteen_bit_png(tmp_path / "deep.png")
    monkeypatch.setitem(PngImagePlugin._MODES, (16, 0), ("I", "I;16B"))  # Pillow < 10.3's mode for 16-bit gray
    assert PIL.Image.open(path).mode == "I"
    np.testing.assert_array_equal(np.asarray(open_image(path)), _expected_8_bit(SIXTEEN_BIT))


def _write_32_bit_tiff(path: Path, mode: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.full((10, 12), 70000, np.int32) if mode == "I" else np.full((10, 12), 0.5, np.float32)
    PIL.Image.fromarray(values).save(path)
    assert PIL.Image.open(path).mode == mode
    return path


@pytest.mark.parametrize("mode", ["I", "F"])
def test_32_bit_images_are_refused_by_path_before_training_and_when_decoded(mode, image_folder, tmp_path):
    deep = _write_32_bit_tiff(image_folder / "cat" / "deep.tif", mode)
    with pytest.raises(ValueError, match=r"1 of 7 images are refused") as excinfo:
        verify_images(image_folder)
    assert str(deep) in str(excinfo.value) and f"PIL mode {mode!r}" in str(excinfo.value)
    with pytest.raises(ValueError, match=r"deep\.tif.*8-bit"):
        build_transforms(8)({"path": str(deep), "bytes": None})


# ---------------------------------------------------------------------------------------------------------
# Layouts and paths that give no (or wrong) labels
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "files, says",
    [
        (["a.png", "b.png"], "lie directly in it, not in class folders"),
        (["cat/a.png", "cat/b.png"], "one class folder \\('cat'\\)"),
        (["cat/x/a.png", "dog/y/b.png"], "nested below its class folders"),
        (["cat/a.png", "dog/b.png", "c.png"], "has images directly in it \\(1, e.g. 'c.png'\\) beside"),
    ],
    ids=["flat", "one_class", "nested", "loose_beside_classes"],
)
def test_image_folder_layouts_without_class_labels_say_the_layout_and_the_flag(files, says, tmp_path):
    for i, name in enumerate(files):
        _write_image(tmp_path / "images" / name, seed=i)
    with pytest.raises(ValueError, match=says) as excinfo:
        load_image_dataset(train_data_dir=tmp_path / "images", cache_dir=tmp_path / "hf")
    assert "root/<class>/<image>" in str(excinfo.value) and "--num_classes 0" in str(excinfo.value)
    # Without labels the same folder loads.
    dataset, _ = load_image_dataset(train_data_dir=tmp_path / "images", label_column=None, cache_dir=tmp_path / "hf")
    assert len(dataset) == len(files)


def test_a_dataset_without_the_label_column_names_the_command_line_flags(tmp_path):
    images = [PIL.Image.new("L", (8, 8), value) for value in (0, 255)]
    datasets.Dataset.from_dict({"img": images}, features=datasets.Features({"img": datasets.Image()})).to_parquet(
        str(tmp_path / "repo" / "train.parquet")
    )
    with pytest.raises(ValueError, match=r"--label_column NAME.*--num_classes 0"):
        load_image_dataset(dataset_name=str(tmp_path / "repo"), image_column="img", cache_dir=tmp_path / "hf")


@pytest.mark.parametrize(
    "source", [{"train_data_dir": "/nope/images"}, {"dataset_name": "./nope"}, {"dataset_name": "/nope/data"}]
)
def test_a_missing_local_path_says_no_such_file_or_folder(source, tmp_path, no_network):
    path = next(iter(source.values()))
    with pytest.raises(ValueError, match=f"no such file or folder: {path}$"):
        load_image_dataset(**source, cache_dir=tmp_path / "hf")


def test_a_hub_id_that_is_no_local_path_still_goes_to_the_hub(tmp_path):
    with pytest.raises(Exception) as excinfo:  # offline in the tests: the Hub is not reached
        load_image_dataset(dataset_name="some-org/some-dataset", cache_dir=tmp_path / "hf")
    assert "no such file or folder" not in str(excinfo.value) and "some-org/some-dataset" in str(excinfo.value)


# ---------------------------------------------------------------------------------------------------------
# Latent pre-extraction
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def vae_dir(tmp_path):
    vae = tiny_vae(num_blocks=1)
    vae.save_pretrained(tmp_path / "vae")
    return tmp_path / "vae"


class CountingEncode:
    def __init__(self, vae):
        self.calls = 0
        self._encode = vae.encode

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self._encode(*args, **kwargs)


def _load_counting_vae(vae_dir):
    vae = AutoencoderKL.from_pretrained(vae_dir)
    vae.encode = CountingEncode(vae)
    return vae


@pytest.fixture
def digits_subset():
    dataset, _ = load_digits_dataset(resolution=16)
    return dataset.select(range(10))


def test_extract_latents_encodes_once_then_reuses_the_cache(vae_dir, digits_subset, tmp_path):
    transform = build_transforms(16)
    first_vae = _load_counting_vae(vae_dir)
    first = extract_latents(digits_subset, first_vae, transform, tmp_path / "cache", batch_size=4)
    assert first_vae.encode.calls == math.ceil(10 / 4)

    second_vae = _load_counting_vae(vae_dir)
    second = extract_latents(digits_subset, second_vae, transform, tmp_path / "cache", batch_size=4)
    assert second_vae.encode.calls == 0
    first, second = first[:], second[:]
    assert first["latent_mean"].shape == (10, 4, 16, 16)
    torch.testing.assert_close(second["latent_mean"], first["latent_mean"], rtol=0, atol=0)
    torch.testing.assert_close(second["latent_std"], first["latent_std"], rtol=0, atol=0)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [
        f"latents-{latent_cache_key(digits_subset, second_vae, transform)}"
    ]


def test_extracted_latents_are_the_vae_posterior(vae_dir, digits_subset, tmp_path):
    vae = AutoencoderKL.from_pretrained(vae_dir)
    transform = build_transforms(16)
    latents = extract_latents(digits_subset, vae, transform, tmp_path / "cache", batch_size=3)
    assert latents.column_names == ["latent_mean", "latent_std", "label"]
    assert latents.features["label"] == digits_subset.features["label"]
    latents = latents[:]
    assert latents["label"].tolist() == list(digits_subset["label"])
    pixels = torch.stack([transform(row["image"]) for row in digits_subset])
    with torch.no_grad():
        posterior = vae.encode(pixels).latent_dist
    assert latents["latent_mean"].shape == (10, 4, 16, 16)
    torch.testing.assert_close(latents["latent_mean"], posterior.mean)
    torch.testing.assert_close(latents["latent_std"], posterior.std)


def test_latent_cache_key_follows_weights_transform_and_data(vae_dir, digits_subset):
    vae = AutoencoderKL.from_pretrained(vae_dir)
    key = latent_cache_key(digits_subset, vae, build_transforms(16))
    assert key == latent_cache_key(digits_subset, AutoencoderKL.from_pretrained(vae_dir), build_transforms(16))
    assert key != latent_cache_key(digits_subset, vae, build_transforms(8))
    assert key != latent_cache_key(digits_subset.select(range(5)), vae, build_transforms(16))
    with torch.no_grad():
        vae.encoder.conv_in.weight[0, 0, 0, 0] += 1e-3
    assert key != latent_cache_key(digits_subset, vae, build_transforms(16))


def test_interrupted_extraction_leaves_no_cache(vae_dir, digits_subset, tmp_path):
    vae = AutoencoderKL.from_pretrained(vae_dir)
    encode = vae.encode
    calls = []

    def failing_encode(x):
        calls.append(x)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return encode(x)

    vae.encode = failing_encode
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_latents(digits_subset, vae, build_transforms(16), tmp_path / "cache", batch_size=4)
    assert list((tmp_path / "cache").iterdir()) == []


def test_extract_latents_needs_a_deterministic_transform(vae_dir, digits_subset, tmp_path):
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with pytest.raises(ValueError, match="deterministic"):
        extract_latents(digits_subset, vae, build_transforms(16, random_flip=True), tmp_path / "cache")


def test_sample_latents_is_the_scaled_reparameterised_posterior_sample():
    mean = torch.randn(3, 4, 2, 2)
    std = torch.rand(3, 4, 2, 2)
    z = sample_latents({"latent_mean": mean, "latent_std": std}, 0.18215, torch.Generator().manual_seed(7))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(z, (mean + std * eps) * 0.18215)
    deterministic = sample_latents({"latent_mean": mean, "latent_std": torch.zeros_like(std)}, 2.0)
    torch.testing.assert_close(deterministic, 2 * mean)


@pytest.mark.parametrize("damage", ["truncated_arrow", "missing_state"])
def test_a_damaged_latent_cache_names_its_folder_and_says_to_delete_it(damage, vae_dir, digits_subset, tmp_path):
    vae, transform = AutoencoderKL.from_pretrained(vae_dir), build_transforms(16)
    extract_latents(digits_subset, vae, transform, tmp_path / "cache", batch_size=5)
    (cache,) = (tmp_path / "cache").iterdir()
    if damage == "truncated_arrow":
        (arrow,) = cache.glob("*.arrow")
        arrow.write_bytes(arrow.read_bytes()[:100])
    else:
        (cache / "state.json").unlink()
    with pytest.raises(ValueError, match=f"the latent cache {cache} cannot be loaded .*delete that folder"):
        extract_latents(digits_subset, vae, transform, tmp_path / "cache", batch_size=5)


def test_corrupt_image_during_extraction_fails_with_its_path(vae_dir, folder_with_corrupt_files, tmp_path):
    dataset, _ = load_image_dataset(train_data_dir=folder_with_corrupt_files, cache_dir=tmp_path / "hf")
    dataset = dataset.sort("label", reverse=True)  # the dog folder first, so the bad file is not in the first batch
    vae = AutoencoderKL.from_pretrained(vae_dir)
    with pytest.raises(ValueError, match=r"(truncated|garbage)\.png"):
        extract_latents(dataset, vae, build_transforms(16), tmp_path / "cache", batch_size=2)
    assert list((tmp_path / "cache").iterdir()) == []


def _columns(latents):
    rows = latents[:]
    return {name: rows[name] for name in latents.column_names}


def _assert_same_columns(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(torch.as_tensor(a[name]), torch.as_tensor(b[name])), name


def test_interrupted_extraction_resumes_at_the_last_finished_shard(vae_dir, digits_subset, tmp_path):
    # 10 rows in shards of 4 (batches of 2): shards 0, 1, 2 take 2, 2 and 1 encode calls. Fail in shard 1.
    vae = AutoencoderKL.from_pretrained(vae_dir)
    encode, calls = vae.encode, []

    def failing_encode(x):
        calls.append(x)
        if len(calls) == 4:
            raise RuntimeError("interrupted")
        return encode(x)

    vae.encode = failing_encode
    with pytest.raises(RuntimeError, match="interrupted"):
        extract_latents(digits_subset, vae, build_transforms(16), tmp_path / "cache", batch_size=2, shard_size=4)
    assert not any(p.name.startswith("latents-") for p in (tmp_path / "cache").iterdir())

    resumed_vae = _load_counting_vae(vae_dir)
    resumed = extract_latents(
        digits_subset, resumed_vae, build_transforms(16), tmp_path / "cache", batch_size=2, shard_size=4
    )
    assert resumed_vae.encode.calls == 3  # shards 1 and 2 only
    fresh = extract_latents(
        digits_subset, AutoencoderKL.from_pretrained(vae_dir), build_transforms(16), tmp_path / "fresh", batch_size=2
    )
    _assert_same_columns(_columns(resumed), _columns(fresh))
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [resumed.cache_files[0]["filename"].split("/")[-2]]


def test_xflip_stores_the_flipped_images_posterior_under_its_own_key(vae_dir, digits_subset, tmp_path):
    vae = AutoencoderKL.from_pretrained(vae_dir)
    transform = build_transforms(16)
    assert latent_cache_key(digits_subset, vae, transform, xflip=True) != latent_cache_key(
        digits_subset, vae, transform
    )
    latents = extract_latents(
        digits_subset, vae, transform, tmp_path / "cache", batch_size=3, xflip=True, num_workers=1
    )
    assert latents.column_names == ["latent_mean", "latent_std", "flipped_latent_mean", "flipped_latent_std", "label"]
    rows = latents[:]
    flipped = torch.stack([transform(row["image"]) for row in digits_subset]).flip(-1)
    with torch.no_grad():
        posterior = vae.encode(flipped).latent_dist
    torch.testing.assert_close(rows["flipped_latent_mean"], posterior.mean)
    torch.testing.assert_close(rows["flipped_latent_std"], posterior.std)


def test_sample_latents_draws_each_sample_from_the_flipped_posterior_with_probability_one_half():
    mean, std = torch.randn(64, 4, 2, 2), torch.rand(64, 4, 2, 2)
    flipped_mean, flipped_std = torch.randn(64, 4, 2, 2), torch.rand(64, 4, 2, 2)
    batch = {
        "latent_mean": mean,
        "latent_std": std,
        "flipped_latent_mean": flipped_mean,
        "flipped_latent_std": flipped_std,
    }
    z = sample_latents(batch, 0.5, torch.Generator().manual_seed(3))
    generator = torch.Generator().manual_seed(3)
    eps = torch.randn(mean.shape, generator=generator)
    flip = torch.rand(64, generator=generator) < 0.5
    for i in range(64):
        m, s = (flipped_mean[i], flipped_std[i]) if flip[i] else (mean[i], std[i])
        torch.testing.assert_close(z[i], (m + s * eps[i]) * 0.5)
    assert 16 < int(flip.sum()) < 48


_EXTRACT_ON_ONE_RANK = """
import sys
import torch.distributed as dist
from diffusers import AutoencoderKL
from diffusers_masked.data import build_transforms, extract_latents, load_digits_dataset
rank, world, vae_dir, cache = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
dist.init_process_group("gloo", rank=rank, world_size=world)
dataset = load_digits_dataset(resolution=16)[0].select(range(10))
extract_latents(dataset, AutoencoderKL.from_pretrained(vae_dir), build_transforms(16), cache, batch_size=2,
                shard_size=4, xflip=True, process_index=rank, num_processes=world, wait_for_everyone=dist.barrier)
dist.destroy_process_group()
"""


def test_two_processes_extract_their_shards_into_the_cache_one_process_makes(vae_dir, tmp_path):
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", _EXTRACT_ON_ONE_RANK, str(r), "2", str(vae_dir), str(tmp_path / "two")], env=env
        )
        for r in range(2)
    ]
    assert [rank.wait(timeout=300) for rank in ranks] == [0, 0]
    dataset = load_digits_dataset(resolution=16)[0].select(range(10))
    # The same batches of 2 (shards of 4 hold two each), so both encode exactly the same tensors; with one torch
    # thread as the ranks have (on an AMD host 2 threads changed the last bits of the convolutions).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = extract_latents(
            dataset,
            AutoencoderKL.from_pretrained(vae_dir),
            build_transforms(16),
            tmp_path / "one",
            batch_size=2,
            xflip=True,
        )
    finally:
        torch.set_num_threads(threads)
    (two_dir,) = (tmp_path / "two").iterdir()
    assert two_dir.name == one.cache_files[0]["filename"].split("/")[-2]
    _assert_same_columns(_columns(datasets.load_from_disk(str(two_dir)).with_format("torch")), _columns(one))
