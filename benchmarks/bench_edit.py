"""Editing against the truth on the procedural Earth (evaluation/editing.py): cloud removal,
dehazing, super-resolution x2 / x4 and inpainting as forest, each beside its
baselines, on --n frames at 32 px.

    python demo.py                           # the model: out/demo/model.safetensors
    python benchmarks/bench_edit.py          # writes benchmarks/results/edit_cpu.md
    python benchmarks/bench_edit.py --sweep  # also the img2img strengths 0.3 .. 0.8 (PRESETS)
The demo's sampling: DPM-Solver++(2M), 20 steps, guidance text 3 / level 6.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from evaluation.editing import (
    GUIDANCE,
    STRENGTHS,
    best_strengths,
    frames,
    markdown,
    run_all,  # noqa: E402
    sweep,
    sweep_markdown,
)
from evaluation.probe import load_probe  # noqa: E402
from model.editing import PRESETS  # noqa: E402
from model.flops import cpu_name  # noqa: E402
from model.weights import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--weights", default="out/demo/model.safetensors", help="a whole model (demo.py's output)"
    )
    p.add_argument(
        "--probe",
        default=str(ROOT / "configs/pretrained/demo_probe.safetensors"),
        help="the conditioning probe that reads class and level (a --fast demo: its own "
        "probe.safetensors)",
    )
    p.add_argument(
        "--n",
        type=int,
        default=108,
        help="frames: blocks of the 12 classes, a block at one level; 108 hold every class at "
        "levels 10-18",
    )
    p.add_argument("--steps", type=int, default=20, help="DPM-Solver++(2M) steps")
    p.add_argument("--seed", type=int, default=0, help="the frames and the noise")
    p.add_argument(
        "--sweep", action="store_true", help=f"also run the img2img tasks at strengths {STRENGTHS}"
    )
    p.add_argument(
        "--out", default=str(ROOT / "benchmarks/results/edit_cpu.md"), help="the markdown written"
    )
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    model, probe = load_model(args.weights), load_probe(args.probe)
    sampling = dict(steps=args.steps, guidance=GUIDANCE)
    t0 = time.perf_counter()
    fr = frames(args.n, seed=args.seed)
    results = run_all(
        model,
        probe,
        fr,
        seed=args.seed,
        **sampling,
        log=lambda task, s: print(f"{task}: {s:.0f} s", file=sys.stderr),
    )
    seconds = time.perf_counter() - t0
    settings = (
        f"{args.n} frames (seed {args.seed}), DPM-Solver++(2M) {args.steps} steps, guidance text "
        f"{GUIDANCE['text']:g} / level {GUIDANCE['level']:g}, img2img strengths: dehaze "
        f"{PRESETS['dehaze']['strength']:g}, sr {PRESETS['sr']['strength']:g} "
        "(model/editing.PRESETS); inpainting: the replace method, feather 3"
    )
    text = [
        f"# Editing against the truth ({cpu_name()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__})",
        "",
        f"Model `{args.weights}`, probe `{args.probe}`.",
        f"{settings}; {seconds:.0f} s ("
        + ", ".join(f"{k} {v:.0f} s" for k, v in results["seconds"].items())
        + ").",
        "",
        markdown(results, fr),
    ]
    out = {"settings": settings, "results": results}
    if args.sweep:
        t0 = time.perf_counter()
        swept = sweep(model, probe, fr, seed=args.seed, **sampling)
        best = best_strengths(swept, results["reference"]["truth"]["level_read"])
        text += [
            "## img2img strengths",
            "",
            f"{time.perf_counter() - t0:.0f} s. Best: dehaze {best['dehaze']:g} (highest PSNR), sr "
            f"{best['sr']:g} (mean level read closest to the truth's "
            f"{results['reference']['truth']['level_read']:.2f}, x2 and x4 together).",
            "",
            sweep_markdown(swept),
        ]
        out.update(
            sweep={k: {str(s): f for s, f in v.items()} for k, v in swept.items()}, best=best
        )
    report = "\n".join(text)
    print(report)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(report)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
