"""The procedural Earth: seeded synthetic overhead scenes at any Google map level.

A scene is a description in world coordinates (metres, x east, y north; a list of layers of
objects, each with a kind, a geometry and a material) generated from (seed, class). Rendering
samples it onto a pixel grid at level L, resolution_m = 2 ** (17 - L), so that objects keep
their real sizes: the same scene shows single houses at level 18 and a patchwork of land cover
at level 11. Small things are area-averaged: objects below two pixels get a footprint whose
total coverage equals their true area, textures are band-limited by the pixel size, and blocks
of houses or stands of trees are drawn as their mean colour until the level resolves them.

Captions are written from what the renderer drew in the frame (counts, colours, layout), and
the same composite carries NIR and SAR channels for the paired modalities (PAN, NIR, SAR-like,
haze, cloud with its mask).

    scene = make_scene(seed=3, cls=CLASSES.index("circular_farmland"))
    img = render(scene, level=12.5, size=64)          # (H, W, 3) uint8
    text = caption(scene, 12.5, 64, np.random.default_rng(0))
    mods = modalities(scene, 12.5, 64, seed=0)       # pan, nir, sar, haze, cloud, cloud_mask
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Callable

import numpy as np
import torch

CLASSES = [
    "dense_residential", "sparse_residential", "industrial", "farmland", "circular_farmland",
    "forest", "river", "lake", "beach", "desert", "bare_land", "airport",
]
LEVEL_RANGE = (10.0, 18.0)
EXTENT_M = 16384.0  # side of the square a scene describes, centred on (0, 0): level 10 at 128 px


def resolution_m(level: float) -> float:
    """Metres per pixel at Google map level L: 2 ** (17 - L) (L=17 -> 1 m, L=10 -> 128 m)."""
    return 2.0 ** (17.0 - float(level))


# ----------------------------------------------------------------------------------------------
# Materials: one row per material, N_CH channels composited together
# ----------------------------------------------------------------------------------------------
R, G, B, NIR, SAR, TEX, STRIPE_A, STRIPE_B, MOSAIC = range(9)
N_CH = 9
# name: (colour word, R, G, B, NIR reflectance, SAR backscatter, texture amplitude); all 0..255
# except texture. Built-up is bright in SAR (double bounce), water and smooth asphalt dark.
_MATERIALS = {
    "grass": ("green", 98, 112, 72, 175, 70, .10),
    "dry_grass": ("yellowish", 146, 140, 100, 125, 60, .10),
    "meadow": ("light green", 118, 130, 80, 185, 70, .08),
    "crop_green": ("green", 80, 112, 56, 215, 95, .06),
    "crop_light": ("light green", 120, 138, 74, 200, 90, .06),
    "crop_yellow": ("yellow", 176, 160, 102, 140, 80, .06),
    "soil": ("brown", 128, 104, 80, 95, 55, .09),
    "bare": ("brown", 156, 136, 108, 115, 50, .11),
    "rock": ("dark brown", 96, 84, 72, 90, 110, .14),
    "sand": ("sandy", 204, 190, 156, 135, 35, .04),
    "dune": ("orange", 212, 176, 128, 140, 30, .05),
    "dune_dark": ("orange", 190, 150, 104, 125, 40, .06),
    "forest": ("dark green", 50, 70, 46, 200, 120, .16),
    "canopy_gap": ("dark", 30, 40, 30, 90, 60, .10),
    "tree": ("dark green", 46, 74, 42, 215, 130, .14),
    "tree_light": ("green", 70, 96, 52, 210, 125, .14),
    "water": ("dark blue", 38, 58, 66, 12, 6, .03),
    "river": ("greenish", 60, 78, 72, 18, 8, .03),
    "sea": ("blue", 30, 58, 84, 8, 10, .03),
    "shallow": ("turquoise", 52, 96, 106, 20, 14, .04),
    "foam": ("white", 214, 220, 220, 60, 60, .05),
    "asphalt": ("grey", 78, 78, 80, 55, 25, .06),
    "dirt_road": ("light brown", 170, 152, 124, 110, 45, .06),
    "concrete": ("light grey", 164, 160, 150, 110, 70, .05),
    "tarmac": ("grey", 104, 104, 102, 70, 30, .04),
    "marking": ("white", 226, 226, 222, 120, 40, .02),
    "roof_red": ("red", 152, 84, 66, 90, 225, .06),
    "roof_brown": ("brown", 122, 92, 72, 85, 220, .06),
    "roof_grey": ("grey", 120, 118, 116, 95, 230, .05),
    "roof_dark": ("dark grey", 74, 70, 66, 70, 215, .05),
    "roof_white": ("white", 208, 208, 202, 165, 240, .04),
    "roof_blue": ("blue", 92, 114, 142, 100, 240, .04),
    "tank": ("white", 220, 220, 214, 170, 255, .02),
    "aircraft": ("white", 232, 232, 232, 175, 255, .01),
    "yard_dense": ("grey", 110, 106, 98, 90, 80, .08),
}
# How strongly a material takes the scene's patch mosaics (_tint: stands of trees, soil and sand patches, crop
# vigour): natural surfaces vary over tens to hundreds of metres, water and built-up surfaces do not.
_MOSAIC_RESPONSE = {"grass": .8, "dry_grass": .8, "meadow": .8, "crop_green": .5, "crop_light": .5, "crop_yellow": .5,
                    "soil": .8, "bare": 1.0, "rock": .6, "sand": .8, "dune": .8, "dune_dark": .8, "forest": 1.0,
                    "canopy_gap": .6, "tree": .8, "tree_light": .8}
_MAT_NAMES = list(_MATERIALS)
_MAT_TABLE = np.zeros((len(_MAT_NAMES), N_CH), np.float32)  # (M, N_CH)
for _i, (_name, (_word, *_vals)) in enumerate(_MATERIALS.items()):
    _MAT_TABLE[_i, :6] = _vals
    _MAT_TABLE[_i, MOSAIC] = _MOSAIC_RESPONSE.get(_name, 0.0)
_MAT_WORD = np.array([w for w, *_ in _MATERIALS.values()])
_ROOFS = ["roof_red", "roof_brown", "roof_grey", "roof_dark", "roof_white"]


def _mats(rng, names, p=None, n=None, jitter=0.06):
    """Material rows (N, N_CH) and colour words (N,) for N objects drawn from `names` (probs p)."""
    idx = np.array([_MAT_NAMES.index(m) for m in names])
    if n is None:
        pick = idx
    elif len(idx) == 1:
        pick = np.repeat(idx, n)
    else:
        prob = np.ones(len(idx)) if p is None else np.asarray(p, np.float64)
        k = np.searchsorted(np.cumsum(prob), rng.random(n) * prob.sum(), side="right")
        pick = idx[np.minimum(k, len(idx) - 1)]
    mat = _MAT_TABLE[pick].copy()
    mat[:, :3] *= 1.0 + jitter * rng.standard_normal((len(pick), 1)).astype(np.float32)
    return mat, _MAT_WORD[pick]


# ----------------------------------------------------------------------------------------------
# Scene description
# ----------------------------------------------------------------------------------------------
# geometry columns per shape (world metres, angles in radians):
#   box (cx, cy, hx, hy, ang) | disk (cx, cy, r) | seg (x0, y0, x1, y1, hw) capsule of half-width hw
#   blob (cx, cy, rx, ry, ang, wobble, grow) noisy ellipse grown by `grow` metres
#   coast (nx, ny, d, wobble) noisy half-plane, inside where x nx + y ny > d (the sea side)
#   ring (cx, cy, r, hw) circle of radius r drawn hw either side (wheel tracks)
SHAPES = {"box": 5, "disk": 3, "seg": 5, "blob": 7, "coast": 4, "ring": 4}
KINDS = [
    "urban", "block", "house", "yard_tree", "road", "track", "river", "bank", "lake",
    "shore", "pond", "sea", "shallow", "foam", "beach", "farm", "field", "farmhouse", "pivot", "forest",
    "tree", "clearing", "rock", "scrub", "shrub", "zone", "factory", "tank", "runway", "taxiway", "apron",
    "airfield", "terminal", "aircraft", "wing", "marking", "wheel_track",
]


@dataclass
class Layer:
    """N objects of one kind and shape, drawn together (in order of `Scene.layers`)."""
    kind: str
    shape: str
    geom: np.ndarray                 # (N, G) float64, G = SHAPES[shape]
    mat: np.ndarray                  # (N, N_CH) float32 material rows
    color: np.ndarray                # (N,) colour words, for captions
    ids: np.ndarray | None = None    # (N,) int64 stable ids (keys of procedural children)
    expand: Callable | None = None   # (scene, layer, frame) -> [Layer]: detail when zoomed in
    lod_m: float = 0.0               # expand when resolution_m <= lod_m
    mat_open: np.ndarray | None = None  # (N, N_CH) material under the detail when expanded
    draw: bool = True                # False: a region that only holds procedural detail

    def __post_init__(self):
        self.geom = np.asarray(self.geom, np.float64).reshape(-1, SHAPES[self.shape])
        if self.ids is None:
            self.ids = np.arange(len(self.geom), dtype=np.int64)

    def subset(self, keep):
        return replace(self, geom=self.geom[keep], mat=self.mat[keep], color=self.color[keep],
                       ids=self.ids[keep],
                       mat_open=None if self.mat_open is None else self.mat_open[keep])


@dataclass
class Scene:
    """A world-coordinate description of one place: ground, layers of objects, a focus point."""
    seed: int
    label: int
    ground: np.ndarray               # (2, N_CH) two ground materials mixed by a coarse noise
    layers: list[Layer]
    focus: tuple[float, float] = (0.0, 0.0)
    params: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return CLASSES[self.label]

    def objects(self) -> list[dict]:
        """The top-level objects as plain dicts (kind, shape, geometry, colour)."""
        return [dict(kind=L.kind, shape=L.shape, geom=L.geom[i].tolist(), color=str(L.color[i]))
                for L in self.layers for i in range(len(L.geom))]


def material(name: str) -> np.ndarray:
    """The (N_CH,) channel row of a named material (R, G, B, NIR, SAR, texture, stripes, mosaic)."""
    if name not in _MATERIALS:
        raise ValueError(f"unknown material {name!r}; expected one of {_MAT_NAMES}")
    return _MAT_TABLE[_MAT_NAMES.index(name)].copy()


def layer(kind: str, shape: str, geom, material_name: str) -> Layer:
    """A layer of objects all of one material, for hand-made scenes (geom (N, SHAPES[shape]))."""
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {KINDS}")
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; expected one of {sorted(SHAPES)}")
    geom = np.asarray(geom, np.float64)
    if geom.ndim != 2 or geom.shape[1] != SHAPES[shape]:
        raise ValueError(f"{shape} geometry must have shape (N, {SHAPES[shape]}), got {geom.shape}")
    row = material(material_name)
    return Layer(kind, shape, geom, np.repeat(row[None], len(geom), 0),
                 np.full(len(geom), _MATERIALS[material_name][0]))


# ----------------------------------------------------------------------------------------------
# Hashing and noise (deterministic, view-independent)
# ----------------------------------------------------------------------------------------------
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
    w = _bspline(t - i).astype(np.float32)                               # (..., k, 4)
    flat = (np.arange(i.size) * n + i.astype(np.int64).ravel() - 1)[:, None] + np.arange(4)
    W = np.zeros(t.shape + (n,), np.float32)
    W.ravel()[flat.ravel()] = w.ravel()
    return W


_SPLINE_GAIN = 1.5  # B-spline smoothing lowers the lattice spread (std 0.58 -> 0.28); restore most of it


def _noise(x, y, wavelength, key):
    """Smooth value noise (about [-1, 1]) at world points (x, y broadcastable), lattice spacing
    = wavelength, cubic B-spline interpolated (no lattice-aligned plateaus).

    On a pixel grid (x varies along the last axis only, y along the one before) the lookup is
    separable: noise = Wy @ lattice block @ Wx^T, a few small matmuls."""
    ox, oy = 97.31 * (key % 997) + 13.7, 61.13 * (key % 991) + 5.3
    u, v = x / wavelength + ox, y / wavelength + oy
    if u.ndim >= 2 and u.ndim == v.ndim and u.shape[-2] == 1 and v.shape[-1] == 1:
        u1, v1 = u[..., 0, :], v[..., :, 0]                                  # (..., k)
        ub, vb = np.floor(u1.min(-1, keepdims=True)) - 1, np.floor(v1.min(-1, keepdims=True)) - 1
        nu, nv = int(np.max(u1 - ub)) + 3, int(np.max(v1 - vb)) + 3
        Wu, Wv = _interp_matrix(u1 - ub, nu), _interp_matrix(v1 - vb, nv)  # (..., k, n)
        rows = (vb.astype(np.int64) + np.arange(nv)) & 255                   # (..., nv)
        cols = (ub.astype(np.int64) + np.arange(nu)) & 255
        block = _LATTICE[rows[..., :, None], cols[..., None, :]]             # (..., nv, nu)
        return _SPLINE_GAIN * ((Wv @ block) @ np.ascontiguousarray(np.swapaxes(Wu, -1, -2)))
    u, v = np.broadcast_arrays(u, v)                                         # scattered points
    iu, iv = np.floor(u), np.floor(v)
    wu, wv = _bspline(u - iu), _bspline(v - iv)                              # (..., 4)
    ar = np.arange(4)
    rows = (iv.astype(np.int64)[..., None] - 1 + ar) & 255                   # (..., 4)
    cols = (iu.astype(np.int64)[..., None] - 1 + ar) & 255
    vals = _LATTICE_FLAT[rows[..., :, None] * 257 + cols[..., None, :]]      # (..., 4, 4)
    return _SPLINE_GAIN * np.einsum("...a,...ab,...b->...", wv, vals, wu)


def _band(wavelength, res):
    """Weight of a noise octave at pixel size res: 1 when >= 4 px, 0 when <= 2 px (averaged out,
    and a value-noise lattice finer than that would show as blocky aliasing)."""
    return min(max((wavelength / res - 2.0) / 2.0, 0.0), 1.0)


def _noise_fields(xs, ys, wavelengths, keys):
    """Several _noise fields on one pixel grid, xs (1, W), ys (H, 1) -> (O, H, W), one batched matmul;
    field o has lattice spacing wavelengths[o] and key keys[o]."""
    lam = np.asarray(wavelengths, np.float64)[:, None]
    u = xs.reshape(1, -1) / lam + np.array([[97.31 * (j % 997) + 13.7] for j in keys])  # (O, W), as _noise
    v = ys.reshape(1, -1) / lam + np.array([[61.13 * (j % 991) + 5.3] for j in keys])   # (O, H)
    ub, vb = np.floor(u.min(1, keepdims=True)) - 1, np.floor(v.min(1, keepdims=True)) - 1
    n = int(max(np.max(u - ub), np.max(v - vb))) + 3
    Wu, Wv = _interp_matrix(u - ub, n), _interp_matrix(v - vb, n)       # (O, W, n), (O, H, n)
    rows = (vb.astype(np.int64) + np.arange(n)) & 255
    cols = (ub.astype(np.int64) + np.arange(n)) & 255
    block = _LATTICE[rows[:, :, None], cols[:, None, :]]                 # (O, n, n)
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


# ----------------------------------------------------------------------------------------------
# Rasterisation: signed distances -> coverage, per object, on the pixel grid
# ----------------------------------------------------------------------------------------------
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
        wob = c[3] * (_noise(X, Y, 1900.0, 4) + (0.25 * _noise(X, Y, 330.0, 5) if res < 160 else 0.0))
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
        return (np.minimum(g[:, 0], g[:, 2]) - g[:, 4], np.maximum(g[:, 0], g[:, 2]) + g[:, 4],
                np.minimum(g[:, 1], g[:, 3]) - g[:, 4], np.maximum(g[:, 1], g[:, 3]) + g[:, 4])
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
    e = np.stack([xmin - fr.x0, xmax - fr.x0, fr.y1 - ymax, fr.y1 - ymin]) / p   # (4, N) in pixels
    with np.errstate(invalid="ignore"):
        c0, c1, r0, r1 = np.floor(np.minimum(np.maximum(e, -4), S + 4)).astype(np.int64) + [[-1], [1], [-1], [1]]
    keep = (c1 >= 0) & (c0 < S) & (r1 >= 0) & (r0 < S)
    covers = (c0 < 0) & (r0 < 0) & (c1 >= S) & (r1 >= S)                    # bbox covers the frame
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
        lip = 2.0 if layer.shape in ("blob", "coast") else 1.0   # bound on |grad sdf| (ellipses)
        d = _sdf_bound(layer.shape, layer.geom[maybe], fr.x0 + half, fr.y1 - half)
        full = maybe[d < -lip * 1.42 * half - p]
        if len(full):                         # an object covers the whole frame: it hides its
            f = full[-1] if stack is None else full[np.argmax(stack[full])]   # layer and those below
            if stack is None:
                return np.arange(S * S), np.ones(S * S, np.float32), np.full(S * S, f)
            keep = keep & (stack > stack[f])
            rest = _rasterize(layer.subset(keep), fr) if keep.any() else (np.zeros(0, np.int64),) * 3
            return (np.concatenate([np.arange(S * S), rest[0]]),
                    np.concatenate([np.ones(S * S, np.float32), rest[1]]),
                    np.concatenate([np.full(S * S, f), np.nonzero(keep)[0][rest[2]]]))
    cap = np.where(small, 8, S)
    group = np.where(keep, (_bucket(kr, cap) * 1024 + _bucket(kc, cap)) * 2 + small, -1)
    out = []
    for gk in sorted(set(group[keep].tolist())):
        kb, is_small = gk // 2, bool(gk % 2)
        idx = np.nonzero(group == gk)[0]
        cc, rr = c0[idx, None] + np.arange(kb % 1024), r0[idx, None] + np.arange(kb // 1024)
        X = (fr.x0 + (cc + 0.5) * p).astype(np.float32)[:, None, :]   # (n, 1, kc)
        Y = (fr.y1 - (rr + 0.5) * p).astype(np.float32)[:, :, None]   # (n, kr, 1)
        d = _sdf(layer.shape, layer.geom[idx].astype(np.float32), X, Y, p)  # (n, kr, kc)
        if is_small:
            a = np.maximum(1.0 - d / p, 0)
            scale = _area(layer.shape, layer.geom[idx]) / p ** 2 / np.maximum(a.sum((1, 2)), 1e-9)
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
    keep = ((xmax >= fr.x0 - margin) & (xmin <= fr.x0 + span + margin)
            & (ymax >= fr.y1 - span - margin) & (ymin <= fr.y1 + margin))
    return layer.subset(keep)


def _visible_layers(scene, fr):
    """The layers drawn in this frame: culled, with detail expanded where the level resolves it."""
    out = []

    def visit(L):
        L = _cull(L, fr, margin=2 * fr.res)
        if not len(L.geom):
            return
        if L.expand is not None and fr.res <= L.lod_m:
            if L.draw:
                out.append(replace(L, mat=L.mat_open))
            for D in L.expand(scene, L, fr):   # children are drawn right after their parent
                visit(D)
        elif L.draw:
            out.append(L)

    for L in scene.layers:
        visit(L)
    return out


def _compose(scene, level, size, center=None):
    """Composite all layers: (channels (N_CH, H, W) float32, top kind id (H, W) int16, layers, frame)."""
    fr = _frame(scene, level, size, center)
    S, xs, ys = fr.size, fr.xs, fr.ys
    mix = _fractal(xs, ys, fr.res, (4096.0, 1024.0, 256.0), scene.seed) * 1.1 + scene.params.get("mix_bias", 0.0)
    mix = np.clip(0.5 + mix, 0, 1).astype(np.float32).reshape(-1, 1)
    ga, gb = scene.ground[0][None], scene.ground[1][None]
    out = ga + mix * (gb - ga)                                    # (S*S, N_CH) pixel-major
    top = np.full(S * S, -1, np.int16)
    layers = _visible_layers(scene, fr)
    runs = [[layers[0]]] if layers else []
    for L in layers[1:]:                      # consecutive layers of one shape: rasterise together
        if L.shape == runs[-1][-1].shape:
            runs[-1].append(L)
        else:
            runs.append([L])
    for run in runs:
        if len(run) == 1:
            per_layer = [(run[0], *_rasterize(run[0], fr))]
        else:
            start = np.cumsum([0] + [len(L.geom) for L in run])
            stack = np.repeat(np.arange(len(run)), np.diff(start))
            both = Layer(run[0].kind, run[0].shape, np.concatenate([L.geom for L in run]),
                         np.concatenate([L.mat for L in run]), np.concatenate([L.color for L in run]))
            pix, a, obj = _rasterize(both, fr, stack)
            lid = stack[obj]
            per_layer = [(L, pix[lid == j], a[lid == j], obj[lid == j] - start[j]) for j, L in enumerate(run)]
        for L, pix, a, obj in per_layer:
            _over(out, top, L, pix, a, obj, S)
    return out.T.reshape(N_CH, S, S), top.reshape(S, S), layers, fr


def _over(out, top, L, pix, a, obj, S):
    """Composite one layer's coverage over out (S*S, N_CH) in place ("over", Porter & Duff 1984)."""
    if len(pix):
        A = np.minimum(np.bincount(pix, a, S * S), 1.0).astype(np.float32)
        owner = np.zeros(S * S, np.int64)
        owner[pix] = obj                      # (where objects share a pixel, one of them wins)
        if len(pix) > S * S // 2:             # dense "over" compositing
            out += A[:, None] * (L.mat[owner] - out)
            top[A > 0.5] = KINDS.index(L.kind)
        else:
            m = np.unique(pix)
            Am = A[m, None]
            out[m] += Am * (L.mat[owner[m]] - out[m])
            top[m[Am[:, 0] > 0.5]] = KINDS.index(L.kind)


