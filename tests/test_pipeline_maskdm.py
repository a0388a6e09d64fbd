import inspect
import json
import math
from unittest import mock

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
)

from diffusers_masked import EDMHeunScheduler, MaskDMPipeline
from tests.launch import assert_loads_in_a_fresh_process
from tests.tiny import tiny_transformer, tiny_uvit

NUM_CLASSES = 4
SHAPE = (3, 8, 8)
# The pipelines run in float64: at t = 999 the cosine schedule's sqrt(alpha_bar) is ~5e-5, so DDIM's
# x0 = (x - sqrt(1 - a) eps) / sqrt(a) magnifies float32 rounding (a batch of two against two of one, say) to ~1e-3
# wherever x0 is not clipped, and the comparisons below would need that loose a tolerance.
DTYPE = torch.float64


@pytest.fixture
def pipe():
    p = MaskDMPipeline(
        tiny_uvit(scale=0.1, seed=0, num_classes=NUM_CLASSES).to(DTYPE), MaskDMPipeline.default_scheduler()
    )
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def pipe32():
    """In float32, as from_pretrained loads it."""
    p = MaskDMPipeline(tiny_uvit(scale=0.1, seed=0, num_classes=NUM_CLASSES), MaskDMPipeline.default_scheduler())
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture
def uncond_pipe():
    p = MaskDMPipeline(tiny_uvit(scale=0.1, seed=0, num_classes=0).to(DTYPE), MaskDMPipeline.default_scheduler())
    p.set_progress_bar_config(disable=True)
    return p


def _run(p, **kwargs):
    kwargs.setdefault("num_inference_steps", 4)
    kwargs.setdefault("generator", torch.Generator().manual_seed(0))
    kwargs.setdefault("output_type", "pt")
    return p(**kwargs).images


def _run_recording(p, **kwargs):
    """Run the pipeline and also return the transformer's inputs at every step (the sampling trajectory, which the
    final clipping to [0, 1] would otherwise hide)."""
    inputs = []
    original = p.transformer.forward

    def spy(x, t, **kw):
        inputs.append(x.clone())
        return original(x, t, **kw)

    with mock.patch.object(p.transformer, "forward", side_effect=spy):
        images = _run(p, **kwargs)
    return images, inputs


