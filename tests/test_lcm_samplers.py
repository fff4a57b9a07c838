"""The latent consistency samplers (model/samplers.py: sample_lcm, sample_tcd) against diffusers'
LCMScheduler and TCDScheduler: boundary scalings, timesteps, whole trajectories, img2img and
inpainting hooks."""

import argparse

import pytest
import torch

from cli.sampling import add_sampling_flags
from model.diffusion import Diffusion
from model.samplers import (
    SAMPLERS,
    lcm_boundary_scalings,
    lcm_timesteps,
    sample_lcm,
    sample_tcd,
)
from test_samplers import tiny_net  # the fixed random conv net standing in for the U-Net

diffusers = pytest.importorskip("diffusers")

# SD2-base's noise schedule, which the Text2Earth release inherits
SCHEDULE = dict(
    num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012
)
PRED = {"eps": "epsilon", "v": "v_prediction", "x0": "sample"}


def reference(kind="lcm", prediction="eps", **config):
    """diffusers' LCMScheduler or TCDScheduler with SD2's schedule."""
    cls = diffusers.LCMScheduler if kind == "lcm" else diffusers.TCDScheduler
    return cls(**SCHEDULE, prediction_type=PRED[prediction], **config)


def noise(seed=0, shape=(2, 4, 8, 8)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def max_rel_err(ours, theirs):
    """max over steps of max |ours - theirs| / max |theirs|."""
    assert len(ours) == len(theirs) and len(ours) > 0
    return max(
        (a.double() - b.double()).abs().max().item() / b.abs().max().item()
        for a, b in zip(ours, theirs)
    )


def run_ours(sampler, model_fn, x, steps, seed, **kw):
    """Our sampler's state after every step, through the callback."""
    traj = []
    out = sampler(
        model_fn,
        x,
        Diffusion(),
        steps,
        generator=torch.Generator().manual_seed(seed),
        callback=lambda d: traj.append(d["x"].clone()),
        **kw,
    )
    assert torch.equal(out, traj[-1])
    return traj


def run_theirs(ref, model_fn, x, steps, seed, skip=0, **step_kw):
    """diffusers' scheduler after every step, from the skip-th timestep on."""
    ref.set_timesteps(steps)
    ref.set_begin_index(skip)
    g, traj = torch.Generator().manual_seed(seed), []
    for t in ref.timesteps[skip:]:
        x = ref.step(model_fn(x, t), t, x, generator=g, **step_kw).prev_sample
        traj.append(x)
    return traj


# ----------------------------------------------------------------------------------------------
# Boundary scalings and timesteps
# ----------------------------------------------------------------------------------------------


def test_boundary_scalings():
    assert lcm_boundary_scalings(0) == (1.0, 0.0)
    ref = reference()
    for t in (0, 1, 3, 19, 259, 999):
        c_skip, c_out = lcm_boundary_scalings(t)
        want_skip, want_out = ref.get_scalings_for_boundary_condition_discrete(t)
        assert c_skip == pytest.approx(want_skip, rel=1e-12)
        assert c_out == pytest.approx(want_out, rel=1e-12)
    # tensors of timesteps, as the training objective passes them
    t = torch.tensor([0, 19, 999], dtype=torch.float64)
    c_skip, c_out = lcm_boundary_scalings(t)
    assert c_skip[0] == 1 and c_out[0] == 0
    torch.testing.assert_close(c_skip, 0.25 / ((10 * t) ** 2 + 0.25))
    assert (c_skip[1:] < 1e-3).all() and (c_out[1:] > 0.999).all()


@pytest.mark.parametrize("kind", ["lcm", "tcd"])
def test_timesteps_match_diffusers(kind):
    assert lcm_timesteps(1000, 4).tolist() == [999, 759, 499, 259]
    for original_steps in (50, 25):
        ref = reference(kind, original_inference_steps=original_steps)
        for steps in (1, 2, 4, 8, 13, original_steps):
            ref.set_timesteps(steps)
            ours = lcm_timesteps(1000, steps, original_steps)
            assert ours.tolist() == ref.timesteps.tolist(), (original_steps, steps)
    with pytest.raises(ValueError, match="outside"):
        lcm_timesteps(1000, 51)


# ----------------------------------------------------------------------------------------------
# Whole trajectories against diffusers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "steps, prediction", [(1, "eps"), (2, "eps"), (4, "eps"), (8, "eps"), (4, "v"), (4, "x0")]
)
def test_lcm_matches_diffusers(steps, prediction):
    model_fn, x = tiny_net(), noise()
    theirs = run_theirs(reference("lcm", prediction), model_fn, x, steps, seed=5)
    ours = run_ours(sample_lcm, model_fn, x, steps, seed=5, prediction=prediction)
    assert max_rel_err(ours, theirs) <= 1e-5


@pytest.mark.parametrize(
    "steps, gamma, prediction",
    [
        (4, 0.0, "eps"),
        (4, 0.3, "eps"),
        (8, 0.3, "eps"),
        (4, 1.0, "eps"),
        (1, 0.3, "eps"),
        (4, 0.3, "v"),
        (8, 0.5, "v"),
        (4, 0.3, "x0"),
    ],
)
def test_tcd_matches_diffusers(steps, gamma, prediction):
    model_fn, x = tiny_net(1), noise(1)
    ref = reference("tcd", prediction)
    theirs = run_theirs(ref, model_fn, x, steps, seed=7, eta=gamma)
    ours = run_ours(sample_tcd, model_fn, x, steps, seed=7, prediction=prediction, gamma=gamma)
    assert max_rel_err(ours, theirs) <= 1e-5