def _tint(scene, ch, fr):
    """Multiplicative RGB factor (3, H, W) of the scene's patch mosaics, or 1.

    params["mosaic"] = ((cell metres, amplitude, (r, g, b) direction), ...): per scale, patches about
    `cell` metres across (stands of trees, soil or sand patches), each with its own tone in [-1, 1]: a
    staggered grid of cells whose edges are warped by noise, so they read as patches, not squares. Their
    size is physical, so how many patches a frame holds tells its level (a fractal would not); under 2 px
    they average out. Each scale has its own colour direction (brightness for the small patches, a
    colour shift for the large ones), so that two scales cannot pass for each other at two levels."""
    spec = [(k, c, a, rgb, _band(c, fr.res)) for k, (c, a, rgb) in enumerate(scene.params.get("mosaic", ()))]
    spec = [z for z in spec if z[4] > 0]
    if not spec or not ch[MOSAIC].any():
        return 1.0
    xs, ys, seed = fr.xs, fr.ys, scene.seed
    base = seed % 100_003 * 16
    warp = _noise_fields(xs, ys, [c for _, c, *_ in spec for _ in (0, 1)],
                         [base + 2 * k + d for k, *_ in spec for d in (0, 1)])      # (2 per scale, H, W)
    f = 0.0
    for i, (k, cell, amp, rgb, w) in enumerate(spec):
        j = np.floor((ys + 0.4 * cell * warp[2 * i]) / cell).astype(np.int64)
        u = (xs + 0.4 * cell * warp[2 * i + 1]) / cell + (j * 0.6180339887) % 1.0       # rows staggered
        tone = 2.0 * _hash01(seed, 40 + k, (np.floor(u).astype(np.int64) << 24) + j) - 1.0
        f = f + (amp * w) * np.asarray(rgb, np.float32)[:, None, None] * tone.astype(np.float32)[None]
    return 1.0 + ch[MOSAIC] * f


