"""Rasterisation: signed distances of the object shapes -> coverage of each
object on the pixel grid.

Objects of two pixels and more get a one-pixel edge ramp (about their area coverage); smaller
objects a soft footprint whose total equals their true area, so that sub-pixel things add
their area-averaged colour.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .noise import _noise
from .world import SHAPES, resolution_m


@dataclass
class Frame:
    """The pixel grid: size x size pixels of res metres, west edge x0, north edge y1."""

    level: float
    size: int
    res: float
    x0: float
    y1: float

    @property
    def xs(self):  # (1, W) pixel-centre eastings
        return (self.x0 + (np.arange(self.size) + 0.5) * self.res)[None, :]

    @property
    def ys(self):  # (H, 1) pixel-centre northings
        return (self.y1 - (np.arange(self.size) + 0.5) * self.res)[:, None]

    def contains(self, x, y):
        span = self.size * self.res
        return (x >= self.x0) & (x < self.x0 + span) & (y <= self.y1) & (y > self.y1 - span)


def _frame(scene, level, size, center=None):
    if not (isinstance(size, (int, np.integer)) and size > 0):
        raise ValueError(f"size must be a positive int, got {size!r}")
    if not (math.isfinite(float(level)) and 0.0 < float(level) <= 24.0):
        raise ValueError(f"level must be a Google map level in (0, 24], got {level!r}")
    res = resolution_m(level)
    cx, cy = scene.focus if center is None else center
    return Frame(float(level), int(size), res, cx - size * res / 2, cy + size * res / 2)


def _sdf(shape, g, X, Y, res=0.0):
    """Signed distance (metres, < 0 inside) of objects g (n, G) at points X (n,1,k), Y (n,k,1).
    Edge noise finer than the pixel size res is left out (it would average away)."""
    c = [g[:, i, None, None] for i in range(g.shape[1])]
    if shape == "disk":
        dx, dy = X - c[0], Y - c[1]
        return np.sqrt(dx * dx + dy * dy) - c[2]
    if shape == "ring":
        dx, dy = X - c[0], Y - c[1]
        return np.abs(np.sqrt(dx * dx + dy * dy) - c[2]) - c[3]
    if shape == "box":
        dx, dy, ca, sa = X - c[0], Y - c[1], np.cos(c[4]), np.sin(c[4])
        u = np.abs(dx * ca + dy * sa) - c[2]
        v = np.abs(dy * ca - dx * sa) - c[3]
        mu, mv = np.maximum(u, 0), np.maximum(v, 0)
        return np.sqrt(mu * mu + mv * mv) + np.minimum(np.maximum(u, v), 0)
    if shape == "seg":
        bx, by = c[2] - c[0], c[3] - c[1]
        px, py = X - c[0], Y - c[1]
        h = np.clip((px * bx + py * by) / np.maximum(bx * bx + by * by, 1e-9), 0, 1)
        qx, qy = px - bx * h, py - by * h
        return np.sqrt(qx * qx + qy * qy) - c[4]
    if shape == "blob":
        dx, dy, ca, sa = X - c[0], Y - c[1], np.cos(c[4]), np.sin(c[4])
        rmin = np.minimum(c[2], c[3])
        eu, ev = (dx * ca + dy * sa) / c[2], (dy * ca - dx * sa) / c[3]
        rn = np.sqrt(eu * eu + ev * ev)
        wob = c[5] * rmin * (0.7 * _noise(X, Y, 0.7 * rmin, 1) + 0.3 * _noise(X, Y, 0.2 * rmin, 2))
        fine = 4.0 * _noise(X, Y, 23.0, 3) if res < 12.0 else 0.0
        return (rn - 1) * rmin + wob + fine - c[6]
    if shape == "coast":
        wob = c[3] * (
            _noise(X, Y, 1900.0, 4) + (0.25 * _noise(X, Y, 330.0, 5) if res < 160 else 0.0)
        )
        fine = 3.0 * _noise(X, Y, 29.0, 6) if res < 15.0 else 0.0
        return c[2] - X * c[0] - Y * c[1] + wob + fine
    raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")


def _sdf_bound(shape, g, x, y):
    """An upper bound of the signed distance at one point (x, y), per object (N,)."""
    if shape == "blob":
        dx, dy, ca, sa = x - g[:, 0], y - g[:, 1], np.cos(g[:, 4]), np.sin(g[:, 4])
        rmin = np.minimum(g[:, 2], g[:, 3])
        rn = np.hypot((dx * ca + dy * sa) / g[:, 2], (dy * ca - dx * sa) / g[:, 3])
        return (rn - 1) * rmin + g[:, 5] * rmin + 4.0 - g[:, 6]
    if shape == "coast":
        return g[:, 2] - x * g[:, 0] - y * g[:, 1] + 1.25 * g[:, 3] + 3.0
    return _sdf(shape, g, np.full((1, 1, 1), x), np.full((1, 1, 1), y))[:, 0, 0]


def _bbox(shape, g):
    """World bounding boxes (xmin, xmax, ymin, ymax), each (N,)."""
    if shape in ("disk", "ring"):
        r = g[:, 2] + (g[:, 3] if shape == "ring" else 0.0)
        return g[:, 0] - r, g[:, 0] + r, g[:, 1] - r, g[:, 1] + r
    if shape == "box":
        ca, sa = np.abs(np.cos(g[:, 4])), np.abs(np.sin(g[:, 4]))
        ex, ey = g[:, 2] * ca + g[:, 3] * sa, g[:, 2] * sa + g[:, 3] * ca
        return g[:, 0] - ex, g[:, 0] + ex, g[:, 1] - ey, g[:, 1] + ey
    if shape == "seg":
        return (
            np.minimum(g[:, 0], g[:, 2]) - g[:, 4],
            np.maximum(g[:, 0], g[:, 2]) + g[:, 4],
            np.minimum(g[:, 1], g[:, 3]) - g[:, 4],
            np.maximum(g[:, 1], g[:, 3]) + g[:, 4],
        )
    if shape == "blob":
        r = np.maximum(g[:, 2], g[:, 3]) * (1 + g[:, 5]) + 8.0 + np.maximum(g[:, 6], 0)
        return g[:, 0] - r, g[:, 0] + r, g[:, 1] - r, g[:, 1] + r
    inf = np.full(len(g), np.inf)
    return -inf, inf, -inf, inf  # coast: unbounded


def _area(shape, g):
    if shape == "disk":
        return np.pi * g[:, 2] ** 2
    if shape == "ring":
        return 4 * np.pi * g[:, 2] * g[:, 3]
    if shape == "box":
        return 4 * g[:, 2] * g[:, 3]
    if shape == "seg":
        return 2 * g[:, 4] * np.hypot(g[:, 2] - g[:, 0], g[:, 3] - g[:, 1]) + np.pi * g[:, 4] ** 2
    return np.pi * g[:, 2] * g[:, 3]


def _windows(layer, fr):
    """Pixel windows (c0, r0, kc, kr) of the objects touching the frame, and flags."""
    S, p = fr.size, fr.res
    xmin, xmax, ymin, ymax = _bbox(layer.shape, layer.geom)
    e = np.stack([xmin - fr.x0, xmax - fr.x0, fr.y1 - ymax, fr.y1 - ymin]) / p  # (4, N) in pixels
    with np.errstate(invalid="ignore"):
        c0, c1, r0, r1 = np.floor(np.minimum(np.maximum(e, -4), S + 4)).astype(np.int64) + [
            [-1],
            [1],
            [-1],
            [1],
        ]
    keep = (c1 >= 0) & (c0 < S) & (r1 >= 0) & (r0 < S)
    covers = (c0 < 0) & (r0 < 0) & (c1 >= S) & (r1 >= S)  # bbox covers the frame
    small = np.maximum(xmax - xmin, ymax - ymin) < 2 * p
    c0 = np.where(small, c0, np.maximum(c0, 0))
    r0 = np.where(small, r0, np.maximum(r0, 0))
    top = S - 1 + small * 8
    return keep, covers, small, c0, r0, np.minimum(c1, top) - c0 + 1, np.minimum(r1, top) - r0 + 1


def _bucket(k, cap):
    """Window sizes rounded up to a power of two (capped), so that objects batch."""
    return np.minimum(2 ** np.ceil(np.log2(np.maximum(k, 1))).astype(np.int64), cap)


def _rasterize(layer, fr, stack=None):
    """Coverage of each object: (pix (M,) flat pixel index, alpha (M,), obj (M,) object index).
    `stack` (N,): layer number of each object when several layers are rasterised together.

    Objects >= 2 px: alpha = clip(1/2 - sdf/res) (a one-pixel edge ramp ~ area coverage).
    Objects < 2 px: a soft footprint rescaled so that its total equals area / res^2, so a
    sub-pixel object contributes its true area (area-averaged colour). Objects are evaluated
    in batches of equal window sizes (kr, kc)."""
    S, p = fr.size, fr.res
    keep, covers, small, c0, r0, kc, kr = _windows(layer, fr)
    maybe = np.nonzero(covers)[0]
    if len(maybe):
        half = S * p / 2
        lip = 2.0 if layer.shape in ("blob", "coast") else 1.0  # bound on |grad sdf| (ellipses)
        d = _sdf_bound(layer.shape, layer.geom[maybe], fr.x0 + half, fr.y1 - half)
        full = maybe[d < -lip * 1.42 * half - p]
        if len(full):  # an object covers the whole frame: it hides its
            f = full[-1] if stack is None else full[np.argmax(stack[full])]  # layer and those below
            if stack is None:
                return np.arange(S * S), np.ones(S * S, np.float32), np.full(S * S, f)
            keep = keep & (stack > stack[f])
            rest = (
                _rasterize(layer.subset(keep), fr) if keep.any() else (np.zeros(0, np.int64),) * 3
            )
            return (
                np.concatenate([np.arange(S * S), rest[0]]),
                np.concatenate([np.ones(S * S, np.float32), rest[1]]),
                np.concatenate([np.full(S * S, f), np.nonzero(keep)[0][rest[2]]]),
            )
    cap = np.where(small, 8, S)
    group = np.where(keep, (_bucket(kr, cap) * 1024 + _bucket(kc, cap)) * 2 + small, -1)
    out = []
    for gk in sorted(set(group[keep].tolist())):
        kb, is_small = gk // 2, bool(gk % 2)
        idx = np.nonzero(group == gk)[0]
        cc, rr = c0[idx, None] + np.arange(kb % 1024), r0[idx, None] + np.arange(kb // 1024)
        X = (fr.x0 + (cc + 0.5) * p).astype(np.float32)[:, None, :]  # (n, 1, kc)
        Y = (fr.y1 - (rr + 0.5) * p).astype(np.float32)[:, :, None]  # (n, kr, 1)
        d = _sdf(layer.shape, layer.geom[idx].astype(np.float32), X, Y, p)  # (n, kr, kc)
        if is_small:
            a = np.maximum(1.0 - d / p, 0)
            scale = _area(layer.shape, layer.geom[idx]) / p**2 / np.maximum(a.sum((1, 2)), 1e-9)
            a = np.minimum(a * scale[:, None, None].astype(np.float32), 1.0)
        else:
            a = np.minimum(np.maximum(0.5 - d / p, 0), 1.0)
        ok = (((rr >= 0) & (rr < S))[:, :, None] & ((cc >= 0) & (cc < S))[:, None, :]) & (a > 1e-3)
        n_i, r_i, c_i = np.nonzero(ok)
        out.append((rr[n_i, r_i] * S + cc[n_i, c_i], a[n_i, r_i, c_i], idx[n_i]))
    if not out:
        e = np.zeros(0, np.int64)
        return e, np.zeros(0, np.float32), e
    return tuple(np.concatenate(z) for z in zip(*out))


def _cull(layer, fr, margin=0.0):
    xmin, xmax, ymin, ymax = _bbox(layer.shape, layer.geom)
    span = fr.size * fr.res
    keep = (
        (xmax >= fr.x0 - margin)
        & (xmin <= fr.x0 + span + margin)
        & (ymax >= fr.y1 - span - margin)
        & (ymin <= fr.y1 + margin)
    )
    return layer.subset(keep)
