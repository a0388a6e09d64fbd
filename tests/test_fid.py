"""diffusers_masked.evaluation.fid and examples/evaluate_fid.py: statistics, the Fréchet distance, Inception Score,
reference data and its cache, offline through injected feature extractors."""

import importlib.util
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from torch import nn

from diffusers_masked.evaluation import (
    FeatureStatistics,
    compute_fid,
    compute_statistics,
    evaluate_samples,
    frechet_distance,
    image_batches,
    inception_score,
    reference_statistics,
)
from diffusers_masked.evaluation import features as features_module
from diffusers_masked.evaluation import fid as fid_module

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "evaluate_fid.py"
spec = importlib.util.spec_from_file_location("evaluate_fid", SCRIPT)
evaluate_fid = importlib.util.module_from_spec(spec)
spec.loader.exec_module(evaluate_fid)


def sqrtm_psd(matrix: np.ndarray) -> np.ndarray:
    """The symmetric square root of a positive semi-definite matrix, through its eigendecomposition (float64)."""
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


def closed_form_fid(mu_a, sigma_a, mu_b, sigma_b) -> float:
    """The Fréchet distance of N(mu_a, sigma_a) and N(mu_b, sigma_b):
    |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2)."""
    root_a = sqrtm_psd(sigma_a)
    cross = sqrtm_psd(root_a @ sigma_b @ root_a)
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * np.trace(cross))


class Project(nn.Module):
    """Features = a fixed linear map of the pixels: their moments follow from the pixels' in closed form."""

    name = "test-projection"

    def __init__(self, num_pixels: int, num_features: int = 5, seed: int = 0):
        super().__init__()
        self.register_buffer(
            "weight", torch.randn(num_pixels, num_features, generator=torch.Generator().manual_seed(seed))
        )
        self.num_features = num_features

    def forward(self, images):
        return images.flatten(1).double() @ self.weight.double()


def _random_spd(d, seed):
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + 0.1 * np.eye(d)


def _write_npz(path, images_uint8_nchw, **extra):
    np.savez(path, arr_0=images_uint8_nchw.permute(0, 2, 3, 1).numpy(), **extra)
    return path


# ------------------------------------------------------------------------------------------------ the distance


def test_frechet_distance_matches_the_closed_form_of_two_gaussians():
    rng = np.random.default_rng(0)
    mu_a, mu_b = rng.normal(size=6), rng.normal(size=6)
    sigma_a, sigma_b = _random_spd(6, 1), _random_spd(6, 2)  # they do not commute
    fid = frechet_distance(FeatureStatistics(mu_a, sigma_a), FeatureStatistics(mu_b, sigma_b))
    assert fid == pytest.approx(closed_form_fid(mu_a, sigma_a, mu_b, sigma_b), rel=1e-9)


def test_frechet_distance_of_diagonal_gaussians_is_the_sum_over_coordinates():
    mu_a, mu_b = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    var_a, var_b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 4.0, 1.0])
    expected = ((mu_a - mu_b) ** 2).sum() + ((np.sqrt(var_a) - np.sqrt(var_b)) ** 2).sum()  # 5 + 1 + 0 + 4
    fid = frechet_distance(FeatureStatistics(mu_a, np.diag(var_a)), FeatureStatistics(mu_b, np.diag(var_b)))
    assert fid == pytest.approx(expected, rel=1e-12) and expected == 10


def test_statistics_of_two_feature_spaces_are_not_compared():
    a = FeatureStatistics(np.zeros(3), np.eye(3), feature_extractor="inception-v3-compat-2048")
    with pytest.raises(ValueError, match="feature dimensions"):
        frechet_distance(a, FeatureStatistics(np.zeros(2), np.eye(2)))
    with pytest.raises(ValueError, match="different feature extractors"):
        frechet_distance(a, FeatureStatistics(np.zeros(3), np.eye(3), feature_extractor="digits-classifier-v1-r16-s0"))


