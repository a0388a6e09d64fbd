"""diffusers_masked.training.data: what the training set is checked for before any image is decoded or any model is
loaded: labels that are not class ids, and a --vae that is missing or is not an AutoencoderKL."""

import json

import datasets
import pytest
from accelerate import Accelerator

from diffusers_masked.training import data as training_data
from diffusers_masked.training.data import check_labels, load_training_data
from tests.tiny import tiny_transformer, tiny_vae


@pytest.mark.parametrize(
    "labels, says",
    [
        (["cat", "dog"], "the label of example 0 is 'cat', a str"),
        ([0.0, 1.5], "the label of example 0 is 0.0, a float"),
        ([0, None, 2], r"the label of example 1 is missing \(None\)"),
    ],
    ids=["strings", "floats", "missing"],
)
def test_labels_that_are_not_class_ids_are_refused_naming_the_example_and_the_flags(labels, says):
    data = datasets.Dataset.from_dict({"label": labels})
    with pytest.raises(ValueError, match=says) as excinfo:
        check_labels(data, None, None)
    assert "--label_column" in str(excinfo.value) and "--num_classes 0" in str(excinfo.value)


def test_a_classlabel_missing_value_is_named_as_such():
    data = datasets.Dataset.from_dict(
        {"label": [0, -1]}, features=datasets.Features({"label": datasets.ClassLabel(names=["a", "b"])})
    )
    with pytest.raises(ValueError, match=r"negative label \(-1; a `datasets.ClassLabel` marks a missing label"):
        check_labels(data, None, None)


@pytest.fixture
def no_data_read(monkeypatch):
    """Reading the training data fails the test: the checks must come first."""

    def refuse(*args, **kwargs):
        raise AssertionError("the data was read before the VAE was checked")

    monkeypatch.setattr(training_data, "load_image_dataset", refuse)


def load_with_vae(tmp_path, vae, vae_subfolder=None):
    return load_training_data(
        Accelerator(cpu=True),
        8,
        train_data_dir=tmp_path / "images",
        vae=str(vae),
        vae_subfolder=vae_subfolder,
        latent_cache_dir=tmp_path / "latents",
    )


@pytest.mark.parametrize("vae", ["./missing-vae", "/nope/vae", "{tmp}/vae.safetensors"])
def test_a_missing_vae_path_says_no_such_file_or_folder(vae, tmp_path, no_data_read, no_network):
    vae = vae.format(tmp=tmp_path)
    with pytest.raises(ValueError, match=f"--vae: no such file or folder: {vae}$"):
        load_with_vae(tmp_path, vae)


def test_a_vae_folder_holding_another_model_is_refused_before_the_data_is_read(tmp_path, no_data_read):
    tiny_transformer().save_pretrained(tmp_path / "transformer")
    with pytest.raises(ValueError, match="must be a diffusers AutoencoderKL folder, but .* describes a MaskedDiT"):
        load_with_vae(tmp_path, tmp_path / "transformer")


def test_a_folder_without_a_config_is_refused_before_the_data_is_read(tmp_path, no_data_read):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="is not a diffusers AutoencoderKL folder: .* has no config.json"):
        load_with_vae(tmp_path, tmp_path / "empty")


def test_a_pipeline_folder_as_vae_names_the_subfolder_flag(tmp_path, no_data_read):
    tiny_vae().save_pretrained(tmp_path / "pipeline" / "vae")
    index = {"_class_name": "MaskDiTPipeline", "vae": ["diffusers", "AutoencoderKL"]}
    (tmp_path / "pipeline" / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match="pass --vae_subfolder vae$"):
        load_with_vae(tmp_path, tmp_path / "pipeline")
    with pytest.raises(AssertionError, match="the data was read"):  # with the subfolder, the VAE passes its check
        load_with_vae(tmp_path, tmp_path / "pipeline", vae_subfolder="vae")
