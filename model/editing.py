"""Editing procedures on a whole model: inpainting, img2img (SDEdit), cloud masks,
and canvases of any size.

    images = inpaint(model, cond, image, mask, seeds=[0])  # mask 1 = regenerate, 0 = keep
    # img2img: also super-resolution and dehazing (PRESETS)
    images = img2img(model, cond, image, strength=0.5, seeds=[0])
    canvas = extend(model, prompts, size=(1024, 4096), values={"level": 16}, tile=256,
                    method="multidiffusion")

Images are (B, 3, H, W) in [-1, 1], masks (B, 1, H, W) with the release's convention:
white (1) = regenerate, black (0) = keep, masked image = image * (mask < 0.5). `cond` holds raw or
encoded conditions as for pipeline.generate, and every function takes generate's sampling keywords
(sampler, steps, guidance, negative_prompt, interval, rescale, dtype, progress, unet). Two ways to
inpaint:
    "model"    the 9-channel inpainting U-Net (Text2Earth-inpainting) reads [x_t, mask, masked-image
               latent], computed as diffusers' StableDiffusionInpaintPipeline computes it
               (tests/test_edit.py);
    "replace"  any text-to-image U-Net: after every step the known region's latent is replaced by
               the original latent re-noised to the step's level (Meng et al. 2022, "SDEdit",
               Sec. 4.2; Lugmayr et al. 2022, "RePaint", Eq. 8); `resample` > 1 adds RePaint's
               resampling (each step redone after re-noising).
Either way the pixels outside the mask are pasted back after decoding, blended over a feathered band
of `feather` pixels outside the mask, so they are kept exactly beyond it.
Canvases: the latent canvas stays on the CPU and the U-Net and VAE see one tile at a time
(tiled encode and decode), so memory does not grow with the canvas.
"""

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from model import conditions
from model.diffusion import Diffusion
from model.pipeline import decode, guided_denoiser, initial_noise, run_sampler, spacing_for
from model.samplers import SAMPLERS, ddim_step, make_timesteps, sampler_timesteps
from model.vae import blend_ramp, tile_starts

METHODS = ("model", "replace")
CANVAS_METHODS = ("outpaint", "multidiffusion")
# img2img presets: the strengths measured best on the procedural Earth
# (benchmarks/results/edit_cpu.md: dehaze PSNR rises up to 0.8; super-resolution is read at the
# level asked from 0.6 on)
PRESETS = {"sr": dict(strength=0.6), "dehaze": dict(strength=0.8)}
SAMPLING = (
    "sampler",
    "steps",
    "guidance",
    "negative_prompt",
    "interval",
    "rescale",
    "dtype",
    "progress",
    "unet",
)


def is_inpainting_model(model):
    """True for a U-Net that reads [x_t, mask, masked-image latent]
    (2 * latent + 1 input channels)."""
    return model.cfg.unet.in_channels == 2 * model.cfg.vae.latent_channels + 1


def inpaint_method(model, method=None):
    """The method inpainting will use (METHODS): "model" for a 9-channel U-Net, "replace" for a
    text-to-image one; ValueError when `method` cannot run on this model."""
    nine = is_inpainting_model(model)
    method = method or ("model" if nine else "replace")
    if method not in METHODS:
        raise ValueError(f"inpainting method must be one of {METHODS}, got {method!r}")
    if method == "model" and not nine:
        raise ValueError(
            "inpainting method 'model' needs a 9-channel inpainting U-Net "
            f"(Text2Earth-inpainting); this one has {model.cfg.unet.in_channels} input channels "
            "(use method 'replace')"
        )
    if method == "replace" and nine:
        raise ValueError(
            "inpainting method 'replace' needs a text-to-image U-Net; this one is an inpainting "
            "U-Net (use method 'model')"
        )
    return method


def _kw(sampling):
    unknown = set(sampling) - set(SAMPLING)
    if unknown:
        raise TypeError(f"unknown sampling keyword(s) {sorted(unknown)}; accepted: {SAMPLING}")
    return sampling


