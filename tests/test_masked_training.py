"""MaskedTrainingMixin against the MaskDiT (EDM) and MaskDM (DDPM) objectives, recomputed here in float64.

The references redraw the mixin's random numbers by seeding a generator identically and drawing in the documented
order (mask, noise level, noise), and reduce over tokens with avg_pool2d / unfold rather than the package's patchify.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import EDMEulerScheduler, EulerDiscreteScheduler

from diffusers_masked import (
    EDMHeunScheduler,
    MaskedDDPMScheduler,
    MaskedTrainingMixin,
    drop_class_labels,
    random_mask,
)
from tests.tiny import tiny_transformer

PATCH = 2
BATCH, CHANNELS, SIZE = 4, 3, 8
NUM_TOKENS = (SIZE // PATCH) ** 2
NUM_CLASSES = 10


def tiny_model(seed=0):
    """The real MaskDiT model, with parameters re-drawn so that the zero-initialised output layers do not make every
    prediction zero."""
    return tiny_transformer(
        seed=seed, sample_size=SIZE, patch_size=PATCH, in_channels=CHANNELS, num_classes=NUM_CLASSES
    ).train()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(123)
    clean = torch.randn(BATCH, CHANNELS, SIZE, SIZE, generator=generator) * 0.5
    labels = torch.randint(0, NUM_CLASSES + 1, (BATCH,), generator=generator)
    return clean, labels


class OutputPerturbation(torch.nn.Module):
    """Wraps a model and adds `amount` to its output on the tokens selected by `tokens` (B, N)."""

    def __init__(self, model, tokens, amount=5.0):
        super().__init__()
        self.model, self.tokens, self.amount = model, tokens, amount
        self.config = model.config

    def forward(self, *args, **kwargs):
        output = self.model(*args, **kwargs)
        grid = SIZE // PATCH
        pixels = self.tokens.view(-1, 1, grid, grid).float().repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
        output.sample = output.sample + self.amount * pixels
        return output


def per_token_mean(values):
    """(B, C, H, W) -> (B, N): mean over each patch's channels and pixels, row-major token order."""
    return F.avg_pool2d(values.mean(dim=1, keepdim=True), PATCH).flatten(1)


def tokens_of(images):
    """(B, C, H, W) -> (B, N, C*p*p): each token's values (their order within a token is irrelevant here)."""
    return F.unfold(images, kernel_size=PATCH, stride=PATCH).transpose(1, 2)


def masked_average(per_token, selected):
    selected = selected.double()
    return ((per_token * selected).sum(dim=1) / selected.sum(dim=1)).mean()


def mae_reference(noisy, prediction, removed):
    target = tokens_of(noisy)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
    per_token = (tokens_of(prediction) - target).pow(2).mean(-1)
    return masked_average(per_token, removed)


def edm_reference(
    model, clean, labels, seed, mask=None, mask_ratio=0.0, mae_loss_weight=0.0, P_mean=-1.2, P_std=1.2, sigma_data=0.5
):
    """MaskDiT's loss from the formulas, float64 (the network itself runs in float32)."""
    generator = torch.Generator().manual_seed(seed)
    if mask is None:
        mask = (
            random_mask(BATCH, NUM_TOKENS, mask_ratio, generator=generator)
            if mask_ratio > 0
            else torch.zeros(BATCH, NUM_TOKENS, dtype=torch.bool)
        )
    rnd_normal = torch.randn(BATCH, generator=generator).double()
    epsilon = torch.randn(clean.shape, generator=generator).double()

    sigma = (P_mean + P_std * rnd_normal).exp().view(-1, 1, 1, 1)
    y = clean.double()
    y_n = y + sigma * epsilon
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log().flatten() / 4
    with torch.no_grad():
        F_x = model((c_in * y_n).float(), c_noise.float(), class_labels=labels, mask=mask if mask.any() else None)
    D_yn = c_skip * y_n + c_out * F_x.sample.double()
    weight = (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2

    dsm = masked_average(per_token_mean(weight * (D_yn - y) ** 2), ~mask)
    mae = mae_reference(y_n, D_yn, mask) if mask.any() and mae_loss_weight > 0 else torch.tensor(0.0).double()
    return dsm, mae, dsm + mae_loss_weight * mae


def alphas_cumprod_reference(beta_schedule, num_steps=1000):
    if beta_schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, num_steps, dtype=torch.float64)
    else:  # squaredcos_cap_v2, Nichol & Dhariwal 2021

        def alpha_bar(t):
            return math.cos((t / num_steps + 0.008) / 1.008 * math.pi / 2) ** 2

        betas = torch.tensor(
            [min(1 - alpha_bar(i + 1) / alpha_bar(i), 0.999) for i in range(num_steps)], dtype=torch.float64
        )
    return torch.cumprod(1 - betas, dim=0)