def _manual_loop(transformer, scheduler, batch, seed, steps, labels=None, scale=1.0, **step_kwargs):
    """The sampling loop written out against the scheduler: noise, then per step the prediction, guided as
    uncond + scale * (cond - uncond) with the null class, and the step. Returns the images and the trajectory."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, *SHAPE, generator=generator, dtype=DTYPE) * scheduler.init_noise_sigma
    trajectory = []
    scheduler.set_timesteps(steps)
    for t in scheduler.timesteps:
        x_in = scheduler.scale_model_input(x, t)
        trajectory.append(x_in)
        with torch.no_grad():
            eps = transformer(x_in, t.expand(batch), class_labels=labels).sample
            if labels is not None and scale != 1:
                uncond = transformer(x_in, t.expand(batch), class_labels=torch.full_like(labels, NUM_CLASSES)).sample
                eps = uncond + scale * (eps - uncond)
        x = scheduler.step(eps, t, x, generator=generator, **step_kwargs).prev_sample
    return (x / 2 + 0.5).clamp(0, 1).float(), trajectory


def _assert_same_trajectory(recorded, expected, **tolerance):
    # A guided run calls the transformer once per step on [x, x]; compare its first half.
    assert len(recorded) == len(expected)
    for step, (ours, theirs) in enumerate(zip(recorded, expected)):
        torch.testing.assert_close(ours[: theirs.shape[0]], theirs, msg=f"step {step}", **tolerance)


# ---------------------------------------------------------------------------------------------------------------
# The default sampler is MaskDM's evaluation: DDIM, x0 clipped, 250 steps, eta = 1
# ---------------------------------------------------------------------------------------------------------------


def test_defaults_are_the_official_evaluation_settings():
    parameters = inspect.signature(MaskDMPipeline.__call__).parameters
    assert {name: p.default for name, p in list(parameters.items())[1:]} == {
        "batch_size": 1,
        "class_labels": None,
        "guidance_scale": 1.0,
        "num_inference_steps": 250,
        "eta": 1.0,
        "generator": None,
        "output_type": "pil",
        "return_dict": True,
        "num_images_per_prompt": 1,
        "latents": None,
        "callback_on_step_end": None,
        "callback_on_step_end_tensor_inputs": ("latents",),
    }
    scheduler = MaskDMPipeline.default_scheduler()
    assert isinstance(scheduler, DDIMScheduler)
    assert scheduler.config.clip_sample and scheduler.config.clip_sample_range == 1.0
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and scheduler.config.num_train_timesteps == 1000
    # MaskDM's DDIM steps: reversed(int(linspace(-1, T - 1, steps + 1))) without the final -1.
    scheduler.set_timesteps(250)
    official = torch.linspace(-1, 999, 251).int().flip(0)[:-1]
    assert torch.equal(scheduler.timesteps, official.long())


def test_default_scheduler_takes_the_training_noise_schedule():
    scheduler = MaskDMPipeline.default_scheduler(DDPMScheduler(beta_schedule="linear").config)
    assert scheduler.config.beta_schedule == "linear" and scheduler.config.clip_sample
    assert scheduler.config.timestep_spacing == "trailing"


def maskdm_cosine_alphas_cumprod(T=1000):
    steps = torch.arange(T + 1, dtype=torch.float64)
    alpha_bar = torch.cos((steps / T + 0.008) / 1.008 * math.pi / 2) ** 2
    betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clip(0, 0.999)
    return torch.cumprod(1 - betas, dim=0)


def official_ddim_sample(transformer, batch, seed, steps, eta):
    """MaskDM's ddim_sample, written from its algorithm in float64: steps at int(linspace(-1, T-1, steps+1)),
    x0 = (x - sqrt(1 - a) eps) / sqrt(a) clipped to [-1, 1], sigma = eta sqrt((1 - a/a') (1 - a') / (1 - a)),
    x' = sqrt(a') x0 + sqrt(1 - a' - sigma^2) eps + sigma z, and x0 itself at the last step."""
    generator = torch.Generator().manual_seed(seed)
    alphas_cumprod = maskdm_cosine_alphas_cumprod()
    times = torch.linspace(-1, 999, steps + 1).int().tolist()[::-1]
    x = torch.randn(batch, *SHAPE, generator=generator, dtype=torch.float64)
    trajectory = []
    for time, time_next in zip(times[:-1], times[1:]):
        trajectory.append(x)
        with torch.no_grad():
            eps = transformer(x, torch.full((batch,), time), class_labels=None).sample.double()
        a = alphas_cumprod[time]
        x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-1, 1)
        z = torch.randn(
            batch, *SHAPE, generator=generator, dtype=torch.float64
        )  # diffusers draws at the last step too
        if time_next < 0:
            x = x0
            continue
        a_next = alphas_cumprod[time_next]
        sigma = eta * ((1 - a / a_next) * (1 - a_next) / (1 - a)).sqrt()
        x = a_next.sqrt() * x0 + (1 - a_next - sigma**2).sqrt() * eps + sigma * z
    return (x / 2 + 0.5).clamp(0, 1), trajectory


@pytest.mark.parametrize("eta", [1.0, 0.0])
def test_default_sampler_equals_the_official_ddim_in_float64(uncond_pipe, eta):
    images, trajectory = _run_recording(uncond_pipe, batch_size=2, num_inference_steps=4, eta=eta)
    expected_images, expected_trajectory = official_ddim_sample(uncond_pipe.transformer, 2, 0, 4, eta)
    # diffusers evaluates 1 - alpha_bar in float32 (1.0 exactly at t = 999, where alpha_bar is ~2e-9), which moves an
    # unclipped x0 by ~1e-4 after the division by sqrt(alpha_bar) ~ 5e-5; the official code computes in float32 too.
    _assert_same_trajectory(trajectory, expected_trajectory, rtol=0, atol=1e-3)
    torch.testing.assert_close(images.double(), expected_images, rtol=0, atol=1e-3)


