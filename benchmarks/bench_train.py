"""U-Net training throughput: images/s, TFLOP/s, MFU, peak memory, and
where the time of a step goes.

    python benchmarks/bench_train.py  # text2earth, batch 32, bf16 on a GPU
    python benchmarks/bench_train.py --grad-ckpt both --attention triton --compile
    # CPU, 16 GB:
    python benchmarks/bench_train.py --batch 1 --steps 3 --warmup 1 --opt-fraction 0.25 --threads 1
    python benchmarks/bench_train.py --config configs/tiny.py --image-size 64 --batch 8 \\
        --steps 20 --append

A step is train.py's, on pre-encoded latents and text: forward (q_sample + U-Net under
autocast + MSE), backward, optimizer (grad-norm clip + AdamW, fused on CUDA, the same parameter
groups) and EMA (train.py's per-parameter lerp_; a torch._foreach_lerp_ row shows the cheaper
alternative). Phases are timed with CUDA events (one synchronize per step, so the GPU queue is never
drained between phases) or perf_counter on the CPU; grad-checkpointing settings alternate step by
step and medians are reported (the CPU may be shared). Text encoding (tokenizer + text tower,
autocast) and VAE encoding (fp32, outside autocast, as train.py runs it) are timed separately as the
cost of not pre-encoding.

FLOPs are counted once with FlopCounterMode on the meta device. MFU uses model FLOPs, 3 x forward
(model/flops.py's unet_train_flops, as train.py does), so it never credits the recomputation of
gradient checkpointing; the forward and backward as executed are reported next to it. Reference for
the text2earth U-Net (SD2-base's U-Net plus the level embedding) at 256x256: 181 GFLOP forward, 0.54
TFLOP training per image. MFU = achieved model FLOP/s / dense bf16 peak of the GPU
(model/flops.py's table); n/a on the CPU.

--opt-fraction F < 1 runs AdamW and EMA over the first F of the parameters only and scales their
times by the parameter count (both are elementwise, memory-bound passes): the full text2earth state
in fp32 (weights, grads, two Adam moments, EMA: 20 bytes x 866 M = 17 GB) does
not fit a small CPU machine.
"""

import argparse
import copy
import platform
import re
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from model import attention  # noqa: E402
from model.config import load_config  # noqa: E402
from model.diffusion import Diffusion  # noqa: E402
from model.flops import peak_tflops, unet_train_flops  # noqa: E402
from model.unet import UNet  # noqa: E402

REF_FWD_GFLOP, REF_TRAIN_TFLOP = 181.0, 0.54  # text2earth U-Net at 256x256, per image


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--config", default="configs/text2earth.py", help="model config file (its `model`)"
    )
    p.add_argument("--batch", type=int, default=32, help="images per device and step")
    p.add_argument("--image-size", type=int, default=256, help="pixels; latents are image-size / 8")
    p.add_argument(
        "--steps", type=int, default=20, help="timed steps per grad-checkpointing setting"
    )
    p.add_argument(
        "--warmup",
        type=int,
        default=3,
        help="untimed steps per setting first (compile happens here)",
    )
    p.add_argument(
        "--dtype",
        default=None,
        choices=["bf16", "fp16", "fp32"],
        help="autocast dtype (default bf16 on CUDA, fp32 on the CPU); weights stay fp32 as in "
        "train.py",
    )
    p.add_argument(
        "--grad-ckpt", default="0", choices=["0", "1", "both"], help="gradient checkpointing"
    )
    p.add_argument(
        "--attention", default="sdpa", choices=["sdpa", "triton"], help="attention backend"
    )
    p.add_argument("--compile", action="store_true", help="torch.compile the U-Net")
    p.add_argument(
        "--encoders", type=int, default=1, choices=[0, 1], help="also time text and VAE encoding"
    )
    p.add_argument(
        "--opt-fraction",
        type=float,
        default=1.0,
        help="run AdamW and EMA on this fraction of the parameters and scale their times (low-RAM "
        "CPU)",
    )
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="override the dense bf16 peak of the device"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads (0 = torch's default); 1 on a shared CPU, where idle OpenMP threads "
        "stall every op",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--out", default=None, help="markdown file (default benchmarks/results/train_<device>.md)"
    )
    p.add_argument("--append", action="store_true", help="append to --out instead of replacing it")
    args = p.parse_args(argv)
    if not 0 < args.opt_fraction <= 1:
        p.error("--opt-fraction must be in (0, 1]")
    if args.image_size % 8:
        p.error("--image-size must be a multiple of 8")
    return args