def ddpm_reference(
    model, clean, labels, seed, beta_schedule, prediction_type="epsilon", mask_ratio=0.0, mae_loss_weight=0.0
):
    """MaskDM's loss from the formulas, float64 (the network itself runs in float32)."""
    generator = torch.Generator().manual_seed(seed)
    mask = random_mask(BATCH, NUM_TOKENS, mask_ratio, generator=generator)
    timesteps = torch.randint(0, 1000, (BATCH,), generator=generator)
    epsilon = torch.randn(clean.shape, generator=generator).double()

    alpha_bar = alphas_cumprod_reference(beta_schedule)[timesteps].view(-1, 1, 1, 1)
    x_0 = clean.double()
    x_t = alpha_bar.sqrt() * x_0 + (1 - alpha_bar).sqrt() * epsilon
    with torch.no_grad():
        output = model(x_t.float(), timesteps, class_labels=labels, mask=mask).sample.double()
    target = epsilon if prediction_type == "epsilon" else alpha_bar.sqrt() * epsilon - (1 - alpha_bar).sqrt() * x_0

    dsm = masked_average(per_token_mean((output - target) ** 2), ~mask)
    mae = mae_reference(x_t, output, mask) if mae_loss_weight > 0 else torch.tensor(0.0).double()
    return dsm, mae, dsm + mae_loss_weight * mae


