"""Conditioning probes: a small CNN that reads scene class and Google map level off an image.

Trained on procedural Earth images (data/synthetic/), it scores generated images for
    text adherence     -- accuracy of the class the prompt asked for, and
    resolution control -- accuracy of the level asked for (exact, and within +-1 level).

    images, labels, levels = make_probe_data(4000, size=64, seed=0)
    probe = train_probe((images, labels, levels), steps=1000, batch_size=64, lr=3e-3, seed=0)
    # class_acc, level_acc, level_acc_pm1, level_corr
    evaluate_probe(probe, gen_images, asked_labels, asked_levels)
    save_probe(probe, "probe.safetensors", {"recipe": ...}); probe = load_probe("probe.safetensors")

The level head classifies the integer levels (9 for 10..18) rather than regressing them: on held-out
renders after 400 steps, classification reads 43% exact / 73% within +-1, regression + rounding
31% / 70%. Training augments with the 8 symmetries of the square (overhead imagery has no up) and,
on half the images, a mild blur: VAE-decoded images are softer than renders, and the renderer's
sharpness at pixel scale would otherwise be a cheap cue for the level; blurred copies make the level
head judge object scale. With blur, class accuracy on blurred test images fell 1 point instead of 4.
Shapes: B batch, C channels, H, W spatial (64, or 32 and up: the heads sit on a global pooling).
"""

import json
import math
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from data.synthetic import CLASSES, sample
from model.release import WeightsError, read_tensors
from model.weights import load_state_strict, read_metadata, write_tensors


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
class ConvBlock(nn.Module):
    """conv3x3-BN-ReLU twice; the first conv strides when `stride` > 1."""

    def __init__(self, in_ch, out_ch, stride):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
        )

    def forward(self, x):
        return self.net(x)


