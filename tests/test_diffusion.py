"""Schedules, forward process, prediction conversions and the training loss (model/diffusion.py)."""

import math

import pytest
import torch

from model.config import DiffusionConfig
from model.diffusion import (
    Diffusion,
    cosine,
    eps_to_x0,
    linear,
    scaled_linear,
    to_x0_eps,
    v_target,
    v_to_eps,
    v_to_x0,
    x0_to_eps,
)

diffusers = pytest.importorskip("diffusers")


def rel_err(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ours, theirs",
    [
        (
            lambda: scaled_linear(),
            dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012),
        ),
        (lambda: linear(), dict(beta_schedule="linear", beta_start=1e-4, beta_end=0.02)),
        (lambda: cosine(), dict(beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_alphas_cumprod_match_diffusers(ours, theirs):
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, **theirs)
    d = Diffusion(ours())
    assert d.betas.dtype == torch.float64 and d.num_steps == 1000
    # diffusers accumulates the product in float32: ~1e-6 relative error over 1000 factors (cosine
    # ends at abar ~ 2e-9, where float32 leaves ~1e-14 absolute error)
    assert rel_err(d.betas, ref.betas) < 1e-6
    torch.testing.assert_close(d.alphas_cumprod, ref.alphas_cumprod.double(), rtol=5e-6, atol=1e-10)


def test_schedule_closed_forms():
    b = scaled_linear()
    assert b[0].item() == pytest.approx(0.00085, rel=1e-12) and b[-1].item() == pytest.approx(
        0.012, rel=1e-12
    )
    assert torch.allclose(
        b.sqrt().diff(), b.sqrt().diff()[0].expand(999), rtol=0, atol=1e-15
    )  # linear in sqrt
    # Nichol & Dhariwal Eq. 17: abar_t = f(t) / f(0) wherever beta is not clipped (all but the last step)
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2
    d = Diffusion(cosine())
    for t in (0, 10, 500, 900, 998):
        assert d.alphas_cumprod[t].item() == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-10)
    assert cosine()[-1].item() == 0.999


def test_from_config():
    d = Diffusion.from_config(DiffusionConfig())
    assert torch.equal(d.betas, scaled_linear())
    with pytest.raises(ValueError, match="schedule"):
        Diffusion.from_config(DiffusionConfig(schedule="sigmoid"))


def test_bad_betas():
    with pytest.raises(ValueError, match="betas must lie"):
        Diffusion(torch.tensor([0.1, 1.5]))
    with pytest.raises(ValueError, match="1-D"):
        Diffusion(torch.full((2, 3), 0.1))


def test_sigma_at_matches_euler_interpolation():
    ref = diffusers.EulerDiscreteScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        timestep_spacing="linspace",
    )
    ref.set_timesteps(7)  # fractional timesteps
    ours = Diffusion().sigma_at(ref.timesteps.double())
    assert ref.timesteps[1] != ref.timesteps[1].round()
    assert rel_err(ours, ref.sigmas[:-1]) < 2e-6
    d = Diffusion()
    assert torch.equal(d.sigma_at(torch.tensor([0.0, 999.0])), d.sigmas[[0, 999]])


# ----------------------------------------------------------------------------------------------
# Forward process and conversions
# ----------------------------------------------------------------------------------------------


def test_q_sample_matches_diffusers_and_statistics():
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 500, 999])
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert rel_err(d.q_sample(x0, t, noise), ref.add_noise(x0, noise, t)) < 1e-6
    # statistics: x0 = 1 everywhere, 200k noise draws per timestep
    x0 = torch.ones(3, 200_000, dtype=torch.float64)
    t = torch.tensor([50, 400, 900])
    x_t = d.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))
    abar = d.alphas_cumprod[t]
    assert torch.allclose(x_t.mean(1), abar.sqrt(), atol=0.01)  # 5 standard errors
    assert torch.allclose(x_t.std(1), (1 - abar).sqrt(), atol=0.01)
    with pytest.raises(ValueError, match="noise shape"):
        d.q_sample(x0, t, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="timesteps must lie"):
        d.q_sample(x0, torch.tensor([0, 1, 1000]), torch.zeros_like(x0))


