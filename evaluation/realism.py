"""Realism without downloaded networks: a classifier two-sample test, and FID / KID in the feature
space of a small CNN trained from scratch on the real training split.

    real = FilesAsTrained(test_paths, 64)          # as the training images were made
    fake = ImageFiles(generated_paths)              # evaluation/testset.py

    # C2ST (Lopez-Paz & Oquab 2017): how well does a small CNN tell generated images from real ones?
    r = two_sample_accuracy(real, fake, size=64)   # 0.5: indistinguishable, 1.0: told apart
    r["accuracy"], r["stderr"], r["interval"], r["n_real"], r["n_fake"]

    # FID / KID in the pooled features of a CNN trained on the real training split's scene classes
    net = train_feature_net(FilesAsTrained(train_paths, 64), train_labels, num_classes=21, size=64)
    feature_distances(net, real, fake)              # fid, kid, kid_std, n_real, n_fake, dim
    save_feature_net(net, "realism_net.safetensors", {"recipe": ...})
    net, info = load_feature_net("realism_net.safetensors")

Both read every image at one size: resized to `size` (bilinear, antialiased) where it differs,
then rounded to 8-bit levels, real and generated alike, so that storage precision is no cue. Real
image files are best read as the training data was made (FilesAsTrained), at the generated size.

Choices, measured on UCM-Captions at 64 px (210 real test + val images against 210 others, blurred
or not; 2 CPU cores). The two-sample test's Critic of width 8 is as sensitive as width 16 and as a
from-scratch ResNet-18 (with two folds, a 0.5 px Gaussian blur told apart at 0.72, 0.72 and 0.68,
a 1 px blur at 0.95 for all three) at half and a twentieth of their cost. Training is a number
of steps, not epochs: 10 epochs of 315 images are 40 steps, which told a 1 px blur apart at 0.55,
200 steps at 0.97. Four folds, not two: with two, the held-out half is the complement of the
training half, so content that one over-represents the other under-represents, and two halves of
the real set scored 0.45-0.53 (sd 0.035 over seeds); with four, 0.46-0.54 (sd 0.026 over 11
splits and seeds, the binomial 0.024). The feature net's 128 features (width 16) stay below the
few hundred images of a test set, as FID's covariance needs; width 32 (256 features) read the
classes a little better (0.69 against 0.63-0.66) and ranked the degradations alike.

Images are float tensors (3, H, W) in [-1, 1]; an image set is any indexable of them (a tensor
(N, 3, H, W), ImageFiles). Shapes: B batch, C channels, H, W spatial, N images, D features.
"""

import json
import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from data.transforms import eval_transform
from evaluation import metrics
from model.release import WeightsError, read_tensors
from model.weights import load_state_strict, read_metadata, write_tensors

FORMAT = "text2earth-realism-net"  # the safetensors metadata format of save_feature_net's files


# ----------------------------------------------------------------------------------------------
# Images: one size, 8-bit levels
# ----------------------------------------------------------------------------------------------
def to_grid(images, size):
    """An image set (N of (3, H, W) in [-1, 1]) -> float32 (N, 3, size, size): each image resized
    bilinearly with antialiasing when its size differs, clamped, and rounded to the 256 levels of
    an 8-bit image."""
    out = torch.empty(len(images), 3, size, size)
    for i in range(len(images)):
        x = torch.as_tensor(images[i]).float()
        if x.ndim != 3 or x.shape[0] != 3:
            raise ValueError(f"image {i} must be (3, H, W), got shape {tuple(x.shape)}")
        if tuple(x.shape[1:]) != (size, size):
            x = F.interpolate(
                x[None], (size, size), mode="bilinear", antialias=True, align_corners=False
            )[0]
        out[i] = ((x.clamp(-1, 1) + 1) * 127.5).round() / 127.5 - 1
    return out


class FilesAsTrained(torch.utils.data.Dataset):
    """Image files read lazily as the training data was made (data.transforms.eval_transform: the
    shorter side resized to `size` by PIL's bicubic, then a centre crop): the real set to compare
    generated images of that size with. A different resize is itself a cue: the same UCM test
    images read by torch's antialiased bilinear resize were told from PIL-bicubic ones at 0.58."""

    def __init__(self, paths, size):
        self.paths, self.transform = list(paths), eval_transform(size)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


