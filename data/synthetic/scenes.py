"""Scene generators, one per class: (rng, seed) -> (ground, layers, focus, params), and make_scene.

Objects have their real sizes (a centre pivot 400-800 m across, a runway 2.5-4 km long), so that the
level of a render shows in how large things look. The focus is a point worth looking at (an edge of
a field, a shore, an aircraft), where frames are centred.

    scene = make_scene(seed=3, cls="circular_farmland")
"""

from __future__ import annotations

import math
from functools import partial

import numpy as np

from .detail import (
    Grid,
    _block_cells,
    _expand_grid,
    _expand_trees,
    _expand_wheel_tracks,
    _field_cells,
    _grid_geom,
    _plot_cells,
)
from .raster import Frame, _bbox, _sdf
from .world import (
    _MAT_NAMES,
    _MAT_TABLE,
    _ROOFS,
    CLASSES,
    EXTENT_M,
    SHAPES,
    STRIPE_A,
    Layer,
    Scene,
    _mats,
    _rot,
)

_H = EXTENT_M / 2  # half the side of a scene's square, metres


# ----------------------------------------------------------------------------------------------
# Building blocks shared by the generators
# ----------------------------------------------------------------------------------------------
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
    return np.concatenate(
        [
            rng.uniform(-half, half, (n, 2)),
            rng.uniform(*r_range, (n, 2)),
            rng.uniform(0, np.pi, (n, 1)),
            np.full((n, 1), wobble),
            np.zeros((n, 1)),
        ],
        1,
    )


def _mosaic_spec(rng, small, large=None, warm=(0.7, 0.2, -0.9)):
    """Scene patch mosaics (see _tint): the small scale (cell metres, amplitude) shifts brightness,
    the optional large one colour (towards `warm` (r, g, b)); each cell size drawn within +-15%."""
    scales = [(small, (1, 1, 1))] + ([(large, warm)] if large else [])
    return tuple((cell * rng.uniform(0.85, 1.15), amp, rgb) for (cell, amp), rgb in scales)


def _scrub_region(rng):
    """An undrawn blob over the whole extent that holds shrubs (the scene's tree_*
    params), from 1.2 m pixels."""
    return _layer(
        rng,
        "scrub",
        "blob",
        [0, 0, 3 * _H, 3 * _H, 0, 0, 0],
        ["bare"],
        jitter=0,
        lod_m=1.2,
        expand=_expand_trees,
        draw=False,
    )


def _farm_region(rng):
    """An undrawn box over the whole extent that holds a grid of fields."""
    grid = Grid(rng.uniform(0, np.pi / 2), (100, 500), (100, 500), rng.uniform(4, 10), _field_cells)
    L = _layer(
        rng,
        "farm",
        "box",
        [0, 0, _H, _H, 0],
        ["soil"],
        lod_m=1e9,
        draw=False,
        expand=partial(_expand_grid, grid=grid),
    )
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


