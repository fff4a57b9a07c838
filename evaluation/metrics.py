"""Distances between sets of image features: FID, KID, CMMD, precision / recall, and their cache.

Every function takes features (N, D) (torch or numpy, any float dtype) and computes in float64:

    # Heusel et al. 2017, Inception pool features
    fid = frechet_distance(*stats(real), *stats(fake))
    kid = kernel_distance(real, fake)        # Binkowski et al. 2018: {"mean", "std"}
    cmmd = clip_mmd(real_clip, fake_clip)    # Jayasumana et al. 2024, CLIP embeddings
    pr = precision_recall(real, fake, k=3)   # Kynkaanniemi et al. 2019

Shapes: N images, D feature dimensions.
"""

import hashlib
import json
import math
import os
import warnings
from pathlib import Path

import numpy as np
import torch


def _f64(x):
    x = torch.as_tensor(np.asarray(x) if not torch.is_tensor(x) else x).double().cpu()
    if x.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(x.shape)}")
    return x


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------


def stats(features):
    """(mean (D,), covariance (D, D)) in float64, the covariance unbiased (1 / (N - 1))
    as pytorch-fid's np.cov."""
    f = _f64(features)
    N, D = f.shape
    if N < 2:
        raise ValueError(f"FID needs at least 2 images, got {N}")
    mu = f.mean(0)
    c = f - mu
    return mu, c.T @ c / (N - 1)


