"""Whole-process sampling from a release-format folder: `python sample.py` against the same
computation written with diffusers + transformers parts, each in a fresh process, alternating; wall
time and peak RSS of the whole process.

    # once: a full-shape folder, random weights
    python benchmarks/bench_sample_process.py --make /tmp/t2e_full
    python benchmarks/bench_sample_process.py --weights /tmp/t2e_full --repeats 3 [--compile]

The folder is written by diffusers' and transformers' own `save_pretrained` (1.29 B parameters, 5.2
GB in fp32). Both sides read it, tokenize one prompt, run the text encoder, `--steps` DDIM steps
with classifier-free guidance (the conditional and the null branch in one batch of 2, the level as
the U-Net's class label), decode with the VAE and write a PNG. Wall time is from the process's start
to its exit (imports, loading, computing, writing), peak RSS is the process's ru_maxrss (file pages
mapped and touched count). diffusers and transformers are test-only dependencies
(requirements-dev.txt). Writes benchmarks/results/sample_process_cpu.md.
"""

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a dense residential area with many buildings and a river"


def make_release(folder, scale):
    """A release-shaped folder: the Text2Earth shapes ("full") or a smaller U-Net
    and text tower ("mid")."""
    import json

    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    sys.path.insert(0, str(ROOT))
    from tests.release import SD2_SCHEDULER, write_tokenizer

    folder = Path(folder)
    torch.manual_seed(0)
    channels, width, layers = (
        ((320, 640, 1280, 1280), 1024, 23) if scale == "full" else ((128, 256, 512, 512), 512, 6)
    )
    UNet2DConditionModel(
        block_out_channels=channels,
        attention_head_dim=tuple(c // 64 for c in channels),
        cross_attention_dim=width,
        use_linear_projection=True,
        class_embed_type="timestep",
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        sample_size=256,
    ).save_pretrained(folder / "vae")
    CLIPTextModel(
        CLIPTextConfig(
            hidden_size=width,
            intermediate_size=4 * width,
            num_attention_heads=width // 64,
            num_hidden_layers=layers,
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
        )
    ).save_pretrained(folder / "text_encoder")
    DDIMScheduler(**SD2_SCHEDULER).save_pretrained(folder / "scheduler")
    write_tokenizer(folder / "tokenizer")
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    print(f"wrote {folder}")


def reference(args):
    """The diffusers + transformers computation (run as its own process)."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from PIL import Image
    from transformers import CLIPTextModel, CLIPTokenizer

    folder = Path(args.weights)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    with torch.no_grad():
        ids = tokenizer(
            [PROMPT, ""], padding="max_length", max_length=77, truncation=True, return_tensors="pt"
        )
        context = text(ids.input_ids).last_hidden_state  # cond, null
        levels = torch.tensor([17.0, 0.0])
        scheduler.set_timesteps(args.steps)
        x = torch.randn(
            1, 4, args.size // 8, args.size // 8, generator=torch.Generator().manual_seed(0)
        )
        for t in scheduler.timesteps:
            eps = unet(
                torch.cat([x, x]), t, encoder_hidden_states=context, class_labels=levels
            ).sample
            eps_c, eps_u = eps.chunk(2)
            x = scheduler.step(eps_u + 4.0 * (eps_c - eps_u), t, x).prev_sample
        image = vae.decode(x / vae.config.scaling_factor).sample.clamp(-1, 1)
    array = ((image[0].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(Path(args.out) / "reference.png")


def run(cmd):
    """(wall seconds, peak RSS GB) of one process."""
    t = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t
    if status:
        sys.exit(f"failed ({status}): {' '.join(cmd)}\n{proc.stderr.read()[-3000:]}")
    return wall, usage.ru_maxrss / 2**20


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--make",
        metavar="FOLDER",
        help="write a release-shaped folder with random weights and stop",
    )
    p.add_argument("--scale", choices=["full", "mid"], default="full", help="shapes of --make")
    p.add_argument("--weights", help="the folder to sample from")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="our side with sample.py --compile")
    p.add_argument("--out", default="/tmp/bench_sample_process")
    p.add_argument("--results", default="benchmarks/results/sample_process_cpu.md")
    p.add_argument("--reference", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.make:
        return make_release(args.make, args.scale)
    if args.reference:
        return reference(args)
    if not args.weights or not Path(args.weights, "unet").is_dir():
        p.error("--weights: a release-format folder is needed (make one with --make FOLDER)")

    ours = [
        sys.executable,
        "sample.py",
        "--weights",
        args.weights,
        "--prompt",
        PROMPT,
        "--level",
        "17",
        "--sampler",
        "ddim",
        "--steps",
        str(args.steps),
        "--size",
        str(args.size),
        str(args.size),
        "--cfg",
        "4",
        "--device",
        "cpu",
        "--out",
        args.out,
        "--overwrite",
    ] + (["--compile"] if args.compile else [])
    theirs = [
        sys.executable,
        __file__,
        "--reference",
        "--weights",
        args.weights,
        "--steps",
        str(args.steps),
        "--size",
        str(args.size),
        "--out",
        args.out,
    ]
    runs = {"ours": [], "diffusers": []}
    for i in range(args.repeats):  # alternating, so both see the same machine
        for name, cmd in (("ours", ours), ("diffusers", theirs)):
            runs[name].append(run(cmd))
            print(
                f"{name} run {i}: {runs[name][-1][0]:.1f} s, {runs[name][-1][1]:.2f} GB", flush=True
            )

    sys.path.insert(0, str(ROOT))
    import torch

    from model.flops import cpu_name

    med = {k: (sorted(w for w, _ in v)[len(v) // 2], max(m for _, m in v)) for k, v in runs.items()}
    lines = [
        f"# Whole process, one {args.size}x{args.size} image, {args.steps} DDIM steps with "
        "guidance, CPU fp32",
        f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}; folder {args.weights}; "
        f"{args.repeats} alternating runs each" + ("; ours with --compile" if args.compile else ""),
        "",
        "| | median wall (s) | all runs (s) | peak RSS (GB) |",
        "|---|---|---|---|",
    ]
    for k, v in runs.items():
        lines.append(
            f"| {k} | {med[k][0]:.1f} | {', '.join(f'{w:.1f}' for w, _ in v)} | {med[k][1]:.2f} |"
        )
    lines += [
        "",
        f"ours / diffusers: wall **{med['ours'][0] / med['diffusers'][0]:.2f}x**, peak RSS "
        f"**{med['ours'][1] / med['diffusers'][1]:.2f}x**",
    ]
    print("\n".join(lines))
    Path(args.results).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