# ----------------------------------------------------------------------------------------------
# The generators, one per class: (rng, seed) -> (ground, layers, focus, params)
# ----------------------------------------------------------------------------------------------
def _town(rng, seed, dense):
    """Residential: a town blob holding a street grid of blocks; blocks hold houses."""
    ang = rng.uniform(0, np.pi)
    r = rng.uniform(1500, 4000) if dense else rng.uniform(1200, 3000)
    if dense:
        grid = Grid(ang, (40, 90), (60, 160), rng.uniform(8, 16), _block_cells)
        P = dict(
            pitch=rng.uniform(10, 16),
            fill=0.85,
            empty=0.03,
            tree_p=0.0,
            yard="yard_dense",
            setback=0.02,
            house_lod=5.0,
            block_word="grey",
        )
    else:
        grid = Grid(ang, (60, 110), (120, 260), rng.uniform(9, 13), _block_cells)
        P = dict(
            pitch=rng.uniform(24, 38),
            fill=0.42,
            empty=0.2,
            tree_p=0.7,
            yard="meadow",
            setback=0.18,
            house_lod=8.0,
            block_word="green",
        )
    P["roofs"] = list(rng.choice(_ROOFS, size=3, replace=False))

    def row(m):
        return _MAT_TABLE[_MAT_NAMES.index(m)]

    roof_mean = np.mean([row(m) for m in P["roofs"]], 0)
    cover = 0.74 * P["fill"] ** 2 * (1 - P["empty"])  # roof area / block area
    P["yard"] = row(P["yard"])
    P["block_mean"] = cover * roof_mean + (1 - cover) * P["yard"]
    if not dense:
        P["block_mean"] = 0.85 * P["block_mean"] + 0.15 * row("tree")
    mh, mw = np.mean(grid.row_h), np.mean(grid.col_w)
    solid = (mh - grid.gap) * (mw - grid.gap) / (mh * mw)  # block area / town area
    town = _layer(
        rng,
        "urban",
        "blob",
        [0, 0, r, r * rng.uniform(0.6, 1), ang, 0.25, 0],
        ["asphalt"],
        jitter=0.03,
        expand=partial(_expand_grid, grid=grid),
        lod_m=48.0 if dense else 64.0,
    )
    town.mat_open = town.mat.copy()
    town.mat = (solid * P["block_mean"] + (1 - solid) * town.mat).astype(np.float32)
    town.color[:] = P["block_word"]
    roads = []
    for q in (0, 1):
        o = rng.uniform(-r / 2, r / 2)
        (x0, x1), (y0, y1) = _rot(np.array([-r, r]), np.array([o, o]), ang + q * np.pi / 2)
        roads.append([x0, y0, x1, y1, rng.uniform(10, 15)])
    layers = [town, _layer(rng, "road", "seg", roads, ["asphalt"])]
    if rng.random() < (0.3 if dense else 0.15):  # a river, away from the focus
        segs = _polyline(rng, rng.uniform(0, np.pi), rng.uniform(40, 120))
        a, d = rng.uniform(0, 2 * np.pi), rng.uniform(300, 1200)
        segs[:, [0, 2]] += d * math.cos(a)
        segs[:, [1, 3]] += d * math.sin(a)
        layers.insert(1, _layer(rng, "river", "seg", segs, ["river"], jitter=0))
    b = _near_origin(seed, grid)
    fx, fy = _rot(rng.uniform(-0.5, 0.5) * b[2], b[3], b[4])
    return _ground(rng, "dry_grass", "crop_light"), layers, (b[0] + fx, b[1] + fy), P


def _gen_dense_residential(rng, seed):
    return _town(rng, seed, dense=True)


def _gen_sparse_residential(rng, seed):
    return _town(rng, seed, dense=False)


def _gen_industrial(rng, seed):
    ang = rng.uniform(0, np.pi)
    r = rng.uniform(1500, 4000)
    grid = Grid(ang, (80, 200), (100, 300), rng.uniform(15, 25), _plot_cells)
    zone = _layer(
        rng,
        "zone",
        "blob",
        [0, 0, r, r * rng.uniform(0.6, 1), ang, 0.2, 0],
        ["concrete"],
        expand=partial(_expand_grid, grid=grid),
        lod_m=40.0,
    )
    zone.mat_open = zone.mat.copy()
    zone.mat = (0.6 * zone.mat + 0.4 * _MAT_TABLE[_MAT_NAMES.index("roof_white")]).astype(
        np.float32
    )
    roads = []
    for q, o in ((0, 0.0), (1, rng.uniform(-r / 3, r / 3))):
        (x0, x1), (y0, y1) = _rot(np.array([-r, r]), np.array([o, o]), ang + q * np.pi / 2)
        roads.append([x0, y0, x1, y1, 11.0])
    layers = [zone, _layer(rng, "road", "seg", roads, ["asphalt"])]
    f = _near_origin(seed, grid)
    return (
        _ground(rng, "dry_grass", "crop_light"),
        layers,
        (f[0], f[1]),
        dict(stripe_m=2.5, stripe_ang=ang),
    )


def _gen_farmland(rng, seed):
    farm, grid = _farm_region(rng)
    n = 24
    houses = np.concatenate(
        [rng.uniform(-_H, _H, (n, 2)), rng.uniform(5, 15, (n, 2)), np.full((n, 1), grid.ang)], 1
    )
    road = _polyline(rng, grid.ang + np.pi / 2 * rng.integers(2), 12.0, step=200.0)
    road[:, :4] += rng.uniform(-300, 300)
    layers = [
        farm,
        _layer(rng, "road", "seg", road, ["asphalt"]),
        _layer(rng, "farmhouse", "box", houses, _ROOFS[:3]),
    ]
    f = _near_origin(seed, grid)
    fx, fy = _rot(f[2] * rng.uniform(-1, 1), f[3], grid.ang)
    return (
        _ground(rng, "soil", "dry_grass"),
        layers,
        (f[0] + fx, f[1] + fy),
        dict(stripe_m=rng.uniform(4, 6), stripe_ang=grid.ang, mosaic=_mosaic_spec(rng, (25, 0.12))),
    )


