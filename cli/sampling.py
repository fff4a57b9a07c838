"""What the sampling scripts share (sample.py, edit.py, evaluate.py).

    # the --weights' config, read before the parser is built
    cfg = model_config_for(argv)
    add_model_flags(p); add_sampling_flags(p); add_condition_flags(p, cfg)
    args = p.parse_args(argv)
    # {"level": 16.0, "location": (31.2, 121.5), ...}: what the condition flags asked for
    values = condition_values(args, cfg, p)
    # weights, LoRA, the inpainting refusal, one line on error
    model = load_checked(args, p)
    cond = conditions.request(model.cfg, n, text=prompts, **values)
    guidance = guidance_scales(args, model.cfg)
    # a folder of generated images made with other settings: refused (exit 2) unless --regenerate
    check_resume(folder, settings, args.regenerate, p)

The flags of the conditions come from the model's condition table (ModelConfig.conditions, the
U-Net's embedded_conditions): `--NAME V` sets a condition for every image (one flag per field for a
condition of several: `--lat 31.2 --lon 121.5` for a location) and `--NAME-cfg S` guides it with
its own scale (model/guidance.py). A condition added to a model's config therefore appears in every
script without editing them. The level keeps its `--resolution-m` alternative and
the release's "{L}_GOOGLE_LEVEL_{text}" prompt prefix.
"""

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL.PngImagePlugin import PngInfo

from data.levels import asked_level, parse_level_prefix
from data.transforms import tensor_to_pil
from model import conditions
from model.config import ModelConfig
from model.lora import apply_loras
from model.pipeline import device_and_dtype
from model.samplers import SAMPLERS
from model.weights import WeightsError, load_weights, read_config

DEFAULT_WEIGHTS = "out/demo/model.safetensors"  # what the README's demo command trains


@dataclass
class Job:
    """One image to make: its prompt, its other conditions ({name: value}, a value a number or one
    per field; a name absent or None = its null), its seed."""

    text: str
    values: dict = field(default_factory=dict)
    seed: int = 0


# ----------------------------------------------------------------------------------------------
# Flags
# ----------------------------------------------------------------------------------------------


