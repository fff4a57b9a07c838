"""Edit remote-sensing images: inpaint, remove clouds, img2img (super-resolution, dehazing),
unbounded canvases.

    python edit.py inpaint  --weights W --image IMG --mask MASK --prompt "a dense forest" --level 16
    python edit.py declouds --weights W --image IMG [--mask MASK] [--cloud-threshold 0.75]
    python edit.py declouds --weights W --pairs ROOT [--split test.txt] [--lpips FILE [FILE]]
    python edit.py declouds --pairs ROOT --outputs DIR [--lpips FILE [FILE]]
    python edit.py img2img  --weights W --image IMG --strength 0.5 --prompt P --level 15 \\
        [--preset sr|dehaze]
    python edit.py extend   --weights W --prompts FILE --size 1024 4096 --level 16 \\
        [--method multidiffusion]
    python edit.py translate --weights W --controlnet C --control IMG --task pan2rgb --prompt P \\
        --level 16

Masks: white (>= 128) = regenerate, black = keep (the release's convention); a mask of another size
is resized when its aspect ratio matches the image's. Pixels outside the mask are kept exactly
beyond a feathered band of --feather pixels. A 9-channel inpainting model (Text2Earth-inpainting)
inpaints with its own U-Net; a text-to-image model by replacing the known latents at every step
(--resample N for RePaint's resampling). `--preset sr` upsamples the input --scale times and
generates at the finer level (--level is the input's), `--preset dehaze` regenerates at the same
level from the prompt of the clear scene. `extend` builds a canvas tile by tile: --prompts FILE
holds one prompt per line in row-major tile order (or one for every tile); it prints the grid.
`translate` generates the target modality of the --control image's frame with a ControlNet
(model/controlnet.py) on the frozen model: pan2rgb, nir2rgb, sar2rgb, pan2nir take a grey image (a
colour one is made grey with the training's luma weights), dehaze a hazy RGB image, sr a
low-resolution one, up-sampled --scale times and generated at level + log2(scale); the output has
the control's size. `declouds --pairs ROOT` declouds the first cloudy acquisition of every pair of a
folder (data/pairs.py: Sen2-MTC's tiles, or cloudy/ + clear/) with its estimated cloud mask, writes
OUT/<name>_declouds_seed<S>.png and OUT/<name>_cloudmask.png, and scores each output and the cloudy
input (the do-nothing baseline) against the clear image: PSNR, SSIM and, with --lpips, LPIPS, in
OUT/scores.json and a printed table; an interrupted run resumes, keeping the outputs written with
the same settings. `--outputs DIR` scores DIR/<name>.<ext> (another method's images) instead of
running a model. Every PNG carries the command, inputs and settings in its text chunks; files are
never overwritten unless --overwrite. docs/editing.md has what each edit reaches on the procedural
Earth, docs/multimodal.md what translation does.
"""

import argparse
import json
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from cli import sampling as cli
from data.modalities import IMAGE_EXTENSIONS, SR_FACTOR, TASKS, to_pan
from data.pairs import CloudPairs
from data.samples import to_rgb8
from data.transforms import pil_to_tensor
from evaluation.editing import mean_scores, score_pairs, scores_table
from evaluation.lpips import load_lpips
from model import conditions, editing
from model.controlnet import Controlled, load_controlnet
from model.pipeline import generate
from model.weights import WeightsError, trained_size

COMMANDS = ("inpaint", "declouds", "img2img", "extend", "translate")


