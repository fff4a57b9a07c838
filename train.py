"""Train Text2Earth's U-Net (or its KL-VAE) on one CPU, one GPU, or a torchrun fleet.

    python train.py --config configs/tiny.py --max_steps=100
    torchrun --nproc_per_node=8 train.py --config configs/text2earth_stage1.py
    torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29500 --rdzv-id=t2e \\
        train.py --config configs/text2earth_stage1.py

A config file holds `model = ModelConfig(...)` and plain values for any field of `TrainConfig` below.
`--key=value` overrides them (type-checked; unknown keys are errors); model fields by dotted path,
e.g. `--model.unet.gradient_checkpointing=True`.

Exact resume: every random draw is a function of (seed, step, position in the global batch) or of
(seed, epoch, sample index), and the checkpoint stores model, EMA, optimizer, step and data position.
A run resumed from step N continues the same curve as one that never stopped. Checkpoints are written
atomically (temp file + rename), every `ckpt_every` steps and on SIGTERM / SIGINT.
"""
import ast
import collections
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from model import attention
from model.config import ModelConfig, load_config
from model.diffusion import Diffusion
from model.text2earth import Text2Earth
from model.unet import UNet
from model.weights import load_weights, save_model
from data.datasets import sample_generator

log = logging.getLogger("train")


@dataclass
class TrainConfig:
    # what to train, from where
    out_dir: str = "out/run"
    train: str = "unet"             # "unet" (diffusion) | "vae" (reconstruction + KL)
    init_from: str = ""             # "" = from scratch (the `model` config), or release folder / our .safetensors
    resume: bool = True             # continue from out_dir's latest checkpoint if there is one
    train_text_encoder: bool = False
    # data
    data: str = "synthetic"         # "synthetic" | "karpathy" | "folder" | "git10m" | "shards"
    data_path: str = ""
    data_split: str = "train"
    gsd_m: float = 0.0              # dataset-wide metres/pixel when samples carry no resolution (0 = none)
    min_quality: float = 0.0        # keep img_quality_score > this (stage 2: 4.8); 0 = keep all
    image_size: int = 256
    synthetic_samples: int = 100_000
    synthetic_levels: tuple = (10.0, 18.0)
    synthetic_integer_levels: bool = False
    num_workers: int = 2
    max_bad_fraction: float = 0.01  # stop when more than this fraction of samples is unreadable
    # optimisation (paper: AdamW, lr 1e-4, global batch 1024)
    batch_size: int = 32            # per device and micro-step; global = batch_size * grad_accum * world_size
    grad_accum: int = 1
    max_steps: int = 100_000
    max_minutes: float = 0.0        # > 0: a time budget as well (training time, summed over resumes): the run ends
                                    # when the pace it measures leaves no time for another step, and the cosine
                                    # decay is planned for the steps that fit (plan_steps); max_steps caps them
    lr: float = 1e-4
    warmup_steps: int = 1000
    lr_decay: str = "constant"      # "constant" | "cosine" (to 10% at max_steps)
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    ema_decay: float = 0.9999
    p_text: float = 0.1             # DCA: caption -> "" with this probability
    p_res: float = 0.1              # DCA: level -> 0, independently
    min_snr_gamma: float = 0.0      # 0 = off; 5 is Hang et al.'s choice
    timestep_power: float = 1.0     # t = T * u ** (1 / k), u ~ U(0, 1): 1 = uniform (the paper), 2 = density
                                    # rising linearly with t, i.e. more of the high-noise steps where the
                                    # conditions decide the image (what the demo's short training needs)
    kl_weight: float = 1e-6         # VAE: weight of KL(sum over latent) against L1 (sum over pixels)
    spectral_weight: float = 0.0    # VAE: weight of the L1 distance between amplitude spectra (see vae_loss)
    freeze_encoder: bool = False    # VAE: train the decoder only (the latents, and a U-Net trained on them, keep)
    zero_init: bool = False         # from scratch: every residual branch's last layer starts at zero (LDM's
                                    # U-Net init; see zero_residual_branches); never applied to loaded weights
    scale_eq_weight: float = 0.0    # VAE: weight of the half-resolution reconstruction from the 2x2-averaged
                                    # latent (scale equivariance, see vae_loss)
    # system
    device: str = ""                # "" = cuda when available, else cpu
    dtype: str = ""                 # "" = bf16 on cuda, fp32 on cpu; "fp32" | "bf16" | "fp16"
    tf32: bool = True
    channels_last: bool = False     # the trained network and its images in NHWC layout: the demo's 32 px VAE
                                    # step on 2 CPU cores takes 0.20 s instead of 0.25 s (its 8x8 U-Net: no gain)
    attention: str = "sdpa"         # "sdpa" | "triton" | "math"
    seed: int = 0
    # logging and checkpoints
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    sample_every: int = 0           # 0 = never; else a grid of sample_prompts every N steps
    sample_prompts: tuple = ("a dense residential area with many buildings", "green farmland and a river")
    sample_levels: tuple = (17.0, 14.0)
    sample_steps: int = 20
    model: ModelConfig = field(default_factory=ModelConfig)


