import json
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
)
from huggingface_hub import EvalResult, HfApi

from diffusers_masked import EDMHeunScheduler, MaskDiTPipeline
from tests import tiny
from tests.launch import assert_loads_in_a_fresh_process
from tests.tiny import tiny_vae

ID2LABEL = {i: name for i, name in enumerate(["zero", "one", "two,deux", "three"])}


def tiny_transformer(in_channels=1, sample_size=8, num_classes=4):
    return tiny.tiny_transformer(scale=0.1, in_channels=in_channels, sample_size=sample_size, num_classes=num_classes)


@pytest.fixture
def pipe():
    p = MaskDiTPipeline(tiny_transformer(), EDMHeunScheduler(), id2label=ID2LABEL)
    p.set_progress_bar_config(disable=True)
    return p


def _run(p, **kwargs):
    kwargs.setdefault("num_inference_steps", 3)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    kwargs.setdefault("output_type", "pt")
    return p(**kwargs).images


def test_pixel_space_output_shape_and_range(pipe):
    images = _run(pipe, class_labels=[0, 3])
    assert images.shape == (2, 1, 8, 8)
    assert images.min() >= 0 and images.max() <= 1


def test_output_types(pipe):
    assert isinstance(_run(pipe, class_labels=[1], output_type="np"), np.ndarray)
    pil = _run(pipe, class_labels=[1, 2], output_type="pil")
    assert len(pil) == 2 and pil[0].size == (8, 8)
    latents = _run(pipe, class_labels=[1], output_type="latent")
    assert latents.shape == (1, 1, 8, 8)
    tup = pipe(class_labels=[1], num_inference_steps=2, output_type="pt", return_dict=False)
    assert isinstance(tup, tuple) and tup[0].shape == (1, 1, 8, 8)


def test_same_generator_same_images_and_different_seed_differs(pipe):
    a = _run(pipe, class_labels=[1, 2])
    b = _run(pipe, class_labels=[1, 2])
    c = _run(pipe, class_labels=[1, 2], generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_label_names_and_synonyms_map_to_ids(pipe):
    assert pipe.get_label_ids(["one", "deux", "two"]) == [1, 2, 2]
    torch.testing.assert_close(_run(pipe, class_labels=["one", "deux"]), _run(pipe, class_labels=[1, 2]))


def test_guidance_combines_conditional_and_null_class_outputs():
    """With an Euler scheduler, one step from known noise: the model output fed to the scheduler must be
    uncond + w * (cond - uncond) with uncond computed under the null class id num_classes."""
    transformer = tiny_transformer()
    p = MaskDiTPipeline(transformer, EDMEulerScheduler(), id2label=ID2LABEL)
    p.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 1, 8, 8)
    labels = torch.tensor([1, 3])
    w = 2.5
    guided = p(
        class_labels=[1, 3], guidance_scale=w, num_inference_steps=1, latents=noise, output_type="latent"
    ).images

    ref = EDMEulerScheduler()
    ref.set_timesteps(1)
    t = ref.timesteps[0]
    x = noise * ref.init_noise_sigma
    x_in = ref.scale_model_input(x, t)
    with torch.no_grad():
        cond = transformer(x_in, t.expand(2), labels).sample
        uncond = transformer(x_in, t.expand(2), torch.full_like(labels, 4)).sample
    expected = ref.step(uncond + w * (cond - uncond), t, x).prev_sample
    torch.testing.assert_close(guided, expected)


def test_guidance_scale_at_most_one_runs_a_single_conditional_batch(pipe):
    seen = []
    original = pipe.transformer.forward

    def spy(x, t, class_labels=None, **kw):
        seen.append(class_labels.clone())
        return original(x, t, class_labels=class_labels, **kw)

    with mock.patch.object(pipe.transformer, "forward", side_effect=spy):
        _run(pipe, class_labels=[0, 1], guidance_scale=1.0, num_inference_steps=2)
    assert all(labels.tolist() == [0, 1] for labels in seen)
    seen.clear()
    with mock.patch.object(pipe.transformer, "forward", side_effect=spy):
        _run(pipe, class_labels=[0, 1], guidance_scale=1.5, num_inference_steps=2)
    assert all(labels.tolist() == [0, 1, 4, 4] for labels in seen)
    assert len(seen) == 3  # EDM Heun, 2 steps: 2 * 2 - 1 evaluations


