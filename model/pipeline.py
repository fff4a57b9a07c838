"""Sampling procedures on a whole model: conditions in, images out. Used by sample.py, train.py's
previews, the demo and evaluation; editing (img2img, inpainting, canvases) joins them here.

    cond = conditions.request(model.cfg, 2, text=["a harbour", "farmland"], level=[17, 15])
    images = generate(
        model, cond, seeds=[0, 1], guidance=conditions.scales(model.cfg, 4.0, level=6.0)
    )
"""

import shutil
import time

import torch

from model import conditions
from model.diffusion import Diffusion
from model.guidance import guided_model_fn
from model.samplers import SAMPLERS


@torch.no_grad()
def generate(  # noqa: PLR0913 (keyword-only sampling options, shared by every caller)
    model,
    cond,
    *,
    seeds,
    sampler="dpmpp_2m",
    steps=20,
    guidance=None,
    negative_prompt="",
    size=(256, 256),
    interval=None,
    rescale=0.0,
    dtype=torch.float32,
    progress=False,
    noise=None,
    decode_tile=None,
    unet=None,
):
    """Sample one image per row of the raw conditions `cond` (conditions.request): returns
    images (B, 3, H, W) in [-1, 1] (float32, CPU).

    The initial noise of image i is drawn on the CPU from `seeds[i]`, so a seed gives the same image
    on any device (up to the device's arithmetic). `noise` (B, C, h, w) overrides that, for tests.
    guidance: {condition: scale} (default: every condition at 4.0, jointly); the null branch is the
    negative prompt (or "") with every other condition at its null (level 0). The text and the
    negative prompt may be given encoded (model.encode_text's contexts), and then the text encoder
    is not used. `unet` replaces model.unet (e.g. the EMA weights during training).
    """
    net = model.unet if unet is None else unet
    B = conditions.batch_size(cond)
    if len(seeds) != B:
        raise ValueError(f"need one seed per image: {B} conditions, {len(seeds)} seeds")
    H, W = size
    f = model.vae.downsample
    if H % f or W % f:
        raise ValueError(f"size {H}x{W}: height and width must be multiples of {f}")
    if noise is None:
        noise = initial_noise(model, seeds, (H // f, W // f))
    model_fn = guided_denoiser(
        model,
        cond,
        guidance=guidance,
        negative_prompt=negative_prompt,
        interval=interval,
        rescale=rescale,
        dtype=dtype,
        unet=net,
    )
    x = noise.to(next(net.parameters()).device, torch.float32)  # B, 4, h, w
    z = run_sampler(
        model, model_fn, x, sampler=sampler, steps=steps, seed=seeds[0], progress=progress
    )
    return decode(model, z, decode_tile)


def initial_noise(model, seeds, latent_size):
    """N(0, I) latents (B, C, h, w), image i drawn on the CPU from seeds[i]
    (the same on any device)."""
    shape = (model.cfg.unet.out_channels, *latent_size)
    return torch.stack(
        [torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]
    )


def decode(model, z, tile=None):
    """Latents -> images (B, 3, H, W) in [-1, 1], float32 on the CPU (tile: VAE decode tile,
    latent pixels)."""
    images = model.vae.decode_latents(z.to(next(model.vae.parameters())), tile=tile)
    return images.float().clamp(-1, 1).cpu()


def guided_denoiser(
    model,
    cond,
    *,
    guidance=None,
    negative_prompt="",
    interval=None,
    rescale=0.0,
    dtype=torch.float32,
    unet=None,
    extra=None,
):
    """The model_fn(x_t, t) the samplers call: the U-Net (or `unet`) in its own dtype under
    classifier-free guidance (model/guidance.py) for the raw or encoded conditions `cond` (batch B).
    extra (B, E, h, w), if given, is concatenated to x_t on the channels in every branch (the
    inpainting U-Net's mask and masked-image latent). x_t may live on another device
    (a canvas on the CPU): the prediction comes back where x_t is."""
    net = model.unet if unet is None else unet
    device, unet_dtype = next(net.parameters()).device, next(net.parameters()).dtype

    def encoded(raw):  # the U-Net's dtype for its context
        return {
            k: v.to(unet_dtype) if k == "text" else v
            for k, v in model.encode_conditions(raw, device).items()
        }

    c = encoded(cond)  # text: B, 77, D
    null = encoded(conditions.nulls(model.cfg, 1, negative_prompt))  # text: 1, 77, D
    if extra is not None:
        extra = extra.to(device, torch.float32)

    def denoiser(x_t, t, cc):  # the U-Net in its own dtype
        if extra is not None:  # the branches stack B-batches
            x_t = torch.cat([x_t, extra.repeat(x_t.shape[0] // extra.shape[0], 1, 1, 1)], dim=1)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return net(x_t.to(unet_dtype), t, cc).float()

    model_fn = guided_model_fn(
        denoiser,
        c,
        null,
        guidance or conditions.scales(model.cfg),
        interval=interval,
        rescale=rescale,
    )

    def on_device(x, t):
        return model_fn(x.to(device, torch.float32), t.to(device)).to(x.device)

    return on_device


def spacing_for(model, sampler):
    """(spacing, steps_offset) the sampler runs with: DPM-Solver++(2M) is measurably
    better from t = T-1 ("trailing") than from the release's "leading" steps
    (benchmarks/results/samplers_cpu.md); the other samplers follow the release's
    scheduler config."""
    dcfg = model.cfg.diffusion
    return ("trailing", 0) if sampler == "dpmpp_2m" else (dcfg.spacing, dcfg.steps_offset)


def run_sampler(
    model,
    model_fn,
    x,
    *,
    sampler="dpmpp_2m",
    steps=20,
    seed=0,
    progress=False,
    skip=0,
    replace=None,
):
    """Run SAMPLERS[sampler] from x (noise, or a noisy latent at the skip-th timestep) with the
    model's noise schedule; stochastic samplers draw from a generator seeded with `seed` on x's
    device. Returns latents."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
    dcfg = model.cfg.diffusion
    spacing, offset = spacing_for(model, sampler)
    return SAMPLERS[sampler](
        model_fn,
        x,
        Diffusion.from_config(dcfg),
        steps,
        generator=torch.Generator(x.device).manual_seed(seed),
        prediction=dcfg.prediction,
        spacing=spacing,
        steps_offset=offset,
        progress=progress,
        skip=skip,
        replace=replace,
    )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def device_and_dtype(device, dtype=None):
    """Check a device name ("cpu", "cuda", "cuda:N") and a precision name (DTYPES; default bf16 on a
    GPU, fp32 on the CPU) for sampling on this machine: (torch.device, torch.dtype), or ValueError
    naming the problem."""
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {device!r} is not a device (cpu, cuda, cuda:N)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    dt = DTYPES[dtype or ("bf16" if dev.type == "cuda" else "fp32")]
    if dev.type == "cuda" and dt == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise ValueError(
            f"--dtype bf16: {torch.cuda.get_device_name(dev)} does not support bfloat16 (use fp16)"
        )
    if dev.type == "cpu" and dt == torch.float16:
        raise ValueError(
            "--dtype fp16 is refused on the CPU (no fast half-precision kernels: several times "
            "slower than fp32); use bf16 or fp32"
        )
    return dev, dt


def compile_problem(device):
    """Why torch.compile cannot run on `device` here (one line), or None: Inductor needs a C++
    compiler for the CPU and Triton for CUDA."""
    device = torch.device(device)
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "clang++", "c++")):
        return (
            "torch.compile on the CPU needs a C++ compiler (g++ or clang++) on the PATH, and none "
            "was found"
        )
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile on CUDA needs Triton, which is not installed (pip install triton)"
    return None


def freeze_compiled_weights(device):
    """On the CPU, turn on Inductor's freezing: code compiled with gradients off takes the weights
    as constants, so convolutions and matmuls run on weights packed once for oneDNN
    (benchmarks/results/unet_cpu.md: the U-Net's forward goes from about diffusers' time to less).
    Dynamo reads the setting while tracing and applies it only with gradients disabled, so compiles
    for training are unaffected; it is process-wide. A frozen module must not have its weights
    changed afterwards, and holds a packed copy of them."""
    if torch.device(device).type == "cpu":
        from torch._inductor import config as inductor_config

        inductor_config.freezing = True


def prepare_for_sampling(model, compile=False, channels_last=False):
    """Make sampling faster in place: the U-Net and the VAE decoder stored in the channels-last
    (NHWC) layout and/or compiled for inference (nn.Module.compile, weights frozen on the CPU:
    freeze_compiled_weights; names and state dicts unchanged; the first call at each shape compiles,
    ~1.5 min for the full U-Net on 2 CPU cores). RuntimeError naming the problem when the compiler
    is unavailable (compile_problem). benchmarks/results/ has what each pays on which machine."""
    device = next(model.unet.parameters()).device
    if compile:
        problem = compile_problem(device)
        if problem:
            raise RuntimeError(problem)
        freeze_compiled_weights(device)
    for module in (model.unet, model.vae.decoder):
        if channels_last:
            module.to(memory_format=torch.channels_last)
        if compile:
            module.requires_grad_(False)
            module.compile()
    return model


def preview(model, unet, prompts, levels, size, steps=20):
    """One image per prompt (seed i for prompt i) at its level, the model's default guidance, from
    `unet` (e.g. the EMA weights during training): what train.py's previews show."""
    has_level = "level" in model.cfg.condition_names()
    cond = conditions.request(
        model.cfg, len(prompts), text=list(prompts), level=list(levels) if has_level else None
    )
    return generate(
        model, cond, seeds=list(range(len(prompts))), steps=steps, size=(size, size), unet=unet
    )


def sampling_seconds(model, cond, guidance, steps, n_images, **kw):
    """Seconds `generate` will take for n_images in batches the size of `cond`
    (raw conditions, one batch), with these guidance and solver steps: one batch timed at 2 and at 4
    steps, extrapolated (the fixed part, text encoding and decoding, counted once a batch). The
    weights need not be trained: the cost is the architecture's."""
    times = []
    for n in (2, 4):
        t = time.perf_counter()
        generate(
            model,
            cond,
            seeds=list(range(conditions.batch_size(cond))),
            steps=n,
            guidance=guidance,
            **kw,
        )
        times.append(time.perf_counter() - t)
    per_step = max(times[1] - times[0], 0.0) / 2
    batches = -(-n_images // conditions.batch_size(cond))
    return batches * (max(times[0] - 2 * per_step, 0.0) + per_step * steps)
