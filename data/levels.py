"""Google map levels, ground resolution and web-map tiles: the one place that converts between them.

Text2Earth's resolution condition is the Google map level L: resolution_m = 2 ** (17 - L) metres per
pixel (L = 17 -> 1 m, L = 10 -> 128 m), fractional levels allowed (UCM's 0.3 m is L ~ 18.7); L = 0
means "no resolution". The release's prompts may carry the level as a prefix,
"{L}_GOOGLE_LEVEL_{text}".
"""

import math
import re

LEVEL_PREFIX = "_GOOGLE_LEVEL_"
_LEVEL_PREFIX = re.compile(r"^\s*(\d+(?:\.\d+)?)_GOOGLE_LEVEL_(.*)$", re.DOTALL)


def level_from_resolution(resolution_m):
    """Ground sample distance in metres/pixel -> Google map level, L = 17 - log2(m)."""
    m = float(resolution_m)
    if not math.isfinite(m) or m <= 0:
        raise ValueError(
            f"resolution must be a positive number of metres per pixel, got {resolution_m!r}"
        )
    return 17.0 - math.log2(m)


def asked_level(level=None, resolution_m=None):
    """The level a command line asks for with --level or --resolution-m (metres per pixel), not
    both; None if neither. ValueError naming the problem."""
    if level is not None and resolution_m is not None:
        raise ValueError("give --level or --resolution-m, not both")
    if resolution_m is not None:
        if not resolution_m > 0:
            raise ValueError(f"--resolution-m must be > 0, got {resolution_m}")
        return level_from_resolution(resolution_m)
    return level


def resolution_from_level(level):
    """Google map level -> metres per pixel, 2 ** (17 - L)."""
    return 2.0 ** (17.0 - float(level))


def parse_level_prefix(text, strict=False):
    """'{L}_GOOGLE_LEVEL_{caption}' -> (float(L), caption); text without the prefix -> (0.0, text).
    L = 0 in the prefix means no resolution. strict=True raises ValueError for text that holds
    "_GOOGLE_LEVEL_" but not as a valid prefix (e.g. 'abc_GOOGLE_LEVEL_farm'),
    where a user meant one."""
    if not isinstance(text, str):
        raise ValueError(f"parse_level_prefix expects a str, got {type(text).__name__}")
    m = _LEVEL_PREFIX.match(text)
    if m is None:
        if strict and LEVEL_PREFIX in text:
            head = text.split(LEVEL_PREFIX, 1)[0]
            raise ValueError(
                f"prompt {text[:60]!r}: level prefix {head!r} is not a number; the form is "
                f"'{{L}}{LEVEL_PREFIX}{{text}}', e.g. '17{LEVEL_PREFIX}a harbour'"
            )
        return 0.0, text
    return float(m.group(1)), m.group(2)


def parse_google_location(loc):
    """Git-10M `Google_location` 'Z_X_Y' -> (z, x, y) ints; z is the map level."""
    parts = str(loc).strip().split("_")
    try:
        z, x, y = (int(p) for p in parts)
    except ValueError:
        raise ValueError(
            f"Google_location must look like 'Z_X_Y' with integers, got {loc!r}"
        ) from None
    if not (0 <= z <= 30 and 0 <= x < 2**z and 0 <= y < 2**z):
        raise ValueError(
            f"Google_location {loc!r} is not a valid web-map tile (need 0 <= x, y < 2**z)"
        )
    return z, x, y


def tile_to_lonlat(z, x, y, center=False):
    """Web-map (slippy map / Web Mercator) tile -> (lon, lat) in degrees of its north-west corner
    (or its center). OpenStreetMap "Slippy map tilenames": lon = x / 2^z * 360 - 180,
    lat = atan(sinh(pi * (1 - 2 y / 2^z)))."""
    n = 2.0**z
    xf, yf = (x + 0.5, y + 0.5) if center else (float(x), float(y))
    lon = xf / n * 360.0 - 180.0
    lat = math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * yf / n))))
    return lon, lat
