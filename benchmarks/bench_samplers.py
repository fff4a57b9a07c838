"""Sampler quality vs steps, speed, and the cost of interval guidance, on the CPU.

Two fixed models stand in for the U-Net (no weights needed):
- "gaussian": the exact optimal eps for data ~ N(mu, s^2) per element (float64, 4x32x32 latents);
- "convnet": a fixed random 3-layer conv net of (x, t) on 4x32x32 latents, heavy enough that the
  model, not the sampler, dominates wall time (as with the real U-Net).
Error = RMS distance of the final sample to a reference solution from the same noise: DDIM at 1000
and 500 steps, Richardson-extrapolated (2 x_1000 - x_500 cancels DDIM's first-order error), all with
"trailing" spacing (every run starts at t = 999) and the last step to abar = 1. Timings interleave
the runs and keep the fastest of N, since the CPU may be shared.

A last section compares the timestep spacing sample.py gets from the release's scheduler config
("leading", steps_offset 1: DPM-Solver++(2M)-20 starts at t = 951, DDIM-50 at t = 981) with
"trailing" (starts at t = 999). Besides the error to the reference above it reports the error to the
converged solution of the ODE from the sampler's own first timestep (pure discretisation error) and,
for the gaussian model, the exact 2-Wasserstein distance of the sampled distribution to the data
N(mu, s^2): every sampler is affine in x there, so out = A x + b per element, and
W2^2 = mean((b - mu)^2 + (|A| - s)^2).
    python benchmarks/bench_samplers.py            # writes benchmarks/results/samplers_cpu.md
"""

import argparse
import math
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.diffusion import Diffusion  # noqa: E402
from model.guidance import guided_model_fn  # noqa: E402
from model.samplers import sample_ddim, sample_dpmpp_2m, sample_euler  # noqa: E402

ODE_SAMPLERS = {"ddim": sample_ddim, "euler": sample_euler, "dpmpp_2m": sample_dpmpp_2m}
STEPS = [5, 10, 15, 20, 30, 50, 100]


# ----------------------------------------------------------------------------------------------
# Stand-in models
# ----------------------------------------------------------------------------------------------


def gaussian_model(diffusion, shape, seed=0):
    """eps*(x_t, t) = sigma (x_t - alpha mu) / (alpha^2 s^2 + sigma^2),
    exact for x0 ~ N(mu, s^2)."""
    g = torch.Generator().manual_seed(seed)
    mu = 0.5 * torch.randn(1, *shape, generator=g, dtype=torch.float64)
    s = 0.3 + 0.7 * torch.rand(1, *shape, generator=g, dtype=torch.float64)

    def model_fn(x, t):
        sig_ve = diffusion.sigma_at(t.double().cpu()).to(x)  # B (fractional t for Euler)
        abar = (1 / (1 + sig_ve**2)).reshape(-1, 1, 1, 1)
        a, sig = abar.sqrt(), (1 - abar).sqrt()
        return sig * (x - a * mu) / (a * a * s * s + sig * sig)

    model_fn.mu, model_fn.s = mu, s  # the data distribution
    return model_fn


class ConvNet(torch.nn.Module):
    """A fixed random conv net eps(x, t, context, level); context and level
    enter as channel biases."""

    def __init__(self, ch=4, width=64, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.c1 = torch.nn.Conv2d(ch, width, 3, padding=1)
        self.c2 = torch.nn.Conv2d(width, width, 3, padding=1)
        self.c3 = torch.nn.Conv2d(width, ch, 3, padding=1)
        self.freq = torch.nn.Parameter(torch.randn(width) / 300)
        self.ctx = torch.nn.Linear(16, width)

    @torch.no_grad()
    def forward(self, x, t, context=None, level=None):
        t = torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0])
        emb = torch.sin(t[:, None] * self.freq)  # B, width
        if context is not None:
            emb = emb + self.ctx(context.mean(1)) + 0.01 * level[:, None]
        h = torch.tanh(self.c1(x) + emb[:, :, None, None])  # B, width, H, W
        h = torch.tanh(self.c2(h))
        return 0.5 * x + 0.3 * self.c3(h)  # B, ch, H, W


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------


