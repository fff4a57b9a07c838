"""Diffusion math: noise schedules, the forward process,
prediction conversions and the training loss.

Discrete-time variance-preserving diffusion (Ho et al. 2020, "DDPM") with T training steps:
    x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * eps,    t in [0, T)
    abar_t = prod_{s<=t} (1 - beta_s)
The network predicts eps, x0 or v (Salimans & Ho 2022); everything here converts between them.
Samplers live in model/samplers.py, classifier-free guidance in model/guidance.py.
Shapes: B batch, C channels, H, W spatial. Schedules are float64; tensors keep their own dtype.
"""

import math

import torch

PREDICTIONS = ("eps", "v", "x0")


# ----------------------------------------------------------------------------------------------
# Noise schedules: functions returning betas, float64 (T,)
# ----------------------------------------------------------------------------------------------


def scaled_linear(num_steps=1000, beta_start=0.00085, beta_end=0.012):
    """Latent diffusion's schedule (Rombach et al. 2022, released configs):
    betas linear in sqrt space."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_steps, dtype=torch.float64) ** 2


def linear(num_steps=1000, beta_start=1e-4, beta_end=0.02):
    """DDPM's schedule (Ho et al. 2020, Sec. 4): betas linear from 1e-4 to 0.02 for T = 1000."""
    return torch.linspace(beta_start, beta_end, num_steps, dtype=torch.float64)


