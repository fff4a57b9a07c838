"""One prepared check for a short loan of a GPU: kernel tests, attention and training
benchmarks, sampling times.

    python benchmarks/gpu_check.py  # H100/H200: < 8 min, writes benchmarks/results/gpu_<device>.md
    python benchmarks/gpu_check.py --dry-run  # CPU, tiny shapes, a few tens of seconds (CI runs it)

Sections, each guarded (an exception, a failing subprocess or a timeout is written into the report
and the check goes on) and each with a time budget:
  1. tests/test_flash_attention.py on the GPU (bf16/fp16/fp32), in parallel pytest shards: Triton
     compiles every autotuning config of every test shape, which is CPU-bound and runs one
     compile at a time per process.
  2. benchmarks/bench_attention.py: our kernel vs SDPA's backends on the U-Net's
     shapes at 256 and 512 px.
  3. benchmarks/bench_train.py: a training step at 256 px, batch 32 and 64, gradient checkpointing
     off and on, SDPA and our kernel.
  4. Sampling with the full text2earth config (random weights), bf16 U-Net, default
     guidance, in this process.
The report is rewritten after every section, so a check cut short still leaves what it measured.
"""

import argparse
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from model.config import load_config  # noqa: E402
from model.flops import cpu_name  # noqa: E402
from model import conditions  # noqa: E402
from model.pipeline import generate, prepare_for_sampling  # noqa: E402
from model.text2earth import Text2Earth  # noqa: E402

# Seconds per section on an H100/H200 (estimates in the comments). Each section must end by the sum
# of its own and the earlier budgets, counted from the start, so time an earlier
# section leaves unused passes on.
BUDGET_S = {
    "env": 5,
    # ~200 Triton compiles of 0.4-1.2 s each and their autotuning, over 4 shards: ~60 s
    "kernels": 90,
    # ~75 compiles, 10 autotuned shapes, 16 shapes x 4 kernels x 2 timings: ~120 s
    "attention": 140,
    # 4 runs of ~20 s start-up (U-Net init, FLOP counting) + 26 steps each: ~110 s
    "train": 150,
    # model built on the GPU, 4 cases x up to 3 repeats (~12 s a repeat): ~45 s eager, then
    # compiled: ~40 s of compiling, then what time is left
    "sampling": 110,
}
KERNEL_SHARDS = 4  # 1 in the dry run
TAIL_LINES = 25

# Sampling variants: a name and a function that prepares the bf16 model and returns the one to
# sample with. They run in this order on one model, so a variant that changes the model in place
# must come after those that expect it unchanged.
VARIANTS = [
    ("eager", lambda model: model),
    # U-Net and VAE decoder, in place
    ("compiled", lambda model: prepare_for_sampling(model, compile=True)),
]
# compiling even the tiny model takes ~a minute on a small CPU: not in the dry run
GPU_ONLY = {"compiled"}
T0 = time.perf_counter()
PROMPT = "a dense residential area with many buildings near a river and green farmland"


def log(msg):
    print(
        f"[{datetime.datetime.now():%H:%M:%S} +{time.perf_counter() - T0:5.0f} s] {msg}", flush=True
    )


def slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def tail(text, n=TAIL_LINES):
    return "```\n" + "\n".join(text.rstrip().splitlines()[-n:]) + "\n```"


def fold(markdown):
    """Another script's markdown report, its headings two levels down so that
    they nest under a section."""
    return re.sub(r"^(#+) ", lambda m: "##" + m.group(1) + " ", markdown, flags=re.M)


def child_env():
    # tunings on disk: a later process reuses an earlier one's
    env = dict(os.environ, PYTHONUNBUFFERED="1", TRITON_CACHE_AUTOTUNING="1")
    # the numbers are for compiled kernels (the kernel tests set it on a CPU)
    env.pop("TRITON_INTERPRET", None)
    return env


def run_parallel(cmds, timeout, work, name):
    """Run the commands at once from the repository root, each with its output in a log file under
    `work`. Returns [(exit code or None if killed at the timeout, output)]."""
    logs = [work / f"{name}_{i}.log" for i in range(len(cmds))]
    procs = []
    for cmd, path in zip(cmds, logs):
        with open(path, "w") as f:
            procs.append(
                subprocess.Popen(cmd, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=child_env())
            )
    deadline = time.perf_counter() + timeout
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=max(0.0, deadline - time.perf_counter())))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            codes.append(None)
    return [(code, path.read_text(errors="replace")) for code, path in zip(codes, logs)]


def command_line(cmd):
    return " ".join([Path(cmd[0]).name] + [str(c) for c in cmd[1:]])