# ---------------------------------------------------------------------------------------------------------------
# Guidance
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [3.0, 0.0])
def test_guidance_is_uncond_plus_scale_times_cond_minus_uncond(pipe, scale):
    labels = [1, 3]
    images, trajectory = _run_recording(
        pipe, class_labels=labels, guidance_scale=scale, num_inference_steps=3, eta=0.5
    )
    expected_images, expected_trajectory = _manual_loop(
        pipe.transformer, MaskDMPipeline.default_scheduler(), 2, 0, 3, torch.tensor(labels), scale, eta=0.5
    )
    _assert_same_trajectory(trajectory, expected_trajectory)
    torch.testing.assert_close(images, expected_images)


def test_the_scheduler_steps_on_the_guided_noise_prediction(pipe):
    labels, scale = torch.tensor([0, 2]), 2.5
    steps = []
    original = pipe.scheduler.step

    def spy(model_output, t, sample, **kw):
        steps.append((model_output.clone(), t, sample.clone()))
        return original(model_output, t, sample, **kw)

    with mock.patch.object(pipe.scheduler, "step", side_effect=spy):
        _run(pipe, class_labels=labels.tolist(), guidance_scale=scale, num_inference_steps=3)
    assert len(steps) == 3
    for model_output, t, sample in steps:
        with torch.no_grad():
            cond = pipe.transformer(sample, t.expand(2), labels).sample
            uncond = pipe.transformer(sample, t.expand(2), torch.full_like(labels, NUM_CLASSES)).sample
        torch.testing.assert_close(model_output, uncond + scale * (cond - uncond))


def test_guidance_scale_one_runs_a_single_conditional_batch_and_otherwise_adds_the_null_class(pipe):
    seen = []
    original = pipe.transformer.forward

    def spy(x, t, class_labels=None, **kw):
        seen.append(class_labels.tolist())
        return original(x, t, class_labels=class_labels, **kw)

    with mock.patch.object(pipe.transformer, "forward", side_effect=spy):
        _run(pipe, class_labels=[0, 2], num_inference_steps=2)
        assert seen == [[0, 2]] * 2
        seen.clear()
        _run(pipe, class_labels=[0, 2], guidance_scale=1.5, num_inference_steps=2)
        assert seen == [[0, 2, NUM_CLASSES, NUM_CLASSES]] * 2


