"""Throughput of the procedural Earth on ONE CPU core (numpy/torch threads pinned to 1).

Measures sample() (scene + render + caption), the torch Dataset item (adds the tensor
conversion) and modalities(), over all classes and levels drawn uniformly from 10..18.
Reports wall-clock and process CPU time; if other jobs share the machine the two differ and
the CPU-time figure is the fairer one (it still counts cache/SMT contention).
    python benchmarks/bench_synthetic.py                  # 64x64, 600 images
    python benchmarks/bench_synthetic.py --size 256 --n 120
"""

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_var] = "1"  # before numpy/torch load their thread pools

import argparse  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from data.synthetic import CLASSES, ProceduralEarth, make_scene, modalities, sample  # noqa: E402


def timed(fn, n):
    """(images/s by wall clock, images/s by process CPU time) for n calls fn(i)."""
    w, c = time.perf_counter(), time.process_time()
    for i in range(n):
        fn(i)
    return n / (time.perf_counter() - w), n / (time.process_time() - c)


def main():
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--n", type=int, default=600, help="images per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="measurements; the best is reported")
    args = ap.parse_args()
    torch.set_num_threads(1)
    S, n = args.size, args.n
    rng = np.random.default_rng(0)
    levels = rng.uniform(10.0, 18.0, n)
    ds = ProceduralEarth(n, size=S, seed=0)
    for i in range(24):  # warm-up (imports, caches)
        sample(i, float(levels[i]), S, cls=i % len(CLASSES))
    rows = []

    def best(f):
        return max((timed(f, n) for _ in range(args.repeats)), key=lambda r: r[1])

    def one(i):
        return sample(i, float(levels[i]), S, cls=i % len(CLASSES))

    rows.append(("sample() -> uint8 image + caption", *best(one)))
    rows.append(("ProceduralEarth[i] -> tensor item", *best(lambda i: ds[i])))
    scenes = [make_scene(i, i % len(CLASSES)) for i in range(n)]
    rows.append(
        (
            "modalities() (all 6 views)",
            *timed(lambda i: modalities(scenes[i], float(levels[i]), S, i), n),
        )
    )

    print(f"# procedural Earth throughput, {S}x{S}, 1 thread, {n} images, levels U(10, 18)")
    print(
        f"{platform.processor() or platform.machine()}, python {platform.python_version()}, numpy "
        f"{np.__version__}, load average {os.getloadavg()[0]:.1f} over {os.cpu_count()} cpus\n"
    )
    print("| what | images/s (wall) | images/s (CPU time) |\n|---|---|---|")
    for name, w, c in rows:
        print(f"| {name} | {w:.0f} | {c:.0f} |")
    print("\nper class, sample() ms (CPU time):")
    per = []
    for c in range(len(CLASSES)):
        t = time.process_time()
        for i in range(20):
            sample(1000 + i, float(levels[i]), S, cls=c)
        per.append(f"{CLASSES[c]} {(time.process_time() - t) / 20 * 1e3:.2f}")
    print(", ".join(per))


if __name__ == "__main__":
    main()
