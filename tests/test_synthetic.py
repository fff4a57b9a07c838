"""The procedural Earth: determinism, captions vs what is drawn, physical scale, modalities."""

import re

import numpy as np
import pytest
import torch

from data.synthetic import (
    CLASSES,
    KINDS,
    NUMBER_WORDS,
    InOrder,
    ProceduralEarth,
    Scene,
    caption,
    kind_map,
    layer,
    make_scene,
    material,
    modalities,
    object_mask,
    render,
    resolution_m,
    sample,
)

# a word each caption of the class must contain
CLASS_WORD = {
    "dense_residential": "dense residential",
    "sparse_residential": "sparse residential",
    "industrial": "industrial",
    "farmland": "farmland",
    "circular_farmland": "circular farmland",
    "forest": "forest",
    "river": "river",
    "lake": "lake",
    "beach": "beach",
    "desert": "desert",
    "bare_land": "bare land",
    "airport": "airport",
}


def _scene(label, layers, ground="bare", focus=(0.0, 0.0)):
    """A hand-made scene: one ground material, the given layers."""
    g = material(ground)
    return Scene(
        seed=0, label=CLASSES.index(label), ground=np.stack([g, g]), layers=layers, focus=focus
    )


def _frame_contains(scene, level, size, x, y):
    span = size * resolution_m(level)
    x0, y1 = scene.focus[0] - span / 2, scene.focus[1] + span / 2
    return (x >= x0) & (x < x0 + span) & (y <= y1) & (y > y1 - span)


# ----------------------------------------------------------------------------------------------
# Determinism, shapes, every class at every level
# ----------------------------------------------------------------------------------------------
def test_same_seed_same_sample_different_seed_differs():
    a, b = sample(123, 14.3, 48), sample(123, 14.3, 48)
    assert np.array_equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    assert a["label"] == b["label"] and a["level"] == b["level"]
    c = sample(124, 14.3, 48, cls=a["label"])
    assert not np.array_equal(a["image"], c["image"])
    # the level is drawn from the seed when not given, and lies in the documented range
    d = sample(7)
    assert 10.0 <= d["level"] <= 18.0 and d["level"] == sample(7)["level"]


@pytest.mark.parametrize("cls", range(len(CLASSES)))
def test_every_class_renders_at_levels_10_to_18(cls):
    name = CLASSES[cls]
    scene = make_scene(5 + cls, name)
    assert scene.label == cls and scene.name == name and len(scene.objects()) > 0
    for level in [10, 11, 12, 13, 14, 15, 16, 17, 18, 12.37]:
        img = render(scene, level, 32)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert img.std() > 0.5  # texture and noise, not a flat fill
        text = caption(scene, level, 32, np.random.default_rng(0))
        assert CLASS_WORD[name] in text, (level, text)
    s = sample(11, 13.0, 40, cls=name)
    assert s["image"].shape == (40, 40, 3) and s["label"] == cls and s["name"] == name
    assert isinstance(s["caption"], str) and s["resolution_m"] == 16.0


def test_classes_look_different():
    """Mean colours differ between classes at a mid level (a classifier has something to go on)."""
    means = np.stack(
        [
            np.mean(
                [render(make_scene(s, c), 12.0, 32).reshape(-1, 3).mean(0) for s in range(3)], 0
            )
            for c in range(len(CLASSES))
        ]
    )
    d = np.linalg.norm(means[:, None] - means[None], axis=-1)[np.triu_indices(len(CLASSES), 1)]
    assert len(CLASSES) >= 10 and (d > 0).all() and np.median(d) > 15


# ----------------------------------------------------------------------------------------------
# Captions agree with the frame
# ----------------------------------------------------------------------------------------------
def _number_before(text, noun):
    m = re.search(r"\b(" + "|".join(NUMBER_WORDS) + r")\b([a-z ]*?) " + noun, text)
    return None if m is None else NUMBER_WORDS[m.group(1)]


