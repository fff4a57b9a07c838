"""The image of a scene at a map level: layers composited over the ground,
texture, mosaic tint, noise.

    img = render(scene, level=12.5, size=64)  # (H, W, 3) uint8, north up
    kinds = kind_map(scene, 12.5, 64)  # (H, W) index into KINDS of what is on top, -1 = ground
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from .noise import _band, _fractal, _hash01, _noise, _noise_fields
from .raster import _cull, _frame, _rasterize
from .world import KINDS, MOSAIC, N_CH, STRIPE_A, STRIPE_B, TEX, Layer, Scene


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
            for D in L.expand(scene, L, fr):  # children are drawn right after their parent
                visit(D)
        elif L.draw:
            out.append(L)

    for L in scene.layers:
        visit(L)
    return out


def _compose(scene, level, size, center=None):
    """Composite all layers: (channels (N_CH, H, W) float32, top kind id (H, W)
    int16, layers, frame)."""
    fr = _frame(scene, level, size, center)
    S, xs, ys = fr.size, fr.xs, fr.ys
    mix = _fractal(xs, ys, fr.res, (4096.0, 1024.0, 256.0), scene.seed) * 1.1 + scene.params.get(
        "mix_bias", 0.0
    )
    mix = np.clip(0.5 + mix, 0, 1).astype(np.float32).reshape(-1, 1)
    ga, gb = scene.ground[0][None], scene.ground[1][None]
    out = ga + mix * (gb - ga)  # (S*S, N_CH) pixel-major
    top = np.full(S * S, -1, np.int16)
    layers = _visible_layers(scene, fr)
    runs = [[layers[0]]] if layers else []
    for L in layers[1:]:  # consecutive layers of one shape: rasterise together
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
            both = Layer(
                run[0].kind,
                run[0].shape,
                np.concatenate([L.geom for L in run]),
                np.concatenate([L.mat for L in run]),
                np.concatenate([L.color for L in run]),
            )
            pix, a, obj = _rasterize(both, fr, stack)
            lid = stack[obj]
            per_layer = [
                (L, pix[lid == j], a[lid == j], obj[lid == j] - start[j]) for j, L in enumerate(run)
            ]
        for L, pix, a, obj in per_layer:
            _over(out, top, L, pix, a, obj, S)
    return out.T.reshape(N_CH, S, S), top.reshape(S, S), layers, fr


def _over(out, top, L, pix, a, obj, S):
    """Composite one layer's coverage over out (S*S, N_CH) in place ("over", Porter & Duff 1984)."""
    if len(pix):
        A = np.minimum(np.bincount(pix, a, S * S), 1.0).astype(np.float32)
        owner = np.zeros(S * S, np.int64)
        owner[pix] = obj  # (where objects share a pixel, one of them wins)
        if len(pix) > S * S // 2:  # dense "over" compositing
            out += A[:, None] * (L.mat[owner] - out)
            top[A > 0.5] = KINDS.index(L.kind)
        else:
            m = np.unique(pix)
            Am = A[m, None]
            out[m] += Am * (L.mat[owner[m]] - out[m])
            top[m[Am[:, 0] > 0.5]] = KINDS.index(L.kind)


def _tint(scene, ch, fr):
    """Multiplicative RGB factor (3, H, W) of the scene's patch mosaics, or 1.

    params["mosaic"] = ((cell metres, amplitude, (r, g, b) direction), ...): per scale, patches
    about `cell` metres across (stands of trees, soil or sand patches), each with its own tone in
    [-1, 1]: a staggered grid of cells whose edges are warped by noise, so they read as patches, not
    squares. Their size is physical, so how many patches a frame holds tells its level
    (a fractal would not); under 2 px they average out. Each scale has its own colour direction
    (brightness for the small patches, a colour shift for the large ones), so that two scales cannot
    pass for each other at two levels."""
    spec = [
        (k, c, a, rgb, _band(c, fr.res))
        for k, (c, a, rgb) in enumerate(scene.params.get("mosaic", ()))
    ]
    spec = [z for z in spec if z[4] > 0]
    if not spec or not ch[MOSAIC].any():
        return 1.0
    xs, ys, seed = fr.xs, fr.ys, scene.seed
    base = seed % 100_003 * 16
    warp = _noise_fields(
        xs,
        ys,
        [c for _, c, *_ in spec for _ in (0, 1)],
        [base + 2 * k + d for k, *_ in spec for d in (0, 1)],
    )  # (2 per scale, H, W)
    f = 0.0
    for i, (k, cell, amp, rgb, w) in enumerate(spec):
        j = np.floor((ys + 0.4 * cell * warp[2 * i]) / cell).astype(np.int64)
        u = (xs + 0.4 * cell * warp[2 * i + 1]) / cell + (j * 0.6180339887) % 1.0  # rows staggered
        tone = 2.0 * _hash01(seed, 40 + k, (np.floor(u).astype(np.int64) << 24) + j) - 1.0
        f = (
            f
            + (amp * w) * np.asarray(rgb, np.float32)[:, None, None] * tone.astype(np.float32)[None]
        )
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
            t = t + w * (
                ch[STRIPE_A] * np.sin(2 * np.pi * (u / period + warp))
                + ch[STRIPE_B] * np.sin(2 * np.pi * (v / period + warp))
            )
    return t


def _finish(scene, ch, fr, tex=None, tint=None):
    """RGB float (H, W, 3) in 0..255: material colour x texture x mosaic tint + sensor noise."""
    rgb = (
        ch[:3]
        * (_texture(scene, ch, fr) if tex is None else tex)
        * (_tint(scene, ch, fr) if tint is None else tint)
    )
    rng = np.random.default_rng([scene.seed, int(round(fr.level * 1000)), fr.size])
    rgb += rng.standard_normal(rgb.shape, dtype=np.float32) * 2.0
    return np.clip(rgb.transpose(1, 2, 0), 0, 255)


def render(scene: Scene, level: float, size: int = 64, center=None) -> np.ndarray:
    """The scene seen from above at Google map level `level`: (size, size, 3) uint8, north up."""
    ch, _, _, fr = _compose(scene, level, size, center)
    return (_finish(scene, ch, fr) + 0.5).astype(np.uint8)


def kind_map(scene: Scene, level: float, size: int = 64, center=None) -> np.ndarray:
    """(H, W) int16: index into KINDS of the top object covering > 1/2 of
    each pixel, -1 = ground."""
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
    return np.minimum(np.bincount(pix, a, fr.size**2), 1).astype(np.float32).reshape(size, size)