def _gen_circular_farmland(rng, seed):
    D = rng.uniform(400, 800)
    sp = D + rng.uniform(15, 80)
    n = int(EXTENT_M / sp)
    cols, rows = np.meshgrid(np.arange(n) - (n - 1) / 2, np.arange(n) - (n - 1) / 2)
    cx, cy = cols.ravel() * sp, rows.ravel() * sp
    keep = rng.random(cx.shape) > 0.12
    piv = np.stack([cx, cy, D / 2 * rng.uniform(0.9, 1.0, cx.shape)], 1)[keep]
    L = _layer(
        rng,
        "pivot",
        "disk",
        piv,
        ["crop_green", "crop_light", "crop_yellow", "soil"],
        p=[0.45, 0.25, 0.15, 0.15],
        jitter=0.06,
        lod_m=8.0,
        expand=_expand_wheel_tracks,
    )
    L.mat[:, STRIPE_A] = 0.05
    L.mat_open = L.mat
    i0 = np.argmin(np.hypot(piv[:, 0], piv[:, 1]))
    a = rng.uniform(0, 2 * np.pi)
    rr = piv[i0, 2] * (rng.uniform(0.97, 1.02) if rng.random() < 0.5 else rng.uniform(0, 0.8))
    focus = (piv[i0, 0] + rr * math.cos(a), piv[i0, 1] + rr * math.sin(a))
    return (
        _ground(rng, "dry_grass", "bare"),
        [L],
        focus,
        dict(
            stripe_m=rng.uniform(5, 7),
            stripe_ang=rng.uniform(0, np.pi),
            mosaic=_mosaic_spec(rng, (25, 0.12)),
            track_m=rng.uniform(45, 55),
        ),
    )


def _gen_forest(rng, seed):
    big = _layer(
        rng,
        "forest",
        "blob",
        [0, 0, 3 * _H, 3 * _H, 0, 0, 0],
        ["forest"],
        jitter=0.03,
        lod_m=2.1,
        expand=_expand_trees,
    )
    big.mat_open = _mats(rng, ["canopy_gap"], jitter=0.03)[0]
    clear = _blobs(rng, 40, (40, 400), 0.35)
    track = _polyline(rng, rng.uniform(0, np.pi), rng.uniform(4, 7), step=40.0)
    track[:, :4] += rng.uniform(100, 600)
    layers = [
        big,
        _layer(rng, "clearing", "blob", clear, ["meadow", "grass"]),
        _layer(rng, "track", "seg", track, ["dirt_road"]),
    ]
    params = dict(
        tree_spacing=rng.uniform(6, 9),
        tree_r=(2.5, 5.0),
        mix_bias=-0.3,
        mosaic=_mosaic_spec(rng, (35, 0.22), (260, 0.18)),
    )
    return _ground(rng, "forest", "tree_light"), layers, (0.0, 0.0), params


def _gen_river(rng, seed):
    ang = rng.uniform(0, np.pi)
    w = rng.uniform(40, 250)
    segs = _polyline(rng, ang, w)
    bank = segs.copy()
    bank[:, 4] += rng.uniform(8, 30)
    farm, _ = _farm_region(rng)
    river = _layer(rng, "river", "seg", segs, ["river", "water"], p=[0.6, 0.4], jitter=0)
    river.mat[:], river.color[:] = river.mat[0], river.color[0]
    layers = [
        farm,
        _layer(rng, "bank", "seg", bank, [rng.choice(["sand", "dry_grass"])], jitter=0),
        river,
    ]
    fx, fy = _edge_point(river, 0.0, 0.0, ang + np.pi / 2, 4 * w)
    nx, ny = _rot(0.0, rng.uniform(-6, 10), ang)
    return (
        _ground(rng, "grass", "crop_light"),
        layers,
        (fx + nx, fy + ny),
        dict(stripe_m=5.0, field_p=0.6),
    )


