"""Samplers (model/samplers.py) against diffusers' schedulers, step by step, and guidance (model/guidance.py)."""

import math

import pytest
import torch

from model.diffusion import Diffusion
from model.guidance import guided_model_fn
from model.samplers import (
    SAMPLERS,
    make_timesteps,
    sample_ddim,
    sample_ddpm,
    sample_dpmpp_2m,
    sample_euler,
)

diffusers = pytest.importorskip("diffusers")

# SD2-base's scheduler_config.json, which the Text2Earth release inherits
SD2 = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    steps_offset=1,
    clip_sample=False,
    set_alpha_to_one=False,
    timestep_spacing="leading",
)
PRED = {"eps": "epsilon", "v": "v_prediction"}


def sd2(drop=(), **override):
    """SD2's config without the keys a scheduler lacks, with some values overridden."""
    return {**{k: v for k, v in SD2.items() if k not in drop}, **override}


def tiny_net(seed=0):
    """A fixed random conv net of x and t standing in for the U-Net: model_fn(x, t) -> (B, 4, H, W)."""
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(8, 4, 3, 3, generator=g) * 0.2, torch.randn(4, 8, 3, 3, generator=g) * 0.2
    freq = torch.randn(8, generator=g)

    def model_fn(x, t):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])  # B
        h = torch.nn.functional.conv2d(x, w1, padding=1)  # B, 8, H, W
        h = torch.tanh(h + torch.sin(t[:, None] / 300 * freq)[:, :, None, None])
        return 0.5 * x + torch.nn.functional.conv2d(h, w2, padding=1)  # B, 4, H, W

    return model_fn


def assert_trajectories_match(ours, theirs):
    """Every step: max |ours - theirs| <= 1e-5 * max |theirs|."""
    assert len(ours) == len(theirs) and len(ours) > 0
    for i, (a, b) in enumerate(zip(ours, theirs)):
        err = (a.double() - b.double()).abs().max().item()
        assert err <= 1e-5 * b.abs().max().item(), f"step {i}: max abs diff {err:.3g}"


def run_ours(sampler, model_fn, x, steps, **kw):
    traj = []
    out = sampler(
        model_fn, x, Diffusion(), steps, callback=lambda d: traj.append(d["x"].clone()), **kw
    )
    assert torch.equal(out, traj[-1])
    return traj


def noise(seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# Parity with diffusers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spacing, steps, eta, prediction",
    [
        ("leading", 10, 0.0, "eps"),
        ("leading", 7, 0.0, "eps"),
        ("trailing", 20, 0.0, "eps"),
        ("leading", 10, 0.7, "eps"),
        ("trailing", 10, 1.0, "eps"),
        ("leading", 10, 0.0, "v"),
    ],
)
def test_ddim_matches_diffusers(spacing, steps, eta, prediction):
    model_fn, x = tiny_net(), noise()
    ref = diffusers.DDIMScheduler(**sd2(timestep_spacing=spacing, prediction_type=PRED[prediction]))
    ref.set_timesteps(steps)
    g, theirs, xr = torch.Generator().manual_seed(5), [], x
    for t in ref.timesteps:
        xr = ref.step(model_fn(xr, t), t, xr, eta=eta, generator=g).prev_sample
        theirs.append(xr)
    ours = run_ours(
        sample_ddim,
        model_fn,
        x,
        steps,
        spacing=spacing,
        prediction=prediction,
        eta=eta,
        generator=torch.Generator().manual_seed(5),
    )
    assert_trajectories_match(ours, theirs)


@pytest.mark.parametrize(
    "spacing, steps, prediction",
    [
        ("leading", 10, "eps"),
        ("trailing", 10, "eps"),
        ("linspace", 7, "eps"),
        ("leading", 10, "v"),
    ],
)
def test_euler_matches_diffusers(spacing, steps, prediction):
    model_fn, x = tiny_net(1), noise(1)
    ref = diffusers.EulerDiscreteScheduler(
        **sd2(
            ("clip_sample", "set_alpha_to_one"),
            timestep_spacing=spacing,
            prediction_type=PRED[prediction],
        )
    )
    ref.set_timesteps(steps)
    # ours starts at noise * sqrt(sigma_0^2 + 1); diffusers uses that for "leading" and sigma_0 otherwise
    xr, theirs = x * math.sqrt(ref.sigmas[0].item() ** 2 + 1), []
    if spacing == "leading":
        assert torch.equal(xr, x * ref.init_noise_sigma)
    for t in ref.timesteps:
        xr = ref.step(model_fn(ref.scale_model_input(xr, t), t), t, xr).prev_sample
        theirs.append(xr)
    ours = run_ours(sample_euler, model_fn, x, steps, spacing=spacing, prediction=prediction)
    assert_trajectories_match(ours, theirs)