def _texture(scene, ch, fr):
    """Multiplicative texture (H, W): band-limited grain + crop rows / dune crests."""
    xs, ys, p = fr.xs, fr.ys, fr.res
    grain = _fractal(xs, ys, p, (1.0, 3.0, 9.0, 27.0), scene.seed + 7)
    t = 1.0 + 3.0 * ch[TEX] * grain
    period = scene.params.get("stripe_m")
    if period and (ch[STRIPE_A].any() or ch[STRIPE_B].any()):
        w = _band(period, p)
        if w > 0:
            th = scene.params.get("stripe_ang", 0.0)
            u = xs * math.cos(th) + ys * math.sin(th)
            v = ys * math.cos(th) - xs * math.sin(th)
            warp = scene.params.get("stripe_warp", 0.0) * _noise(xs, ys, 8 * period, scene.seed)
            t = t + w * (ch[STRIPE_A] * np.sin(2 * np.pi * (u / period + warp))
                         + ch[STRIPE_B] * np.sin(2 * np.pi * (v / period + warp)))
    return t


def _finish(scene, ch, fr, tex=None, tint=None):
    """RGB float (H, W, 3) in 0..255: material colour x texture x mosaic tint + sensor noise."""
    rgb = ch[:3] * (_texture(scene, ch, fr) if tex is None else tex) * (_tint(scene, ch, fr) if tint is None else tint)
    rng = np.random.default_rng([scene.seed, int(round(fr.level * 1000)), fr.size])
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * 2.0
    return np.clip(rgb.transpose(1, 2, 0), 0, 255)


def render(scene: Scene, level: float, size: int = 64, center=None) -> np.ndarray:
    """The scene seen from above at Google map level `level`: (size, size, 3) uint8, north up."""
    ch, _, _, fr = _compose(scene, level, size, center)
    return (_finish(scene, ch, fr) + 0.5).astype(np.uint8)


def kind_map(scene: Scene, level: float, size: int = 64, center=None) -> np.ndarray:
    """(H, W) int16: index into KINDS of the top object covering > 1/2 of each pixel, -1 = ground."""
    return _compose(scene, level, size, center)[1]


def object_mask(scene: Scene, level: float, size: int, kind: str, index: int, center=None):
    """(H, W) float32 coverage of one top-level object (scene layer of `kind`, row `index`)."""
    layers = [L for L in scene.layers if L.kind == kind]
    if not layers:
        raise ValueError(f"scene {scene.name!r} has no layer of kind {kind!r}")
    L = layers[0]
    if not 0 <= index < len(L.geom):
        raise ValueError(f"object index {index} out of range for {len(L.geom)} {kind!r} objects")
    fr = _frame(scene, level, size, center)
    pix, a, _ = _rasterize(L.subset(np.array([index])), fr)
    return np.minimum(np.bincount(pix, a, fr.size ** 2), 1).astype(np.float32).reshape(size, size)


# ----------------------------------------------------------------------------------------------
# Procedural detail (children generated on demand from hashed ids: the same at every view)
# ----------------------------------------------------------------------------------------------
def _hash_pick(seed, ids, key, names, p):
    """Materials (n, 8) and colour words (n,) chosen from names (probs p) by hashed ids."""
    u = _hash01(seed, ids, key) * sum(p)
    k = np.minimum(np.searchsorted(np.cumsum(p), u, side="right"), len(names) - 1)
    rows = np.array([_MAT_NAMES.index(m) for m in names], np.int64)[k]
    mat = _MAT_TABLE[rows].copy()
    mat[:, :3] *= (0.93 + 0.14 * _hash01(seed, ids, key + 1))[:, None].astype(np.float32)
    return mat, _MAT_WORD[rows]


@dataclass
class Grid:
    """Cells (fields, blocks, plots) of a grid rotated by ang: rows of height in row_h (m) cut
    into cells of width in col_w, gap metres apart; edges jittered by hashed row/column ids."""
    ang: float
    row_h: tuple[float, float]
    col_w: tuple[float, float]
    gap: float
    cells: Callable  # (scene, geom (n, 5), ids (n,)) -> [Layer]: what the cells hold


def _grid_geom(seed, grid, fr):
    """Boxes (n, 5) and ids (n,) of the grid cells near the frame."""
    span = fr.size * fr.res
    u0, v0 = _rot(fr.x0 + span / 2, fr.y1 - span / 2, -grid.ang)
    reach = 0.71 * span + max(grid.row_h[1], grid.col_w[1])
    (hl, hh), (wl, wh) = grid.row_h, grid.col_w
    mh, mw = (hl + hh) / 2, (wl + wh) / 2
    j = np.arange(math.floor((v0 - reach) / mh), math.ceil((v0 + reach) / mh) + 1)
    i = np.arange(math.floor((u0 - reach) / mw) - 1, math.ceil((u0 + reach) / mw) + 1)
    J, I = np.meshgrid(j, i, indexing="ij")
    shift = _hash01(seed, J, 12) * mw                                     # rows are staggered
    v_lo, v_hi = [jj * mh + (_hash01(seed, jj, 11) - 0.5) * (hh - hl) / 2 for jj in (J, J + 1)]
    u_lo, u_hi = [ii * mw + shift + (_hash01(seed, J, ii, 13) - 0.5) * (wh - wl) / 2 for ii in (I, I + 1)]
    uc, vc = (u_lo + u_hi) / 2, (v_lo + v_hi) / 2
    near = (np.abs(uc - u0) < reach) & (np.abs(vc - v0) < reach)
    x, y = _rot(uc[near], vc[near], grid.ang)
    geom = np.stack([x, y, (u_hi - u_lo)[near] / 2 - grid.gap / 2, (v_hi - v_lo)[near] / 2 - grid.gap / 2,
                     np.full(x.shape, grid.ang)], 1)
    return geom, ((J[near] + (1 << 20)) << 21) + (I[near] + (1 << 20))