# ---------------------------------------------------------------------------------------------------------------
# Schedulers and backbones
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scheduler_cls,overrides",
    [(DDPMScheduler, {}), (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++"})],
    ids=["ddpm", "dpm-solver++"],
)
def test_ddpm_family_schedulers_swap_in_via_from_config(pipe, scheduler_cls, overrides):
    pipe.scheduler = scheduler_cls.from_config(pipe.scheduler.config, **overrides)
    images, trajectory = _run_recording(pipe, class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=5)
    reference = scheduler_cls.from_config(pipe.scheduler.config, **overrides)
    expected_images, expected_trajectory = _manual_loop(
        pipe.transformer, reference, 2, 0, 5, torch.tensor([0, 1]), 2.0
    )
    _assert_same_trajectory(trajectory, expected_trajectory)
    torch.testing.assert_close(images, expected_images)


def _alpha_sigma(alphas_cumprod, t):
    a = alphas_cumprod[int(t)].double()
    return a.sqrt(), (1 - a).sqrt()


def test_dpm_solver_scheduler_is_dpm_solver_pp_on_the_same_betas_with_x0_clipped():
    ddim = MaskDMPipeline.default_scheduler(DDPMScheduler(beta_schedule="linear").config)
    dpm = MaskDMPipeline.dpm_solver_scheduler(ddim.config)
    assert isinstance(dpm, DPMSolverMultistepScheduler)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.solver_order == 2
    assert dpm.config.thresholding and dpm.config.sample_max_value == 1.0
    torch.testing.assert_close(dpm.alphas_cumprod, ddim.alphas_cumprod)  # the linear betas carried over
    assert MaskDMPipeline.dpm_solver_scheduler().config.beta_schedule == "squaredcos_cap_v2"  # MaskDM's default


def test_dpm_solver_schedulers_first_step_is_the_data_prediction_update_with_x0_clipped():
    # DPM-Solver++'s first step (first order) in closed form, float64: with lambda = log(alpha / sigma) and
    # h = lambda_s - lambda_t, x_s = (sigma_s / sigma_t) x_t + alpha_s (1 - e^-h) x0, where
    # x0 = (x_t - sigma_t eps) / alpha_t, clipped to [-1, 1]. At t = 999 of the cosine schedule alpha_t is ~5e-5, so
    # an eps off by 1% gives |x0| ~ 200 unclipped.
    dpm = MaskDMPipeline.dpm_solver_scheduler(MaskDMPipeline.default_scheduler().config)
    bare = DPMSolverMultistepScheduler.from_config(MaskDMPipeline.default_scheduler().config)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 8, 8, generator=generator, dtype=torch.float64)
    eps = 1.01 * x  # x_T is almost pure noise: the right eps is about x_T itself

    dpm.set_timesteps(10)
    t, s = dpm.timesteps[:2]
    assert int(t) == 999
    alpha_t, sigma_t = _alpha_sigma(dpm.alphas_cumprod, t)
    alpha_s, sigma_s = _alpha_sigma(dpm.alphas_cumprod, s)
    h = torch.log(alpha_s / sigma_s) - torch.log(alpha_t / sigma_t)
    x0 = (x - sigma_t * eps) / alpha_t
    assert x0.abs().max() > 100
    expected = (sigma_s / sigma_t) * x + alpha_s * (1 - torch.exp(-h)) * x0.clamp(-1, 1)
    torch.testing.assert_close(dpm.step(eps, t, x).prev_sample, expected)

    # The bare one takes the unclipped x0 and lands far outside the noise the model was trained on (|x| ~ 4 at t).
    # (Its float32 sigmas, times an x0 in the hundreds, differ from the float64 formula by ~1e-5 relative.)
    bare.set_timesteps(10)
    unclipped = bare.step(eps, t, x).prev_sample
    expected_unclipped = (sigma_s / sigma_t) * x + alpha_s * (1 - torch.exp(-h)) * x0
    torch.testing.assert_close(unclipped, expected_unclipped, rtol=1e-4, atol=1e-6)
    assert unclipped.abs().max() > 10 and expected.abs().max() < 6


def test_the_samplers_dpmsolver_choice_is_the_clipped_one(uncond_pipe):
    from diffusers_masked.evaluation import sampling

    sampling.set_scheduler(uncond_pipe, "dpmsolver")
    assert isinstance(uncond_pipe.scheduler, DPMSolverMultistepScheduler)
    assert uncond_pipe.scheduler.config.thresholding and uncond_pipe.scheduler.config.sample_max_value == 1.0
    _run(uncond_pipe, batch_size=1, num_inference_steps=3)


def test_a_maskdit_transformer_works_too():
    transformer = tiny_transformer(scale=0.1, in_channels=3, num_classes=NUM_CLASSES).to(DTYPE)
    p = MaskDMPipeline(transformer, MaskDMPipeline.default_scheduler())
    p.set_progress_bar_config(disable=True)
    images, trajectory = _run_recording(p, class_labels=[2], guidance_scale=1.5, num_inference_steps=3)
    expected_images, expected_trajectory = _manual_loop(
        transformer, MaskDMPipeline.default_scheduler(), 1, 0, 3, torch.tensor([2]), 1.5, eta=1.0
    )
    _assert_same_trajectory(trajectory, expected_trajectory)
    torch.testing.assert_close(images, expected_images)


# ---------------------------------------------------------------------------------------------------------------
# Outputs and arguments
# ---------------------------------------------------------------------------------------------------------------