@pytest.mark.parametrize(
    "spacing, steps, prediction", [("leading", 10, "eps"), ("trailing", 25, "v")]
)
def test_ddpm_matches_diffusers(spacing, steps, prediction):
    model_fn, x = tiny_net(2), noise(2)
    ref = diffusers.DDPMScheduler(
        **sd2(("set_alpha_to_one",), timestep_spacing=spacing, prediction_type=PRED[prediction])
    )
    ref.set_timesteps(steps)
    g, theirs, xr = torch.Generator().manual_seed(7), [], x
    for t in ref.timesteps:
        xr = ref.step(model_fn(xr, t), t, xr, generator=g).prev_sample
        theirs.append(xr)
    ours = run_ours(
        sample_ddpm,
        model_fn,
        x,
        steps,
        spacing=spacing,
        prediction=prediction,
        generator=torch.Generator().manual_seed(7),
    )
    assert_trajectories_match(ours, theirs)


@pytest.mark.parametrize("steps, prediction", [(10, "eps"), (20, "eps"), (20, "v")])
def test_dpmpp_2m_matches_diffusers(steps, prediction):
    model_fn, x = tiny_net(3), noise(3)
    ref = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        algorithm_type="dpmsolver++",
        solver_order=2,
        timestep_spacing="trailing",
        final_sigmas_type="zero",
        lower_order_final=True,
        prediction_type=PRED[prediction],
    )
    ref.set_timesteps(steps)
    theirs, xr = [], x
    for t in ref.timesteps:
        xr = ref.step(model_fn(xr, t), t, xr).prev_sample
        theirs.append(xr)
    ours = run_ours(sample_dpmpp_2m, model_fn, x, steps, spacing="trailing", prediction=prediction)
    assert_trajectories_match(ours, theirs)


# ----------------------------------------------------------------------------------------------
# Behaviour
# ----------------------------------------------------------------------------------------------


def test_timesteps():
    assert make_timesteps(1000, 4, "leading", 1).tolist() == [751, 501, 251, 1]
    assert make_timesteps(1000, 4, "trailing").tolist() == [999, 749, 499, 249]
    assert make_timesteps(1000, 4, "linspace").tolist() == [999, 666, 333, 0]
    assert make_timesteps(1000, 4, "linspace", integer=False).tolist() == [999, 666, 333, 0]
    assert make_timesteps(1000, 1000, "leading", 0).tolist() == list(range(999, -1, -1))


def test_ddim_linspace_steps_to_the_next_sampled_timestep():
    """The previous timestep is the next one sampled (diffusers' DDIM uses t - T // steps instead)."""
    d, seen = Diffusion(), []
    ts = make_timesteps(1000, 6, "linspace").long().tolist()
    x = noise(4)
    out = sample_ddim(
        lambda x, t: seen.append(int(t[0])) or torch.zeros_like(x),
        x,
        d,
        6,
        spacing="linspace",
        set_alpha_to_one=True,
    )
    assert seen == ts
    # a zero eps prediction makes each step x <- sqrt(abar_s / abar_t) x
    ab = d.alphas_cumprod[ts].tolist() + [1.0]
    scale = math.prod(math.sqrt(ab[i + 1] / ab[i]) for i in range(6))
    torch.testing.assert_close(out, x * scale)


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_bad_arguments(name):
    sampler, x, d = SAMPLERS[name], noise(), Diffusion()
    model_fn = lambda x, t: x
    with pytest.raises(ValueError, match="steps"):
        sampler(model_fn, x, d, 0)
    with pytest.raises(ValueError, match="steps"):
        sampler(model_fn, x, d, 1001)
    with pytest.raises(ValueError, match="outside"):
        sampler(model_fn, x, d, 1000, spacing="leading", steps_offset=1)  # t = 1000 does not exist
    with pytest.raises(ValueError, match="unknown option"):
        sampler(model_fn, x, d, 5, churn=0.1)
    with pytest.raises(ValueError, match="spacing"):
        sampler(model_fn, x, d, 5, spacing="karras")
    with pytest.raises(ValueError, match="prediction"):
        sampler(model_fn, x, d, 5, prediction="epsilon")


@pytest.mark.parametrize("name", sorted(SAMPLERS))
def test_one_evaluation_per_step_and_deterministic(name):
    calls, model_fn = [], tiny_net(4)
    counted = lambda x, t: calls.append(1) or model_fn(x, t)
    out1 = SAMPLERS[name](
        counted, noise(5), Diffusion(), 8, generator=torch.Generator().manual_seed(0), progress=True
    )
    out2 = SAMPLERS[name](
        counted, noise(5), Diffusion(), 8, generator=torch.Generator().manual_seed(0)
    )
    assert len(calls) == 16 and torch.equal(out1, out2) and out1.shape == (2, 4, 8, 8)
    assert torch.isfinite(out1).all()


