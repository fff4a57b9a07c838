"""Procedural detail: children generated on demand from hashed ids, the same at every view.

A layer with an `expand` function is drawn as its mean material until the pixel size falls below its
`lod_m`; then its children are generated for the frame: the cells of a rotated grid (fields,
residential blocks, industrial plots), the houses of a block, the wheel tracks of a centre pivot,
trees and shrubs on a jittered grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from .noise import _hash01
from .raster import _sdf
from .world import _MAT_NAMES, _MAT_TABLE, _MAT_WORD, STRIPE_A, STRIPE_B, Layer, _rot


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
    row_j, col_i = np.meshgrid(j, i, indexing="ij")
    shift = _hash01(seed, row_j, 12) * mw  # rows are staggered
    v_lo, v_hi = [
        jj * mh + (_hash01(seed, jj, 11) - 0.5) * (hh - hl) / 2 for jj in (row_j, row_j + 1)
    ]
    u_lo, u_hi = [
        ii * mw + shift + (_hash01(seed, row_j, ii, 13) - 0.5) * (wh - wl) / 2
        for ii in (col_i, col_i + 1)
    ]
    uc, vc = (u_lo + u_hi) / 2, (v_lo + v_hi) / 2
    near = (np.abs(uc - u0) < reach) & (np.abs(vc - v0) < reach)
    x, y = _rot(uc[near], vc[near], grid.ang)
    geom = np.stack(
        [
            x,
            y,
            (u_hi - u_lo)[near] / 2 - grid.gap / 2,
            (v_hi - v_lo)[near] / 2 - grid.gap / 2,
            np.full(x.shape, grid.ang),
        ],
        1,
    )
    return geom, ((row_j[near] + (1 << 20)) << 21) + (col_i[near] + (1 << 20))


def _expand_grid(scene, region, fr, grid):
    """The grid cells near the frame whose centre lies well inside `region`."""
    geom, ids = _grid_geom(scene.seed, grid, fr)
    d = _sdf(region.shape, region.geom, geom[None, None, :, 0], geom[None, None, :, 1]).min(0)[0]
    inside = d < -0.5 * np.hypot(geom[:, 2], geom[:, 3])
    return grid.cells(scene, geom[inside], ids[inside])


_CROPS = (["crop_green", "crop_light", "crop_yellow", "soil"], [0.35, 0.25, 0.2, 0.2])


def _field_cells(scene, g, ids):
    """Crop fields, rows along or across the grid; some cells left fallow (ground shows)."""
    keep = _hash01(scene.seed, ids, 21) < scene.params.get("field_p", 1.0)
    g, ids = g[keep], ids[keep]
    mat, col = _hash_pick(scene.seed, ids, 20, *_CROPS)
    along = _hash01(scene.seed, ids, 22) < 0.5
    mat[:, STRIPE_A], mat[:, STRIPE_B] = np.where(along, 0.10, 0), np.where(along, 0, 0.10)
    return [Layer("field", "box", g, mat, col, ids=ids)]


def _block_cells(scene, g, ids):
    """Residential blocks: their mean colour until the level resolves the houses."""
    P = scene.params
    jit = (0.94 + 0.12 * _hash01(scene.seed, ids, 23))[:, None].astype(np.float32)
    mean, yard = np.asarray(P["block_mean"])[None] * jit, np.asarray(P["yard"])[None] * jit
    return [
        Layer(
            "block",
            "box",
            g,
            mean,
            np.full(len(g), P["block_word"]),
            ids=ids,
            expand=_expand_houses,
            lod_m=P["house_lod"],
            mat_open=yard,
        )
    ]


def _plot_cells(scene, g, ids):
    """Industrial plots: one large factory roof, or a row of four storage tanks."""
    seed = scene.seed
    tank = _hash01(seed, ids, 24) < 0.12
    b, bid = g[~tank].copy(), ids[~tank]
    b[:, 2] *= 0.6 + 0.3 * _hash01(seed, bid, 25)
    b[:, 3] *= 0.6 + 0.3 * _hash01(seed, bid, 26)
    mat, col = _hash_pick(
        seed, bid, 27, ["roof_white", "roof_grey", "roof_blue", "roof_dark"], [0.35, 0.3, 0.25, 0.1]
    )
    mat[:, STRIPE_A] = 0.05
    tp, tid = g[tank], ids[tank]
    r = 8 + 14 * _hash01(seed, tid, 28)
    off = (np.arange(4) - 1.5)[None] * r[:, None] * 2.6  # (n, 4) along the plot
    tx, ty = tp[:, :1] + off * np.cos(tp[:, 4:5]), tp[:, 1:2] + off * np.sin(tp[:, 4:5])
    tids = (tid[:, None] * 8 + np.arange(4)).ravel()
    tmat, tcol = _hash_pick(seed, tids, 29, ["tank"], [1.0])
    return [
        Layer("factory", "box", b, mat, col, ids=bid),
        Layer(
            "tank",
            "disk",
            np.stack([tx.ravel(), ty.ravel(), np.repeat(r, 4)], 1),
            tmat,
            tcol,
            ids=tids,
        ),
    ]


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
    v = sgn * (hy - d / 2 - hy * P["setback"])  # front of the house on the street
    ca, sa = np.cos(g[bi, 4]), np.sin(g[bi, 4])
    cx, cy = g[bi, 0] + u * ca - v * sa, g[bi, 1] + u * sa + v * ca
    roofs = P["roofs"]
    rows = np.array([_MAT_NAMES.index(m) for m in roofs], np.int64)[
        np.minimum((h[4] * len(roofs)).astype(np.int64), len(roofs) - 1)
    ]
    mat = _MAT_TABLE[rows]
    mat[:, :3] *= (0.92 + 0.16 * h[5])[:, None].astype(np.float32)
    out = [
        Layer(
            "house",
            "box",
            np.stack([cx, cy, w / 2, d / 2, g[bi, 4]], 1)[live],
            mat[live],
            _MAT_WORD[rows][live],
            ids=key[live],
        )
    ]
    if P["tree_p"] > 0:
        t = _hash01(scene.seed, key, 9) < P["tree_p"]
        vt = sgn * (hy * 0.12 + 2.0)  # at the back of the lot
        ut = u + (_hash01(scene.seed, key, 11) - 0.5) * 0.6 * lot_w
        r = 2.0 + 3.0 * _hash01(scene.seed, key, 10)
        tx, ty = g[bi, 0] + ut * ca - vt * sa, g[bi, 1] + ut * sa + vt * ca
        tmat, tcol = _hash_pick(scene.seed, key[t], 12, ["tree", "tree_light"], [0.6, 0.4])
        out.append(Layer("yard_tree", "disk", np.stack([tx, ty, r], 1)[t], tmat, tcol, ids=key[t]))
    return out


def _expand_wheel_tracks(scene, pivots, fr):
    """The concentric wheel tracks of each centre-pivot field: rings of bare soil every track_m
    metres (one per tower of the irrigation arm), 3 m wide."""
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
    cols, rows = np.meshgrid(np.arange(i0, i1), np.arange(j0, j1))
    cid = (cols.ravel() + (1 << 20)) * (1 << 21) + (rows.ravel() + (1 << 20))
    x = (cols.ravel() + _hash01(scene.seed, cid, key, 1)) * spacing
    y = (rows.ravel() + _hash01(scene.seed, cid, key, 2)) * spacing
    return x, y, cid


def _expand_trees(scene, regions, fr, spacing=None, key=5):
    """Tree crowns (or shrubs) on a jittered grid inside the regions; spacing (m) defaults to the
    scene's tree_spacing, materials to its tree_mats (names, probabilities)."""
    P = scene.params
    x, y, cid = _scatter(scene, fr, spacing or P["tree_spacing"], key)
    inside = _sdf(regions.shape, regions.geom, x[None, None, :], y[None, None, :]).min(0)[0] < 0
    x, y, cid = x[inside], y[inside], cid[inside]
    r = P["tree_r"][0] + (P["tree_r"][1] - P["tree_r"][0]) * _hash01(scene.seed, cid, 3)
    mat, col = _hash_pick(
        scene.seed, cid, 4, *P.get("tree_mats", (["tree", "tree_light"], [0.65, 0.35]))
    )
    return [Layer(P.get("tree_kind", "tree"), "disk", np.stack([x, y, r], 1), mat, col, ids=cid)]