# ------------------------------------------------------------------------------------------------ the whole path


def test_fid_from_sample_npz_equals_the_float64_formula_on_the_features(tmp_path):
    gen = torch.Generator().manual_seed(0)
    fake = (torch.rand(300, 1, 4, 4, generator=gen) * 255).round().to(torch.uint8)
    real = (torch.rand(400, 1, 4, 4, generator=gen) ** 2 * 255).round().to(torch.uint8)
    extractor = Project(16)
    results = evaluate_samples(
        _write_npz(tmp_path / "samples.npz", fake), _write_npz(tmp_path / "ref.npz", real),
        feature_extractor=extractor,
        inception_score_splits=None, batch_size=64,
    )  # fmt: skip
    f_fake, f_real = (extractor(x.float() / 255).numpy() for x in (fake, real))
    expected = closed_form_fid(
        f_fake.mean(0), np.cov(f_fake, rowvar=False), f_real.mean(0), np.cov(f_real, rowvar=False)
    )
    assert results["fid"] == pytest.approx(expected, rel=1e-8)
    assert results["num_samples"] == 300 and results["num_reference"] == 400 and results["inception_score"] is None


def test_fid_of_many_samples_approaches_the_population_value_of_their_features():
    # Pixels uniform on [0, 1] (mean 1/2, variance 1/12) against their squares (mean 1/3, variance 4/45): linear
    # features W^T x then have mean W^T m and covariance v W^T W, so the population FID is known in closed form.
    gen = torch.Generator().manual_seed(1)
    extractor = Project(4, num_features=3)
    weight = extractor.weight.double().numpy()
    u = torch.rand(40_000, 1, 2, 2, dtype=torch.float64, generator=gen)
    v = torch.rand(40_000, 1, 2, 2, dtype=torch.float64, generator=gen) ** 2
    a, b = compute_statistics(u, extractor, batch_size=4096), compute_statistics(v, extractor, batch_size=4096)
    ones = np.ones(4)
    expected = closed_form_fid(
        weight.T @ ones / 2, weight.T @ weight / 12, weight.T @ ones / 3, weight.T @ weight * 4 / 45
    )
    assert frechet_distance(a, b) == pytest.approx(expected, rel=0.03)


def test_the_statistics_path_agrees_with_torchmetrics_fid():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.rand(200, 1, 4, 4, generator=gen), torch.rand(150, 1, 4, 4, generator=gen) ** 1.5
    extractor = Project(16, num_features=6)
    ours = frechet_distance(compute_statistics(a, extractor), compute_statistics(b, extractor))
    assert ours == pytest.approx(compute_fid(a, b, feature_extractor=extractor), rel=1e-4)


def test_a_png_folder_and_an_npz_of_the_same_images_give_the_same_statistics(tmp_path):
    images = (torch.rand(12, 3, 5, 5, generator=torch.Generator().manual_seed(3)) * 255).round().to(torch.uint8)
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(images.permute(0, 2, 3, 1).numpy()):
        PIL.Image.fromarray(image).save(tmp_path / "pngs" / f"{i:06d}.png")
    extractor = Project(75)
    from_folder = compute_statistics(tmp_path / "pngs", extractor, batch_size=5)
    from_npz = compute_statistics(_write_npz(tmp_path / "s.npz", images), extractor, batch_size=5)
    np.testing.assert_allclose(from_folder.mu, from_npz.mu, rtol=1e-12)
    np.testing.assert_allclose(from_folder.sigma, from_npz.sigma, rtol=1e-12)


def test_npz_images_stream_in_batches_compressed_or_not(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, size=(7, 3, 2, 1), dtype=np.uint8)
    np.savez_compressed(tmp_path / "c.npz", arr_0=images)
    batches = list(image_batches(tmp_path / "c.npz", batch_size=3))
    assert [len(b) for b in batches] == [3, 3, 1]
    np.testing.assert_array_equal(torch.cat(batches).permute(0, 2, 3, 1).mul(255).round().byte().numpy(), images)
    np.savez(tmp_path / "f.npz", arr_0=images.astype(np.float32))
    with pytest.raises(ValueError, match="uint8"):
        next(image_batches(tmp_path / "f.npz"))


