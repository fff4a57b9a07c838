"""Txt2Img-MHN's evaluation protocol, the one behind the published RSICD table.

Xu et al. (2023) released their evaluation code with Txt2Img-MHN (github
YonghaoXu/Txt2Img-MHN); Lafite's, CRS-Diff's, Text2Earth's and GeoCore-9B's RSICD rows follow it
(SPEC section 6). It differs from the usual FID protocol in every network and preprocessing step,
so its figures and pytorch-fid's are not comparable. What it does, and what this module
reproduces:

- **Images**: PIL `Resize((256, 256))` (bilinear), to [0, 1], ImageNet mean / std; no 299 resize.
  Generated images were saved min-max stretched (torchvision `save_image(normalize=True)`).
- **FID / IS**: torchvision's Inception-v3 (`aux_logits=False`) fine-tuned from ImageNet on
  RSICD's 30 classes (9000 images, 10 epochs, Adam 1e-4, batch 64, no augmentation), fine-tuned
  with `transform_input=True` (ImageNet weights set it) but evaluated without it; 2048-d pool
  features; the real set is a 1000-image test list, the generated set a 1000-image list. The
  Frechet distance is scipy's `sqrtm` route with its 1e-6 diagonal retry; IS from the 30-class
  softmax in one split.
  Their fine-tuned network was never released: `fit_inception` makes one.
- **Zero-shot Cls-OA / AA**: torchvision's ResNet-18 from ImageNet weights with a new 30-class fc,
  trained on the generated images (10 per first caption of each named test image) labelled with
  their test image's class, Adam 1e-4, batch 64, 5 epochs, shuffled; OA and per-class AA on the
  real images. Classes come from the file-name prefix in `CLASSES`' order.
- **RSICD test**: every image not marked "train" (val + test: 2187); the 133 with numeric names have
  no class and are left out of Cls-OA (2054 named), kept for FID and CLIP.
- **CLIP score**: evaluation/hf_clip.py (`clip_dot_score`): clip-rsicd-v2's unnormalised dot / 100.

    net = load_inception("mhn_inception.safetensors")
    feats, probs = inception_outputs(net, paths)          # (N, 2048), (N, 30) float64
    frechet_distance(*stats(f_gen), *stats(f_real)), inception_score(probs)
    zero_shot(gen_paths, gen_labels, real_paths, real_labels, init="resnet18-f37072fd.pth")

Images are file paths (read as their code reads them); shapes: N images, K classes.
"""

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
import torchvision.transforms.functional as TF
from PIL import Image

from evaluation import classifier
from evaluation.metrics import frechet_distance as frechet_distance_eigh
from evaluation.testset import class_from_name
from model.release import WeightsError, read_tensors
from model.weights import load_state_strict, read_metadata, write_tensors

# The zero-shot classifier's class order (their category_dict): 'parking' 16, 'park' 17
CLASSES = (
    "airport",
    "bareland",
    "baseballfield",
    "beach",
    "bridge",
    "center",
    "church",
    "commercial",
    "denseresidential",
    "desert",
    "farmland",
    "forest",
    "industrial",
    "meadow",
    "mediumresidential",
    "mountain",
    "parking",
    "park",
    "playground",
    "pond",
    "port",
    "railwaystation",
    "resort",
    "river",
    "school",
    "sparseresidential",
    "square",
    "stadium",
    "storagetanks",
    "viaduct",
)
SIZE = 256  # every network reads Resize((256, 256))
IMAGENET_MEAN = classifier.IMAGENET_MEAN
IMAGENET_STD = classifier.IMAGENET_STD
FID_IMAGES = 1000  # the size of their real and generated FID lists
NOT_TRAIN = "!train"  # the Karpathy split spec of their RSICD test set: every image not in train
FORMAT = "text2earth-mhn-inception"  # the safetensors metadata format of save_inception's files
FID_EPS = 1e-6  # the diagonal offset of their sqrtm retry


# ----------------------------------------------------------------------------------------------
# Images and captions as their code reads them
# ----------------------------------------------------------------------------------------------
def prepare(path, size=SIZE):
    """A file -> the networks' input (3, size, size) float32: PIL RGB, Resize((size, size))
    bilinear, to [0, 1], ImageNet normalisation (their `composed_transforms`)."""
    with Image.open(path) as im:
        x = TF.resize(im.convert("RGB"), [size, size])  # PIL bilinear, as transforms.Resize
    return TF.normalize(TF.to_tensor(x), IMAGENET_MEAN, IMAGENET_STD)


def stretch(x):
    """An image (3, H, W) float -> uint8 (3, H, W) as torchvision's save_image(normalize=True)
    writes it: min-max over the whole image to [0, 1], then * 255 + 0.5, clamped, truncated."""
    lo, hi = x.min(), x.max()
    y = (x.clamp(lo, hi) - lo) / max(float(hi - lo), 1e-5)
    return (y * 255 + 0.5).clamp(0, 255).to(torch.uint8)


def caption(raw):
    """Their text file's caption of a Karpathy "raw" sentence: the text before its first " ."."""
    return raw.split(" .")[0]