def assert_close_scalar(actual, expected, rtol=1e-4):
    assert float(actual.detach()) == pytest.approx(float(expected.detach()), rel=rtol, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# EDM flavour (MaskDiT)
# ---------------------------------------------------------------------------------------------------------------


def test_edm_loss_matches_float64_reference(model, batch):
    clean, labels = batch
    scheduler = EDMHeunScheduler()

    output = scheduler.masked_training_loss(
        model, clean, labels, mask_ratio=0.5, mae_loss_weight=0.1, generator=torch.Generator().manual_seed(7)
    )

    dsm, mae, loss = edm_reference(model, clean, labels, seed=7, mask_ratio=0.5, mae_loss_weight=0.1)
    assert int(output.mask.sum()) == BATCH * NUM_TOKENS // 2
    assert_close_scalar(output.dsm_loss, dsm)
    assert_close_scalar(output.mae_loss, mae)
    assert_close_scalar(output.loss, loss)
    assert float(mae) > 0


def test_edm_loss_uses_the_schedulers_training_config(model, batch):
    clean, labels = batch
    scheduler = EDMHeunScheduler(P_mean=0.3, P_std=0.5, sigma_data=1.0)

    output = scheduler.masked_training_loss(
        model, clean, labels, mask_ratio=0.25, generator=torch.Generator().manual_seed(3)
    )

    _, _, loss = edm_reference(model, clean, labels, seed=3, mask_ratio=0.25, P_mean=0.3, P_std=0.5, sigma_data=1.0)
    assert_close_scalar(output.loss, loss)


def test_edm_loss_with_a_given_mask(model, batch):
    clean, labels = batch
    mask = torch.zeros(BATCH, NUM_TOKENS, dtype=torch.bool)
    mask[:, ::4] = True

    output = EDMHeunScheduler().masked_training_loss(
        model, clean, labels, mask=mask, mae_loss_weight=0.5, generator=torch.Generator().manual_seed(11)
    )

    _, _, loss = edm_reference(model, clean, labels, seed=11, mask=mask, mae_loss_weight=0.5)
    assert torch.equal(output.mask, mask)
    assert_close_scalar(output.loss, loss)


def test_mask_ratio_zero_is_the_plain_edm_loss(model, batch):
    clean, labels = batch
    generator = torch.Generator().manual_seed(5)

    output = EDMHeunScheduler().masked_training_loss(model, clean, labels, mae_loss_weight=0.1, generator=generator)

    # The plain EDM loss (Karras et al. 2022, eq. 8): the weighted error averaged over every value.
    generator = torch.Generator().manual_seed(5)
    sigma = (-1.2 + 1.2 * torch.randn(BATCH, generator=generator).double()).exp().view(-1, 1, 1, 1)
    y = clean.double()
    y_n = y + sigma * torch.randn(clean.shape, generator=generator).double()
    norm = (sigma**2 + 0.25).sqrt()
    with torch.no_grad():
        F_x = model((y_n / norm).float(), (sigma.log() / 4).flatten().float(), class_labels=labels).sample.double()
    D_yn = 0.25 / norm**2 * y_n + sigma * 0.5 / norm * F_x
    plain = ((sigma**2 + 0.25) / (sigma * 0.5) ** 2 * (D_yn - y) ** 2).mean()

    assert not output.mask.any()
    assert float(output.mae_loss) == 0.0
    assert_close_scalar(output.loss, plain)


def test_removed_tokens_do_not_enter_the_denoising_loss(model, batch):
    clean, labels = batch
    mask = random_mask(BATCH, NUM_TOKENS, 0.5, generator=torch.Generator().manual_seed(0))
    scheduler = EDMHeunScheduler()

    def loss(network, samples):
        return scheduler.masked_training_loss(
            network, samples, labels, mask=mask, mae_loss_weight=0.1, generator=torch.Generator().manual_seed(1)
        )

    base = loss(model, clean)
    on_removed = loss(OutputPerturbation(model, mask), clean)
    on_visible = loss(OutputPerturbation(model, ~mask), clean)
    removed_pixels = mask.view(BATCH, 1, 4, 4).repeat_interleave(PATCH, 2).repeat_interleave(PATCH, 3)
    with torch.no_grad():
        inputs_changed = loss(model, clean + 3.0 * removed_pixels)

    assert_close_scalar(on_removed.dsm_loss, base.dsm_loss, rtol=1e-6)
    assert float(on_removed.mae_loss) != pytest.approx(float(base.mae_loss), rel=1e-3)
    assert_close_scalar(on_visible.mae_loss, base.mae_loss, rtol=1e-6)
    assert float(on_visible.dsm_loss) != pytest.approx(float(base.dsm_loss), rel=1e-3)
    # The encoder never sees removed tokens, so their clean values cannot reach the visible tokens' loss.
    assert_close_scalar(inputs_changed.dsm_loss, base.dsm_loss, rtol=1e-5)


@pytest.mark.parametrize("P_mean", [-12.0, 12.0])
def test_loss_is_finite_at_extreme_noise_levels(batch, P_mean):
    # At sigma ~ exp(+-12) the loss amplifies float32 rounding by up to ~exp(24), so only finiteness is specified here;
    # the value is checked against float64 references at the paper's noise levels in the tests above.
    clean, labels = batch
    scheduler = EDMHeunScheduler(P_mean=P_mean)
    trainable = tiny_model()

    output = scheduler.masked_training_loss(
        trainable, clean, labels, mask_ratio=0.5, mae_loss_weight=0.1, generator=torch.Generator().manual_seed(2)
    )
    output.loss.backward()

    assert torch.isfinite(output.loss)
    assert all(torch.isfinite(p.grad).all() for p in trainable.parameters() if p.grad is not None)


def test_loss_carries_gradient_and_parts_are_detached(batch):
    clean, labels = batch
    trainable = tiny_model()

    output = EDMHeunScheduler().masked_training_loss(trainable, clean, labels, mask_ratio=0.5, mae_loss_weight=0.1)
    output.loss.backward()

    assert output.loss.requires_grad and output.loss.ndim == 0
    assert not output.dsm_loss.requires_grad and not output.mae_loss.requires_grad
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.parameters())


