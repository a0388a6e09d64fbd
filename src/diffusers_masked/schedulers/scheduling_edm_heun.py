"""EDM's deterministic Heun sampler (Karras et al. 2022, Algorithm 1) as a diffusers scheduler."""

from __future__ import annotations

import math
from typing import Literal

import torch
from diffusers import EDMEulerScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_edm_euler import EDMEulerSchedulerOutput

# DiffusionPipeline.from_pretrained recognises a saved component as a scheduler by finding SchedulerMixin in the
# module named in model_index.json, so it must be importable from here.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401

from .masked_training import MaskedTrainingMixin


class EDMHeunScheduler(MaskedTrainingMixin, EDMEulerScheduler):
    r"""
    The deterministic second-order (Heun) sampler of EDM, Karras et al. 2022 [1], Algorithm 1, and the EDM masked
    training objective of MaskDiT through [`MaskedTrainingMixin`].

    With `N = num_inference_steps` the noise levels are
    $\sigma_i = (\sigma_{max}^{1/\rho} + \frac{i}{N-1}(\sigma_{min}^{1/\rho} - \sigma_{max}^{1/\rho}))^\rho$ for
    $i < N$ and $\sigma_N = 0$. Each step $i$ takes an Euler step from $\sigma_i$ to $\sigma_{i+1}$ and, unless it is
    the last step, corrects it with the derivative evaluated at $\sigma_{i+1}$ (the trapezoidal rule), so `N` steps
    cost `2N - 1` model evaluations.

    As diffusers' [`~diffusers.HeunDiscreteScheduler`], `timesteps` has one entry per model evaluation (the
    correction's noise level repeats the next step's: $c_{noise}(\sigma_0), c_{noise}(\sigma_1), c_{noise}(\sigma_1),
    \dots$), `step` alternates between a first-order and a second-order state, and `scale_model_input` scales by
    $c_{in}$ of the noise level being evaluated. The timesteps are EDM's $c_{noise}(\sigma) = \ln(\sigma) / 4$, which
    is what the model receives.

    The preconditioning ($c_{skip}, c_{out}, c_{in}, c_{noise}$), the sigma schedules and `add_noise` are those of
    [`~diffusers.EDMEulerScheduler`], so the two, and [`~diffusers.EDMDPMSolverMultistepScheduler`], load from each
    other's config with `from_config`.

    [1] Karras, Tero, et al. "Elucidating the Design Space of Diffusion-Based Generative Models."
    https://huggingface.co/papers/2206.00364

    Args:
        sigma_min (`float`, *optional*, defaults to 0.002):
            The smallest nonzero noise level of the sampling schedule.
        sigma_max (`float`, *optional*, defaults to 80.0):
            The noise level sampling starts from.
        sigma_data (`float`, *optional*, defaults to 0.5):
            The standard deviation of the data, used by the preconditioning and the training weight.
        sigma_schedule (`Literal["karras", "exponential"]`, *optional*, defaults to `"karras"`):
            `"karras"` is the EDM schedule above; `"exponential"` spaces the noise levels evenly in $\ln\sigma$.
        num_train_timesteps (`int`, *optional*, defaults to 1000):
            The size of the noise-level table `add_noise` looks timesteps up in before `set_timesteps` is called.
        prediction_type (`Literal["epsilon", "v_prediction"]`, *optional*, defaults to `"epsilon"`):
            The parametrisation of the network output $F$ as in diffusers' EDM schedulers: `"epsilon"` is EDM's
            $D = c_{skip} x + c_{out} F$, `"v_prediction"` flips the sign of $c_{out}$.
        rho (`float`, *optional*, defaults to 7.0):
            The exponent $\rho$ of the Karras schedule.
        final_sigmas_type (`Literal["zero", "sigma_min"]`, *optional*, defaults to `"zero"`):
            `"zero"` ends at $\sigma_N = 0$ (Algorithm 1). `"sigma_min"` ends at the last schedule level, as in
            [`~diffusers.EDMEulerScheduler`], which makes the last step a no-op.
        P_mean (`float`, *optional*, defaults to -1.2):
            *Training only*: mean of $\ln\sigma$ drawn by [`~MaskedTrainingMixin.masked_training_loss`].
        P_std (`float`, *optional*, defaults to 1.2):
            *Training only*: standard deviation of $\ln\sigma$ drawn by the training loss.
    """

    _compatibles = ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"]
    order = 2

    @register_to_config
    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        sigma_data: float = 0.5,
        sigma_schedule: Literal["karras", "exponential"] = "karras",
        num_train_timesteps: int = 1000,
        prediction_type: Literal["epsilon", "v_prediction"] = "epsilon",
        rho: float = 7.0,
        final_sigmas_type: Literal["zero", "sigma_min"] = "zero",
        P_mean: float = -1.2,
        P_std: float = 1.2,
    ) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(
                f"sigma_min and sigma_max must satisfy 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}"
            )
        if not (math.isfinite(sigma_data) and sigma_data > 0):
            # EDM's preconditioning and loss weight divide by sigma_data: 0 or less gives NaN losses.
            raise ValueError(f"sigma_data must be a finite number > 0, got {sigma_data}")
        if not math.isfinite(sigma_max):
            raise ValueError(f"sigma_max must be finite, got {sigma_max}")
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
        if not math.isfinite(P_mean):
            raise ValueError(f"P_mean must be a finite number, got {P_mean}")
        if not (math.isfinite(P_std) and P_std > 0):
            raise ValueError(f"P_std must be a finite number > 0, got {P_std}")
        super().__init__(
            sigma_min=sigma_min,
            sigma_max=sigma_max,
            sigma_data=sigma_data,
            sigma_schedule=sigma_schedule,
            num_train_timesteps=num_train_timesteps,
            prediction_type=prediction_type,
            rho=rho,
            final_sigmas_type=final_sigmas_type,
        )
        self._reset_heun_state()

    @property
    def init_noise_sigma(self) -> float:
        """The standard deviation of the initial noise, $\\sigma_0 = \\sigma_{max}$ (Algorithm 1, line 2)."""
        return float(self.config.sigma_max)

    @property
    def state_in_first_order(self) -> bool:
        """Whether the next `step` is an Euler step (`True`) or the Heun correction of the previous one."""
        return self.dt is None

    def _reset_heun_state(self) -> None:
        self.prev_derivative = None
        self.dt = None
        self.sample = None

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """
        Set the noise levels of an `num_inference_steps`-step sampling run (to be called before inference).

        Args:
            num_inference_steps (`int`):
                The number of Heun steps `N`; the run makes `2N - 1` model evaluations.
            device (`str` or `torch.device`, *optional*):
                The device `timesteps` is moved to. `sigmas` stays on the CPU.
        """
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        self.num_inference_steps = num_inference_steps

        sigmas_dtype = torch.float32 if torch.backends.mps.is_available() else torch.float64
        ramp = torch.linspace(0, 1, num_inference_steps, dtype=sigmas_dtype)
        if self.config.sigma_schedule == "karras":
            sigmas = self._compute_karras_sigmas(ramp)
        else:
            sigmas = self._compute_exponential_sigmas(ramp)
        sigmas = sigmas.to(torch.float32)
        sigma_last = torch.zeros(1) if self.config.final_sigmas_type == "zero" else sigmas[-1:]

        # One entry per model evaluation: sigma_0, then each later level twice (correction of the step arriving at
        # it, Euler step leaving it); the extra last entry is where the final step lands.
        evaluated = torch.cat([sigmas[:1], sigmas[1:].repeat_interleave(2)])
        self.sigmas = torch.cat([evaluated, sigma_last])
        self.timesteps = self.precondition_noise(evaluated).to(device=device)

        self._reset_heun_state()
        self._step_index = None
        self._begin_index = None

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> EDMEulerSchedulerOutput | tuple:
        """
        Advance the sampler by one model evaluation: an Euler step in the first-order state, the Heun correction of
        that step in the second-order state.

        Args:
            model_output (`torch.Tensor`):
                The network output $F$ at the noise level being evaluated (the input having gone through
                `scale_model_input`).
            timestep (`float` or `torch.Tensor`):
                The current entry of `timesteps`.
            sample (`torch.Tensor`):
                The current sample: $x_i$ in the first-order state, the Euler prediction of $x_{i+1}$ in the second.
            return_dict (`bool`, *optional*, defaults to `True`):
                Whether to return an [`~diffusers.schedulers.scheduling_edm_euler.EDMEulerSchedulerOutput`] or a
                tuple.

        Returns:
            [`~diffusers.schedulers.scheduling_edm_euler.EDMEulerSchedulerOutput`] or `tuple`: `prev_sample` (the
            Euler prediction of $x_{i+1}$ after a first-order step, the corrected $x_{i+1}$ after a second-order one)
            and `pred_original_sample`, the denoised $D$ at the evaluated noise level.
        """
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError(
                "Passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to `EDMHeunScheduler.step()` "
                "is not supported. Pass one of `scheduler.timesteps` as the timestep."
            )
        if self.step_index is None:
            self._init_step_index(timestep)

        sample = sample.to(torch.float32)
        sigma = self.sigmas[self.step_index]
        denoised = self.precondition_outputs(sample, model_output.to(torch.float32), sigma)
        derivative = (sample - denoised) / sigma

        if self.state_in_first_order:
            dt = self.sigmas[self.step_index + 1] - sigma
            prev_sample = sample + derivative * dt
            if self.step_index + 1 < len(self.timesteps):
                # A correction evaluation at sigma_{i+1} follows; the last step (to sigma_N) has none.
                self.prev_derivative = derivative
                self.dt = dt
                self.sample = sample
        else:
            prev_sample = self.sample + (self.prev_derivative + derivative) / 2 * self.dt
            self._reset_heun_state()

        prev_sample = prev_sample.to(model_output.dtype)
        self._step_index += 1

        if not return_dict:
            return (prev_sample, denoised)
        return EDMEulerSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