@pytest.mark.parametrize("scheduler_cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
def test_diffusers_edm_schedulers_swap_in_via_from_config(pipe, scheduler_cls):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    images = _run(pipe, class_labels=[0, 1], num_inference_steps=4)
    assert images.shape == (2, 1, 8, 8) and torch.isfinite(images).all()


def test_latent_space_with_a_vae_decodes_with_the_scaling_factor():
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=0.5)
    transformer = tiny_transformer(in_channels=4, sample_size=8)
    p = MaskDiTPipeline(transformer, EDMHeunScheduler(), vae=vae)
    p.set_progress_bar_config(disable=True)
    latents = _run(p, class_labels=[0, 1], output_type="latent")
    images = _run(p, class_labels=[0, 1])
    assert latents.shape == (2, 4, 8, 8) and images.shape == (2, 3, 16, 16)
    with torch.no_grad():
        expected = (vae.decode(latents / 0.5).sample / 2 + 0.5).clamp(0, 1)
    torch.testing.assert_close(images, expected)


def test_unconditional_model_takes_batch_size():
    p = MaskDiTPipeline(tiny_transformer(num_classes=0), EDMHeunScheduler())
    p.set_progress_bar_config(disable=True)
    assert _run(p, batch_size=3).shape == (3, 1, 8, 8)
    with pytest.raises(ValueError, match="unconditional"):
        _run(p, class_labels=[0])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"class_labels": [0], "num_inference_steps": 0}, "num_inference_steps"),
        ({"class_labels": ["seven"]}, "unknown label"),
        ({"class_labels": [4]}, "out of range"),
        ({"class_labels": [-1]}, "out of range"),
        ({"class_labels": [0], "guidance_scale": -1.0}, "guidance_scale"),
        ({"class_labels": [0], "guidance_scale": float("inf")}, "finite"),
        ({"class_labels": [0], "guidance_scale": float("nan")}, "finite"),
        ({"class_labels": [0], "output_type": "jpeg"}, "output_type"),
        ({}, "class_labels are required"),
        ({"class_labels": [0], "latents": torch.randn(1, 1, 4, 4)}, "latents"),
    ],
)
def test_bad_arguments_are_clear_value_errors(pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(pipe, **kwargs)


def test_save_pretrained_writes_shim_index_and_card(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_maskdit", "MaskDiTPipeline"]
    assert index["id2label"]["2"] == "two,deux"
    shim = (tmp_path / "pipeline_maskdit.py").read_text()
    assert "from diffusers_masked.pipelines.pipeline_maskdit import MaskDiTPipeline" in shim
    # Each component of ours is named by a one-line shim in its folder, so diffusers' Hub download finds it.
    assert index["transformer"] == ["masked_dit", "MaskedDiTTransformer2DModel"]
    assert index["scheduler"] == ["scheduling_edm_heun", "EDMHeunScheduler"]
    component_shim = (tmp_path / "transformer" / "masked_dit.py").read_text()
    code = [line for line in component_shim.splitlines() if not line.startswith("#")]
    assert code == ["from diffusers_masked.models.masked_dit import MaskedDiTTransformer2DModel  # noqa: F401"]
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    assert "library_name: diffusers" in (tmp_path / "README.md").read_text()


def test_fresh_process_loads_with_diffusion_pipeline_and_generates_the_same_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    assert_loads_in_a_fresh_process(
        tmp_path,
        "MaskDiTPipeline",
        'class_labels=["one", 3], num_inference_steps=3',
        _run(pipe, class_labels=["one", 3]),
        checks='assert pipe.config.id2label[2] == "two,deux" and pipe.labels["deux"] == 2',
    )


def test_from_pretrained_without_flag_refuses_a_foreign_shim(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    (tmp_path / "pipeline_maskdit.py").write_text("import os\nfrom diffusers_masked import MaskDiTPipeline\n")
    with pytest.raises(ValueError, match="trust_remote_code"):
        MaskDiTPipeline.from_pretrained(tmp_path)


def test_vae_pipeline_round_trip(tmp_path):
    p = MaskDiTPipeline(tiny_transformer(in_channels=4), EDMHeunScheduler(), vae=tiny_vae())
    p.set_progress_bar_config(disable=True)
    p.save_pretrained(tmp_path)
    loaded = MaskDiTPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.vae, AutoencoderKL)
    torch.testing.assert_close(_run(loaded, class_labels=[1]), _run(p, class_labels=[1]))


def test_model_card_has_library_tags_config_and_eval_results(pipe):
    results = [
        EvalResult(
            task_type="unconditional-image-generation",
            dataset_type="sklearn-digits",
            dataset_name="scikit-learn digits",
            metric_type="fid",
            metric_value=12.5,
        )
    ]
    card = pipe.create_model_card(
        "me/maskdit-tiny", training_config={"mask_ratio": 0.5, "mae_loss_weight": 0.1}, eval_results=results
    )
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers"
    assert {"masked-diffusion", "maskdit", "diffusers-masked"} <= set(data["tags"])
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 12.5
    assert '"mae_loss_weight": 0.1' in card.text
    assert 'DiffusionPipeline.from_pretrained("me/maskdit-tiny", trust_remote_code=True)' in card.text
    assert '"decoder_num_layers": 1' in card.text


def test_push_to_hub_creates_repo_and_uploads_the_saved_folder(pipe):
    uploaded = {}

    def fake_upload(self, repo_id, folder_path, commit_message, create_pr, **kw):
        from pathlib import Path

        uploaded["repo_id"] = repo_id
        uploaded["files"] = sorted(
            str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file()
        )
        uploaded["card"] = (Path(folder_path) / "README.md").read_text()
        return "commit-info"

    fake_repo = mock.Mock(repo_id="me/maskdit-tiny")
    with (
        mock.patch.object(HfApi, "create_repo", return_value=fake_repo) as create_repo,
        mock.patch.object(HfApi, "upload_folder", autospec=True, side_effect=fake_upload),
    ):
        result = pipe.push_to_hub("maskdit-tiny", training_config={"mask_ratio": 0.5}, private=True)
    assert result == "commit-info"
    create_repo.assert_called_once_with("maskdit-tiny", private=True, exist_ok=True)
    assert uploaded["repo_id"] == "me/maskdit-tiny"
    assert {
        "model_index.json",
        "pipeline_maskdit.py",
        "README.md",
        "transformer/config.json",
        "scheduler/scheduler_config.json",
    } <= set(uploaded["files"])
    assert "maskdit" in uploaded["card"] and '"mask_ratio": 0.5' in uploaded["card"]


@pytest.mark.parametrize(
    "name,file,match",
    [
        ("../x.png", "x.png", "relative paths"),
        ("/x.png", "x.png", "relative paths"),
        ("a.png", "gone.png", "not a file"),
    ],
)
def test_push_to_hub_refuses_bad_extra_files_before_creating_the_repo(pipe, tmp_path, name, file, match):
    (tmp_path / "x.png").write_bytes(b"png")
    with mock.patch.object(HfApi, "create_repo") as create_repo:
        with pytest.raises(ValueError, match=match):
            pipe.push_to_hub("maskdit-tiny", extra_files={name: tmp_path / file})
    create_repo.assert_not_called()


def test_a_pipeline_whose_transformer_config_needs_missing_weights_fails_at_load(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    config_path = tmp_path / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"] += 1
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"transformer.*missing from the weights"):
        MaskDiTPipeline.from_pretrained(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Class labels in any int-like shape, as diffusers' DiTPipeline and its PipelineTesterMixin batch them
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [
        [[1], [3]],
        (1, 3),
        torch.tensor([[1], [3]]),
        torch.tensor([1, 3], dtype=torch.int32),
        np.array([[1], [3]]),
        [np.int64(1), np.int64(3)],
        [["one"], [3]],
    ],
    ids=["nested-list", "tuple", "tensor-Bx1", "int32-tensor", "numpy-Bx1", "numpy-ints", "nested-names"],
)
def test_class_labels_in_any_int_like_shape_give_the_images_of_the_flat_list(pipe, labels):
    torch.testing.assert_close(_run(pipe, class_labels=labels), _run(pipe, class_labels=[1, 3]))


@pytest.mark.parametrize(
    "labels,error,match",
    [
        ([1.0], TypeError, r"int ids in \[0, 4\) or label names"),
        (torch.tensor([[1.0], [2.0]]), TypeError, r"int ids in \[0, 4\)"),
        (np.array([0.5]), TypeError, r"int ids in \[0, 4\)"),
        ([True], TypeError, r"int ids in \[0, 4\)"),
        (torch.tensor([True, False]), TypeError, r"int ids in \[0, 4\)"),
        ([[4]], ValueError, r"out of range: class_labels must be int ids in \[0, 4\)"),
        (np.array([[-1]]), ValueError, "out of range"),
        ([["seven"], ["one"]], ValueError, r"unknown label names \['seven'\]; known labels: .*'deux'"),
        ([[]], ValueError, "must not be empty"),
    ],
)
def test_labels_that_are_not_ids_or_names_are_refused_with_the_allowed_values(pipe, labels, error, match):
    with mock.patch.object(pipe.transformer, "forward") as forward, pytest.raises(error, match=match):
        _run(pipe, class_labels=labels)
    forward.assert_not_called()


def test_an_unknown_name_among_a_thousand_labels_lists_a_few_of_them():
    p = MaskDiTPipeline(
        tiny_transformer(num_classes=1000), EDMHeunScheduler(), id2label={i: f"c{i}" for i in range(1000)}
    )
    with pytest.raises(ValueError, match=r"known labels: 'c0', 'c1', .*, \.\.\. \(1000 in all\)$") as error:
        p(class_labels=["dog"])
    assert len(str(error.value)) < 400


# ---------------------------------------------------------------------------------------------------------------
# num_images_per_prompt, latents and generators, as in diffusers
# ---------------------------------------------------------------------------------------------------------------


def test_num_images_per_prompt_repeats_each_label_next_to_each_other(pipe):
    seen = []
    original = pipe.transformer.forward

    def spy(x, t, class_labels=None, **kw):
        seen.append(class_labels.tolist())
        return original(x, t, class_labels=class_labels, **kw)

    with mock.patch.object(pipe.transformer, "forward", side_effect=spy):
        images = _run(pipe, class_labels=[1, 3], num_images_per_prompt=2, num_inference_steps=2)
    assert seen[0] == [1, 1, 3, 3, 4, 4, 4, 4]  # conditional half, then the null class
    torch.testing.assert_close(images, _run(pipe, class_labels=[1, 1, 3, 3], num_inference_steps=2))


def test_num_images_per_prompt_multiplies_the_batch_size_of_an_unconditional_model():
    p = MaskDiTPipeline(tiny_transformer(num_classes=0), EDMHeunScheduler())
    p.set_progress_bar_config(disable=True)
    torch.testing.assert_close(_run(p, batch_size=2, num_images_per_prompt=3), _run(p, batch_size=6))


def test_a_generator_list_has_one_generator_per_image_after_num_images_per_prompt(pipe):
    with pytest.raises(ValueError, match="got 2 generators for a batch of 4 images"):
        _run(pipe, class_labels=[1, 3], num_images_per_prompt=2, generator=[torch.Generator()] * 2)
    generators = [torch.Generator().manual_seed(i) for i in range(4)]
    assert _run(pipe, class_labels=[1, 3], num_images_per_prompt=2, generator=generators).shape == (4, 1, 8, 8)


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_num_images_per_prompt_must_be_a_positive_int(pipe, value):
    with pytest.raises(ValueError, match="num_images_per_prompt must be an int >= 1"):
        _run(pipe, class_labels=[1], num_images_per_prompt=value)


# ---------------------------------------------------------------------------------------------------------------
# callback_on_step_end, as in diffusers
# ---------------------------------------------------------------------------------------------------------------


def test_callback_on_step_end_sees_every_step_and_the_latents_it_returns_replace_the_current_ones():
    """With EDM Euler (one evaluation per step): the callback halves the latents after each step; the reference is
    the loop written out against the scheduler with the same halving."""
    transformer = tiny_transformer()
    p = MaskDiTPipeline(transformer, EDMEulerScheduler())
    p.set_progress_bar_config(disable=True)
    noise, labels = torch.randn(2, 1, 8, 8), torch.tensor([1, 3])
    calls = []

    def halve(pipeline, step_index, timestep, callback_kwargs):
        assert pipeline is p and list(callback_kwargs) == ["latents"]
        calls.append((step_index, float(timestep)))
        return {"latents": callback_kwargs["latents"] / 2}

    out = p(
        class_labels=[1, 3], num_inference_steps=3, latents=noise, output_type="latent", callback_on_step_end=halve
    ).images

    ref = EDMEulerScheduler()
    ref.set_timesteps(3)
    x = noise * ref.init_noise_sigma
    for t in ref.timesteps:
        with torch.no_grad():
            cond = transformer(ref.scale_model_input(x, t), t.expand(2), labels).sample
            uncond = transformer(ref.scale_model_input(x, t), t.expand(2), torch.full_like(labels, 4)).sample
        x = ref.step(uncond + 1.5 * (cond - uncond), t, x).prev_sample / 2
    assert calls == [(i, float(t)) for i, t in enumerate(ref.timesteps)]
    torch.testing.assert_close(out, x)


def test_a_pipeline_callback_object_brings_its_own_tensor_inputs(pipe):
    from diffusers.callbacks import PipelineCallback

    class ZeroAtTheEnd(PipelineCallback):
        tensor_inputs = ["latents"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}

    images = _run(pipe, class_labels=[1], callback_on_step_end=ZeroAtTheEnd())
    torch.testing.assert_close(images, torch.full_like(images, 0.5))  # x = 0 in [-1, 1] is grey


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"callback_on_step_end_tensor_inputs": ["prompt_embeds"]}, ValueError, r"from \['latents'\]"),
        ({"callback_on_step_end_tensor_inputs": "latents"}, ValueError, "must be a list of names"),
        ({"callback_on_step_end": "not callable"}, ValueError, "callback_on_step_end must be a function"),
        ({"callback_on_step_end": lambda *args: None}, TypeError, "must return a dict"),
        ({"callback_on_step_end": lambda *args: {"latents": torch.zeros(3)}}, ValueError, "must keep the shape"),
    ],
)
def test_bad_callbacks_are_refused_naming_what_is_allowed(pipe, kwargs, error, match):
    with pytest.raises(error, match=match):
        _run(pipe, class_labels=[1], **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Results that are not finite
# ---------------------------------------------------------------------------------------------------------------


def test_a_guidance_scale_that_overflows_raises_instead_of_returning_nan_images(pipe):
    # 1e308 is finite, so it passes the argument check, but not representable in float32: every image was NaN.
    with pytest.raises(FloatingPointError, match=r"guidance_scale=1e\+308 is beyond the largest torch.float32"):
        _run(pipe, class_labels=[0, 1], guidance_scale=1e308)


def test_nan_in_the_latents_given_is_named_as_the_cause(pipe):
    noise = torch.randn(1, 1, 8, 8)
    noise[0, 0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="the latents passed in hold NaN or inf"):
        _run(pipe, class_labels=[0], guidance_scale=1.0, latents=noise)


# ---------------------------------------------------------------------------------------------------------------
# Schedulers of another parameterisation are refused
# ---------------------------------------------------------------------------------------------------------------

WRONG_SCHEDULERS = [DDIMScheduler, EulerDiscreteScheduler, DDPMScheduler]


@pytest.mark.parametrize("scheduler_cls", WRONG_SCHEDULERS)
def test_a_scheduler_without_edm_preconditioning_is_refused_at_construction(scheduler_cls):
    match = rf"MaskDiTPipeline cannot sample with {scheduler_cls.__name__}: .*EDMHeunScheduler, EDMEulerScheduler"
    with pytest.raises(ValueError, match=match):
        MaskDiTPipeline(tiny_transformer(), scheduler_cls())


@pytest.mark.parametrize("scheduler_cls", WRONG_SCHEDULERS)
def test_swapping_in_a_scheduler_without_edm_preconditioning_is_refused_and_keeps_the_old_one(pipe, scheduler_cls):
    before = pipe.scheduler
    with pytest.raises(ValueError, match=f"cannot sample with {scheduler_cls.__name__}"):
        pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config)
    assert pipe.scheduler is before and pipe.config.scheduler[1] == "EDMHeunScheduler"


