"""Unbounded canvases (model/editing.extend): how visible the tile borders are
and whether memory grows.

    python benchmarks/bench_canvas.py --weights out/demo/model.safetensors  # the demo's 32 px model
    python benchmarks/bench_canvas.py --weights W --tile 256 --overlap 64 --memory-tile 256

Seams: rows of `--tiles` tiles (one prompt for the row: the procedural caption of a scene of one
class; and a row of mixed classes), for each method, over --seeds seeds: the seam ratio
(evaluation/canvas.py; 1.0 = invisible) beside independent tiles placed side by side (the stitched
baseline). Memory: peak resident memory (VmHWM) of `edit.py extend` in a child process for a 2-tile
and an 8-tile canvas of --memory-tile px tiles. Writes benchmarks/results/canvas_cpu.md.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from data.synthetic import CLASSES, sample  # noqa: E402
from evaluation.canvas import seam_ratio  # noqa: E402
from model import editing  # noqa: E402
from model.flops import cpu_name  # noqa: E402
from model.pipeline import generate  # noqa: E402
from model.weights import load_weights  # noqa: E402

# name: (method, extend keywords; "share": the overlap as a share of the tile, else --overlap)
VARIANTS = {
    "independent tiles (stitched)": ("outpaint", dict(share=0.0)),
    "outpaint": ("outpaint", {}),
    "outpaint + RePaint x3 (ddim)": ("outpaint", dict(resample=3, sampler="ddim")),
    "multidiffusion": ("multidiffusion", {}),
    "multidiffusion, 3/4 overlap": ("multidiffusion", dict(share=0.75)),
}


def row_width(tiles, tile, overlap):
    return tile + (tiles - 1) * (tile - overlap)


def seams(model, args):
    level = args.level
    same = [sample(7, level, args.tile, cls=CLASSES.index("farmland"))["caption"]]
    mixed = [
        sample(11 + i, level, args.tile, cls=i % len(CLASSES))["caption"] for i in range(args.tiles)
    ]
    guidance = {"text": args.cfg, "level": args.level_cfg}
    f = model.vae.downsample
    rows = [floor(model, args, same, mixed, guidance)]
    for name, (method, kw) in VARIANTS.items():
        kw = dict(kw)
        share = kw.pop("share", None)
        overlap = args.overlap if share is None else round(share * args.tile / 8) * 8
        size = (args.tile, row_width(args.tiles, args.tile, overlap))
        origins, grid = editing.canvas_tiles(size, args.tile, overlap, model.vae.downsample)
        assert grid == (1, args.tiles), grid
        kw = {"steps": args.steps, "guidance": guidance, **kw, "overlap": overlap}
        for prompts_name, prompts in (("one prompt", same), ("mixed classes", mixed)):
            t = time.perf_counter()
            ratios = [
                seam_ratio(
                    editing.extend(
                        model,
                        prompts,
                        size,
                        values={"level": level},
                        tile=args.tile,
                        method=method,
                        seed=s,
                        **kw,
                    ),
                    origins,
                    args.tile,
                    f,
                )
                for s in range(args.seeds)
            ]
            rows.append(
                (
                    name,
                    prompts_name,
                    sum(ratios) / len(ratios),
                    min(ratios),
                    max(ratios),
                    (time.perf_counter() - t) / args.seeds,
                )
            )
            print(
                f"{name:32s} {prompts_name:14s} seam ratio {rows[-1][2]:.2f} "
                f"({rows[-1][3]:.2f}-{rows[-1][4]:.2f})  {rows[-1][5]:.1f} s a canvas",
                flush=True,
            )
    return rows


def floor(model, args, same, mixed, guidance):
    """The control: one pass of the model at the canvas's size (a convolutional U-Net runs at any
    size; no tiles, so no seams), measured at the borders the tiled canvas would have:
    what 'invisible' reads."""
    size = (args.tile, row_width(args.tiles, args.tile, args.overlap))
    origins, _ = editing.canvas_tiles(size, args.tile, args.overlap, model.vae.downsample)
    # the U-Net's size granularity
    unit = model.vae.downsample * 2 ** (len(model.cfg.unet.channels) - 1)
    width = -(-size[1] // unit) * unit
    t = time.perf_counter()
    images = generate(
        model,
        {"text": same * args.seeds, "level": [args.level] * args.seeds},
        seeds=list(range(args.seeds)),
        steps=args.steps,
        guidance=guidance,
        size=(size[0], width),
    )[..., : size[1]]
    ratios = [seam_ratio(im[None], origins, args.tile, model.vae.downsample) for im in images]
    row = (
        "one pass at the canvas's size (no tiles)",
        "one prompt",
        sum(ratios) / len(ratios),
        min(ratios),
        max(ratios),
        (time.perf_counter() - t) / args.seeds,
    )
    print(f"{row[0]:32s} {row[1]:14s} seam ratio {row[2]:.2f}", flush=True)
    return row


def peak_mb(args, tiles, method):
    """VmHWM of a child running edit.py extend for a row of `tiles` tiles."""
    tile, overlap = args.memory_tile, args.memory_tile // 4
    argv = [
        "extend",
        "--weights",
        args.weights,
        "--prompt",
        "farmland",
        "--size",
        str(tile),
        str(row_width(tiles, tile, overlap)),
        "--tile",
        str(tile),
        "--overlap",
        str(overlap),
        "--steps",
        "2",
        "--method",
        method,
        "--out",
        f"/tmp/bench_canvas_{tiles}_{method}",
        "--overwrite",
        "--device",
        "cpu",
    ]
    code = (
        "import sys, edit; edit.main(sys.argv[1:]); print([l for l in open('/proc/self/status') "
        "if l.startswith('VmHWM')][0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=ROOT, capture_output=True, text=True, check=True
    )
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("VmHWM")][0]
    return int(line.split()[1]) / 1024


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--weights", default="out/demo/model.safetensors")
    p.add_argument("--tile", type=int, default=32)
    p.add_argument("--overlap", type=int, default=16)
    p.add_argument("--tiles", type=int, default=8)
    p.add_argument("--level", type=float, default=14.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--cfg", type=float, default=3.0)
    p.add_argument("--level-cfg", type=float, default=6.0)
    p.add_argument("--seeds", type=int, default=4)
    p.add_argument("--memory-tile", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/canvas_cpu.md"))
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)
    model = load_weights(args.weights).eval()
    rows = seams(model, args)
    memory = []
    for method in editing.CANVAS_METHODS:
        two, eight = peak_mb(args, 2, method), peak_mb(args, 8, method)
        memory.append((method, two, eight))
        print(
            f"peak memory {method}: 2 tiles {two:.0f} MB, 8 tiles {eight:.0f} MB, ratio "
            f"{eight / two:.3f}"
        )
    lines = [
        f"# Canvases: seams and memory ({cpu_name()}, {torch.get_num_threads()} threads)",
        "",
        f"`python benchmarks/bench_canvas.py --weights {args.weights} --tile {args.tile} --overlap "
        f"{args.overlap} --tiles {args.tiles} --steps {args.steps} --seeds {args.seeds}`: rows of "
        f"{args.tiles} tiles of {args.tile} px at level {args.level:g}, guidance text {args.cfg} / "
        f"level {args.level_cfg}, DPM-Solver++ {args.steps} steps (RePaint: DDIM). Seam ratio 1.0 "
        "= invisible.",
        "",
        "| method | prompts | seam ratio (mean) | min-max over seeds | s a canvas |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {n} | {pn} | {m:.2f} | {lo:.2f}-{hi:.2f} | {s:.1f} |" for n, pn, m, lo, hi, s in rows
    ]
    lines += [
        "",
        f"Peak resident memory of `edit.py extend` (child process, VmHWM), {args.memory_tile} px "
        "tiles, 2 solver steps:",
        "",
        "| method | 2 tiles | 8 tiles | ratio |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {a:.0f} MB | {b:.0f} MB | {b / a:.3f} |" for m, a, b in memory]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