def test_bf16_autocast_gives_a_finite_float32_loss_close_to_float32(model, batch):
    clean, labels = batch

    def loss():
        return EDMHeunScheduler().masked_training_loss(
            model, clean, labels, mask_ratio=0.5, mae_loss_weight=0.1, generator=torch.Generator().manual_seed(4)
        )

    reference = loss()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = loss()

    assert mixed.loss.dtype == torch.float32
    assert torch.isfinite(mixed.loss)
    assert_close_scalar(mixed.loss, reference.loss, rtol=0.05)


def test_mixin_on_diffusers_edm_euler_uses_the_paper_noise_distribution(model, batch):
    class MaskedEDMEulerScheduler(MaskedTrainingMixin, EDMEulerScheduler):
        pass

    clean, labels = batch

    output = MaskedEDMEulerScheduler().masked_training_loss(
        model, clean, labels, mask_ratio=0.5, generator=torch.Generator().manual_seed(9)
    )

    _, _, loss = edm_reference(model, clean, labels, seed=9, mask_ratio=0.5)
    assert_close_scalar(output.loss, loss)


# ---------------------------------------------------------------------------------------------------------------
# DDPM flavour (MaskDM)
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta_schedule", ["linear", "squaredcos_cap_v2"])
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddpm_loss_matches_float64_reference(model, batch, beta_schedule, prediction_type):
    clean, labels = batch
    scheduler = MaskedDDPMScheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)

    output = scheduler.masked_training_loss(
        model, clean, labels, mask_ratio=0.5, mae_loss_weight=0.2, generator=torch.Generator().manual_seed(8)
    )

    dsm, mae, loss = ddpm_reference(
        model, clean, labels, 8, beta_schedule, prediction_type, mask_ratio=0.5, mae_loss_weight=0.2
    )
    assert_close_scalar(output.dsm_loss, dsm)
    assert_close_scalar(output.mae_loss, mae)
    assert_close_scalar(output.loss, loss)


def test_ddpm_loss_has_no_mae_term_by_default(model, batch):
    clean, labels = batch

    output = MaskedDDPMScheduler().masked_training_loss(
        model, clean, labels, mask_ratio=0.75, generator=torch.Generator().manual_seed(6)
    )

    dsm, _, _ = ddpm_reference(model, clean, labels, 6, "linear", mask_ratio=0.75)
    assert float(output.mae_loss) == 0.0
    assert_close_scalar(output.loss, dsm)


def test_ddpm_removed_tokens_do_not_enter_the_noise_prediction_loss(model, batch):
    clean, labels = batch
    mask = random_mask(BATCH, NUM_TOKENS, 0.5, generator=torch.Generator().manual_seed(0))
    scheduler = MaskedDDPMScheduler(beta_schedule="squaredcos_cap_v2")

    def loss(network):
        return scheduler.masked_training_loss(
            network, clean, labels, mask=mask, generator=torch.Generator().manual_seed(1)
        )

    assert_close_scalar(loss(OutputPerturbation(model, mask)).dsm_loss, loss(model).dsm_loss, rtol=1e-6)
    assert float(loss(OutputPerturbation(model, ~mask)).dsm_loss) != pytest.approx(
        float(loss(model).dsm_loss), rel=1e-3
    )