def test_output_types(uncond_pipe):
    pt = _run(uncond_pipe, batch_size=2)
    assert pt.shape == (2, *SHAPE) and pt.min() >= 0 and pt.max() <= 1
    np_images = _run(uncond_pipe, batch_size=2, output_type="np")
    assert isinstance(np_images, np.ndarray) and np_images.shape == (2, 8, 8, 3)
    np.testing.assert_allclose(np_images, pt.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = _run(uncond_pipe, batch_size=2, output_type="pil")
    assert len(pil) == 2 and pil[0].size == (8, 8)
    as_tuple = uncond_pipe(batch_size=1, num_inference_steps=2, output_type="pt", return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == (1, *SHAPE)


def test_same_generator_same_images_and_another_seed_differs(pipe):
    a, b = _run(pipe, class_labels=[1, 2]), _run(pipe, class_labels=[1, 2])
    assert torch.equal(a, b)
    assert not torch.equal(a, _run(pipe, class_labels=[1, 2], generator=torch.Generator().manual_seed(1)))


def test_a_tensor_of_labels_equals_the_list(pipe):
    torch.testing.assert_close(_run(pipe, class_labels=torch.tensor([3, 0])), _run(pipe, class_labels=[3, 0]))


def test_non_square_sample_size_gives_non_square_images():
    p = MaskDMPipeline(
        tiny_uvit(scale=0.1, num_classes=0, sample_size=(8, 12)).to(DTYPE), MaskDMPipeline.default_scheduler()
    )
    p.set_progress_bar_config(disable=True)
    assert _run(p, batch_size=2, num_inference_steps=2).shape == (2, 3, 8, 12)


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"class_labels": [0], "num_inference_steps": 0}, ValueError, "num_inference_steps"),
        ({"class_labels": [0], "num_inference_steps": 1001}, ValueError, "num_train_timesteps"),
        ({"class_labels": [0], "guidance_scale": float("nan")}, ValueError, "guidance_scale"),
        ({"class_labels": [0], "guidance_scale": float("inf")}, ValueError, "guidance_scale"),
        ({"class_labels": [0], "guidance_scale": -1.0}, ValueError, "guidance_scale"),
        ({"class_labels": [0], "eta": 1.5}, ValueError, "eta"),
        ({"class_labels": [0], "eta": -0.1}, ValueError, "eta"),
        ({"class_labels": [0], "output_type": "latent"}, ValueError, "output_type"),
        ({"class_labels": [NUM_CLASSES]}, ValueError, "out of range"),
        ({"class_labels": [-1]}, ValueError, "out of range"),
        ({"class_labels": []}, ValueError, "empty"),
        ({"class_labels": [0.5]}, TypeError, "int ids"),
        ({"class_labels": [0, 1], "batch_size": 3}, ValueError, "batch_size"),
        ({"class_labels": [0], "batch_size": 0}, ValueError, "batch_size"),
        ({}, ValueError, "class_labels are required"),
        ({"class_labels": [0, 1], "generator": [torch.Generator()]}, ValueError, "generators"),
    ],
)
def test_bad_arguments_raise_before_sampling(pipe, kwargs, error, match):
    with mock.patch.object(pipe.transformer, "forward") as forward, pytest.raises(error, match=match):
        _run(pipe, **kwargs)
    forward.assert_not_called()


@pytest.mark.parametrize(
    "kwargs,match",
    [({"class_labels": [0]}, "unconditional"), ({"guidance_scale": 2.0}, "guidance_scale")],
)
def test_unconditional_transformer_refuses_labels_and_guidance(uncond_pipe, kwargs, match):
    with pytest.raises(ValueError, match=match):
        _run(uncond_pipe, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------------


def test_save_pretrained_writes_the_shim_index_and_card(pipe32, tmp_path):
    pipe32.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_maskdm", "MaskDMPipeline"]
    assert index["transformer"] == ["masked_uvit", "MaskedUViTTransformer2DModel"]
    assert (tmp_path / "transformer" / "masked_uvit.py").exists()
    assert index["scheduler"] == ["diffusers", "DDIMScheduler"]
    shim = (tmp_path / "pipeline_maskdm.py").read_text()
    assert "from diffusers_masked.pipelines.pipeline_maskdm import MaskDMPipeline" in shim
    card = (tmp_path / "README.md").read_text()
    assert "maskdm" in card and "2306.11363" in card and "pipe(class_labels=[0, 1], guidance_scale=2.0)" in card


def test_from_pretrained_in_this_process_gives_the_same_images(pipe32, tmp_path):
    pipe32.save_pretrained(tmp_path)
    loaded = MaskDMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, DDIMScheduler)
    torch.testing.assert_close(
        _run(loaded, class_labels=[1, 3], guidance_scale=2.0), _run(pipe32, class_labels=[1, 3], guidance_scale=2.0)
    )
    assert isinstance(DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True), MaskDMPipeline)