# ------------------------------------------------------------------------------------------------------
# Configuration: config file + --key=value overrides, type-checked
# ------------------------------------------------------------------------------------------------------
def _parse_value(text, default, key):
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--{key}: expected a boolean, got {text!r}")
    if isinstance(default, (int, float)):
        try:
            value = type(default)(ast.literal_eval(text)) if not isinstance(default, float) else float(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--{key}: expected {type(default).__name__}, got {text!r}") from None
        return value
    if isinstance(default, tuple):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--{key}: expected a tuple like (1, 2), got {text!r}") from None
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return text


def _set(obj, dotted, text, key):
    *path, name = dotted.split(".")
    for p in path:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, p):
            raise ValueError(f"unknown config key --{key}")
        obj = getattr(obj, p)
    if not dataclasses.is_dataclass(obj) or name not in {f.name for f in dataclasses.fields(obj)}:
        raise ValueError(f"unknown config key --{key}")
    setattr(obj, name, _parse_value(text, getattr(obj, name), key))


def parse_config(argv):
    """`--config FILE` then `--key=value ...` -> TrainConfig. Unknown keys in either are errors."""
    cfg = TrainConfig()
    argv = list(argv)
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a file")
        values = vars(load_config(argv[i + 1]))
        del argv[i:i + 2]
        names = {f.name for f in dataclasses.fields(TrainConfig)}
        for k, v in values.items():
            if k not in names:
                raise ValueError(f"config file: unknown key {k!r} (not a TrainConfig field)")
            default = getattr(cfg, k)
            if k != "model" and not isinstance(v, type(default)) and not (isinstance(default, float) and isinstance(v, int)):
                raise ValueError(f"config file: {k} = {v!r} should be {type(default).__name__}")
            setattr(cfg, k, float(v) if isinstance(default, float) else v)
    for arg in argv:
        if not arg.startswith("--") or "=" not in arg:
            raise ValueError(f"arguments are --config FILE and --key=value overrides; got {arg!r}")
        key, text = arg[2:].split("=", 1)
        _set(cfg, key, text, key)
    check_config(cfg)
    return cfg


def check_config(cfg):
    """Values no type check catches; raised as one-line ValueErrors before anything starts."""
    if cfg.train not in ("unet", "vae"):
        raise ValueError(f"--train must be 'unet' or 'vae', got {cfg.train!r}")
    if not cfg.timestep_power > 0:
        raise ValueError(f"timestep_power must be > 0, got {cfg.timestep_power}")
    for key in ("kl_weight", "spectral_weight", "scale_eq_weight"):
        if not getattr(cfg, key) >= 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.freeze_encoder and (cfg.train != "vae" or not cfg.init_from):
        raise ValueError("freeze_encoder fine-tunes a trained VAE's decoder: it needs --train=vae and --init_from")
    if not cfg.max_minutes >= 0:
        raise ValueError(f"max_minutes must be >= 0 (0 = no time budget), got {cfg.max_minutes}")