def _expand_grid(scene, region, fr, grid):
    """The grid cells near the frame whose centre lies well inside `region`."""
    geom, ids = _grid_geom(scene.seed, grid, fr)
    d = _sdf(region.shape, region.geom, geom[None, None, :, 0], geom[None, None, :, 1]).min(0)[0]
    inside = d < -0.5 * np.hypot(geom[:, 2], geom[:, 3])
    return grid.cells(scene, geom[inside], ids[inside])


_CROPS = (["crop_green", "crop_light", "crop_yellow", "soil"], [.35, .25, .2, .2])


def _field_cells(scene, g, ids):
    """Crop fields, rows along or across the grid; some cells left fallow (ground shows)."""
    keep = _hash01(scene.seed, ids, 21) < scene.params.get("field_p", 1.0)
    g, ids = g[keep], ids[keep]
    mat, col = _hash_pick(scene.seed, ids, 20, *_CROPS)
    along = _hash01(scene.seed, ids, 22) < 0.5
    mat[:, STRIPE_A], mat[:, STRIPE_B] = np.where(along, .10, 0), np.where(along, 0, .10)
    return [Layer("field", "box", g, mat, col, ids=ids)]


def _block_cells(scene, g, ids):
    """Residential blocks: their mean colour until the level resolves the houses."""
    P = scene.params
    jit = (0.94 + 0.12 * _hash01(scene.seed, ids, 23))[:, None].astype(np.float32)
    mean, yard = np.asarray(P["block_mean"])[None] * jit, np.asarray(P["yard"])[None] * jit
    return [Layer("block", "box", g, mean, np.full(len(g), P["block_word"]), ids=ids,
                  expand=_expand_houses, lod_m=P["house_lod"], mat_open=yard)]


def _plot_cells(scene, g, ids):
    """Industrial plots: one large factory roof, or a row of four storage tanks."""
    seed = scene.seed
    tank = _hash01(seed, ids, 24) < 0.12
    b, bid = g[~tank].copy(), ids[~tank]
    b[:, 2] *= 0.6 + 0.3 * _hash01(seed, bid, 25)
    b[:, 3] *= 0.6 + 0.3 * _hash01(seed, bid, 26)
    mat, col = _hash_pick(seed, bid, 27, ["roof_white", "roof_grey", "roof_blue", "roof_dark"], [.35, .3, .25, .1])
    mat[:, STRIPE_A] = .05
    tp, tid = g[tank], ids[tank]
    r = 8 + 14 * _hash01(seed, tid, 28)
    off = (np.arange(4) - 1.5)[None] * r[:, None] * 2.6                      # (n, 4) along the plot
    tx, ty = tp[:, :1] + off * np.cos(tp[:, 4:5]), tp[:, 1:2] + off * np.sin(tp[:, 4:5])
    tids = (tid[:, None] * 8 + np.arange(4)).ravel()
    tmat, tcol = _hash_pick(seed, tids, 29, ["tank"], [1.0])
    return [Layer("factory", "box", b, mat, col, ids=bid),
            Layer("tank", "disk", np.stack([tx.ravel(), ty.ravel(), np.repeat(r, 4)], 1), tmat, tcol, ids=tids)]


def _expand_houses(scene, blocks, fr):
    """Houses in two rows along each block's long side; sparse lots also get a tree."""
    P = scene.params
    g, ids = blocks.geom, blocks.ids
    n = np.maximum(np.floor(2 * g[:, 2] / P["pitch"]), 1).astype(np.int64)  # lots per row
    bi, row, si = np.meshgrid(np.arange(len(g)), np.arange(2), np.arange(n.max()), indexing="ij")
    ok = si < n[bi]
    bi, row, si = bi[ok], row[ok], si[ok]
    key = ids[bi] * 64 + row * 32 + si
    h = [_hash01(scene.seed, key, j) for j in range(6)]
    live = h[0] >= P["empty"]
    lot_w, hy = 2 * g[bi, 2] / n[bi], g[bi, 3]
    u = -g[bi, 2] + (si + 0.5) * lot_w + (h[1] - 0.5) * 0.1 * lot_w
    w = lot_w * P["fill"] * (0.75 + 0.25 * h[2])
    d = hy * P["fill"] * (0.7 + 0.3 * h[3])
    sgn = np.where(row == 0, 1.0, -1.0)
    v = sgn * (hy - d / 2 - hy * P["setback"])                  # front of the house on the street
    ca, sa = np.cos(g[bi, 4]), np.sin(g[bi, 4])
    cx, cy = g[bi, 0] + u * ca - v * sa, g[bi, 1] + u * sa + v * ca
    roofs = P["roofs"]
    rows = np.array([_MAT_NAMES.index(m) for m in roofs], np.int64)[
        np.minimum((h[4] * len(roofs)).astype(np.int64), len(roofs) - 1)]
    mat = _MAT_TABLE[rows]
    mat[:, :3] *= (0.92 + 0.16 * h[5])[:, None].astype(np.float32)
    out = [Layer("house", "box", np.stack([cx, cy, w / 2, d / 2, g[bi, 4]], 1)[live], mat[live],
                 _MAT_WORD[rows][live], ids=key[live])]
    if P["tree_p"] > 0:
        t = _hash01(scene.seed, key, 9) < P["tree_p"]
        vt = sgn * (hy * 0.12 + 2.0)                               # at the back of the lot
        ut = u + (_hash01(scene.seed, key, 11) - 0.5) * 0.6 * lot_w
        r = 2.0 + 3.0 * _hash01(scene.seed, key, 10)
        tx, ty = g[bi, 0] + ut * ca - vt * sa, g[bi, 1] + ut * sa + vt * ca
        tmat, tcol = _hash_pick(scene.seed, key[t], 12, ["tree", "tree_light"], [.6, .4])
        out.append(Layer("yard_tree", "disk", np.stack([tx, ty, r], 1)[t], tmat, tcol, ids=key[t]))
    return out


def _expand_wheel_tracks(scene, pivots, fr):
    """The concentric wheel tracks of each centre-pivot field: rings of bare soil every track_m metres
    (one per tower of the irrigation arm), 3 m wide."""
    g, step = pivots.geom, scene.params["track_m"]
    n = np.floor(g[:, 2] / step - 0.3).astype(np.int64)
    pi, k = np.nonzero(np.arange(1, int(n.max(initial=0)) + 1)[None] <= n[:, None])
    rings = np.stack([g[pi, 0], g[pi, 1], (k + 1) * step, np.full(len(pi), 1.5)], 1)
    ids = pivots.ids[pi] * 64 + k
    mat, col = _hash_pick(scene.seed, ids, 31, ["soil"], [1.0])
    return [Layer("wheel_track", "ring", rings, mat, col, ids=ids)]


def _scatter(scene, fr, spacing, key):
    """Jittered-grid points covering the frame (+ margin): (x, y, cell id), view-independent."""
    span = fr.size * fr.res
    i0, i1 = int(math.floor(fr.x0 / spacing)) - 1, int(math.ceil((fr.x0 + span) / spacing)) + 1
    j0, j1 = int(math.floor((fr.y1 - span) / spacing)) - 1, int(math.ceil(fr.y1 / spacing)) + 1
    I, J = np.meshgrid(np.arange(i0, i1), np.arange(j0, j1))
    cid = (I.ravel() + (1 << 20)) * (1 << 21) + (J.ravel() + (1 << 20))
    x = (I.ravel() + _hash01(scene.seed, cid, key, 1)) * spacing
    y = (J.ravel() + _hash01(scene.seed, cid, key, 2)) * spacing
    return x, y, cid


def _expand_trees(scene, regions, fr, spacing=None, key=5):
    """Tree crowns (or shrubs) on a jittered grid inside the regions; spacing (m) defaults to the scene's
    tree_spacing, materials to its tree_mats (names, probabilities)."""
    P = scene.params
    x, y, cid = _scatter(scene, fr, spacing or P["tree_spacing"], key)
    inside = _sdf(regions.shape, regions.geom, x[None, None, :], y[None, None, :]).min(0)[0] < 0
    x, y, cid = x[inside], y[inside], cid[inside]
    r = P["tree_r"][0] + (P["tree_r"][1] - P["tree_r"][0]) * _hash01(scene.seed, cid, 3)
    mat, col = _hash_pick(scene.seed, cid, 4, *P.get("tree_mats", (["tree", "tree_light"], [.65, .35])))
    return [Layer(P.get("tree_kind", "tree"), "disk", np.stack([x, y, r], 1), mat, col, ids=cid)]


# ----------------------------------------------------------------------------------------------
# Scene generators, one per class: (rng, seed) -> (ground, layers, focus, params)
# ----------------------------------------------------------------------------------------------
_H = EXTENT_M / 2


def _rot(x, y, ang):
    return x * math.cos(ang) - y * math.sin(ang), x * math.sin(ang) + y * math.cos(ang)


def _ground(rng, a, b, stripe=0.0):
    gr = np.concatenate([_mats(rng, [a], jitter=0.04)[0], _mats(rng, [b], jitter=0.04)[0]])
    gr[:, STRIPE_A] = stripe
    return gr


def _layer(rng, kind, shape, geom, names, p=None, jitter=0.06, **kw):
    geom = np.asarray(geom, np.float64).reshape(-1, SHAPES[shape])
    mat, col = _mats(rng, names, p=p, n=len(geom), jitter=jitter)
    return Layer(kind, shape, geom, mat, col, **kw)


def _blobs(rng, n, r_range, wobble, half=_H):
    """n noisy ellipses scattered over the extent: (n, 7)."""
    return np.concatenate([rng.uniform(-half, half, (n, 2)), rng.uniform(*r_range, (n, 2)),
                           rng.uniform(0, np.pi, (n, 1)), np.full((n, 1), wobble), np.zeros((n, 1))], 1)


def _mosaic_spec(rng, small, large=None, warm=(.7, .2, -.9)):
    """Scene patch mosaics (see _tint): the small scale (cell metres, amplitude) shifts brightness, the
    optional large one colour (towards `warm` (r, g, b)); each cell size drawn within +-15%."""
    scales = [(small, (1, 1, 1))] + ([(large, warm)] if large else [])
    return tuple((cell * rng.uniform(.85, 1.15), amp, rgb) for (cell, amp), rgb in scales)


