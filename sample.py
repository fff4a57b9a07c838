"""Text (and resolution) to remote-sensing image.

    python sample.py --weights path/to/Text2Earth --prompt "a dense residential area" --level 17
    python sample.py --weights out/demo/model.safetensors --prompt "16_GOOGLE_LEVEL_farmland" --n 4

`--weights` is a diffusers-format folder as released (lcybuaa/Text2Earth) or one of our checkpoints.
The level is the Google map level L (resolution_m = 2 ** (17 - L)); 0 means "no resolution". A
prompt may carry it in the release's prefix form "{L}_GOOGLE_LEVEL_{text}", which overrides --level
for that prompt. Every scalar condition the model reads has its flags (`--NAME V`, `--NAME-cfg S`;
cli/sampling.py). Every image is written as a PNG with the prompt, its conditions, seed, sampler,
steps and guidance in its text chunks, plus a grid of all of them. Existing files are never
overwritten unless --overwrite.
"""

import argparse
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from cli import sampling as cli
from data.transforms import image_grid, tensor_to_pil
from model import attention
from model.pipeline import compile_problem, generate, prepare_for_sampling


def parse_args(argv=None):
    """(args, parser): the flags, checked, with args.jobs the images to make."""
    argv = sys.argv[1:] if argv is None else argv
    model_cfg = cli.model_config_for(argv)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--prompt", action="append", required=True, help="text prompt; repeat for several"
    )
    cli.add_model_flags(p)
    cli.add_sampling_flags(p)
    cli.add_condition_flags(p, model_cfg)
    p.add_argument(
        "--cfg-interval",
        type=float,
        nargs=2,
        default=None,
        metavar=("LO", "HI"),
        help="guide only for timesteps in [LO, HI] (Kynkaanniemi et al. 2024)",
    )
    p.add_argument(
        "--cfg-rescale", type=float, default=0.0, help="guidance rescale phi (Lin et al. 2024)"
    )
    p.add_argument("--n", type=int, default=1, help="images per prompt")
    p.add_argument(
        "--size", type=int, nargs=2, default=(256, 256), metavar=("H", "W"), help="multiples of 8"
    )
    p.add_argument("--out", default="out/samples", help="output folder")
    p.add_argument("--batch", type=int, default=8, help="images sampled together")
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the U-Net and VAE decoder "
        "(the first batch compiles: ~1.5 min on 2 CPU cores)",
    )
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="U-Net and VAE decoder in the NHWC memory layout",
    )
    p.add_argument(
        "--attention",
        default="sdpa",
        choices=attention.BACKENDS,
        help="sdpa (PyTorch picks flash / efficient / cuDNN), "
        "triton (our fused kernel, CUDA) or math",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing output files")
    args = p.parse_args(argv)

    device, args.dtype = cli.check_sampling(args, p)
    if args.n < 1 or args.batch < 1:
        p.error("--n and --batch must be >= 1")
    if args.size[0] % 8 or args.size[1] % 8 or min(args.size) < 8:
        p.error(f"--size {args.size[0]} {args.size[1]}: both must be positive multiples of 8")
    if args.attention == "triton" and device.type != "cuda":
        p.error("--attention triton: the Triton kernel runs on CUDA devices (use sdpa on the CPU)")
    problem = compile_problem(device) if args.compile else None
    if problem:
        p.error(f"--compile: {problem}; run without --compile")
    values = cli.condition_values(args, model_cfg, p)
    args.jobs = []  # one job per image; a level prefix overrides --level
    for prompt in args.prompt:
        text, asked = cli.split_prompt(prompt, values, p)
        args.jobs += [cli.Job(text, asked, args.seed + i) for i in range(args.n)]
    return args, p


def file_name(i, job):
    level = job.values.get("level")
    return f"{i:03d}_{cli.slug(job.text)}_L{level or 0:g}_seed{job.seed}.png"


def main(argv=None):
    args, p = parse_args(argv)
    attention.set_backend(args.attention)
    out = Path(args.out)
    names = [file_name(i, job) for i, job in enumerate(args.jobs)]
    cli.refuse_overwrite([out / n for n in names + ["grid.png"]], args.overwrite, p)
    model = cli.load_checked(args, p, text_to_image=True)
    for job in args.jobs:
        cli.check_values(job.values, model.cfg, args.weights, p)
    guidance = cli.guidance_scales(args, model.cfg)
    # Every prompt is encoded once, then the text encoder is freed
    # (1.4 GB in fp32 for the release's).
    texts = sorted({job.text for job in args.jobs})
    contexts = torch.cat(
        [model.encode_text(texts[i : i + args.batch]) for i in range(0, len(texts), args.batch)]
    )
    context = dict(zip(texts, contexts))
    null = model.encode_text([args.negative_prompt])
    model.text_encoder = None
    if args.compile or args.channels_last:
        prepare_for_sampling(model, compile=args.compile, channels_last=args.channels_last)

    out.mkdir(parents=True, exist_ok=True)
    settings = cli.settings(args, model.cfg)
    pils = []
    starts = range(0, len(args.jobs), args.batch)
    for start in tqdm(starts, desc="batches", disable=len(args.jobs) <= args.batch):
        jobs = args.jobs[start : start + args.batch]
        text = torch.stack([context[job.text] for job in jobs])
        cond = cli.job_conditions(model.cfg, jobs, text)
        images = generate(
            model,
            cond,
            seeds=[j.seed for j in jobs],
            sampler=args.sampler,
            steps=args.steps,
            guidance=guidance,
            negative_prompt=null,
            size=tuple(args.size),
            interval=args.cfg_interval,
            rescale=args.cfg_rescale,
            dtype=args.dtype,
            progress=True,
        )
        for job, image, name in zip(jobs, images, names[start : start + args.batch]):
            info = {
                "prompt": job.text,
                **cli.condition_text(model.cfg, job.values),
                "seed": job.seed,
                **settings,
            }
            cli.save_png(image, out / name, info)
            pils.append(tensor_to_pil(image))
    image_grid(pils, cols=args.n if len(args.prompt) > 1 else min(len(pils), 8)).save(
        out / "grid.png"
    )
    print(f"wrote {len(pils)} images and grid.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