# ------------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------------
def build_dataset(cfg):
    """A map-style dataset of sample dicts (image (3, H, W) in [-1, 1], caption, level, ...)."""
    from data.datasets import BadDataCounter, CaptionFolder, Git10M, KarpathyCaptions
    from data.transforms import train_transform
    counter = BadDataCounter(max_bad_fraction=cfg.max_bad_fraction)
    tf = train_transform(cfg.image_size)
    if cfg.data == "synthetic":
        from data.synthetic import ProceduralEarth
        return ProceduralEarth(cfg.synthetic_samples, size=cfg.image_size, levels=cfg.synthetic_levels, seed=cfg.seed,
                               integer_levels=cfg.synthetic_integer_levels)
    if not cfg.data_path:
        raise ValueError(f"--data={cfg.data} needs --data_path")
    if cfg.data == "karpathy":
        return KarpathyCaptions(cfg.data_path, split=cfg.data_split, transform=tf, gsd_m=cfg.gsd_m or None,
                                counter=counter, seed=cfg.seed)
    if cfg.data == "folder":
        return CaptionFolder(cfg.data_path, transform=tf, min_quality=cfg.min_quality or None, counter=counter,
                             seed=cfg.seed)
    if cfg.data == "git10m":
        return Git10M(cfg.data_path, split=cfg.data_split, transform=tf, min_quality=cfg.min_quality or None,
                      counter=counter, seed=cfg.seed)
    raise ValueError(f"--data must be synthetic, karpathy, folder, git10m or shards; got {cfg.data!r}")


class Batches:
    """Endless micro-batches for this rank, with a resumable position (epoch, batches into the epoch)."""

    def __init__(self, cfg, rank, world, epoch=0, batch_in_epoch=0):
        from data.datasets import ResumableSampler, collate
        self.cfg, self.rank, self.world = cfg, rank, world
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self.collate = collate
        if cfg.data == "shards":
            from data.shards import ShardDataset
            from data.transforms import train_transform
            self.dataset = ShardDataset(cfg.data_path, rank=rank, world_size=world, seed=cfg.seed,
                                        transform=train_transform(cfg.image_size), batch_size=cfg.batch_size,
                                        min_quality=cfg.min_quality or None)
            self.sampler = None
        else:
            self.dataset = build_dataset(cfg)
            self.sampler = ResumableSampler(len(self.dataset), seed=cfg.seed, rank=rank, world_size=world)
            if self.sampler.num_per_rank < cfg.batch_size:
                raise ValueError(f"{len(self.dataset)} samples: fewer than batch_size={cfg.batch_size} per rank")
        self._start()

    def _start(self):
        if self.sampler is not None:
            self.sampler.set_epoch(self.epoch, start_index=self.batch_in_epoch * self.cfg.batch_size)
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
        else:
            self.dataset.set_epoch(self.epoch, skip_batches=self.batch_in_epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.cfg.batch_size, sampler=self.sampler, drop_last=True,
            num_workers=self.cfg.num_workers, collate_fn=self.collate, persistent_workers=False,
            prefetch_factor=2 if self.cfg.num_workers else None)
        self.iterator = iter(loader)

    def __next__(self):
        """The next batch (None when every sample in it was unreadable; it still counts as consumed)."""
        while True:
            try:
                batch = next(self.iterator)
                self.batch_in_epoch += 1
                return batch
            except StopIteration:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._start()

    def state(self):
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}


# ------------------------------------------------------------------------------------------------------
# Randomness as a function of (seed, step, micro-step), drawn for the global batch: one process with
# batch 2B sees exactly the draws that two processes with batch B see, and a resumed run the same too.
# ------------------------------------------------------------------------------------------------------
def global_slice(rank, world, n):
    """Positions in the global micro-batch of this rank's n samples (ResumableSampler deals perm[rank::world])."""
    return torch.arange(n) * world + rank


# ------------------------------------------------------------------------------------------------------
# Losses
# ------------------------------------------------------------------------------------------------------
def sample_timesteps(num_steps, n, power, g):
    """n integer timesteps in [0, num_steps): uniform for power 1, else floor(num_steps * u ** (1 / power))."""
    if power == 1.0:
        return torch.randint(0, num_steps, (n,), generator=g)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    return (num_steps * u ** (1.0 / power)).long().clamp_(max=num_steps - 1)