# --------------------------------------------------------------------------------------------------
# Device helpers: peak FLOP/s, clocks, peak memory
# --------------------------------------------------------------------------------------------------
def device_name(device):
    return (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else (platform.processor() or platform.machine())
    )


def device_peak_tflops(device, override):
    """--peak-tflops if given, else model/flops.py's dense bf16 peak of the GPU (None on
    the CPU or if unknown)."""
    if override:
        return override
    return peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None


class Clock:
    """Marks phase boundaries: CUDA events on the GPU (no synchronize until `read`),
    perf_counter on the CPU."""

    def __init__(self, device):
        self.cuda = device.type == "cuda"
        self.marks = []

    def mark(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def read(self):
        """Seconds between consecutive marks."""
        if self.cuda:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device):
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux >= 4.0: "5" resets VmHWM (peak RSS)
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass


def peak_gb(device):
    """Peak allocated tensor memory since reset_peak (CUDA), or peak resident set
    size of the process (CPU)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


# --------------------------------------------------------------------------------------------------
# FLOPs
# --------------------------------------------------------------------------------------------------
def count_flops(ucfg, latent, ctx_len, grad_ckpt=False):
    """(forward, backward) FLOPs per image of the U-Net as executed (with grad_ckpt: + the
    recomputed forward), counted on the meta device at batch 1."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = copy.deepcopy(ucfg)
    cfg.gradient_checkpointing = grad_ckpt
    with torch.device("meta"):
        unet = UNet(cfg).train()
        x = torch.zeros(1, cfg.in_channels, latent, latent)
        ctx = torch.zeros(1, ctx_len, cfg.context_dim)
        t, level = torch.zeros(1), torch.zeros(1)
    fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)
    with fwd:
        out = unet(x, t, {"text": ctx, **{name: level for name in cfg.scalar_conditions}})
    with bwd:
        out.float().pow(2).mean().backward()
    return fwd.get_total_flops(), bwd.get_total_flops()


def count_encoder_flops(mcfg, image_size):
    """Forward FLOPs per image of the text tower and of the VAE encoder (meta device)."""
    from torch.utils.flop_counter import FlopCounterMode
    from model.text import TextEncoder
    from model.vae import AutoencoderKL

    with torch.device("meta"):
        text, vae = TextEncoder(mcfg.text), AutoencoderKL(mcfg.vae)
        ids = torch.zeros(1, mcfg.text.context_length, dtype=torch.long)
        img = torch.zeros(1, mcfg.vae.in_channels, image_size, image_size)
    counts = []
    for fn in (lambda: text(ids), lambda: vae.encode(img)):
        c = FlopCounterMode(display=False)
        with c, torch.no_grad():
            fn()
        counts.append(c.get_total_flops())
    return counts


