import copy
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import PIL.Image
import pytest
import scipy.linalg
import torch
from huggingface_hub import EvalResult, ModelCardData
from torch import nn

from diffusers_masked.evaluation import (
    DigitsFeatureExtractor,
    classification_accuracy,
    compute_fid,
    eval_results_for_model_card,
    evaluate_digits_samples,
    evaluate_pipeline_on_digits,
    get_digits_classifier,
    images_to_tensor,
    resolve_inception_weights,
)
from diffusers_masked.evaluation import features as features_module

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("classifier-cache")


@pytest.fixture(scope="module")
def classifier(cache_dir):
    return get_digits_classifier(resolution=16, cache_dir=cache_dir, seed=0)


@pytest.fixture(scope="module")
def digits():
    real, real_labels = features_module._digits_tensors(16, "train", seed=0)
    heldout, heldout_labels = features_module._digits_tensors(16, "heldout", seed=0)
    return SimpleNamespace(real=real, real_labels=real_labels, heldout=heldout, heldout_labels=heldout_labels)


def reference_fid(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """The Fréchet distance of two Gaussians fitted to the features, in float64 with scipy's matrix square root."""
    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    cov_a, cov_b = np.cov(features_a, rowvar=False), np.cov(features_b, rowvar=False)
    covmean = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


# ---------------------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------------------


def test_classifier_recognises_held_out_digits(classifier, digits):
    accuracy = classification_accuracy(digits.heldout, digits.heldout_labels, classifier)
    assert accuracy >= 0.95
    assert accuracy == pytest.approx(classifier.heldout_accuracy)


def test_classifier_is_cached_and_reloaded_without_training(classifier, cache_dir, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("the cached classifier was trained again")

    monkeypatch.setattr(features_module, "_train_digits_classifier", no_training)
    reloaded = get_digits_classifier(resolution=16, cache_dir=cache_dir, seed=0)
    assert reloaded.heldout_accuracy == classifier.heldout_accuracy
    for (name, a), (_, b) in zip(classifier.state_dict().items(), reloaded.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert [p.name for p in cache_dir.iterdir()] == ["digits-classifier-v1-r16-s0.safetensors"]


def test_accuracy_matches_a_hand_count():
    class PixelReader(nn.Module):
        """Predicts the class written into the top-left pixel (value / 10)."""

        def forward(self, images):
            return nn.functional.one_hot((images[:, 0, 0, 0] * 10).round().long(), 10).float()

    images = torch.zeros(10, 1, 4, 4)
    images[:, 0, 0, 0] = torch.arange(10) / 10
    labels = [0, 1, 2, 3, 4, 5, 6, 0, 0, 0]  # seven right, three wrong
    assert classification_accuracy(images, labels, PixelReader()) == pytest.approx(0.7)


def test_accuracy_checks_its_inputs(classifier, digits):
    with pytest.raises(ValueError, match="labels"):
        classification_accuracy(digits.heldout[:5], digits.heldout_labels[:4], classifier)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        classification_accuracy(digits.heldout[:5] * 2 - 1, digits.heldout_labels[:5], classifier)


# ---------------------------------------------------------------------------------------------------------
# FID
# ---------------------------------------------------------------------------------------------------------


def test_fid_of_a_set_with_itself_is_zero(classifier, cache_dir, digits):
    assert compute_fid(digits.real, digits.real, cache_dir=cache_dir) == pytest.approx(0.0, abs=1e-3)


@pytest.mark.filterwarnings("ignore:Matrix is singular")  # some ReLU features are zero on every digit
def test_fid_matches_the_float64_formula_on_the_digits_features(classifier, cache_dir, digits):
    extractor = DigitsFeatureExtractor(classifier)
    fid = compute_fid(digits.real, digits.heldout, feature_extractor=extractor)
    expected = reference_fid(extractor(digits.real).double().numpy(), extractor(digits.heldout).double().numpy())
    assert fid == pytest.approx(expected, rel=1e-3)
    assert compute_fid(digits.real, digits.heldout, cache_dir=cache_dir) == pytest.approx(fid, rel=1e-6)


def test_fid_with_a_custom_module_matches_the_formula():
    projection = torch.randn(64, 12, generator=torch.Generator().manual_seed(0))

    class Project(nn.Module):  # no num_features attribute: torchmetrics infers it from a dummy forward
        def forward(self, images):
            return images.flatten(1) @ projection

    gen = torch.Generator().manual_seed(1)
    a, b = torch.rand(200, 1, 8, 8, generator=gen), torch.rand(200, 1, 8, 8, generator=gen) ** 2
    expected = reference_fid(
        (a.flatten(1) @ projection).double().numpy(), (b.flatten(1) @ projection).double().numpy()
    )
    assert compute_fid(a, b, feature_extractor=Project()) == pytest.approx(expected, rel=1e-3)


def test_fid_is_symmetric(cache_dir, classifier, digits):
    forward = compute_fid(digits.real, digits.heldout, cache_dir=cache_dir)
    backward = compute_fid(digits.heldout, digits.real, cache_dir=cache_dir)
    assert forward == pytest.approx(backward, rel=1e-4)


def test_fid_grows_as_noise_is_blended_in(cache_dir, classifier, digits):
    noise = torch.rand(digits.heldout.shape, generator=torch.Generator().manual_seed(0))
    fids = [
        compute_fid(digits.real, (1 - level) * digits.heldout + level * noise, cache_dir=cache_dir)
        for level in (0.0, 0.2, 0.5, 1.0)
    ]
    assert fids == sorted(fids) and len(set(fids)) == 4
    assert fids[-1] > 20 * fids[0]  # pure noise is far from the digits, real held-out digits are close


def test_fid_treats_gray_and_rgb_alike(cache_dir, classifier, digits):
    gray = compute_fid(digits.real, digits.heldout, cache_dir=cache_dir)
    rgb = compute_fid(digits.real, digits.heldout.expand(-1, 3, -1, -1), cache_dir=cache_dir)
    assert rgb == pytest.approx(gray, rel=1e-5)


def test_fid_rejects_images_in_minus_one_one(cache_dir, classifier, digits):
    with pytest.raises(ValueError, match=r"\(x \+ 1\) / 2"):
        compute_fid(digits.real, digits.heldout * 2 - 1, cache_dir=cache_dir)


def test_inception_without_torch_fidelity_says_how_to_install_it(monkeypatch, no_network, digits):
    monkeypatch.setattr(features_module, "_torch_fidelity_available", lambda: False)
    with pytest.raises(ImportError, match="pip install torch-fidelity"):
        compute_fid(digits.real[:4], digits.heldout[:4], feature_extractor="inception")


def test_inception_without_weights_says_where_to_get_them(monkeypatch, no_network, tmp_path, digits):
    monkeypatch.setattr(features_module, "_torch_fidelity_available", lambda: True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth") as excinfo:
        compute_fid(digits.real[:4], digits.heldout[:4], feature_extractor="inception")
    message = str(excinfo.value)
    assert str(tmp_path / "hub" / "checkpoints") in message and "inception_weights_path" in message
    with pytest.raises(FileNotFoundError, match="is not a file"):
        resolve_inception_weights(tmp_path / "missing.pth")


def test_inception_weights_are_found_in_the_torch_hub_cache(monkeypatch, tmp_path):
    monkeypatch.setattr(features_module, "_torch_fidelity_available", lambda: True)
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    cached = tmp_path / "checkpoints" / "weights-inception-2015-12-05-6726825d.pth"
    assert resolve_inception_weights(allow_download=True) is None  # torch-fidelity may download it
    cached.parent.mkdir()
    cached.write_bytes(b"")
    assert resolve_inception_weights() == str(cached)


@pytest.mark.skipif(importlib.util.find_spec("torch_fidelity") is not None, reason="torch-fidelity is installed")
def test_inception_is_unavailable_here_and_fails_cleanly(no_network, digits):
    with pytest.raises(ImportError, match="torch-fidelity"):
        compute_fid(digits.real[:4], digits.heldout[:4], feature_extractor="inception")


# ---------------------------------------------------------------------------------------------------------
# Digits evaluation and model card
# ---------------------------------------------------------------------------------------------------------


def test_real_digits_score_like_the_floor(cache_dir, classifier, digits):
    fake, fake_labels = digits.heldout[:200], digits.heldout_labels[:200]
    results = evaluate_digits_samples(fake, fake_labels, digits.real, digits.heldout, cache_dir=cache_dir)
    assert results["num_fake"] == results["num_heldout"] == 200
    assert results["num_real"] == len(digits.real)
    assert results["accuracy"] >= 0.95
    assert results["classifier_heldout_accuracy"] == classifier.heldout_accuracy
    assert 0 < results["fid"] < 3 * results["fid_floor"]
    assert results["fid"] == pytest.approx(compute_fid(digits.real, fake, cache_dir=cache_dir), rel=1e-5)


def test_unconditional_samples_have_no_accuracy(cache_dir, classifier, digits):
    results = evaluate_digits_samples(digits.heldout[:50], None, digits.real, cache_dir=cache_dir)
    assert results["accuracy"] is None and results["fid_floor"] is None
    [entry] = eval_results_for_model_card(results)
    assert entry.task_type == "unconditional-image-generation" and entry.metric_type == "fid"


def test_eval_results_go_into_a_model_card(cache_dir, classifier, digits):
    results = evaluate_digits_samples(
        digits.heldout[:100], digits.heldout_labels[:100], digits.real, digits.heldout, cache_dir=cache_dir
    )
    fid, accuracy = eval_results_for_model_card(results)
    assert isinstance(fid, EvalResult) and fid.metric_type == "fid"
    assert fid.metric_value == pytest.approx(results["fid"], abs=1e-4)
    assert fid.metric_args["fid_floor"] == pytest.approx(results["fid_floor"], abs=1e-4)
    assert fid.dataset_type == "sklearn-digits" and fid.dataset_name == "scikit-learn digits"
    assert accuracy.metric_type == "accuracy" and accuracy.metric_value == pytest.approx(results["accuracy"], abs=1e-4)
    card = ModelCardData(model_name="maskdit-digits", eval_results=[fid, accuracy]).to_dict()
    [result] = card["model-index"][0]["results"]  # one task on one dataset, two metrics
    assert [m["type"] for m in result["metrics"]] == ["fid", "accuracy"]


class DigitsReplayPipeline:
    """Stands in for MaskDiTPipeline: 'generates' real held-out digits of the requested class, as RGB."""

    transformer = SimpleNamespace(config=SimpleNamespace(num_classes=10))

    def __init__(self, images, labels):
        self.by_class = {c: images[labels == c] for c in range(10)}
        self.calls = []

    def __call__(self, class_labels, guidance_scale, num_inference_steps, generator, output_type):
        assert output_type == "pt" and len(set(class_labels)) == 1
        self.calls.append(len(class_labels))
        pool = self.by_class[class_labels[0]]
        start = sum(self.calls[:-1]) % 20
        return SimpleNamespace(images=pool[start : start + len(class_labels)].expand(-1, 3, -1, -1))


def test_evaluate_pipeline_generates_every_class_in_batches(cache_dir, classifier, digits):
    pipeline = DigitsReplayPipeline(digits.heldout, digits.heldout_labels)
    results = evaluate_pipeline_on_digits(pipeline, num_samples_per_class=6, batch_size=4, cache_dir=cache_dir)
    assert pipeline.calls == [4, 2] * 10
    assert results["num_fake"] == 60 and results["num_heldout"] == 60 and results["resolution"] == 16
    assert results["accuracy"] >= 0.95
    json.dumps(results)  # plain numbers and strings only


def test_evaluate_pipeline_can_return_exactly_the_evaluated_samples(cache_dir, classifier, digits):
    pipeline = DigitsReplayPipeline(digits.heldout, digits.heldout_labels)
    results, images, labels = evaluate_pipeline_on_digits(
        pipeline, num_samples_per_class=3, batch_size=2, cache_dir=cache_dir, return_samples=True
    )
    assert images.shape == (30, 3, 16, 16) and labels.tolist() == [c for c in range(10) for _ in range(3)]
    # Calls go 2 then 1 per class; the replay pipeline hands out consecutive held-out digits of that class.
    replay = DigitsReplayPipeline(digits.heldout, digits.heldout_labels)
    expected = torch.cat([replay([c] * n, 1.5, 40, None, "pt").images for c in range(10) for n in (2, 1)])
    torch.testing.assert_close(images, expected, rtol=0, atol=0)
    assert results["num_fake"] == 30


class UnconditionalReplayPipeline:
    """Stands in for an unconditional MaskDMPipeline: 'generates' consecutive real held-out digits, as RGB."""

    transformer = SimpleNamespace(config=SimpleNamespace(num_classes=0))

    def __init__(self, images):
        self.images, self.calls = images, []

    def __call__(self, batch_size, num_inference_steps, generator, output_type):
        start = sum(self.calls)
        self.calls.append(batch_size)
        return SimpleNamespace(images=self.images[start : start + batch_size].expand(-1, 3, -1, -1))


def test_evaluate_unconditional_pipeline_draws_ten_times_per_class_without_accuracy(cache_dir, digits):
    pipeline = UnconditionalReplayPipeline(digits.heldout)
    results, images, labels = evaluate_pipeline_on_digits(
        pipeline, num_samples_per_class=3, batch_size=2, cache_dir=cache_dir, return_samples=True
    )
    assert pipeline.calls == [2, 1] * 10 and labels is None
    torch.testing.assert_close(images, digits.heldout[:30].expand(-1, 3, -1, -1), rtol=0, atol=0)
    assert results["accuracy"] is None and results["guidance_scale"] is None and results["num_fake"] == 30


def test_images_to_tensor_accepts_every_output_type():
    pt = torch.rand(2, 3, 4, 5)
    np_images = pt.permute(0, 2, 3, 1).numpy()
    pil = [PIL.Image.fromarray((image * 255).round().astype(np.uint8)) for image in np_images]
    torch.testing.assert_close(images_to_tensor(pt), pt)
    torch.testing.assert_close(images_to_tensor(np_images), pt)
    torch.testing.assert_close(images_to_tensor(pil), pt, atol=1 / 255, rtol=0)


def test_evaluate_cli_runs_on_a_saved_pipeline(tmp_path, cache_dir, classifier, capsys):
    from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline
    from tests.tiny import tiny_transformer

    transformer = tiny_transformer(
        scale=0.0, sample_size=16, patch_size=4, in_channels=1, num_layers=1, decoder_num_layers=0
    )
    MaskDiTPipeline(transformer, EDMHeunScheduler()).save_pretrained(tmp_path / "pipeline")
    spec = importlib.util.spec_from_file_location("evaluate_maskdit", EXAMPLES / "evaluate_maskdit.py")
    evaluate_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_cli)

    output = tmp_path / "eval.json"
    argv = ["--pipeline_dir", str(tmp_path / "pipeline"), "--num_samples_per_class", "2", "--num_inference_steps", "1"]
    results = evaluate_cli.main(argv + ["--cache_dir", str(cache_dir), "--output_json", str(output)])
    assert json.loads(output.read_text())["num_fake"] == results["num_fake"] == 20
    assert "FID floor" in capsys.readouterr().out


def test_loading_the_classifier_leaves_the_global_rng_alone(classifier, cache_dir):
    state = torch.get_rng_state()
    get_digits_classifier(resolution=16, cache_dir=cache_dir, seed=0)
    assert torch.equal(torch.get_rng_state(), state)


def test_an_unusable_cached_classifier_is_replaced(classifier, tmp_path, monkeypatch, caplog):
    cached = tmp_path / "digits-classifier-v1-r16-s0.safetensors"
    cached.write_bytes(b"not a safetensors file")
    trained = copy.deepcopy(classifier)
    monkeypatch.setattr(features_module, "_train_digits_classifier", lambda resolution, seed: (trained, 0.5))
    assert get_digits_classifier(resolution=16, cache_dir=tmp_path).heldout_accuracy == 0.5
    assert "unusable cached digits classifier" in caplog.text
    monkeypatch.setattr(features_module, "_train_digits_classifier", None)  # the rewritten file now loads
    reloaded = get_digits_classifier(resolution=16, cache_dir=tmp_path)
    torch.testing.assert_close(reloaded.head.weight, classifier.head.weight, rtol=0, atol=0)
    assert [p.name for p in tmp_path.iterdir()] == [cached.name]


@pytest.fixture(scope="module")
def classifier_trained_with_grad():
    return features_module._train_digits_classifier(8, seed=0)[0]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode], ids=["no_grad", "inference_mode"])
def test_the_classifier_trains_the_same_whatever_the_callers_grad_mode(mode, classifier_trained_with_grad, tmp_path):
    with mode():
        trained = get_digits_classifier(resolution=8, cache_dir=tmp_path, seed=0)
    for (name, a), (_, b) in zip(trained.state_dict().items(), classifier_trained_with_grad.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_evaluate_cli_says_no_such_file_or_folder_for_a_missing_pipeline_folder(no_network):
    spec = importlib.util.spec_from_file_location("evaluate_maskdit", EXAMPLES / "evaluate_maskdit.py")
    evaluate_cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate_cli)
    with pytest.raises(ValueError, match="--pipeline_dir: no such file or folder: ./out/missing-pipeline$"):
        evaluate_cli.main(["--pipeline_dir", "./out/missing-pipeline"])