def run(name, model_fn, x, d, steps, spacing="trailing", steps_offset=1, **kw):
    if name == "ddim":
        kw = {"set_alpha_to_one": True, **kw}
    return ODE_SAMPLERS[name](
        model_fn, x, d, steps, spacing=spacing, steps_offset=steps_offset, **kw
    )


def ddim_from(model_fn, x, d, t0, stride):
    """DDIM (Eq. 12, eta 0) through t0, t0 - stride, ..., ending at abar = 1: the ODE
    from t0, for references."""
    ac = d.alphas_cumprod
    ts = list(range(t0, -1, -stride))
    for i, t in enumerate(ts):
        ab_t = ac[t].item()
        ab_s = ac[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        eps = model_fn(x, torch.full((x.shape[0],), t, dtype=torch.long))
        x0 = (x - math.sqrt(1 - ab_t) * eps) / math.sqrt(ab_t)
        x = math.sqrt(ab_s) * x0 + math.sqrt(1 - ab_s) * eps
    return x


def ode_reference(model_fn, x, d, t0):
    """The converged ODE solution from x at timestep t0 (Richardson: 2 x_stride1 - x_stride2)."""
    return 2 * ddim_from(model_fn, x, d, t0, 1) - ddim_from(model_fn, x, d, t0, 2)


def rms(a, b):
    return (a.double() - b.double()).pow(2).mean().sqrt().item()


def steps_to_reach(name, model_fn, x, d, ref, target, max_steps=200):
    """Fewest steps whose error is <= target (errors fall with steps; scanned upward)."""
    for n in range(1, max_steps + 1):
        if rms(run(name, model_fn, x, d, n), ref) <= target:
            return n
    return None


def walls(fns, repeats):
    """Fastest of `repeats` wall times for each function, the runs interleaved."""
    best = [math.inf] * len(fns)
    for _ in range(repeats + 1):  # first round: warm-up
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0) if _ else best[i]
    return best


def t_of_sigma(d, sigma):
    """The timestep whose VE noise level is closest to sigma."""
    return int((d.sigmas - sigma).abs().argmin())


SPACING_RUNS = [  # (label, sampler, steps, spacing, options); sample.py passes no options
    ("DPM-Solver++(2M)-20, leading + 1 (sample.py now)", "dpmpp_2m", 20, "leading", {}),
    ("DPM-Solver++(2M)-20, trailing", "dpmpp_2m", 20, "trailing", {}),
    (
        "DDIM-50, leading + 1, last step to abar_0 (sample.py now)",
        "ddim",
        50,
        "leading",
        {"set_alpha_to_one": False},
    ),
    ("DDIM-50, leading + 1, last step to abar = 1", "ddim", 50, "leading", {}),
    ("DDIM-50, trailing, last step to abar = 1", "ddim", 50, "trailing", {}),
]