# ---------------------------------------------------------------------------------------------------------------
# Classifier-free guidance label dropout
# ---------------------------------------------------------------------------------------------------------------


def test_drop_class_labels_drops_with_the_given_probability_to_the_null_id():
    labels = torch.randint(0, NUM_CLASSES, (20000,), generator=torch.Generator().manual_seed(0))

    dropped = drop_class_labels(labels, NUM_CLASSES, 0.3, generator=torch.Generator().manual_seed(1))

    is_null = dropped == NUM_CLASSES
    assert abs(float(is_null.float().mean()) - 0.3) < 0.015
    assert torch.equal(dropped[~is_null], labels[~is_null])
    expected = torch.rand(20000, generator=torch.Generator().manual_seed(1)) < 0.3
    assert torch.equal(is_null, expected)


def test_drop_class_labels_extremes():
    labels = torch.arange(NUM_CLASSES)

    assert torch.equal(drop_class_labels(labels, NUM_CLASSES, 0.0), labels)
    assert (drop_class_labels(labels, NUM_CLASSES, 1.0) == NUM_CLASSES).all()
    assert torch.equal(labels, torch.arange(NUM_CLASSES))


@pytest.mark.parametrize("dropout_prob", [-0.1, 1.5, float("nan")])
def test_drop_class_labels_rejects_bad_probability(dropout_prob):
    with pytest.raises(ValueError, match="dropout_prob"):
        drop_class_labels(torch.arange(3), NUM_CLASSES, dropout_prob)


# ---------------------------------------------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"mask_ratio": 1.0}, "mask_ratio"),
        ({"mask_ratio": -0.1}, "mask_ratio"),
        ({"mae_loss_weight": -1.0}, "mae_loss_weight"),
        ({"mae_loss_weight": float("inf")}, "mae_loss_weight"),
        ({"class_labels": torch.zeros(BATCH + 1, dtype=torch.long)}, "class_labels"),
        ({"mask": torch.zeros(BATCH, NUM_TOKENS + 1, dtype=torch.bool)}, "mask"),
        ({"mask": torch.zeros(BATCH, NUM_TOKENS, dtype=torch.bool), "mask_ratio": 0.5}, "mask"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(model, batch, kwargs, name):
    clean, _ = batch
    with pytest.raises(ValueError, match=name):
        EDMHeunScheduler().masked_training_loss(model, clean, **kwargs)


@pytest.mark.parametrize("clean", [torch.zeros(BATCH, CHANNELS, SIZE), torch.zeros(BATCH, CHANNELS, 7, 7)])
def test_bad_clean_samples_raise_value_error(model, clean):
    with pytest.raises(ValueError, match="clean_samples"):
        MaskedDDPMScheduler().masked_training_loss(model, clean)


def test_unsupported_scheduler_raises_type_error_naming_the_supported_ones(model, batch):
    class MaskedEulerDiscreteScheduler(MaskedTrainingMixin, EulerDiscreteScheduler):
        pass

    with pytest.raises(TypeError, match="EDMEulerScheduler.*DDPMScheduler"):
        MaskedEulerDiscreteScheduler().masked_training_loss(model, batch[0])


def test_diffusers_pipeline_loader_recognises_it_as_a_scheduler():
    # DiffusionPipeline.from_pretrained resolves each component from the module named in model_index.json and checks
    # it against the loadable base classes found in that module.
    from diffusers.pipelines.pipeline_loading_utils import ALL_IMPORTABLE_CLASSES, get_class_obj_and_candidates

    class_obj, candidates = get_class_obj_and_candidates(
        MaskedDDPMScheduler.__module__, "MaskedDDPMScheduler", ALL_IMPORTABLE_CLASSES, None, False
    )

    assert class_obj is MaskedDDPMScheduler
    assert issubclass(class_obj, candidates["SchedulerMixin"])
