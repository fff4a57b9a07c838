"""Zero-shot classification accuracy (Cls-OA) and resolution accuracy, with a torchvision ResNet-18.

Cls-OA follows the protocol of Txt2Img-MHN's released code, which Text2Earth reports
(SPEC section 6): N images (10) are generated from the first caption of each test image, a ResNet-18
is trained on them with that test image's class as label (Adam lr 1e-4, batch 64, 5 epochs, 256x256,
no augmentation), and its overall (OA) and average per-class (AA) accuracy is
read on the real test images:

    res = zero_shot_cls(gen_images, gen_labels, test_images, test_labels, classes,
                        init="resnet18-f37072fd.pth")
    res["oa"], res["aa"], res["per_class"], res["init"]  # init: "ImageNet from <file>" or "scratch"

Resolution accuracy: a level net (the same ResNet-18, one class per integer Google map level lo..hi)
is trained on real images of known level and reads the level of generated
images asked at given levels:

    net = train_level_net(real_images, real_levels)
    resolution_accuracy(predict_levels(net, gen_images), asked_levels)  # exact, within_one, corr, n
    save_net(net, "levels.safetensors", {"recipe": ...}); net, info = load_net("levels.safetensors")

Images are float tensors (3, H, W) in [-1, 1]; an image set is any indexable sequence of them (a
tensor (N, 3, H, W), or a lazy list that loads a file in __getitem__), read batch by batch, never
all at once. ImageNet weights cannot be downloaded here: `init` is a local file (torchvision's
resnet18-f37072fd.pth, or the same state dict as .safetensors); without it the net trains from
scratch, and the result says so. Shapes: B batch, 3 channels, H, W spatial, N images, K classes.
"""

import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torch.utils.data import DataLoader, Dataset

from model.release import WeightsError, read_tensors
from model.weights import load_state_strict, read_metadata, write_tensors

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's normalisation of [0, 1] RGB
IMAGENET_STD = (0.229, 0.224, 0.225)
FORMAT = "text2earth-resnet18"  # the safetensors metadata format of save_net's files


# ----------------------------------------------------------------------------------------------
# Images and the network
# ----------------------------------------------------------------------------------------------
def preprocess(x, size):
    """Images (3, H, W) or (B, 3, H, W) in [-1, 1] -> float32 (..., 3, size, size), resized
    bilinearly with antialiasing and normalised with the ImageNet mean and std (after
    mapping [-1, 1] to [0, 1])."""
    if x.ndim not in (3, 4) or x.shape[-3] != 3:
        raise ValueError(f"images must be (3, H, W) or (B, 3, H, W), got shape {tuple(x.shape)}")
    x = x.float()
    if tuple(x.shape[-2:]) != (size, size):
        y = x[None] if x.ndim == 3 else x  # (B, 3, H, W)
        y = F.interpolate(
            y, size=(size, size), mode="bilinear", antialias=True, align_corners=False
        )
        x = y[0] if x.ndim == 3 else y
    mean = torch.tensor(IMAGENET_MEAN, device=x.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device).view(3, 1, 1)
    return ((x + 1) / 2 - mean) / std


def resnet18(num_classes, init=None):
    """torchvision's ResNet-18 with a (num_classes, 512) fc, randomly
    initialised (torch's global RNG).

    `init`: a local file holding torchvision's ImageNet state dict (resnet18-f37072fd.pth, read with
    torch.load(weights_only=True), or the same keys as .safetensors); every tensor but fc.* is
    loaded, strictly: a missing, unexpected or mis-shaped key is a WeightsError naming it. The fc
    stays random (its 1000 ImageNet classes are not ours)."""
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    if init is None:
        return net
    path = Path(init)
    if not path.is_file():
        raise WeightsError(
            f"{path}: no such file; --resnet-init takes torchvision's ResNet-18 ImageNet state "
            "dict (resnet18-f37072fd.pth, or the same keys as .safetensors), as a local file"
        )
    return load_trunk(net, path)