class Probe(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> class logits (B, num_classes), level logits (B, num_levels).

    Levels are the integers levels[0]..levels[1]; `predict_level` maps logits back to levels."""

    def __init__(self, num_classes=len(CLASSES), levels=(10, 18), width=16):
        super().__init__()
        lo, hi = int(levels[0]), int(levels[1])
        if lo != levels[0] or hi != levels[1] or lo > hi:
            raise ValueError(f"levels must be integers (min, max) with min <= max, got {levels}")
        self.num_classes, self.levels, self.width = num_classes, (lo, hi), width
        w = width
        self.features = nn.Sequential(
            # (B, w, H/2, W/2): a stride-2 3x3 stem still sees every pixel, at a quarter of the cost
            nn.Conv2d(3, w, 3, 2, 1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, 1, 1, bias=False),
            nn.BatchNorm2d(w),
            nn.ReLU(inplace=True),
            ConvBlock(w, 2 * w, 2),  # (B, 2w, H/4, W/4)
            ConvBlock(2 * w, 4 * w, 2),
        )  # (B, 4w, H/8, W/8)
        # heads read the mean and the standard deviation of each feature over the image: the spread
        # is a texture statistic (how often a pattern fires), worth ~2 points of level accuracy
        self.class_head = nn.Linear(8 * w, num_classes)
        self.level_head = nn.Linear(8 * w, hi - lo + 1)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"Probe expects images (B, 3, H, W), got shape {tuple(x.shape)}")
        if min(x.shape[-2:]) < 16:
            raise ValueError(
                f"Probe expects images of at least 16x16 pixels, got {tuple(x.shape[-2:])}"
            )
        f = self.features(x)  # (B, 4w, H/8, W/8)
        h = torch.cat([f.mean((-2, -1)), f.std((-2, -1))], 1)  # (B, 8w) global mean and std pool
        return self.class_head(h), self.level_head(h)  # (B, classes), (B, levels)

    def predict_level(self, level_logits):
        """Integer levels (B,) of the most likely level bin."""
        return level_logits.argmax(-1) + self.levels[0]

    @torch.no_grad()
    def predict(self, images, batch_size=256):
        """Predicted (class (N,), level (N,)) int64 for images (N, 3, H, W) in
        [-1, 1], in eval mode."""
        was_training = self.training
        self.eval()
        cls, lev = [], []
        for i in range(0, len(images), batch_size):
            c, lv = self(images[i : i + batch_size].float())
            cls.append(c.argmax(-1))
            lev.append(self.predict_level(lv))
        self.train(was_training)
        return torch.cat(cls), torch.cat(lev)


# ----------------------------------------------------------------------------------------------
# Data: procedural renders at integer levels
# ----------------------------------------------------------------------------------------------
def make_probe_data(n, size=64, seed=0, levels=(10, 18), integer_levels=True):
    """n procedural renders: images (N, 3, H, W) float32 in [-1, 1], labels (N,) int64, levels (N,).

    Class i % 12 and, with integer_levels, level lo + (i // 12) % (hi - lo + 1), so every 108
    samples hold each (class, level) pair once; levels are float32 (integer-valued, or uniform in
    [lo, hi] when integer_levels=False). Scenes are seeded from (seed, i): disjoint seeds give
    disjoint scenes."""
    if n <= 0 or size < 16:
        raise ValueError(f"n must be positive and size >= 16, got n={n}, size={size}")
    lo, hi = levels
    if integer_levels and (int(lo) != lo or int(hi) != hi):
        raise ValueError(f"integer_levels needs integer level bounds, got {levels}")
    images = np.empty((n, size, size, 3), np.uint8)
    labels, levs = np.empty(n, np.int64), np.empty(n, np.float32)
    for i in range(n):
        rng = np.random.default_rng([int(seed), i, 7])
        scene_seed = int(rng.integers(1 << 62))
        if integer_levels:
            level = float(int(lo) + (i // len(CLASSES)) % (int(hi) - int(lo) + 1))
        else:
            level = float(rng.uniform(lo, hi))
        s = sample(scene_seed, level, size, cls=i % len(CLASSES))
        images[i], labels[i], levs[i] = s["image"], s["label"], s["level"]
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)
    return x.contiguous(), torch.from_numpy(labels), torch.from_numpy(levs)


def _as_tensors(data):
    """(images, labels, levels) from a tuple of tensors or a dataset of dicts
    (image, label, level)."""
    if isinstance(data, (tuple, list)) and len(data) == 3:
        images, labels, levels = (torch.as_tensor(t) for t in data)
    else:
        items = [data[i] for i in range(len(data))]
        images = torch.stack([it["image"] for it in items])
        labels = torch.tensor([int(it["label"]) for it in items])
        levels = torch.tensor([float(it["level"]) for it in items])
    _check(images, labels, levels)
    return images.float(), labels.long(), levels.float()


def _check(images, labels, levels):
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (N, 3, H, W), got shape {tuple(images.shape)}")
    n = images.shape[0]
    if labels.shape != (n,) or levels.shape != (n,):
        raise ValueError(
            f"labels and levels must be (N,) = ({n},), got {tuple(labels.shape)} and "
            f"{tuple(levels.shape)}"
        )


# ----------------------------------------------------------------------------------------------
# Augmentation: symmetries of the square, mild blur, sensor noise
# ----------------------------------------------------------------------------------------------
# half the batch blurred, sigma in pixels: VAE decodes lose ~1 px detail
BLUR_P, BLUR_SIGMA = 0.5, (0.3, 1.2)
NOISE_STD = 0.03  # up to ~4 grey levels of 255


def blur(x, sigma):
    """Separable gaussian blur of x (B, C, H, W) with one sigma (pixels), reflect-padded."""
    C = x.shape[1]
    r = max(1, math.ceil(3 * sigma))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).repeat(C, 1)[:, None]  # (C, 1, K)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k[:, :, None, :], groups=C)  # along W
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k[:, :, :, None], groups=C)  # along H


def augment(x, gen):
    """Random dihedral symmetry, blur on BLUR_P of the images (one sigma per batch), small gaussian
    noise; x (B, 3, H, W) -> (B, 3, H, W)."""
    B = x.shape[0]

    def flip(m, y, f):
        return torch.where(m[:, None, None, None], f(y), y)

    u = torch.rand(B, 3, generator=gen) < 0.5
    x = flip(u[:, 0], x, lambda y: y.transpose(-1, -2))  # with the two flips: all 8 symmetries
    x = flip(u[:, 1], x, lambda y: y.flip(-1))
    x = flip(u[:, 2], x, lambda y: y.flip(-2))
    sigma = BLUR_SIGMA[0] + (BLUR_SIGMA[1] - BLUR_SIGMA[0]) * torch.rand((), generator=gen).item()
    pick = (torch.rand(B, generator=gen) < BLUR_P).nonzero()[:, 0]
    if BLUR_P > 0 and len(pick):
        x = x.clone()
        x[pick] = blur(x[pick], sigma)
    std = NOISE_STD * torch.rand(B, 1, 1, 1, generator=gen)
    return (x + std * torch.randn(x.shape, generator=gen)).clamp(-1, 1)


# ----------------------------------------------------------------------------------------------
# Training and evaluation
# ----------------------------------------------------------------------------------------------
def train_probe(
    data,
    steps=1000,
    batch_size=64,
    lr=3e-3,
    seed=0,
    progress=False,
    levels=(10, 18),
    width=16,
    num_classes=len(CLASSES),
    threads=None,
):
    """Train a Probe on `data`: (images (N, 3, H, W) in [-1, 1], labels (N,), levels (N,)) or a
    dataset of dicts with image, label, level (e.g. ProceduralEarth). Levels are rounded to the
    nearest integer and clamped to `levels`. AdamW with a one-cycle schedule; loss = class
    CE + level CE. Deterministic for a seed (given the same torch thread count). `threads` sets
    torch's intra-op threads for the call (restored after): 1 is fastest when other processes share
    the cores, since OpenMP threads that wait on each other stall when descheduled. Returns
    the probe in eval mode."""
    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _train(data, steps, batch_size, lr, seed, progress, levels, width, num_classes)
    finally:
        torch.set_num_threads(old_threads)


def _train(data, steps, batch_size, lr, seed, progress, levels, width, num_classes):
    images, labels, levs = _as_tensors(data)
    lo, hi = int(levels[0]), int(levels[1])
    level_idx = (levs.round().clamp(lo, hi) - lo).long()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # weight init
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    probe = Probe(num_classes, (lo, hi), width)
    probe.train()
    opt = torch.optim.AdamW(probe.parameters(), lr=lr, weight_decay=5e-4, fused=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    n, t0 = len(images), time.perf_counter()
    perm, pos = torch.randperm(n, generator=g), 0
    for step in range(steps):
        if pos + batch_size > n:
            perm, pos = torch.randperm(n, generator=g), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        x = augment(images[idx], g)
        cls_logits, lev_logits = probe(x)
        loss = F.cross_entropy(cls_logits, labels[idx]) + F.cross_entropy(
            lev_logits, level_idx[idx]
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step % 100 == 0 or step == steps - 1):
            print(f"probe step {step:5d}  loss {loss.item():.3f}  {time.perf_counter() - t0:.1f}s")
    return probe.eval()


@torch.no_grad()
def evaluate_probe(probe, images, labels, levels):
    """Accuracies of the probe on images (N, 3, H, W) in [-1, 1] against the asked-for labels (N,)
    and levels (N,) (rounded to integers): dict(class_acc, level_acc, level_acc_pm1, level_corr) as
    floats. level_corr is the Pearson correlation of the levels read with the levels asked: it shows
    a level trend even where the reading is biased (0 when either does not vary, ~0 for a floor)."""
    images, labels, levels = (
        torch.as_tensor(images),
        torch.as_tensor(labels),
        torch.as_tensor(levels),
    )
    _check(images, labels, levels)
    if len(images) == 0:
        raise ValueError("evaluate_probe needs at least one image")
    cls, lev = probe.predict(images)
    asked = levels.float().round()
    err = (lev - asked.long()).abs()
    a, b = lev.double() - lev.double().mean(), asked.double() - asked.double().mean()
    denom = (a.square().sum() * b.square().sum()).sqrt()
    return dict(
        class_acc=(cls == labels.long()).float().mean().item(),
        level_acc=(err == 0).float().mean().item(),
        level_acc_pm1=(err <= 1).float().mean().item(),
        level_corr=(a * b).sum().div(denom).item() if denom > 0 else 0.0,
    )


def fit_probe(size, n_train, steps, through=None, n_held=540, seed=0, pace_deadline=None):
    """The conditioning probe of a text-to-image model whose images come out of a decoder: trained
    on n_train procedural renders (make_probe_data seed 1), half of them passed through `through`
    (images -> images, e.g. a VAE's encode-decode) so that it judges content, not the decoder's
    softness; scored on n_held held-out renders (seed 2), as rendered (its ceiling) and through
    `through`. pace_deadline (a time.time()): fewer steps if `steps` would not end by then, from the
    pace of a 20-step trial (at least 200). Returns (probe, {row name: figures}, steps trained)."""
    images, labels, levels = make_probe_data(n=n_train, size=size, seed=1)
    held = make_probe_data(n=n_held, size=size, seed=2)
    through = through or (lambda x: x)
    half = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[
        : len(images) // 2
    ]
    images[half] = through(images[half])
    if pace_deadline is not None:
        t = time.time()
        train_probe((images, labels, levels), steps=20, batch_size=64, seed=seed)
        steps = max(200, min(steps, int((pace_deadline - time.time()) / ((time.time() - t) / 20))))
    probe = train_probe((images, labels, levels), steps=steps, batch_size=64, seed=seed)
    results = {
        "real procedural images (ceiling)": evaluate_probe(probe, *held),
        "real images through the VAE": evaluate_probe(probe, through(held[0]), *held[1:]),
    }
    return probe, results, steps


# ----------------------------------------------------------------------------------------------
# Files: a safetensors state dict, the architecture and what the caller records in its metadata
# ----------------------------------------------------------------------------------------------
def save_probe(probe, path, info=None):
    """Write the probe atomically: its weights and BatchNorm statistics, its architecture, and
    `info` (a JSON-able dict: its recipe and measured figures), which load_probe_info reads back."""
    arch = {"num_classes": probe.num_classes, "levels": list(probe.levels), "width": probe.width}
    write_tensors(
        path,
        probe.state_dict(),
        {"format": "text2earth-probe", "probe": json.dumps(arch), "info": json.dumps(info or {})},
    )


def load_probe_info(path):
    """The `info` dict save_probe wrote."""
    meta = read_metadata(path)
    if meta.get("format") != "text2earth-probe":
        raise WeightsError(
            f"{path}: not a probe file (no format 'text2earth-probe' in its safetensors metadata)"
        )
    return json.loads(meta.get("info", "{}"))


def load_probe(path):
    """A probe written by save_probe, in eval mode."""
    load_probe_info(path)  # the format check
    arch = json.loads(read_metadata(path)["probe"])
    probe = Probe(arch["num_classes"], tuple(arch["levels"]), arch["width"])
    load_state_strict(probe, read_tensors(path), path)
    return probe.eval()