def dihedral(x, gen):
    """Each image of x (B, C, H, W) under one of the 8 symmetries of the square, drawn from `gen`:
    exact pixel permutations (overhead imagery has no up), applied to both sets alike."""
    u = torch.rand(len(x), 3, generator=gen) < 0.5

    def where(m, y):
        return torch.where(m[:, None, None, None], y, x)

    x = where(u[:, 0], x.transpose(-1, -2))
    x = where(u[:, 1], x.flip(-1))
    return where(u[:, 2], x.flip(-2))


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
def _conv(in_ch, out_ch, stride):
    return [nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU()]


class Critic(nn.Module):
    """Image (B, 3, H, W) in [-1, 1] -> logits (B, outputs): six conv3x3-BN-ReLU layers of width
    w, w, 2w, 2w, 4w, 4w, striding by 2 at the first, third and fifth, then the mean and the
    standard deviation of each channel over the image (B, 8w) and a linear head. The spread of a
    feature over the image is a texture statistic (how sharp, how noisy); `features` returns
    the pooled (B, 8w)."""

    def __init__(self, outputs, width=16):
        super().__init__()
        self.outputs, self.width = outputs, width
        w = width
        self.body = nn.Sequential(
            *_conv(3, w, 2),  # (B, w, H/2, W/2): a stride-2 3x3 still sees every pixel
            *_conv(w, w, 1),
            *_conv(w, 2 * w, 2),  # (B, 2w, H/4, W/4)
            *_conv(2 * w, 2 * w, 1),
            *_conv(2 * w, 4 * w, 2),  # (B, 4w, H/8, W/8)
            *_conv(4 * w, 4 * w, 1),
        )
        self.head = nn.Linear(8 * w, outputs)

    def features(self, x):
        if x.ndim != 4 or x.shape[1] != 3 or min(x.shape[-2:]) < 16:
            raise ValueError(
                f"Critic expects images (B, 3, H, W) of at least 16 x 16 pixels, got shape "
                f"{tuple(x.shape)}"
            )
        f = self.body(x)  # (B, 4w, H/8, W/8)
        return torch.cat([f.mean((-2, -1)), f.std((-2, -1))], 1)  # (B, 8w)

    def forward(self, x):
        return self.head(self.features(x))  # (B, outputs)