def cosine(num_steps=1000, s=0.008, max_beta=0.999):
    """Nichol & Dhariwal 2021, Eq. 17: abar(t) = f(t) / f(0),
    f(t) = cos^2(((t/T + s) / (1 + s)) * pi/2).

    betas = 1 - abar(t+1) / abar(t), clipped to max_beta (their Sec. 3.2) to avoid a
    singularity at t = T.
    """

    def f(u):
        return math.cos((u + s) / (1 + s) * math.pi / 2) ** 2

    betas = [min(1 - f((i + 1) / num_steps) / f(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


# ----------------------------------------------------------------------------------------------
# Prediction conversions (Salimans & Ho 2022, Sec. 4 and App. D); abar broadcasts against x
# ----------------------------------------------------------------------------------------------


def eps_to_x0(x_t, eps, abar):
    """DDPM Eq. 4 solved for x0: x0 = (x_t - sqrt(1 - abar) eps) / sqrt(abar)."""
    return (x_t - (1 - abar).sqrt() * eps) / abar.sqrt()


def x0_to_eps(x_t, x0, abar):
    """DDPM Eq. 4 solved for eps: eps = (x_t - sqrt(abar) x0) / sqrt(1 - abar)."""
    return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()


def v_target(x0, eps, abar):
    """Salimans & Ho 2022, Sec. 4: v = alpha eps - sigma x0 with alpha = sqrt(abar),
    sigma = sqrt(1 - abar)."""
    return abar.sqrt() * eps - (1 - abar).sqrt() * x0


def v_to_x0(x_t, v, abar):
    """Salimans & Ho 2022, App. D: x0 = alpha x_t - sigma v."""
    return abar.sqrt() * x_t - (1 - abar).sqrt() * v


def v_to_eps(x_t, v, abar):
    """Salimans & Ho 2022, App. D: eps = sigma x_t + alpha v."""
    return (1 - abar).sqrt() * x_t + abar.sqrt() * v


def check_prediction(prediction):
    if prediction not in PREDICTIONS:
        raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


def to_x0_eps(x_t, out, abar, prediction):
    """Model output (eps, v or x0 prediction) at x_t -> (x0, eps) estimates,
    both shaped like x_t."""
    if prediction == "eps":
        return eps_to_x0(x_t, out, abar), out
    if prediction == "v":
        return v_to_x0(x_t, out, abar), v_to_eps(x_t, out, abar)
    if prediction == "x0":
        return out, x0_to_eps(x_t, out, abar)
    raise ValueError(f"prediction must be one of {PREDICTIONS}, got {prediction!r}")


# ----------------------------------------------------------------------------------------------
# The process: schedule, forward noising, training loss
# ----------------------------------------------------------------------------------------------


class Diffusion:
    """A discrete VP diffusion: betas and alphas_cumprod, float64 (T,), on the CPU.

    Build with `Diffusion(scaled_linear())` (the release) or `Diffusion.from_config(cfg.diffusion)`.
    """

    def __init__(self, betas=None):
        betas = scaled_linear() if betas is None else torch.as_tensor(betas, dtype=torch.float64)
        if betas.ndim != 1 or len(betas) < 2:
            raise ValueError(
                f"betas must be a 1-D tensor of at least 2 steps, got shape {tuple(betas.shape)}"
            )
        if not bool(((betas > 0) & (betas < 1)).all()):
            raise ValueError(
                f"betas must lie in (0, 1), got range [{betas.min().item()}, {betas.max().item()}]"
            )
        self.betas = betas.cpu()
        self.alphas_cumprod = torch.cumprod(1 - self.betas, dim=0)  # abar_t, (T,)
        # VE noise level, (T,)
        self.sigmas = ((1 - self.alphas_cumprod) / self.alphas_cumprod).sqrt()
        self._cache = self.alphas_cumprod

    @classmethod
    def from_config(cls, cfg):
        """From a `DiffusionConfig` (fields num_steps, schedule, beta_start, beta_end)."""
        if cfg.schedule == "scaled_linear":
            return cls(scaled_linear(cfg.num_steps, cfg.beta_start, cfg.beta_end))
        if cfg.schedule == "linear":
            return cls(linear(cfg.num_steps, cfg.beta_start, cfg.beta_end))
        if cfg.schedule == "cosine":
            return cls(cosine(cfg.num_steps))
        raise ValueError(
            "diffusion.schedule must be 'scaled_linear', 'linear' or 'cosine', got "
            f"{cfg.schedule!r}"
        )

    @property
    def num_steps(self):
        return len(self.betas)

    def snr(self, t):
        """Signal-to-noise ratio abar / (1 - abar) at integer timesteps t (B,) -> (B,) float64."""
        abar = self.alphas_cumprod[t.cpu().long()]
        return abar / (1 - abar)

    def abar(self, t, x):
        """abar at integer timesteps t (B,), shaped (B, 1, ..., 1) to broadcast against x,
        in x's dtype."""
        t = torch.as_tensor(t, device=x.device).reshape(-1).long()
        if bool(((t < 0) | (t >= self.num_steps)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.num_steps}), got {t.tolist()}")
        if self._cache.device != x.device:  # one float64 copy per device
            self._cache = self.alphas_cumprod.to(x.device)
        return self._cache[t].to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))

    def sigma_at(self, t):
        """VE noise level sqrt((1 - abar) / abar) at fractional timesteps t
        (tensor, float), linearly interpolated between the integer steps as diffusers'
        EulerDiscreteScheduler does. float64."""
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_steps - 1)
        lo = t.floor().long().clamp(max=self.num_steps - 2)
        w = t - lo
        return (1 - w) * self.sigmas[lo] + w * self.sigmas[lo + 1]

    def sample_timesteps(self, batch_size, generator=None, device=None, power=1.0):
        """t ~ Uniform{0, ..., T-1} (Ho et al. 2020, Alg. 1, line 3) for power 1; else
        t = floor(T u ** (1 / power)), u ~ U(0, 1): power 2 makes the density rise linearly with t.
        Returns (B,) long."""
        if power == 1.0:
            return torch.randint(
                0, self.num_steps, (batch_size,), generator=generator, device=device
            )
        u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=device)
        return (self.num_steps * u ** (1.0 / power)).long().clamp_(max=self.num_steps - 1)

    def q_sample(self, x0, t, noise):
        """Ho et al. 2020, Eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps.
        x0, noise (B, C, H, W); t (B,)."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        abar = self.abar(t, x0)
        return abar.sqrt() * x0 + (1 - abar).sqrt() * noise

    def min_snr_weight(self, t, prediction, gamma):
        """Min-SNR-gamma loss weights (Hang et al. 2023, Eq. 11: w_t = min(SNR_t, gamma) on the
        x0-MSE), rewritten for the loss actually computed: the eps-MSE is SNR times the x0-MSE and
        the v-MSE is (SNR + 1) times it, so w = min(SNR, g) / SNR (eps), min(SNR, g) / (SNR + 1)
        (v), min(SNR, g) (x0). t (B,) -> (B,) float64."""
        check_prediction(prediction)
        if gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {gamma}")
        snr = self.snr(t)
        w = snr.clamp(max=gamma)
        if prediction == "eps":
            return w / snr
        if prediction == "v":
            return w / (snr + 1)
        return w

    def training_losses(self, model_fn, x0, t, noise=None, *, prediction="eps", min_snr_gamma=None):
        """The simple loss (Ho et al. 2020, Eq. 14 / Alg. 1) for any prediction target,
        optionally min-SNR weighted.

        model_fn(x_t, t) -> prediction (B, C, H, W); x0 (B, C, H, W); t (B,) long; noise like x0
        (drawn if None). Returns {"loss": (B,) weighted per-sample loss, "mse": (B,) unweighted MSE,
        "x_t": noised input}.
        """
        check_prediction(prediction)
        noise = torch.randn_like(x0) if noise is None else noise
        x_t = self.q_sample(x0, t, noise)  # B, C, H, W
        out = model_fn(x_t, t)
        if out.shape != x0.shape:
            raise ValueError(f"model output shape {tuple(out.shape)} != x0 shape {tuple(x0.shape)}")
        if prediction == "eps":
            target = noise
        elif prediction == "v":
            target = v_target(x0, noise, self.abar(t, x0))
        else:
            target = x0
        err = out - target
        # reduce in >= fp32
        err = err.float() if err.dtype in (torch.float16, torch.bfloat16) else err
        mse = err.pow(2).flatten(1).mean(1)  # B
        loss = mse
        if min_snr_gamma is not None:
            loss = mse * self.min_snr_weight(t, prediction, min_snr_gamma).to(mse.device, mse.dtype)
        return {"loss": loss, "mse": mse, "x_t": x_t}
