"""Our U-Net forward vs diffusers' UNet2DConditionModel with the same weights, same
process, alternating runs.

    python benchmarks/bench_unet_cpu.py [--config configs/text2earth.py] [--batch 2] \\
        [--latent 32] [--repeats 5]
    python benchmarks/bench_unet_cpu.py --compile --channels-last  # also ours compiled, NHWC, both

Prints time per forward and peak memory (RSS growth during the forward) for both, and their ratios;
with --compile, the compile time (the first call) too. Every variant shares ours' weights except
NHWC, which holds a copy in that layout. diffusers is a test-only dependency (requirements-dev.txt).
"""

import argparse
import copy
import gc
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model.config import load_config  # noqa: E402
from model.flops import cpu_name  # noqa: E402
from model.pipeline import freeze_compiled_weights  # noqa: E402
from model.unet import UNet  # noqa: E402
from model.release import UNET_KEYS, rename_keys  # noqa: E402


def diffusers_twin(cfg):
    """The diffusers U-Net with the same architecture as our UNetConfig."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        block_out_channels=cfg.channels,
        layers_per_block=cfg.layers_per_level,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cfg.attention],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in cfg.attention[::-1]],
        attention_head_dim=cfg.heads,
        cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_groups,
        use_linear_projection=True,
        class_embed_type="timestep" if "level" in cfg.scalar_conditions else None,
    )


def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def peak_in_child(args, which):
    import subprocess

    cmd = [
        sys.executable,
        __file__,
        "--config",
        args.config,
        "--batch",
        str(args.batch),
        "--latent",
        str(args.latent),
        "--threads",
        str(args.threads),
        "--peak-of",
        which,
    ]
    return float(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.split()[-1])


def measure_peak(cfg, args):
    """Child process: build one model, run one forward, print peak RSS growth (MB)."""
    torch.manual_seed(0)
    model = diffusers_twin(cfg).eval() if args.peak_of == "diffusers" else UNet(cfg).eval()
    B, s = args.batch, args.latent
    x, t = torch.randn(B, cfg.in_channels, s, s), torch.randint(0, 1000, (B,))
    ctx, level = torch.randn(B, 77, cfg.context_dim), torch.full((B,), 17.0)
    gc.collect()
    before = rss_mb()
    with torch.no_grad():
        if args.peak_of == "diffusers":
            model(x, t, encoder_hidden_states=ctx, class_labels=level)
        else:
            model(x, t, {"text": ctx, "level": level})
    # VmHWM, this process's own peak: ru_maxrss starts from the parent's (it survives fork and exec)
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM"))
    print(int(hwm.split()[1]) / 1024 - before)


def parse_args():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default="configs/text2earth.py")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--latent", type=int, default=32, help="latent side (32 = 256x256 images)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument(
        "--threads", type=int, default=0, help="torch threads (0 = leave torch's default)"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="add ours compiled as sampling compiles it (model/pipeline.prepare_for_sampling)",
    )
    p.add_argument(
        "--channels-last", action="store_true", help="add ours with NHWC weights and input"
    )
    p.add_argument("--out", default="benchmarks/results/unet_cpu.md")
    p.add_argument("--peak-of", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    return p.parse_args()


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config).model.unet
    if args.peak_of:
        return measure_peak(cfg, args)

    torch.manual_seed(0)
    ref = diffusers_twin(cfg).eval()
    ours = UNet(cfg).eval()
    state, _ = rename_keys(ref.state_dict(), UNET_KEYS)
    ours.load_state_dict(state, strict=True)

    g = torch.Generator().manual_seed(1)
    B, s = args.batch, args.latent
    x = torch.randn(B, cfg.in_channels, s, s, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    ctx = torch.randn(B, 77, cfg.context_dim, generator=g)
    level = torch.full((B,), 17.0)
    run = {
        "ours": lambda: ours(x, t, {"text": ctx, "level": level}),
        "diffusers": lambda: ref(x, t, encoder_hidden_states=ctx, class_labels=level).sample,
    }
    variants = []
    if args.channels_last:
        nhwc = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        x_nhwc = x.contiguous(memory_format=torch.channels_last)
        variants.append(("ours NHWC", nhwc, x_nhwc))
    if args.compile:
        ours.requires_grad_(False)  # as model/pipeline.prepare_for_sampling
        if args.channels_last:
            nhwc.requires_grad_(False)
        freeze_compiled_weights("cpu")
        variants.append(("ours compiled", torch.compile(ours), x))
        if args.channels_last:
            variants.append(("ours NHWC compiled", torch.compile(nhwc), x_nhwc))
    compile_s = {}
    with torch.no_grad():
        diff = (run["ours"]() - run["diffusers"]()).abs().max().item()  # also the warm-up
        for name, net, inp in variants:
            run[name] = lambda net=net, inp=inp: net(inp, t, {"text": ctx, "level": level})
            t0 = time.perf_counter()
            out = run[name]()  # compiles, if compiled
            compile_s[name] = time.perf_counter() - t0
            diff = max(diff, (out - run["diffusers"]()).abs().max().item())
        times = {k: [] for k in run}
        for _ in range(args.repeats):  # alternate to share machine noise
            for k, fn in run.items():
                gc.collect()
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)

    # Peak memory: peak RSS growth during one forward per model, each in a fresh child process.
    peaks = {k: peak_in_child(args, k) for k in ("ours", "diffusers")}

    med = {k: sorted(v)[len(v) // 2] for k, v in times.items()}
    lines = [
        "# U-Net forward, CPU fp32: ours vs diffusers (same weights)",
        f"config {args.config}, batch {B}, latent {s}x{s}, {args.repeats} alternating repeats, "
        f"{cpu_name()}, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"max |ours - diffusers| = {diff:.2e}",
        "",
        "| | median s/forward | all runs (s) | peak RSS growth in forward (MB) |",
        "|---|---|---|---|",
    ]
    for k in run:
        peak = f"{peaks[k]:.0f}" if k in peaks else ""
        lines.append(f"| {k} | {med[k]:.3f} | {', '.join(f'{v:.3f}' for v in times[k])} | {peak} |")
    lines += [
        "",
        f"time ratio ours/diffusers: **{med['ours'] / med['diffusers']:.3f}x**; peak memory ratio: "
        f"**{peaks['ours'] / peaks['diffusers']:.3f}x**",
    ]
    for name, _, _ in variants:
        lines.append(
            f"- {name}: **{med[name] / med['diffusers']:.3f}x** diffusers' time; its first call "
            f"(compiling, if compiled) {compile_s[name]:.1f} s"
        )
    text = "\n".join(lines)
    print(text)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")


if __name__ == "__main__":
    main()