def _scrub_region(rng):
    """An undrawn blob over the whole extent that holds shrubs (the scene's tree_* params), from 1.2 m pixels."""
    return _layer(rng, "scrub", "blob", [0, 0, 3 * _H, 3 * _H, 0, 0, 0], ["bare"], jitter=0, lod_m=1.2,
                  expand=_expand_trees, draw=False)


def _farm_region(rng, **kw):
    """An undrawn box over the whole extent that holds a grid of fields."""
    grid = Grid(rng.uniform(0, np.pi / 2), (100, 500), (100, 500), rng.uniform(4, 10), _field_cells)
    L = _layer(rng, "farm", "box", [0, 0, _H, _H, 0], ["soil"], lod_m=1e9, draw=False,
               expand=partial(_expand_grid, grid=grid))
    L.mat_open = L.mat
    return L, grid


def _polyline(rng, ang, width, half=_H * 1.5, step=60.0):
    """A meandering centreline through the origin along direction ang: segments (N, 5)."""
    s = np.arange(-half, half + step, step)
    lam = rng.uniform([2500, 900, 300], [6000, 2000, 600])
    amp = rng.uniform([300, 120, 20], [900, 300, 50])
    ph = rng.uniform(0, 2 * np.pi, 3)
    t = (amp[:, None] * np.sin(2 * np.pi * s[None] / lam[:, None] + ph[:, None])).sum(0)
    t -= (amp * np.sin(ph)).sum()
    x, y = _rot(s, t, ang)
    return np.stack([x[:-1], y[:-1], x[1:], y[1:], np.full(len(s) - 1, width / 2)], 1)


def _edge_point(layer, x0, y0, ang, reach, n=256):
    """First point on the ray from (x0, y0) where the layer's inside/outside changes (a shore),
    found on n samples and refined once within the bracketing step."""
    xmin, xmax, ymin, ymax = _bbox(layer.shape, layer.geom)
    t0, t1 = 0.0, reach
    for _ in range(2):
        t = np.linspace(t0, t1, n)
        x, y = x0 + t * math.cos(ang), y0 + t * math.sin(ang)
        near = (xmax >= x.min()) & (xmin <= x.max()) & (ymax >= y.min()) & (ymin <= y.max())
        d = _sdf(layer.shape, layer.geom[near], x[None, None, :], y[None, None, :]).min(0)[0]
        flip = np.nonzero(np.sign(d) != np.sign(d[0]))[0]
        if not len(flip):
            break
        t0, t1 = t[max(flip[0] - 1, 0)], t[flip[0]]
    return float(x0 + t1 * math.cos(ang)), float(y0 + t1 * math.sin(ang))


def _near_origin(seed, grid):
    """The grid cell nearest to the origin: (5,) box."""
    geom, _ = _grid_geom(seed, grid, Frame(17.0, 1, 1.0, -0.5, 0.5))
    return geom[np.argmin(np.hypot(geom[:, 0], geom[:, 1]))]


def _town(rng, seed, dense):
    """Residential: a town blob holding a street grid of blocks; blocks hold houses."""
    ang = rng.uniform(0, np.pi)
    r = rng.uniform(1500, 4000) if dense else rng.uniform(1200, 3000)
    if dense:
        grid = Grid(ang, (40, 90), (60, 160), rng.uniform(8, 16), _block_cells)
        P = dict(pitch=rng.uniform(10, 16), fill=.85, empty=.03, tree_p=0.0, yard="yard_dense",
                 setback=.02, house_lod=5.0, block_word="grey")
    else:
        grid = Grid(ang, (60, 110), (120, 260), rng.uniform(9, 13), _block_cells)
        P = dict(pitch=rng.uniform(24, 38), fill=.42, empty=.2, tree_p=.7, yard="meadow",
                 setback=.18, house_lod=8.0, block_word="green")
    P["roofs"] = list(rng.choice(_ROOFS, size=3, replace=False))
    row = lambda m: _MAT_TABLE[_MAT_NAMES.index(m)]
    roof_mean = np.mean([row(m) for m in P["roofs"]], 0)
    cover = 0.74 * P["fill"] ** 2 * (1 - P["empty"])          # roof area / block area
    P["yard"] = row(P["yard"])
    P["block_mean"] = cover * roof_mean + (1 - cover) * P["yard"]
    if not dense:
        P["block_mean"] = 0.85 * P["block_mean"] + 0.15 * row("tree")
    mh, mw = np.mean(grid.row_h), np.mean(grid.col_w)
    solid = (mh - grid.gap) * (mw - grid.gap) / (mh * mw)      # block area / town area
    town = _layer(rng, "urban", "blob", [0, 0, r, r * rng.uniform(.6, 1), ang, .25, 0], ["asphalt"],
                  jitter=.03, expand=partial(_expand_grid, grid=grid), lod_m=48.0 if dense else 64.0)
    town.mat_open = town.mat.copy()
    town.mat = (solid * P["block_mean"] + (1 - solid) * town.mat).astype(np.float32)
    town.color[:] = P["block_word"]
    roads = []
    for q in (0, 1):
        o = rng.uniform(-r / 2, r / 2)
        (x0, x1), (y0, y1) = _rot(np.array([-r, r]), np.array([o, o]), ang + q * np.pi / 2)
        roads.append([x0, y0, x1, y1, rng.uniform(10, 15)])
    layers = [town, _layer(rng, "road", "seg", roads, ["asphalt"])]
    if rng.random() < (0.3 if dense else 0.15):                  # a river, away from the focus
        segs = _polyline(rng, rng.uniform(0, np.pi), rng.uniform(40, 120))
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(300, 1200)
        segs[:, [0, 2]] += d * math.cos(a)
        segs[:, [1, 3]] += d * math.sin(a)
        layers.insert(1, _layer(rng, "river", "seg", segs, ["river"], jitter=0))
    b = _near_origin(seed, grid)
    fx, fy = _rot(rng.uniform(-.5, .5) * b[2], b[3], b[4])
    return _ground(rng, "dry_grass", "crop_light"), layers, (b[0] + fx, b[1] + fy), P


def _gen_dense_residential(rng, seed):
    return _town(rng, seed, dense=True)


def _gen_sparse_residential(rng, seed):
    return _town(rng, seed, dense=False)


def _gen_industrial(rng, seed):
    ang = rng.uniform(0, np.pi)
    r = rng.uniform(1500, 4000)
    grid = Grid(ang, (80, 200), (100, 300), rng.uniform(15, 25), _plot_cells)
    zone = _layer(rng, "zone", "blob", [0, 0, r, r * rng.uniform(.6, 1), ang, .2, 0], ["concrete"],
                  expand=partial(_expand_grid, grid=grid), lod_m=40.0)
    zone.mat_open = zone.mat.copy()
    zone.mat = (0.6 * zone.mat + 0.4 * _MAT_TABLE[_MAT_NAMES.index("roof_white")]).astype(np.float32)
    roads = []
    for q, o in ((0, 0.0), (1, rng.uniform(-r / 3, r / 3))):
        (x0, x1), (y0, y1) = _rot(np.array([-r, r]), np.array([o, o]), ang + q * np.pi / 2)
        roads.append([x0, y0, x1, y1, 11.0])
    layers = [zone, _layer(rng, "road", "seg", roads, ["asphalt"])]
    f = _near_origin(seed, grid)
    return _ground(rng, "dry_grass", "crop_light"), layers, (f[0], f[1]), dict(stripe_m=2.5, stripe_ang=ang)


def _gen_farmland(rng, seed):
    farm, grid = _farm_region(rng)
    n = 24
    houses = np.concatenate([rng.uniform(-_H, _H, (n, 2)), rng.uniform(5, 15, (n, 2)), np.full((n, 1), grid.ang)], 1)
    road = _polyline(rng, grid.ang + np.pi / 2 * rng.integers(2), 12.0, step=200.0)
    road[:, :4] += rng.uniform(-300, 300)
    layers = [farm, _layer(rng, "road", "seg", road, ["asphalt"]), _layer(rng, "farmhouse", "box", houses, _ROOFS[:3])]
    f = _near_origin(seed, grid)
    fx, fy = _rot(f[2] * rng.uniform(-1, 1), f[3], grid.ang)
    return (_ground(rng, "soil", "dry_grass"), layers, (f[0] + fx, f[1] + fy),
            dict(stripe_m=rng.uniform(4, 6), stripe_ang=grid.ang, mosaic=_mosaic_spec(rng, (25, .12))))


def _gen_circular_farmland(rng, seed):
    D = rng.uniform(400, 800)
    sp = D + rng.uniform(15, 80)
    n = int(EXTENT_M / sp)
    I, J = np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2)
    cx, cy = I.ravel() * sp, J.ravel() * sp
    keep = rng.random(cx.shape) > 0.12
    piv = np.stack([cx, cy, D / 2 * rng.uniform(.9, 1.0, cx.shape)], 1)[keep]
    L = _layer(rng, "pivot", "disk", piv, ["crop_green", "crop_light", "crop_yellow", "soil"],
               p=[.45, .25, .15, .15], jitter=.06, lod_m=8.0, expand=_expand_wheel_tracks)
    L.mat[:, STRIPE_A] = .05
    L.mat_open = L.mat
    i0 = np.argmin(np.hypot(piv[:, 0], piv[:, 1]))
    a = rng.uniform(0, 2 * np.pi)
    rr = piv[i0, 2] * (rng.uniform(.97, 1.02) if rng.random() < .5 else rng.uniform(0, .8))
    focus = (piv[i0, 0] + rr * math.cos(a), piv[i0, 1] + rr * math.sin(a))
    return (_ground(rng, "dry_grass", "bare"), [L], focus,
            dict(stripe_m=rng.uniform(5, 7), stripe_ang=rng.uniform(0, np.pi), mosaic=_mosaic_spec(rng, (25, .12)),
                 track_m=rng.uniform(45, 55)))