def model_config_for(argv, default=DEFAULT_WEIGHTS):
    """The ModelConfig of the --weights named in argv (or `default`), read without its tensors:
    which condition flags the parser offers. The default config (text and level) when there is none
    or it does not read; loading the weights reports that properly."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--weights", default=default)
    known, _ = pre.parse_known_args(argv)
    if known.weights is None:
        return ModelConfig()
    try:
        return read_config(known.weights)
    except (WeightsError, ValueError, OSError):
        return ModelConfig()


def add_model_flags(
    p, weights=DEFAULT_WEIGHTS, weights_help="diffusers-format folder or our .safetensors"
):
    """--weights, --lora, --device, --dtype."""
    p.add_argument("--weights", default=weights, help=weights_help)
    p.add_argument(
        "--lora",
        action="append",
        default=[],
        metavar="FILE[:SCALE]",
        help="merge a LoRA into the U-Net and text encoder it adapts (ours, diffusers / peft or "
        "kohya layout); repeat for several",
    )
    p.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="cpu, cuda or cuda:N",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["fp32", "bf16", "fp16"],
        help="U-Net and text encoder precision, read as such (default: bf16 on GPU, fp32 on CPU)",
    )


def add_sampling_flags(p, cfg=4.0, cfg_help="guidance scale (release default 4.0; 1 = none)"):
    """--sampler, --steps, --cfg, --negative-prompt, --seed."""
    p.add_argument("--sampler", default="dpmpp_2m", choices=sorted(SAMPLERS))
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=cfg, help=cfg_help)
    p.add_argument(
        "--negative-prompt", default="", help="replaces the empty prompt in the null branch"
    )
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i")


def add_condition_flags(p, model_cfg):
    """The flags of every condition model_cfg embeds: `--NAME V` for a condition of one field
    (--level also --resolution-m), one flag per field for a condition of several (a location:
    `--lat`, `--lon`), and `--NAME-cfg S` for its own guidance scale."""
    for name in model_cfg.unet.embedded_conditions():
        flag = name.replace("_", "-")
        c = model_cfg.conditions[name]
        if len(c.field_names()) == 1:
            what = (
                "Google map level, 0 (none) or 1..20, fractional ok"
                if name == "level"
                else f"the {name} condition for every image (default: its null, {c.null})"
            )
            p.add_argument(f"--{flag}", type=float, default=None, dest=name, help=what)
        for j, part in enumerate(c.field_names() if len(c.field_names()) > 1 else ()):
            bounds = f", in [{c.bounds[j][0]:g}, {c.bounds[j][1]:g}]" if j < len(c.bounds) else ""
            others = ", ".join("--" + f for f in c.field_names() if f != part)
            p.add_argument(
                f"--{part.replace('_', '-')}",
                type=float,
                default=None,
                dest=f"{name}.{part}",
                help=f"{part} of the {name} for every image{bounds} (with {others}; default: none)",
            )
        p.add_argument(
            f"--{flag}-cfg",
            type=float,
            default=None,
            dest=f"{name}_cfg",
            help=f"guidance scale of the {name} on its own "
            "(default: guided with the text, at --cfg)",
        )
        if name == "level":
            p.add_argument(
                "--resolution-m",
                type=float,
                default=None,
                help="metres per pixel (instead of --level)",
            )


def condition_values(args, model_cfg, p):
    """{name: value} of the conditions the flags set (None = not given): a number, or a tuple of
    one per field; --resolution-m becomes the level. Bad values are one line, exit 2."""
    values = {}
    for name in model_cfg.unet.embedded_conditions():
        names = model_cfg.conditions[name].field_names()
        if len(names) == 1:
            values[name] = getattr(args, name, None)
            continue
        parts = [getattr(args, f"{name}.{part}", None) for part in names]
        if any(v is None for v in parts) and any(v is not None for v in parts):
            p.error(f"the {name} needs {' and '.join('--' + f for f in names)} together")
        values[name] = None if parts[0] is None else tuple(parts)
    if "level" in values:
        try:
            values["level"] = asked_level(values["level"], getattr(args, "resolution_m", None))
        except ValueError as e:
            p.error(str(e))
        if values["level"] is not None and not 0.0 <= values["level"] <= 20.0:
            p.error(f"--level {values['level']:g} is outside [0, 20]")
    for name, value in values.items():
        try:
            if value is not None:
                row = value if isinstance(value, tuple) else [value]
                conditions.check_value(model_cfg, name, row)
        except ValueError as e:
            p.error(str(e))
        scale = getattr(args, f"{name}_cfg", None)
        if scale is not None and scale < 0:
            p.error(f"--{name.replace('_', '-')}-cfg must be >= 0, got {scale}")
    return values


def guidance_scales(args, model_cfg):
    """{condition: scale}: every condition at --cfg, those given --NAME-cfg at their own."""
    names = model_cfg.unet.embedded_conditions()
    own = {name: getattr(args, f"{name}_cfg", None) for name in names}
    return conditions.scales(model_cfg, args.cfg, **own)


def check_sampling(args, p):
    """--steps, --cfg, --device and --dtype, checked before anything loads; the device and dtype
    resolved."""
    if args.steps < 1:
        p.error(f"--steps must be >= 1, got {args.steps}")
    if args.cfg is not None and args.cfg < 0:
        p.error(f"--cfg must be >= 0, got {args.cfg}")
    try:
        return device_and_dtype(args.device, args.dtype)
    except ValueError as e:
        p.error(str(e))


# ----------------------------------------------------------------------------------------------
# Prompts, weights, outputs
# ----------------------------------------------------------------------------------------------


def split_prompt(prompt, values, p):
    """(text, values) of one prompt: the release's "{L}_GOOGLE_LEVEL_{text}" prefix sets the level
    for this prompt (over --level). A prefix that does not parse, or a level outside [0, 20], is one
    line, exit 2."""
    try:
        level, text = parse_level_prefix(prompt, strict=True)
    except ValueError as e:
        p.error(str(e))
    if text == prompt:
        return text, dict(values)
    if not 0.0 <= level <= 20.0:
        p.error(f"level {level:g} (prompt {prompt!r}) is outside [0, 20]")
    return text, {**values, "level": level}


def load_checked(args, p, text_to_image=False):
    """The model of --weights with --lora merged, in eval mode; with text_to_image an inpainting
    U-Net is refused. Any problem is one line naming the flag, exit 2."""
    # the U-Net and text encoder in --dtype as they are read; the VAE decodes in fp32 (SD's
    # overflows in fp16)
    try:
        model = load_weights(
            args.weights, args.device, dtype={"unet": args.dtype, "text_encoder": args.dtype}
        )
    except WeightsError as e:
        hint = (
            " (train the demo model first: see README)" if args.weights == DEFAULT_WEIGHTS else ""
        )
        p.error(f"--weights: {e}{hint}")
    try:
        apply_loras(model, args.lora)
    except WeightsError as e:
        p.error(f"--lora: {e}")
    if text_to_image and model.cfg.unet.in_channels != model.cfg.unet.out_channels:
        p.error(
            f"--weights {args.weights}: an inpainting U-Net "
            f"({model.cfg.unet.in_channels} input channels) "
            "samples from an image and a mask, not from text alone"
        )
    return model.eval()


def job_conditions(model_cfg, jobs, text):
    """The raw conditions of a batch of Jobs (conditions.request): `text` their prompts (or encoded
    contexts), each other condition from the jobs' values, a job without one at its null."""
    values = {
        name: [job.values.get(name) for job in jobs]
        for name in model_cfg.unet.embedded_conditions()
    }
    return conditions.request(model_cfg, len(jobs), text=text, **values)