def load_trunk(net, path, skip=("fc.",)):
    """Load torchvision's ImageNet state dict in the file `path` into `net` but its fc (and the
    other heads whose keys start with `skip`), strictly: a missing, unexpected or mis-shaped key is
    a WeightsError naming it. Returns the net."""
    state = {k: v for k, v in read_tensors(path).items() if not k.startswith(skip)}
    # older torchvision files lack the BatchNorm step counters
    for k, v in net.state_dict().items():
        if k.endswith("num_batches_tracked") and k not in state:
            state[k] = torch.zeros_like(v)
    # the trunk alone, so that strict loading names only trunk keys
    fc, net.fc = net.fc, nn.Identity()
    try:
        load_state_strict(net, state, path)
    finally:
        net.fc = fc
    return net


def init_name(init):
    """How a net was initialised, for reports: "ImageNet from <file>" or "scratch"."""
    return f"ImageNet from {Path(init).name}" if init else "scratch"


def prepare_tensor(image, size):
    """The default `prepare` of train_classifier / predict: an image tensor (3, H, W) in [-1, 1]
    -> the network's input (3, size, size) (preprocess)."""
    return preprocess(torch.as_tensor(image), size)


class _Labelled(Dataset):
    """(prepared image (3, size, size), label) pairs over an indexable image set."""

    def __init__(self, images, labels, size, prepare=prepare_tensor):
        self.images, self.labels, self.size, self.prepare = images, labels, size, prepare

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.prepare(self.images[i], self.size), self.labels[i]


def _labels(labels, n, what):
    labels = torch.as_tensor(labels)
    if labels.shape != (n,):
        raise ValueError(f"{what} must be one per image, shape ({n},), got {tuple(labels.shape)}")
    return labels