def _gen_forest(rng, seed):
    big = _layer(rng, "forest", "blob", [0, 0, 3 * _H, 3 * _H, 0, 0, 0], ["forest"], jitter=.03,
                 lod_m=2.1, expand=_expand_trees)
    big.mat_open = _mats(rng, ["canopy_gap"], jitter=.03)[0]
    clear = _blobs(rng, 40, (40, 400), .35)
    track = _polyline(rng, rng.uniform(0, np.pi), rng.uniform(4, 7), step=40.0)
    track[:, :4] += rng.uniform(100, 600)
    layers = [big, _layer(rng, "clearing", "blob", clear, ["meadow", "grass"]),
              _layer(rng, "track", "seg", track, ["dirt_road"])]
    params = dict(tree_spacing=rng.uniform(6, 9), tree_r=(2.5, 5.0), mix_bias=-0.3,
                  mosaic=_mosaic_spec(rng, (35, .22), (260, .18)))
    return _ground(rng, "forest", "tree_light"), layers, (0.0, 0.0), params


def _gen_river(rng, seed):
    ang = rng.uniform(0, np.pi)
    w = rng.uniform(40, 250)
    segs = _polyline(rng, ang, w)
    bank = segs.copy()
    bank[:, 4] += rng.uniform(8, 30)
    farm, _ = _farm_region(rng)
    river = _layer(rng, "river", "seg", segs, ["river", "water"], p=[.6, .4], jitter=0)
    river.mat[:], river.color[:] = river.mat[0], river.color[0]
    layers = [farm, _layer(rng, "bank", "seg", bank, [rng.choice(["sand", "dry_grass"])], jitter=0), river]
    fx, fy = _edge_point(river, 0.0, 0.0, ang + np.pi / 2, 4 * w)
    nx, ny = _rot(0.0, rng.uniform(-6, 10), ang)
    return _ground(rng, "grass", "crop_light"), layers, (fx + nx, fy + ny), dict(stripe_m=5.0, field_p=.6)


def _gen_lake(rng, seed):
    r = rng.uniform(300, 2500)
    lake = _layer(rng, "lake", "blob", [0, 0, r, r * rng.uniform(.5, 1), rng.uniform(0, np.pi), .3, 0],
                  ["water", "river"], p=[.8, .2], jitter=.04)
    shore = _layer(rng, "shore", "blob", lake.geom, ["sand", "meadow"], p=[.6, .4])
    shore.geom[:, 6] = rng.uniform(10, 40)
    ponds = _blobs(rng, 14, (30, 150), .25)
    ponds = ponds[np.hypot(ponds[:, 0], ponds[:, 1]) > 1.6 * r + 300]
    woods = _layer(rng, "forest", "blob", _blobs(rng, 20, (200, 900), .35), ["forest"], jitter=.03,
                   lod_m=2.1, expand=_expand_trees)
    woods.mat_open = _mats(rng, ["canopy_gap"], n=20, jitter=.03)[0]
    belt = _layer(rng, "forest", "blob", lake.geom, ["forest"], lod_m=2.1, draw=False,   # trees along the shore
                  expand=partial(_expand_trees, spacing=rng.uniform(11, 16), key=6))
    belt.geom[:, 6] = rng.uniform(50, 90)
    lake.mat[:, STRIPE_A] = .08                                                           # wind ripples
    ponds = _layer(rng, "pond", "blob", ponds, ["water"])
    ponds.mat[:, STRIPE_A] = .08
    layers = [woods, shore, belt, lake, ponds]                    # the trees overhang the shore, not the water
    focus = _edge_point(lake, 0.0, 0.0, rng.uniform(0, 2 * np.pi), 2.5 * r)
    return _ground(rng, "grass", "crop_light"), layers, focus, dict(
        tree_spacing=rng.uniform(6, 9), tree_r=(2.5, 5.0), mosaic=_mosaic_spec(rng, (25, .2), (220, .15)),
        stripe_m=rng.uniform(3, 4.5), stripe_ang=rng.uniform(0, np.pi), stripe_warp=.3)


def _gen_beach(rng, seed):
    th = rng.uniform(0, 2 * np.pi)                              # direction towards the sea
    nx, ny = math.cos(th), math.sin(th)
    wob, sand_w = rng.uniform(150, 500), rng.uniform(30, 150)
    coast = lambda kind, d, m: _layer(rng, kind, "coast", [nx, ny, d, wob], [m], jitter=.02)
    (x0, x1), (y0, y1) = _rot(np.array([-1.5 * _H, 1.5 * _H]), np.full(2, -sand_w - rng.uniform(150, 400)),
                              th - np.pi / 2)
    layers = [_layer(rng, "road", "seg", [x0, y0, x1, y1, 5.0], ["asphalt"]),
              coast("beach", -sand_w, "sand"), coast("foam", -3.0, "foam"),
              coast("shallow", 0.0, "shallow"), coast("sea", rng.uniform(40, 200), "sea")]
    fx, fy = _edge_point(layers[3], -4 * wob * nx, -4 * wob * ny, th, 8 * wob)
    t0 = rng.uniform(-12, 6)
    return _ground(rng, "grass", "dry_grass"), layers, (fx + t0 * nx, fy + t0 * ny), dict(sea_dir=th)


def _gen_desert(rng, seed):
    track = _polyline(rng, rng.uniform(0, np.pi), 4.0, step=80.0)
    scrub = _scrub_region(rng)
    layers = [_layer(rng, "rock", "blob", _blobs(rng, 30, (40, 600), .4), ["rock", "dune_dark"]),
              _layer(rng, "track", "seg", track, ["sand"]), scrub]
    params = dict(stripe_m=rng.uniform(60, 110), stripe_ang=rng.uniform(0, np.pi), stripe_warp=.6,
                  mosaic=_mosaic_spec(rng, (30, .12), (350, .1)), tree_spacing=rng.uniform(18, 28),
                  tree_r=(0.6, 1.5), tree_kind="shrub", tree_mats=(["rock", "tree_light"], [.5, .5]))
    return _ground(rng, "dune", "dune_dark", stripe=.16), layers, (0.0, 0.0), params


def _gen_bare_land(rng, seed):
    tracks = []
    for _ in range(3):
        t = _polyline(rng, rng.uniform(0, np.pi), rng.uniform(3, 6), step=50.0)
        t[:, :4] += rng.uniform(-800, 800)
        tracks.append(t)
    scrub = _scrub_region(rng)
    layers = [_layer(rng, "rock", "blob", _blobs(rng, 25, (20, 300), .35), ["soil", "rock"]),
              _layer(rng, "track", "seg", np.concatenate(tracks), ["dirt_road"]), scrub]
    params = dict(tree_spacing=rng.uniform(9, 16), tree_r=(0.8, 2.0), tree_kind="shrub",
                  mix_bias=rng.uniform(-.2, .2), mosaic=_mosaic_spec(rng, (20, .2), (180, .15)))
    return _ground(rng, "bare", "soil"), layers, (0.0, 0.0), params