def _gen_lake(rng, seed):
    r = rng.uniform(300, 2500)
    lake = _layer(
        rng,
        "lake",
        "blob",
        [0, 0, r, r * rng.uniform(0.5, 1), rng.uniform(0, np.pi), 0.3, 0],
        ["water", "river"],
        p=[0.8, 0.2],
        jitter=0.04,
    )
    shore = _layer(rng, "shore", "blob", lake.geom, ["sand", "meadow"], p=[0.6, 0.4])
    shore.geom[:, 6] = rng.uniform(10, 40)
    ponds = _blobs(rng, 14, (30, 150), 0.25)
    ponds = ponds[np.hypot(ponds[:, 0], ponds[:, 1]) > 1.6 * r + 300]
    woods = _layer(
        rng,
        "forest",
        "blob",
        _blobs(rng, 20, (200, 900), 0.35),
        ["forest"],
        jitter=0.03,
        lod_m=2.1,
        expand=_expand_trees,
    )
    woods.mat_open = _mats(rng, ["canopy_gap"], n=20, jitter=0.03)[0]
    # trees along the shore
    belt = _layer(
        rng,
        "forest",
        "blob",
        lake.geom,
        ["forest"],
        lod_m=2.1,
        draw=False,
        expand=partial(_expand_trees, spacing=rng.uniform(11, 16), key=6),
    )
    belt.geom[:, 6] = rng.uniform(50, 90)
    lake.mat[:, STRIPE_A] = 0.08  # wind ripples
    ponds = _layer(rng, "pond", "blob", ponds, ["water"])
    ponds.mat[:, STRIPE_A] = 0.08
    layers = [woods, shore, belt, lake, ponds]  # the trees overhang the shore, not the water
    focus = _edge_point(lake, 0.0, 0.0, rng.uniform(0, 2 * np.pi), 2.5 * r)
    return (
        _ground(rng, "grass", "crop_light"),
        layers,
        focus,
        dict(
            tree_spacing=rng.uniform(6, 9),
            tree_r=(2.5, 5.0),
            mosaic=_mosaic_spec(rng, (25, 0.2), (220, 0.15)),
            stripe_m=rng.uniform(3, 4.5),
            stripe_ang=rng.uniform(0, np.pi),
            stripe_warp=0.3,
        ),
    )


def _gen_beach(rng, seed):
    th = rng.uniform(0, 2 * np.pi)  # direction towards the sea
    nx, ny = math.cos(th), math.sin(th)
    wob, sand_w = rng.uniform(150, 500), rng.uniform(30, 150)

    def coast(kind, d, m):
        return _layer(rng, kind, "coast", [nx, ny, d, wob], [m], jitter=0.02)

    (x0, x1), (y0, y1) = _rot(
        np.array([-1.5 * _H, 1.5 * _H]), np.full(2, -sand_w - rng.uniform(150, 400)), th - np.pi / 2
    )
    layers = [
        _layer(rng, "road", "seg", [x0, y0, x1, y1, 5.0], ["asphalt"]),
        coast("beach", -sand_w, "sand"),
        coast("foam", -3.0, "foam"),
        coast("shallow", 0.0, "shallow"),
        coast("sea", rng.uniform(40, 200), "sea"),
    ]
    fx, fy = _edge_point(layers[3], -4 * wob * nx, -4 * wob * ny, th, 8 * wob)
    t0 = rng.uniform(-12, 6)
    return (
        _ground(rng, "grass", "dry_grass"),
        layers,
        (fx + t0 * nx, fy + t0 * ny),
        dict(sea_dir=th),
    )


def _gen_desert(rng, seed):
    track = _polyline(rng, rng.uniform(0, np.pi), 4.0, step=80.0)
    scrub = _scrub_region(rng)
    layers = [
        _layer(rng, "rock", "blob", _blobs(rng, 30, (40, 600), 0.4), ["rock", "dune_dark"]),
        _layer(rng, "track", "seg", track, ["sand"]),
        scrub,
    ]
    params = dict(
        stripe_m=rng.uniform(60, 110),
        stripe_ang=rng.uniform(0, np.pi),
        stripe_warp=0.6,
        mosaic=_mosaic_spec(rng, (30, 0.12), (350, 0.1)),
        tree_spacing=rng.uniform(18, 28),
        tree_r=(0.6, 1.5),
        tree_kind="shrub",
        tree_mats=(["rock", "tree_light"], [0.5, 0.5]),
    )
    return _ground(rng, "dune", "dune_dark", stripe=0.16), layers, (0.0, 0.0), params


def _gen_bare_land(rng, seed):
    tracks = []
    for _ in range(3):
        t = _polyline(rng, rng.uniform(0, np.pi), rng.uniform(3, 6), step=50.0)
        t[:, :4] += rng.uniform(-800, 800)
        tracks.append(t)
    scrub = _scrub_region(rng)
    layers = [
        _layer(rng, "rock", "blob", _blobs(rng, 25, (20, 300), 0.35), ["soil", "rock"]),
        _layer(rng, "track", "seg", np.concatenate(tracks), ["dirt_road"]),
        scrub,
    ]
    params = dict(
        tree_spacing=rng.uniform(9, 16),
        tree_r=(0.8, 2.0),
        tree_kind="shrub",
        mix_bias=rng.uniform(-0.2, 0.2),
        mosaic=_mosaic_spec(rng, (20, 0.2), (180, 0.15)),
    )
    return _ground(rng, "bare", "soil"), layers, (0.0, 0.0), params


