"""The geography of the procedural Earth: a balanced, informative, continuous class distribution
over the globe, and located items of ProceduralEarth (places, classes, class-silent captions)."""

import hashlib

import numpy as np
import pytest

from data.places import in_split
from data.synthetic import CLASSES, ProceduralEarth, class_probabilities, silent_caption
from data.synthetic.geography import _factors, equal_area_grid, fit_factors


def _uniform_places(n, seed):
    """n places uniform over the sphere's area, in degrees."""
    rng = np.random.default_rng(seed)
    return np.degrees(np.arcsin(rng.uniform(-1, 1, n))), rng.uniform(-180, 180, n)


# ----------------------------------------------------------------------------------------------
# class_probabilities
# ----------------------------------------------------------------------------------------------
def test_probabilities_are_distributions_and_vectorised():
    p = class_probabilities(31.2, 121.5)
    assert p.shape == (len(CLASSES),) and p.dtype == np.float64
    assert np.all(p >= 0) and p.sum() == pytest.approx(1.0)
    lat, lon = _uniform_places(50, 1)
    many = class_probabilities(lat.reshape(5, 10), lon.reshape(5, 10))
    assert many.shape == (5, 10, len(CLASSES))
    np.testing.assert_allclose(many.sum(-1), 1.0)
    np.testing.assert_allclose(many[2, 3], class_probabilities(lat[23], lon[23]), atol=1e-12)
    assert np.array_equal(class_probabilities(-12.5, 40.0), class_probabilities(-12.5, 40.0))


def test_area_weighted_marginal_is_uniform():
    # Monte Carlo over the sphere's area, independent of the grid the factors were fitted on
    p = class_probabilities(*_uniform_places(100_000, 7))
    marginal = p.mean(0)
    print(dict(zip(CLASSES, marginal.round(4))))
    np.testing.assert_allclose(marginal, 1 / len(CLASSES), atol=0.02)
    # the cached factors are the fixed point: a finer grid finds nearly the same ones
    np.testing.assert_allclose(fit_factors(240, 240), _factors(), rtol=0.02)
    lat, lon = equal_area_grid(180, 180)
    np.testing.assert_allclose(class_probabilities(lat, lon).mean((0, 1)), 1 / 12, atol=1e-6)


def test_place_is_informative():
    p = class_probabilities(*_uniform_places(50_000, 8))
    tv = 0.5 * np.abs(p - 1 / len(CLASSES)).sum(-1)  # total variation to the uniform marginal
    top = p.max(-1)
    print(f"mean TV {tv.mean():.3f}, top class >= 0.4 at {np.mean(top >= 0.4):.3f}")
    assert tv.mean() >= 0.5
    assert np.mean(top >= 0.4) >= 0.8
    # the climate: the equator is wet, the subtropics dry, the poles bare
    names = {c: i for i, c in enumerate(CLASSES)}
    lon = np.linspace(-180, 180, 73)[:-1]
    equator, pole = class_probabilities(0.0 * lon, lon), class_probabilities(0 * lon + 85, lon)
    assert (equator[:, names["forest"]] + equator[:, names["river"]]).mean() > 0.4
    assert pole[:, names["bare_land"]].mean() > 0.9


@pytest.mark.parametrize("lat", [-89.9, -60.0, -23.5, 0.0, 17.0, 45.0, 71.0])
def test_longitude_wraps(lat):
    east, west = class_probabilities(lat, 179.99), class_probabilities(lat, -179.99)
    assert np.abs(east - west).max() < 0.01
    np.testing.assert_allclose(class_probabilities(lat, 180.0), class_probabilities(lat, -180.0))
    np.testing.assert_allclose(class_probabilities(lat, 200.0), class_probabilities(lat, -160.0))


def test_a_pole_is_one_place_and_the_map_is_continuous():
    lon = np.linspace(-180, 180, 37)
    for pole in (90.0, -90.0):
        p = class_probabilities(np.full_like(lon, pole), lon)
        assert np.abs(p - p[0]).max() < 1e-9
        near = class_probabilities(np.full_like(lon, pole - np.sign(pole) * 0.001), lon)
        assert np.abs(near - p[0]).max() < 1e-3
    # a step of 0.01 degree anywhere moves the distribution by little
    lat, lon = _uniform_places(2000, 9)
    step = class_probabilities(np.clip(lat + 0.01, -90, 90), lon + 0.01)
    assert np.abs(step - class_probabilities(lat, lon)).max() < 0.02