def class_index(name):
    """The class index (CLASSES) of an RSICD file name; None for a numeric name or another
    class."""
    label = class_from_name(name)
    return CLASSES.index(label) if label in CLASSES else None


def read_list(path, root):
    """Their FID list files: one image a line, "<class>/<name>.jpg <label>" (the real list) or
    "<name>_<k>.png" (the generated list) -> the files `root / basename`, each checked."""
    path, root = Path(path), Path(root)
    if not path.is_file():
        raise ValueError(f"image list {path} does not exist")
    names = [
        line.split()[0].split("/")[-1] for line in path.read_text().splitlines() if line.strip()
    ]
    if not names:
        raise ValueError(f"image list {path} names no image")
    files = [root / n for n in names]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ValueError(
            f"{path}: {len(missing)} of its {len(files)} images are not in {root}, "
            f"e.g. {missing[0]}"
        )
    return files


def draw(files, n=FID_IMAGES, seed=0):
    """A seeded choice of n files (all of them when fewer), in their order: the FID sets when
    their list files are not given."""
    files = list(files)
    if len(files) <= n:
        return files
    keep = np.random.default_rng(seed).choice(len(files), n, replace=False)
    return [files[i] for i in sorted(keep)]


# ----------------------------------------------------------------------------------------------
# The fine-tuned Inception-v3: FID and IS
# ----------------------------------------------------------------------------------------------
def inception(num_classes=len(CLASSES), transform_input=False):
    """torchvision's Inception-v3 without the auxiliary head, a (num_classes, 2048) fc, weights left
    at torch's default initialisation (they are loaded or fine-tuned)."""
    return torchvision.models.inception_v3(
        weights=None,
        aux_logits=False,
        init_weights=False,
        transform_input=transform_input,
        num_classes=num_classes,
    )


def imagenet_inception(init, num_classes=len(CLASSES)):
    """The network to fine-tune: ImageNet weights from the local file `init` (torchvision's
    inception_v3_google-0cc3c7bd.pth) but its fc (new, random from torch's RNG) and auxiliary
    head, transform_input on as torchvision sets it with ImageNet weights."""
    net = inception(num_classes, transform_input=True)
    path = Path(init)
    if not path.is_file():
        raise WeightsError(
            f"{path}: no such file; give torchvision's Inception-v3 ImageNet state dict "
            "(inception_v3_google-0cc3c7bd.pth) as a local file"
        )
    return classifier.load_trunk(net, path, skip=("fc.", "AuxLogits."))


def fit_inception(files, labels, init, *, epochs=10, batch_size=64, lr=1e-4, seed=0, **kw):
    """Their pretrain_inception.py: `imagenet_inception(init)` trained on the files with int
    labels (N,) in CLASSES' order: Adam, cross entropy, shuffled, no augmentation, Resize((256,
    256)). kw go to classifier.train_classifier (progress, device). Returns the net in
    eval mode with transform_input off, as their evaluation builds it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = imagenet_inception(init)
    net = classifier.train_classifier(
        files,
        labels,
        len(CLASSES),
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        size=SIZE,
        init=net,
        seed=seed,
        prepare=prepare,
        **kw,
    )
    net.transform_input = False
    return net


def save_inception(net, path, info=None):
    """Write a fine-tuned Inception atomically with its classes and `info` (recipe, accuracy)."""
    arch = dict(num_classes=net.fc.out_features, classes=list(CLASSES))
    meta = {"format": FORMAT, "net": json.dumps(arch), "info": json.dumps(info or {})}
    write_tensors(path, net.state_dict(), meta)


def load_inception(path):
    """The evaluation network, in eval mode with transform_input off: a file save_inception wrote,
    or a torch state dict of the same network (keys in torchvision's names, optionally prefixed
    "module." by DataParallel, as their pretrain_inception.py saved it)."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"{path}: no such file; make the fine-tuned Inception with evaluate.py "
            "--fit-mhn-inception (its weights were never released)"
        )
    if path.suffix == ".safetensors" and read_metadata(path).get("format") != FORMAT:
        raise WeightsError(
            f"{path}: not a fine-tuned Inception (no format '{FORMAT}' in its metadata)"
        )
    state = {k.removeprefix("module."): v for k, v in read_tensors(path).items()}
    if "fc.weight" not in state:
        raise WeightsError(f"{path}: no fc.weight; not an Inception-v3 state dict")
    net = inception(num_classes=state["fc.weight"].shape[0])
    load_state_strict(net, state, path)
    return net.eval()


@torch.no_grad()
def inception_outputs(net, files, batch_size=32, device="cpu"):
    """(features (N, 2048), probabilities (N, K)) float64 numpy of the files: the pool features
    after the (identity) dropout, and the softmax of the fc on them."""
    fc, net.fc = net.fc, nn.Identity()
    feats, probs = [], []
    try:
        net.eval().to(device)
        for i in range(0, len(files), batch_size):
            x = torch.stack([prepare(f) for f in files[i : i + batch_size]]).to(device)
            f = net(x)  # (B, 2048)
            feats.append(f.cpu().double().numpy())
            probs.append(torch.softmax(fc(f), 1).cpu().double().numpy())
    finally:
        net.fc = fc
    return np.concatenate(feats), np.concatenate(probs)


