"""Samplers: DDPM ancestral, DDIM, Euler, DPM-Solver++(2M) and the few-step LCM and TCD samplers,
as plain functions with one signature

    sample_xxx(model_fn, x, diffusion, steps, *, generator=None, prediction="eps",
               spacing="leading", steps_offset=1, callback=None, progress=False, skip=0,
               replace=None, **opts) -> x0 sample (B, C, H, W)

model_fn(x_t, t) -> prediction (eps, v or x0, as `prediction` says) with x_t (B, C, H, W) and t (B,)
timesteps in [0, T); wrap the U-Net and guidance into it with model/guidance.py. x is the initial
noise, N(0, I), shaped like the latents. `diffusion` is a model.diffusion.Diffusion. The defaults
(leading spacing, steps_offset 1) follow SD2-base's scheduler_config.json, which Text2Earth
inherits; sample_lcm and sample_tcd take lcm_timesteps instead (spacing and steps_offset unused).
callback, if given, is called after every step with {"i", "t", "x" (the sampler's state),
"x0"}. Editing (model/editing.py) uses two more arguments:
    skip     start at the skip-th of the `steps` timesteps; x is then the noisy latent x_t at that
             timestep (SDEdit / img2img: the re-noised input image) instead of N(0, I) noise
    replace  replace(x_t, abar) -> x_t, applied to the state before the first step and after every
             step, with abar the noise level the state stands at (alphas_cumprod; 1.0 once fully
             denoised): inpainting with a text-to-image model pastes the re-noised known region in
             with it. Its x_t is the variance-preserving x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
             for every sampler (Euler converts its own variable).
"""

import math

import torch
from tqdm.auto import tqdm

from model.diffusion import check_prediction, to_x0_eps

SPACINGS = ("leading", "trailing", "linspace")


# ----------------------------------------------------------------------------------------------
# Shared helpers: timesteps, argument checks
# ----------------------------------------------------------------------------------------------