def test_pivot_count_in_caption_matches_the_frame():
    checked = 0
    pivot = KINDS.index("pivot")
    for seed in range(12):
        scene = make_scene(seed, "circular_farmland")
        for level in (12.5, 13.0, 13.6):
            size = 64
            g = [L for L in scene.layers if L.kind == "pivot"][0].geom
            res = resolution_m(level)
            km = kind_map(scene, level, size)
            span = size * res
            x0, y1 = scene.focus[0] - span / 2, scene.focus[1] + span / 2
            inside = _frame_contains(scene, level, size, g[:, 0], g[:, 1])
            col = ((g[:, 0] - x0) / res).astype(int).clip(0, size - 1)
            row = ((y1 - g[:, 1]) / res).astype(int).clip(0, size - 1)
            visible = np.nonzero(inside & (km[row, col] == pivot) & (2 * g[:, 2] / res >= 3))[0]
            for i in visible:  # each counted pivot really is drawn there
                assert object_mask(scene, level, size, "pivot", i)[row[i], col[i]] > 0.99
            text = caption(scene, level, size, np.random.default_rng(seed))
            n = len(visible)
            if 1 <= n <= 12:
                assert _number_before(text, "circular farmland") == n, (seed, level, n, text)
                checked += 1
            elif n == 0:
                assert _number_before(text, "circular farmland") is None, text
    assert checked >= 10


def test_desert_shrubs_are_captioned_only_where_drawn():
    """Desert shrubs (1-3 m) show from 1 m pixels on; a caption counts them only when the frame shows them, with
    a count no larger than the shrub blobs drawn, and never at 16 m pixels where they are not drawn."""
    shrub, mentioned = KINDS.index("shrub"), 0
    for seed in range(12):
        scene = make_scene(seed, "desert")
        for level in (17.0, 18.0):
            km = kind_map(scene, level, 64)
            text = caption(scene, level, 64, np.random.default_rng(seed))
            n = _number_before(text, "small shrub")
            if "shrub" in text:
                blobs = _components(km == shrub)
                assert n is not None and 1 <= n <= blobs, (seed, level, n, blobs, text)
                mentioned += 1
        km = kind_map(scene, 13.0, 64)
        assert not (km == shrub).any() and "shrub" not in caption(
            scene, 13.0, 64, np.random.default_rng(seed)
        )
    assert mentioned >= 6


def _components(mask):
    """Number of 4-connected True regions of a (H, W) bool mask."""
    seen, count = np.zeros_like(mask), 0
    for r, c in zip(*np.nonzero(mask)):
        if seen[r, c]:
            continue
        count += 1
        stack = [(r, c)]
        seen[r, c] = True
        while stack:
            y, x = stack.pop()
            for yy, xx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if (
                    0 <= yy < mask.shape[0]
                    and 0 <= xx < mask.shape[1]
                    and mask[yy, xx]
                    and not seen[yy, xx]
                ):
                    seen[yy, xx] = True
                    stack.append((yy, xx))
    return count


def test_aircraft_count_and_no_houses_when_unresolved():
    checked = 0
    for seed in range(10):
        scene = make_scene(seed, "airport")
        for level in (15.0, 16.0):
            g = [L for L in scene.layers if L.kind == "aircraft"][0].geom
            km = kind_map(scene, level, 64)
            res = resolution_m(level)
            span = 64 * res
            x0, y1 = scene.focus[0] - span / 2, scene.focus[1] + span / 2
            inside = _frame_contains(scene, level, 64, g[:, 0], g[:, 1])
            col = ((g[:, 0] - x0) / res).astype(int).clip(0, 63)
            row = ((y1 - g[:, 1]) / res).astype(int).clip(0, 63)
            n = int((inside & (km[row, col] == KINDS.index("aircraft"))).sum())
            text = caption(scene, level, 64)
            if 1 <= n <= 12:
                assert _number_before(text, "airplane") == n, (seed, level, n, text)
                checked += 1
    assert checked >= 5
    # a 10-40 m house is below a pixel at level 11 (64 m): no caption counts houses there,
    # while at level 17.5 (0.7 m) the same towns show countable houses
    with_houses = 0
    for seed in range(6):
        scene = make_scene(seed, "dense_residential")
        assert "house" not in caption(scene, 11.0, 64)
        with_houses += "house" in caption(scene, 17.5, 64)
    assert with_houses >= 4