# ----------------------------------------------------------------------------------------------
# Training and prediction
# ----------------------------------------------------------------------------------------------
def train_classifier(
    images,
    labels,
    num_classes,
    *,
    epochs=5,
    batch_size=64,
    lr=1e-4,
    size=256,
    init=None,
    seed=0,
    progress=False,
    device="cpu",
    prepare=prepare_tensor,
):
    """A ResNet-18 (resnet18(num_classes, init)) trained on images (N of (3, H, W) in [-1, 1]) with
    int labels (N,) in [0, num_classes): Adam, cross entropy, `epochs` passes in a seeded shuffled
    order, images resized to `size`. No augmentation, as in the protocol. The fc (or the whole net,
    from scratch) is initialised from `seed` without touching the caller's RNG; deterministic on CPU
    for a given thread count. A final batch of one image is skipped (BatchNorm needs two values per
    channel, and a ResNet-18 at 32 px ends in 1x1). Returns the net in eval mode, with `net.size`
    set.

    Another protocol's classifier: `init` the network itself (an nn.Module built and initialised by
    the caller, trained on every batch; `seed` then sets only the shuffle), and `prepare(image,
    size)` -> its input (3, size, size), for images of another kind (e.g. file paths)."""
    labels = _labels(labels, len(images), "labels").long()
    if len(labels) < 2:
        raise ValueError(f"train_classifier needs at least two images, got {len(labels)}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]"
        )
    built_here = not isinstance(init, nn.Module)
    if built_here:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            net = resnet18(num_classes, init)
    else:
        net = init
    net = net.to(device)
    loader = DataLoader(
        _Labelled(images, labels, size, prepare),
        batch_size=batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(seed),
    )
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    net.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        total, seen = 0.0, 0
        for x, y in loader:  # x (B, 3, size, size), y (B,)
            if len(y) < 2 and built_here:
                continue
            loss = F.cross_entropy(net(x.to(device)), y.to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        if progress:
            print(
                f"resnet18 epoch {epoch + 1}/{epochs}  loss {total / max(seen, 1):.3f}  "
                f"{time.perf_counter() - t0:.1f}s"
            )
    net.size = size
    return net.eval()


@torch.no_grad()
def predict(net, images, size=None, batch_size=64, prepare=prepare_tensor):
    """Predicted classes (N,) int64 of images (N of (3, H, W) in [-1, 1], or what `prepare`
    reads) at `size` (default: net.size)."""
    size = size or net.size
    was_training, device = net.training, next(net.parameters()).device
    net.eval()
    labels = torch.zeros(len(images), dtype=torch.long)
    loader = DataLoader(_Labelled(images, labels, size, prepare), batch_size=batch_size)
    pred = [net(x.to(device)).argmax(-1).cpu() for x, _ in loader]  # (B,) each
    net.train(was_training)
    return torch.cat(pred) if pred else torch.zeros(0, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# Scene classes: Cls-OA
# ----------------------------------------------------------------------------------------------
def accuracy(pred, labels, num_classes):
    """dict(oa, aa, per_class, n): overall accuracy, the mean of per-class accuracies over the
    classes present in `labels`, and the per-class accuracy list (K,) (None for a class
    absent from `labels`)."""
    pred, labels = torch.as_tensor(pred).long(), torch.as_tensor(labels).long()
    if pred.shape != labels.shape or pred.ndim != 1 or len(labels) == 0:
        raise ValueError(
            f"pred and labels must be the same non-empty (N,), got {tuple(pred.shape)} and "
            f"{tuple(labels.shape)}"
        )
    right = (pred == labels).double()
    per_class = [
        right[labels == k].mean().item() if (labels == k).any() else None
        for k in range(num_classes)
    ]
    present = [a for a in per_class if a is not None]
    return dict(
        oa=right.mean().item(), aa=sum(present) / len(present), per_class=per_class, n=len(labels)
    )


def zero_shot_cls(train_images, train_labels, test_images, test_labels, classes, **train_kw):
    """Cls-OA: a ResNet-18 trained on train_images (the generated ones) with train_labels (ints
    indexing `classes`), scored on the real test_images / test_labels. train_kw go to
    train_classifier (epochs, batch_size, lr, size, init, seed, progress, device). A
    label outside `classes`, or a test class that no training image shows, is a ValueError naming
    them: the generated set does not match the test set. Returns dict(oa, aa, per_class {name: acc}
    over the test classes, n_train, n_test, init, epochs, lr, batch_size, size)."""
    train_labels = _labels(train_labels, len(train_images), "train_labels").long()
    test_labels = _labels(test_labels, len(test_images), "test_labels").long()
    K = len(classes)
    for what, lab in (("train_labels", train_labels), ("test_labels", test_labels)):
        bad = sorted({int(k) for k in lab if not 0 <= k < K})
        if bad:
            raise ValueError(f"{what} {bad} lie outside the {K} classes (0..{K - 1})")
    unseen = sorted(set(test_labels.tolist()) - set(train_labels.tolist()))
    if unseen:
        raise ValueError(
            f"test classes with no training image: {[classes[k] for k in unseen]}; the generated "
            "set must hold images of every class of the test set"
        )
    kw = dict(epochs=5, batch_size=64, lr=1e-4, size=256, init=None)
    kw.update(train_kw)
    net = train_classifier(train_images, train_labels, K, **kw)
    acc = accuracy(predict(net, test_images, kw["size"], kw["batch_size"]), test_labels, K)
    per_class = {classes[k]: a for k, a in enumerate(acc["per_class"]) if a is not None}
    return dict(
        oa=acc["oa"],
        aa=acc["aa"],
        per_class=per_class,
        n_train=len(train_labels),
        n_test=acc["n"],
        init=init_name(kw["init"]),
        epochs=kw["epochs"],
        lr=kw["lr"],
        batch_size=kw["batch_size"],
        size=kw["size"],
    )


# ----------------------------------------------------------------------------------------------
# Google map levels: resolution accuracy
# ----------------------------------------------------------------------------------------------
def train_level_net(images, levels, *, lo=None, hi=None, **train_kw):
    """A ResNet-18 classifying the integer levels lo..hi (from the rounded data when not given),
    trained like train_classifier (train_kw) on images of known levels (N,), rounded and clamped to
    [lo, hi]. Returns the net in eval mode with `net.levels = (lo, hi)`."""
    levels = _labels(levels, len(images), "levels").double().round().long()
    lo = int(levels.min()) if lo is None else int(lo)
    hi = int(levels.max()) if hi is None else int(hi)
    if lo > hi:
        raise ValueError(f"levels need lo <= hi, got lo={lo}, hi={hi}")
    net = train_classifier(images, levels.clamp(lo, hi) - lo, hi - lo + 1, **train_kw)
    net.levels = (lo, hi)
    return net


def predict_levels(net, images, size=None, batch_size=64):
    """Integer levels (N,) int64 a level net reads off images (N of (3, H, W) in [-1, 1])."""
    return predict(net, images, size, batch_size) + net.levels[0]


def resolution_accuracy(predicted, asked):
    """dict(exact, within_one, corr, n): how often the level read equals the level asked (rounded),
    or lies within one of it, and the Pearson correlation of the two (0.0 when either does not
    vary: no trend shown)."""
    p, a = torch.as_tensor(predicted).double(), torch.as_tensor(asked).double()
    if p.shape != a.shape or p.ndim != 1 or len(p) == 0:
        raise ValueError(
            f"predicted and asked must be the same non-empty (N,), got {tuple(p.shape)} and "
            f"{tuple(a.shape)}"
        )
    err = (p - a.round()).abs()
    dp, da = p - p.mean(), a - a.mean()
    denom = math.sqrt(dp.square().sum().item() * da.square().sum().item())
    return dict(
        exact=(err == 0).double().mean().item(),
        within_one=(err <= 1).double().mean().item(),
        corr=(dp * da).sum().item() / denom if denom > 0 else 0.0,
        n=len(p),
    )


# ----------------------------------------------------------------------------------------------
# Files: the state dict as safetensors, what the net reads in its metadata
# ----------------------------------------------------------------------------------------------
def save_net(net, path, info=None):
    """Write a trained net atomically: weights and BatchNorm statistics, what it reads (kind
    "levels" with net.levels, else "classes", with info["classes"] as their names when given), its
    input size, and `info` (a JSON-able dict: recipe, figures)."""
    info = dict(info or {})
    K, levels = net.fc.out_features, getattr(net, "levels", None)
    classes = info.pop("classes", None)
    if classes is not None and len(classes) != K:
        raise ValueError(f"info['classes'] names {len(classes)} classes, the net has {K} outputs")
    arch = dict(
        kind="levels" if levels else "classes",
        num_classes=K,
        size=net.size,
        levels=list(levels) if levels else None,
        classes=list(classes) if classes is not None else None,
    )
    write_tensors(
        path,
        net.state_dict(),
        {"format": FORMAT, "net": json.dumps(arch), "info": json.dumps(info)},
    )


def load_net(path):
    """(net in eval mode, info) from a file save_net wrote; info holds the caller's dict plus kind,
    num_classes, size, levels (lo, hi) or None, classes (names) or None. net.size
    and net.levels are set."""
    meta = read_metadata(path)
    if meta.get("format") != FORMAT:
        raise WeightsError(
            f"{path}: not a classifier file (no format '{FORMAT}' in its safetensors metadata)"
        )
    arch = json.loads(meta["net"])
    net = torchvision.models.resnet18(weights=None, num_classes=arch["num_classes"])
    load_state_strict(net, read_tensors(path), path)
    net.size = arch["size"]
    if arch["levels"]:
        net.levels = tuple(arch["levels"])
    return net.eval(), {**json.loads(meta.get("info", "{}")), **arch}