def fit(net, x, y, *, steps, batch_size=32, lr=3e-3, seed=0, device="cpu"):
    """Train `net` in place on images x (N, 3, H, W) with int labels y (N,): AdamW (weight decay
    5e-4) under a one-cycle schedule, cross entropy, `steps` batches of batch_size drawn in seeded
    shuffled passes over x, each image under a random dihedral symmetry. Deterministic for a seed
    on CPU at a given thread count. Returns net in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    batch_size = min(batch_size, len(x))
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=5e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.15)
    net.to(device).train()
    perm, pos = torch.randperm(len(x), generator=gen), 0
    for _ in range(steps):
        if pos + batch_size > len(x):
            perm, pos = torch.randperm(len(x), generator=gen), 0
        idx = perm[pos : pos + batch_size]
        pos += batch_size
        loss = F.cross_entropy(net(dihedral(x[idx], gen).to(device)), y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    return net.eval()


@torch.no_grad()
def _logits(net, x, batch_size=256):
    device = next(net.parameters()).device
    return torch.cat(
        [net(x[i : i + batch_size].to(device)).cpu() for i in range(0, len(x), batch_size)]
    )


# ----------------------------------------------------------------------------------------------
# Classifier two-sample test
# ----------------------------------------------------------------------------------------------
def _binomial_tail(k, n):
    """P(X >= k) for X ~ Binomial(n, 1/2), exactly."""
    return sum(math.comb(n, j) for j in range(k, n + 1)) / 2**n


def _auc(neg, pos):
    """The area under the ROC curve of scores `pos` (should be high) against `neg`: the share of
    pairs (neg, pos) with pos > neg, ties counted half."""
    d = pos[:, None] - neg[None, :]
    return ((d > 0).double().mean() + 0.5 * (d == 0).double().mean()).item()


def _wilson(p, n, z=1.959964):
    """The Wilson score interval of a proportion p out of n at 95% (z: the normal's 97.5% point)."""
    centre, half = p + z * z / (2 * n), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return ((centre - half) / (1 + z * z / n), (centre + half) / (1 + z * z / n))


def two_sample_accuracy(
    real,
    fake,
    *,
    size=64,
    folds=4,
    steps=200,
    width=8,
    batch_size=32,
    lr=3e-3,
    seed=0,
    device="cpu",
    paired=False,
):
    """The classifier two-sample test (C2ST; Lopez-Paz & Oquab 2017): the accuracy with which a
    CNN trained from scratch tells `fake` images from `real` ones, on images it was not trained on.

    Both sets go through to_grid(size). The larger set is subsampled (seeded) to the smaller's n,
    so that chance is exactly 1/2. The 2n images are cut into `folds` parts, each holding about
    n / folds images of either set (seeded); for each part a fresh Critic(2, width) is trained
    (fit: steps, batch_size, lr) on the other parts and scores it, so every image is scored once,
    by a net that never saw it (cross-fitting). The cost is folds * steps * batch_size training
    images whatever n is. paired=True: fake[i] was made from real[i] (generated from its caption, or
    its reconstruction), and both go into the same part, so that a net never scores an image whose
    partner it was trained on; without it two copies of one set score below 1/2 (0.34 on UCM's
    test images), as a held-out image's copy was learnt with the other label.

    Returns dict(accuracy (of the 2n images), stderr (binomial, sqrt(a (1 - a) / 2n)), interval
    (Wilson 95%), p_value (one-sided exact binomial test of accuracy > 1/2), auc (the area under
    the ROC curve of the held-out logit margins: threshold-free, 1/2 by chance), real_accuracy and
    fake_accuracy (the share of each set called right), fold_accuracy (a list), n_real, n_fake
    (images used, equal), n_real_given, n_fake_given, folds, steps, size, width, seconds).
    Predictions of different parts share training images, so the binomial figures are
    approximate; on two halves of a real set their spread matched the binomial one.

    The scale on UCM at 64 px, 210 real images against 210 others (seeds 0-2, two threads): others
    0.50-0.54, the same blurred by a 0.5 px Gaussian 0.72-0.75, by 1 px 0.98, JPEG at quality 10
    0.99-1.0, Gaussian noise 1.0. A 1 px blur already reads near 1.0: beyond it the test ranks
    nothing, and the feature-space FID takes over."""
    n = min(len(real), len(fake))
    if folds < 2 or n < 2 * folds:
        raise ValueError(
            f"the two-sample test needs folds >= 2 and at least 2 images per fold of each set: "
            f"{folds} folds, {len(real)} real and {len(fake)} generated images"
        )
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(seed)
    pick_real = torch.randperm(len(real), generator=gen)[:n]  # also the order that sets the parts
    pick_fake = torch.randperm(len(fake), generator=gen)[:n]
    if paired:
        if len(real) != len(fake):
            raise ValueError(
                f"paired=True needs one generated image per real one: {len(real)} real, "
                f"{len(fake)} generated"
            )
        pick_fake = pick_real
    x = torch.cat(
        [to_grid(_Subset(real, pick_real), size), to_grid(_Subset(fake, pick_fake), size)]
    )
    y = torch.cat([torch.zeros(n, dtype=torch.long), torch.ones(n, dtype=torch.long)])  # 1: fake
    part = (torch.arange(2 * n) % n) % folds  # (2n,): image i of either set in part i % folds
    right = torch.zeros(2 * n, dtype=torch.bool)
    margin = torch.zeros(2 * n)  # held-out logit of "fake" minus logit of "real"
    for k in range(folds):
        train, held = part != k, part == k
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed * 1000 + k)
            critic = Critic(2, width)
        fit(
            critic,
            x[train],
            y[train],
            steps=steps,
            batch_size=batch_size,
            lr=lr,
            seed=seed * 1000 + k,
            device=device,
        )
        logit = _logits(critic, x[held])  # (n_held, 2)
        right[held] = logit.argmax(-1) == y[held]
        margin[held] = logit[:, 1] - logit[:, 0]
    acc = right.double().mean().item()
    return dict(
        accuracy=acc,
        stderr=math.sqrt(acc * (1 - acc) / (2 * n)),
        interval=_wilson(acc, 2 * n),
        p_value=_binomial_tail(int(right.sum()), 2 * n),
        auc=_auc(margin[:n], margin[n:]),
        real_accuracy=right[:n].double().mean().item(),
        fake_accuracy=right[n:].double().mean().item(),
        fold_accuracy=[right[part == k].double().mean().item() for k in range(folds)],
        n_real=n,
        n_fake=n,
        n_real_given=len(real),
        n_fake_given=len(fake),
        folds=folds,
        steps=steps,
        size=size,
        width=width,
        seconds=time.perf_counter() - t0,
    )