# --------------------------------------------------------------------------------------------------
# The training step (train.py's, on pre-encoded inputs)
# --------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, mcfg, args, device, dtype):
        self.device, self.dtype, self.mcfg = device, dtype, mcfg
        torch.manual_seed(args.seed)
        self.unet = UNet(mcfg.unet).to(device).train()
        self.net = torch.compile(self.unet) if args.compile else self.unet
        params = list(self.unet.parameters())
        n_total = sum(p.numel() for p in params)
        # optimizer / EMA parameters: all, or the first --opt-fraction of
        # them (times scaled back up)
        opt_params, n = [], 0
        for p in params:
            if n >= args.opt_fraction * n_total:
                break
            opt_params.append(p)
            n += p.numel()
        self.n_params, self.opt_scale = n_total, n_total / n
        self.opt_params = opt_params
        decay, no_decay = (
            [p for p in opt_params if p.ndim >= 2],
            [p for p in opt_params if p.ndim < 2],
        )
        self.opt = torch.optim.AdamW(
            [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
            lr=1e-4,
            betas=(0.9, 0.999),
            eps=1e-8,
            fused=device.type == "cuda",
        )
        self.ema = [p.detach().clone() for p in opt_params]  # what deepcopy(unet) holds, as a list
        self.others = [p for p in params if all(p is not q for q in opt_params)]
        self.scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
        self.autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
        self.diffusion = Diffusion.from_config(mcfg.diffusion)
        self.step_i = 0

    def batch(self, B, latent):
        g = torch.Generator().manual_seed(self.step_i)
        c = self.mcfg.unet
        x0 = torch.randn(B, c.out_channels, latent, latent, generator=g)
        noise = torch.randn(B, c.out_channels, latent, latent, generator=g)
        t = torch.randint(0, self.diffusion.num_steps, (B,), generator=g)
        context = torch.randn(B, self.mcfg.text.context_length, c.context_dim, generator=g)
        level = 10 + 8 * torch.rand(B, generator=g)
        return [v.to(self.device) for v in (x0, noise, t, context, level)]

    def step(self, B, latent, grad_ckpt):
        """One training step; returns seconds per phase (forward, backward, optimizer, EMA)
        and the step wall time."""
        self.unet.cfg.gradient_checkpointing = grad_ckpt
        x0, noise, t, context, level = self.batch(B, latent)
        cond = {"text": context, **{name: level for name in self.mcfg.unet.scalar_conditions}}
        sync(self.device)
        clock, t0 = Clock(self.device), time.perf_counter()
        clock.mark()

        def model_fn(x_t, tt):
            with self.autocast:
                return self.net(x_t, tt, cond).float()

        loss = self.diffusion.training_losses(
            model_fn, x0, t, noise, prediction=self.mcfg.diffusion.prediction
        )["loss"].mean()
        clock.mark()
        self.scaler.scale(loss).backward()
        clock.mark()
        for p in self.others:  # --opt-fraction < 1: these are not stepped
            p.grad = None
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.opt_params, 1.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        clock.mark()
        with torch.no_grad():  # train.py's EMA: one lerp_ per parameter
            d = min(0.9999, (1 + self.step_i) / (10 + self.step_i))
            for pe, p in zip(self.ema, self.opt_params):
                pe.lerp_(p, 1 - d)
        clock.mark()
        times = clock.read()  # synchronizes
        wall = time.perf_counter() - t0
        sync(self.device)
        t1 = time.perf_counter()
        with torch.no_grad():  # not part of the step: the same update, one foreach call
            torch._foreach_lerp_(self.ema, self.opt_params, 1 - d)
        sync(self.device)
        foreach = time.perf_counter() - t1
        self.step_i += 1
        s = self.opt_scale
        return {
            "forward": times[0],
            "backward": times[1],
            "optimizer": times[2] * s,
            "EMA (lerp_ loop)": times[3] * s,
            "step": wall + (times[2] + times[3]) * (s - 1),
            "EMA (foreach)": foreach * s,
        }


def bench_encoders(mcfg, args, device, dtype, latent):
    """Seconds per batch of text encoding (tokenizer + tower, autocast) and VAE
    encoding (fp32, as train.py)."""
    from model.text import TextEncoder, Tokenizer
    from model.vae import AutoencoderKL

    text = TextEncoder(mcfg.text).to(device).eval().requires_grad_(False)
    tok = Tokenizer(mcfg.text.context_length)
    vae = AutoencoderKL(mcfg.vae).to(device).eval().requires_grad_(False)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    captions = [
        f"a dense residential area with {i} buildings near a river and green farmland"
        for i in range(args.batch)
    ]
    images = (
        torch.rand(
            args.batch, mcfg.vae.in_channels, args.image_size, args.image_size, device=device
        )
        * 2
        - 1
    )
    g = torch.Generator(device).manual_seed(0)

    def vae_encode():  # train.py: post.mean + post.std * eps, scaled
        post = vae.encode(images)
        return (
            post.mean + post.std * torch.randn(post.mean.shape, generator=g, device=device)
        ) * mcfg.vae.scaling_factor

    def vae_encode_autocast():
        with autocast:
            return vae_encode()

    def text_encode():
        with autocast:
            return text(tok(captions).to(device))

    fns = {
        "text encoder (tokenizer + tower, autocast)": text_encode,
        "VAE encode (fp32, as train.py)": vae_encode,
    }
    if dtype != torch.float32:
        fns["VAE encode (autocast)"] = vae_encode_autocast
    times = {k: [] for k in fns}
    n = max(2, min(args.steps, 10))
    with torch.no_grad():
        for i in range(n + 1):  # interleaved; the first round warms up
            for k, fn in fns.items():
                sync(device)
                t0 = time.perf_counter()
                fn()
                sync(device)
                if i:
                    times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------
def flops_per_image(mcfg, latent, settings):
    """FLOPs per image, counted once: model FLOPs for MFU, and as executed. Prints a summary and
    returns (training model FLOPs, rows of the markdown FLOP table)."""
    train_flops = unet_train_flops(mcfg.unet, latent, mcfg.text.context_length)  # 3 x forward
    fwd, bwd = count_flops(mcfg.unet, latent, mcfg.text.context_length)
    flop_lines = [
        f"| U-Net forward | {fwd / 1e9:.4g} GFLOP | {REF_FWD_GFLOP:.0f} GFLOP at 256x256 "
        "(text2earth) |",
        f"| U-Net backward, as executed | {bwd / 1e9:.1f} GFLOP | |",
        f"| U-Net training, model FLOPs (3 x forward; MFU uses these) | {train_flops / 1e12:.3f} "
        f"TFLOP | {REF_TRAIN_TFLOP} TFLOP at 256x256 (text2earth) |",
        f"| U-Net training, as executed (forward + backward) | {(fwd + bwd) / 1e12:.3f} TFLOP | |",
    ]
    if True in settings:
        f2, b2 = count_flops(mcfg.unet, latent, mcfg.text.context_length, grad_ckpt=True)
        flop_lines.append(
            f"| executed with gradient checkpointing (+ recompute) | {(f2 + b2) / 1e12:.3f} TFLOP "
            "| |"
        )
    print(
        f"FLOPs per image: forward {fwd / 1e9:.1f} G, backward {bwd / 1e9:.1f} G, train "
        f"{train_flops / 1e12:.3f} T model FLOPs (reference at 256px for text2earth: "
        f"{REF_FWD_GFLOP:.0f} G / {REF_TRAIN_TFLOP} T)",
        flush=True,
    )
    return train_flops, flop_lines


def run_steps(trainer, args, device, latent, settings):
    """U-Net training steps, grad-checkpointing settings alternating step by step. Returns
    ({setting: per-step phase times}, {setting: peak GB}, {setting: warm-up seconds})."""
    runs = {s: [] for s in settings}
    peaks = {s: 0.0 for s in settings}
    compile_s = {s: 0.0 for s in settings}
    for i in range(args.warmup + args.steps):
        for s in settings:
            reset_peak(device)
            t0 = time.perf_counter()
            r = trainer.step(args.batch, latent, s)
            if i < args.warmup:
                compile_s[s] += time.perf_counter() - t0
            else:
                runs[s].append(r)
                peaks[s] = max(peaks[s], peak_gb(device))
                print(
                    f"  step {i - args.warmup} grad_ckpt={int(s)}: {r['step']:.3f} s (fwd "
                    f"{r['forward']:.3f}, bwd {r['backward']:.3f}, opt {r['optimizer']:.3f}, ema "
                    f"{r['EMA (lerp_ loop)']:.3f})",
                    flush=True,
                )
    return runs, peaks, compile_s


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[
        args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    ]
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True  # as train.py
        torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    attention.set_backend(args.attention)
    mcfg = load_config(args.config).model
    latent = args.image_size // 2 ** (len(mcfg.vae.channels) - 1)
    settings = {"0": [False], "1": [True], "both": [False, True]}[args.grad_ckpt]
    peak = device_peak_tflops(device, args.peak_tflops)
    name = device_name(device)
    cpu_sdpa = args.attention == "triton" and device.type != "cuda"
    fallback = " (CPU: falls back to SDPA)" if cpu_sdpa else ""
    print(
        f"{args.config} on {name}: batch {args.batch}, {args.image_size}px (latent {latent}), "
        f"{dtype}, attention {args.attention}{fallback}, compile {args.compile}",
        flush=True,
    )
    train_flops, flop_lines = flops_per_image(mcfg, latent, settings)

    trainer = Trainer(mcfg, args, device, dtype)
    runs, peaks, compile_s = run_steps(trainer, args, device, latent, settings)
    med = {s: {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in settings}
    n_params, opt_scale = trainer.n_params, trainer.opt_scale
    del trainer
    enc = bench_encoders(mcfg, args, device, dtype, latent) if args.encoders else {}
    enc_flops = count_encoder_flops(mcfg, args.image_size) if args.encoders else []

    # Report
    mem_kind = "max_memory_allocated" if device.type == "cuda" else "peak RSS of the process"
    lines = (
        [
            f"## {args.config}: batch {args.batch}, {args.image_size}x{args.image_size}, {name}",
            "",
            f"torch {torch.__version__}, {dtype}, attention {args.attention}, compile "
            f"{args.compile}, {torch.get_num_threads()} threads; {args.steps} timed steps per "
            f"setting after {args.warmup} warm-up steps, alternating; medians. U-Net "
            f"{n_params / 1e6:.1f} M params.",
            "",
            "| FLOPs per image | counted | reference |",
            "|---|---|---|",
        ]
        + flop_lines
        + [""]
    )
    lines += [
        "| grad ckpt | images/s | s/step | model TFLOP/s | MFU | peak memory (GB) |",
        "|---|---|---|---|---|---|",
    ]
    for s in settings:
        ips = args.batch / med[s]["step"]
        tf = ips * train_flops / 1e12
        mfu = f"{tf / peak:.1%}" if peak and device.type == "cuda" else "n/a"
        lines.append(
            f"| {'on' if s else 'off'} | {ips:.3g} | {med[s]['step']:.3f} | {tf:.3g} | {mfu} | "
            f"{peaks[s]:.2f} |"
        )
    lines += [
        "",
        f"Peak memory: {mem_kind}, U-Net + AdamW + EMA only (train.py also keeps the VAE and the "
        "text encoder resident). MFU against "
        f"{f'{peak:.0f} TFLOP/s dense bf16' if peak else 'no known peak'}.",
    ]
    if args.opt_fraction < 1:
        missing = 12 * n_params * (1 - 1 / opt_scale) / 2**30  # 2 Adam moments + EMA, fp32
        lines.append(
            f"AdamW and EMA ran on {1 / opt_scale:.0%} of the parameters, their times scaled up; "
            f"the peak memory lacks the rest of their state ({missing:.1f} GB more in a full run)."
        )
    lines += [
        "",
        "Where a step's time goes (median seconds, share of the step):",
        "",
        "| phase | " + " | ".join(f"grad ckpt {'on' if s else 'off'}" for s in settings) + " |",
        "|---" * (len(settings) + 1) + "|",
    ]
    for k in ["forward", "backward", "optimizer", "EMA (lerp_ loop)", "step", "EMA (foreach)"]:
        cells = [
            f"{med[s][k]:.4f} ({med[s][k] / med[s]['step']:.0%})"
            if k != "step"
            else f"{med[s][k]:.4f}"
            for s in settings
        ]
        lines.append(f"| {k if k != 'step' else '**step**'} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "EMA (foreach) is not part of the step: the same update as one torch._foreach_lerp_ call, "
        "for comparison. Warm-up"
        + (" (incl. compile)" if args.compile else "")
        + " took "
        + ", ".join(f"{compile_s[s]:.1f} s (ckpt {'on' if s else 'off'})" for s in settings)
        + ".",
    ]
    if enc:
        s0 = settings[0]
        lines += [
            "",
            f"Not pre-encoding adds (per batch of {args.batch}; compare the U-Net step, ckpt "
            f"{'on' if s0 else 'off'}: {med[s0]['step']:.4f} s):",
            "",
            "| encoder | s/batch | share of step | GFLOP/image |",
            "|---|---|---|---|",
        ]
        for k, v in enc.items():
            fl = enc_flops[0] if k.startswith("text") else enc_flops[1]
            lines.append(f"| {k} | {v:.4f} | {v / med[s0]['step']:.0%} | {fl / 1e9:.3g} |")
        end2end = (
            med[s0]["step"]
            + enc["text encoder (tokenizer + tower, autocast)"]
            + enc["VAE encode (fp32, as train.py)"]
        )
        lines += [
            "",
            f"End to end as train.py runs it (step + text + fp32 VAE): {args.batch / end2end:.2f} "
            "images/s.",
        ]
    text = "\n".join(lines) + "\n"
    print(text)
    tag = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")
    out = Path(args.out or Path(__file__).parent / "results" / f"train_{tag}.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.append and out.exists():
        out.write_text(out.read_text() + "\n" + text)
    else:
        out.write_text(
            f"# U-Net training throughput ({tag})\n\nWritten by benchmarks/bench_train.py.\n\n"
            + text
        )
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
