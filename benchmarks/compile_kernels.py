"""Compile each attention kernel in each autotune config for the GPUs, on this CPU
(gpu_kernels/aot.py).

    nice -n 10 python benchmarks/compile_kernels.py [--head-dims 64 128] \\
        [--out benchmarks/results/kernel_compile.md]

bf16 for sm_90 (H100/H200) and fp16 for sm_80 (A100), at each head dim: the 4 kernels of
gpu_kernels/flash_attention.py in each config their autotuner may pick there. Prints one line per
compile and writes a markdown report: the machine, counts, failures, the most shared memory per
kernel and target against the device's limit per block, total time. Runs without a GPU; ptxas
ships in the triton wheel.
"""

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

# Before triton is imported: compile, never interpret, into an empty cache so that
# every kernel really compiles.
os.environ.pop("TRITON_INTERPRET", None)
CACHE = tempfile.mkdtemp(prefix="triton_aot_")
os.environ["TRITON_CACHE_DIR"] = CACHE

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import triton  # noqa: E402

from gpu_kernels import aot  # noqa: E402
from model.flops import cpu_name, usable_cores  # noqa: E402

HEADER = "| kernel | target | dtype | D | config | shared (bytes) | warps | s | status |"


def row(r):
    status = "ok" if r.fits else "OVER LIMIT" if r.ok else f"FAILED: {r.error}"
    shared = "" if r.shared is None else r.shared
    return (
        f"| {r.kernel} | {r.target} | {r.dtype} | {r.head_dim} | {r.config} | {shared} | "
        f"{r.num_warps or ''} | {r.seconds:.1f} | {status} |"
    )


def summary(records):
    """Per kernel and target: compiles, failures, the most shared memory (and where), the limit."""
    lines = [
        "| kernel | target | dtype | compiles | failures | max shared (bytes) | at | limit "
        "(bytes) | use |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for kernel in aot.KERNELS:
        for dtype, target in aot.CHECKS:
            rs = [r for r in records if r.kernel == kernel and r.target == target.name]
            ok = [r for r in rs if r.ok]
            top = max(ok, key=lambda r: r.shared) if ok else None
            at = f"D={top.head_dim} {top.config}" if top else "-"
            most = top.shared if top else "-"
            use = f"{top.shared / target.shared_limit:.0%}" if top else "-"
            lines.append(
                f"| {kernel} | {target.name} | {dtype} | {len(rs)} | {len(rs) - len(ok)} | {most} "
                f"| {at} | {target.shared_limit} | {use} |"
            )
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--head-dims", type=int, nargs="+", default=[64, 128], help="head dims to compile for"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=ROOT / "benchmarks" / "results" / "kernel_compile.md",
        help="markdown report to write",
    )
    args = parser.parse_args()
    if aot.ptxas_path() is None:
        sys.exit("triton finds no ptxas binary; nothing can be compiled")

    jobs = [
        (kernel, config, dtype, head_dim, target)
        for head_dim in args.head_dims
        for kernel, config in aot.kernel_configs(head_dim)
        for dtype, target in aot.CHECKS
    ]
    print(f"{len(jobs)} compiles on {cpu_name()}, triton {triton.__version__}")
    print(HEADER)
    records, t0 = [], time.perf_counter()
    for job in jobs:
        records.append(aot.compile_for(*job))
        print(row(records[-1]), flush=True)
    wall = time.perf_counter() - t0
    shutil.rmtree(CACHE, ignore_errors=True)

    failed = [r for r in records if not r.ok]
    over = [r for r in records if r.ok and not r.fits]
    ptxas = triton.knobs.nvidia.ptxas.version
    report = [
        "# Attention kernels compiled ahead of time for GPUs, on a CPU",
        "",
        f"{cpu_name()}, {usable_cores()} cores usable, one compile at a time; triton "
        f"{triton.__version__}, ptxas {ptxas} (the wheel's). Head dims "
        f"{', '.join(map(str, args.head_dims))}; each kernel of gpu_kernels/flash_attention.py in "
        "every config its autotuner may pick at that head dim; launch specialised for contiguous "
        "inputs and sequence lengths that are not block multiples (gpu_kernels/aot.py).",
        "",
        f"**{len(records)} compiles, {len(failed)} failures, {len(over)} over the shared-memory "
        f"limit; total {wall / 60:.1f} min** (median "
        f"{sorted(r.seconds for r in records)[len(records) // 2]:.1f} s per compile, slowest "
        f"{max(r.seconds for r in records):.1f} s).",
        "",
        "Shared memory limit per block: the opt-in maximum (CUDA C++ Programming Guide, compute "
        "capabilities).",
        "",
        *summary(records),
        "",
        "## Every compile",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|---|---|",
        *map(row, records),
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(report) + "\n")
    print("\n".join(summary(records)))
    print(
        f"{len(records)} compiles, {len(failed)} failures, {len(over)} over the limit, "
        f"{wall / 60:.1f} min; wrote {args.out}"
    )
    sys.exit(1 if failed or over else 0)


if __name__ == "__main__":
    main()