class _Subset:
    """Items idx[0], idx[1], ... of an indexable image set."""

    def __init__(self, images, idx):
        self.images, self.idx = images, idx

    def __len__(self):
        return len(self.idx)

    def __getitem__(self, i):
        return self.images[int(self.idx[i])]


# ----------------------------------------------------------------------------------------------
# FID / KID in a feature space learnt from the real training split
# ----------------------------------------------------------------------------------------------
def train_feature_net(
    images,
    labels,
    num_classes,
    *,
    size=64,
    steps=1500,
    width=16,
    batch_size=32,
    lr=3e-3,
    seed=0,
    device="cpu",
):
    """A Critic(num_classes, width) trained from scratch (fit) to tell the scene classes of real
    images (N of (3, H, W) in [-1, 1]) from int labels (N,) in [0, num_classes), read at `size`
    (to_grid). Returns it in eval mode with `net.size` set; its pooled features (8 width) are the
    space of feature_distances."""
    labels = torch.as_tensor(labels).long()
    if labels.shape != (len(images),):
        raise ValueError(
            f"labels must be one per image, shape ({len(images)},), got {tuple(labels.shape)}"
        )
    if len(labels) < 2:
        raise ValueError(f"train_feature_net needs at least 2 images, got {len(labels)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{int(labels.min())}, {int(labels.max())}]"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = Critic(num_classes, width)
    fit(
        net,
        to_grid(images, size),
        labels,
        steps=steps,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        device=device,
    )
    net.size = size
    return net


@torch.no_grad()
def features(net, images, batch_size=256):
    """The pooled features (N, 8 width) float32 of a feature net for an image set, read at net.size
    (to_grid), batch_size images at a time."""
    device = next(net.parameters()).device
    was_training = net.training
    net.eval()
    out = []
    for i in range(0, len(images), batch_size):
        idx = range(i, min(i + batch_size, len(images)))
        x = to_grid(_Subset(images, idx), net.size)  # (B, 3, size, size)
        out.append(net.features(x.to(device)).float().cpu())
    net.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 8 * net.width)


def feature_distances(net, real, fake, kid_subset_size=1000):
    """FID and KID (metrics.fid, metrics.kernel_distance) between the features of a real and a
    generated image set in the space of a feature net. Returns dict(fid, kid, kid_std, n_real,
    n_fake, dim).

    Figures compare only under one net (one file): three nets trained with seeds 0-2 on UCM's
    1680 training images (64 px) put 210 real test images against 210 others at 6.3-7.4, against
    the same blurred by 1 px at 25-36, by 2 px at 55-68, and against Gaussian noise at 157-381,
    each net ranking them alike. Like any FID it is biased by the number of images: compare
    figures from equal numbers."""
    fr, ff = features(net, real), features(net, fake)
    kid = metrics.kernel_distance(fr, ff, subset_size=kid_subset_size)
    return dict(
        fid=metrics.fid(fr, ff),
        kid=kid["mean"],
        kid_std=kid["std"],
        n_real=len(fr),
        n_fake=len(ff),
        dim=fr.shape[1],
    )


# ----------------------------------------------------------------------------------------------
# Files: the state dict as safetensors, the architecture and the caller's info in its metadata
# ----------------------------------------------------------------------------------------------
def save_feature_net(net, path, info=None):
    """Write a feature net atomically: weights, BatchNorm statistics, its architecture (classes,
    width, size) and `info` (a JSON-able dict: the recipe, the training set, figures)."""
    arch = dict(num_classes=net.outputs, width=net.width, size=net.size)
    write_tensors(
        path,
        net.state_dict(),
        {"format": FORMAT, "net": json.dumps(arch), "info": json.dumps(info or {})},
    )


def load_feature_net(path):
    """(net in eval mode with net.size set, info) from a file save_feature_net wrote; info holds
    the caller's dict plus num_classes, width, size."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise WeightsError(
            f"{path}: not a realism feature net (no format '{FORMAT}' in its safetensors metadata)"
        )
    arch = json.loads(meta["net"])
    net = Critic(arch["num_classes"], arch["width"])
    load_state_strict(net, read_tensors(path), path)
    net.size = arch["size"]
    return net.eval(), {**json.loads(meta.get("info", "{}")), **arch}
