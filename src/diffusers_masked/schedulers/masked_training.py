"""Masked training objectives that live on the diffusers scheduler used for sampling.

[`MaskedTrainingMixin`] adds one method, `masked_training_loss`, to a diffusers scheduler. The scheduler already
owns the noise schedule and the preconditioning, so a model trained through it and sampled with it cannot disagree
about them, and the training hyper-parameters that belong to the schedule (EDM's `P_mean`, `P_std`,
`sigma_data`; DDPM's betas) are saved in `scheduler_config.json` with the pipeline.

Two objectives, chosen by the scheduler class the mixin sits on (see [`MaskedTrainingMixin`]):

* **EDM** (MaskDiT, Zheng et al. 2023): denoising score matching with EDM preconditioning (Karras et al. 2022) on
  the *visible* tokens, plus `mae_loss_weight` times an MAE reconstruction loss on the *removed* tokens.
* **DDPM** (MaskDM, Lei et al. 2023): the noise-prediction MSE of Ho et al. 2020 on the visible tokens, with the
  same optional MAE term.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    EDMDPMSolverMultistepScheduler,
    EDMEulerScheduler,
)

# DiffusionPipeline.from_pretrained recognises a saved component as a scheduler by finding SchedulerMixin in the
# module named in model_index.json, so it must be importable from here.
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..masking import check_mask, num_masked_tokens, patchify, random_mask
from ..routing import draw_route_ids, parse_routes, routing_active, unwrap_model

# The EDM paper's training noise distribution ln(sigma) ~ N(P_mean, P_std^2), used when the scheduler's config does
# not carry its own (e.g. the mixin on diffusers' EDMDPMSolverMultistepScheduler).
EDM_P_MEAN = -1.2
EDM_P_STD = 1.2

# Schedulers whose `precondition_inputs/noise/outputs` define EDM's c_in, c_noise, c_skip and c_out.
EDM_SCHEDULERS = (EDMEulerScheduler, EDMDPMSolverMultistepScheduler)
# Schedulers whose `add_noise` is the variance-preserving q(x_t | x_0) at integer training steps.
DDPM_SCHEDULERS = (DDPMScheduler, DDIMScheduler)

# Added to the per-patch variance when normalising the MAE target, as in MAE and MaskDiT.
MAE_NORM_EPS = 1e-6


@dataclass
class MaskedTrainingOutput(BaseOutput):
    """
    Output of [`MaskedTrainingMixin.masked_training_loss`].

    Args:
        loss (`torch.Tensor` of shape `()`):
            The training loss `dsm_loss + mae_loss_weight * mae_loss`, in float32, with its graph to the model.
        dsm_loss (`torch.Tensor` of shape `()`):
            The denoising term alone (EDM-weighted for EDM, the plain MSE for DDPM), averaged over visible tokens;
            detached, for logging.
        mae_loss (`torch.Tensor` of shape `()`):
            The MAE reconstruction term alone, averaged over removed tokens; detached, for logging. Zero when
            `mae_loss_weight` is 0 or no token is removed.
        mask (`torch.BoolTensor` of shape `(batch, num_tokens)`):
            The token mask used (`True` = removed); all `False` when nothing was removed.
    """

    loss: torch.Tensor
    dsm_loss: torch.Tensor
    mae_loss: torch.Tensor
    mask: torch.Tensor


class MaskedTrainingMixin:
    r"""
    Mixin that lets a diffusers scheduler train a model on masked token sets.

    The objective follows from the scheduler class the mixin is combined with:

    - **EDM** for [`~diffusers.EDMEulerScheduler`] and [`~diffusers.EDMDPMSolverMultistepScheduler`] and their
      subclasses (such as [`EDMHeunScheduler`]). With the scheduler's `sigma_data` ($\sigma_d$) and, from its config
      or else the EDM paper's values, `P_mean` and `P_std`:

      $\ln\sigma \sim \mathcal{N}(P_{mean}, P_{std}^2)$ per sample, $n = \sigma\,\epsilon$, and
      $D = c_{skip}(\sigma)(y+n) + c_{out}(\sigma)\,F(c_{in}(\sigma)(y+n), c_{noise}(\sigma))$ through the
      scheduler's `precondition_inputs`, `precondition_noise` and `precondition_outputs`. The denoising loss is
      $\lambda(\sigma)\,(D - y)^2$ with $\lambda(\sigma) = (\sigma^2+\sigma_d^2)/(\sigma\sigma_d)^2$.
    - **DDPM** for [`~diffusers.DDPMScheduler`] and [`~diffusers.DDIMScheduler`] and their subclasses (such as
      [`MaskedDDPMScheduler`]): $t \sim \mathcal{U}\{0, \dots, T-1\}$, $x_t$ from `add_noise`, the model sees
      $(x_t, t)$ and its output is compared, unweighted, with the target of the scheduler's `prediction_type`:
      $\epsilon$ (`"epsilon"`), the velocity from `get_velocity` (`"v_prediction"`) or $x_0$ (`"sample"`).

    Reductions, the same for both: the squared error is averaged over the `patch_size**2 * channels` values of each
    token (in [`~diffusers_masked.patchify`] order), then over the *visible* tokens of each sample, then over the
    batch. If `mae_loss_weight > 0` and tokens are removed, the MAE term compares the model's prediction (EDM: $D$;
    DDPM: the raw output) on the *removed* tokens with the *noisy* model input ($y+n$, or $x_t$) normalised per
    patch, `(t - mean) / sqrt(var + 1e-6)` with the mean and unbiased variance over the token's values as in MAE;
    it is averaged per token, over the removed tokens of each sample, then over the batch, and has no EDM weight.

    Random draws, in this order, all from `generator` when one is given (on the generator's device):

    1. the mask, only if `mask` is `None` and `mask_ratio > 0`: `random_mask(batch, num_tokens, mask_ratio,
       generator)`, i.e. `torch.rand(batch, num_tokens)`;
    2. the noise level: EDM `torch.randn(batch)` (float32), giving `sigma = exp(P_mean + P_std * z)`; DDPM
       `torch.randint(0, num_train_timesteps, (batch,))`;
    3. the noise: `torch.randn(clean_samples.shape)` (float32);
    4. only with `routes` and a model in train mode with gradients enabled: for each route, the kept tokens'
       `torch.rand(batch, num_visible_tokens)` ([`~diffusers_masked.routing.draw_route_ids`]).

    So adding routes to a seeded run changes no earlier draw.

    Noise levels, weights and the reductions are computed in float32 with autocast disabled; only the model call
    runs under the caller's autocast, so bf16/fp16 training does not overflow the EDM weight.
    """

    def masked_training_loss(
        self,
        model: torch.nn.Module,
        clean_samples: torch.Tensor,
        class_labels: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        mask_ratio: float = 0.0,
        mae_loss_weight: float = 0.0,
        generator: torch.Generator | None = None,
        num_masked: int | None = None,
        routes=None,
        model_kwargs: dict | None = None,
    ) -> MaskedTrainingOutput:
        r"""
        Compute the masked training loss of `model` on a batch of clean samples.

        Args:
            model (`torch.nn.Module`):
                A denoiser called as `model(sample, timestep=..., class_labels=..., mask=..., **model_kwargs)`
                (labels only when given; with a mask, also `num_masked=`, the mask's count of removed tokens per
                sample; no mask argument without one) returning an output with
                `.sample` of the input's shape, and with `model.config.patch_size` (a `DistributedDataParallel`
                wrapper is looked through). For EDM it is the raw network $F$; for DDPM it predicts the target of
                `prediction_type`.
            clean_samples (`torch.Tensor` of shape `(batch, channels, height, width)`):
                The data $y$ (or $x_0$): images or latents, already scaled (EDM expects standard deviation about
                `sigma_data`). Height and width must be multiples of the patch size.
            class_labels (`torch.LongTensor` of shape `(batch,)`, *optional*):
                Class ids passed to the model unchanged; apply [`drop_class_labels`] first for classifier-free
                guidance training.
            mask (`torch.BoolTensor` of shape `(batch, num_tokens)`, *optional*):
                Token mask (`True` = removed), the same removed count in every sample. If `None`, a uniform random
                mask at `mask_ratio` is drawn on the model's token grid `(height / p) x (width / p)`.
            mask_ratio (`float`, defaults to 0.0):
                Fraction of tokens to remove, in `[0, 1)`, used only when `mask` is `None`. Must be 0 when a `mask`
                is given.
            mae_loss_weight (`float`, defaults to 0.0):
                Weight $\lambda$ of the MAE term in `loss = dsm_loss + mae_loss_weight * mae_loss` (MaskDiT uses 0.1).
            generator (`torch.Generator`, *optional*):
                Source of every random draw, in the order documented on [`MaskedTrainingMixin`].
            num_masked (`int`, *optional*):
                The count of removed tokens per sample of a given `mask`, when the caller knows it (e.g.
                [`~diffusers_masked.masking.generated_mask_count`]). With it, or with a mask drawn here, neither
                this call nor the model's forward reads a tensor value, so the step never makes the host wait for
                the device; without it the mask's counts are read and checked once.
            routes (*optional*):
                Token routing (TREAD) for a model that takes `routes=` and `route_ids=` in its forward (ours), in
                any form [`~diffusers_masked.routing.parse_routes`] takes; the ids are drawn here, after the noise,
                among the visible tokens. The loss is unchanged: every visible token's output counts. For diffusers'
                own `DiTTransformer2DModel` / `PixArtTransformer2DModel`, wrap forward and backward in
                [`~diffusers_masked.routing.token_routing`] instead.
            model_kwargs (`dict`, *optional*):
                More conditioning passed to every model call unchanged, e.g. a text-conditioned model's
                `encoder_hidden_states` and `encoder_attention_mask` (with caption dropout applied by the caller), or
                PixArt's `added_cond_kwargs`.

        Returns:
            [`MaskedTrainingOutput`]: the loss (with gradient), its detached parts and the mask used.
        """
        objective = self._masked_training_objective()
        batch_size, _, height, width = _check_clean_samples(clean_samples)
        patch_size = _model_patch_size(model)
        if height % patch_size or width % patch_size:
            raise ValueError(
                f"clean_samples height and width ({height}x{width}) must be multiples of the model's "
                f"patch_size={patch_size}"
            )
        num_tokens = (height // patch_size) * (width // patch_size)
        mask_ratio = _check_mask_ratio(mask_ratio)
        mae_loss_weight = _check_mae_loss_weight(mae_loss_weight)
        if class_labels is not None and (
            not isinstance(class_labels, torch.Tensor) or tuple(class_labels.shape) != (batch_size,)
        ):
            raise ValueError(
                f"class_labels must be a tensor of shape ({batch_size},), got "
                f"{tuple(class_labels.shape) if isinstance(class_labels, torch.Tensor) else type(class_labels)}"
            )

        routes = parse_routes(routes)
        if routes and not _takes_routes(model):
            raise TypeError(
                f"routes= needs a model whose forward takes routes= and route_ids= (MaskedDiTTransformer2DModel, "
                f"MaskedUViTTransformer2DModel); for {type(unwrap_model(model)).__name__}, wrap forward and backward "
                "in diffusers_masked.routing.token_routing(model, routes, generator) instead"
            )

        device = clean_samples.device
        if mask is not None:
            if mask_ratio > 0:
                raise ValueError(f"pass either mask or mask_ratio, not both (got a mask and mask_ratio={mask_ratio})")
            num_removed = check_mask(mask, batch_size, num_tokens, num_masked)
            mask = mask.to(device)
        elif mask_ratio > 0:
            mask = random_mask(batch_size, num_tokens, mask_ratio, generator=generator, device=device)
            num_removed = num_masked_tokens(num_tokens, mask_ratio)
        else:
            mask = torch.zeros(batch_size, num_tokens, dtype=torch.bool, device=device)
            num_removed = 0
        # Without removed tokens the model gets no mask, so it takes its plain unmasked path.
        model_mask = mask if num_removed > 0 else None

        with torch.autocast(device.type, enabled=False):
            if objective == "edm":
                y = clean_samples.float()
                sigma = self._draw_edm_sigma(batch_size, generator, device).view(-1, 1, 1, 1)  # [B, 1, 1, 1]
                n = randn_tensor(y.shape, generator=generator, device=device, dtype=torch.float32) * sigma
                noisy = y_n = y + n
                model_input = self.precondition_inputs(y_n, sigma)
                timestep = self.precondition_noise(sigma.flatten())  # c_noise, [B]
            else:
                x_0 = clean_samples.float()
                timestep = self._draw_ddpm_timesteps(batch_size, generator, device)  # [B]
                noise = randn_tensor(x_0.shape, generator=generator, device=device, dtype=torch.float32)
                x_t = self.add_noise(x_0, noise, timestep)
                noisy = model_input = x_t
                target = self._ddpm_target(x_0, noise, timestep)

        if class_labels is not None:
            class_labels = class_labels.to(device)
        # The model sees its input in the data's dtype (float32 unless the caller trains in pure half precision).
        model_input = model_input.to(clean_samples.dtype)
        # With a mask the model also gets its count, so that it need not read the mask to size its token gather.
        # Without one it gets no mask argument at all: diffusers' own transformers take none.
        extra_kwargs = {"mask": model_mask, "num_masked": num_removed} if model_mask is not None else {}
        if routes and routing_active(unwrap_model(model)):
            route_ids = draw_route_ids(routes, batch_size, num_tokens - num_removed, generator, device)
            extra_kwargs.update(routes=routes, route_ids=route_ids)
        if class_labels is not None:
            extra_kwargs["class_labels"] = class_labels
        # Keywords only: diffusers' PixArt takes the text as its second positional argument.
        model_output = model(model_input, timestep=timestep, **(model_kwargs or {}), **extra_kwargs).sample
        if tuple(model_output.shape) != tuple(clean_samples.shape):
            raise ValueError(
                f"the model's output has shape {tuple(model_output.shape)} but clean_samples has "
                f"{tuple(clean_samples.shape)}; the objective needs out_channels == in_channels"
            )

        with torch.autocast(device.type, enabled=False):
            model_output = model_output.float()
            if objective == "edm":
                sigma_data = self.config.sigma_data
                D_yn = prediction = self.precondition_outputs(y_n, model_output, sigma)
                weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2
                squared_error = weight * (D_yn - y) ** 2
            else:
                prediction = model_output
                squared_error = (prediction - target) ** 2

            visible = (~mask).float()
            dsm_per_token = patchify(squared_error, patch_size).mean(dim=-1)  # [B, N]
            dsm_loss = ((dsm_per_token * visible).sum(dim=1) / visible.sum(dim=1)).mean()
            if mae_loss_weight > 0 and num_removed > 0:
                removed = mask.float()
                mae_target = _normalize_patches(patchify(noisy, patch_size))  # [B, N, p*p*C]
                mae_per_token = (patchify(prediction, patch_size) - mae_target).pow(2).mean(dim=-1)  # [B, N]
                mae_loss = ((mae_per_token * removed).sum(dim=1) / removed.sum(dim=1)).mean()
                loss = dsm_loss + mae_loss_weight * mae_loss
            else:
                mae_loss = torch.zeros((), device=device)
                loss = dsm_loss
        return MaskedTrainingOutput(loss=loss, dsm_loss=dsm_loss.detach(), mae_loss=mae_loss.detach(), mask=mask)

    def _masked_training_objective(self) -> str:
        if isinstance(self, EDM_SCHEDULERS):
            return "edm"
        if isinstance(self, DDPM_SCHEDULERS):
            return "ddpm"
        supported = ", ".join(cls.__name__ for cls in EDM_SCHEDULERS + DDPM_SCHEDULERS)
        raise TypeError(
            f"MaskedTrainingMixin supports EDM and DDPM schedulers ({supported} and their subclasses), "
            f"got {type(self).__name__}"
        )

    def _draw_edm_sigma(self, batch_size: int, generator: torch.Generator | None, device) -> torch.Tensor:
        P_mean = getattr(self.config, "P_mean", EDM_P_MEAN)
        P_std = getattr(self.config, "P_std", EDM_P_STD)
        rnd_normal = randn_tensor((batch_size,), generator=generator, device=device, dtype=torch.float32)
        return (P_mean + P_std * rnd_normal).exp()

    def _draw_ddpm_timesteps(self, batch_size: int, generator: torch.Generator | None, device) -> torch.Tensor:
        rand_device = generator.device if generator is not None else device
        num_train_timesteps = self.config.num_train_timesteps
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator, device=rand_device).to(device)

    def _ddpm_target(self, x_0, noise, timesteps) -> torch.Tensor:
        prediction_type = self.config.prediction_type
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "v_prediction":
            return self.get_velocity(x_0, noise, timesteps)
        if prediction_type == "sample":
            return x_0
        raise ValueError(
            f"masked training supports prediction_type 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}"
        )


class MaskedDDPMScheduler(MaskedTrainingMixin, DDPMScheduler):
    r"""
    [`~diffusers.DDPMScheduler`] with [`MaskedTrainingMixin`]: the MaskDM training objective (noise-prediction MSE on
    visible tokens) on the DDPM noise schedule. It adds no configuration; sampling is plain DDPM, and DDIM or
    DPM-Solver can be swapped in with `from_config` for inference.
    """


def drop_class_labels(
    class_labels: torch.Tensor,
    num_classes: int,
    dropout_prob: float,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """
    Replace each class label by the null class id `num_classes` with probability `dropout_prob`, for classifier-free
    guidance training.

    Args:
        class_labels (`torch.LongTensor` of shape `(batch,)`):
            Class ids in `[0, num_classes]`. Their values are not read (this runs at every training step, where a
            read would make the host wait for the device); the data's labels are the caller's to check once.
        num_classes (`int`):
            The number of real classes; `num_classes` itself is the null ("unconditional") id.
        dropout_prob (`float`):
            Probability, in `[0, 1]`, that a sample's label is dropped. Drawn once per sample.
        generator (`torch.Generator`, *optional*):
            Source of the `torch.rand(batch)` draw that decides the drops (`< dropout_prob` drops).

    Returns:
        `torch.LongTensor` of shape `(batch,)`: a new tensor; the input is not modified.
    """
    if isinstance(dropout_prob, bool) or not isinstance(dropout_prob, (int, float)) or not 0 <= dropout_prob <= 1:
        raise ValueError(f"dropout_prob must be a probability in [0, 1], got {dropout_prob!r}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
    if not isinstance(class_labels, torch.Tensor) or class_labels.ndim != 1 or class_labels.is_floating_point():
        raise ValueError(
            "class_labels must be a 1-D integer tensor of shape (batch,), got "
            f"{class_labels.dtype if isinstance(class_labels, torch.Tensor) else type(class_labels)} "
            f"{tuple(class_labels.shape) if isinstance(class_labels, torch.Tensor) else ''}"
        )
    rand_device = generator.device if generator is not None else class_labels.device
    drop = torch.rand(class_labels.shape[0], generator=generator, device=rand_device).to(class_labels.device)
    return torch.where(drop < dropout_prob, torch.full_like(class_labels, num_classes), class_labels)


def _normalize_patches(tokens: torch.Tensor) -> torch.Tensor:
    mean = tokens.mean(dim=-1, keepdim=True)
    var = tokens.var(dim=-1, keepdim=True)
    return (tokens - mean) / (var + MAE_NORM_EPS) ** 0.5


def _check_clean_samples(clean_samples) -> tuple[int, int, int, int]:
    if not isinstance(clean_samples, torch.Tensor) or clean_samples.ndim != 4 or not clean_samples.is_floating_point():
        raise ValueError(
            "clean_samples must be a float tensor of shape (batch, channels, height, width), got "
            f"{clean_samples.dtype if isinstance(clean_samples, torch.Tensor) else type(clean_samples)} "
            f"{tuple(clean_samples.shape) if isinstance(clean_samples, torch.Tensor) else ''}"
        )
    if clean_samples.shape[0] < 1:
        raise ValueError("clean_samples must hold at least one sample")
    return tuple(clean_samples.shape)


def _check_mask_ratio(mask_ratio) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0 <= mask_ratio < 1:
        raise ValueError(f"mask_ratio must be a number in [0, 1), got {mask_ratio!r}")
    return float(mask_ratio)


def _check_mae_loss_weight(mae_loss_weight) -> float:
    if (
        isinstance(mae_loss_weight, bool)
        or not isinstance(mae_loss_weight, (int, float))
        or not math.isfinite(mae_loss_weight)
        or mae_loss_weight < 0
    ):
        raise ValueError(f"mae_loss_weight must be a finite number >= 0, got {mae_loss_weight!r}")
    return float(mae_loss_weight)


def _takes_routes(model) -> bool:
    parameters = inspect.signature(unwrap_model(model).forward).parameters
    return "routes" in parameters and "route_ids" in parameters


def _model_patch_size(model) -> int:
    config = getattr(unwrap_model(model), "config", None)
    patch_size = getattr(config, "patch_size", None)
    if not isinstance(patch_size, int) or patch_size < 1:
        raise TypeError(
            f"model must have a config with a positive int patch_size (its token grid), got {type(model).__name__} "
            f"with patch_size={patch_size!r}"
        )
    return patch_size
