"""
Benchmark: our fused Triton attention (gpu_kernels/flash_attention.py) vs PyTorch SDPA backends on
every attention shape of the text2earth U-Net, forward and forward+backward.

    python benchmarks/bench_attention.py  # needs CUDA; writes benchmarks/results/attention_<gpu>.md
    python benchmarks/bench_attention.py --dry-run  # CPU: shape table and FLOP bookkeeping only

U-Net (SD2-base layout): block channels 320/640/1280/1280, head dim 64 -> 5/10/20/20 heads.
Attention sits at the first three levels: per level 2 transformers in the down block + 3 in the up
block, plus 1 in the mid block at the lowest level (1280 ch, latent / 8). Each transformer does one
self-attention (Lq = Lk = h * w) and one cross-attention against the 77 text tokens.
Latent = image / 8: 32x32 at 256 px, 64x64 at 512 px.

FLOPs follow the FlashAttention papers: forward 4 * B * heads * Lq * Lk * D (two matmuls), backward
2.5x the forward (five matmuls, including the recomputation of Q K^T), forward+backward 3.5x.
"""

import argparse
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.config import UNetConfig  # noqa: E402
from model.flops import peak_tflops, unet_forward_flops  # noqa: E402

TEXT_TOKENS = 77
HEAD_DIM = 64
# levels with attention; the 4th level (1280) has none, the mid block has one
LEVEL_CHANNELS = (320, 640, 1280)
MID_CHANNELS = 1280


# -----------------------------------------------------------------------------
# Shapes


@dataclass
class Shape:
    name: str
    group: str  # "256px", "512px" or "long"
    B: int
    heads: int
    Lq: int
    Lk: int
    D: int
    count: int  # occurrences per U-Net forward (0 for the extra long-sequence rows)

    def flops_fwd(self):
        return 4.0 * self.B * self.heads * self.Lq * self.Lk * self.D


def unet_shapes(image_size, batch):
    """Every attention call of one U-Net forward at image_size px with `batch`
    samples, grouped by shape."""
    side, group = image_size // 8, f"{image_size}px"  # latent side
    shapes = []
    for level, ch in enumerate(LEVEL_CHANNELS):
        # n: down block + up block transformers
        L, heads, n = (side >> level) ** 2, ch // HEAD_DIM, 2 + 3
        shapes.append(Shape(f"{group} L{level} self", group, batch, heads, L, L, HEAD_DIM, n))
        shapes.append(
            Shape(f"{group} L{level} cross", group, batch, heads, L, TEXT_TOKENS, HEAD_DIM, n)
        )
    # mid block, below the last down-sampling
    L, heads = (side >> len(LEVEL_CHANNELS)) ** 2, MID_CHANNELS // HEAD_DIM
    shapes.append(Shape(f"{group} mid self", group, batch, heads, L, L, HEAD_DIM, 1))
    shapes.append(Shape(f"{group} mid cross", group, batch, heads, L, TEXT_TOKENS, HEAD_DIM, 1))
    return shapes