# ----------------------------------------------------------------------------------------------
# ProceduralEarth: located items, class-silent captions, and the unchanged default
# ----------------------------------------------------------------------------------------------
# sha256 of ProceduralEarth(8, size=32)[i]["image"] and its caption, recorded before located items
# and class-silent captions existed: the default items must stay bitwise the same
DEFAULT_ITEMS = [
    (
        "400daf6a114c79bb821126ce4babeb8306702bbd5bb5940c85560122b11d4c36",
        "a dense residential area with more than a dozen blocks of closely packed houses "
        "separated by a grid of streets",
    ),
    (
        "b8b9c994aef42056f8dc0cd6385149ae1412755d3e0a4065ad4a3f65be08f1b3",
        "a sparse residential area with twelve blocks of scattered houses separated by a grid "
        "of streets",
    ),
    (
        "6fa84085f1bc9c2a24efdbef4ccb52c26a41da408771b4a10b443e66cb5c1302",
        "in this industrial area there are one factory building with large blue roofs",
    ),
    (
        "93f641ed082f0c34e914e9fafd2c0dba714578758dab61afa24ceed6517f8792",
        "rows of green crops in a farmland",
    ),
]
# words that would reveal the class of a scene
CLASS_WORDS = [c.replace("_", " ") for c in CLASSES] + [
    "residential",
    "farmland",
    "forest",
    "river",
    "lake",
    "beach",
    "desert",
    "airport",
    "industrial",
    "house",
    "roof",
    "block",
    "street",
    "factory",
    "tank",
    "crop",
    "field",
    "tree",
    "water",
    "sea",
    "sand",
    "dune",
    "runway",
    "airplane",
    "soil",
    "bare",
    "town",
    "city",
    "urban",
]


def _digest(item):
    return hashlib.sha256(item["image"].numpy().tobytes()).hexdigest()


@pytest.mark.parametrize("kwargs", [{}, {"located": False, "places": "train", "omit_class": 0.0}])
def test_default_items_are_unchanged(kwargs):
    ds = ProceduralEarth(8, size=32, **kwargs)
    for i, (digest, text) in enumerate(DEFAULT_ITEMS):
        item = ds[i]
        assert _digest(item) == digest and item["caption"] == text
        assert item["label"] == i and "lat" not in item and "lon" not in item


def test_located_items_are_deterministic():
    a, b = ProceduralEarth(6, size=16, located=True), ProceduralEarth(6, size=16, located=True)
    for i in range(6):
        x, y = a[i], b[i]
        assert isinstance(x["lat"], float) and isinstance(x["lon"], float)
        assert -90 <= x["lat"] <= 90 and -180 <= x["lon"] < 180
        assert (x["lat"], x["lon"], x["label"], x["caption"]) == (
            y["lat"],
            y["lon"],
            y["label"],
            y["caption"],
        )
        assert _digest(x) == _digest(y)
    # the place is the item's own draw: another seed moves it, the level and scene seed stay
    plain, other = ProceduralEarth(6, size=16)[2], ProceduralEarth(6, size=16, seed=1, located=True)
    assert a[2]["level"] == plain["level"] and other[2]["lat"] != a[2]["lat"]


def test_located_items_stay_in_their_split():
    ds = ProceduralEarth(40, size=16, levels=(10.0, 11.0), located=True, places="held_out")
    for i in range(len(ds)):
        item = ds[i]
        assert in_split(item["lat"], item["lon"], "held_out")
    train = ProceduralEarth(40, size=16, levels=(10.0, 11.0), located=True, places="train")
    assert all(in_split(train[i]["lat"], train[i]["lon"], "train") for i in range(len(train)))


def test_located_classes_follow_the_geography():
    n = 400
    ds = ProceduralEarth(n, size=16, levels=(10.0, 11.0), located=True)
    items = [ds[i] for i in range(n)]
    labels = np.array([it["label"] for it in items])
    counts = np.bincount(labels, minlength=len(CLASSES))
    lat, lon = np.array([it["lat"] for it in items]), np.array([it["lon"] for it in items])
    expected = class_probabilities(lat, lon).sum(0)  # the classes the places call for
    print(dict(zip(CLASSES, counts)))
    assert np.all(np.abs(counts - expected) < 4 * np.sqrt(expected) + 2)
    assert np.all(np.abs(counts - n / len(CLASSES)) < 0.5 * n / len(CLASSES))
    # the class is the place's: most items show the most likely class of their place
    assert np.mean(class_probabilities(lat, lon).argmax(-1) == labels) > 0.7


def test_class_silent_captions():
    ds = ProceduralEarth(24, size=16, levels=(10.0, 18.0), located=True, omit_class=1.0)
    texts = [ds[i]["caption"] for i in range(len(ds))]
    texts += [
        silent_caption(level, np.random.default_rng(k)) for level in range(10, 19) for k in range(8)
    ]
    for text in texts:
        assert not any(word in text for word in CLASS_WORDS), text
    # the phrasing follows the level: a wide view from high up, a close one near the ground
    wide = [silent_caption(10.5, np.random.default_rng(k)) for k in range(8)]
    assert all("high above" in t or "large area" in t for t in wide)
    assert all("high above" not in silent_caption(17.5, np.random.default_rng(k)) for k in range(8))
    # a fraction p of the captions, drawn per item; the images and classes do not change
    half = ProceduralEarth(60, size=16, levels=(10.0, 11.0), located=True, omit_class=0.5)
    full = ProceduralEarth(60, size=16, levels=(10.0, 11.0), located=True)
    silent = 0
    for i in range(60):
        h, f = half[i], full[i]
        assert h["label"] == f["label"] and _digest(h) == _digest(f)
        silent += h["caption"] != f["caption"]
    assert 15 <= silent <= 45


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="places"):
        ProceduralEarth(4, located=True, places="test")
    with pytest.raises(ValueError, match="omit_class"):
        ProceduralEarth(4, omit_class=1.5)
