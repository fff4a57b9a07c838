"""Text (and resolution) to remote-sensing image.

    python sample.py --weights path/to/Text2Earth --prompt "a dense residential area" --level 17
    python sample.py --weights out/demo/model.safetensors --prompt "16_GOOGLE_LEVEL_farmland" --n 4
    # a synthetic training set from the captions of RSICD's train split, on 8 GPUs
    torchrun --nproc_per_node=8 -- sample.py --weights path/to/Text2Earth --level 17 --n 2 \\
        --prompts-file RSICD/dataset_rsicd.json --split train --out synth/rsicd

`--weights` is a diffusers-format folder as released (lcybuaa/Text2Earth) or one of our checkpoints.
The level is the Google map level L (resolution_m = 2 ** (17 - L)); 0 means "no resolution". A
prompt may carry it in the release's prefix form "{L}_GOOGLE_LEVEL_{text}", which overrides --level
for that prompt. Every scalar condition the model reads has its flags (`--NAME V`, `--NAME-cfg S`;
cli/sampling.py). Every image is written as a PNG with the prompt, its conditions, seed, sampler,
steps and guidance in its text chunks, plus a grid of all of them. Existing files are never
overwritten unless --overwrite.

--prompts-file FILE takes the prompts from a file instead of --prompt, for large jobs:
  .json   a Karpathy json (RSICD, UCM-Captions: {"images": [{"filename", "split", "sentences":
          [{"raw"}]}]}): every distinct sentence of each image of --split (default: every split),
          at the level of the json's gsd_m when it has one; an image's keys named as a condition's
          fields ("lat", "lon") set that condition
  .jsonl  one object a line: "text" (or "caption") and any condition's fields ("level" or
          "resolution_m", "lat" and "lon", ...); a CaptionFolder manifest reads as it is
  other   one prompt a line (the level prefix allowed), blank lines skipped
A prompt's own conditions win over the flags. Image k of prompt i is OUT/{i:06d}_{k}.png with seed
seed + n * i + k. A rerun keeps the images already there (an interrupted run resumes) and refuses
other settings (recorded in OUT/generation.json) unless --overwrite, which makes them again. No
grid: once every image exists, OUT/manifest.jsonl lists them (file, caption, the conditions' fields,
seed), a manifest train.py reads as it is (--data=folder --data_path=OUT/manifest.jsonl).

The same command runs under torchrun (`torchrun --nproc_per_node=N -- sample.py ...`; the `--` keeps
torchrun from reading --n as its --nnodes): each process makes its share of the batches (on its own
GPU, cuda:LOCAL_RANK), the same images as one process, and rank 0 writes the grid or the manifest
once all are done (cli/distributed.py).
"""

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import torch
from PIL import Image
from tqdm.auto import tqdm

from cli import distributed, sampling as cli
from data.levels import level_from_resolution
from data.samples import is_number
from data.transforms import image_grid
from model import attention, conditions
from model.pipeline import compile_problem, generate, prepare_for_sampling

MANIFEST = "manifest.jsonl"


def parse_args(argv=None):
    """(args, parser): the flags, checked, with args.jobs the images to make and args.names their
    files."""
    argv = sys.argv[1:] if argv is None else argv
    model_cfg = cli.model_config_for(argv)
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", action="append", help="text prompt; repeat for several")
    source.add_argument(
        "--prompts-file",
        default=None,
        metavar="FILE",
        help="prompts from a caption file, a .jsonl or a Karpathy .json (see above)",
    )
    p.add_argument(
        "--split", default=None, help="with a Karpathy --prompts-file: this split's images only"
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
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace existing output files (--prompts-file: those made with other settings)",
    )
    args = p.parse_args(argv)

    args.device = distributed.local_device(args.device)  # under torchrun: this rank's GPU
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
    if args.prompts_file:
        prompts = read_prompts_file(args.prompts_file, args.split, values, model_cfg, p)
        ik = [(i, k) for i in range(len(prompts)) for k in range(args.n)]
        args.jobs = [cli.Job(*prompts[i], args.seed + args.n * i + k) for i, k in ik]
        args.names = [f"{i:06d}_{k}.png" for i, k in ik]
        return args, p
    if args.split is not None:
        p.error("--split picks the images of a Karpathy json given as --prompts-file")
    args.jobs = []  # one job per image; a level prefix overrides --level
    for prompt in args.prompt:
        text, asked = cli.split_prompt(prompt, values, p)
        args.jobs += [cli.Job(text, asked, args.seed + i) for i in range(args.n)]
    args.names = [file_name(i, job) for i, job in enumerate(args.jobs)]
    return args, p


def file_name(i, job):
    level = job.values.get("level")
    return f"{i:03d}_{cli.slug(job.text)}_L{level or 0:g}_seed{job.seed}.png"


# ----------------------------------------------------------------------------------------------
# --prompts-file
# ----------------------------------------------------------------------------------------------