def failure(cmds, results, timeout):
    """The failure message of a set of runs, or None if all exited 0."""
    for cmd, (code, _) in zip(cmds, results):
        if code is None:
            return f"`{command_line(cmd)}` timed out after {timeout:.0f} s"
        if code:
            return f"`{command_line(cmd)}` exited {code}"
    return None


# -----------------------------------------------------------------------------
# Sections: each returns (markdown body, failure message or None); an exception counts as a failure


def environment(args, timeout, work):
    cuda = not args.dry_run
    rows = [
        ("date", f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}"),
        ("CPU", cpu_name()),
        ("host", platform.node()),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
    ]
    try:
        import triton

        rows.append(("triton", triton.__version__))
    except ImportError:
        rows.append(("triton", "not installed"))
    if cuda:
        p = torch.cuda.get_device_properties(0)
        try:
            driver = (
                subprocess.run(
                    ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                    capture_output=True,
                    text=True,
                    timeout=20,
                )
                .stdout.strip()
                .splitlines()[0]
            )
        except (OSError, subprocess.SubprocessError, IndexError):
            driver = "unknown (nvidia-smi failed)"
        rows += [
            ("GPU", f"{p.name}, {torch.cuda.device_count()} visible"),
            ("GPU memory", f"{p.total_memory / 2**30:.1f} GiB"),
            ("compute capability", f"{p.major}.{p.minor}, {p.multi_processor_count} SMs"),
            ("driver", driver),
            ("CUDA (torch)", torch.version.cuda),
            ("cuDNN", str(torch.backends.cudnn.version())),
        ]
    else:
        rows.append(("GPU", "none: dry run on the CPU, tiny shapes"))
    return "| | |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows), None


def kernel_tests(args, timeout, work):
    """tests/test_flash_attention.py in up to KERNEL_SHARDS parallel pytest
    processes, by node id."""
    pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    target = ["tests/test_flash_attention.py"]
    if args.dry_run:  # Triton's interpreter is slow: the argument checks only
        target += ["-k", "test_errors or test_autotune_pruning"]
    start = time.perf_counter()
    [(code, out)] = run_parallel([pytest + target + ["--collect-only"]], timeout, work, "collect")
    ids = [line for line in out.splitlines() if "::" in line]
    if code or not ids:
        return tail(out), f"collecting the tests failed (exit {code})"
    n = min(1 if args.dry_run else KERNEL_SHARDS, len(ids))
    cmds = [pytest + ids[i::n] for i in range(n)]
    left = timeout - (time.perf_counter() - start)
    log(f"  {len(ids)} tests in {n} shards, {left:.0f} s")
    results = run_parallel(cmds, left, work, "kernels")
    counts = {}
    for _, text in results:  # pytest's last line: "12 passed, 1 skipped in 30.1s"
        last = (text.strip().splitlines() or [""])[-1]
        for k, kind in re.findall(r"(\d+) (passed|failed|skipped|errors?|xfailed|xpassed)\b", last):
            kind = "errors" if kind.startswith("error") else kind
            counts[kind] = counts.get(kind, 0) + int(k)
    body = [
        f"`python -m pytest -q {' '.join(target)}`: {len(ids)} tests in {n} parallel shards "
        "(`python -m pytest -q NODEIDS`).",
        "",
        "Totals: " + (", ".join(f"{v} {k}" for k, v in counts.items()) or "none reported"),
        "",
    ]
    for i, (_, text) in enumerate(results):
        body += [f"Shard {i}, last lines:", "", tail(text, 12), ""]
    return "\n".join(body), failure(cmds, results, left) or (
        None if counts.get("passed") else "no test passed"
    )


def attention_bench(args, timeout, work):
    out = work / "attention.md"
    sizes = ["256"] if args.dry_run else ["256", "512"]
    cmd = [
        sys.executable,
        "benchmarks/bench_attention.py",
        "--sizes",
        *sizes,
        "--no-long",
        "--out",
        str(out),
    ]
    if args.dry_run:  # the shape table and FLOP bookkeeping only
        cmd += ["--dry-run"]
    results = run_parallel([cmd], timeout, work, "attention")
    fail = failure([cmd], results, timeout)
    text = results[0][1]
    if not fail and not args.dry_run and not out.exists():
        fail = "bench_attention.py wrote no result file"
    result = fold(out.read_text()) if out.exists() else tail(text, TAIL_LINES if fail else 60)
    return f"`{command_line(cmd)}`\n\n{result}", fail