def long_shapes(tokens_total=131072, heads=5):
    """Long self-attention rows (e.g. 16384 tokens = 1024 px image at level
    0), B * L = tokens_total."""
    return [
        Shape(f"long {L}", "long", max(1, tokens_total // L), heads, L, L, HEAD_DIM, 0)
        for L in (4096, 8192, 16384)
    ]


# -----------------------------------------------------------------------------
# Implementations


def implementations():
    """name -> f(q, k, v) for the kernels present on this machine."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from gpu_kernels.flash_attention import flash_attention

    impls = {"triton (ours)": flash_attention}

    def sdpa(backend):
        def f(q, k, v):
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v)

        return f

    impls["sdpa flash"] = sdpa(SDPBackend.FLASH_ATTENTION)
    impls["sdpa efficient"] = sdpa(SDPBackend.EFFICIENT_ATTENTION)
    if hasattr(SDPBackend, "CUDNN_ATTENTION"):
        impls["sdpa cudnn"] = sdpa(SDPBackend.CUDNN_ATTENTION)
    return impls


def make_inputs(shape, dtype):
    """q, k, v as the U-Net makes them: (B, L, heads, D) projections viewed as (B, heads, L, D)."""

    def proj(L):
        return torch.randn(shape.B, L, shape.heads, shape.D, device="cuda", dtype=dtype).transpose(
            1, 2
        )

    q, k, v = proj(shape.Lq), proj(shape.Lk), proj(shape.Lk)
    do = torch.randn(shape.B, shape.heads, shape.Lq, shape.D, device="cuda", dtype=dtype)
    return q, k, v, do


def bench_one(f, q, k, v, do):
    """(forward ms, forward+backward ms), medians of triton.testing.do_bench; None
    where the kernel refuses."""
    from triton.testing import do_bench

    qg, kg, vg = (t.detach().requires_grad_(True) for t in (q, k, v))

    def fwd():
        f(q, k, v)

    def fwd_bwd():
        torch.autograd.grad(f(qg, kg, vg), (qg, kg, vg), do)

    out = []
    for fn in (fwd, fwd_bwd):
        try:
            fn()  # first call: compile and autotune outside the timing
            torch.cuda.synchronize()
            out.append(do_bench(fn, warmup=25, rep=100, return_mode="median"))
        except (RuntimeError, ValueError):  # backend does not support this shape / dtype
            torch.cuda.synchronize()
            out.append(None)
    return tuple(out)


# -----------------------------------------------------------------------------
# Report


def _fmt_ms(ms):
    return "n/a" if ms is None else f"{ms:.3f}"


def _fmt_rate(flops, ms, peak):
    if ms is None:
        return "n/a"
    tf = flops / (ms * 1e-3) / 1e12
    return f"{tf:.0f}" if peak is None else f"{tf:.0f} ({100 * tf / peak:.0f}%)"


def shape_table(shapes):
    lines = [
        "| shape | B | heads | Lq | Lk | D | per U-Net fwd | fwd GFLOP |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in shapes:
        lines.append(
            f"| {s.name} | {s.B} | {s.heads} | {s.Lq} | {s.Lk} | {s.D} | {s.count} | "
            f"{s.flops_fwd() / 1e9:.1f} |"
        )
    return "\n".join(lines)


def result_tables(shapes, names, times, errors, peak):
    """Markdown: one table for forward, one for forward+backward, each closed by the
    per-U-Net-forward sums."""
    out = []
    for col, title, mult in ((0, "Forward", 1.0), (1, "Forward + backward", 3.5)):
        out.append(f"### {title}: ms, TFLOP/s (% of peak)\n")
        err_col = col == 0  # correctness column, forward table only
        out.append(
            "| shape | count | "
            + " | ".join(f"{n} ms | {n} TFLOP/s" for n in names)
            + (" | ours max abs err vs sdpa |" if err_col else " |")
        )
        out.append("|" + "---|" * (2 + 2 * len(names) + err_col))
        for i, s in enumerate(shapes):
            cells = []
            for n in names:
                ms = times[n][i][col]
                cells += [_fmt_ms(ms), _fmt_rate(mult * s.flops_fwd(), ms, peak)]
            out.append(
                f"| {s.name} | {s.count} | "
                + " | ".join(cells)
                + (f" | {errors[i]} |" if err_col else " |")
            )
        for group in dict.fromkeys(s.group for s in shapes if s.count):  # image sizes, in order
            idx = [i for i, s in enumerate(shapes) if s.count and s.group == group]
            flops = sum(mult * shapes[i].flops_fwd() * shapes[i].count for i in idx)
            cells = []
            for n in names:
                ms = [times[n][i][col] for i in idx]
                total = None if None in ms else sum(m * shapes[i].count for m, i in zip(ms, idx))
                cells += [_fmt_ms(total), _fmt_rate(flops, total, peak)]
            out.append(
                f"| **sum per U-Net fwd, {group}** | - | "
                + " | ".join(cells)
                + (" | |" if err_col else " |")
            )
        out.append("")
    return "\n".join(out)


# -----------------------------------------------------------------------------
# Main


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=64, help="samples per GPU")
    parser.add_argument(
        "--no-cfg", action="store_true", help="do not double the batch for classifier-free guidance"
    )
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="input dtype")
    parser.add_argument(
        "--sizes", type=int, nargs="+", default=[256, 512], help="image sizes in pixels"
    )
    parser.add_argument(
        "--no-long", action="store_true", help="skip the long-sequence rows (4096-16384 tokens)"
    )
    parser.add_argument(
        "--out",
        type=str,
        default=None,
        help="markdown output (default benchmarks/results/attention_<gpu>.md)",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="print the shape table and exit (no CUDA needed)"
    )
    args = parser.parse_args()

    B = args.batch * (1 if args.no_cfg else 2)
    shapes = [s for size in args.sizes for s in unet_shapes(size, B)]
    if not args.no_long:
        shapes += long_shapes()

    if args.dry_run:
        print(f"batch {args.batch} x {1 if args.no_cfg else 2} (CFG) = {B}\n")
        print(shape_table(shapes))
        for size in args.sizes:
            per_sample = sum(s.flops_fwd() * s.count for s in unet_shapes(size, 1))
            calls = sum(s.count for s in unet_shapes(size, 1))
            # the released U-Net, counted
            unet = unet_forward_flops(UNetConfig(), size // 8, TEXT_TOKENS)
            print(
                f"\n{size}px: {calls} attention calls per U-Net forward, attention core "
                f"{per_sample / 1e9:.2f} GFLOP per sample forward, {per_sample / unet:.1%} of the "
                f"U-Net's {unet / 1e9:.0f} GFLOP"
            )
        return

    if not torch.cuda.is_available():
        print(
            "bench_attention: CUDA is not available; nothing to time (use --dry-run to see the "
            "shapes)."
        )
        return

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device_name = torch.cuda.get_device_name()
    peak = peak_tflops(device_name)
    impls = implementations()
    names = list(impls)
    torch.manual_seed(0)
    times = {n: [] for n in names}
    errors = []
    for s in shapes:
        q, k, v, do = make_inputs(s, dtype)
        with torch.no_grad():
            ref = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            errors.append(
                f"{(impls['triton (ours)'](q, k, v).float() - ref.float()).abs().max().item():.1e}"
            )
        for n in names:
            times[n].append(bench_one(impls[n], q, k, v, do))
        print(s.name, {n: tuple(_fmt_ms(t) for t in times[n][-1]) for n in names}, flush=True)
        del q, k, v, do, ref
        torch.cuda.empty_cache()

    gpu = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / f"attention_{gpu}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    import triton

    report = [
        f"# Attention kernels on {device_name}",
        "",
        f"{args.dtype}, batch {args.batch} x {1 if args.no_cfg else 2} = {B}, head dim {HEAD_DIM}, "
        f"q/k/v as transposed (B, L, heads, D) views. torch {torch.__version__}, triton "
        f"{triton.__version__}. Peak: "
        f"{'unknown' if peak is None else f'{peak:.0f} TFLOP/s dense bf16'}. Times are medians of "
        "triton.testing.do_bench; forward+backward counts 3.5x the forward FLOPs. The sums weight "
        "each shape by its occurrences per U-Net forward.",
        "",
        shape_table(shapes),
        "",
        result_tables(shapes, names, times, errors, peak),
    ]
    out.write_text("\n".join(report))
    print("\n".join(report))
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