def _gen_airport(rng, seed):
    th = rng.uniform(0, np.pi)
    L, W = rng.uniform(2500, 4000), rng.uniform(45, 60)
    off = np.array([0.0] + ([rng.uniform(400, 1500)] if rng.random() < .5 else []))

    def boxes(u, v, hu, hv):  # runway-frame boxes (u along the runway) -> world (n, 5)
        u, v, hu, hv = np.broadcast_arrays(*(np.atleast_1d(np.asarray(z, np.float64)) for z in (u, v, hu, hv)))
        x, y = _rot(u.ravel(), v.ravel(), th)
        return np.stack([x, y, hu.ravel(), hv.ravel(), np.full(x.shape, th)], 1)

    tw_off = -rng.uniform(180, 250)
    ap_off = tw_off - rng.uniform(150, 300)
    ap_len, ap_w = rng.uniform(600, 1200), rng.uniform(150, 250)
    lo, hi = ap_off - ap_w / 2 - 400, off.max() + 300
    n_ac = int(rng.integers(3, 14))
    ac_u = np.linspace(-ap_len / 2 + 50, ap_len / 2 - 50, n_ac)
    ln = rng.uniform(30, 70, n_ac)                              # aircraft length (m)
    nose = ap_off - ap_w / 2 + 15
    dash_u = np.arange(-L / 2 + 120, L / 2 - 120, 60)
    key_v = np.linspace(-W / 2 + 4, W / 2 - 4, 10)
    layers = [_farm_region(rng)[0],
              _layer(rng, "airfield", "box", boxes(0, (lo + hi) / 2, L / 2 + 300, (hi - lo) / 2), ["dry_grass"]),
              _layer(rng, "apron", "box", boxes(0, ap_off, ap_len / 2, ap_w / 2), ["concrete"]),
              _layer(rng, "taxiway", "box", np.concatenate([                          # + 6 links
                  boxes(0, tw_off, L / 2, 11.5), boxes(np.linspace(-L / 2 + 50, L / 2 - 50, 6), tw_off / 2,
                                                       11.5, -tw_off / 2)]), ["tarmac"], jitter=0),
              _layer(rng, "runway", "box", boxes(0, off, L / 2, W / 2), ["tarmac"], jitter=0),
              _layer(rng, "marking", "box", np.concatenate([
                  boxes(dash_u[None, :], off[:, None], 15, .45),                       # centre line
                  boxes(np.array([-1, 1])[None, :, None] * (L / 2 - 25), off[:, None, None] + key_v, 22, .9)]),
                  ["marking"], jitter=0),                                              # threshold bars
              _layer(rng, "terminal", "box", boxes(0, ap_off - ap_w / 2 - rng.uniform(30, 60), ap_len / 2 * .8,
                                                   rng.uniform(25, 50)), ["roof_white", "roof_grey"]),
              _layer(rng, "wing", "box", boxes(ac_u, nose + ln * .55, ln * .47, ln * .08), ["aircraft"], jitter=.02),
              _layer(rng, "aircraft", "box", boxes(ac_u, nose + ln / 2, ln * .045, ln / 2), ["aircraft"], jitter=.02)]
    if rng.random() < .5:
        focus = tuple(layers[-1].geom[n_ac // 2, :2])
    else:
        focus = _rot(rng.uniform(-L / 3, L / 3), rng.uniform(-W / 3, W / 3), th)
    return _ground(rng, "dry_grass", "grass"), layers, focus, dict(runways=len(off))


_GENERATORS = [_gen_dense_residential, _gen_sparse_residential, _gen_industrial, _gen_farmland,
               _gen_circular_farmland, _gen_forest, _gen_river, _gen_lake, _gen_beach, _gen_desert,
               _gen_bare_land, _gen_airport]


def _pick_class(seed):
    return int(np.random.default_rng([int(seed), 0]).integers(len(CLASSES)))


def make_scene(seed: int, cls: int | str | None = None) -> Scene:
    """A deterministic scene of class cls (index or name; None: drawn from the seed)."""
    if isinstance(cls, str):
        if cls not in CLASSES:
            raise ValueError(f"unknown class {cls!r}; expected one of {CLASSES}")
        cls = CLASSES.index(cls)
    cls = _pick_class(seed) if cls is None else int(cls)
    if not 0 <= cls < len(CLASSES):
        raise ValueError(f"class index {cls} out of range 0..{len(CLASSES) - 1}")
    rng = np.random.default_rng([int(seed), 1, cls])
    ground, layers, focus, params = _GENERATORS[cls](rng, seed)
    return Scene(int(seed), cls, ground, layers, (float(focus[0]), float(focus[1])), params)


# ----------------------------------------------------------------------------------------------
# Captions, written from what the frame shows
# ----------------------------------------------------------------------------------------------
_NUM = "zero one two three four five six seven eight nine ten eleven twelve".split()
NUMBER_WORDS = {w: i for i, w in enumerate(_NUM)}


def _count(n, sing, plur=None):
    plur = plur or sing + "s"
    if n == 1:
        return f"one {sing}"
    if n <= 12:
        return f"{_NUM[n]} {plur}"
    return f"{'more than a dozen' if n <= 20 else 'dozens of' if n < 100 else 'hundreds of'} {plur}"


def _colors(counter):
    (w0, c0), *rest = counter.most_common(2) or [("", 0)]
    if not rest or c0 >= 0.75 * sum(counter.values()):
        return w0
    return f"{w0} and {rest[0][0]}"


def _compass(ang):
    return ["east", "north-east", "north", "north-west", "west", "south-west", "south",
            "south-east"][int(round(ang / (np.pi / 4))) % 8]


def _crossing(dx, dy):
    a = math.atan2(dy, dx) % np.pi
    return ["from west to east", "from south-west to north-east", "from north to south",
            "from north-west to south-east"][int(round(a / (np.pi / 4))) % 4]


def _position(mask):
    """Where a (H, W) bool mask lies: 'in the centre', 'in the upper left', ..."""
    S = mask.shape[0]
    r, c = np.nonzero(mask)
    vr = "upper " if r.mean() < S / 3 else "lower " if r.mean() > 2 * S / 3 else ""
    hc = "left" if c.mean() < S / 3 else "right" if c.mean() > 2 * S / 3 else ""
    return "in the centre" if not (vr or hc) else f"in the {(vr + hc).strip() or 'middle'}" \
        if hc else f"in the {vr.strip()} part"


@dataclass
class _Seen:
    n: int = 0                       # objects whose centre pixel shows them (counted)
    px: float = 0.0                  # median object size of those, pixels
    colors: Counter = field(default_factory=Counter)
    frac: float = 0.0                # fraction of the frame where this kind is on top
    mask: np.ndarray | None = None   # (H, W) bool, kind on top
    segs: list = field(default_factory=list)


_COUNTED = {"house", "block", "yard_tree", "factory", "tank", "field", "pivot", "tree", "pond",
            "runway", "aircraft", "track", "shrub", "river"}   # kinds whose objects captions count


def inventory(scene: Scene, level: float, size: int = 64, center=None, _composed=None) -> dict:
    """What the frame shows, per kind: counts of objects whose centre pixel shows them, sizes
    (px), colours, frame fraction. Captions are written from this and nothing else."""
    ch, top, layers, fr = _composed or _compose(scene, level, size, center)
    S, p = fr.size, fr.res
    inv = {"ground": float((top < 0).mean())}
    for L in layers:
        k = KINDS.index(L.kind)
        e = inv.get(L.kind)
        if e is None:
            mask = top == k
            e = inv[L.kind] = _Seen(frac=float(mask.mean()), mask=mask)
        g = L.geom
        if L.kind not in _COUNTED:
            continue
        if L.shape == "seg":
            cx, cy, sz = (g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2, 2 * g[:, 4]
        else:
            cx, cy = g[:, 0], g[:, 1]
            sz = 2 * (g[:, 2] if L.shape == "disk" else np.maximum(g[:, 2], g[:, 3]))
        inside = fr.contains(cx, cy)
        col = np.clip(((cx - fr.x0) / p).astype(np.int64), 0, S - 1)
        row = np.clip(((fr.y1 - cy) / p).astype(np.int64), 0, S - 1)
        seen = inside & (top[row, col] == k)
        if L.shape == "seg":
            e.segs.append(g[inside])
        if seen.any():
            e.px = float(np.median(np.concatenate([[e.px] * e.n, sz[seen] / p])))
            e.n += int(seen.sum())
            e.colors.update(L.color[seen].tolist())
    return inv


def _caption_parts(scene, inv, res, rng):
    """Candidate sentences for this class from the inventory; one is chosen."""
    name = scene.name
    get = lambda k: inv[k] if k in inv and k != "ground" else _Seen()
    ch = lambda *opts: opts[int(rng.integers(len(opts)))]
    river = get("river")
    river_txt = ""
    if river.frac > 0.01 and river.segs and len(np.concatenate(river.segs)) > 0:
        sg = np.concatenate(river.segs)
        d = sg[-1, 2:4] - sg[0, :2] if len(sg) > 1 else sg[0, 2:4] - sg[0, :2]
        river_txt = _crossing(*d)
    if name in ("dense_residential", "sparse_residential"):
        dense = name == "dense_residential"
        adj = "dense" if dense else "sparse"
        h, b = get("house"), get("block")
        if h.n > 0:
            one = h.n == 1
            roofs = f"{_count(h.n, 'house')} with {'a ' if one else ''}{_colors(h.colors)} roof{'' if one else 's'}"
            verb = ("is" if one else "are") + (" densely packed" if dense else " scattered")
            stand = ("stands" if one else "stand") + (" close together" if dense else " among lawns and trees")
            s = ch(f"{roofs} {verb} in a {adj} residential area", f"a {adj} residential area where {roofs} {stand}")
            if not dense and get("yard_tree").n > 3:
                s += ", with many trees in the yards"
        elif b.n > 0 and b.px >= 3:
            s = ch(f"a {adj} residential area with {_count(b.n, 'block')} of "
                   f"{'closely packed' if dense else 'scattered'} houses separated by a grid of streets",
                   f"{_count(b.n, 'residential block')} of a {adj} residential area line straight streets")
        elif "block" in inv and get("road").frac + river.frac < 0.5:
            s = f"part of a {adj} residential area: {'paved yards' if dense else 'green lawns'} beside a street"
        elif get("urban").frac > 0 and get("road").frac + river.frac > 0.5:
            s = f"a {'river' if river.frac > get('road').frac else 'wide road'} in a {adj} residential area"
            river_txt = ""
        else:
            s = ch(f"a large {'grey' if dense else 'green'} {adj} residential area",
                   f"the {adj} residential area of a town seen from high above")
            if get("urban").frac > 0 and inv.get("ground", 0) > 0.2:
                s += " surrounded by farmland"
        if river_txt:
            s += f", and a river crosses the {adj} residential blocks {river_txt}"
        elif get("road").frac > 0.02:
            s += ", with a wide road passing through"
        return s
    if name == "industrial":
        f, t = get("factory"), get("tank")
        if f.n > 0 or t.n > 0:
            s = ch("an industrial area with ", "in this industrial area there are ")
            parts = [f"{_count(f.n, 'factory building')} with large {_colors(f.colors)} roofs"] if f.n else []
            parts += [f"{_count(t.n, 'white storage tank')}"] if t.n else []
            return s + " and ".join(parts)
        return ch("a large industrial area with light grey roofs and wide roads",
                  "an industrial area of large buildings seen from high above")
    if name == "farmland":
        f = get("field")
        if f.n >= 1 and f.px >= 3:
            return ch(f"{_count(f.n, 'rectangular farmland')} of {_colors(f.colors)} crops are "
                      f"separated by narrow paths",
                      f"{_count(f.n, 'piece')} of {_colors(f.colors)} farmland form a regular patchwork")
        c = get("field").colors or Counter(["green"])
        return ch(f"rows of {_colors(c)} crops in a farmland", f"a close view of farmland with "
                  f"{_colors(c)} crops planted in straight rows")
    if name == "circular_farmland":
        pv = get("pivot")
        if pv.n >= 1 and pv.px >= 3:
            lay = "are neatly arranged" if pv.n >= 3 else "lie side by side" if pv.n == 2 else "lies"
            what = _count(pv.n, _colors(pv.colors) + " circular farmland")
            return ch(f"{what} {lay} on dry land", f"there {'is' if pv.n == 1 else 'are'} {what} in this image")
        if pv.frac > 0.95:
            return f"the {_colors(pv.colors) or 'green'} crops of a circular farmland fill the whole image"
        return f"part of a {_colors(pv.colors) or 'green'} circular farmland with a curved edge next to bare land"
    if name == "forest":
        t = get("tree")
        s = (ch(f"a dense forest with {_count(t.n, 'tree')} of different shades of green",
                f"{_count(t.n, 'tree crown')} crowd together in a forest") if t.n > 0 else
             ch("a large dark green forest covers the area", "a dense forest seen from high above"))
        if get("clearing").frac > 0.05:
            s += ", with a grassy clearing"
        if get("track").frac > 0.005:
            s += ", and a narrow track winds through the forest"
        return s
    if name == "river":
        rv = get("river")
        col = _colors(rv.colors) or "dark"
        if rv.frac > 0.5:
            return f"the {col} water of a wide river next to its {'sandy ' if get('bank').frac else ''}bank"
        s = ch(f"a {col} river crosses the image {river_txt}" if river_txt else f"a {col} river",
               f"a {'wide' if rv.px > 8 else 'narrow'} {col} river runs {river_txt}")
        if get("field").n > 1:
            s += " between farmlands"
        return s
    if name == "lake":
        lk = get("lake")
        if lk.frac > 0:
            s = f"a {_colors(lk.colors) or 'dark'} lake lies {_position(lk.mask)} of the image"
            near = [w for k, w in (("forest", "forest"), ("tree", "trees"), ("shore", "a sandy shore"),
                                   ("field", "farmland")) if get(k).frac > 0.05]
            s += f", surrounded by {' and '.join(near[:2])}" if near else ""
        else:
            s = "green land near a lake"
        if get("pond").n:
            s += f", and {_count(get('pond').n, 'small pond')}"
        return s
    if name == "beach":
        side = _compass(scene.params["sea_dir"])
        if get("sea").frac + get("shallow").frac > 0:
            return ch(f"the blue sea lies to the {side} and a sandy beach runs along the coast",
                      f"waves break on a sandy beach with the sea to the {side}")
        return "a sandy beach near the sea"
    if name == "desert":
        s = ch("a vast orange desert", "an empty desert of orange sand")
        if _band(scene.params["stripe_m"], res) > 0:
            s += " with rows of sand dunes"
        if get("rock").frac > 0.05:
            s += " and dark rocky outcrops"
        if get("shrub").n > 0:
            s += f", {_count(get('shrub').n, 'small shrub')} {'dots' if get('shrub').n == 1 else 'dot'} the sand"
        return s
    if name == "bare_land":
        tr = get("track")
        s = ch("a piece of brown bare land", "bare land with dry brown soil")
        if tr.n > 0:
            s += " crossed by dirt tracks"
        if get("shrub").n > 0:
            s += f" and {_count(get('shrub').n, 'small shrub')}"
        return s
    if name == "airport":
        rw, ac = get("runway"), get("aircraft")
        if rw.frac > 0.6 and ac.n == 0:
            return "white markings on the grey runway of an airport"
        s = "an airport"
        if rw.n:
            s += f" with {_count(rw.n, 'runway')}"
        elif rw.frac:
            s += " with a long runway"
        if ac.n:
            s += f", where {_count(ac.n, 'airplane')} {'is' if ac.n == 1 else 'are'} parked on the apron"
        elif get("terminal").frac > 0:
            s += " and a terminal building"
        return s
    raise ValueError(f"no caption rule for class {name!r}")


def caption(scene: Scene, level: float, size: int = 64, rng=None, center=None, _composed=None) -> str:
    """A caption of what the frame shows at this level (counts, colours, layout where true)."""
    rng = np.random.default_rng(0) if rng is None else rng
    inv = inventory(scene, level, size, center, _composed)
    return _caption_parts(scene, inv, resolution_m(level), rng)


# ----------------------------------------------------------------------------------------------
# Samples, paired modalities, a torch Dataset
# ----------------------------------------------------------------------------------------------
def sample(seed: int, level: float | None = None, size: int = 64, cls=None) -> dict:
    """One sample: image (H, W, 3) uint8, caption, level, label, class name, scene, counts."""
    rng = np.random.default_rng([int(seed), 2])
    if level is None:
        level = float(rng.uniform(*LEVEL_RANGE))
    scene = make_scene(seed, cls)
    composed = _compose(scene, level, size)
    image = (_finish(scene, composed[0], composed[3]) + 0.5).astype(np.uint8)
    text = caption(scene, level, size, rng, _composed=composed)
    return dict(image=image, caption=text, level=float(level), label=scene.label, name=scene.name,
                resolution_m=resolution_m(level), scene=scene)


def modalities(scene: Scene, level: float, size: int = 64, seed: int = 0) -> dict:
    """Paired views of the same frame, all (H, W[, 3]) uint8 unless noted:
    rgb; pan (grey-level transform of rgb); nir (vegetation bright, water dark); sar (speckled
    backscatter: built-up double bounce bright, water dark); haze (atmospheric scattering,
    Koschmieder / He et al. 2009 Eq. 1: I = J t + A (1 - t)) with transmission t (H, W) float32
    and airlight A (3,);
    cloud with cloud_alpha (H, W) float32 and cloud_mask (H, W) bool (alpha > 1/2)."""
    ch, _, _, fr = _compose(scene, level, size)
    S = fr.size
    rng = np.random.default_rng([int(seed), scene.seed, 3])
    tex, tint = _texture(scene, ch, fr), _tint(scene, ch, fr)
    rgb = _finish(scene, ch, fr, tex, tint)                          # (H, W, 3) float 0..255
    pan = rgb @ np.array([0.299, 0.587, 0.114], np.float32)         # ITU-R BT.601 luma
    patches = np.mean(tint, 0) if isinstance(tint, np.ndarray) else 1.0  # stands and soil patches, in brightness
    nir = ch[NIR] * tex * patches + rng.standard_normal((S, S)).astype(np.float32) * 2.0
    # SAR: multiplicative speckle of an L-look intensity image, Gamma(L, 1/L) (Goodman 1976).
    looks = 4
    inten = (ch[SAR] / 255.0) ** 2 * (0.6 + 0.4 * tex) * rng.gamma(looks, 1.0 / looks, (S, S))
    sar = np.sqrt(inten) * 255.0
    # haze: smooth transmission in frame coordinates, bluish-white airlight.
    u = np.arange(S)[None, :] / S * 4.0
    v = np.arange(S)[:, None] / S * 4.0
    key = int(rng.integers(1 << 30))
    t = np.clip(rng.uniform(0.35, 0.7) + 0.2 * _noise(u, v, 1.5, key), 0.15, 0.95).astype(np.float32)
    A = np.array([225.0, 230.0, 238.0], np.float32) * rng.uniform(0.9, 1.0)
    haze = rgb * t[..., None] + A * (1 - t[..., None])
    # cloud: thresholded fractal density (frame coordinates), soft edges, cloud colour shaded.
    dens = sum(a * _noise(u, v, lam, key + k) for k, (a, lam) in enumerate(((1, 2.0), (.5, 1.0), (.25, .5))))
    cover = rng.uniform(0.2, 0.6)
    thr = np.quantile(dens, 1 - cover)
    alpha = np.clip((dens - thr) / 0.15, 0, 1).astype(np.float32)
    cloud_col = 228.0 + 20.0 * np.clip(dens - thr, 0, 1)[..., None]
    cloud = rgb * (1 - alpha[..., None]) + cloud_col * alpha[..., None]
    u8 = lambda x: (np.clip(x, 0, 255) + 0.5).astype(np.uint8)
    return dict(rgb=u8(rgb), pan=u8(pan), nir=u8(nir), sar=u8(sar), haze=u8(haze), transmission=t,
                airlight=A, cloud=u8(cloud), cloud_alpha=alpha, cloud_mask=alpha > 0.5)


class ProceduralEarth(torch.utils.data.Dataset):
    """n synthetic samples, deterministic per index: classes cycle (balanced), levels uniform.

    Items: image (3, H, W) float32 in [-1, 1], caption str, level float, label int, quality nan, key str."""

    def __init__(self, n: int, size: int = 64, levels=LEVEL_RANGE, seed: int = 0, integer_levels: bool = False):
        if n <= 0 or size <= 0:
            raise ValueError(f"n and size must be positive, got n={n}, size={size}")
        if not (0 < levels[0] <= levels[1] <= 24):
            raise ValueError(f"levels must be (min, max) with 0 < min <= max <= 24, got {levels}")
        self.n, self.size, self.levels, self.seed = n, size, (float(levels[0]), float(levels[1])), seed
        self.integer_levels = integer_levels                  # whole Google levels only, as most real data has
        self.classes = CLASSES

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for ProceduralEarth of length {self.n}")
        i %= self.n
        rng = np.random.default_rng([self.seed, i, 4])
        seed = int(rng.integers(1 << 62))
        if self.integer_levels:
            level = float(rng.integers(math.ceil(self.levels[0]), math.floor(self.levels[1]) + 1))
        else:
            level = float(rng.uniform(*self.levels))
        s = sample(seed, level, self.size, cls=i % len(CLASSES))
        img = torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 127.5 - 1.0
        return dict(image=img, caption=s["caption"], level=s["level"], label=s["label"],
                    quality=float("nan"), key=f"procedural-{self.seed}-{i}")  # the readers' common sample dict


class InOrder(torch.utils.data.IterableDataset):
    """The items of a map-style dataset (e.g. ProceduralEarth), in index order, rendered by `processes` worker
    processes (DataLoader workers, `chunk` items each at a time): the renderer is numpy on one core. On the
    project's two cores, 2.5 ms a 32 px scene with two processes instead of 4.3 ms (2.9-3.0 ms in chunks of
    64). Same items as dataset[0], dataset[1], ...; a Dataset with a length, so write_shards sees the count."""

    def __init__(self, dataset, processes: int = 1, chunk: int = 256):
        if processes < 1 or chunk < 1:
            raise ValueError(f"processes and chunk must be >= 1, got processes={processes}, chunk={chunk}")
        self.dataset, self.processes, self.chunk = dataset, processes, chunk

    def __len__(self):
        return len(self.dataset)

    def __iter__(self):
        if self.processes == 1:
            return (self.dataset[i] for i in range(len(self.dataset)))
        loader = torch.utils.data.DataLoader(self.dataset, batch_size=self.chunk, num_workers=self.processes,
                                             collate_fn=list)     # lists of items, delivered in index order
        return (item for items in loader for item in items)