def check_values(values, model_cfg, weights, p):
    """Refuse a condition value the model cannot read (a level prefix for a U-Net without a level
    embedding)."""
    unknown = sorted(
        name
        for name, v in values.items()
        if v is not None and name not in model_cfg.condition_names()
    )
    if unknown:
        p.error(
            f"{', '.join(unknown)}: the U-Net of {weights} does not read it (it reads "
            f"{', '.join(model_cfg.condition_names())})"
        )


def refuse_overwrite(paths, overwrite, p):
    """Exit 2 naming the first of `paths` that exists, unless --overwrite."""
    existing = [path for path in paths if Path(path).exists()]
    if existing and not overwrite:
        p.error(
            f"{existing[0]} exists ({len(existing)} files would be overwritten); "
            "pass --overwrite or another --out"
        )


def check_resume(folder, settings, replace, p, flag="--regenerate", write=True):
    """A folder of generated images against this run's `settings` (recorded in
    folder/generation.json): images made with other settings, or images without that file, are
    refused (exit 2, naming what differs) unless `replace` (the script's `flag`), which deletes them
    to be made again; then the settings are recorded. write=False only refuses (every process
    checks, one writes)."""
    record = folder / "generation.json"
    old = json.loads(record.read_text()) if record.is_file() else None
    keys = [*settings, *(k for k in old or {} if k not in settings)]
    differ = [k for k in keys if old.get(k) != settings.get(k)] if old is not None else []
    unknown = old is None and any(folder.glob("*.png"))
    if (differ or unknown) and not replace:
        what = (
            f"other settings ({', '.join(differ)}: {', '.join(str(old.get(k)) for k in differ)})"
            if differ
            else f"no {record.name}: images of unknown settings"
        )
        p.error(
            f"{folder} holds images generated with {what}; "
            f"pass {flag} to make them again, or another --out"
        )
    if not write:
        return
    if differ or unknown:
        for f in folder.glob("*.png"):
            f.unlink()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = record.with_suffix(".tmp")
    tmp.write_text(json.dumps(settings, indent=1))
    os.replace(tmp, record)


def settings(args, model_cfg):
    """The settings every PNG records: sampler, steps, guidance and each condition's own scale."""
    out = {
        "sampler": args.sampler,
        "steps": args.steps,
        "cfg": args.cfg,
        "negative_prompt": args.negative_prompt,
        "weights": args.weights,
    }
    for name in model_cfg.unet.embedded_conditions():
        out[f"{name}_cfg"] = getattr(args, f"{name}_cfg", None)
    return out


def condition_text(model_cfg, values):
    """{name: value} -> {field: text} for a PNG's chunks, one per field of each condition the model
    reads ("lat", "lon" for a location): the value to 10 significant digits, "none" when not
    given (its null)."""
    out = {}
    for name in model_cfg.unet.embedded_conditions():
        value = values.get(name)
        names = model_cfg.conditions[name].field_names()
        parts = [value] if len(names) == 1 else (value or [None] * len(names))
        out.update({f: "none" if v is None else f"{v:.10g}" for f, v in zip(names, parts)})
    return out


def save_png(image, path, info):
    """Write image (3, H, W) in [-1, 1] as a PNG with `info` (str() of each value) in its text
    chunks, atomically."""
    meta = PngInfo()
    for key, value in info.items():
        meta.add_text(key, str(value))
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    tensor_to_pil(image).save(tmp, pnginfo=meta)
    os.replace(tmp, path)


def slug(text, n=40):
    """A file-name piece of a prompt: lower case, runs of other characters as one underscore."""
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:n] or "empty"