def _psd_sqrt(s):
    """The symmetric square root of a symmetric positive semi-definite matrix
    (negative rounding clipped)."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2):
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), with tr((S1 S2)^1/2) taken in the
    symmetric form tr((S1^1/2 S2 S1^1/2)^1/2): S1^1/2 S2 S1^1/2 is symmetric PSD, so `eigh` gives it
    exactly and no complex values or sqrtm iterations appear (S1 S2 has the same eigenvalues)."""
    mu1, mu2 = torch.as_tensor(mu1).double(), torch.as_tensor(mu2).double()
    s1, s2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    r = _psd_sqrt(s1)
    m = r @ s2 @ r
    tr_sqrt = torch.linalg.eigvalsh((m + m.T) / 2).clamp_min(0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def frechet_distance_eigvals(mu1, sigma1, mu2, sigma2):
    """The same distance with tr((S1 S2)^1/2) = sum of sqrt(eigenvalues of S1 S2) (general
    eigensolver, real parts): a cross-check of `frechet_distance` by another route."""
    mu1, mu2 = torch.as_tensor(mu1).double(), torch.as_tensor(mu2).double()
    s1, s2 = torch.as_tensor(sigma1).double(), torch.as_tensor(sigma2).double()
    tr_sqrt = torch.linalg.eigvals(s1 @ s2).sqrt().real.sum()
    return ((mu1 - mu2).square().sum() + s1.trace() + s2.trace() - 2 * tr_sqrt).item()


def fid(real, fake):
    """FID between two feature sets (N, D). Warns when a set has no more images than D: its
    covariance is then singular and FID is biased upwards (compare only figures from the
    same numbers of images)."""
    (n1, d), n2 = real.shape, len(fake)
    if min(n1, n2) <= d:
        warnings.warn(
            f"FID from {n1} real and {n2} generated images of {d}-d features: the covariance is "
            "rank-deficient and FID is biased upwards; compare only figures from the same numbers "
            "of images",
            stacklevel=2,
        )
    return frechet_distance(*stats(real), *stats(fake))


# ----------------------------------------------------------------------------------------------
# KID
# ----------------------------------------------------------------------------------------------


def polynomial_mmd(x, y, degree=3, coef0=1.0):
    """Unbiased MMD^2 with the kernel k(a, b) = (a.b / D + coef0)^degree, for
    equal-sized x, y (m, D)."""
    m, D = x.shape
    kxx, kyy, kxy = ((a @ b.T / D + coef0) ** degree for a, b in ((x, x), (y, y), (x, y)))
    off = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (m * (m - 1))
    return (off - 2 * kxy.mean()).item()


def kernel_distance(real, fake, subsets=100, subset_size=1000, seed=2020):
    """KID: polynomial_mmd averaged over `subsets` random subsets of min(subset_size, N_real,
    N_fake) images from each set, drawn without replacement by numpy's RandomState(seed) in
    torch-fidelity's order (its defaults: 100 subsets of 1000, seed 2020), so the same features give
    its figure. Returns {"mean", "std", "subset_size"}."""
    x, y = _f64(real), _f64(fake)
    m = min(subset_size, len(x), len(y))
    if m < 2:
        raise ValueError(f"KID needs at least 2 images in each set, got {len(x)} and {len(y)}")
    rng = np.random.RandomState(seed)
    mmds = []
    for _ in range(subsets):
        i = torch.from_numpy(rng.choice(len(x), m, replace=False))
        j = torch.from_numpy(rng.choice(len(y), m, replace=False))
        mmds.append(polynomial_mmd(x[i], y[j]))
    return dict(mean=float(np.mean(mmds)), std=float(np.std(mmds)), subset_size=m)


# ----------------------------------------------------------------------------------------------
# CMMD
# ----------------------------------------------------------------------------------------------

CMMD_SIGMA, CMMD_SCALE = 10.0, 1000.0


def clip_mmd(real, fake, sigma=CMMD_SIGMA, scale=CMMD_SCALE):
    """CMMD (Jayasumana et al. 2024): MMD^2 between L2-normalised CLIP image embeddings with the
    Gaussian RBF kernel exp(-||a - b||^2 / (2 sigma^2)), sigma 10, times 1000; the estimator
    averages every kernel entry (diagonal included), as the authors' code does.
    Sets may differ in size."""
    x, y = (f / f.norm(dim=1, keepdim=True).clamp_min(1e-12) for f in (_f64(real), _f64(fake)))
    gamma = 1 / (2 * sigma**2)

    def k(a, b):
        d2 = (a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2 * a @ b.T).clamp_min(0)
        return torch.exp(-gamma * d2).mean()

    return (scale * (k(x, x) + k(y, y) - 2 * k(x, y))).item()


# ----------------------------------------------------------------------------------------------
# Precision and recall
# ----------------------------------------------------------------------------------------------


def _kth_radius(f, k, block=1024):
    """Distance of every row of f to its k-th nearest other row (the row itself, at
    distance 0, not counted)."""
    out = []
    for i in range(0, len(f), block):
        d = torch.cdist(f[i : i + block], f)
        out.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(out)


def _covered(points, centres, radii, block=1024):
    """Share of `points` inside at least one ball (centres[j], radii[j])."""
    hits = []
    for i in range(0, len(points), block):
        hits.append((torch.cdist(points[i : i + block], centres) <= radii[None, :]).any(1))
    return torch.cat(hits).double().mean().item()


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019): each set's manifold is the union of
    balls around its features reaching the k-th nearest neighbour (k = 3). Precision = share of fake
    features inside the real manifold (fidelity), recall = share of real features inside the
    fake manifold (diversity)."""
    x, y = _f64(real), _f64(fake)
    if min(len(x), len(y)) <= k:
        raise ValueError(
            f"precision/recall with k={k} needs more than {k} images in each set, got {len(x)} and "
            f"{len(y)}"
        )
    return dict(
        precision=_covered(y, x, _kth_radius(x, k)), recall=_covered(x, y, _kth_radius(y, k)), k=k
    )


# ----------------------------------------------------------------------------------------------
# Feature cache
# ----------------------------------------------------------------------------------------------


def cache_key(files, **settings):
    """A key for a set of image files (their paths, sizes and modification times) and the settings
    that make its features (the network file, resize mode, size...): the cache is reused only
    for the very same inputs."""
    h = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    for f in files:
        st = os.stat(f)
        h.update(f"{Path(f).resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:20]


def cached_features(cache_dir, name, key, compute):
    """Features (N, D) float64 from cache_dir/{name}-{key}.npy, else compute()
    written there (atomically)."""
    path = Path(cache_dir) / f"{name}-{key}.npy"
    if path.is_file():
        return torch.from_numpy(np.load(path))
    f = _f64(compute())
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npy")
    np.save(tmp, f.numpy())
    os.replace(tmp, path)
    return f


def finite_or_none(x):
    """x when it is a finite number, else None (JSON has no NaN)."""
    return x if isinstance(x, (int, float)) and math.isfinite(x) else None