def test_a_saved_pipeline_whose_model_index_names_ddim_is_refused_at_load(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", "DDIMScheduler"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "scheduler" / "scheduling_edm_heun.py").unlink()  # as diffusers saves a DDIMScheduler
    with pytest.raises(ValueError, match="MaskDiTPipeline cannot sample with DDIMScheduler"):
        MaskDiTPipeline.from_pretrained(tmp_path)
    # The fix the message gives works.
    assert isinstance(MaskDiTPipeline.from_pretrained(tmp_path, scheduler=EDMHeunScheduler()), MaskDiTPipeline)


# ---------------------------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------------------------


def test_a_class_conditional_card_has_no_unconditional_task_and_an_unconditional_one_has(pipe):
    # The Hub has no task for class-conditional generation (facebook/DiT-XL-2-256 sets none).
    data = pipe.create_model_card().data.to_dict()
    assert "pipeline_tag" not in data and "class-conditional" in data["tags"]
    unconditional = MaskDiTPipeline(tiny_transformer(num_classes=0), EDMHeunScheduler())
    data = unconditional.create_model_card().data.to_dict()
    assert data["pipeline_tag"] == "unconditional-image-generation" and "unconditional" in data["tags"]


def test_the_card_links_the_project_by_name_and_cites_the_paper_apart(pipe):
    text = pipe.create_model_card("me/maskdit-tiny").text
    first = text.split("# me/maskdit-tiny\n", 1)[1].strip().split("\n")[0]
    assert first.startswith(
        "A MaskDiTPipeline trained with [diffusers-masked](https://pypi.org/project/diffusers-masked/),"
    )
    assert "[*Fast Training of Diffusion Models with Masked Transformers*](https://arxiv.org/abs/2306.09305)" in first