# ------------------------------------------------------------------------------------------------ reference data


def test_statistics_are_saved_in_adms_layout_and_read_back(tmp_path):
    stats = FeatureStatistics(np.arange(3.0), _random_spd(3, 0), num_images=10, feature_extractor="x")
    stats.save(tmp_path / "ref.npz")
    with np.load(tmp_path / "ref.npz", allow_pickle=False) as data:
        assert {"mu", "sigma"} <= set(data.keys())
    loaded = reference_statistics(tmp_path / "ref.npz")
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.num_images == 10 and loaded.feature_extractor == "x"


def _not_symmetric():
    sigma = _random_spd(3, 0)
    sigma[0, 1] += 0.5
    return np.zeros(3), sigma


def _not_positive_semi_definite():
    return np.zeros(3), np.diag([1.0, 2.0, -0.5])


def _not_finite(name):
    mu, sigma = np.zeros(3), _random_spd(3, 0)
    (mu if name == "mu" else sigma)[1] = np.nan if name == "mu" else np.inf
    return mu, sigma


@pytest.mark.parametrize(
    "statistics, says",
    [
        (_not_symmetric(), "sigma is not symmetric"),
        (_not_positive_semi_definite(), "sigma is not positive semi-definite"),
        (_not_finite("mu"), "mu has 1 values that are NaN or infinite"),
        (_not_finite("sigma"), "sigma has 3 values that are NaN or infinite"),
        ((np.zeros(4), np.eye(3)), r"mu must be \(d,\) and sigma \(d, d\), got \(4,\) and \(3, 3\)"),
    ],
    ids=["asymmetric", "negative_eigenvalue", "nan_mu", "inf_sigma", "dimensions"],
)
def test_invalid_reference_statistics_are_refused_naming_the_file(statistics, says, tmp_path):
    mu, sigma = statistics
    path = tmp_path / "ref.npz"
    np.savez(path, mu=mu, sigma=sigma)
    for load in (FeatureStatistics.load, reference_statistics):
        with pytest.raises(ValueError, match=f"{path} holds invalid reference statistics: {says}"):
            load(path)


def test_a_singular_covariance_stored_in_float32_is_valid(tmp_path):
    # Fewer images than features: sigma has zero eigenvalues, which float32 rounding pushes a little below zero.
    features = np.random.default_rng(0).normal(size=(5, 64)) * 10
    np.savez(tmp_path / "ref.npz", mu=features.mean(0), sigma=np.cov(features, rowvar=False).astype(np.float32))
    assert np.linalg.eigvalsh(np.load(tmp_path / "ref.npz")["sigma"].astype(np.float64))[0] < 0
    assert FeatureStatistics.load(tmp_path / "ref.npz").sigma.shape == (64, 64)