def test_tcd_gamma_zero_is_deterministic():
    model_fn, x = tiny_net(2), noise(2)
    a = sample_tcd(
        model_fn, x, Diffusion(), 4, gamma=0.0, generator=torch.Generator().manual_seed(0)
    )
    b = sample_tcd(
        model_fn, x, Diffusion(), 4, gamma=0.0, generator=torch.Generator().manual_seed(1)
    )
    c = sample_tcd(
        model_fn, x, Diffusion(), 4, gamma=0.3, generator=torch.Generator().manual_seed(1)
    )
    assert torch.equal(a, b) and not torch.allclose(a, c)


# ----------------------------------------------------------------------------------------------
# Editing hooks: img2img (skip), inpainting (replace), the callback
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, prediction", [("lcm", "eps"), ("tcd", "eps"), ("lcm", "v")])
def test_img2img_skip_matches_diffusers(kind, prediction):
    """skip = 2 of 8 steps: x is the image latent re-noised to the 2nd timestep; diffusers runs its
    schedule from the same index (set_begin_index)."""
    steps, skip, d = 8, 2, Diffusion()
    model_fn, z0, eps = tiny_net(3), noise(3), noise(4)
    t0 = int(lcm_timesteps(1000, steps)[skip])
    x = d.q_sample(z0, torch.full((2,), t0), eps)
    kw = {"eta": 0.3} if kind == "tcd" else {}
    theirs = run_theirs(reference(kind, prediction), model_fn, x, steps, seed=9, skip=skip, **kw)
    seen = []
    ours = run_ours(
        SAMPLERS[kind],
        lambda x, t: seen.append(int(t[0])) or model_fn(x, t),
        x,
        steps,
        seed=9,
        prediction=prediction,
        skip=skip,
    )
    assert seen == lcm_timesteps(1000, steps)[skip:].tolist()
    assert len(ours) == steps - skip
    assert max_rel_err(ours, theirs) <= 1e-5


@pytest.mark.parametrize("kind", ["lcm", "tcd"])
def test_callback_and_replace_hook(kind):
    """The callback sees every step; replace sees the state before the first step and after each
    one, at the noise level it stands at (LCM ends clean, abar 1; TCD at abar_0, as diffusers)."""
    steps, d = 4, Diffusion()
    ts = lcm_timesteps(1000, steps).tolist()
    ac = d.alphas_cumprod
    final = 1.0 if kind == "lcm" else ac[0].item()
    want = [ac[t].item() for t in ts] + [final]
    levels, calls = [], []
    z0, keep = noise(6), torch.zeros(2, 4, 8, 8)
    keep[..., :4] = 1  # the known left half

    def replace(x, abar):  # paste the known region in, at the state's noise level
        levels.append(abar)
        return keep * (abar**0.5 * z0) + (1 - keep) * x

    out = SAMPLERS[kind](
        tiny_net(5), noise(7), d, steps, replace=replace, callback=lambda c: calls.append(c)
    )
    assert levels == want
    assert [c["i"] for c in calls] == list(range(steps)) and [c["t"] for c in calls] == ts
    assert all(c["x"].shape == c["x0"].shape == z0.shape for c in calls)
    assert torch.equal(out * keep, final**0.5 * z0 * keep)


def test_bad_options_and_cli():
    x, d, model_fn = noise(), Diffusion(), lambda x, t: x
    with pytest.raises(ValueError, match="gamma"):
        sample_tcd(model_fn, x, d, 4, gamma=1.5)
    with pytest.raises(ValueError, match="outside"):
        sample_lcm(model_fn, x, d, 51)
    with pytest.raises(ValueError, match="skip"):
        sample_lcm(model_fn, x, d, 4, skip=4)
    p = argparse.ArgumentParser()
    add_sampling_flags(p)
    assert p.parse_args(["--sampler", "lcm"]).sampler == "lcm"
    assert p.parse_args(["--sampler", "tcd"]).sampler == "tcd"


@pytest.mark.parametrize(
    "sampler, steps, strength, t0", [("lcm", 4, 0.5, 499), ("tcd", 4, 0.75, 759)]
)
def test_img2img_renoises_to_the_timestep_the_few_step_sampler_starts_at(
    monkeypatch, sampler, steps, strength, t0
):
    """SDEdit with lcm / tcd: the image's latent is re-noised to the LCM grid's timestep where the
    sampler starts (4 steps at strength 0.5: 499), not to the model's own spacing's (251)."""
    from model import editing
    from model.config import load_config
    from model.text2earth import Text2Earth

    torch.manual_seed(0)
    model = Text2Earth(load_config("configs/tiny.py").model).eval()
    seen = []
    renoise = editing.renoise
    monkeypatch.setattr(
        editing, "renoise", lambda z, n, abar: seen.append(abar) or renoise(z, n, abar)
    )
    image = torch.zeros(1, 3, 32, 32)
    cond = {"text": ["a forest"], "level": [15.0]}
    editing.img2img(model, cond, image, strength, seeds=[0], sampler=sampler, steps=steps)
    abar = Diffusion.from_config(model.cfg.diffusion).alphas_cumprod[t0].item()
    assert seen == [pytest.approx(abar)]
