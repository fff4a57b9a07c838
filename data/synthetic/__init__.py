"""The procedural Earth: seeded synthetic overhead scenes at any Google map level.

A scene is a description in world coordinates (metres, x east, y north; a list of layers of
objects, each with a kind, a geometry and a material) generated from (seed, class). Rendering
samples it onto a pixel grid at level L, resolution_m = 2 ** (17 - L), so that objects keep
their real sizes: the same scene shows single houses at level 18 and a patchwork of land cover
at level 11, the resolution condition of Text2Earth (Liu et al., "Text2Earth", IEEE GRSM 2025).
Small things are area-averaged: objects below two pixels get a footprint whose total coverage
equals their true area, textures are band-limited by the pixel size, and blocks of houses or
stands of trees are drawn as their mean colour until the level resolves them.

Captions are written from what the renderer drew in the frame (counts, colours, layout), and
the same composite carries NIR and SAR channels for the paired modalities (PAN, NIR, SAR-like,
haze, cloud with its mask).

    scene = make_scene(seed=3, cls=CLASSES.index("circular_farmland"))
    img = render(scene, level=12.5, size=64)          # (H, W, 3) uint8
    text = caption(scene, 12.5, 64, np.random.default_rng(0))
    mods = modalities(scene, 12.5, 64, seed=0)       # pan, nir, sar, haze, cloud, cloud_mask

The modules, in the order a scene passes through them:
    world     classes, materials, shapes, Layer and Scene
    noise     integer hashing and band-limited value noise
    scenes    one generator per class, make_scene
    detail    procedural children (grid cells, houses, trees), made where the level resolves them
    raster    signed distances -> per-object pixel coverage
    compose   compositing, texture and tint: render, kind_map, object_mask
    captions  the inventory of a frame and one caption rule per class
    sensors   the paired modalities
    geography which class a place on the globe shows (for located samples)
    dataset   sample, ProceduralEarth, InOrder
Names with a leading underscore are shared among these modules, not part of the package's API.
"""

from .captions import NUMBER_WORDS, caption, inventory, silent_caption
from .compose import kind_map, object_mask, render
from .dataset import InOrder, ProceduralEarth, sample
from .detail import Grid
from .geography import class_probabilities
from .raster import Frame
from .scenes import make_scene
from .sensors import modalities
from .world import (
    CLASSES,
    EXTENT_M,
    KINDS,
    LEVEL_RANGE,
    MOSAIC,
    N_CH,
    NIR,
    SAR,
    SHAPES,
    STRIPE_A,
    STRIPE_B,
    TEX,
    B,
    G,
    Layer,
    R,
    Scene,
    layer,
    material,
    resolution_m,
)

__all__ = [
    "CLASSES",
    "LEVEL_RANGE",
    "EXTENT_M",
    "resolution_m",
    "R",
    "G",
    "B",
    "NIR",
    "SAR",
    "TEX",
    "STRIPE_A",
    "STRIPE_B",
    "MOSAIC",
    "N_CH",
    "SHAPES",
    "KINDS",
    "Layer",
    "Scene",
    "material",
    "layer",
    "Frame",
    "Grid",
    "make_scene",
    "render",
    "kind_map",
    "object_mask",
    "NUMBER_WORDS",
    "inventory",
    "caption",
    "silent_caption",
    "class_probabilities",
    "sample",
    "modalities",
    "ProceduralEarth",
    "InOrder",
]