def test_conversions_round_trip():
    d = Diffusion()
    g = torch.Generator().manual_seed(1)
    x0, eps = (
        torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64),
        torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0, 1, 250, 750, 999])
    abar = d.abar(t, x0)
    x_t = d.q_sample(x0, t, eps)
    v = v_target(x0, eps, abar)
    for a, b in [
        (eps_to_x0(x_t, eps, abar), x0),
        (x0_to_eps(x_t, x0, abar), eps),
        (v_to_x0(x_t, v, abar), x0),
        (v_to_eps(x_t, v, abar), eps),
    ]:
        torch.testing.assert_close(a, b, rtol=0, atol=1e-9)
    for pred, out in [("eps", eps), ("v", v), ("x0", x0)]:
        got_x0, got_eps = to_x0_eps(x_t, out, abar, pred)
        torch.testing.assert_close(got_x0, x0, rtol=0, atol=1e-9)
        torch.testing.assert_close(got_eps, eps, rtol=0, atol=1e-9)
    # v = alpha eps - sigma x0 as diffusers computes it
    ref = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    assert rel_err(v, ref.get_velocity(x0.float(), eps.float(), t)) < 1e-6
    with pytest.raises(ValueError, match="prediction"):
        to_x0_eps(x_t, eps, abar, "epsilon")


# ----------------------------------------------------------------------------------------------
# Training loss
# ----------------------------------------------------------------------------------------------


def test_sample_timesteps():
    d = Diffusion()
    t = d.sample_timesteps(10_000, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    assert t.min() < 10 and t.max() > 990  # covers the range
    assert torch.equal(t, d.sample_timesteps(10_000, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_loss_zero_for_perfect_model(prediction):
    d = Diffusion()
    g = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(4, 4, 8, 8, generator=g), torch.randn(4, 4, 8, 8, generator=g)
    t = torch.tensor([3, 100, 600, 999])
    target = {"eps": noise, "x0": x0, "v": v_target(x0, noise, d.abar(t, x0))}[prediction]
    out = d.training_losses(
        lambda x_t, tt: target, x0, t, noise, prediction=prediction, min_snr_gamma=5.0
    )
    assert out["loss"].shape == (4,) and out["loss"].abs().max() < 1e-10
    wrong = d.training_losses(lambda x_t, tt: target + 1, x0, t, noise, prediction=prediction)
    torch.testing.assert_close(wrong["mse"], torch.ones(4))


def test_min_snr_weights_are_the_x0_weights_for_every_prediction():
    """Hang et al. 2023: the weighted loss must equal min(SNR, gamma) * ||x0_hat - x0||^2 whatever the
    network predicts, and without weighting the eps-MSE is SNR times the x0-MSE."""
    d = Diffusion()
    g = torch.Generator().manual_seed(3)
    x0, noise = (
        torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64),
        torch.randn(6, 4, 8, 8, generator=g, dtype=torch.float64),
    )
    t = torch.tensor([0, 20, 100, 300, 700, 999])  # SNR from ~1e3 to ~5e-3
    gamma = 5.0
    snr = d.snr(t)
    assert (snr > gamma).any() and (snr < gamma).any()
    x0_hat_fn = lambda x_t: 0.7 * x_t + 0.1  # some denoiser, in x0 terms
    x_t = d.q_sample(x0, t, noise)
    x0_mse = (x0_hat_fn(x_t) - x0).pow(2).flatten(1).mean(1)
    for pred in ("eps", "v", "x0"):

        def model_fn(xt, tt, pred=pred):  # same x0_hat, as `pred`
            abar, x0_hat = d.abar(tt, xt), x0_hat_fn(xt)
            eps_hat = x0_to_eps(xt, x0_hat, abar)
            return {"eps": eps_hat, "x0": x0_hat, "v": v_target(x0_hat, eps_hat, abar)}[pred]

        out = d.training_losses(model_fn, x0, t, noise, prediction=pred, min_snr_gamma=gamma)
        torch.testing.assert_close(out["loss"], snr.clamp(max=gamma) * x0_mse, rtol=1e-9, atol=0)
        if pred == "eps":
            torch.testing.assert_close(out["mse"], snr * x0_mse, rtol=1e-9, atol=0)
    torch.testing.assert_close(d.min_snr_weight(t, "eps", gamma), snr.clamp(max=gamma) / snr)
    torch.testing.assert_close(d.min_snr_weight(t, "v", gamma), snr.clamp(max=gamma) / (snr + 1))
    with pytest.raises(ValueError, match="min_snr_gamma"):
        d.min_snr_weight(t, "eps", 0.0)


def test_loss_bad_inputs():
    d = Diffusion()
    x0, t = torch.zeros(2, 4, 8, 8), torch.tensor([1, 2])
    with pytest.raises(ValueError, match="prediction"):
        d.training_losses(lambda x, tt: x, x0, t, prediction="epsilon")
    with pytest.raises(ValueError, match="model output shape"):
        d.training_losses(lambda x, tt: x[:, :3], x0, t)