def test_fresh_process_loads_both_ways_and_generates_the_same_images(pipe32, tmp_path):
    pipe32.save_pretrained(tmp_path)
    assert_loads_in_a_fresh_process(
        tmp_path,
        "MaskDMPipeline",
        "class_labels=[1, 3], guidance_scale=2.0, num_inference_steps=4",
        _run(pipe32, class_labels=[1, 3], guidance_scale=2.0),
    )


# ---------------------------------------------------------------------------------------------------------------
# Class labels in any int-like shape, as diffusers' DiTPipeline and its PipelineTesterMixin batch them
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "labels",
    [[[1], [3]], torch.tensor([[1], [3]]), np.array([1, 3]), np.array([[1], [3]]), [np.int64(1), np.int64(3)], (1, 3)],
    ids=["nested-list", "tensor-Bx1", "numpy", "numpy-Bx1", "numpy-ints", "tuple"],
)
def test_class_labels_in_any_int_like_shape_give_the_images_of_the_flat_list(pipe, labels):
    torch.testing.assert_close(_run(pipe, class_labels=labels), _run(pipe, class_labels=[1, 3]))


@pytest.mark.parametrize(
    "labels,error,match",
    [
        ([[1.0]], TypeError, r"int ids in \[0, 4\), got 1.0"),
        (torch.tensor([[0.0], [1.0]]), TypeError, r"int ids in \[0, 4\)"),
        (np.array([True]), TypeError, r"int ids in \[0, 4\), got True"),
        ([False], TypeError, r"int ids in \[0, 4\)"),
        (["cat"], TypeError, r"int ids in \[0, 4\), got 'cat'"),  # MaskDMPipeline has no label names
        (torch.tensor([[NUM_CLASSES]]), ValueError, r"out of range: class_labels must be int ids in \[0, 4\)"),
    ],
)
def test_labels_that_are_not_int_ids_are_refused_with_the_allowed_values(pipe, labels, error, match):
    with mock.patch.object(pipe.transformer, "forward") as forward, pytest.raises(error, match=match):
        _run(pipe, class_labels=labels)
    forward.assert_not_called()


# ---------------------------------------------------------------------------------------------------------------
# num_images_per_prompt, latents and generators, as in diffusers
# ---------------------------------------------------------------------------------------------------------------


def test_num_images_per_prompt_repeats_each_label_next_to_each_other(pipe):
    images, trajectory = _run_recording(pipe, class_labels=[1, 3], num_images_per_prompt=2, guidance_scale=2.0)
    expected_images, expected_trajectory = _manual_loop(
        pipe.transformer, MaskDMPipeline.default_scheduler(), 4, 0, 4, torch.tensor([1, 1, 3, 3]), 2.0, eta=1.0
    )
    _assert_same_trajectory(trajectory, expected_trajectory)
    torch.testing.assert_close(images, expected_images)


def test_num_images_per_prompt_multiplies_the_batch_size_of_an_unconditional_model(uncond_pipe):
    torch.testing.assert_close(
        _run(uncond_pipe, batch_size=2, num_images_per_prompt=3), _run(uncond_pipe, batch_size=6)
    )


def test_a_generator_list_has_one_generator_per_image_after_num_images_per_prompt(uncond_pipe):
    with pytest.raises(ValueError, match="got 2 generators for a batch of 6 images"):
        _run(uncond_pipe, batch_size=2, num_images_per_prompt=3, generator=[torch.Generator()] * 2)


