"""Deterministic, view-independent randomness: integer hashing and band-limited value noise.

Everything procedural is keyed by world position or by object ids, never by the pixel grid, so that
a place looks the same from every frame and at every level; octaves finer than the pixel size are
left out, as area-averaging over a pixel would remove them.
"""

import math

import numpy as np


def _hash01(*keys) -> np.ndarray:
    """Uniform [0, 1) from integer keys (broadcast), splitmix64 finaliser."""
    h = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        return _mix64(h, keys)


def _mix64(h, keys):
    for k in keys:
        h = (np.asarray(k).astype(np.uint64) + h) * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
    return (h >> np.uint64(11)).astype(np.float64) / float(1 << 53)


_LATTICE = np.random.default_rng(20250105).random((257, 257)).astype(np.float32) * 2 - 1
_LATTICE[256, :] = _LATTICE[0, :]
_LATTICE[:, 256] = _LATTICE[:, 0]
_LATTICE_FLAT = _LATTICE.ravel()


def _bspline(f):
    """Cubic B-spline weights (..., 4) of the lattice points i-1..i+2 for fractions f (...)."""
    f2, f3 = f * f, f * f * f
    return np.stack([(1 - f) ** 3, 3 * f3 - 6 * f2 + 4, -3 * f3 + 3 * f2 + 3 * f + 1, f3], -1) / 6


def _interp_matrix(t, n):
    """(..., k, n) cubic B-spline weights of points t (..., k) >= 1 onto lattice 0..n-1."""
    i = np.floor(t)
    w = _bspline(t - i).astype(np.float32)  # (..., k, 4)
    flat = (np.arange(i.size) * n + i.astype(np.int64).ravel() - 1)[:, None] + np.arange(4)
    W = np.zeros(t.shape + (n,), np.float32)
    W.ravel()[flat.ravel()] = w.ravel()
    return W


# B-spline smoothing lowers the lattice spread (std 0.58 -> 0.28); restore most of it
_SPLINE_GAIN = 1.5


def _noise(x, y, wavelength, key):
    """Smooth value noise (about [-1, 1]) at world points (x, y broadcastable), lattice spacing
    = wavelength, cubic B-spline interpolated (no lattice-aligned plateaus).

    On a pixel grid (x varies along the last axis only, y along the one before) the lookup is
    separable: noise = Wy @ lattice block @ Wx^T, a few small matmuls."""
    ox, oy = 97.31 * (key % 997) + 13.7, 61.13 * (key % 991) + 5.3
    u, v = x / wavelength + ox, y / wavelength + oy
    if u.ndim >= 2 and u.ndim == v.ndim and u.shape[-2] == 1 and v.shape[-1] == 1:
        u1, v1 = u[..., 0, :], v[..., :, 0]  # (..., k)
        ub, vb = np.floor(u1.min(-1, keepdims=True)) - 1, np.floor(v1.min(-1, keepdims=True)) - 1
        nu, nv = int(np.max(u1 - ub)) + 3, int(np.max(v1 - vb)) + 3
        Wu, Wv = _interp_matrix(u1 - ub, nu), _interp_matrix(v1 - vb, nv)  # (..., k, n)
        rows = (vb.astype(np.int64) + np.arange(nv)) & 255  # (..., nv)
        cols = (ub.astype(np.int64) + np.arange(nu)) & 255
        block = _LATTICE[rows[..., :, None], cols[..., None, :]]  # (..., nv, nu)
        return _SPLINE_GAIN * ((Wv @ block) @ np.ascontiguousarray(np.swapaxes(Wu, -1, -2)))
    u, v = np.broadcast_arrays(u, v)  # scattered points
    iu, iv = np.floor(u), np.floor(v)
    wu, wv = _bspline(u - iu), _bspline(v - iv)  # (..., 4)
    ar = np.arange(4)
    rows = (iv.astype(np.int64)[..., None] - 1 + ar) & 255  # (..., 4)
    cols = (iu.astype(np.int64)[..., None] - 1 + ar) & 255
    vals = _LATTICE_FLAT[rows[..., :, None] * 257 + cols[..., None, :]]  # (..., 4, 4)
    return _SPLINE_GAIN * np.einsum("...a,...ab,...b->...", wv, vals, wu)


def _band(wavelength, res):
    """Weight of a noise octave at pixel size res: 1 when >= 4 px, 0 when <= 2 px (averaged out,
    and a value-noise lattice finer than that would show as blocky aliasing)."""
    return min(max((wavelength / res - 2.0) / 2.0, 0.0), 1.0)


def _noise_fields(xs, ys, wavelengths, keys):
    """Several _noise fields on one pixel grid, xs (1, W), ys (H, 1) -> (O, H, W), one batched
    matmul; field o has lattice spacing wavelengths[o] and key keys[o]."""
    lam = np.asarray(wavelengths, np.float64)[:, None]
    # (O, W), as _noise
    u = xs.reshape(1, -1) / lam + np.array([[97.31 * (j % 997) + 13.7] for j in keys])
    v = ys.reshape(1, -1) / lam + np.array([[61.13 * (j % 991) + 5.3] for j in keys])  # (O, H)
    ub, vb = np.floor(u.min(1, keepdims=True)) - 1, np.floor(v.min(1, keepdims=True)) - 1
    n = int(max(np.max(u - ub), np.max(v - vb))) + 3
    Wu, Wv = _interp_matrix(u - ub, n), _interp_matrix(v - vb, n)  # (O, W, n), (O, H, n)
    rows = (vb.astype(np.int64) + np.arange(n)) & 255
    cols = (ub.astype(np.int64) + np.arange(n)) & 255
    block = _LATTICE[rows[:, :, None], cols[:, None, :]]  # (O, n, n)
    return _SPLINE_GAIN * ((Wv @ block) @ np.ascontiguousarray(Wu.transpose(0, 2, 1)))


def _fractal(xs, ys, res, wavelengths, key):
    """Band-limited sum of noise octaves on a pixel grid, xs (1, W), ys (H, 1) -> (H, W),
    scaled to unit-octave variance: octaves below the pixel size average out, so the variance
    left falls with the pixel size, as area-averaging does."""
    w = np.array([_band(lam, res) for lam in wavelengths])
    on = np.nonzero(w > 0)[0]
    if not len(on):
        return np.zeros((ys.size, xs.size), np.float32)
    octaves = _noise_fields(xs, ys, np.asarray(wavelengths)[on], [key * 31 + int(o) for o in on])
    return np.tensordot(w[on].astype(np.float32), octaves, 1) / math.sqrt(len(w))
