"""The geography of the procedural Earth: the distribution of the classes a place shows.

The world is a crowded land planet with a few inland seas. Climate follows latitude: an equatorial
belt of rainforest and great rivers; dry belts from about 12 to 33 degrees (sand deserts, bare land
at their margins, centre-pivot farmland in a few irrigated basins); temperate belts of farmland and
forest; boreal forest and lake districts from 48 degrees; cold bare land poleward of 66 degrees.
The seas come from a fixed, seeded low-frequency field on the sphere: open water shows lakes,
coasts show beaches. Six megalopolis regions at different longitudes hold the built-up land: a
dense residential core, and around it sparse residential suburbs, industrial and airport districts.

Every field is a function of a place's unit vector (cos lat cos lon, cos lat sin lon, sin lat), so
longitude wraps (179.99 E lies next to 179.99 W) and a pole is one place whatever its longitude.
Each class gets a score in [0, 1] (a product of soft memberships: land, coast, climate belt,
region; the scores of a place sum to about 1) and a raw weight score ** SHARPNESS; per-class
factors, fitted once on an equal-area grid, balance the weights so that every class covers 1/12
of the sphere's area.

    p = class_probabilities(31.2, 121.5)       # (12,) float64 in CLASSES order, sums to 1
    p = class_probabilities(lats, lons)        # (..., 12) for arrays of places
    cls = rng.choice(len(CLASSES), p=class_probabilities(lat, lon))
"""

from functools import lru_cache

import numpy as np

from .world import CLASSES

SHARPNESS = 4  # raw weight of a class: score ** SHARPNESS, score in [0, 1]
GRID = (180, 180)  # the equal-area grid the balancing factors are fitted on (rows, columns)
SEA_LEVEL = -1.2  # relief (a unit-variance field) below this is sea: about 7% of the sphere
COAST = 0.23  # half-width of the coast, in relief units
BELTS = (12.0, 33.0, 48.0, 66.0)  # |latitude| between tropic, arid, temperate, boreal, polar
# megalopolis regions (lat, lon, radius in degrees): a dense core, suburbs and districts around it
MEGALOPOLISES = [
    (40.0, -80.0, 36.0),
    (35.0, 125.0, 36.0),
    (48.0, 15.0, 36.0),
    (-35.0, -50.0, 36.0),
    (22.0, 78.0, 36.0),
    (-10.0, -150.0, 36.0),
]
CORE = 0.46  # radius of a megalopolis' dense core, as a fraction of its radius
# arid basins irrigated by centre pivots (lat, lon, radius in degrees)
PIVOT_BASINS = [
    (28.0, -110.0, 28.0),
    (-25.0, 30.0, 28.0),
    (25.0, 40.0, 28.0),
    (-20.0, 140.0, 28.0),
    (-22.0, -100.0, 28.0),
]


# ----------------------------------------------------------------------------------------------
# Smooth fields on the sphere
# ----------------------------------------------------------------------------------------------
def unit_vector(lat, lon) -> np.ndarray:
    """Places in degrees -> unit vectors (..., 3): (cos lat cos lon, cos lat sin lon, sin lat)."""
    lat, lon = np.radians(np.asarray(lat, np.float64)), np.radians(np.asarray(lon, np.float64))
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=-1)


def _waves(stream, n, freq):
    """n plane waves of angular frequency freq (per radian of arc) in seeded random directions:
    (n, 3) wave vectors and (n,) phases."""
    rng = np.random.default_rng([20250707, stream])
    k = rng.normal(size=(n, 3))
    k *= freq / np.linalg.norm(k, axis=1, keepdims=True)
    return k, rng.uniform(0.0, 2 * np.pi, n)


def _field(v, waves):
    """A smooth random field of unit variance, the sum of plane waves seen on the sphere:
    v (..., 3) -> (...)."""
    k, phase = waves
    return np.cos(v @ k.T + phase).sum(-1) * np.sqrt(2.0 / len(phase))


def _caps(regions, scale=1.0):
    """Centres (n, 3) and widths (n,) of smooth spherical caps from (lat, lon, radius) rows, the
    radii multiplied by scale."""
    lat, lon, radius = np.asarray(regions, np.float64).T
    return unit_vector(lat, lon), 1.0 - np.cos(np.radians(scale * radius))


def _nearest_cap(v, caps):
    """The largest of the caps at v (..., 3) -> (...): 1 at a centre, 1/e at the radius, falling
    like a Gaussian of the arc."""
    centres, widths = caps
    return np.exp((v @ centres.T - 1.0) / widths).max(-1)


def _sig(x):
    """The logistic sigmoid."""
    return 0.5 * (1.0 + np.tanh(0.5 * x))


_RELIEF = _waves(0, 32, 5.0)  # seas and coasts
_WOBBLE = _waves(1, 12, 2.5)  # the climate belts wander by a few degrees with longitude
_WET = _waves(2, 16, 5.0)  # river basins vs rainforest, farmland vs forest, forest vs lakes
_DRY = _waves(3, 16, 5.0)  # sand desert vs bare land
_ZONES = _waves(4, 16, 8.0)  # suburbs vs industrial vs airport districts
_CITY, _CORE = _caps(MEGALOPOLISES), _caps(MEGALOPOLISES, CORE)
_PIVOT = _caps(PIVOT_BASINS)