def train_bench(args, timeout, work):
    """bench_train.py once per (attention, batch), all appending to one file; each run gets an equal
    share of what is left. A run out of memory with checkpointing both off and on is run
    again with it on only."""
    out = work / "train.md"
    runs = (
        [("triton", 1)]
        if args.dry_run
        else [(attn, b) for attn in ("sdpa", "triton") for b in (32, 64)]
    )
    shape = (
        [
            "--config",
            "configs/tiny.py",
            "--image-size",
            "16",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--device",
            "cpu",
            "--threads",
            "1",
        ]
        if args.dry_run
        else ["--image-size", "256", "--steps", "10", "--warmup", "3"]
    )
    start, lines, fail = time.perf_counter(), [], None
    for i, (attn, batch) in enumerate(runs):
        share = (timeout - (time.perf_counter() - start)) / (len(runs) - i)
        for ckpt in ("both", "1"):
            cmd = [
                sys.executable,
                "benchmarks/bench_train.py",
                "--batch",
                str(batch),
                "--attention",
                attn,
                "--grad-ckpt",
                ckpt,
                "--encoders",
                "0",
                "--out",
                str(out),
                "--append",
            ] + shape
            log(f"  {command_line(cmd)} ({share:.0f} s)")
            t = time.perf_counter()
            results = run_parallel([cmd], share, work, f"train_{attn}_{batch}_{ckpt}")
            run_fail, text = failure([cmd], results, share), results[0][1]
            lines.append(
                f"- `{command_line(cmd)}`: {run_fail or 'ok'} ({time.perf_counter() - t:.0f} s)"
            )
            if run_fail and ckpt == "both" and "out of memory" in text.lower():
                lines.append(
                    "  out of memory with gradient checkpointing off: again with it on only"
                )
                share -= time.perf_counter() - t
                continue
            if run_fail:
                fail = fail or run_fail
                lines += ["", tail(text), ""]
            break
    body = (
        "\n".join(lines) + "\n\n" + (fold(out.read_text()) if out.exists() else "(no result file)")
    )
    return body, fail or (None if out.exists() else "bench_train.py wrote no result file")