def _gen_airport(rng, seed):
    th = rng.uniform(0, np.pi)
    L, W = rng.uniform(2500, 4000), rng.uniform(45, 60)
    off = np.array([0.0] + ([rng.uniform(400, 1500)] if rng.random() < 0.5 else []))

    def boxes(u, v, hu, hv):  # runway-frame boxes (u along the runway) -> world (n, 5)
        u, v, hu, hv = np.broadcast_arrays(
            *(np.atleast_1d(np.asarray(z, np.float64)) for z in (u, v, hu, hv))
        )
        x, y = _rot(u.ravel(), v.ravel(), th)
        return np.stack([x, y, hu.ravel(), hv.ravel(), np.full(x.shape, th)], 1)

    tw_off = -rng.uniform(180, 250)
    ap_off = tw_off - rng.uniform(150, 300)
    ap_len, ap_w = rng.uniform(600, 1200), rng.uniform(150, 250)
    lo, hi = ap_off - ap_w / 2 - 400, off.max() + 300
    n_ac = int(rng.integers(3, 14))
    ac_u = np.linspace(-ap_len / 2 + 50, ap_len / 2 - 50, n_ac)
    ln = rng.uniform(30, 70, n_ac)  # aircraft length (m)
    nose = ap_off - ap_w / 2 + 15
    dash_u = np.arange(-L / 2 + 120, L / 2 - 120, 60)
    key_v = np.linspace(-W / 2 + 4, W / 2 - 4, 10)
    layers = [
        _farm_region(rng)[0],
        _layer(
            rng,
            "airfield",
            "box",
            boxes(0, (lo + hi) / 2, L / 2 + 300, (hi - lo) / 2),
            ["dry_grass"],
        ),
        _layer(rng, "apron", "box", boxes(0, ap_off, ap_len / 2, ap_w / 2), ["concrete"]),
        _layer(
            rng,
            "taxiway",
            "box",
            np.concatenate(
                [  # + 6 links
                    boxes(0, tw_off, L / 2, 11.5),
                    boxes(np.linspace(-L / 2 + 50, L / 2 - 50, 6), tw_off / 2, 11.5, -tw_off / 2),
                ]
            ),
            ["tarmac"],
            jitter=0,
        ),
        _layer(rng, "runway", "box", boxes(0, off, L / 2, W / 2), ["tarmac"], jitter=0),
        _layer(
            rng,
            "marking",
            "box",
            np.concatenate(
                [
                    boxes(dash_u[None, :], off[:, None], 15, 0.45),  # centre line
                    boxes(
                        np.array([-1, 1])[None, :, None] * (L / 2 - 25),
                        off[:, None, None] + key_v,
                        22,
                        0.9,
                    ),
                ]
            ),
            ["marking"],
            jitter=0,
        ),  # threshold bars
        _layer(
            rng,
            "terminal",
            "box",
            boxes(
                0, ap_off - ap_w / 2 - rng.uniform(30, 60), ap_len / 2 * 0.8, rng.uniform(25, 50)
            ),
            ["roof_white", "roof_grey"],
        ),
        _layer(
            rng,
            "wing",
            "box",
            boxes(ac_u, nose + ln * 0.55, ln * 0.47, ln * 0.08),
            ["aircraft"],
            jitter=0.02,
        ),
        _layer(
            rng,
            "aircraft",
            "box",
            boxes(ac_u, nose + ln / 2, ln * 0.045, ln / 2),
            ["aircraft"],
            jitter=0.02,
        ),
    ]
    if rng.random() < 0.5:
        focus = tuple(layers[-1].geom[n_ac // 2, :2])
    else:
        focus = _rot(rng.uniform(-L / 3, L / 3), rng.uniform(-W / 3, W / 3), th)
    return _ground(rng, "dry_grass", "grass"), layers, focus, dict(runways=len(off))


_GENERATORS = [
    _gen_dense_residential,
    _gen_sparse_residential,
    _gen_industrial,
    _gen_farmland,
    _gen_circular_farmland,
    _gen_forest,
    _gen_river,
    _gen_lake,
    _gen_beach,
    _gen_desert,
    _gen_bare_land,
    _gen_airport,
]


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