def unet_loss(cfg, model, unet, diffusion, batch, g, idx, GB, device, autocast):
    """DCA diffusion loss for one micro-batch: drop text / level, encode, noise, predict.
    g draws for the global micro-batch of GB samples; idx are this rank's positions in it."""
    idx = idx[:len(batch["caption"])]
    drop_text = (torch.rand(GB, generator=g) < cfg.p_text)[idx]
    drop_res = (torch.rand(GB, generator=g) < cfg.p_res)[idx]
    t = sample_timesteps(diffusion.num_steps, GB, cfg.timestep_power, g)[idx]
    captions = ["" if d else c for c, d in zip(batch["caption"], drop_text.tolist())]
    levels = torch.where(drop_res, torch.zeros_like(batch["level"]), batch["level"]).to(device)

    with torch.no_grad():
        if "latent" in batch:
            x0 = batch["latent"].to(device).float()
            noise_shape = x0.shape[1:]
        else:
            post = model.vae.encode(batch["image"].to(device))
            noise_shape = post.mean.shape[1:]
            eps_vae = torch.randn((GB, *noise_shape), generator=g)[idx].to(device)
            x0 = (post.mean + post.std * eps_vae) * model.cfg.vae.scaling_factor
    noise = torch.randn((GB, *noise_shape), generator=g)[idx].to(device)
    with torch.set_grad_enabled(cfg.train_text_encoder), autocast:
        context = model.text_encoder(model.tokenizer(captions).to(device))

    def model_fn(x_t, tt):
        with autocast:
            return unet(x_t, tt.to(device), context, levels if model.cfg.unet.level_embedding else None).float()

    out = diffusion.training_losses(model_fn, x0, t.to(device), noise, prediction=model.cfg.diffusion.prediction,
                                    min_snr_gamma=cfg.min_snr_gamma or None)
    return out["loss"].mean(), {"mse": out["mse"].mean().item()}