def test_river_direction_and_sea_side_follow_the_geometry():
    river = lambda segs: _scene("river", [layer("river", "seg", segs, "river")], ground="grass")
    ns = river([[0, -5000, 0, 5000, 60]])  # runs north-south through the frame
    ew = river([[-5000, 30, 5000, 30, 60]])
    diag = river([[-5000, 5000, 5000, -5000, 60]])  # north-west to south-east
    assert "from north to south" in caption(ns, 13, 64)
    assert "from west to east" in caption(ew, 13, 64)
    assert "from north-west to south-east" in caption(diag, 13, 64)
    for th, side in ((0.0, "east"), (np.pi / 2, "north"), (np.pi, "west")):
        coast = layer("sea", "coast", [[np.cos(th), np.sin(th), 0.0, 100.0]], "sea")
        sc = _scene("beach", [coast], ground="sand")
        sc.params["sea_dir"] = th
        assert f"to the {side}" in caption(sc, 13, 64)
        img = render(sc, 13, 64).astype(float)
        half = {"east": img[:, 48:], "west": img[:, :16], "north": img[:16]}[side]
        assert half[..., 2].mean() > half[..., 0].mean()  # the sea really is on that side


# ----------------------------------------------------------------------------------------------
# Physical scale
# ----------------------------------------------------------------------------------------------
def test_pivot_diameter_doubles_per_level_by_colour_segmentation():
    """One 600 m green pivot on bare soil: its diameter in pixels doubles from level 12 to 13."""
    pivot = layer("pivot", "disk", [[0.0, 0.0, 300.0]], "crop_green")
    sc = _scene("circular_farmland", [pivot], ground="bare")
    diam = []
    for level in (12, 13, 14):
        img = render(sc, level, 96).astype(float)
        green = img[..., 1] - img[..., 0] > 0  # bare soil is red-dominant
        area_px = green.sum() + 0.0
        diam.append(2 * np.sqrt(area_px / np.pi))
        assert abs(diam[-1] - 600 / resolution_m(level)) < 1.5
    assert diam[1] / diam[0] == pytest.approx(2.0, rel=0.03)
    assert diam[2] / diam[1] == pytest.approx(2.0, rel=0.03)


def test_building_extent_doubles_per_level_and_subpixel_area_is_kept():
    scene = make_scene(3, "farmland")
    houses = [L for L in scene.layers if L.kind == "farmhouse"][0]
    i = int(np.argmax(houses.geom[:, 2] * houses.geom[:, 3]))
    cx, cy, hx, hy, ang = houses.geom[i]
    ext = {}
    for level in (16, 17, 18):
        m = object_mask(scene, level, 160, "farmhouse", i, center=(cx, cy))
        assert m.sum() * resolution_m(level) ** 2 == pytest.approx(4 * hx * hy, rel=0.03)
        ext[level] = (m > 0.5).any(0).sum()  # columns the roof spans
    assert ext[17] / ext[16] == pytest.approx(2.0, abs=0.25)
    assert ext[18] / ext[17] == pytest.approx(2.0, abs=0.15)
    # below a pixel (64 m at level 11): its coverage still sums to its true area
    m = object_mask(scene, 11.0, 16, "farmhouse", i, center=(cx + 7.0, cy - 20.0))
    assert 0 < m.max() < 0.5
    assert m.sum() * resolution_m(11.0) ** 2 == pytest.approx(4 * hx * hy, rel=0.01)


