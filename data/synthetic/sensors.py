"""Paired modalities of one frame: panchromatic, near-infrared, SAR-like, haze, cloud with its mask.

They share the composite of the RGB render (the same materials carry NIR reflectance and SAR
backscatter), so each view is pixel-aligned with the RGB image.

    views = modalities(scene, 12.5, 64, seed=0)   # rgb, pan, nir, sar, haze, cloud, cloud_mask, ...
"""

import numpy as np

from .compose import _compose, _finish, _texture, _tint
from .noise import _noise
from .world import NIR, SAR, Scene


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
    rgb = _finish(scene, ch, fr, tex, tint)  # (H, W, 3) float 0..255
    pan = rgb @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R BT.601 luma
    # stands and soil patches, in brightness
    patches = np.mean(tint, 0) if isinstance(tint, np.ndarray) else 1.0
    nir = ch[NIR] * tex * patches + rng.standard_normal((S, S)).astype(np.float32) * 2.0
    # SAR: multiplicative speckle of an L-look intensity image, Gamma(L, 1/L) (Goodman 1976).
    looks = 4
    inten = (ch[SAR] / 255.0) ** 2 * (0.6 + 0.4 * tex) * rng.gamma(looks, 1.0 / looks, (S, S))
    sar = np.sqrt(inten) * 255.0
    # haze: smooth transmission in frame coordinates, bluish-white airlight.
    u = np.arange(S)[None, :] / S * 4.0
    v = np.arange(S)[:, None] / S * 4.0
    key = int(rng.integers(1 << 30))
    t = np.clip(rng.uniform(0.35, 0.7) + 0.2 * _noise(u, v, 1.5, key), 0.15, 0.95).astype(
        np.float32
    )
    A = np.array([225.0, 230.0, 238.0], np.float32) * rng.uniform(0.9, 1.0)
    haze = rgb * t[..., None] + A * (1 - t[..., None])
    # cloud: thresholded fractal density (frame coordinates), soft edges, cloud colour shaded.
    dens = sum(
        a * _noise(u, v, lam, key + k)
        for k, (a, lam) in enumerate(((1, 2.0), (0.5, 1.0), (0.25, 0.5)))
    )
    cover = rng.uniform(0.2, 0.6)
    thr = np.quantile(dens, 1 - cover)
    alpha = np.clip((dens - thr) / 0.15, 0, 1).astype(np.float32)
    cloud_col = 228.0 + 20.0 * np.clip(dens - thr, 0, 1)[..., None]
    cloud = rgb * (1 - alpha[..., None]) + cloud_col * alpha[..., None]

    def u8(x):
        return (np.clip(x, 0, 255) + 0.5).astype(np.uint8)

    return dict(
        rgb=u8(rgb),
        pan=u8(pan),
        nir=u8(nir),
        sar=u8(sar),
        haze=u8(haze),
        transmission=t,
        airlight=A,
        cloud=u8(cloud),
        cloud_alpha=alpha,
        cloud_mask=alpha > 0.5,
    )