def make_timesteps(num_train_steps, steps, spacing="leading", steps_offset=1, integer=True):
    """The descending sampling timesteps, float64 (steps,), as Lin et al. 2024 ("Common diffusion
    noise schedules and sample steps are flawed"), Table 2, names them:
        leading:  arange(steps) * (T // steps) + steps_offset      (SD2-base; never reaches t = T-1)
        trailing: round(T - arange(steps) * T / steps) - 1         (starts at t = T-1)
        linspace: linspace(0, T - 1, steps), rounded when integer   (starts at t = T-1)
    steps_offset applies to "leading" only, as in diffusers.
    """
    if not isinstance(steps, int) or steps < 1 or steps > num_train_steps:
        raise ValueError(f"steps must be an int in [1, {num_train_steps}], got {steps!r}")
    k = torch.arange(steps, dtype=torch.float64)
    if spacing == "leading":
        ts = (k * (num_train_steps // steps) + steps_offset).flip(0)
    elif spacing == "trailing":
        # as np.arange computes it
        delta = (num_train_steps - num_train_steps / steps) - num_train_steps
        ts = (num_train_steps + k * delta).round() - 1
    elif spacing == "linspace":  # as np.linspace computes it
        ts = k * ((num_train_steps - 1) / max(steps - 1, 1))
        ts[-1] = num_train_steps - 1 if steps > 1 else 0
        ts = (ts.round() if integer else ts).flip(0)
    else:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if ts[0] > num_train_steps - 1 or ts[-1] < 0:
        raise ValueError(
            f"{spacing} spacing with steps={steps}, steps_offset={steps_offset} gives timesteps "
            f"{ts[0].item():g}..{ts[-1].item():g}, outside [0, {num_train_steps - 1}]"
        )
    return ts


def lcm_timesteps(num_train_steps, steps, original_steps=50):
    """The descending sampling timesteps of latent consistency models, long (steps,), as diffusers'
    LCMScheduler and TCDScheduler pick them. Distillation ran on the `original_steps` grid
    t = k c - 1, k = 1..N, with the skipping step c = T // N (Luo et al. 2023, "skipping-step
    technique"; t = 19, 39, ..., 999 for T = 1000, N = 50); sampling takes `steps` of the grid's
    timesteps evenly spaced in index: the floor(i N / steps)-th largest, i = 0..steps-1.
        steps 4: 999, 759, 499, 259
    """
    if not isinstance(original_steps, int) or not 1 <= original_steps <= num_train_steps:
        raise ValueError(
            f"original_steps must be an int in [1, {num_train_steps}], got {original_steps!r}"
        )
    if not isinstance(steps, int) or not 1 <= steps <= original_steps:
        raise ValueError(
            f"steps={steps!r} picks timesteps outside the {original_steps}-step original schedule "
            f"of latent consistency models; steps must be an int in [1, {original_steps}]"
        )
    c = num_train_steps // original_steps  # the skipping step
    grid = torch.arange(original_steps, 0, -1) * c - 1  # N, descending
    return grid[torch.arange(steps) * original_steps // steps]


def sampler_timesteps(sampler, num_train_steps, steps, spacing="leading", steps_offset=1):
    """The timesteps `sampler` (a SAMPLERS name) visits in `steps` steps, long (steps,): the grid of
    latent consistency models for lcm and tcd (lcm_timesteps), make_timesteps for the others."""
    if sampler in ("lcm", "tcd"):
        return lcm_timesteps(num_train_steps, steps)
    return make_timesteps(num_train_steps, steps, spacing, steps_offset)


def _setup(
    name,
    x,
    diffusion,
    steps,
    prediction,
    spacing,
    steps_offset,
    opts,
    defaults,
    integer=True,
    skip=0,
    lcm=False,
):
    """Validate the shared arguments and sampler options; returns (timesteps from the skip-th on,
    options). lcm: the timesteps of lcm_timesteps on the option original_steps' grid instead of
    make_timesteps (spacing is then checked but unused, steps_offset unused)."""
    check_prediction(prediction)
    if not torch.is_tensor(x) or not x.is_floating_point():
        raise ValueError(
            f"{name}: x must be a floating-point tensor of initial noise, got {type(x).__name__}"
        )
    unknown = set(opts) - set(defaults)
    if unknown:
        raise ValueError(
            f"{name}: unknown option(s) {sorted(unknown)}; accepted: {sorted(defaults) or 'none'}"
        )
    o = {**defaults, **opts}
    if lcm and spacing not in SPACINGS:
        raise ValueError(f"spacing must be one of {SPACINGS}, got {spacing!r}")
    if lcm:
        ts = lcm_timesteps(diffusion.num_steps, steps, o["original_steps"])
    else:
        ts = make_timesteps(diffusion.num_steps, steps, spacing, steps_offset, integer)
    if not isinstance(skip, int) or not 0 <= skip < steps:
        raise ValueError(f"{name}: skip must be an int in [0, steps = {steps}), got {skip!r}")
    return ts[skip:], o


def _replaced(replace, x, abar):
    """x after the editing hook (see the module docstring), or x itself without one."""
    return x if replace is None else replace(x, abar)


def _t(t, x, dtype=torch.long):
    """A timestep as the (B,) tensor that model_fn receives."""
    return torch.full((x.shape[0],), t, dtype=dtype, device=x.device)


def _scalar(v, x):
    """A float64 0-dim tensor on x's device: coefficients stay float64, products take x's dtype."""
    return torch.tensor(v, dtype=torch.float64, device=x.device)


def _randn(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


# ----------------------------------------------------------------------------------------------
# DDPM ancestral sampling
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddpm(
    model_fn,
    x,
    diffusion,
    steps,
    *,
    generator=None,
    prediction="eps",
    spacing="leading",
    steps_offset=1,
    callback=None,
    progress=False,
    skip=0,
    replace=None,
    **opts,
):
    """Ancestral sampling, Ho et al. 2020, Alg. 2, on a respaced chain (Nichol & Dhariwal 2021,
    Sec. 4): between consecutive sampled steps t > s, beta' = 1 - abar_t / abar_s and
        x_s = mean~(x_t, x0) + sqrt(beta~) z,
        mean~ and beta~ = (1 - abar_s) / (1 - abar_t) beta'  (Eq. 6-7),
    z = 0 at t = 0; the last step goes to abar = 1. Matches diffusers' DDPMScheduler
    (fixed_small variance).
    """
    ts, _ = _setup(
        "sample_ddpm", x, diffusion, steps, prediction, spacing, steps_offset, opts, {}, skip=skip
    )
    ac = diffusion.alphas_cumprod
    x = _replaced(replace, x, ac[int(ts[0])].item())
    for i in tqdm(range(len(ts)), disable=not progress, desc="ddpm"):
        t = int(ts[i])
        ab_t = ac[t].item()
        ab_s = ac[int(ts[i + 1])].item() if i + 1 < len(ts) else 1.0
        alpha = ab_t / ab_s  # alpha' of the respaced step
        x0, _ = to_x0_eps(x, model_fn(x, _t(t, x)), _scalar(ab_t, x), prediction)
        c0 = math.sqrt(ab_s) * (1 - alpha) / (1 - ab_t)  # Eq. 7, coefficient of x0
        ct = math.sqrt(alpha) * (1 - ab_s) / (1 - ab_t)  # Eq. 7, coefficient of x_t
        x = c0 * x0 + ct * x
        if t > 0:
            var = (1 - ab_s) / (1 - ab_t) * (1 - alpha)  # beta~, Eq. 7
            x = x + math.sqrt(var) * _randn(x, generator)
        x = _replaced(replace, x, ab_s)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


# ----------------------------------------------------------------------------------------------
# DDIM
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_ddim(
    model_fn,
    x,
    diffusion,
    steps,
    *,
    generator=None,
    prediction="eps",
    spacing="leading",
    steps_offset=1,
    callback=None,
    progress=False,
    skip=0,
    replace=None,
    **opts,
):
    """Song et al. 2021, Eq. 12, with
        sigma_t = eta * sqrt((1 - abar_s) / (1 - abar_t)) sqrt(1 - abar_t / abar_s)  (Eq. 16):
        x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s - sigma_t^2) eps + sigma_t z.

    Options: eta (0 = deterministic DDIM, 1 = DDPM-like), set_alpha_to_one (the last step goes to
    abar = 1 if True, else to abar_0 as SD2-base's config says: False). The previous step is the
    next sampled timestep; diffusers' DDIMScheduler uses t - T // steps, the same for "leading"
    spacing and for "trailing" when steps divides T.
    """
    ts, o = _setup(
        "sample_ddim",
        x,
        diffusion,
        steps,
        prediction,
        spacing,
        steps_offset,
        opts,
        {"eta": 0.0, "set_alpha_to_one": False},
        skip=skip,
    )
    if o["eta"] < 0:
        raise ValueError(f"sample_ddim: eta must be >= 0, got {o['eta']}")
    ac = diffusion.alphas_cumprod
    final = 1.0 if o["set_alpha_to_one"] else ac[0].item()
    x = _replaced(replace, x, ac[int(ts[0])].item())
    for i in tqdm(range(len(ts)), disable=not progress, desc="ddim"):
        t = int(ts[i])
        ab_t = ac[t].item()
        ab_s = ac[int(ts[i + 1])].item() if i + 1 < len(ts) else final
        x, x0 = ddim_step(model_fn, x, t, ab_t, ab_s, prediction, o["eta"], generator)
        x = _replaced(replace, x, ab_s)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


def ddim_step(model_fn, x, t, ab_t, ab_s, prediction, eta=0.0, generator=None):
    """One DDIM step (Eq. 12 and 16 above) from timestep t (abar ab_t) to abar ab_s: returns
    (x_s, x0)."""
    x0, eps = to_x0_eps(x, model_fn(x, _t(t, x)), _scalar(ab_t, x), prediction)
    std = eta * math.sqrt((1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s))  # Eq. 16
    x_s = math.sqrt(ab_s) * x0 + math.sqrt(max(1 - ab_s - std**2, 0.0)) * eps  # Eq. 12
    if eta > 0:
        x_s = x_s + std * _randn(x, generator)
    return x_s, x0


# ----------------------------------------------------------------------------------------------
# Euler (probability-flow ODE in sigma)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_euler(
    model_fn,
    x,
    diffusion,
    steps,
    *,
    generator=None,
    prediction="eps",
    spacing="leading",
    steps_offset=1,
    callback=None,
    progress=False,
    skip=0,
    replace=None,
    **opts,
):
    """Karras et al. 2022, Alg. 2 with S_churn = 0 and no 2nd-order correction: Euler steps of the
    probability-flow ODE dx/dsigma = (x - D(x; sigma)) / sigma in the variance-exploding variable
    x = x_t / sqrt(abar_t), sigma = sqrt((1 - abar) / abar) (their Table 1, "VP" column).

    As diffusers' EulerDiscreteScheduler: sigma interpolated linearly at the (possibly fractional)
    timesteps, the network sees x / sqrt(sigma^2 + 1) and the float timestep, the last sigma is 0.
    The noise x (N(0, I)) starts at x * sqrt(sigma_0^2 + 1); the callback's "x" is the VE variable.
    """
    ts, _ = _setup(
        "sample_euler",
        x,
        diffusion,
        steps,
        prediction,
        spacing,
        steps_offset,
        opts,
        {},
        integer=False,
        skip=skip,
    )
    sigmas = torch.cat([diffusion.sigma_at(ts), torch.zeros(1, dtype=torch.float64)]).tolist()

    def replaced_ve(x, s):  # the hook sees the VP x_t
        vp = math.sqrt(s**2 + 1)  # x_VE = x_VP * sqrt(sigma^2 + 1)
        return x if replace is None else replace(x / vp, 1 / (s**2 + 1)) * vp

    x = replaced_ve(x * math.sqrt(sigmas[0] ** 2 + 1), sigmas[0])  # VP noise -> VE x
    for i in tqdm(range(len(ts)), disable=not progress, desc="euler"):
        s, s_next = sigmas[i], sigmas[i + 1]
        x_in = x / math.sqrt(s**2 + 1)  # the VP x_t the net expects
        out = model_fn(x_in, _t(ts[i].item(), x, torch.float32))
        # denoiser D(x; sigma)
        x0, _ = to_x0_eps(x_in, out, _scalar(1 / (s**2 + 1), x), prediction)
        d = (x - x0) / s  # Alg. 2, line 7
        x = replaced_ve(x + d * (s_next - s), s_next)  # Alg. 2, line 8
        if callback is not None:
            callback({"i": i, "t": ts[i].item(), "x": x, "x0": x0})
    return x


# ----------------------------------------------------------------------------------------------
# DPM-Solver++(2M)
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_dpmpp_2m(
    model_fn,
    x,
    diffusion,
    steps,
    *,
    generator=None,
    prediction="eps",
    spacing="leading",
    steps_offset=1,
    callback=None,
    progress=False,
    skip=0,
    replace=None,
    **opts,
):
    """Lu et al. 2022, "DPM-Solver++", Alg. 2 (multistep, second order, data prediction), in
    lambda = log(alpha / sigma), alpha = sqrt(abar), sigma = sqrt(1 - abar);
    h_i = lambda_i - lambda_{i-1}:
        r = h_{i-1} / h_i,  D = (1 + 1/(2r)) x0_{i-1} - 1/(2r) x0_{i-2}
        x_i = (sigma_i / sigma_{i-1}) x_{i-1} - alpha_i (exp(-h_i) - 1) D
    The first step is first order (D = x0); the last goes to sigma = 0, where the first-order
    update is x = x0 (the authors' "lower_order_final", as in diffusers' DPMSolverMultistepScheduler
    with final_sigmas_type "zero"). One model evaluation per step, like DDIM. Works best with
    "trailing" spacing: "linspace" ends with very large steps in lambda (t -> 0), where the
    second-order extrapolation loses its advantage.
    """
    ts, _ = _setup(
        "sample_dpmpp_2m",
        x,
        diffusion,
        steps,
        prediction,
        spacing,
        steps_offset,
        opts,
        {},
        skip=skip,
    )
    ab = diffusion.alphas_cumprod[ts.long()].tolist()
    x = _replaced(replace, x, ab[0])
    lam = [0.5 * math.log(a / (1 - a)) for a in ab]  # log(alpha / sigma)
    x0_prev = None
    for i in tqdm(range(len(ts)), disable=not progress, desc="dpm++2m"):
        t = int(ts[i])
        x0, _ = to_x0_eps(x, model_fn(x, _t(t, x)), _scalar(ab[i], x), prediction)
        if i + 1 == len(ts):
            x = x0  # sigma_next = 0
        else:
            h = lam[i + 1] - lam[i]
            if x0_prev is None:
                D = x0  # first-order step
            else:
                r = (lam[i] - lam[i - 1]) / h
                D = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            ratio = math.sqrt((1 - ab[i + 1]) / (1 - ab[i]))  # sigma_i / sigma_{i-1}
            x = ratio * x - math.sqrt(ab[i + 1]) * math.expm1(-h) * D
        x = _replaced(replace, x, ab[i + 1] if i + 1 < len(ts) else 1.0)
        x0_prev = x0
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


# ----------------------------------------------------------------------------------------------
# Latent consistency models: LCM and TCD
# ----------------------------------------------------------------------------------------------


def lcm_boundary_scalings(t, timestep_scaling=10.0, sigma_data=0.5):
    """The consistency model's boundary-condition scalings (Song et al. 2023, "Consistency Models",
    Sec. 3 and App. C; Luo et al. 2023 use them with the timestep scaled by s = timestep_scaling):
        c_skip(t) = sigma_data^2 / ((t s)^2 + sigma_data^2)
        c_out(t) = t s / sqrt((t s)^2 + sigma_data^2)
    so that f(x_t, t) = c_skip x_t + c_out x0 is the identity at t = 0 (c_skip 1, c_out 0).
    t: a number or a tensor (B,) of timesteps; returns (c_skip, c_out), numbers or tensors like t.
    """
    scaled = t * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


@torch.no_grad()
def sample_lcm(
    model_fn,
    x,
    diffusion,
    steps,
    *,
    generator=None,
    prediction="eps",
    spacing="leading",
    steps_offset=1,
    callback=None,
    progress=False,
    skip=0,
    replace=None,
    **opts,
):
    """Multistep latent consistency sampling, Luo et al. 2023 ("Latent Consistency Models"): at each
    timestep t the consistency function maps x_t to a clean sample,
        f(x_t, t) = c_skip(t) x_t + c_out(t) x0(x_t, t)     (lcm_boundary_scalings),
    which is re-noised with fresh noise z to the next timestep s,
        x_s = sqrt(abar_s) f + sqrt(1 - abar_s) z;
    the last step returns f. Timesteps from lcm_timesteps; spacing and steps_offset are unused.

    Options: original_steps (50, the distillation grid), timestep_scaling (10.0). Matches diffusers'
    LCMScheduler. The callback's "x0" is f.
    """
    ts, o = _setup(
        "sample_lcm",
        x,
        diffusion,
        steps,
        prediction,
        spacing,
        steps_offset,
        opts,
        {"original_steps": 50, "timestep_scaling": 10.0},
        skip=skip,
        lcm=True,
    )
    ac = diffusion.alphas_cumprod
    x = _replaced(replace, x, ac[int(ts[0])].item())
    for i in tqdm(range(len(ts)), disable=not progress, desc="lcm"):
        t = int(ts[i])
        x0, _ = to_x0_eps(x, model_fn(x, _t(t, x)), _scalar(ac[t].item(), x), prediction)
        c_skip, c_out = lcm_boundary_scalings(t, o["timestep_scaling"])
        f = c_out * x0 + c_skip * x  # the consistency function's clean sample
        if i + 1 < len(ts):  # re-noise to the next timestep
            ab_s = ac[int(ts[i + 1])].item()
            x = math.sqrt(ab_s) * f + math.sqrt(1 - ab_s) * _randn(x, generator)
        else:
            ab_s, x = 1.0, f
        x = _replaced(replace, x, ab_s)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": f})
    return x


@torch.no_grad()
def sample_tcd(
    model_fn,
    x,
    diffusion,
    steps,
    *,
    generator=None,
    prediction="eps",
    spacing="leading",
    steps_offset=1,
    callback=None,
    progress=False,
    skip=0,
    replace=None,
    **opts,
):
    """Strategic stochastic sampling of Zheng et al. 2024 ("Trajectory Consistency Distillation"):
    from timestep t, with t' the next timestep (0 after the last) and the intermediate
    s = floor((1 - gamma) t'), a deterministic DDIM step to s,
        x_s = sqrt(abar_s) x0 + sqrt(1 - abar_s) eps,
    then forward noise back up to t' with fresh noise z,
        x_t' = sqrt(abar_t' / abar_s) x_s + sqrt(1 - abar_t' / abar_s) z.
    gamma = 0 is deterministic (DDIM on the LCM timesteps); the last step has s = 0 and no noise,
    so the sample stands at abar_0, as in diffusers. Timesteps from lcm_timesteps; spacing and
    steps_offset are unused.

    Options: gamma (0.3, diffusers' default eta; in [0, 1]), original_steps (50). Matches diffusers'
    TCDScheduler.
    """
    ts, o = _setup(
        "sample_tcd",
        x,
        diffusion,
        steps,
        prediction,
        spacing,
        steps_offset,
        opts,
        {"gamma": 0.3, "original_steps": 50},
        skip=skip,
        lcm=True,
    )
    gamma = o["gamma"]
    if not 0 <= gamma <= 1:
        raise ValueError(f"sample_tcd: gamma must lie in [0, 1], got {gamma}")
    ac = diffusion.alphas_cumprod
    x = _replaced(replace, x, ac[int(ts[0])].item())
    for i in tqdm(range(len(ts)), disable=not progress, desc="tcd"):
        t = int(ts[i])
        t_next = int(ts[i + 1]) if i + 1 < len(ts) else 0
        s = math.floor((1 - gamma) * t_next)  # on LCM's grid as diffusers' float32 floor
        ab_next, ab_s = ac[t_next].item(), ac[s].item()
        x0, eps = to_x0_eps(x, model_fn(x, _t(t, x)), _scalar(ac[t].item(), x), prediction)
        x = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s) * eps  # DDIM to s
        if gamma > 0 and i + 1 < len(ts):
            x = math.sqrt(ab_next / ab_s) * x + math.sqrt(1 - ab_next / ab_s) * _randn(x, generator)
        x = _replaced(replace, x, ab_next if i + 1 < len(ts) else ab_s)
        if callback is not None:
            callback({"i": i, "t": t, "x": x, "x0": x0})
    return x


SAMPLERS = {
    "ddpm": sample_ddpm,
    "ddim": sample_ddim,
    "euler": sample_euler,
    "dpmpp_2m": sample_dpmpp_2m,
    "lcm": sample_lcm,
    "tcd": sample_tcd,
}