def test_invalid_cached_reference_statistics_are_computed_again(tmp_path, caplog):
    folder = tmp_path / "real"
    folder.mkdir()
    for i in range(4):
        PIL.Image.fromarray(np.full((4, 4, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    first = reference_statistics(folder, feature_extractor=Project(48), cache_dir=tmp_path / "cache")
    (cached,) = (tmp_path / "cache" / "fid-statistics").glob("*.npz")
    np.savez(cached, mu=first.mu, sigma=-first.sigma)
    again = reference_statistics(folder, feature_extractor=Project(48), cache_dir=tmp_path / "cache")
    np.testing.assert_array_equal(again.sigma, first.sigma)
    assert f"Ignoring unusable cached reference statistics ({cached} holds invalid" in caplog.text


def _truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _overwritten_inside(path):
    # A compressed member whose bytes were changed in place: the zip directory is intact, the data is not.
    data = bytearray(path.read_bytes())
    middle = len(data) // 3
    data[middle : middle + 64] = bytes(64)
    path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("damage", [_truncated, _overwritten_inside], ids=["truncated", "overwritten"])
def test_a_damaged_statistics_or_samples_npz_is_refused_in_one_line_naming_it(damage, tmp_path):
    images = (torch.rand(300, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    np.savez_compressed(tmp_path / "samples.npz", arr_0=images.permute(0, 2, 3, 1).numpy())
    np.savez_compressed(tmp_path / "ref.npz", mu=np.zeros(50), sigma=np.eye(50) + np.ones((50, 50)))
    samples, reference = damage(tmp_path / "samples.npz"), damage(tmp_path / "ref.npz")
    with pytest.raises(ValueError, match=f"^{reference} is not a readable .npz file: truncated or damaged") as error:
        reference_statistics(reference)
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match=f"^{samples} is not a readable .npz file: truncated or damaged") as error:
        compute_statistics(samples, Project(192))
    assert "\n" not in str(error.value)


def test_an_empty_samples_npz_is_refused_naming_it(tmp_path):
    samples = tmp_path / "empty.npz"
    np.savez(samples, arr_0=np.zeros((0, 8, 8, 3), np.uint8))
    np.savez(tmp_path / "ref.npz", mu=np.zeros(3), sigma=np.eye(3))
    with pytest.raises(ValueError, match=rf"{samples}\['arr_0'\] holds no images"):
        evaluate_fid.main(["--samples", str(samples), "--reference", str(tmp_path / "ref.npz")])


def test_an_iterator_of_sample_batches_is_read_once_from_its_first_batch():
    gen = torch.Generator().manual_seed(4)
    fake, real = torch.rand(60, 1, 4, 4, generator=gen), torch.rand(50, 1, 4, 4, generator=gen) ** 2
    reference = compute_statistics(real, Project(16))
    expected = evaluate_samples(fake, reference, feature_extractor=Project(16), inception_score_splits=None)
    got = evaluate_samples(iter(fake.split(7)), reference, feature_extractor=Project(16), inception_score_splits=None)
    assert got["num_samples"] == 60 and got["fid"] == pytest.approx(expected["fid"], rel=1e-12)


def test_an_adm_reference_file_with_images_and_statistics_uses_its_statistics(tmp_path):
    # ADM's VIRTUAL_*.npz hold a reference batch (arr_0) and its Inception statistics (mu, sigma, ...).
    images = torch.zeros(2, 3, 4, 4, dtype=torch.uint8)
    path = _write_npz(tmp_path / "VIRTUAL_test.npz", images, mu=np.ones(2), sigma=np.eye(2), mu_s=np.zeros(1))
    loaded = reference_statistics(path, feature_extractor=Project(48, num_features=2))
    np.testing.assert_array_equal(loaded.mu, np.ones(2))
    assert loaded.num_images is None and loaded.feature_extractor is None


def test_a_reference_folder_is_computed_once_and_cached_until_it_changes(tmp_path, monkeypatch):
    folder = tmp_path / "real"
    folder.mkdir()
    for i in range(4):
        PIL.Image.fromarray(np.full((6, 6, 3), 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    cache = tmp_path / "cache"
    first = reference_statistics(folder, feature_extractor=Project(48), resolution=4, cache_dir=cache)
    assert len(list((cache / "fid-statistics").glob("*.npz"))) == 1

    def no_compute(*args, **kwargs):
        raise AssertionError("cached statistics were computed again")

    monkeypatch.setattr(fid_module, "compute_statistics", no_compute)
    again = reference_statistics(folder, feature_extractor=Project(48), resolution=4, cache_dir=cache)
    np.testing.assert_array_equal(first.sigma, again.sigma)
    monkeypatch.undo()
    PIL.Image.fromarray(np.full((6, 6, 3), 255, dtype=np.uint8)).save(folder / "4.png")
    changed = reference_statistics(folder, feature_extractor=Project(48), resolution=4, cache_dir=cache)
    assert changed.num_images == 5 and len(list((cache / "fid-statistics").glob("*.npz"))) == 2


def test_a_16_bit_png_in_an_image_folder_is_read_as_its_8_bit_levels(tmp_path):
    levels = np.arange(0, 65536, 4369, dtype=np.uint16)[:16].reshape(4, 4)  # 0, 4369 = 17 * 257, ..., 65535
    (tmp_path / "deep").mkdir()
    PIL.Image.fromarray(levels).save(tmp_path / "deep" / "a.png")
    expected = torch.from_numpy(levels.astype(np.float64) / 65535).float()[None, None]
    for resolution in (None, 4):
        torch.testing.assert_close(next(image_batches(tmp_path / "deep", resolution=resolution)), expected)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_a_32_bit_image_in_an_image_folder_is_refused_naming_it(mode, tmp_path):
    (tmp_path / "deep").mkdir()
    values = np.full((4, 4), 70000, np.int32) if mode == "I" else np.full((4, 4), 0.5, np.float32)
    PIL.Image.fromarray(values).save(tmp_path / "deep" / "a.tif")
    for resolution in (None, 4):
        with pytest.raises(ValueError, match=rf"{tmp_path / 'deep' / 'a.tif'}.*PIL mode '{mode}'"):
            next(image_batches(tmp_path / "deep", resolution=resolution))


def test_a_reference_folder_is_cropped_to_the_samples_resolution(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    PIL.Image.fromarray(np.zeros((6, 9, 3), dtype=np.uint8)).save(folder / "wide.png")
    PIL.Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(folder / "square.png")
    with pytest.raises(ValueError, match="--resolution"):
        compute_statistics(folder, Project(48))
    stats = compute_statistics(folder, Project(48), resolution=4)
    assert stats.num_images == 2


# ------------------------------------------------------------------------------------------------ Inception Score


def test_inception_score_of_confident_and_balanced_predictions_is_the_class_count():
    logits = torch.full((40, 8), -1e4)
    logits[torch.arange(40), torch.arange(40) % 8] = 0  # each sample sure of one class, classes equally common
    mean, std = inception_score(logits, splits=5)
    assert mean == pytest.approx(8, rel=1e-9) and std == pytest.approx(0, abs=1e-9)


def test_inception_score_of_uninformative_predictions_is_one():
    assert inception_score(torch.zeros(30, 5), splits=3)[0] == pytest.approx(1.0, abs=1e-12)


@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save", r"ignore:std\(\)")
def test_inception_score_matches_torchmetrics():
    from torchmetrics.image.inception import InceptionScore

    logits = torch.randn(64, 7, generator=torch.Generator().manual_seed(4)) * 2

    class Logits(nn.Module):
        def forward(self, x):
            return logits[x[:, 0, 0, 0].long()]

    metric = InceptionScore(feature=Logits(), splits=1)
    metric.update(torch.arange(64, dtype=torch.uint8).view(64, 1, 1, 1).expand(64, 3, 1, 1).contiguous())
    expected = float(metric.compute()[0])
    assert inception_score(logits, splits=1)[0] == pytest.approx(expected, rel=1e-5)


def test_inception_score_splits_are_checked():
    with pytest.raises(ValueError, match="splits"):
        inception_score(torch.zeros(3, 2), splits=4)


# ------------------------------------------------------------------------------------------------ the command line


def test_inception_without_weights_names_the_allow_download_flag(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(features_module, "_torch_fidelity_available", lambda: True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    samples = _write_npz(tmp_path / "s.npz", torch.zeros(2, 3, 4, 4, dtype=torch.uint8))
    with pytest.raises(FileNotFoundError, match="--allow_download") as excinfo:
        evaluate_fid.main(["--samples", str(samples), "--reference", str(samples)])
    assert "--inception_weights" in str(excinfo.value)


def test_the_cli_evaluates_digit_pngs_against_a_digit_folder_offline(tmp_path, no_network):
    for name, split, count in (("samples", "heldout", 60), ("real", "train", 200)):
        (tmp_path / name).mkdir()
        images, _ = features_module._digits_tensors(16, split, seed=0)
        for i, image in enumerate(images[:count, 0].mul(255).round().byte().numpy()):
            PIL.Image.fromarray(image).save(tmp_path / name / f"{i:04d}.png")
    argv = ["--samples", str(tmp_path / "samples"), "--reference", str(tmp_path / "real"), "--feature_extractor"]
    argv += ["digits", "--inception_score_splits", "2", "--cache_dir", str(tmp_path / "cache")]
    results = evaluate_fid.main(argv + ["--output_json", str(tmp_path / "fid.json")])
    heldout, _ = features_module._digits_tensors(16, "heldout", seed=0)
    train, _ = features_module._digits_tensors(16, "train", seed=0)
    expected = compute_fid(train[:200], heldout[:60], cache_dir=tmp_path / "cache")  # torchmetrics' metric
    assert results["fid"] == pytest.approx(expected, rel=1e-3)
    assert results["num_samples"] == 60 and results["num_reference"] == 200
    assert 5 < results["inception_score"] <= 10  # recognisable digits of most classes
    assert (tmp_path / "fid.json").is_file()


@pytest.mark.parametrize("reference", ["batch.npz", "folder"])
def test_the_cli_saves_digits_reference_statistics_with_an_empty_classifier_cache(reference, tmp_path, no_network):
    # The first use of the digits features trains the classifier, here inside compute_statistics' torch.no_grad.
    images = features_module._digits_tensors(8, "train", seed=0)[0][:40].mul(255).round().byte()
    if reference == "folder":
        (tmp_path / "folder").mkdir()
        for i, image in enumerate(images[:, 0].numpy()):
            PIL.Image.fromarray(image).save(tmp_path / "folder" / f"{i:04d}.png")
    else:
        _write_npz(tmp_path / reference, images)
    argv = ["--reference", str(tmp_path / reference), "--feature_extractor", "digits", "--save_reference_statistics"]
    evaluate_fid.main(argv + [str(tmp_path / "real.npz"), "--cache_dir", str(tmp_path / "empty-cache")])
    saved = FeatureStatistics.load(tmp_path / "real.npz")
    expected = compute_statistics(tmp_path / reference, "digits", cache_dir=tmp_path / "empty-cache")  # cached now
    assert saved.num_images == 40 and saved.feature_extractor == "digits-classifier-v1-r8-s0"
    np.testing.assert_allclose(saved.mu, expected.mu, rtol=1e-12)


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--samples", "x.npz"], "--reference"),
        (["--samples", "{tmp}", "--reference", "{tmp}", "--reference_dataset", "d"], "--reference"),
        (["--reference", "{tmp}"], "--samples"),
        (["--samples", "{tmp}/missing.npz", "--reference", "{tmp}"], "--samples: no such file or folder"),
        (["--samples", "{tmp}", "--reference_dataset", "./missing"], "--reference_dataset: no such file or folder"),
        (["--samples", "{tmp}", "--reference", "{tmp}", "--batch_size", "0"], "--batch_size"),
        (["--samples", "{tmp}", "--reference", "{tmp}", "--inception_weights", "{tmp}/w.pth"], "--inception_weights"),
        (["--reference_dataset", "d", "--save_reference_statistics", "s.npz"], "--resolution"),
    ],
)
def test_cli_flags_are_checked_up_front(tmp_path, argv, flag):
    with pytest.raises(ValueError, match=flag):
        evaluate_fid.main([a.format(tmp=tmp_path) for a in argv])
