"""What a procedural scene is made of: classes, materials, shapes, layers of objects, the scene.

A scene is a description in world coordinates (metres, x east, y north) of a square EXTENT_M metres
across, centred on (0, 0): a ground of two mixed materials and a list of layers, each holding
objects of one kind and one shape with a material per object. A material is a row of N_CH channels
(R, G, B, NIR, SAR, texture, two stripe amplitudes, mosaic response) that the
renderer composites together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np

from data.levels import resolution_from_level

CLASSES = [
    "dense_residential",
    "sparse_residential",
    "industrial",
    "farmland",
    "circular_farmland",
    "forest",
    "river",
    "lake",
    "beach",
    "desert",
    "bare_land",
    "airport",
]
LEVEL_RANGE = (10.0, 18.0)
EXTENT_M = 16384.0  # side of the square a scene describes, centred on (0, 0): level 10 at 128 px

# Metres per pixel at Google map level L: 2 ** (17 - L) (L=17 -> 1 m, L=10 -> 128 m).
resolution_m = resolution_from_level


def _rot(x, y, ang):
    """(x, y) rotated by ang radians anticlockwise about the origin."""
    return x * math.cos(ang) - y * math.sin(ang), x * math.sin(ang) + y * math.cos(ang)


# ----------------------------------------------------------------------------------------------
# Materials: one row per material, N_CH channels composited together
# ----------------------------------------------------------------------------------------------
R, G, B, NIR, SAR, TEX, STRIPE_A, STRIPE_B, MOSAIC = range(9)
N_CH = 9
# name: (colour word, R, G, B, NIR reflectance, SAR backscatter, texture amplitude); all 0..255
# except texture. Built-up is bright in SAR (double bounce), water and smooth asphalt dark.
_MATERIALS = {
    "grass": ("green", 98, 112, 72, 175, 70, 0.10),
    "dry_grass": ("yellowish", 146, 140, 100, 125, 60, 0.10),
    "meadow": ("light green", 118, 130, 80, 185, 70, 0.08),
    "crop_green": ("green", 80, 112, 56, 215, 95, 0.06),
    "crop_light": ("light green", 120, 138, 74, 200, 90, 0.06),
    "crop_yellow": ("yellow", 176, 160, 102, 140, 80, 0.06),
    "soil": ("brown", 128, 104, 80, 95, 55, 0.09),
    "bare": ("brown", 156, 136, 108, 115, 50, 0.11),
    "rock": ("dark brown", 96, 84, 72, 90, 110, 0.14),
    "sand": ("sandy", 204, 190, 156, 135, 35, 0.04),
    "dune": ("orange", 212, 176, 128, 140, 30, 0.05),
    "dune_dark": ("orange", 190, 150, 104, 125, 40, 0.06),
    "forest": ("dark green", 50, 70, 46, 200, 120, 0.16),
    "canopy_gap": ("dark", 30, 40, 30, 90, 60, 0.10),
    "tree": ("dark green", 46, 74, 42, 215, 130, 0.14),
    "tree_light": ("green", 70, 96, 52, 210, 125, 0.14),
    "water": ("dark blue", 38, 58, 66, 12, 6, 0.03),
    "river": ("greenish", 60, 78, 72, 18, 8, 0.03),
    "sea": ("blue", 30, 58, 84, 8, 10, 0.03),
    "shallow": ("turquoise", 52, 96, 106, 20, 14, 0.04),
    "foam": ("white", 214, 220, 220, 60, 60, 0.05),
    "asphalt": ("grey", 78, 78, 80, 55, 25, 0.06),
    "dirt_road": ("light brown", 170, 152, 124, 110, 45, 0.06),
    "concrete": ("light grey", 164, 160, 150, 110, 70, 0.05),
    "tarmac": ("grey", 104, 104, 102, 70, 30, 0.04),
    "marking": ("white", 226, 226, 222, 120, 40, 0.02),
    "roof_red": ("red", 152, 84, 66, 90, 225, 0.06),
    "roof_brown": ("brown", 122, 92, 72, 85, 220, 0.06),
    "roof_grey": ("grey", 120, 118, 116, 95, 230, 0.05),
    "roof_dark": ("dark grey", 74, 70, 66, 70, 215, 0.05),
    "roof_white": ("white", 208, 208, 202, 165, 240, 0.04),
    "roof_blue": ("blue", 92, 114, 142, 100, 240, 0.04),
    "tank": ("white", 220, 220, 214, 170, 255, 0.02),
    "aircraft": ("white", 232, 232, 232, 175, 255, 0.01),
    "yard_dense": ("grey", 110, 106, 98, 90, 80, 0.08),
}
# How strongly a material takes the scene's patch mosaics (_tint: stands of trees, soil and sand
# patches, crop vigour): natural surfaces vary over tens to hundreds of metres, water and
# built-up surfaces do not.
_MOSAIC_RESPONSE = {
    "grass": 0.8,
    "dry_grass": 0.8,
    "meadow": 0.8,
    "crop_green": 0.5,
    "crop_light": 0.5,
    "crop_yellow": 0.5,
    "soil": 0.8,
    "bare": 1.0,
    "rock": 0.6,
    "sand": 0.8,
    "dune": 0.8,
    "dune_dark": 0.8,
    "forest": 1.0,
    "canopy_gap": 0.6,
    "tree": 0.8,
    "tree_light": 0.8,
}
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
    "urban",
    "block",
    "house",
    "yard_tree",
    "road",
    "track",
    "river",
    "bank",
    "lake",
    "shore",
    "pond",
    "sea",
    "shallow",
    "foam",
    "beach",
    "farm",
    "field",
    "farmhouse",
    "pivot",
    "forest",
    "tree",
    "clearing",
    "rock",
    "scrub",
    "shrub",
    "zone",
    "factory",
    "tank",
    "runway",
    "taxiway",
    "apron",
    "airfield",
    "terminal",
    "aircraft",
    "wing",
    "marking",
    "wheel_track",
]


@dataclass
class Layer:
    """N objects of one kind and shape, drawn together (in order of `Scene.layers`)."""

    kind: str
    shape: str
    geom: np.ndarray  # (N, G) float64, G = SHAPES[shape]
    mat: np.ndarray  # (N, N_CH) float32 material rows
    color: np.ndarray  # (N,) colour words, for captions
    ids: np.ndarray | None = None  # (N,) int64 stable ids (keys of procedural children)
    expand: Callable | None = None  # (scene, layer, frame) -> [Layer]: detail when zoomed in
    lod_m: float = 0.0  # expand when resolution_m <= lod_m
    mat_open: np.ndarray | None = None  # (N, N_CH) material under the detail when expanded
    draw: bool = True  # False: a region that only holds procedural detail

    def __post_init__(self):
        self.geom = np.asarray(self.geom, np.float64).reshape(-1, SHAPES[self.shape])
        if self.ids is None:
            self.ids = np.arange(len(self.geom), dtype=np.int64)

    def subset(self, keep):
        return replace(
            self,
            geom=self.geom[keep],
            mat=self.mat[keep],
            color=self.color[keep],
            ids=self.ids[keep],
            mat_open=None if self.mat_open is None else self.mat_open[keep],
        )


@dataclass
class Scene:
    """A world-coordinate description of one place: ground, layers of objects, a focus point."""

    seed: int
    label: int
    ground: np.ndarray  # (2, N_CH) two ground materials mixed by a coarse noise
    layers: list[Layer]
    focus: tuple[float, float] = (0.0, 0.0)
    params: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return CLASSES[self.label]

    def objects(self) -> list[dict]:
        """The top-level objects as plain dicts (kind, shape, geometry, colour)."""
        return [
            dict(kind=L.kind, shape=L.shape, geom=L.geom[i].tolist(), color=str(L.color[i]))
            for L in self.layers
            for i in range(len(L.geom))
        ]


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
    return Layer(
        kind,
        shape,
        geom,
        np.repeat(row[None], len(geom), 0),
        np.full(len(geom), _MATERIALS[material_name][0]),
    )