def test_patch_mosaic_keeps_its_physical_size_and_averages_out():
    """Patches of 40 m (forest stands, soil patches): their edges in pixels double in density per level
    zoomed out, and under two pixels (level 12: 32 m pixels) they are averaged away."""
    g = material("bare")
    plain = Scene(seed=5, label=CLASSES.index("bare_land"), ground=np.stack([g, g]), layers=[])
    patched = Scene(
        seed=5,
        label=plain.label,
        ground=plain.ground,
        layers=[],
        params=dict(mosaic=((40.0, 0.3, (1.0, 1.0, 1.0)),)),
    )
    tone = lambda L: (
        render(patched, L, 96).astype(float).mean(-1) - render(plain, L, 96).astype(float).mean(-1)
    )
    edges = {}
    for level in (16.0, 15.0, 14.0):
        d = tone(level)
        assert np.abs(d).max() > 10  # the patches show
        edges[level] = (np.abs(np.diff(d, axis=1)) > 1.5).mean()  # patch edges per pixel
    assert edges[15.0] / edges[16.0] == pytest.approx(2.0, rel=0.25)
    assert edges[14.0] / edges[15.0] == pytest.approx(2.0, rel=0.25)
    assert np.abs(tone(12.0)).max() <= 1.0  # only rounding left


def test_wheel_tracks_ring_the_pivots_every_track_m_metres():
    """Centre-pivot wheel tracks (bare soil on the green crop) are concentric rings a fixed number of metres
    apart: from the pivot's centre outwards, their spacing in pixels halves per level zoomed out; unresolved
    at level 13 (16 m pixels), they are not drawn."""
    scene = make_scene(11, "circular_farmland")
    piv = [L for L in scene.layers if L.kind == "pivot"][0].geom
    cx, cy, r = piv[np.argmax(piv[:, 2])]
    step = scene.params["track_m"]
    for level in (16.0, 15.0, 14.0):
        res = resolution_m(level)
        img = render(scene, level, 128, center=(cx, cy)).astype(float)
        soil = img[64, 64:, 0] - img[64, 64:, 1] > -22  # the crop is green-dominant, soil red
        soil[int((r - step / 2) / res) :] = False  # inside the pivot only
        edges = np.diff(np.concatenate([[0], soil.astype(int), [0]]))
        starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
        radii = ((starts + ends) / 2) * res  # ring centres east of the pivot centre
        assert len(radii) >= 2
        assert np.diff(radii) == pytest.approx(step, abs=1.0 * res)
        assert radii[0] == pytest.approx(step, abs=1.0 * res)
    assert not (kind_map(scene, 13.0, 64, center=(cx, cy)) == KINDS.index("wheel_track")).any()


def test_ground_texture_averages_out_in_large_pixels():
    """Ground grain is metres-scale: resolved at 2 m pixels, averaged away at 64 m pixels, where
    only the (level-independent) sensor noise is left."""
    g = material("bare")
    sc = Scene(seed=0, label=CLASSES.index("bare_land"), ground=np.stack([g, g]), layers=[])
    patch_std = lambda im: im.astype(float).mean(-1).reshape(8, 8, 8, 8).std(axis=(1, 3)).mean()
    fine, coarse, coarser = (patch_std(render(sc, L, 64)) for L in (16.0, 11.0, 10.0))
    assert fine > 3.0 * coarse and coarse == pytest.approx(coarser, rel=0.2)