@pytest.mark.parametrize("value", [0, 2.0, False])
def test_num_images_per_prompt_must_be_a_positive_int(pipe, value):
    with pytest.raises(ValueError, match="num_images_per_prompt must be an int >= 1"):
        _run(pipe, class_labels=[1], num_images_per_prompt=value)


def test_given_latents_replace_the_drawn_noise_scaled_by_init_noise_sigma(pipe):
    """Euler's init_noise_sigma is far from DDIM's 1: the latents given are standard-normal noise that the pipeline
    scales, as the written-out loop scales the noise it draws (from the same generator, which then draws the rest)."""
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.init_noise_sigma > 100
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(2, *SHAPE, generator=generator, dtype=DTYPE)
    images, trajectory = _run_recording(
        pipe, class_labels=[0, 2], guidance_scale=1.5, num_inference_steps=3, latents=noise, generator=generator
    )
    expected_images, expected_trajectory = _manual_loop(
        pipe.transformer,
        EulerDiscreteScheduler.from_config(pipe.scheduler.config),
        2,
        0,
        3,
        torch.tensor([0, 2]),
        1.5,
    )
    _assert_same_trajectory(trajectory, expected_trajectory)
    torch.testing.assert_close(images, expected_images)


@pytest.mark.parametrize("latents", [torch.randn(1, *SHAPE), torch.randn(2, 3, 8, 4), np.zeros((2, *SHAPE))])
def test_latents_of_another_shape_are_refused(pipe, latents):
    with pytest.raises(ValueError, match=r"latents must be a tensor of shape \(2, 3, 8, 8\)"):
        _run(pipe, class_labels=[0, 2], latents=latents)


# ---------------------------------------------------------------------------------------------------------------
# callback_on_step_end, as in diffusers
# ---------------------------------------------------------------------------------------------------------------


def test_callback_on_step_end_sees_every_step_and_the_latents_it_returns_replace_the_current_ones(pipe):
    replacement = torch.full((2, *SHAPE), 0.25, dtype=DTYPE)
    calls = []

    def callback(pipeline, step_index, timestep, callback_kwargs):
        calls.append((step_index, int(timestep), callback_kwargs["latents"].shape))
        return {"latents": replacement} if step_index == 0 else callback_kwargs

    _, trajectory = _run_recording(pipe, class_labels=[0, 2], num_inference_steps=3, callback_on_step_end=callback)
    scheduler = MaskDMPipeline.default_scheduler()
    scheduler.set_timesteps(3)
    assert calls == [(i, int(t), (2, *SHAPE)) for i, t in enumerate(scheduler.timesteps)]
    torch.testing.assert_close(trajectory[1], replacement)  # DDIM's scale_model_input is the identity


def test_callback_on_step_end_tensor_inputs_must_be_the_pipelines(pipe):
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs must be names from \['latents'\]"):
        _run(pipe, class_labels=[0], callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["x"])


# ---------------------------------------------------------------------------------------------------------------
# Results that are not finite
# ---------------------------------------------------------------------------------------------------------------


def test_a_guidance_scale_that_overflows_raises_instead_of_returning_nan_images(pipe32):
    # 1e308 is finite, so it passes the argument check, but not representable in float32: every image was NaN.
    with pytest.raises(FloatingPointError, match=r"NaN or inf .* Likely cause: guidance_scale=1e\+308 is beyond"):
        _run(pipe32, class_labels=[0, 1], guidance_scale=1e308)


# ---------------------------------------------------------------------------------------------------------------
# Schedulers of another parameterisation are refused
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler_cls", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler, EDMHeunScheduler])
def test_an_edm_scheduler_is_refused_naming_the_ddpm_family(scheduler_cls, pipe):
    match = rf"MaskDMPipeline cannot sample with {scheduler_cls.__name__}: .*DDIMScheduler, DDPMScheduler"
    with pytest.raises(ValueError, match=match):
        MaskDMPipeline(tiny_uvit(scale=0.1, num_classes=0), scheduler_cls())
    with pytest.raises(ValueError, match=match):
        pipe.scheduler = scheduler_cls()
    assert isinstance(pipe.scheduler, DDIMScheduler)