def stats(features):
    """(mean (D,), covariance (D, D)) of features (N, D), np.cov's unbiased estimate."""
    return np.mean(features, axis=0), np.cov(features, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=FID_EPS):
    """(FID, route): the Frechet distance of two Gaussians through scipy.linalg.sqrtm of
    sigma1 @ sigma2, retried with eps on both diagonals when the root is not finite, its real part
    kept (an imaginary diagonal part above 1e-3 is an error). Without scipy: the eigh route of
    evaluation/metrics.py, equal for well-conditioned covariances, and the route says so."""
    try:
        from scipy import linalg
    except ImportError:
        return frechet_distance_eigh(mu1, sigma1, mu2, sigma2), "eigh (scipy not installed)"
    diff = mu1 - mu2
    root, _ = linalg.sqrtm(sigma1.dot(sigma2), disp=False)
    route = "scipy sqrtm"
    if not np.isfinite(root).all():
        offset = np.eye(sigma1.shape[0]) * eps
        root = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
        route = f"scipy sqrtm, {eps:g} added to the diagonals"
    if np.iscomplexobj(root):
        if not np.allclose(np.diagonal(root).imag, 0, atol=1e-3):
            raise ValueError(f"FID: sqrtm has an imaginary part of {np.abs(root.imag).max():.3g}")
        root = root.real
    fid = diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(root)
    return float(fid), route


def inception_score(probs):
    """exp of the mean KL(p(y|x) || p(y)) over the images, one split, p(y) their mean; each row
    normalised to sum 1 first, as scipy.stats.entropy does."""
    p = probs / probs.sum(1, keepdims=True)
    py = p.mean(0)
    py = py / py.sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p / py), 0.0)
    return float(np.exp(terms.sum(1).mean()))


# ----------------------------------------------------------------------------------------------
# Zero-shot classification: Cls-OA / AA
# ----------------------------------------------------------------------------------------------
def imagenet_resnet18(init, num_classes=len(CLASSES)):
    """Their classifier: torchvision's ResNet-18 built with 1000 classes, its ImageNet weights
    loaded from the local file `init` (None: random), then a new (num_classes, 512) fc; torch's
    global RNG is drawn in that order."""
    net = classifier.resnet18(1000, init)
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return net


def zero_shot(
    train_files, train_labels, test_files, test_labels, init=None, *, classes=CLASSES, seed=0, **kw
):
    """Their zero_shot_evaluation.py: imagenet_resnet18(init) trained on the generated files with
    their test image's class (ints into `classes`, RSICD's in CLASSES' order) for 5 epochs, Adam
    1e-4, batch 64, shuffled, Resize((256, 256)); then OA and per-class AA on the real test files.
    kw go to classifier.train_classifier (epochs, batch_size, lr, size, progress, device). Returns
    dict(oa, aa, per_class {name: accuracy}, n_train, n_test, init, epochs, lr, batch_size,
    size)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = imagenet_resnet18(init, len(classes))
    settings = dict(epochs=5, batch_size=64, lr=1e-4, size=SIZE)
    settings.update(kw)
    net = classifier.train_classifier(
        train_files,
        train_labels,
        len(classes),
        init=net,
        seed=seed,
        prepare=prepare,
        **settings,
    )
    pred = classifier.predict(net, test_files, settings["size"], settings["batch_size"], prepare)
    acc = classifier.accuracy(pred, test_labels, len(classes))
    return dict(
        oa=acc["oa"],
        aa=acc["aa"],
        per_class={classes[k]: a for k, a in enumerate(acc["per_class"]) if a is not None},
        n_train=len(train_files),
        n_test=acc["n"],
        init=classifier.init_name(init),
        epochs=settings["epochs"],
        lr=settings["lr"],
        batch_size=settings["batch_size"],
        size=settings["size"],
    )


def fid_and_is(net, real_files, generated_files, batch_size=32, device="cpu"):
    """Their is_fid_score.py: FID of the generated against the real files through `net`'s pool
    features, and the IS of each set (theirs prints both; the generated one is the table's).
    Returns dict(fid, route, is_generated, is_real, n_real, n_generated)."""
    if min(len(real_files), len(generated_files)) < 2:
        raise ValueError(
            f"FID needs two images or more a set, got {len(real_files)} real and "
            f"{len(generated_files)} generated"
        )
    f_gen, p_gen = inception_outputs(net, generated_files, batch_size, device)
    f_real, p_real = inception_outputs(net, real_files, batch_size, device)
    fid, route = frechet_distance(*stats(f_gen), *stats(f_real))
    return dict(
        fid=fid,
        route=route,
        is_generated=inception_score(p_gen),
        is_real=inception_score(p_real),
        n_real=len(real_files),
        n_generated=len(generated_files),
    )
