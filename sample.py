"""Text (and resolution) to remote-sensing image.

    python sample.py --weights path/to/Text2Earth --prompt "a dense residential area" --level 17
    python sample.py --weights out/demo/model.safetensors --prompt "16_GOOGLE_LEVEL_farmland" --n 4

`--weights` is a diffusers-format folder as released (lcybuaa/Text2Earth) or one of our checkpoints.
The level is the Google map level L (resolution_m = 2 ** (17 - L)); 0 means "no resolution". A prompt may
carry it in the release's prefix form "{L}_GOOGLE_LEVEL_{text}", which overrides --level for that prompt.
Every image is written as a PNG with the prompt, level, seed, sampler, steps and guidance in its text
chunks, plus a grid of all of them. Existing files are never overwritten unless --overwrite.
"""
import argparse
import math
import re
import sys
from pathlib import Path

import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from data.datasets import level_from_resolution, parse_level_prefix
from model.diffusion import Diffusion
from model.guidance import cfg_model_fn
from model.samplers import SAMPLERS
from model.weights import WeightsError, load_weights

DEFAULT_WEIGHTS = "out/demo/model.safetensors"   # what the README's demo command trains


@torch.no_grad()
def generate(model, prompts, levels, *, seeds, sampler="dpmpp_2m", steps=20, cfg=4.0, negative_prompt="",
             size=(256, 256), interval=None, rescale=0.0, dtype=torch.float32, progress=False, noise=None,
             decode_tile=None, unet=None, level_cfg=None):
    """Sample one image per (prompt, level, seed): returns images (B, 3, H, W) in [-1, 1] (float32, CPU).

    The initial noise of image i is drawn on the CPU from `seeds[i]`, so a seed gives the same image on any
    device (up to the device's arithmetic). `noise` (B, C, h, w) overrides that, for tests.
    CFG with dynamic condition adaptation: null branch = (negative prompt or "", level 0); level_cfg guides the
    level with its own scale (model/guidance.py; None: jointly with the text, at cfg).
    `unet` replaces model.unet (e.g. the EMA weights during training).
    """
    net = model.unet if unet is None else unet
    B = len(prompts)
    if not (len(levels) == len(seeds) == B):
        raise ValueError(f"need one level and one seed per prompt: {B} prompts, {len(levels)} levels, {len(seeds)} seeds")
    H, W = size
    f = model.vae.downsample
    if H % f or W % f:
        raise ValueError(f"size {H}x{W}: height and width must be multiples of {f}")
    device = next(net.parameters()).device
    unet_dtype = next(net.parameters()).dtype
    shape = (model.cfg.unet.out_channels, H // f, W // f)
    if noise is None:
        noise = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    x = noise.to(device, torch.float32)                                          # B, 4, h, w

    context = model.encode_text(list(prompts)).to(unet_dtype)                    # B, 77, D
    null_context = model.encode_text([negative_prompt]).to(unet_dtype)           # 1, 77, D
    has_level = model.cfg.unet.level_embedding
    level = torch.tensor(levels, dtype=torch.float32, device=device) if has_level else None
    null_level = 0.0 if has_level else None

    def unet_fn(x_t, t, c, lv):                                                  # the U-Net in its own dtype
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            return net(x_t.to(unet_dtype), t, c, lv).float()

    model_fn = cfg_model_fn(unet_fn, context, level, null_context, null_level, cfg, level_scale=level_cfg,
                            interval=interval, rescale=rescale)
    dcfg = model.cfg.diffusion
    # DPM-Solver++(2M) is measurably better from t = T-1 ("trailing") than from the release's "leading" steps
    # (benchmarks/results/samplers_cpu.md); the other samplers follow the release's scheduler config.
    spacing, offset = ("trailing", 0) if sampler == "dpmpp_2m" else (dcfg.spacing, dcfg.steps_offset)
    z = SAMPLERS[sampler](model_fn, x, Diffusion.from_config(dcfg), steps,
                          generator=torch.Generator(device).manual_seed(seeds[0]), prediction=dcfg.prediction,
                          spacing=spacing, steps_offset=offset, progress=progress)
    images = model.vae.decode_latents(z.to(next(model.vae.parameters()).dtype), tile=decode_tile)
    return images.float().clamp(-1, 1).cpu()


def to_pil(image):
    """(3, H, W) in [-1, 1] -> PIL RGB."""
    arr = ((image.permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(arr)


def make_grid(images, cols):
    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def slug(text, n=40):
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", action="append", required=True, help="text prompt; repeat for several")
    p.add_argument("--level", type=float, default=None, help="Google map level, 0 (none) or 1..20, fractional ok")
    p.add_argument("--resolution-m", type=float, default=None, help="metres per pixel (instead of --level)")
    p.add_argument("--negative-prompt", default="", help="replaces the empty prompt in the null branch")
    p.add_argument("--sampler", default="dpmpp_2m", help=f"one of {sorted(SAMPLERS)}")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=4.0, help="guidance scale (release default 4.0; 1 = none)")
    p.add_argument("--level-cfg", type=float, default=None,
                   help="guidance scale of the level on its own (default: guided with the text, at --cfg)")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("LO", "HI"),
                   help="guide only for timesteps in [LO, HI] (Kynkaanniemi et al. 2024)")
    p.add_argument("--cfg-rescale", type=float, default=0.0, help="guidance rescale phi (Lin et al. 2024)")
    p.add_argument("--seed", type=int, default=0, help="image i of a prompt uses seed + i")
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument("--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="multiples of 8")
    p.add_argument("--weights", default=DEFAULT_WEIGHTS, help="diffusers-format folder or our .safetensors")
    p.add_argument("--out", default="out/samples", help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="U-Net precision (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch", type=int, default=8, help="images sampled together")
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)

    if args.sampler not in SAMPLERS:
        p.error(f"--sampler {args.sampler!r} is unknown; choose one of {sorted(SAMPLERS)}")
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.cfg < 0 or (args.level_cfg is not None and args.level_cfg < 0):
        p.error(f"--cfg and --level-cfg must be >= 0, got {args.cfg} and {args.level_cfg}")
    if args.n < 1 or args.batch < 1:
        p.error("--n and --batch must be >= 1")
    if args.level is not None and args.resolution_m is not None:
        p.error("give --level or --resolution-m, not both")
    if args.resolution_m is not None:
        if args.resolution_m <= 0:
            p.error(f"--resolution-m must be > 0, got {args.resolution_m}")
        args.level = level_from_resolution(args.resolution_m)
    if args.size[0] % 8 or args.size[1] % 8 or min(args.size) < 8:
        p.error(f"--size {args.size[0]} {args.size[1]}: both must be positive multiples of 8")
    args.dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[
        args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]

    # One job per image: (text, level, seed). The release's "{L}_GOOGLE_LEVEL_" prefix overrides --level.
    args.jobs = []
    for prompt in args.prompt:
        prefix_level, text = parse_level_prefix(prompt)
        if text != prompt:                                   # the prompt carried a level prefix
            level = prefix_level
        else:
            level = args.level if args.level is not None else 0.0
        if not 0.0 <= level <= 20.0:
            p.error(f"level {level:g} (prompt {prompt!r}) is outside [0, 20]")
        args.jobs += [(text, float(level), args.seed + i) for i in range(args.n)]
    args.parser = p
    return args


def main(argv=None):
    args = parse_args(argv)
    p = args.parser
    out = Path(args.out)
    names = [f"{i:03d}_{slug(text)}_L{level:g}_seed{seed}.png" for i, (text, level, seed) in enumerate(args.jobs)]
    existing = [out / n for n in names + ["grid.png"] if (out / n).exists()]
    if existing and not args.overwrite:
        p.error(f"{existing[0]} exists ({len(existing)} files would be overwritten); pass --overwrite or another --out")
    try:
        model = load_weights(args.weights, args.device)
    except WeightsError as e:
        hint = " (train the demo model first: see README)" if args.weights == DEFAULT_WEIGHTS else ""
        p.error(f"--weights: {e}{hint}")
    if args.level_cfg is not None and not model.cfg.unet.level_embedding:
        p.error(f"--level-cfg: the U-Net of {args.weights} has no level embedding")
    model.unet.to(args.dtype)
    model.text_encoder.to(args.dtype)

    out.mkdir(parents=True, exist_ok=True)
    pils = []
    for start in tqdm(range(0, len(args.jobs), args.batch), desc="batches", disable=len(args.jobs) <= args.batch):
        jobs = args.jobs[start:start + args.batch]
        images = generate(model, [j[0] for j in jobs], [j[1] for j in jobs], seeds=[j[2] for j in jobs],
                          sampler=args.sampler, steps=args.steps, cfg=args.cfg, negative_prompt=args.negative_prompt,
                          size=tuple(args.size), interval=args.cfg_interval, rescale=args.cfg_rescale,
                          dtype=args.dtype, progress=True, level_cfg=args.level_cfg)
        for (text, level, seed), image, name in zip(jobs, images, names[start:start + args.batch]):
            info = PngInfo()
            for k, v in {"prompt": text, "level": f"{level:g}", "seed": seed, "sampler": args.sampler,
                         "steps": args.steps, "cfg": args.cfg, "level_cfg": args.level_cfg,
                         "negative_prompt": args.negative_prompt,
                         "weights": args.weights}.items():
                info.add_text(k, str(v))
            im = to_pil(image)
            im.save(out / name, pnginfo=info)
            pils.append(im)
    make_grid(pils, cols=args.n if len(args.prompt) > 1 else min(len(pils), 8)).save(out / "grid.png")
    print(f"wrote {len(pils)} images and grid.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
