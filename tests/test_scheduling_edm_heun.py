"""EDMHeunScheduler against Karras et al. 2022, Algorithm 1, written out in float64 here."""

import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler, EDMEulerScheduler

from diffusers_masked import EDMHeunScheduler

SIGMA_DATA = 0.5


def karras_sigmas(num_steps, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Algorithm 1's noise levels sigma_0 .. sigma_N (sigma_N = 0), float64."""
    i = torch.arange(num_steps, dtype=torch.float64)
    ramp = i / (num_steps - 1) if num_steps > 1 else i
    sigmas = (sigma_max ** (1 / rho) + ramp * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([sigmas, torch.zeros(1, dtype=torch.float64)])


def toy_denoiser(x, sigma):
    """A smooth nonlinear D(x, sigma), so the trajectory depends on every evaluation."""
    return x * 0.8 / (0.8 + sigma**2) + 0.3 * torch.sin(x) / (1 + sigma)


def gaussian_denoiser(s):
    """Exact denoiser of data ~ N(0, s^2): D(x, sigma) = x s^2 / (s^2 + sigma^2)."""
    return lambda x, sigma: x * s**2 / (s**2 + sigma**2)


def heun_reference(denoiser, x, sigmas):
    """Algorithm 1 (deterministic Heun) in float64; returns x_0 .. x_N and the sigmas of every evaluation."""
    states, evaluated = [x], []
    for i in range(len(sigmas) - 1):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        evaluated.append(sigma)
        d = (x - denoiser(x, sigma)) / sigma
        x_next = x + (sigma_next - sigma) * d
        if sigma_next != 0:
            evaluated.append(sigma_next)
            d_next = (x_next - denoiser(x_next, sigma_next)) / sigma_next
            x_next = x + (sigma_next - sigma) * (d + d_next) / 2
        x = x_next
        states.append(x)
    return states, torch.stack(evaluated)


class EDMNetwork:
    """The network F of a denoiser D: sees only the scaled input c_in * x and c_noise = ln(sigma) / 4, as a trained
    model would, and inverts EDM's preconditioning D = c_skip x + c_out F."""

    def __init__(self, denoiser, sigma_data=SIGMA_DATA):
        self.denoiser = denoiser
        self.sigma_data = sigma_data
        self.sigmas_seen = []

    def __call__(self, scaled_x, c_noise):
        assert (c_noise == c_noise[0]).all()
        sigma = math.exp(4 * float(c_noise[0]))
        self.sigmas_seen.append(sigma)
        sd2 = self.sigma_data**2
        x = scaled_x.double() * math.sqrt(sigma**2 + sd2)
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / math.sqrt(sigma**2 + sd2)
        return ((self.denoiser(x, sigma) - c_skip * x) / c_out).to(scaled_x.dtype)


def sample(scheduler, network, latents):
    """The standard diffusers denoising loop; returns the final sample and the state after every full step."""
    states = [latents]
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        model_output = network(model_input, t.expand(latents.shape[0]))
        latents = scheduler.step(model_output, t, latents).prev_sample
        if getattr(scheduler, "state_in_first_order", True):
            states.append(latents)
    return latents, states


def test_matches_algorithm_1_step_for_step():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(12)
    noise = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = karras_sigmas(12)
    network = EDMNetwork(toy_denoiser)

    _, states = sample(scheduler, network, (noise * scheduler.init_noise_sigma).float())
    ref_states, ref_evaluated = heun_reference(toy_denoiser, noise * sigmas[0], sigmas)

    torch.testing.assert_close(
        torch.tensor(network.sigmas_seen, dtype=torch.float64), ref_evaluated, rtol=1e-5, atol=0
    )
    assert len(states) == len(ref_states) == 13
    for i, (state, ref) in enumerate(zip(states, ref_states)):
        scale = float(ref.abs().max())
        torch.testing.assert_close(state.double(), ref, rtol=1e-5, atol=1e-5 * scale, msg=f"x_{i} differs")


def test_gaussian_data_is_sampled_with_its_standard_deviation():
    s = 1.5
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(40)
    noise = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(1))

    result, _ = sample(scheduler, EDMNetwork(gaussian_denoiser(s)), noise * scheduler.init_noise_sigma)

    assert abs(float(result.std()) / s - 1) < 0.03
    torch.testing.assert_close(result, gaussian_ode_solution(noise * 80.0, s), rtol=1e-2, atol=1e-4)


def gaussian_ode_solution(x_start, s, sigma_start=80.0):
    """For data ~ N(0, s^2) the probability-flow ODE is linear: x(0) = x(sigma) s / sqrt(s^2 + sigma^2)."""
    return x_start * s / math.sqrt(s**2 + sigma_start**2)


def test_error_is_second_order_in_the_step_count():
    s, x_start = 1.5, torch.full((1, 1, 1, 1), 80.0)
    errors = []
    for num_steps in (20, 40):
        scheduler = EDMHeunScheduler()
        scheduler.set_timesteps(num_steps)
        result, _ = sample(scheduler, EDMNetwork(gaussian_denoiser(s)), x_start)
        errors.append(abs(float(result) / float(gaussian_ode_solution(x_start, s)) - 1))

    # Halving the step size divides a second-order method's error by about 4 (a first-order one's by 2).
    assert 3.5 < errors[0] / errors[1] < 5.5


def test_forty_steps_make_seventy_nine_model_evaluations():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(40)
    network = EDMNetwork(toy_denoiser)

    sample(scheduler, network, torch.randn(2, 1, 2, 2) * scheduler.init_noise_sigma)

    assert scheduler.order == 2
    assert len(scheduler.timesteps) == 79
    assert len(network.sigmas_seen) == 79
    assert scheduler.state_in_first_order


def test_single_step_is_one_euler_step_to_the_denoised_sample():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(1)
    network = EDMNetwork(toy_denoiser)
    x = torch.randn(8, 1, 2, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 80.0

    result, _ = sample(scheduler, network, x.float())

    assert len(network.sigmas_seen) == 1
    torch.testing.assert_close(result.double(), toy_denoiser(x, 80.0), rtol=1e-5, atol=1e-5)


def test_sigma_endpoints_and_timesteps_are_c_noise():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(40)

    assert scheduler.init_noise_sigma == 80.0
    assert scheduler.sigmas[0] == pytest.approx(80.0)
    assert scheduler.sigmas[-2] == pytest.approx(0.002)
    assert scheduler.sigmas[-1] == 0.0
    evaluated = torch.cat([karras_sigmas(40)[:1], karras_sigmas(40)[1:-1].repeat_interleave(2)])
    torch.testing.assert_close(scheduler.timesteps.double(), evaluated.log() / 4, rtol=1e-6, atol=1e-6)

    scheduler = EDMHeunScheduler(final_sigmas_type="sigma_min")
    scheduler.set_timesteps(40)
    assert scheduler.sigmas[-1] == pytest.approx(0.002)


def test_scale_model_input_uses_c_in_of_the_evaluated_sigma():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(3)
    sigmas = karras_sigmas(3)
    x = torch.ones(1, 1, 1, 1)
    expected = [sigmas[0], sigmas[1], sigmas[1], sigmas[2], sigmas[2]]

    for t, sigma in zip(scheduler.timesteps, expected):
        scaled = scheduler.scale_model_input(x, t)
        assert float(scaled) == pytest.approx(1 / math.sqrt(float(sigma) ** 2 + SIGMA_DATA**2), rel=1e-6)
        scheduler.step(torch.zeros_like(x), t, x)


def test_add_noise_adds_sigma_times_noise():
    scheduler = EDMHeunScheduler()
    scheduler.set_timesteps(10)
    clean, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    index = torch.tensor([0, 5, 12])

    noisy = scheduler.add_noise(clean, noise, scheduler.timesteps[index])

    sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, clean + sigma * noise)


def test_config_round_trips_through_save_pretrained(tmp_path):
    scheduler = EDMHeunScheduler(sigma_max=40.0, rho=5.0, P_mean=-0.8, P_std=1.0)
    scheduler.save_pretrained(tmp_path)

    loaded = EDMHeunScheduler.from_pretrained(tmp_path)

    for key in ("sigma_min", "sigma_max", "sigma_data", "rho", "P_mean", "P_std", "final_sigmas_type"):
        assert loaded.config[key] == scheduler.config[key]
    loaded.set_timesteps(7)
    scheduler.set_timesteps(7)
    torch.testing.assert_close(loaded.sigmas, scheduler.sigmas)


@pytest.mark.parametrize("other_class", [EDMEulerScheduler, EDMDPMSolverMultistepScheduler])
def test_swaps_with_diffusers_edm_schedulers_through_from_config(other_class):
    heun = EDMHeunScheduler(sigma_min=0.01, sigma_max=20.0, sigma_data=0.7, rho=5.0)

    other = other_class.from_config(heun.config)
    back = EDMHeunScheduler.from_config(other.config)

    for key in ("sigma_min", "sigma_max", "sigma_data", "rho", "prediction_type", "final_sigmas_type"):
        assert other.config[key] == heun.config[key]
        assert back.config[key] == heun.config[key]
    other.set_timesteps(10)
    back.set_timesteps(10)
    assert float(other.sigmas[0]) == pytest.approx(float(back.sigmas[0]))


def test_same_loop_runs_unchanged_with_edm_euler_from_config():
    s = 1.5
    euler = EDMEulerScheduler.from_config(EDMHeunScheduler().config)
    euler.set_timesteps(40)
    network = EDMNetwork(gaussian_denoiser(s))
    noise = torch.randn(4000, 1, 1, 1, generator=torch.Generator().manual_seed(2))

    result, _ = sample(euler, network, noise * euler.init_noise_sigma)

    assert len(network.sigmas_seen) == 40
    # First order, so 40 Euler steps land within 10% of the exact solution (Heun: within 1%).
    exact = gaussian_ode_solution(noise * euler.init_noise_sigma, s, sigma_start=euler.init_noise_sigma)
    torch.testing.assert_close(result, exact, rtol=0.1, atol=1e-3)


@pytest.mark.parametrize("bad", [0, -3, 2.5, None])
def test_bad_num_inference_steps_raises(bad):
    with pytest.raises(ValueError, match="num_inference_steps"):
        EDMHeunScheduler().set_timesteps(bad)


def test_bad_training_noise_distribution_raises():
    with pytest.raises(ValueError, match="P_std"):
        EDMHeunScheduler(P_std=0.0)


@pytest.mark.parametrize("bad", [0.0, -0.5, float("nan"), float("inf")])
def test_sigma_data_must_be_finite_and_positive(bad):
    # EDM's c_skip, c_out and loss weight divide by sigma_data: 0 gives NaN losses.
    with pytest.raises(ValueError, match="sigma_data"):
        EDMHeunScheduler(sigma_data=bad)


def test_diffusers_pipeline_loader_recognises_it_as_a_scheduler():
    # DiffusionPipeline.from_pretrained resolves each component from the module named in model_index.json and checks
    # it against the loadable base classes found in that module.
    from diffusers.pipelines.pipeline_loading_utils import ALL_IMPORTABLE_CLASSES, get_class_obj_and_candidates

    class_obj, candidates = get_class_obj_and_candidates(
        EDMHeunScheduler.__module__, "EDMHeunScheduler", ALL_IMPORTABLE_CLASSES, None, False
    )

    assert class_obj is EDMHeunScheduler
    assert issubclass(class_obj, candidates["SchedulerMixin"])