def _check_images(model, image, mask=None):
    f = model.vae.downsample
    if image.ndim != 4 or image.shape[1] != 3 or image.shape[2] % f or image.shape[3] % f:
        raise ValueError(
            f"image must be (B, 3, H, W) with H, W multiples of {f}, got {tuple(image.shape)}"
        )
    if mask is not None and (
        mask.ndim != 4
        or mask.shape[1] != 1
        or mask.shape[0] != image.shape[0]
        or mask.shape[2:] != image.shape[2:]
    ):
        raise ValueError(
            f"mask must be (B, 1, H, W) like the image {tuple(image.shape)}, got "
            f"{tuple(mask.shape)}"
        )


def _vae_device(model):
    return next(model.vae.parameters())


def encode(model, image, tile=None):
    """Images (B, 3, H, W) in [-1, 1] -> scaled latents, the posterior mean (deterministic),
    on the CPU."""
    like = _vae_device(model)
    return model.vae.encode_latents(image.to(like), sample=False, tile=tile).float().cpu()


# ----------------------------------------------------------------------------------------------
# Masks
# ----------------------------------------------------------------------------------------------


def latent_mask(mask, f, mode="nearest"):
    """Pixel mask (B, 1, H, W) -> latent size (B, 1, H/f, W/f): "nearest" as the release's pipeline
    and training give it to the 9-channel U-Net; "any" marks a latent pixel when any pixel under it
    is masked (what the replace method regenerates, so the decoded region covers the whole mask)."""
    if mode == "nearest":
        return F.interpolate(mask, size=(mask.shape[2] // f, mask.shape[3] // f), mode="nearest")
    return F.max_pool2d(mask, f)


def feathered(mask, feather):
    """The paste-back weight of the generated pixels: 1 on the mask, falling linearly to 0 over
    `feather` pixels outside it (Chebyshev distance), 0 beyond. mask (B, 1, H, W) of 0 and 1."""
    soft = mask.clone()
    for k in range(1, feather + 1):
        soft += F.max_pool2d(mask, 2 * k + 1, stride=1, padding=k)
    return soft / (feather + 1)


def paste(original, generated, mask, feather=3):
    """generated inside the mask, original outside it, blended over the feathered band
    (feathered)."""
    w = feathered(mask, feather)
    return original * (1 - w) + generated * w


def cloud_mask(image, threshold=0.75, max_saturation=0.12, dilate=2):
    """Estimated cloud cover of images (B, 3, H, W) in [-1, 1] -> (B, 1, H, W) of 0 and 1: pixels
    bright (mean of RGB in [0, 1] above `threshold`) and white (max - min channel below
    `max_saturation`), dilated by `dilate` pixels so the soft cloud edges go too. Thick cloud only:
    thin haze is img2img's job (PRESETS["dehaze"])."""
    rgb = (image.float() + 1) / 2  # B, 3, H, W in [0, 1]
    bright = rgb.mean(1, keepdim=True) > threshold
    white = (rgb.amax(1, keepdim=True) - rgb.amin(1, keepdim=True)) < max_saturation
    mask = (bright & white).float()
    return F.max_pool2d(mask, 2 * dilate + 1, stride=1, padding=dilate) if dilate > 0 else mask


# ----------------------------------------------------------------------------------------------
# Inpainting
# ----------------------------------------------------------------------------------------------


def renoise(z0, noise, abar):
    """The variance-preserving x_t of clean latents z0 at noise level abar:
    sqrt(abar) z0 + sqrt(1 - abar) noise."""
    return math.sqrt(abar) * z0 + math.sqrt(1 - abar) * noise


@torch.no_grad()
def inpaint_latents(
    model,
    cond,
    image,
    mask,
    *,
    seeds,
    method=None,
    resample=1,
    noise=None,
    masked_latent=None,
    encode_tile=None,
    **sampling,
):
    """The latents of the inpainted images before decoding (B, 4, h, w), on the CPU. `noise` (the
    initial N(0, I) latents) and `masked_latent` (the masked image's latent, 9-channel model)
    override what is otherwise drawn from the seeds and encoded, for tests against diffusers."""
    sampling = _kw(sampling)
    method = inpaint_method(model, method)
    _check_images(model, image, mask)
    if len(seeds) != image.shape[0] or conditions.batch_size(cond) != image.shape[0]:
        raise ValueError(
            f"{image.shape[0]} images need as many seeds and conditions, got {len(seeds)} seeds "
            f"and {conditions.batch_size(cond)} conditions"
        )
    if not isinstance(resample, int) or resample < 1:
        raise ValueError(f"resample must be an int >= 1, got {resample!r}")
    f = model.vae.downsample
    mask = (mask.float() >= 0.5).float()  # B, 1, H, W: 1 = regenerate
    h, w = image.shape[2] // f, image.shape[3] // f
    x = initial_noise(model, seeds, (h, w)) if noise is None else noise.float().cpu()
    guide = {
        k: sampling.pop(k)
        for k in ("guidance", "negative_prompt", "interval", "rescale", "dtype", "unet")
        if k in sampling
    }
    if method == "model":
        if resample > 1:
            raise ValueError("resample > 1 (RePaint) applies to the replace method")
        if masked_latent is None:
            masked_latent = encode(model, image * (mask < 0.5), encode_tile)
        extra = torch.cat([latent_mask(mask, f), masked_latent.float().cpu()], dim=1)  # B, 5, h, w
        model_fn = guided_denoiser(model, cond, extra=extra, **guide)
        return (
            run_sampler(model, model_fn, x.to(_device(model)), seed=seeds[0], **sampling)
            .float()
            .cpu()
        )
    z0 = encode(model, image, encode_tile)  # B, 4, h, w
    keep = 1 - latent_mask(mask, f, mode="any")  # B, 1, h, w: 1 = known
    model_fn = guided_denoiser(model, cond, **guide)
    z = replace_sampler(model, model_fn, x, z0, keep, seed=seeds[0], resample=resample, **sampling)
    return keep * z0 + (1 - keep) * z  # the known latents exactly


def _device(model):
    return next(model.unet.parameters()).device


def replace_sampler(
    model,
    model_fn,
    x,
    z0,
    keep,
    *,
    seed,
    resample=1,
    sampler="dpmpp_2m",
    steps=20,
    progress=False,
    skip=0,
):
    """Sample from x with the known latents z0 (where keep = 1) pasted in before the first step
    and after every one, re-noised to the step's level with the initial noise x itself (as
    diffusers' inpainting pipeline does for a text-to-image U-Net). resample > 1: RePaint's
    resampling (Lugmayr et al. 2022, Alg. 1) with DDIM steps
    (sampler "ddim", eta 0) or ancestral ones ("ddpm", eta 1): each step is redone resample - 1
    times after re-noising its result back to the step's start, which lets the generated region
    take in what the known one says. Returns latents on the U-Net's device."""
    device = _device(model)
    x, z0, keep = x.to(device), z0.to(device), keep.to(device)
    noise = x.clone()  # the known region's noise

    def replace(x_t, abar):
        return keep * renoise(z0, noise, abar) + (1 - keep) * x_t

    if resample == 1:
        return run_sampler(
            model,
            model_fn,
            x,
            sampler=sampler,
            steps=steps,
            seed=seed,
            progress=progress,
            skip=skip,
            replace=replace,
        )
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(
            "resample > 1 (RePaint) runs DDIM or DDPM steps: sampler 'ddim' or 'ddpm', not "
            f"{sampler!r}"
        )
    eta = 1.0 if sampler == "ddpm" else 0.0
    g = torch.Generator(device).manual_seed(seed)
    dcfg = model.cfg.diffusion
    ac = Diffusion.from_config(dcfg).alphas_cumprod.tolist()
    ts = make_timesteps(dcfg.num_steps, steps, *spacing_for(model, sampler))[skip:].long().tolist()
    x = replace(x, ac[ts[0]])
    for i in tqdm(range(len(ts)), disable=not progress, desc="repaint"):
        ab_t, ab_s = ac[ts[i]], (ac[ts[i + 1]] if i + 1 < len(ts) else 1.0)
        for r in range(resample):
            x_s, _ = ddim_step(model_fn, x, ts[i], ab_t, ab_s, dcfg.prediction, eta, g)
            x_s = replace(x_s, ab_s)
            if r + 1 < resample:  # back to t: q(x_t | x_s)
                fresh = torch.randn(x.shape, generator=g, device=device)
                x = math.sqrt(ab_t / ab_s) * x_s + math.sqrt(1 - ab_t / ab_s) * fresh
        x = x_s
    return x


@torch.no_grad()
def inpaint(
    model,
    cond,
    image,
    mask,
    *,
    seeds,
    method=None,
    resample=1,
    feather=3,
    encode_tile=None,
    decode_tile=None,
    **sampling,
):
    """Inpaint images (B, 3, H, W) where mask (B, 1, H, W) is 1; returns images (B, 3, H, W) in
    [-1, 1] on the CPU, equal to `image` beyond `feather` pixels outside the mask (see the module
    docstring for the methods)."""
    z = inpaint_latents(
        model,
        cond,
        image,
        mask,
        seeds=seeds,
        method=method,
        resample=resample,
        encode_tile=encode_tile,
        **sampling,
    )
    mask = (mask.float() >= 0.5).float()
    return paste(image.float().cpu(), decode(model, z, decode_tile), mask.cpu(), feather)


# ----------------------------------------------------------------------------------------------
# img2img: SDEdit, super-resolution, dehazing
# ----------------------------------------------------------------------------------------------


def strength_skip(steps, strength):
    """The solver steps skipped for an img2img `strength` in (0, 1] (the share of the schedule that
    runs, as diffusers counts it: int(steps * strength) steps, at least one)."""
    if not 0 < strength <= 1:
        raise ValueError(f"strength must lie in (0, 1], got {strength}")
    return steps - max(1, min(steps, int(steps * strength)))


@torch.no_grad()
def img2img(model, cond, image, strength, *, seeds, encode_tile=None, decode_tile=None, **sampling):
    """SDEdit (Meng et al. 2022): the image's latent re-noised to the timestep where a share
    `strength` of the solver's schedule is left, then denoised under `cond`. strength 1 keeps only
    what survives the strongest noise (nearly nothing); small strengths keep the layout and change
    the texture. Returns images like `image`, on the CPU."""
    sampling = _kw(sampling)
    _check_images(model, image)
    if is_inpainting_model(model):
        raise ValueError(
            "img2img needs a text-to-image U-Net; this one is a 9-channel inpainting U-Net "
            "(inpaint with it, or use the text-to-image weights)"
        )
    if len(seeds) != image.shape[0] or conditions.batch_size(cond) != image.shape[0]:
        raise ValueError(f"{image.shape[0]} images need as many seeds and conditions")
    sampler, steps = sampling.pop("sampler", "dpmpp_2m"), sampling.pop("steps", 20)
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
    progress = sampling.pop("progress", False)
    skip = strength_skip(steps, strength)
    dcfg = model.cfg.diffusion
    t0 = int(sampler_timesteps(sampler, dcfg.num_steps, steps, *spacing_for(model, sampler))[skip])
    z0 = encode(model, image, encode_tile)
    noise = initial_noise(model, seeds, z0.shape[2:])
    x = renoise(z0, noise, Diffusion.from_config(dcfg).alphas_cumprod[t0].item())
    model_fn = guided_denoiser(model, cond, **sampling)
    z = run_sampler(
        model,
        model_fn,
        x.to(_device(model)),
        sampler=sampler,
        steps=steps,
        seed=seeds[0],
        progress=progress,
        skip=skip,
    )
    return decode(model, z, decode_tile)


def upsample(image, scale):
    """Bicubic upsampling by an integer `scale`, clamped to [-1, 1]:
    the super-resolution input and baseline."""
    return F.interpolate(
        image.float(), scale_factor=scale, mode="bicubic", align_corners=False
    ).clamp(-1, 1)


def super_resolve(model, cond, image, scale, *, seeds, strength=PRESETS["sr"]["strength"], **kw):
    """Super-resolution: the image upsampled `scale` times (bicubic), then img2img at the finer
    level the caller puts in `cond` (the input's level + log2(scale), data/levels.py), so the model
    adds the detail a finer resolution shows. Returns (B, 3, scale H, scale W)."""
    return img2img(model, cond, upsample(image, scale), strength, seeds=seeds, **kw)


# ----------------------------------------------------------------------------------------------
# Canvases of any size: tile by tile (outpainting) or all windows at once (MultiDiffusion)
# ----------------------------------------------------------------------------------------------


def canvas_tiles(size, tile, overlap, f):
    """The tiles of a canvas (H, W): their top-left corners in pixels, row-major, and the grid
    (rows, cols). Tiles of `tile` pixels overlap by at least `overlap`, spread evenly, the last
    flush with the edge."""
    H, W = size
    if H % f or W % f or tile % f or overlap % f:
        raise ValueError(
            f"canvas {H}x{W}, tile {tile} and overlap {overlap} must all be multiples of {f}"
        )
    if tile > min(H, W) or not 0 <= overlap < tile:
        raise ValueError(
            f"tile {tile} must fit the canvas {H}x{W} and exceed the overlap {overlap} (>= 0)"
        )
    ys = tile_starts(H // f, tile // f, overlap // f, f)
    xs = tile_starts(W // f, tile // f, overlap // f, f)
    return [(y, x) for y in ys for x in xs], (len(ys), len(xs))


def _tile_conds(model, prompts, values, n):
    """Conditions, one row per tile, the text encoded: prompts is one prompt for every tile or one
    per tile; values {scalar condition: value} hold for every tile."""
    if len(prompts) not in (1, n):
        raise ValueError(f"the canvas has {n} tiles: give 1 prompt or {n}, got {len(prompts)}")
    texts = sorted(set(prompts))
    ctx = dict(zip(texts, model.encode_text(texts)))
    # n, L, D
    context = torch.stack([ctx[p] for p in (prompts * n if len(prompts) == 1 else prompts)])
    return conditions.request(model.cfg, n, text=context, **values)


def _rows(cond, idx):
    return {k: v[idx] for k, v in cond.items()}


def vae_tiled(model, x, tile, overlap, decode_):
    """Encode images (decode_ False; tile, overlap in latent pixels) or decode latents (True) of any
    size with the canvas on the CPU and one tile at a time on the VAE's device: memory bounded
    whatever the canvas."""
    vae, f = model.vae, model.vae.downsample
    like = next(vae.parameters())
    if decode_:

        def fn(piece):
            return vae.decode(piece.to(like) / vae.cfg.scaling_factor).float().clamp(-1, 1).cpu()

        return vae.tiled(fn, x.float().cpu(), tile, overlap, f, vae.cfg.in_channels)

    def fn(piece):
        return encode(model, piece)

    return vae.tiled(
        fn, x.float().cpu(), tile * f, overlap * f, 1 / f, vae.cfg.latent_channels, unit=f
    )


@torch.no_grad()
def extend(
    model,
    prompts,
    size,
    *,
    values=None,
    tile=256,
    overlap=64,
    method="outpaint",
    seed=0,
    batch=4,
    resample=1,
    latents=False,
    **sampling,
):
    """A canvas of `size` (H, W) pixels, returned as an image (1, 3, H, W) on the CPU
    (or its latents with latents=True). The tiles (canvas_tiles) take their prompts in row-major
    order (one prompt: every tile); the scalar conditions `values` ({"level": 16, ...};
    conditions.request) hold for all, so the scale stays coherent.
        outpaint        tile by tile in row-major order, each inpainting what is not yet there
                        from what its overlap with earlier tiles holds (Text2Earth's way; the
                        9-channel model or the replace method of a text-to-image one,
                        `resample` as for inpaint)
        multidiffusion  joint diffusion of all tiles (Bar-Tal et al. 2023, "MultiDiffusion", Eq. 5):
                        at every step each tile's prediction is computed on its own
                        (batches of `batch`) and every latent pixel takes the mean over the tiles
                        covering it; text-to-image models.
    The canvas is decoded tile by tile, cross-faded over the overlap."""
    sampling = _kw(sampling)
    if method not in CANVAS_METHODS:
        raise ValueError(f"canvas method must be one of {CANVAS_METHODS}, got {method!r}")
    if method == "multidiffusion" and is_inpainting_model(model):
        raise ValueError(
            "multidiffusion needs a text-to-image U-Net; with the 9-channel inpainting model use "
            "method 'outpaint'"
        )
    f = model.vae.downsample
    origins, _ = canvas_tiles(size, tile, overlap, f)
    cond = _tile_conds(model, list(prompts), values or {}, len(origins))
    guide = {
        k: sampling.pop(k)
        for k in ("guidance", "negative_prompt", "interval", "rescale", "dtype", "unet")
        if k in sampling
    }
    h, w, t = size[0] // f, size[1] // f, tile // f
    windows = [(y // f, x // f) for y, x in origins]
    x = initial_noise(model, [seed], (h, w))  # 1, 4, h, w on the CPU
    if method == "multidiffusion":
        z = _multidiffusion(model, x, windows, t, overlap // f, cond, guide, batch, seed, sampling)
    else:
        z = _outpaint(model, x, windows, t, cond, guide, seed, resample, sampling)
    return z if latents else vae_tiled(model, z, t, overlap // f, decode_=True)


def tile_weight(t, overlap, top, bottom, left, right):
    """A tile's (t, t) weight in the canvas's mean: 1 inside, rising linearly across the `overlap`
    latent pixels along each side another tile shares (top, bottom, left, right: whether one does),
    never 0 (the VAE's tile blend). With equal weights (MultiDiffusion's) the mean jumps where a
    tile's edge lies inside another tile; with weights that fade to nearly 0 at the edges (Jimenez
    2023, "Mixture of Diffusers", with Gaussians) it stays continuous:
    benchmarks/results/canvas_cpu.md has the seams of both."""
    like = torch.zeros(())
    return (
        blend_ramp(t, overlap, top, bottom, like)[:, None]
        * blend_ramp(t, overlap, left, right, like)[None, :]
    )


def _multidiffusion(model, x, windows, t, overlap, cond, guide, batch, seed, sampling):
    groups = [list(range(i, min(i + batch, len(windows)))) for i in range(0, len(windows), batch)]
    fns = [guided_denoiser(model, _rows(cond, idx), **guide) for idx in groups]
    h, w = x.shape[2:]
    weights = [tile_weight(t, overlap, y > 0, y + t < h, x0 > 0, x0 + t < w) for y, x0 in windows]
    cover = torch.zeros(1, 1, h, w)
    for (y, x0), wt in zip(windows, weights):
        cover[:, :, y : y + t, x0 : x0 + t] += wt

    def canvas_fn(x_t, tt):  # x_t: 1, 4, h, w (CPU)
        out = torch.zeros_like(x_t)
        for idx, fn in zip(groups, fns):
            tiles = torch.cat(
                [x_t[:, :, y : y + t, x0 : x0 + t] for y, x0 in (windows[i] for i in idx)]
            )
            pred = fn(tiles, tt.expand(len(idx)))  # n, 4, t, t
            for k, i in enumerate(idx):
                y, x0 = windows[i]
                out[:, :, y : y + t, x0 : x0 + t] += pred[k : k + 1] * weights[i]
        return out / cover

    return run_sampler(model, canvas_fn, x, seed=seed, **sampling)


def _outpaint(model, x, windows, t, cond, guide, seed, resample, sampling):
    f, nine = model.vae.downsample, is_inpainting_model(model)
    canvas = torch.zeros_like(x)  # 1, 4, h, w: the latents so far
    known = torch.zeros(1, 1, *x.shape[2:])
    for i, (y, x0) in enumerate(tqdm(windows, desc="tiles", disable=not sampling.get("progress"))):
        win = (slice(None), slice(None), slice(y, y + t), slice(x0, x0 + t))
        keep, z_known, noise = known[win], canvas[win], x[win]
        if nine:  # mask and masked image at tile size
            pixels_keep = F.interpolate(keep, scale_factor=f, mode="nearest")
            image = vae_tiled(model, z_known, t, 0, decode_=True) * pixels_keep
            extra = torch.cat([1 - keep, encode(model, image)], dim=1)
            fn = guided_denoiser(model, _rows(cond, [i]), extra=extra, **guide)
            z = (
                run_sampler(model, fn, noise.to(_device(model)), seed=seed + i, **sampling)
                .float()
                .cpu()
            )
        else:
            fn = guided_denoiser(model, _rows(cond, [i]), **guide)
            z = (
                replace_sampler(
                    model, fn, noise, z_known, keep, seed=seed + i, resample=resample, **sampling
                )
                .float()
                .cpu()
            )
        canvas[win] = keep * z_known + (1 - keep) * z
        known[win] = 1
    return canvas
