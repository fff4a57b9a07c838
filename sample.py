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
import re
import sys
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo
from tqdm.auto import tqdm

from data.levels import asked_level, parse_level_prefix
from data.transforms import image_grid, tensor_to_pil
from model import attention
from model.lora import apply_loras
from model.pipeline import compile_problem, default_guidance, device_and_dtype, generate, prepare_for_sampling
from model.samplers import SAMPLERS
from model.weights import WeightsError, load_weights

DEFAULT_WEIGHTS = "out/demo/model.safetensors"   # what the README's demo command trains


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
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:SCALE]",
                        help="merge a LoRA (ours, or diffusers / peft layout) into the model; repeat for several")
    p.add_argument("--out", default="out/samples", help="output folder")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"],
                   help="U-Net and text encoder precision, read as such (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--batch", type=int, default=8, help="images sampled together")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the U-Net and VAE decoder (the first batch compiles: ~1.5 min on 2 CPU cores)")
    p.add_argument("--channels-last", action="store_true", help="U-Net and VAE decoder in the NHWC memory layout")
    p.add_argument("--attention", default="sdpa", choices=attention.BACKENDS,
                   help="sdpa (PyTorch picks flash / efficient / cuDNN), triton (our fused kernel, CUDA) or math")
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
    try:
        args.level = asked_level(args.level, args.resolution_m)
    except ValueError as e:
        p.error(str(e))
    if args.size[0] % 8 or args.size[1] % 8 or min(args.size) < 8:
        p.error(f"--size {args.size[0]} {args.size[1]}: both must be positive multiples of 8")
    try:
        device, args.dtype = device_and_dtype(args.device, args.dtype)
    except ValueError as e:
        p.error(str(e))
    if args.attention == "triton" and device.type != "cuda":
        p.error("--attention triton: the Triton kernel runs on CUDA devices (use sdpa on the CPU)")
    problem = compile_problem(device) if args.compile else None
    if problem:
        p.error(f"--compile: {problem}; run without --compile")

    # One job per image: (text, level, seed). The release's "{L}_GOOGLE_LEVEL_" prefix overrides --level.
    args.jobs = []
    for prompt in args.prompt:
        try:
            prefix_level, text = parse_level_prefix(prompt, strict=True)
        except ValueError as e:
            p.error(str(e))
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
    attention.set_backend(args.attention)
    out = Path(args.out)
    names = [f"{i:03d}_{slug(text)}_L{level:g}_seed{seed}.png" for i, (text, level, seed) in enumerate(args.jobs)]
    existing = [out / n for n in names + ["grid.png"] if (out / n).exists()]
    if existing and not args.overwrite:
        p.error(f"{existing[0]} exists ({len(existing)} files would be overwritten); pass --overwrite or another --out")
    try:    # the U-Net and text encoder in --dtype as they are read; the VAE decodes in fp32 (SD's overflows in fp16)
        model = load_weights(args.weights, args.device, dtype={"unet": args.dtype, "text_encoder": args.dtype})
    except WeightsError as e:
        hint = " (train the demo model first: see README)" if args.weights == DEFAULT_WEIGHTS else ""
        p.error(f"--weights: {e}{hint}")
    try:
        apply_loras(model, args.lora)
    except WeightsError as e:
        p.error(f"--lora: {e}")
    has_level = "level" in model.cfg.unet.scalar_conditions
    if not has_level and (args.level_cfg is not None or any(level for _, level, _ in args.jobs)):
        p.error(f"--level / --resolution-m / --level-cfg / a level prefix: the U-Net of {args.weights} has no level "
                "embedding")
    if model.cfg.unet.in_channels != model.cfg.unet.out_channels:
        p.error(f"--weights {args.weights}: an inpainting U-Net ({model.cfg.unet.in_channels} input channels) "
                "samples from an image and a mask, not from text alone")
    guidance = default_guidance(model, args.cfg, args.level_cfg)
    # Every prompt is encoded once, then the text encoder is freed (1.4 GB in fp32 for the release's).
    texts = sorted({text for text, _, _ in args.jobs})
    contexts = torch.cat([model.encode_text(texts[i:i + args.batch]) for i in range(0, len(texts), args.batch)])
    context = dict(zip(texts, contexts))
    null = model.encode_text([args.negative_prompt])
    model.text_encoder = None
    if args.compile or args.channels_last:
        prepare_for_sampling(model, compile=args.compile, channels_last=args.channels_last)

    out.mkdir(parents=True, exist_ok=True)
    pils = []
    for start in tqdm(range(0, len(args.jobs), args.batch), desc="batches", disable=len(args.jobs) <= args.batch):
        jobs = args.jobs[start:start + args.batch]
        cond = {"text": torch.stack([context[j[0]] for j in jobs])}
        if has_level:
            cond["level"] = [j[1] for j in jobs]
        images = generate(model, cond, seeds=[j[2] for j in jobs], sampler=args.sampler, steps=args.steps,
                          guidance=guidance, negative_prompt=null, size=tuple(args.size),
                          interval=args.cfg_interval, rescale=args.cfg_rescale, dtype=args.dtype, progress=True)
        for (text, level, seed), image, name in zip(jobs, images, names[start:start + args.batch]):
            info = PngInfo()
            for k, v in {"prompt": text, "level": f"{level:g}", "seed": seed, "sampler": args.sampler,
                         "steps": args.steps, "cfg": args.cfg, "level_cfg": args.level_cfg,
                         "negative_prompt": args.negative_prompt,
                         "weights": args.weights}.items():
                info.add_text(k, str(v))
            im = tensor_to_pil(image)
            im.save(out / name, pnginfo=info)
            pils.append(im)
    image_grid(pils, cols=args.n if len(args.prompt) > 1 else min(len(pils), 8)).save(out / "grid.png")
    print(f"wrote {len(pils)} images and grid.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