def read_prompts_file(path, split, values, model_cfg, p):
    """[(text, {condition: value})] of a --prompts-file (its formats in the module docstring), each
    prompt's own conditions over the flags' `values`. A file that does not read, a bad value or no
    prompt at all is one line naming the file (and the line), exit 2."""
    path = Path(path)
    if not path.is_file():
        p.error(f"--prompts-file {path}: no such file")
    if split is not None and path.suffix != ".json":
        p.error(f"--split picks the images of a Karpathy json; --prompts-file {path} is not one")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        p.error(f"--prompts-file {path}: {e}")
    if path.suffix == ".json":
        rows = karpathy_rows(path, text, split, p)
    elif path.suffix == ".jsonl":
        rows = jsonl_rows(path, text, p)
    else:
        lines = enumerate(text.splitlines(), 1)
        rows = [(f"{path}:{n}", {"text": line.strip()}) for n, line in lines if line.strip()]
    if not rows:
        p.error(f"--prompts-file {path}: no prompts in it")
    prompts = []
    for where, row in rows:
        prompt, own = cli.split_prompt(row["text"], values, p)
        try:
            own.update(row_values(row, model_cfg))
        except ValueError as e:
            p.error(f"{where}: {e}")
        prompts.append((prompt, own))
    return prompts


def karpathy_rows(path, text, split, p):
    """[(where, row)]: one row per distinct sentence of each image of `split` (None: all), the
    image's own keys and the json's gsd_m (as "resolution_m") beside its "text"."""
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as e:
        p.error(f"--prompts-file {path}: not valid json ({e})")
    if not isinstance(meta, dict) or not isinstance(meta.get("images"), list):
        p.error(f"--prompts-file {path}: not a Karpathy json (no 'images' list)")
    gsd = {"resolution_m": meta["gsd_m"]} if meta.get("gsd_m") is not None else {}
    rows = []
    for n, im in enumerate(meta["images"]):
        if not isinstance(im, dict) or not isinstance(im.get("sentences"), list):
            p.error(f"--prompts-file {path}: images[{n}] has no 'sentences' list")
        if split is not None and im.get("split") != split:
            continue
        raw = [s.get("raw") for s in im["sentences"] if isinstance(s, dict)]
        texts = dict.fromkeys(r.strip() for r in raw if isinstance(r, str) and r.strip())
        rows += [(f"{path}: images[{n}]", {**im, **gsd, "text": t}) for t in texts]
    if not rows and split is not None:
        found = sorted({str(im.get("split")) for im in meta["images"]})
        p.error(
            f"--prompts-file {path}: no captions in --split {split} "
            f"(splits present: {', '.join(found)})"
        )
    return rows