def vae_loss(cfg, vae, batch, g, idx, GB, device, autocast):
    """L1 reconstruction (summed over pixels) + kl_weight * KL (summed over the latent), both per image,
    normalised by the pixel count so the learning rate does not depend on image size (LDM's recipe without
    the perceptual and adversarial terms, whose weights cannot be downloaded here).

    spectral_weight > 0 adds a stand-in for those terms: the L1 distance between the amplitude spectra
    (orthonormal 2-D FFT per channel) of reconstruction and image. Pixel L1 alone rewards a blur where the
    decoder is unsure of a texture's phase; the amplitude term asks for the texture's energy at each spatial
    frequency, wherever it sits, and the scale of a texture is what tells the map level apart.

    scale_eq_weight > 0 adds the L1 distance between the decoding of the 2x2-averaged latent and the 2x2-averaged
    image (scale equivariance: Kouzelis et al. 2025, Skorokhodov et al. 2025), so that the latents hold no
    detail finer than the image's own, which is said to make them easier to diffuse."""
    x = batch["image"].to(device)                                                # B, 3, H, W
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    idx = idx[:x.shape[0]]
    vcfg = (vae.module if isinstance(vae, DDP) else vae).cfg
    f = 2 ** (len(vcfg.channels) - 1)
    eps = torch.randn((GB, vcfg.latent_channels, x.shape[2] // f, x.shape[3] // f), generator=g)[idx].to(device)
    with autocast:
        recon, post = vae(x, noise=eps)                                          # through DDP's forward
    rec = (recon.float() - x).abs().flatten(1).mean(1)                          # B
    kl = post.kl().float() / x[0].numel()                                        # B
    loss, stats = rec + cfg.kl_weight * kl, {"l1": rec.mean().item(), "kl": kl.mean().item()}
    if cfg.scale_eq_weight > 0:
        z = post.mean + post.std * eps                                           # the latent that was decoded
        with autocast:
            small = (vae.module if isinstance(vae, DDP) else vae).decode(F.avg_pool2d(z, 2))
        eq = (small.float() - F.avg_pool2d(x, 2)).abs().flatten(1).mean(1)      # B
        loss, stats["scale_eq"] = loss + cfg.scale_eq_weight * eq, eq.mean().item()
    if cfg.spectral_weight > 0:
        amplitude = lambda y: torch.fft.rfft2(y.float(), norm="ortho").abs()      # B, 3, H, W // 2 + 1
        spec = (amplitude(recon) - amplitude(x)).abs().flatten(1).mean(1)       # B
        loss, stats["spectral"] = loss + cfg.spectral_weight * spec, spec.mean().item()
    return loss.mean(), stats


def zero_residual_branches(model):
    """The last layer of each residual branch (the second conv of every U-Net and VAE res-block, the output
    projection of every U-Net transformer) set to zero, so every block starts as the identity and the network
    as a shallow one: LDM's initialisation of its U-Net, here for the VAE too. Returns how many layers it zeroed.

    Off by default (TrainConfig.zero_init): on the demo's 1200-step VAE it moved the held-out L1 from 0.0584 /
    0.0623 / 0.0671 to 0.0623 / 0.0575 / 0.0634 (seeds 0 / 1 / 2), another draw; with AdamW's beta2 at 0.99 it
    gave the best VAEs measured (0.0506 / 0.0557 on seeds 0 / 2), whose latents a 600-step U-Net nevertheless
    learnt no better (docs/demo.md, session 9)."""
    from model import unet, vae
    n = 0
    for m in model.modules():
        if isinstance(m, (unet.ResBlock, vae.ResBlock)):
            last = m.conv2
        elif isinstance(m, attention.SpatialTransformer):
            last = m.proj_out
        else:
            continue
        torch.nn.init.zeros_(last.weight)
        torch.nn.init.zeros_(last.bias)
        n += 1
    return n


# ------------------------------------------------------------------------------------------------------
# Checkpoints: atomic, last K kept, resumable
# ------------------------------------------------------------------------------------------------------
def checkpoint_paths(out_dir):
    return sorted(Path(out_dir).glob("ckpt_*.pt"))


def checkpoint_step(path):
    """The step a checkpoint was written at, from its name (save_checkpoint's)."""
    return int(Path(path).stem.removeprefix("ckpt_"))


def save_checkpoint(out_dir, state, keep_last):
    path = Path(out_dir) / f"ckpt_{state['step']:09d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)                                   # atomic: a crash leaves the old or the new file
    for old in checkpoint_paths(out_dir)[:-keep_last]:
        old.unlink()
    return path


def finished(cfg):
    """Whether cfg's run has reached its end (max_steps, or its max_minutes), i.e. was not stopped."""
    ckpts = checkpoint_paths(cfg.out_dir)
    if not ckpts:
        return False
    if checkpoint_step(ckpts[-1]) >= cfg.max_steps:
        return True
    return bool(torch.load(ckpts[-1], map_location="cpu", weights_only=True, mmap=True).get("finished", False))


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def lr_at(cfg, step, total=None):
    """Learning rate of `step` in a run of `total` steps (default cfg.max_steps; plan_steps' under max_minutes)."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_decay == "cosine":
        progress = min(1.0, step / max(1, cfg.max_steps if total is None else total))
        return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
    return cfg.lr * warm


PACE_WINDOW = 50          # max_minutes: the pace is that of the last PACE_WINDOW steps (steps and checkpoints)
PACE_MIN_STEPS = 10       # and is not trusted before this many steps of the run (or of its resume) have passed


def plan_steps(cfg, step, spent, pace):
    """The run's length under a time budget: at `step`, with `spent` seconds of training behind it and `pace`
    seconds a step measured lately, the steps that fit in cfg.max_minutes (at least `step`, at most max_steps)."""
    left = cfg.max_minutes * 60 - spent
    return max(step, min(cfg.max_steps, step + int(left // max(pace, 1e-9))))


def average_grads(params, world):
    """Average the gradients of `params` over the processes with one all-reduce of their concatenation: one
    collective per tensor costs ~1 ms over gloo (2 CPU cores: 53 ms for 50 small tensors). Parameters without
    a gradient (unused) keep none, as in one process; every rank runs the same model, so has the same set."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def flops_per_image(unet, cfg, device):
    """Training FLOPs per image of the U-Net (forward + backward = 3x forward), counted on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    c = unet.cfg
    with torch.device("meta"):
        m = UNet(c)
    f = 2 ** (len(cfg.model.vae.channels) - 1)
    s = cfg.image_size // f
    x = torch.zeros(1, c.in_channels, s, s, device="meta")
    ctx = torch.zeros(1, cfg.model.text.context_length, c.context_dim, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        m(x, torch.zeros(1, device="meta"), ctx, torch.zeros(1, device="meta") if c.level_embedding else None)
    return 3 * counter.get_total_flops()


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40": 362.0, "4090": 165.0}  # dense bf16


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------
def train(cfg: TrainConfig, on_step=None):
    """Train (or resume) the stage cfg.train; returns (model, ema). on_step(step), if given, is called after
    every optimiser step (demo.py hands the U-Net a second CPU core back through it). SIGINT or SIGTERM stop
    the run at the end of a step, with a checkpoint (finished(cfg) tells); the caller's handlers come back after."""
    stop = {"now": False}
    def on_signal(signum, frame):
        stop["now"] = True
    handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        return _train(cfg, on_step, stop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _train(cfg, on_step, stop):
    check_config(cfg)
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if ddp:
        use_cuda = torch.cuda.is_available() and cfg.device != "cpu"
        dist.init_process_group("nccl" if use_cuda else "gloo")
        rank, world = dist.get_rank(), dist.get_world_size()
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(device)
    else:
        rank, world = 0, 1
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    main = rank == 0
    logging.basicConfig(level=logging.INFO if main else logging.WARNING, format="%(asctime)s %(message)s")
    dtype = {"": torch.bfloat16 if device.type == "cuda" else torch.float32, "fp32": torch.float32,
             "bf16": torch.bfloat16, "fp16": torch.float16}[cfg.dtype]
    if cfg.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    attention.set_backend(cfg.attention)
    out_dir = Path(cfg.out_dir)
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)

    # Model: resume > init_from > scratch. Every rank builds the same weights (same seed).
    ckpts = checkpoint_paths(out_dir) if cfg.resume else []
    resume = load_checkpoint(ckpts[-1]) if ckpts else None
    torch.manual_seed(cfg.seed)
    if resume is not None:
        model = Text2Earth(ModelConfig.from_dict(resume["model_config"]))
        model.load_state_dict(resume["model"])
    elif cfg.init_from:
        model = load_weights(cfg.init_from)
    else:
        model = Text2Earth(cfg.model)
        if cfg.zero_init:
            zero_residual_branches(model)
    model.unet.cfg.gradient_checkpointing = cfg.model.unet.gradient_checkpointing   # a run-time choice, not stored
    model.to(device)
    trainable = model.unet if cfg.train == "unet" else model.vae
    if cfg.channels_last:
        trainable.to(memory_format=torch.channels_last)            # before the EMA copy and the optimizer
    model.requires_grad_(False).eval()                                # frozen parts stay in eval mode
    trainable.requires_grad_(True).train()
    if cfg.train == "vae" and cfg.freeze_encoder:                   # decoder-only fine-tuning: the latent space stays
        for part in (model.vae.encoder, model.vae.quant_conv):
            part.requires_grad_(False).eval()
    if cfg.train_text_encoder:
        model.text_encoder.requires_grad_(True).train()
    params = [p for p in model.parameters() if p.requires_grad]
    averaged = torch.nn.ModuleDict({"trained": trainable})       # what the EMA tracks and export() swaps in
    if cfg.train_text_encoder:
        averaged["text_encoder"] = model.text_encoder
    ema = copy.deepcopy(averaged).requires_grad_(False).eval()
    decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=cfg.betas, eps=cfg.adam_eps,
                            fused=device.type in ("cuda", "cpu"))   # one kernel, not a loop over tensors:
    # on 2 CPU cores the demo's U-Net + text tower step takes 0.24-0.28 s instead of 0.34 s
    step, data_state, spent = 0, {"epoch": 0, "batch_in_epoch": 0}, 0.0     # spent: earlier runs' training seconds
    if resume is not None:
        ema.load_state_dict(resume["ema"])
        opt.load_state_dict(resume["optimizer"])
        if len(resume["data"]) != world:
            raise ValueError(f"{ckpts[-1]} was written by {len(resume['data'])} processes; resume with the same "
                             f"world size (now {world}) for an exact data position")
        step, data_state, spent = resume["step"], resume["data"][rank], resume.get("train_seconds", 0.0)
        log.info("resumed from %s at step %d", ckpts[-1], step)
    net = DDP(trainable, device_ids=[device] if device.type == "cuda" else None) if ddp else trainable
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    diffusion = Diffusion.from_config(model.cfg.diffusion)
    batches = Batches(cfg, rank, world, **data_state)

    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(out_dir / "tb")
        (out_dir / "config.json").write_text(json.dumps(dataclasses.asdict(cfg), indent=1, default=str))
        n_params = sum(p.numel() for p in params)
        log.info("training %s: %.2f M params, global batch %d (%d x %d accum x %d procs), %s %s",
                 cfg.train, n_params / 1e6, cfg.batch_size * cfg.grad_accum * world, cfg.batch_size,
                 cfg.grad_accum, world, device, dtype)
    flops = flops_per_image(model.unet, cfg, device) if cfg.train == "unet" else 0
    peak = next((v for k, v in PEAK_TFLOPS.items() if device.type == "cuda" and k in torch.cuda.get_device_name(device)), None)

    def checkpoint_state():
        datas = [None] * world
        if ddp:
            dist.all_gather_object(datas, batches.state())
        else:
            datas = [batches.state()]
        return {"step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                "model_config": model.cfg.to_dict(), "train_config": json.loads(json.dumps(dataclasses.asdict(cfg), default=str)),
                "data": datas, "torch_rng": torch.get_rng_state(),
                "train_seconds": seconds(), "planned_steps": total, "finished": step >= total}

    def save():
        state = checkpoint_state()                          # collective: every rank takes part
        if main:
            path = save_checkpoint(out_dir, state, cfg.keep_last)
            export(model, ema, averaged, out_dir / "model.safetensors", step)
            log.info("saved %s", path)

    # The run's length: max_steps, or under a time budget the steps that the pace of the last PACE_WINDOW steps
    # leaves time for, re-planned every log_every steps (the cosine decay follows the plan).
    total = cfg.max_steps
    if cfg.max_minutes and spent >= cfg.max_minutes * 60:
        total = step                                          # the budget is spent
    elif cfg.max_minutes and resume is not None and resume.get("planned_steps", 0) > step:
        total = min(cfg.max_steps, resume["planned_steps"])  # the plan it stopped with, until re-planned
    t_run = time.perf_counter()

    def seconds():                                            # training time of this run, resumes included
        return spent + time.perf_counter() - t_run

    step_ends = collections.deque([t_run], maxlen=PACE_WINDOW + 1)
    bar = tqdm(total=total, initial=step, disable=not main, desc=f"train {cfg.train}")
    t_last, imgs_since = time.perf_counter(), 0
    loss = torch.tensor(float("nan"))                         # logged as nan while no batch has been readable
    while step < total:
        lr = lr_at(cfg, step, total)
        for group in opt.param_groups:
            group["lr"] = lr
        stats = {}
        for micro in range(cfg.grad_accum):
            batch = next(batches)
            g = sample_generator(cfg.seed, step, micro)      # randomness of this global micro-batch
            if batch is None:                                 # every sample unreadable: counted, skipped
                continue
            idx, GB = global_slice(rank, world, cfg.batch_size), cfg.batch_size * world
            sync = micro == cfg.grad_accum - 1 or not ddp
            with (net.no_sync() if not sync else contextlib.nullcontext()):
                if cfg.train == "unet":
                    loss, stats = unet_loss(cfg, model, net, diffusion, batch, g, idx, GB, device, autocast)
                else:
                    loss, stats = vae_loss(cfg, net, batch, g, idx, GB, device, autocast)
                scaler.scale(loss / cfg.grad_accum).backward()
            imgs_since += len(batch["caption"])
        if ddp and cfg.train_text_encoder:                    # outside DDP's module: average its grads by hand
            average_grads(model.text_encoder.parameters(), world)
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():                                 # EMA (parameters are identical on every rank)
            d = min(cfg.ema_decay, (1 + step) / (10 + step))
            torch._foreach_lerp_(list(ema.parameters()), list(averaged.parameters()), 1 - d)
        step += 1
        bar.update(1)
        if on_step is not None:
            on_step(step)
        step_ends.append(time.perf_counter())
        if cfg.max_minutes and step % cfg.log_every == 0 and len(step_ends) > PACE_MIN_STEPS:
            pace = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
            total = plan_steps(cfg, step, seconds(), pace)
            if ddp:                                           # every rank runs rank 0's plan
                planned = torch.tensor([total], device=device)
                dist.broadcast(planned, 0)
                total = int(planned.item())
            bar.total = total

        if main and step % cfg.log_every == 0:
            dt = time.perf_counter() - t_last
            ips = imgs_since * world / dt
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            writer.add_scalar("loss", loss.item(), step)
            for k, v in stats.items():
                writer.add_scalar(k, v, step)
            writer.add_scalar("lr", lr, step)
            writer.add_scalar("grad_norm", grad_norm.item(), step)
            writer.add_scalar("images_per_s", ips, step)
            if flops and peak:
                writer.add_scalar("mfu", ips / world * flops / (peak * 1e12), step)
            t_last, imgs_since = time.perf_counter(), 0
        if main and cfg.sample_every and step % cfg.sample_every == 0 and cfg.train == "unet":
            sample_grid(model, ema["trained"], cfg, out_dir / "samples" / f"step_{step:09d}.png", writer, step)
        stop_now = stop["now"]
        if ddp:                                               # all ranks stop at the same step
            flag = torch.tensor([float(stop_now)], device=device)
            dist.all_reduce(flag)
            stop_now = flag.item() > 0
        if step % cfg.ckpt_every == 0 or step >= total or stop_now:
            save()
        if stop_now:
            log.info("stopped by signal at step %d; resume with the same command", step)
            break
    bar.close()
    if cfg.train == "vae" and main and step >= total:
        if not cfg.freeze_encoder:                              # a frozen encoder keeps its latents' scale
            set_latent_scale(model, ema["trained"], batches, device)
        export(model, ema, averaged, out_dir / "model.safetensors", step)
    if writer is not None:
        writer.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    return model, ema


def export(model, ema, averaged, path, step):
    """The whole model with the EMA weights in the trained parts, as one of our safetensors checkpoints."""
    live = copy.deepcopy(averaged.state_dict())
    averaged.load_state_dict(ema.state_dict())
    try:
        save_model(model, path, metadata={"step": step})
    finally:
        averaged.load_state_dict(live)


@torch.no_grad()
def set_latent_scale(model, ema_vae, batches, device, n_batches=4):
    """After VAE training: scaling_factor = 1 / std(latents of the EMA VAE), as SD chose 0.18215 for its VAE."""
    zs = []
    for _ in range(n_batches):
        batch = next(batches)
        if batch is not None:
            zs.append(ema_vae.encode(batch["image"].to(device)).mean.flatten())
    model.cfg.vae.scaling_factor = float(1.0 / torch.cat(zs).std())
    model.vae.cfg.scaling_factor = model.cfg.vae.scaling_factor
    log.info("latent scaling factor set to %.4f", model.cfg.vae.scaling_factor)


@torch.no_grad()
def sample_grid(model, ema, cfg, path, writer, step):
    from sample import generate, make_grid, to_pil
    prompts, levels = list(cfg.sample_prompts), list(cfg.sample_levels)
    images = generate(model, prompts, levels, seeds=list(range(len(prompts))), steps=cfg.sample_steps,
                      size=(cfg.image_size, cfg.image_size), unet=ema)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid([to_pil(im) for im in images], cols=len(images)).save(path)
    writer.add_images("samples", (images + 1) / 2, step)


def main(argv=None):
    try:
        cfg = parse_config(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