def sampling(args, timeout, work):
    """Seconds per batch of `generate` for each variant, size and step count;
    fastest of up to 3 repeats."""
    start = time.perf_counter()
    device = "cpu" if args.dry_run else "cuda"
    config, batch = ("configs/tiny.py", 2) if args.dry_run else ("configs/text2earth.py", 8)
    sizes, step_counts, repeats = ((16,), (2, 4), 1) if args.dry_run else ((256, 512), (20, 50), 3)
    dtype = torch.bfloat16
    if args.dry_run:
        torch.set_num_threads(1)  # a small shared CPU: idle OpenMP threads stall every op
    t = time.perf_counter()
    with torch.device(device):  # initialised in place: no 1.3 B-parameter init on the CPU
        base = Text2Earth(load_config(config).model).eval().requires_grad_(False)
    base.unet.to(dtype)  # as sample.py: bf16 U-Net and text tower, fp32 VAE
    base.text_encoder.to(dtype)
    counts = base.parameter_counts()
    lines = [
        f"`{config}` with random weights ({counts['total'] / 1e9:.2f} B parameters, U-Net "
        f"{counts['unet'] / 1e6:.0f} M), built in {time.perf_counter() - t:.1f} s; batch {batch}, "
        "bf16 U-Net and text encoder, fp32 VAE, dpmpp_2m, default guidance "
        f"{conditions.scales(base.cfg)}, SDPA attention. Times are whole `generate` calls (text "
        f"encoding, sampling, VAE decoding), the fastest of up to {repeats}.",
        "",
        "| variant | size | steps | s/batch | s/image | U-Net forwards (batch) | forwards/s | "
        "peak GiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    derived, skipped = [], []
    cond = conditions.request(
        base.cfg, batch, text=PROMPT, level=17.0 if "level" in base.cfg.condition_names() else None
    )
    forwards = {}  # (size, steps) -> U-Net forwards of the first variant (the same for all)
    for name, prepare in VARIANTS:
        if args.dry_run and name in GPU_ONLY:
            derived.append(f"- {name}: not run in the dry run")
            continue
        # its warm-up (a compile) would overrun the budget
        if time.perf_counter() - start > timeout / 2:
            skipped.append(f"{name} (all cases)")
            continue
        t = time.perf_counter()
        model = prepare(base)
        calls = []  # batch of every U-Net forward
        hook = model.unet.register_forward_hook(
            lambda mod, inputs, output: calls.append(inputs[0].shape[0])
        )

        def run(size, steps):
            calls.clear()
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            generate(
                model, cond, seeds=list(range(batch)), steps=steps, size=(size, size), dtype=dtype
            )
            seconds = time.perf_counter() - t0  # generate returns CPU tensors: the GPU is done
            return seconds, (
                torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            )

        for size in sizes:  # warm-up (and compilation, for a variant that compiles)
            run(size, 2)
        derived.append(f"- {name}: warm-up (2 steps at each size) {time.perf_counter() - t:.1f} s")
        for size in sizes:
            per_steps = {}
            for steps in step_counts:
                times = []
                while len(times) < repeats and time.perf_counter() - start < timeout:
                    seconds, peak = run(size, steps)
                    times.append(seconds)
                if not times:
                    skipped.append(f"{name} {size}px {steps} steps")
                    continue
                # a compiled U-Net may not run Python forward hooks: the count is the
                # sampler's, whatever runs it
                best, (n, fwd_batch) = (
                    min(times),
                    forwards.setdefault((size, steps), (len(calls), calls[:1])),
                )
                per_steps[steps] = (best, n)
                lines.append(
                    f"| {name} | {size}x{size} | {steps} | {best:.3f} | {best / batch:.3f} | {n} "
                    f"({fwd_batch[0] if fwd_batch else '?'}) | {n / best:.2f} | "
                    f"{'n/a' if peak is None else f'{peak:.2f}'} |"
                )
                log(f"  {name} {size}px {steps} steps: {best:.3f} s/batch ({len(times)} runs)")
            # the difference of the two step counts: per-step and fixed cost
            if len(per_steps) == 2:
                (_, (a, na)), (_, (b, nb)) = sorted(per_steps.items())
                per_fwd = (b - a) / (nb - na)
                derived.append(
                    f"- {name} {size}px: a U-Net forward {per_fwd:.4f} s ({1 / per_fwd:.1f} "
                    f"forwards/s); fixed cost per batch (text, decoding) {a - na * per_fwd:.3f} s"
                )
        hook.remove()
    lines += [""] + derived + ([f"\nSkipped, out of time: {', '.join(skipped)}"] if skipped else [])
    return "\n".join(lines), (f"out of time before {len(skipped)} case(s)" if skipped else None)


SECTIONS = [  # (key in BUDGET_S, heading, function)
    ("env", "Environment", environment),
    ("kernels", "1. Kernel tests: tests/test_flash_attention.py", kernel_tests),
    ("attention", "2. Attention kernels: benchmarks/bench_attention.py", attention_bench),
    ("train", "3. U-Net training step: benchmarks/bench_train.py", train_bench),
    ("sampling", "4. Sampling: model.pipeline.generate", sampling),
]


def write_report(path, title, dry_run, done, finished):
    total = time.perf_counter() - T0
    parts = [
        f"# {title}",
        "",
        f"Written by `python benchmarks/gpu_check.py{' --dry-run' if dry_run else ''}`; total wall "
        f"time {total:.0f} s{'' if finished else ' (still running)'}; per-section budgets (s): "
        f"{BUDGET_S}.",
        "",
    ]
    for heading, status, seconds, body in done:
        parts += [f"## {heading}", "", f"Status: {status} ({seconds:.0f} s)", "", body, ""]
    path.write_text("\n".join(parts))


def main():
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--dry-run", action="store_true", help="CPU, tiny shapes, a few tens of seconds (for CI)"
    )
    p.add_argument(
        "--out",
        default=None,
        help="report file (default benchmarks/results/gpu_<device>.md; dry run: "
        "gpu_check_dry_run.md in the temporary folder)",
    )
    args = p.parse_args()
    cuda = torch.cuda.is_available() and not args.dry_run
    if not cuda and not args.dry_run:
        print("gpu_check: no CUDA device; use --dry-run on a CPU", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(0) if cuda else "cpu (dry run)"
    default = (
        ROOT / "benchmarks" / "results" / f"gpu_{slug(name)}.md"
        if cuda
        else Path(tempfile.gettempdir()) / "gpu_check_dry_run.md"
    )
    out = Path(args.out) if args.out else default
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.touch()
    except OSError as e:
        print(f"gpu_check: cannot write --out {out}: {e}", file=sys.stderr)
        return 2

    done, end = [], 0.0
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        for key, heading, fn in SECTIONS:
            end += BUDGET_S[key] * (0.5 if args.dry_run else 1)
            timeout = max(1.0, end - (time.perf_counter() - T0))
            log(f"{heading} ({timeout:.0f} s)")
            t = time.perf_counter()
            try:
                body, fail = fn(args, timeout, Path(tmp))
            except Exception as e:  # recorded, and the check goes on
                body, fail = (
                    tail(traceback.format_exc()),
                    f"{type(e).__name__}: {e}".splitlines()[0],
                )
            status = "ok" if fail is None else f"FAILED: {fail}"
            log(f"  {status}")
            done.append((heading, status, time.perf_counter() - t, body))
            write_report(out, f"GPU check: {name}", args.dry_run, done, finished=False)
            if cuda:
                torch.cuda.empty_cache()
    write_report(out, f"GPU check: {name}", args.dry_run, done, finished=True)
    log(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