def jsonl_rows(path, text, p):
    """[(where, row)]: each line's object, its "text" (or "caption") stripped."""
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            p.error(f"{path}:{n}: not valid json ({e})")
        caption = row.get("text", row.get("caption")) if isinstance(row, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            p.error(f"{path}:{n}: no 'text' or 'caption' string in {line.strip()[:80]}")
        rows.append((f"{path}:{n}", {**row, "text": caption.strip()}))
    return rows


def row_values(row, model_cfg):
    """{condition: value} of the conditions whose fields a prompt's row gives (the level also as
    "resolution_m"), checked as the flags are; ValueError naming a bad one."""
    out = {}
    for name in model_cfg.unet.embedded_conditions():
        fields = model_cfg.conditions[name].field_names()
        given = [row.get(f) for f in fields]
        if name == "level" and given[0] is None and row.get("resolution_m") is not None:
            if not is_number(row["resolution_m"]):
                raise ValueError(f"resolution_m {row['resolution_m']!r} is not a number")
            given = [level_from_resolution(row["resolution_m"])]
        if all(v is None for v in given):
            continue
        if not all(is_number(v) for v in given):
            names = " and ".join(repr(f) for f in fields)
            raise ValueError(f"the {name} needs {names}, numbers (got {given})")
        value = [float(v) for v in given]
        conditions.check_value(model_cfg, name, value)
        if name == "level" and not 0.0 <= value[0] <= 20.0:
            raise ValueError(f"level {value[0]:g} is outside [0, 20]")
        out[name] = value[0] if len(fields) == 1 else tuple(value)
    return out


def record(args, model_cfg):
    """What defines the images of a --prompts-file run, kept in OUT/generation.json: the weights,
    the prompts read (every job's text, conditions and seed, hashed), the sampler and guidance. The
    batch matters to the ddpm sampler only (its noise is drawn per batch)."""
    jobs = [[job.text, job.values, job.seed] for job in args.jobs]
    digest = hashlib.sha256(json.dumps(jobs, sort_keys=True).encode()).hexdigest()
    return {
        **cli.settings(args, model_cfg),
        "lora": list(args.lora),
        "prompts_file": str(args.prompts_file),
        "split": args.split,
        "n": args.n,
        "seed": args.seed,
        "jobs": f"{len(jobs)} images, sha256 {digest[:16]}",
        "size": list(args.size),
        "cfg_interval": list(args.cfg_interval) if args.cfg_interval else None,
        "cfg_rescale": args.cfg_rescale,
        "dtype": str(args.dtype),
        "batch": args.batch if args.sampler == "ddpm" else None,
    }


def write_manifest(model_cfg, jobs, paths, path):
    """A CaptionFolder manifest (.jsonl) of the images, written atomically: per image its file
    (relative to the manifest's folder), caption, each condition's fields and seed."""
    rows = []
    for job, image in zip(jobs, paths):
        row = {"file": image.name, "caption": job.text}
        for name in model_cfg.unet.embedded_conditions():
            value = job.values.get(name)
            fields = model_cfg.conditions[name].field_names()
            if value is not None:
                row.update(zip(fields, value if len(fields) > 1 else [value]))
        rows.append(json.dumps({**row, "seed": job.seed}))
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(rows) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def encode_prompts(model, args):
    """(contexts, null): with --prompt every prompt encoded once ({text: context}) and the text
    encoder freed (1.4 GB in fp32 for the release's); with --prompts-file (too many prompts to keep)
    (None, the negative prompt): each batch encodes its own."""
    if args.prompts_file:
        return None, args.negative_prompt
    texts = sorted({job.text for job in args.jobs})
    contexts = torch.cat(
        [model.encode_text(texts[i : i + args.batch]) for i in range(0, len(texts), args.batch)]
    )
    null = model.encode_text([args.negative_prompt])
    model.text_encoder = None
    return dict(zip(texts, contexts)), null


def make_images(model, args, batches, paths, context, null, progress):
    """Generate each batch of jobs (ranges into args.jobs) and write their PNGs: all of them with
    --prompt, the missing ones with --prompts-file (the others were made before, in this same
    batch)."""
    guidance = cli.guidance_scales(args, model.cfg)
    settings = cli.settings(args, model.cfg)
    for r in tqdm(batches, desc="batches", disable=not progress or len(batches) < 2):
        jobs = [args.jobs[i] for i in r]
        text = (
            [job.text for job in jobs]
            if context is None
            else torch.stack([context[job.text] for job in jobs])
        )
        images = generate(
            model,
            cli.job_conditions(model.cfg, jobs, text),
            seeds=[j.seed for j in jobs],
            sampler=args.sampler,
            steps=args.steps,
            guidance=guidance,
            negative_prompt=null,
            size=tuple(args.size),
            interval=args.cfg_interval,
            rescale=args.cfg_rescale,
            dtype=args.dtype,
            progress=progress and context is not None,
        )
        for i, job, image in zip(r, jobs, images):
            if args.prompts_file and paths[i].exists():
                continue
            info = {
                "prompt": job.text,
                **cli.condition_text(model.cfg, job.values),
                "seed": job.seed,
                **settings,
            }
            cli.save_png(image, paths[i], info)


def main(argv=None):
    args, p = parse_args(argv)
    attention.set_backend(args.attention)
    out = Path(args.out)
    paths = [out / name for name in args.names]
    if not args.prompts_file:
        cli.refuse_overwrite([*paths, out / "grid.png"], args.overwrite, p)
    model = cli.load_checked(args, p, text_to_image=True)
    for job in args.jobs:
        cli.check_values(job.values, model.cfg, args.weights, p)
    context, null = encode_prompts(model, args)
    if args.compile or args.channels_last:
        prepare_for_sampling(model, compile=args.compile, channels_last=args.channels_last)

    # under torchrun every process makes its share of the batches; the summary is rank 0's
    with distributed.processes(args.device) as (rank, world):
        if args.prompts_file:  # every process checks the folder before any writes
            settings = record(args, model.cfg)
            cli.check_resume(out, settings, args.overwrite, p, flag="--overwrite", write=rank == 0)
        out.mkdir(parents=True, exist_ok=True)
        mine, missing = distributed.share_of_batches(paths, args.batch, redo=not args.prompts_file)
        if rank == 0 and args.prompts_file:
            print(
                f"{len(paths) - missing} of {len(paths)} images already in {out}, {missing} to go"
                + (f" ({world} processes)" if world > 1 and missing else "")
            )
            if missing:  # a manifest lists only images that all exist
                (out / MANIFEST).unlink(missing_ok=True)
        make_images(model, args, mine, paths, context, null, progress=rank == 0)
    if rank:
        return 0
    if args.prompts_file:
        write_manifest(model.cfg, args.jobs, paths, out / MANIFEST)
        print(f"wrote {missing} images and {MANIFEST} ({len(paths)} images) to {out}")
        return 0
    pils = [Image.open(path).convert("RGB") for path in paths]
    cols = args.n if len(args.prompt) > 1 else min(len(pils), 8)
    image_grid(pils, cols=cols).save(out / "grid.tmp.png")
    os.replace(out / "grid.tmp.png", out / "grid.png")
    print(f"wrote {len(pils)} images and grid.png to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