def spacing_section(models, refs, d, shape):
    """Leading + steps_offset 1 (the release config, what sample.py uses) vs
    trailing; see module docstring."""
    from model.samplers import make_timesteps

    mu, s = models["gaussian"][0].mu, models["gaussian"][0].s

    def w2(name, model_fn, steps, spacing, kw):
        zero = torch.zeros(1, *shape, dtype=torch.float64)
        b = run(name, model_fn, zero, d, steps, spacing, **kw)
        a = run(name, model_fn, zero + 1, d, steps, spacing, **kw) - b
        return ((b - mu).pow(2) + (a.abs() - s).pow(2)).mean().sqrt().item()

    lines = [
        "## Spacing: the release's leading + steps_offset 1 vs trailing",
        "",
        "Error to the reference (ODE from t = 999, as above) and to the converged ODE from the "
        "sampler's own first timestep; W2 = exact 2-Wasserstein distance of the sampled "
        "distribution to the gaussian model's data distribution (the reference's own W2 is given "
        "for scale).",
        "",
    ]
    for mname, (model_fn, _) in models.items():
        x, ref = refs[mname]
        own = {}
        gauss = mname == "gaussian"
        lines += [
            f"### {mname} model",
            "",
            "| run | timesteps | error to reference (t=999) | error to ODE from own start |"
            + (" W2 to data |" if gauss else ""),
            "|---|---|---|---|" + ("---|" if gauss else ""),
        ]
        for label, name, steps, spacing, kw in SPACING_RUNS:
            ts = make_timesteps(d.num_steps, steps, spacing, 1)
            t0 = int(ts[0])
            if t0 not in own:
                own[t0] = ode_reference(model_fn, x, d, t0)
            out = run(name, model_fn, x, d, steps, spacing, **kw)
            row = (
                f"| {label} | {t0}..{int(ts[-1])} | {rms(out, ref):.2e} | {rms(out, own[t0]):.2e} |"
            )
            lines.append(
                row + (f" {w2(name, model_fn, steps, spacing, kw):.2e} |" if gauss else "")
            )
        if gauss:
            lines += [
                "",
                "W2 to data of the references: "
                + ", ".join(
                    f"ODE from t={t0} {w2_of_ode(model_fn, d, t0, shape, mu, s):.2e}"
                    for t0 in sorted(own, reverse=True)
                )
                + ".",
            ]
        lines += [
            "",
            "DPM-Solver++(2M) error to the reference (t=999) vs steps:",
            "",
            "| steps | leading + 1 | trailing |",
            "|---|---|---|",
        ]
        lines += [
            f"| {n} | {rms(run('dpmpp_2m', model_fn, x, d, n, 'leading'), ref):.2e} | "
            f"{rms(run('dpmpp_2m', model_fn, x, d, n, 'trailing'), ref):.2e} |"
            for n in STEPS
        ]
        lines.append("")
    return lines