def test_dpmpp_2m_beats_ddim_on_gaussian_data():
    """Data ~ N(mu, s^2) per element has the exact optimal eps(x_t, t) = sigma (x_t - alpha mu) /
    (alpha^2 s^2 + sigma^2); with it, DPM-Solver++(2M) at 20 steps must land closer to a 250-step DDIM
    reference than DDIM at 20 steps (trailing spacing: every run starts at t = 999 from the same noise)."""
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    mu = 0.5 * torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64)
    s = 0.3 + 0.7 * torch.rand(1, 4, 8, 8, generator=g, dtype=torch.float64)

    def gaussian_eps(x, t):
        abar = d.abar(t, x)
        a, sig = abar.sqrt(), (1 - abar).sqrt()
        return sig * (x - a * mu) / (a * a * s * s + sig * sig)

    x = torch.randn(4, 4, 8, 8, generator=g, dtype=torch.float64)
    kw = dict(spacing="trailing")
    ref = sample_ddim(gaussian_eps, x, d, 250, set_alpha_to_one=True, **kw)
    rms = lambda a: (a - ref).pow(2).mean().sqrt().item()
    err_ddim = rms(sample_ddim(gaussian_eps, x, d, 20, set_alpha_to_one=True, **kw))
    err_dpm = rms(sample_dpmpp_2m(gaussian_eps, x, d, 20, **kw))
    assert err_dpm < 0.6 * err_ddim, (err_dpm, err_ddim)  # measured: 0.028 vs 0.059
    # and both approach the reference as steps grow (the reference itself is converged to ~5e-3)
    assert rms(sample_dpmpp_2m(gaussian_eps, x, d, 50, **kw)) < 0.5 * err_dpm


# ----------------------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------------------


class FakeUNet:
    """unet(x, t, cond): a nonlinear function of x, t, cond["text"] and cond["level"] that records its batch sizes.
    unet(x, t, context, level) calls it with those two conditions."""

    def __init__(self):
        self.batches, self.net = [], tiny_net(9)

    def __call__(self, x, t, cond, level=None):
        if level is not None:
            cond = {"text": cond, "level": level}
        context, level = cond["text"], cond["level"]
        self.batches.append(x.shape[0])
        assert t.shape == level.shape == (x.shape[0],) and context.shape[0] == x.shape[0]
        c = context.mean(dim=(1, 2))[:, None, None, None]  # B, 1, 1, 1
        return self.net(x, t) * (1 + c) + torch.sin(level)[:, None, None, None]


def cfg_model_fn(unet, context, level, null_context, null_level, scale, *, level_scale=None, **kw):
    """Text2Earth's guidance through the per-condition interface: text and level at `scale` (joint), or the
    level at its own `level_scale`."""
    cond, null = {"text": context}, {"text": null_context}
    if level is not None:
        cond["level"] = level
    if null_level is not None:
        null["level"] = null_level
    scales = {"text": scale, "level": scale if level_scale is None else level_scale}
    if level is None and level_scale is None:
        del scales["level"]
    return guided_model_fn(unet, cond, null, scales, **kw)


def cfg_inputs(B=3):
    g = torch.Generator().manual_seed(11)
    x = torch.randn(B, 4, 8, 8, generator=g)
    ctx, null_ctx = torch.randn(B, 77, 16, generator=g), torch.randn(1, 77, 16, generator=g)
    level = torch.tensor([17.0, 12.5, 0.0])[:B]
    return x, ctx, level, null_ctx


def test_cfg_batched_equals_separate_calls():
    x, ctx, level, null_ctx = cfg_inputs()
    t = torch.full((3,), 500)
    unet = FakeUNet()
    for scale in (0.0, 1.0, 4.0):
        unet.batches.clear()
        out = cfg_model_fn(unet, ctx, level, null_ctx, 0.0, scale)(x, t)
        cond = unet(x, t, ctx, level)
        null = unet(x, t, null_ctx.expand(3, -1, -1), torch.zeros(3))
        torch.testing.assert_close(out, null + scale * (cond - null))
        if scale == 1.0:
            assert unet.batches[0] == 3 and torch.equal(out, cond)  # conditional pass only
        else:
            assert unet.batches[0] == 6  # one batched pass
        if scale == 0.0:
            torch.testing.assert_close(out, null)