# ----------------------------------------------------------------------------------------------
# Modalities
# ----------------------------------------------------------------------------------------------
def test_modalities_physics():
    water = layer("lake", "box", [[-200.0, 0.0, 200.0, 400.0, 0.0]], "water")
    roofs = layer("factory", "box", [[200.0, 0.0, 200.0, 400.0, 0.0]], "roof_grey")
    sc = _scene("industrial", [water, roofs], ground="grass", focus=(0.0, 0.0))
    level, size = 14.0, 64  # 8 m pixels: 512 m frame
    m = modalities(sc, level, size, seed=1)
    km = kind_map(sc, level, size)
    w, r = km == KINDS.index("lake"), km == KINDS.index("factory")
    assert w.sum() > 500 and r.sum() > 500
    for k in ("rgb", "haze", "cloud"):
        assert m[k].shape == (size, size, 3) and m[k].dtype == np.uint8
    for k in ("pan", "nir", "sar"):
        assert m[k].shape == (size, size) and m[k].dtype == np.uint8
    assert np.array_equal(m["rgb"], render(sc, level, size))
    rgb = m["rgb"].astype(float)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    assert np.abs(m["pan"] - luma).max() <= 1.0
    # SAR: water (specular) dark, built-up (double bounce) bright, speckle inside a region
    sar = m["sar"].astype(float)
    assert sar[r].mean() > 4 * sar[w].mean()
    assert 0.15 < sar[r].std() / sar[r].mean() < 0.6
    # NIR: vegetation bright, water dark (on a lake scene with vegetation around)
    lake = make_scene(4, "lake")
    ml, kl = modalities(lake, 13.0, 64, seed=0), kind_map(lake, 13.0, 64)
    wl, veg = kl == KINDS.index("lake"), kl < 0  # ground here is grass / crops
    assert wl.sum() > 50 and veg.sum() > 50
    assert ml["nir"][veg].mean() > ml["nir"][wl].mean() + 80
    # haze: I = J t + A (1 - t), contrast drops
    t, A = m["transmission"], m["airlight"]
    assert np.abs(m["haze"] - (rgb * t[..., None] + A * (1 - t[..., None]))).max() <= 1.0
    assert m["haze"].astype(float).std() < 0.9 * rgb.std()
    # cloud: untouched where alpha = 0, bright where masked
    a, cm = m["cloud_alpha"], m["cloud_mask"]
    assert 0.05 < cm.mean() < 0.8 and np.array_equal(cm, a > 0.5)
    assert np.array_equal(m["cloud"][a == 0], m["rgb"][a == 0])
    cloud = m["cloud"].astype(float)
    assert (cloud[cm] >= (rgb[cm] + 228.0) / 2 - 1).all()  # at least half cloud where masked
    thick = a > 0.99
    assert thick.sum() > 20 and cloud[thick].min() > 225
    # deterministic per seed
    assert np.array_equal(modalities(sc, level, size, seed=1)["sar"], m["sar"])


# ----------------------------------------------------------------------------------------------
# Dataset and input checks
# ----------------------------------------------------------------------------------------------
def test_dataset_items_and_loader():
    ds = ProceduralEarth(24, size=32, levels=(11.0, 17.0), seed=3)
    item = ds[5]
    assert set(item) == {
        "image",
        "caption",
        "level",
        "label",
        "quality",
        "key",
    }  # the readers' sample dict
    img = item["image"]
    assert img.shape == (3, 32, 32) and img.dtype == torch.float32
    assert img.min() >= -1 and img.max() <= 1 and img.std() > 0.01
    assert 11.0 <= item["level"] <= 17.0 and item["label"] == 5 % len(CLASSES)
    again = ProceduralEarth(24, size=32, levels=(11.0, 17.0), seed=3)[5]
    assert torch.equal(again["image"], img) and again["caption"] == item["caption"]
    assert not torch.equal(ds[5 + len(CLASSES)]["image"], img)
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 32, 32) and len(batch["caption"]) == 4
    assert batch["label"].tolist() == [0, 1, 2, 3]
    with pytest.raises(IndexError):
        ds[24]
    rendered = list(InOrder(ds, processes=2, chunk=5))  # two worker processes, chunks of 5
    assert len(InOrder(ds, processes=2)) == 24 and len(rendered) == 24
    for i, it in enumerate(rendered):  # the same items, in index order
        assert torch.equal(it["image"], ds[i]["image"])
        assert it["caption"] == ds[i]["caption"] and it["key"] == ds[i]["key"]
    with pytest.raises(ValueError, match="processes and chunk must be >= 1"):
        InOrder(ds, processes=0)


def test_bad_input_raises_clear_errors():
    with pytest.raises(ValueError, match="unknown class"):
        make_scene(0, "volcano")
    with pytest.raises(ValueError, match="class index"):
        make_scene(0, 99)
    scene = make_scene(0, 0)
    with pytest.raises(ValueError, match="level"):
        render(scene, float("nan"), 32)
    with pytest.raises(ValueError, match="size"):
        render(scene, 12.0, 0)
    with pytest.raises(ValueError, match="geometry"):
        layer("pivot", "disk", [[0.0, 0.0]], "crop_green")
    with pytest.raises(ValueError, match="material"):
        material("chocolate")
    with pytest.raises(ValueError, match="levels"):
        ProceduralEarth(4, levels=(18.0, 10.0))