def w2_of_ode(model_fn, d, t0, shape, mu, s):
    zero = torch.zeros(1, *shape, dtype=torch.float64)
    b = ode_reference(model_fn, zero, d, t0)
    a = ode_reference(model_fn, zero + 1, d, t0) - b
    return ((b - mu).pow(2) + (a.abs() - s).pow(2)).mean().sqrt().item()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (fastest reported)")
    ap.add_argument("--batch", type=int, default=4, help="latents per batch")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "samplers_cpu.md"))
    args = ap.parse_args()
    torch.manual_seed(0)
    d = Diffusion()
    shape = (4, 32, 32)
    lines = [
        f"# Samplers on the CPU ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__})",
        "",
        f"Batch {args.batch} of 4x32x32 latents, trailing spacing, error = RMS distance to the "
        "reference (2 DDIM-1000 - DDIM-500) from the same noise.",
        "",
    ]

    # --- quality vs steps ---
    needed, refs = {}, {}
    convnet = ConvNet()
    models = {
        "gaussian": (gaussian_model(d, shape), torch.float64),
        "convnet": (lambda x, t: convnet(x, t), torch.float32),
    }
    for mname, (model_fn, dtype) in models.items():
        x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
        ddim1000 = run("ddim", model_fn, x, d, 1000)
        ref = 2 * ddim1000 - run("ddim", model_fn, x, d, 500)  # Richardson extrapolation
        refs[mname] = (x, ref)
        dpm1000 = run("dpmpp_2m", model_fn, x, d, 1000)
        errs = {s: {n: rms(run(s, model_fn, x, d, n), ref) for n in STEPS} for s in ODE_SAMPLERS}
        target = errs["ddim"][50]
        needed[mname] = {s: steps_to_reach(s, model_fn, x, d, ref, target) for s in ODE_SAMPLERS}
        lines += [
            f"## Error vs steps, {mname} model (reference norm "
            f"{ref.double().pow(2).mean().sqrt():.3f})",
            "",
            "| steps | " + " | ".join(ODE_SAMPLERS) + " |",
            "|---" * (len(ODE_SAMPLERS) + 1) + "|",
        ]
        lines += [
            f"| {n} | " + " | ".join(f"{errs[s][n]:.2e}" for s in ODE_SAMPLERS) + " |"
            for n in STEPS
        ]
        lines += [
            "",
            f"Steps to reach DDIM-50's error ({target:.2e}): "
            + ", ".join(f"{s} {needed[mname][s]}" for s in ODE_SAMPLERS)
            + ". "
            f"Reference check: DDIM-1000 is {rms(ddim1000, ref):.1e} and DPM-Solver++(2M)-1000 "
            f"{rms(dpm1000, ref):.1e} from it.",
            "",
        ]

    # --- speed: DPM-Solver++(2M)-20 vs DDIM-50 on the conv net ---
    x = torch.randn(args.batch, *shape, generator=torch.Generator().manual_seed(1))

    def model_fn(x, t):
        return convnet(x, t)

    n_dpm = needed["convnet"]["dpmpp_2m"]
    t_model, t_ddim50, t_dpm20, t_dpm_n = walls(
        [
            lambda: convnet(x, torch.full((args.batch,), 500)),
            lambda: run("ddim", model_fn, x, d, 50),
            lambda: run("dpmpp_2m", model_fn, x, d, 20),
            lambda: run("dpmpp_2m", model_fn, x, d, n_dpm),
        ],
        args.repeats,
    )
    lines += [
        "## Wall time (conv net; fastest of %d)" % args.repeats,
        "",
        "| run | model evals | seconds |",
        "|---|---|---|",
        f"| one model forward | 1 | {t_model:.4f} |",
        f"| DDIM-50 | 50 | {t_ddim50:.3f} |",
        f"| DPM-Solver++(2M)-20 | 20 | {t_dpm20:.3f} |",
        f"| DPM-Solver++(2M)-{n_dpm} (DDIM-50's error) | {n_dpm} | {t_dpm_n:.3f} |",
        "",
        f"DPM-Solver++(2M)-20 is {t_ddim50 / t_dpm20:.2f}x faster than DDIM-50 (target >= 2.3x); "
        f"at equal error (DPM-{n_dpm} vs DDIM-50) {t_ddim50 / t_dpm_n:.2f}x. "
        f"Sampler overhead outside the model: {(t_ddim50 - 50 * t_model) / 50 * 1e3:.2f} ms/step.",
        "",
    ]

    # --- guidance: always-on vs interval (Kynkaanniemi et al. 2024) ---
    g = torch.Generator().manual_seed(2)
    ctx, null_ctx = torch.randn(args.batch, 77, 16, generator=g), torch.zeros(1, 77, 16)
    level = torch.full((args.batch,), 17.0)
    lo, hi = t_of_sigma(d, 0.28), t_of_sigma(d, 5.42)  # their SD-XL sigma interval
    rows, fns = [], []
    for label, interval in [("always on", None), (f"interval t in [{lo}, {hi}]", (lo, hi))]:
        seen = []

        def unet(x, t, cond, seen=seen):
            seen.append(x.shape[0])
            return convnet(x, t, cond["text"], cond["level"])

        fn = guided_model_fn(
            unet,
            {"text": ctx, "level": level},
            {"text": null_ctx, "level": 0.0},
            {"text": 4.0, "level": 4.0},
            interval=interval,
        )
        run("ddim", fn, x, d, 50)
        rows.append([label, len(seen), sum(seen) / args.batch])
        fns.append(lambda fn=fn: run("ddim", fn, x, d, 50))
    for row, seconds in zip(rows, walls(fns, args.repeats)):
        row.append(seconds)
    lines += [
        "## Guidance cost (DDIM-50, scale 4, conv net)",
        "",
        "| guidance | forward calls | sample-forwards per sample | seconds |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r[0]} | {r[1]} | {r[2]:.0f} | {r[3]:.3f} |" for r in rows]
    lines += [
        "",
        f"Interval guidance costs {rows[1][2] / rows[0][2]:.2f}x the model work and "
        f"{rows[1][3] / rows[0][3]:.2f}x the time of always-on guidance.",
        "",
    ]

    lines += spacing_section(models, refs, d, shape)

    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