def test_cfg_interval_skips_null_branch():
    x, ctx, level, null_ctx = cfg_inputs()
    unet = FakeUNet()
    fn = cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 4.0, interval=(200, 700))
    outside = fn(x, torch.full((3,), 900))
    assert unet.batches == [3] and torch.equal(outside, unet(x, torch.full((3,), 900), ctx, level))
    unet.batches.clear()
    inside = fn(x, torch.full((3,), 700))  # bounds included
    assert unet.batches[0] == 6
    torch.testing.assert_close(
        inside, cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 4.0)(x, torch.full((3,), 700))
    )
    mixed_t = torch.tensor([100, 500, 900])  # per-sample choice
    mixed = fn(x, mixed_t)
    full = cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 4.0)(x, mixed_t)
    cond = unet(x, mixed_t, ctx, level)
    torch.testing.assert_close(mixed[1], full[1])
    torch.testing.assert_close(mixed[[0, 2]], cond[[0, 2]])
    # in a sampler: 10 DDIM steps, guidance on for 5 of them -> 5 passes of 2B and 5 of B
    unet.batches.clear()
    sample_ddim(
        cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 4.0, interval=(400, 900)), x, Diffusion(), 10
    )
    assert sorted(unet.batches) == [3] * 5 + [6] * 5


def test_cfg_level_scale_guides_the_level_on_its_own():
    """Three branches (text + level, text + level 0, null) in one pass of 3B; s_L = s is the joint formula."""
    x, ctx, level, null_ctx = cfg_inputs()
    t, unet = torch.full((3,), 400), FakeUNet()
    cond = unet(x, t, ctx, level)
    text = unet(x, t, ctx, torch.zeros(3))
    null = unet(x, t, null_ctx.expand(3, -1, -1), torch.zeros(3))
    for scale, level_scale in ((3.0, 6.0), (1.0, 4.0), (4.0, 0.0)):
        unet.batches.clear()
        out = cfg_model_fn(unet, ctx, level, null_ctx, 0.0, scale, level_scale=level_scale)(x, t)
        assert unet.batches == [9]
        torch.testing.assert_close(out, null + scale * (text - null) + level_scale * (cond - text))
    assert not torch.allclose(text, cond)  # the level branch matters
    unet.batches.clear()
    same = cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 4.0, level_scale=4.0)(x, t)
    assert unet.batches == [6] and torch.equal(
        same, cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 4.0)(x, t)
    )
    unet.batches.clear()
    fn = cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 3.0, level_scale=6.0, interval=(200, 700))
    torch.testing.assert_close(
        fn(x, torch.full((3,), 900)), unet(x, torch.full((3,), 900), ctx, level)
    )
    with pytest.raises(ValueError, match="does not read"):  # no level to guide
        cfg_model_fn(unet, ctx, None, null_ctx, None, 3.0, level_scale=6.0)
    with pytest.raises(ValueError, match="scales"):
        cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 3.0, level_scale=-1.0)


def test_cfg_rescale():
    x, ctx, level, null_ctx = cfg_inputs()
    t, unet = torch.full((3,), 300), FakeUNet()
    plain = cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 5.0)(x, t)
    assert torch.equal(cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 5.0, rescale=0.0)(x, t), plain)
    full = cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 5.0, rescale=1.0)(x, t)
    cond = unet(x, t, ctx, level)
    # phi = 1: the guided output takes the conditional output's per-sample std (Eq. 15)
    torch.testing.assert_close(full.flatten(1).std(1), cond.flatten(1).std(1))
    half = cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 5.0, rescale=0.5)(x, t)
    torch.testing.assert_close(half, 0.5 * full + 0.5 * plain)  # Eq. 16


def test_cfg_bad_arguments():
    x, ctx, level, null_ctx = cfg_inputs()
    unet = FakeUNet()
    with pytest.raises(ValueError, match="scale"):
        cfg_model_fn(unet, ctx, level, null_ctx, 0.0, -1.0)
    with pytest.raises(ValueError, match="rescale"):
        cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 4.0, rescale=2.0)
    with pytest.raises(ValueError, match="interval"):
        cfg_model_fn(unet, ctx, level, null_ctx, 0.0, 4.0, interval=(800, 200))
    with pytest.raises(ValueError, match="does not read"):  # a level without its null
        cfg_model_fn(unet, ctx, level, null_ctx, None, 4.0)
    with pytest.raises(ValueError, match="null"):
        cfg_model_fn(unet, ctx, level, null_ctx[:, :, :8], 0.0, 4.0)
    with pytest.raises(ValueError, match="batch"):
        cfg_model_fn(unet, ctx[:2], level, null_ctx, 0.0, 4.0)(x, torch.full((3,), 10))