def parse_args(argv=None):
    """(args, parser, values): the flags, checked, and {condition: value} of the scalar conditions
    asked for."""
    argv = sys.argv[1:] if argv is None else argv
    model_cfg = cli.model_config_for(argv)
    p = argparse.ArgumentParser(
        prog="edit.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    common = argparse.ArgumentParser(add_help=False)
    cli.add_model_flags(common)
    common.add_argument(
        "--prompt", action="append", default=None, help="text prompt (extend: repeat, one a tile)"
    )
    cli.add_sampling_flags(
        common,
        cfg=None,
        cfg_help="guidance scale (1 = none; default: the release's, 3.5 for "
        "the inpainting model, else 4)",
    )
    cli.add_condition_flags(common, model_cfg)
    common.add_argument("--n", type=int, default=1, help="outputs (seeds) per input")
    common.add_argument("--out", default="out/edits", help="output folder")
    common.add_argument("--overwrite", action="store_true", help="replace existing output files")
    images = argparse.ArgumentParser(add_help=False)
    images.add_argument("--image", required=True, help="the input image (PNG, JPEG, TIFF, ...)")
    masked = argparse.ArgumentParser(add_help=False)
    masked.add_argument(
        "--method",
        default=None,
        choices=editing.METHODS,
        help="model: a 9-channel inpainting U-Net; replace: any text-to-image U-Net "
        "(default: what the weights are)",
    )
    masked.add_argument(
        "--resample", type=int, default=1, help="RePaint resampling passes a step (replace method)"
    )
    masked.add_argument(
        "--feather", type=int, default=3, help="paste-back band outside the mask, pixels"
    )
    for name, parents, help_ in (
        ("inpaint", [common, images, masked], "regenerate the white part of --mask"),
        ("declouds", [common, masked], "inpaint the clouds (mask given or found)"),
        ("img2img", [common, images], "SDEdit: re-noise the image and denoise it"),
        ("extend", [common], "a canvas of any size, tile by tile"),
        ("translate", [common], "another modality of the control image's frame"),
    ):
        s = sub.add_parser(name, parents=parents, help=help_, description=help_)
        if name == "inpaint":
            s.add_argument("--mask", required=True, help="white = regenerate, black = keep")
        if name == "declouds":
            source = s.add_mutually_exclusive_group(required=True)
            source.add_argument("--image", help="the cloudy image (PNG, JPEG, TIFF, ...)")
            source.add_argument(
                "--pairs",
                help="a folder of cloudy / clear pairs (Sen2-MTC's tiles, or cloudy/ + clear/): "
                "each declouded and scored against its clear image",
            )
            s.add_argument(
                "--mask", default=None, help="the cloud mask (default: estimated from the image)"
            )
            add_pairs_flags(s)
            s.add_argument(
                "--cloud-threshold",
                type=float,
                default=0.75,
                help="brightness a cloud exceeds, 0-1",
            )
            s.add_argument(
                "--cloud-saturation",
                type=float,
                default=0.12,
                help="colour spread a cloud stays below",
            )
            s.add_argument(
                "--dilate", type=int, default=2, help="pixels the estimated mask grows by"
            )
        if name == "img2img":
            s.add_argument(
                "--strength",
                type=float,
                default=None,
                help="how far the input is re-noised, (0, 1]",
            )
            s.add_argument("--preset", default=None, choices=sorted(editing.PRESETS))
            s.add_argument(
                "--scale", type=int, default=2, choices=(2, 4), help="super-resolution factor"
            )
        if name == "translate":
            s.add_argument(
                "--controlnet",
                required=True,
                help="ControlNet weights: ours, or diffusers' (folder, file)",
            )
            s.add_argument(
                "--control", required=True, help="the control image (PAN, NIR, SAR, hazy, low-res)"
            )
            s.add_argument(
                "--task", default=None, choices=sorted(TASKS), help="default: the ControlNet's own"
            )
            s.add_argument(
                "--control-scale",
                type=float,
                default=1.0,
                help="weight of the ControlNet's residuals",
            )
            s.add_argument(
                "--scale", type=int, default=SR_FACTOR, help="sr: the up-sampling factor"
            )
            s.add_argument(
                "--size",
                type=int,
                nargs=2,
                default=None,
                metavar=("H", "W"),
                help="output size (must be the control's, after sr's up-sampling)",
            )
        if name == "extend":
            s.add_argument(
                "--prompts", default=None, help="file: one prompt per line, row-major tile order"
            )
            s.add_argument(
                "--size",
                type=int,
                nargs=2,
                required=True,
                metavar=("H", "W"),
                help="multiples of 8",
            )
            s.add_argument(
                "--tile",
                type=int,
                default=None,
                help="tile pixels (default: the training size or 256)",
            )
            s.add_argument(
                "--overlap", type=int, default=None, help="tile overlap pixels (default: tile / 4)"
            )
            s.add_argument("--method", default="outpaint", choices=editing.CANVAS_METHODS)
            s.add_argument(
                "--resample",
                type=int,
                default=1,
                help="RePaint passes a step (outpaint, text-to-image)",
            )
            s.add_argument(
                "--batch", type=int, default=4, help="tiles run together (multidiffusion)"
            )
    args = p.parse_args(argv)
    values = check_args(args, p, model_cfg)
    return args, p, values


def check_args(args, p, model_cfg):
    """Everything that can be checked before the weights load, each problem one line (exit 2);
    returns the scalar conditions asked for ({name: value}, the prompt's level prefix over
    --level)."""
    args.device, args.dtype = cli.check_sampling(args, p)
    if args.n < 1:
        p.error(f"--n must be >= 1, got {args.n}")
    values = cli.condition_values(args, model_cfg, p)
    if getattr(args, "resample", 1) < 1 or getattr(args, "feather", 0) < 0:
        p.error("--resample must be >= 1 and --feather >= 0")
    if args.command == "declouds":
        check_pairs_flags(args, p)
    if args.command == "extend":
        args.prompt = canvas_prompts(args, p)
    elif args.command == "img2img":
        args.strength = img2img_strength(args, p)

    if args.command != "extend" and len(args.prompt or []) > 1:
        p.error(f"{args.command} takes one --prompt, got {len(args.prompt)}")
    if args.command == "translate" and args.scale < 1:
        p.error(f"--scale must be >= 1, got {args.scale}")
    if args.command in ("inpaint", "img2img") and not args.prompt:
        p.error(f'{args.command} needs --prompt (the scene wanted; "" for none)')
    prompts = []
    for prompt in args.prompt or [""]:
        text, asked = cli.split_prompt(prompt, values, p)  # a level prefix: every tile's level
        prompts.append(text)
        values = asked
    args.prompt = prompts
    needs_level = (args.command == "img2img" and args.preset == "sr") or (
        args.command == "translate" and args.task == "sr"
    )
    if needs_level and not values.get("level"):
        p.error(
            f"{'--preset' if args.command == 'img2img' else '--task'} sr needs the input's "
            "--level (> 0): the output is generated at level + log2(scale)"
        )
    return values


def add_pairs_flags(s):
    """declouds' flags for --pairs."""
    s.add_argument("--split", default=None, help="--pairs: Sen2-MTC's tile list (its test.txt)")
    s.add_argument(
        "--outputs",
        default=None,
        help="--pairs: score this folder's images (DIR/<name>.<ext>, another method's) instead of "
        "running a model",
    )
    s.add_argument(
        "--lpips",
        nargs="+",
        default=None,
        metavar="FILE",
        help="--pairs: LPIPS weights: torchvision's alexnet-owt-7be5be79.pth (or "
        "vgg16-397923af.pth) and the lpips package's weights/v0.1/alex.pth (vgg.pth), or one "
        "file holding both",
    )
    s.add_argument(
        "--full-scale",
        type=float,
        default=None,
        help="--pairs: the value of white in images of more than 8 bits (default 10000: "
        "Sentinel-2 reflectance x 10000)",
    )


def check_pairs_flags(args, p):
    """declouds: the --pairs flags go with --pairs, and --pairs with what it can use."""
    if not args.pairs:
        for flag in ("split", "outputs", "lpips", "full_scale"):
            if getattr(args, flag) is not None:
                p.error(f"--{flag.replace('_', '-')} goes with --pairs (cloudy / clear pairs)")
        return
    if args.mask is not None:
        p.error("--mask is one image's; with --pairs each cloud mask is estimated")
    if args.full_scale is not None and not args.full_scale > 0:
        p.error(f"--full-scale must be > 0, got {args.full_scale}")
    if args.outputs and args.weights != cli.DEFAULT_WEIGHTS:
        p.error("--outputs scores images already made: give --weights or --outputs, not both")
    if args.outputs and args.n > 1:
        p.error("--outputs holds one image a pair: --n does not apply")


def canvas_prompts(args, p):
    """extend: the prompts of --prompt and of the --prompts FILE (one a line), in this order, with
    the canvas, tile and overlap sizes checked."""
    prompts = args.prompt
    if args.prompts:
        try:
            lines = Path(args.prompts).read_text().splitlines()
        except (OSError, UnicodeDecodeError) as e:
            p.error(f"--prompts {args.prompts}: cannot read it as text ({e})")
        prompts = (prompts or []) + [ln.strip() for ln in lines if ln.strip()]
    if not prompts:
        p.error(
            "extend needs prompts: --prompts FILE (one per line) or --prompt (repeatable); "
            "none given" + (f" ({args.prompts} has no non-empty line)" if args.prompts else "")
        )
    for name, v in (
        ("--size", args.size[0]),
        ("--size", args.size[1]),
        ("--tile", args.tile),
        ("--overlap", args.overlap),
    ):
        if v is not None and (v % 8 or v < (0 if name == "--overlap" else 8)):
            p.error(
                f"{name} {v}: canvas sizes, tiles and overlaps must be multiples of 8 "
                f"(got --size {args.size[0]} {args.size[1]})"
            )
    return prompts


def img2img_strength(args, p):
    """img2img: --strength, else the --preset's, checked to lie in (0, 1]."""
    preset = editing.PRESETS.get(args.preset, {})
    strength = args.strength if args.strength is not None else preset.get("strength")
    if strength is None:
        p.error("img2img needs --strength (0, 1] or a --preset")
    if not 0 < strength <= 1:
        p.error(f"--strength must lie in (0, 1], got {strength}")
    return strength


def read_image(path, p, what="--image"):
    """An image file -> PIL image, or exit 2 with what is wrong."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except FileNotFoundError:
        p.error(f"{what} {path}: no such file")
    except (UnidentifiedImageError, OSError) as e:
        p.error(f"{what} {path}: not an image file ({e})")


def load_inputs(args, p):
    """(image (1, 3, H, W) in [-1, 1], mask (1, 1, H, W) of 0 and 1 or None) from the files,
    checked."""
    im = read_image(args.image, p).convert("RGB")
    W, H = im.size
    if H % 8 or W % 8:
        p.error(
            f"--image {args.image} is {W}x{H}: width and height must be multiples of 8 "
            "(crop or pad it)"
        )
    image = torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
    if getattr(args, "mask", None) is None:
        return image, None
    m = read_image(args.mask, p, "--mask").convert("L")
    if m.size != im.size:
        # aspect ratios differ by more than a pixel
        if abs(m.size[0] * H - m.size[1] * W) > max(H, W):
            p.error(
                f"--mask {args.mask} is {m.size[0]}x{m.size[1]} and --image {W}x{H}: "
                "sizes and aspect ratios differ"
            )
        warnings.warn(
            f"--mask {args.mask} is {m.size[0]}x{m.size[1]}: resized to the image's {W}x{H}"
        )
        m = m.resize((W, H), Image.NEAREST)
    mask = (torch.from_numpy(np.asarray(m).copy()) >= 128).float()[None, None]
    if not mask.any():
        p.error(f"--mask {args.mask} is all black: nothing to regenerate")
    return image, mask


def main(argv=None):
    args, p, values = parse_args(argv)
    if args.command == "declouds" and args.pairs:
        return decloud_pairs(args, p, values)
    out = Path(args.out)
    seeds = [args.seed + i for i in range(args.n)]
    stems = {"extend": "canvas", "translate": Path(getattr(args, "control", "")).stem}
    stem = stems.get(args.command) or Path(args.image).stem
    names = [out / f"{stem}_{args.command}_seed{s}.png" for s in seeds]
    if args.command == "declouds":
        names.append(out / f"{stem}_cloudmask.png")
    cli.refuse_overwrite(names, args.overwrite, p)
    image = mask = None
    if args.command not in ("extend", "translate"):
        image, mask = load_inputs(args, p)
    model = cli.load_checked(args, p)
    cli.check_values(values, model.cfg, args.weights, p)
    f = model.vae.downsample
    if image is not None and (image.shape[2] % f or image.shape[3] % f):
        p.error(f"--image {args.image}: width and height must be multiples of {f}")
    if args.cfg is None:
        args.cfg = 3.5 if editing.is_inpainting_model(model) else 4.0
    if args.command == "img2img" and args.preset == "sr":
        values = {**values, "level": finer_level(values["level"], args.scale, "--preset sr", p)}
    sampling = dict(
        sampler=args.sampler,
        steps=args.steps,
        guidance=cli.guidance_scales(args, model.cfg),
        negative_prompt=args.negative_prompt,
        dtype=args.dtype,
        progress=True,
    )
    info = {
        "command": args.command,
        "prompt": " | ".join(args.prompt),
        **cli.condition_text(model.cfg, values),
        **cli.settings(args, model.cfg),
    }
    try:
        if args.command == "translate":
            outputs = translate(args, p, model, values, seeds, sampling, info)
        else:
            outputs = run(args, model, image, mask, values, seeds, sampling, info, out)
    except ValueError as e:  # a combination the library refuses
        p.error(str(e))
    out.mkdir(parents=True, exist_ok=True)
    for (picture, extra), name in zip(outputs, names):
        cli.save_png(picture[0], name, {**info, **extra})
    print(
        f"wrote {len(outputs)} image(s) to {out}: "
        f"{', '.join(n.name for n in names[: len(outputs)])}"
    )
    return 0


def finer_level(level, scale, what, p):
    """The level of an image up-sampled `scale` times from one at `level`: level + log2(scale), at
    most 20."""
    finer = level + math.log2(scale)
    if finer > 20:
        p.error(f"{what}: input level {level:g} x{scale} asks for level {finer:g}, beyond 20")
    print(f"super-resolution x{scale}: input level {level:g}, output level {finer:g}")
    return finer


def translate(args, p, model, values, seeds, sampling, info):
    """The translate command: the ControlNet and its control image checked, then one image a seed,
    as run()'s [(image (1, 3, H, W), extra text chunks)]; `info` gains the ControlNet's settings and
    the output level."""
    try:
        net, meta = load_controlnet(args.controlnet, model.unet)
    except WeightsError as e:
        p.error(f"--controlnet: {e}")
    if net.control_cfg.conditioning_channels != 3:
        p.error(
            f"--controlnet {args.controlnet} reads {net.control_cfg.conditioning_channels}-channel "
            "control images; translate gives it 3 (grey bands repeated)"
        )
    task = args.task or meta.get("task")
    if task not in TASKS:
        p.error(f"--task: {args.controlnet} records no task; name one of {sorted(TASKS)}")
    if args.task and meta.get("task") and args.task != meta["task"]:
        p.error(f"--task {args.task}: {args.controlnet} was trained for {meta['task']}")
    if task == "sr" and not values.get("level"):
        p.error(
            "--task sr needs the input's --level (> 0): "
            "the output is generated at level + log2(scale)"
        )
    im = read_image(args.control, p, "--control")
    if im.mode not in ("L", "RGB", "P", "I;16", "I;16B", "I;16L", "I"):
        p.error(
            f"--control {args.control} has mode {im.mode} ({len(im.getbands())} bands): "
            "give a grey (1-channel, 8 or 16 bits) or RGB (3-channel) image"
        )
    try:
        im = to_rgb8(im)[0]  # 16-bit grey scaled to 8 bits
    except ValueError as e:
        p.error(f"--control {args.control}: {e}")
    if task == "sr":  # the training's control: LR up-sampled
        im = im.resize((im.size[0] * args.scale, im.size[1] * args.scale), Image.BICUBIC)
    W, H = im.size
    if args.size and tuple(args.size) != (H, W):
        p.error(
            f"--size {args.size[0]} {args.size[1]}: "
            f"the output has the control image's size, {H} {W}"
            + (f" (after x{args.scale} up-sampling)" if task == "sr" else "")
            + "; resize the control image"
        )
    f = model.vae.downsample * 2 ** (len(model.cfg.unet.channels) - 1)
    if H % f or W % f:
        p.error(
            f"--control {args.control}: {W}x{H}"
            + (f" after x{args.scale}" if task == "sr" else "")
            + f": width and height must be multiples of {f} (crop or pad it)"
        )
    control = pil_to_tensor(im)[None]  # 1, 3, H, W in [-1, 1]
    if TASKS[task][0] in ("pan", "nir", "sar"):
        control = to_pan(control)  # grey, as the training's controls
    if task == "sr":
        values = {**values, "level": finer_level(values["level"], args.scale, "--task sr", p)}
    cond = conditions.request(model.cfg, 1, text=args.prompt[:1], **values)
    unet = Controlled(model.unet, [(net, control, args.control_scale)])
    info.update(
        controlnet=args.controlnet,
        control=args.control,
        task=task,
        control_scale=args.control_scale,
        **cli.condition_text(model.cfg, values),
    )
    return [
        (generate(model, cond, seeds=[s], unet=unet, size=(H, W), **sampling), {"seed": s})
        for s in seeds
    ]


def run(args, model, image, mask, values, seeds, sampling, info, out):
    """The edit itself: [(image (1, 3, H, W), extra text chunks)] in the order of main's file
    names."""
    cond = conditions.request(model.cfg, 1, text=args.prompt[:1], **values)
    if args.command == "extend":
        tile = args.tile or trained_size(args.weights) or 256
        overlap = args.overlap if args.overlap is not None else tile // 4 // 8 * 8
        origins, (rows, cols) = editing.canvas_tiles(
            tuple(args.size), tile, overlap, model.vae.downsample
        )
        print(
            f"canvas {args.size[0]}x{args.size[1]}: {rows} x {cols} tiles of {tile} px "
            f"overlapping {overlap} px "
            f"({len(origins)} prompts, row-major, or one for all; given {len(args.prompt)})"
        )
        info.update(
            size=f"{args.size[0]}x{args.size[1]}",
            tile=tile,
            overlap=overlap,
            method=args.method,
            resample=args.resample,
        )
        return [
            (
                editing.extend(
                    model,
                    args.prompt,
                    tuple(args.size),
                    values=values,
                    tile=tile,
                    overlap=overlap,
                    method=args.method,
                    seed=s,
                    batch=args.batch,
                    resample=args.resample,
                    **sampling,
                ),
                {"seed": s},
            )
            for s in seeds
        ]
    info["image"] = args.image
    if args.command == "img2img":
        info.update(strength=args.strength, preset=args.preset or "")
        if args.preset == "sr":
            info["scale"] = args.scale
            return [
                (
                    editing.super_resolve(
                        model,
                        cond,
                        image,
                        args.scale,
                        seeds=[s],
                        strength=args.strength,
                        **sampling,
                    ),
                    {"seed": s},
                )
                for s in seeds
            ]
        return [
            (editing.img2img(model, cond, image, args.strength, seeds=[s], **sampling), {"seed": s})
            for s in seeds
        ]
    info.update(
        method=editing.inpaint_method(model, args.method),
        resample=args.resample,
        feather=args.feather,
    )
    if args.command == "declouds" and mask is None:
        mask = editing.cloud_mask(image, args.cloud_threshold, args.cloud_saturation, args.dilate)
        if not mask.any():
            raise ValueError(
                f"--image {args.image}: no cloud found (no pixel brighter than --cloud-threshold "
                f"{args.cloud_threshold} and whiter than --cloud-saturation "
                f"{args.cloud_saturation}); lower the threshold or give --mask"
            )
        print(f"estimated cloud cover: {mask.mean().item():.1%} of the image")
    if args.command == "declouds":
        info["mask"] = (
            args.mask or f"estimated (threshold {args.cloud_threshold}, dilate {args.dilate})"
        )
    else:
        info["mask"] = args.mask
    results = [
        (
            editing.inpaint(
                model,
                cond,
                image,
                mask,
                seeds=[s],
                method=args.method,
                resample=args.resample,
                feather=args.feather,
                **sampling,
            ),
            {"seed": s},
        )
        for s in seeds
    ]
    if args.command == "declouds":
        results.append((mask.expand(-1, 3, -1, -1) * 2 - 1, {"seed": ""}))
    return results


# ----------------------------------------------------------------------------------------------
# declouds --pairs: a folder of cloudy / clear pairs declouded and scored
# ----------------------------------------------------------------------------------------------
PER_IMAGE = ("image", "seed", "cloud_cover")  # the PNG chunks that differ between the outputs


def decloud_pairs(args, p, values):
    """declouds --pairs: the outputs made (decloud_missing) or found (--outputs), scored with the
    cloudy inputs against the clear images; OUT/scores.json (atomically) and the table printed."""
    out = Path(args.out)
    report = out / "scores.json"
    cli.refuse_overwrite([report], args.overwrite, p)
    try:
        pairs = CloudPairs(args.pairs, args.split, args.full_scale)
    except ValueError as e:
        p.error(f"--pairs {args.pairs}: {e}")
    lpips = None
    if args.lpips:
        try:
            lpips = load_lpips(*args.lpips, device=args.device)
        except WeightsError as e:
            p.error(f"--lpips: {e}")
    print(f"{len(pairs)} pairs ({pairs.layout} layout) in {args.pairs}")
    if args.outputs:
        outputs, settings, no_cloud = method_outputs(args, pairs, p), None, []
        label = f"outputs in {args.outputs}"
    else:
        outputs, settings, no_cloud = decloud_missing(args, p, values, pairs, out)
        label = "declouded"
    try:
        rows = score_pairs(pairs, outputs, lpips)
    except ValueError as e:
        p.error(str(e))
    means = {k: mean_scores(v) for k, v in rows.items()}  # "outputs", "cloudy input"
    scores = {
        "pairs": str(args.pairs),
        "layout": pairs.layout,
        "split": args.split,
        "full_scale": args.full_scale,
        "declouded": "the first cloudy acquisition of each pair",
        "outputs": f"the images in {args.outputs}" if args.outputs else "edit.py declouds",
        "settings": settings,
        "lpips": {"net": lpips.net, "files": args.lpips} if lpips else "not measured",
        "mean": means,
        "no_cloud_found": no_cloud,
        "images": rows,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = report.with_suffix(".tmp")
    tmp.write_text(json.dumps(scores, indent=1))
    os.replace(tmp, report)
    named = {label: means["outputs"], "cloudy input (do nothing)": means["cloudy input"]}
    print(scores_table(named, lpips.net if lpips else None))
    if no_cloud:
        print(f"no cloud found in {len(no_cloud)} inputs: their outputs are the inputs")
    print(f"wrote {report}")
    return 0


def method_outputs(args, pairs, p):
    """--outputs: {pair name: [its image]}, DIR/<name>_declouds_seed<S>.png (this command's) or
    DIR/<name>.<ext> (another method's); every pair needs one."""
    folder, found, missing = Path(args.outputs), {}, []
    for pair in pairs.pairs:
        names = [f"{pair.name}_declouds_seed{args.seed}.png"]
        names += [pair.name + ext for e in IMAGE_EXTENSIONS for ext in (e, e.upper())]
        path = next((folder / n for n in names if (folder / n).is_file()), None)
        found[pair.name] = [path]
        if path is None:
            missing.append(folder / f"{pair.name}.png")
    if missing:
        p.error(
            f"--outputs {folder}: {len(missing)} of {len(pairs)} pairs have no image there "
            f"(e.g. {missing[0]}, or another image extension)"
        )
    return found


def decloud_missing(args, p, values, pairs, out):
    """The model's outputs of every pair: ({name: [files]}, the settings they record, the names of
    the pairs where no cloud was found). The first cloudy acquisition is inpainted where
    editing.cloud_mask finds clouds (kept as it is where it finds none); outputs already in OUT with
    the same settings are kept, other settings exit 2 unless --overwrite remakes them."""
    model = cli.load_checked(args, p)
    cli.check_values(values, model.cfg, args.weights, p)
    if args.cfg is None:
        args.cfg = 3.5 if editing.is_inpainting_model(model) else 4.0
    info = {
        "command": "declouds --pairs",
        "prompt": args.prompt[0],
        **cli.condition_text(model.cfg, values),
        **cli.settings(args, model.cfg),
        "method": editing.inpaint_method(model, args.method),
        "resample": args.resample,
        "feather": args.feather,
        "mask": f"estimated (threshold {args.cloud_threshold}, saturation "
        f"{args.cloud_saturation}, dilate {args.dilate})",
    }
    seeds = [args.seed + i for i in range(args.n)]
    outputs = {q.name: [out / f"{q.name}_declouds_seed{s}.png" for s in seeds] for q in pairs.pairs}
    todo = [
        (i, seed, path)
        for i, q in enumerate(pairs.pairs)
        for seed, path in zip(seeds, outputs[q.name])
        if args.overwrite or not path.exists()
    ]
    if not args.overwrite:
        check_kept([f for files in outputs.values() for f in files if f.exists()], info, p)
    total = len(pairs) * len(seeds)
    print(f"declouds: {total - len(todo)} of {total} outputs already written, {len(todo)} to go")
    cond = conditions.request(model.cfg, 1, text=args.prompt[:1], **values)
    sampling = dict(
        sampler=args.sampler,
        steps=args.steps,
        guidance=cli.guidance_scales(args, model.cfg),
        negative_prompt=args.negative_prompt,
        dtype=args.dtype,
        method=args.method,
        resample=args.resample,
        feather=args.feather,
    )
    f = model.vae.downsample
    for i, seed, path in tqdm(todo, desc="declouding", disable=not todo):
        cloudy, _, name = pairs[i]
        image = cloudy[:1]  # 1, 3, H, W: the first acquisition
        if image.shape[2] % f or image.shape[3] % f:
            p.error(
                f"{pairs.pairs[i].cloudy[0]} is {image.shape[3]}x{image.shape[2]}: width and "
                f"height must be multiples of {f} (crop or pad the pairs)"
            )
        mask = editing.cloud_mask(image, args.cloud_threshold, args.cloud_saturation, args.dilate)
        result = image
        if mask.any():
            try:
                result = editing.inpaint(model, cond, image, mask, seeds=[seed], **sampling)
            except ValueError as e:  # a combination the library refuses
                p.error(str(e))
        path.parent.mkdir(parents=True, exist_ok=True)
        extra = {"image": pairs.pairs[i].cloudy[0], "seed": seed, "cloud_cover": mask.mean().item()}
        if seed == seeds[0]:  # the mask first: an output on disk has its mask beside it
            cli.save_png(mask[0].expand(3, -1, -1) * 2 - 1, out / f"{name}_cloudmask.png", extra)
        cli.save_png(result[0], path, {**info, **extra})
    no_cloud = [
        name
        for name, files in outputs.items()
        if float(png_text(files[0]).get("cloud_cover", "nan")) == 0
    ]
    return outputs, info, no_cloud


def png_text(path):
    """A PNG's text chunks."""
    with Image.open(path) as im:
        return im.text


def check_kept(files, info, p):
    """Outputs kept from an earlier run must record this run's settings; the first that does not
    -> exit 2 naming it and the settings that differ."""
    for path in files:
        recorded = png_text(path)
        differ = [k for k in info if k not in PER_IMAGE and recorded.get(k) != str(info[k])]
        if differ:
            was = ", ".join(f"{k} {recorded.get(k)!r} not {str(info[k])!r}" for k in differ)
            p.error(
                f"{path} was made with other settings ({was}); pass --overwrite to remake the "
                "outputs, or another --out"
            )


if __name__ == "__main__":
    sys.exit(main())
