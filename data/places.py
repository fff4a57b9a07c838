"""Places on the globe: latitude / longitude in degrees (WGS84), and the spatial split.

A sample's place is the centre of its image, as the fields "lat" (-90..90, north positive) and
"lon" (-180..180, east positive); a sample without a place has neither (or NaN), which the model
reads as its location condition's null (model/conditions.py), never as (0, 0).

The spatial split keeps whole regions out of training, as TerraDiT's "spatial" split of Git-10M
does: the globe is cut into cells CELL_DEG degrees on a side (6 x 12 at 30 degrees) and a fixed,
seeded choice of HELD_OUT_FRACTION of them is held out. A reader given split="train" keeps the
samples outside those cells (and the samples without a place); split="held_out" keeps the samples
inside them; split="all" keeps everything.

    in_split(31.2, 121.5, "train")
    lat, lon = random_place(np.random.default_rng(0), "held_out")   # uniform over the sphere's area
"""

import math
from functools import lru_cache

import numpy as np

CELL_DEG = 30.0  # side of a region of the spatial split, in degrees
HELD_OUT_FRACTION = 0.125  # of the regions: 9 of the 72 at 30 degrees
SPLITS = ("all", "train", "held_out")


def has_place(lat, lon):
    """Whether (lat, lon) is a place: both numbers, both finite."""
    try:
        return math.isfinite(float(lat)) and math.isfinite(float(lon))
    except (TypeError, ValueError):
        return False


def check_place(lat, lon, what="place"):
    """(lat, lon) as floats, longitude wrapped into [-180, 180); ValueError naming `what` for a
    latitude outside [-90, 90] or a value that is not a finite number."""
    if not has_place(lat, lon):
        raise ValueError(
            f"{what}: latitude and longitude must be finite numbers, got {lat!r}, {lon!r}"
        )
    lat, lon = float(lat), float(lon)
    if not -90.0 <= lat <= 90.0:
        raise ValueError(f"{what}: latitude {lat:g} is outside [-90, 90]")
    return lat, wrap_lon(lon)


def wrap_lon(lon):
    """Longitude in degrees -> [-180, 180) (181 E is 179 W)."""
    return (float(lon) + 180.0) % 360.0 - 180.0


def region(lat, lon, cell_deg=CELL_DEG):
    """The (row, column) of the cell of the spatial split that holds (lat, lon); the north pole
    belongs to the top row, 180 E to the first column."""
    rows, cols = math.ceil(180.0 / cell_deg), math.ceil(360.0 / cell_deg)
    row = min(int((float(lat) + 90.0) // cell_deg), rows - 1)
    col = int((wrap_lon(lon) + 180.0) // cell_deg) % cols
    return row, col


@lru_cache(maxsize=None)
def held_out_regions(fraction=HELD_OUT_FRACTION, cell_deg=CELL_DEG, seed=0):
    """The cells of the spatial split held out of training: round(fraction * cells) of them, a
    seeded choice (frozenset of (row, column))."""
    rows, cols = math.ceil(180.0 / cell_deg), math.ceil(360.0 / cell_deg)
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"held-out fraction must be in [0, 1], got {fraction}")
    order = np.random.default_rng([int(seed), 31]).permutation(rows * cols)
    chosen = order[: round(fraction * rows * cols)]
    return frozenset((int(i) // cols, int(i) % cols) for i in chosen)


def check_split(split, what="spatial split"):
    """ValueError naming `what` and the splits for a `split` that is not one of them."""
    if split not in SPLITS:
        raise ValueError(f"{what} {split!r}: expected one of {SPLITS}")


def in_split(lat, lon, split, fraction=HELD_OUT_FRACTION, cell_deg=CELL_DEG, seed=0):
    """Whether a sample at (lat, lon) belongs to `split` ("all", "train" or "held_out") of the
    spatial split. A sample without a place is in "train" and "all", never in "held_out"."""
    check_split(split)
    if split == "all":
        return True
    if not has_place(lat, lon):
        return split == "train"
    held = region(lat, lon, cell_deg) in held_out_regions(fraction, cell_deg, seed)
    return held == (split == "held_out")


def random_place(rng, split="all", fraction=HELD_OUT_FRACTION, cell_deg=CELL_DEG, seed=0):
    """A place drawn uniformly over the sphere's area (lat = asin(u), u uniform in [-1, 1]) from
    the numpy Generator `rng`, redrawn until it lies in `split`: (lat, lon) in degrees."""
    if split == "held_out" and not held_out_regions(fraction, cell_deg, seed):
        raise ValueError(f"no region is held out at fraction {fraction}")
    while True:
        lat = math.degrees(math.asin(rng.uniform(-1.0, 1.0)))
        lon = rng.uniform(-180.0, 180.0)
        if in_split(lat, lon, split, fraction, cell_deg, seed):
            return lat, lon