# ----------------------------------------------------------------------------------------------
# Class scores, balanced probabilities
# ----------------------------------------------------------------------------------------------
def _scores(v):
    """Class scores in [0, 1] at unit vectors v (..., 3) -> (..., 12), CLASSES order: products of
    soft memberships (land or sea, coast, climate belt, region)."""
    lat = np.degrees(np.arcsin(np.clip(v[..., 2], -1.0, 1.0)))
    alat = np.abs(lat) + 4.0 * _field(v, _WOBBLE)
    s1, s2, s3, s4 = (_sig((alat - b) / 2.0) for b in BELTS)
    tropic, arid, temperate, boreal, polar = 1 - s1, s1 - s2, s2 - s3, s3 - s4, s4  # sum to 1
    h = _field(v, _RELIEF) - SEA_LEVEL
    land, coast = _sig(h / 0.05), np.exp(-((h / COAST) ** 2))
    inland = land * (1 - coast)
    core = _sig(8 * (_nearest_cap(v, _CORE) - 0.5))
    urban = inland * (1 - polar) * _sig(8 * (_nearest_cap(v, _CITY) - 0.5))
    suburb, rural = urban * (1 - core), inland * (1 - urban)
    pivot = _sig(8 * (_nearest_cap(v, _PIVOT) - 0.5))
    wet, dry, zone = _field(v, _WET), _field(v, _DRY), _field(v, _ZONES)
    forest = temperate * _sig(-2 * (wet + 1.6)) + tropic * _sig(2 * (wet - 0.9))
    s = {
        "dense_residential": urban * core,
        "sparse_residential": suburb * _sig(4 * (0.65 - zone)) * _sig(4 * (zone + 0.55)),
        "industrial": suburb * _sig(4 * (zone - 0.65)),
        "airport": suburb * _sig(-4 * (zone + 0.55)),
        "farmland": rural * temperate * _sig(2 * (wet + 1.6)),
        "forest": rural * (forest + boreal * _sig(2 * wet)),
        "river": rural * tropic * _sig(-2 * (wet - 0.9)),
        "circular_farmland": rural * arid * pivot,
        "desert": rural * arid * (1 - pivot) * _sig(2 * (dry + 1.8)),
        "bare_land": rural * (arid * (1 - pivot) * _sig(-2 * (dry + 1.8)) + polar) + coast * polar,
        "lake": (1 - land) * (1 - coast) + rural * boreal * _sig(-2 * wet),
        "beach": coast * (1 - polar),
    }
    return np.stack([s[c] for c in CLASSES], axis=-1)


def _raw_weights(v):
    """Unbalanced class weights score ** SHARPNESS: v (..., 3) -> (..., 12). The scores of a place
    sum to about 1 (never less), so the weights never all vanish."""
    return _scores(v) ** SHARPNESS


def equal_area_grid(rows=GRID[0], cols=GRID[1]):
    """The centres (lat, lon) in degrees of rows x cols cells of equal area (uniform in sin
    latitude and in longitude), each (rows, cols)."""
    z = (np.arange(rows) + 0.5) / rows * 2 - 1
    lon = (np.arange(cols) + 0.5) / cols * 360 - 180
    return np.meshgrid(np.degrees(np.arcsin(z)), lon, indexing="ij")


def fit_factors(rows=GRID[0], cols=GRID[1], tol=1e-7, max_iters=1000):
    """Per-class factors (12,) that make the area-weighted marginal of the balanced probabilities
    uniform on an equal-area grid: each class divided by its marginal, renormalised per place,
    repeated until every marginal is within tol (relative) of 1/12 (Sinkhorn's iteration with one
    side of the plan fixed). Scaled to geometric mean 1."""
    w = _raw_weights(unit_vector(*equal_area_grid(rows, cols))).reshape(-1, len(CLASSES))
    a = np.ones(len(CLASSES))
    for _ in range(max_iters):
        p = w * a
        marginal = (p / p.sum(-1, keepdims=True)).mean(0) * len(CLASSES)  # 1 when balanced
        if np.abs(marginal - 1).max() < tol:
            break
        a /= marginal
    return a / np.exp(np.log(a).mean())


@lru_cache(maxsize=1)
def _factors():
    """fit_factors() at the default grid, computed once per process (about 0.4 s)."""
    return fit_factors()


def class_probabilities(lat, lon) -> np.ndarray:
    """The distribution of the classes (CLASSES order) at a place (lat, lon) in degrees: (12,)
    float64 summing to 1, or (..., 12) for arrays of places. Deterministic and smooth on the
    sphere; its area-weighted average over the sphere is uniform."""
    p = _raw_weights(unit_vector(lat, lon)) * _factors()
    return p / p.sum(-1, keepdims=True)
