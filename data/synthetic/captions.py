"""Captions written from what the frame shows: an inventory of the drawn
objects, then one rule per class.

Counts, colours and layout come from the inventory of the composite (objects whose centre pixel
shows them), so a caption never names what the level does not resolve: houses are counted only at
the levels that draw them; from higher up a caption speaks of blocks, or of the residential area.

    text = caption(scene, 12.5, 64, np.random.default_rng(0))
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from .compose import _compose
from .noise import _band
from .world import KINDS, Scene, resolution_m

# ----------------------------------------------------------------------------------------------
# Phrases: numbers, colours, directions, places in the frame
# ----------------------------------------------------------------------------------------------
_NUM = "zero one two three four five six seven eight nine ten eleven twelve".split()
NUMBER_WORDS = {w: i for i, w in enumerate(_NUM)}


def _count(n, sing, plur=None):
    plur = plur or sing + "s"
    if n == 1:
        return f"one {sing}"
    if n <= 12:
        return f"{_NUM[n]} {plur}"
    return f"{'more than a dozen' if n <= 20 else 'dozens of' if n < 100 else 'hundreds of'} {plur}"


def _colors(counter):
    (w0, c0), *rest = counter.most_common(2) or [("", 0)]
    if not rest or c0 >= 0.75 * sum(counter.values()):
        return w0
    return f"{w0} and {rest[0][0]}"


def _compass(ang):
    return [
        "east",
        "north-east",
        "north",
        "north-west",
        "west",
        "south-west",
        "south",
        "south-east",
    ][int(round(ang / (np.pi / 4))) % 8]


def _crossing(dx, dy):
    a = math.atan2(dy, dx) % np.pi
    return [
        "from west to east",
        "from south-west to north-east",
        "from north to south",
        "from north-west to south-east",
    ][int(round(a / (np.pi / 4))) % 4]


def _position(mask):
    """Where a (H, W) bool mask lies: 'in the centre', 'in the upper left', ..."""
    S = mask.shape[0]
    r, c = np.nonzero(mask)
    vr = "upper " if r.mean() < S / 3 else "lower " if r.mean() > 2 * S / 3 else ""
    hc = "left" if c.mean() < S / 3 else "right" if c.mean() > 2 * S / 3 else ""
    return (
        "in the centre"
        if not (vr or hc)
        else f"in the {(vr + hc).strip() or 'middle'}"
        if hc
        else f"in the {vr.strip()} part"
    )


# ----------------------------------------------------------------------------------------------
# The inventory of a frame
# ----------------------------------------------------------------------------------------------
@dataclass
class _Seen:
    """What a frame shows of one kind."""

    n: int = 0  # objects whose centre pixel shows them (counted)
    px: float = 0.0  # median object size of those, pixels
    colors: Counter = field(default_factory=Counter)
    frac: float = 0.0  # fraction of the frame where this kind is on top
    mask: np.ndarray | None = None  # (H, W) bool, kind on top
    segs: list = field(default_factory=list)


# kinds whose objects captions count
_COUNTED = {
    "house",
    "block",
    "yard_tree",
    "factory",
    "tank",
    "field",
    "pivot",
    "tree",
    "pond",
    "runway",
    "aircraft",
    "track",
    "shrub",
    "river",
}


def inventory(scene: Scene, level: float, size: int = 64, center=None, _composed=None) -> dict:
    """What the frame shows, per kind: counts of objects whose centre pixel shows them, sizes
    (px), colours, frame fraction. Captions are written from this and nothing else."""
    ch, top, layers, fr = _composed or _compose(scene, level, size, center)
    S, p = fr.size, fr.res
    inv = {"ground": float((top < 0).mean())}
    for L in layers:
        k = KINDS.index(L.kind)
        e = inv.get(L.kind)
        if e is None:
            mask = top == k
            e = inv[L.kind] = _Seen(frac=float(mask.mean()), mask=mask)
        g = L.geom
        if L.kind not in _COUNTED:
            continue
        if L.shape == "seg":
            cx, cy, sz = (g[:, 0] + g[:, 2]) / 2, (g[:, 1] + g[:, 3]) / 2, 2 * g[:, 4]
        else:
            cx, cy = g[:, 0], g[:, 1]
            sz = 2 * (g[:, 2] if L.shape == "disk" else np.maximum(g[:, 2], g[:, 3]))
        inside = fr.contains(cx, cy)
        col = np.clip(((cx - fr.x0) / p).astype(np.int64), 0, S - 1)
        row = np.clip(((fr.y1 - cy) / p).astype(np.int64), 0, S - 1)
        seen = inside & (top[row, col] == k)
        if L.shape == "seg":
            e.segs.append(g[inside])
        if seen.any():
            e.px = float(np.median(np.concatenate([[e.px] * e.n, sz[seen] / p])))
            e.n += int(seen.sum())
            e.colors.update(L.color[seen].tolist())
    return inv


# ----------------------------------------------------------------------------------------------
# One caption rule per class: (scene, inventory, resolution_m, rng) -> sentence
# ----------------------------------------------------------------------------------------------
def _seen(inv, kind):
    """The inventory entry of a kind, or an empty one when the frame shows none of it."""
    return inv[kind] if kind in inv and kind != "ground" else _Seen()


def _choose(rng, *phrasings):
    """One of the phrasings, drawn from rng."""
    return phrasings[int(rng.integers(len(phrasings)))]


def _river_crossing(inv):
    """'from west to east', ... for a river that shows in the frame (its first to its
    last segment), else ''."""
    river = _seen(inv, "river")
    if river.frac > 0.01 and river.segs and len(np.concatenate(river.segs)) > 0:
        sg = np.concatenate(river.segs)
        d = sg[-1, 2:4] - sg[0, :2] if len(sg) > 1 else sg[0, 2:4] - sg[0, :2]
        return _crossing(*d)
    return ""


def _caption_residential(scene, inv, res, rng):
    """Dense or sparse residential: houses and their roofs, else blocks, else
    the town from high above."""

    def get(k):
        return _seen(inv, k)

    dense = scene.name == "dense_residential"
    adj = "dense" if dense else "sparse"
    river, river_txt = get("river"), _river_crossing(inv)
    h, b = get("house"), get("block")
    if h.n > 0:
        one = h.n == 1
        roofs = (
            f"{_count(h.n, 'house')} with {'a ' if one else ''}{_colors(h.colors)} "
            f"roof{'' if one else 's'}"
        )
        verb = ("is" if one else "are") + (" densely packed" if dense else " scattered")
        stand = ("stands" if one else "stand") + (
            " close together" if dense else " among lawns and trees"
        )
        s = _choose(
            rng,
            f"{roofs} {verb} in a {adj} residential area",
            f"a {adj} residential area where {roofs} {stand}",
        )
        if not dense and get("yard_tree").n > 3:
            s += ", with many trees in the yards"
    elif b.n > 0 and b.px >= 3:
        s = _choose(
            rng,
            f"a {adj} residential area with {_count(b.n, 'block')} of "
            f"{'closely packed' if dense else 'scattered'} houses separated by a grid of streets",
            f"{_count(b.n, 'residential block')} of a {adj} residential area line straight streets",
        )
    elif "block" in inv and get("road").frac + river.frac < 0.5:
        s = (
            f"part of a {adj} residential area: {'paved yards' if dense else 'green lawns'} "
            "beside a street"
        )
    elif get("urban").frac > 0 and get("road").frac + river.frac > 0.5:
        s = (
            f"a {'river' if river.frac > get('road').frac else 'wide road'} in a {adj} "
            "residential area"
        )
        river_txt = ""  # the river is the subject already
    else:
        s = _choose(
            rng,
            f"a large {'grey' if dense else 'green'} {adj} residential area",
            f"the {adj} residential area of a town seen from high above",
        )
        if get("urban").frac > 0 and inv.get("ground", 0) > 0.2:
            s += " surrounded by farmland"
    if river_txt:
        s += f", and a river crosses the {adj} residential blocks {river_txt}"
    elif get("road").frac > 0.02:
        s += ", with a wide road passing through"
    return s


def _caption_industrial(scene, inv, res, rng):
    """Factory roofs and storage tanks, where resolved."""
    f, t = _seen(inv, "factory"), _seen(inv, "tank")
    if f.n > 0 or t.n > 0:
        s = _choose(rng, "an industrial area with ", "in this industrial area there are ")
        parts = (
            [f"{_count(f.n, 'factory building')} with large {_colors(f.colors)} roofs"]
            if f.n
            else []
        )
        parts += [f"{_count(t.n, 'white storage tank')}"] if t.n else []
        return s + " and ".join(parts)
    return _choose(
        rng,
        "a large industrial area with light grey roofs and wide roads",
        "an industrial area of large buildings seen from high above",
    )


def _caption_farmland(scene, inv, res, rng):
    """The fields and their crops, or the crop rows of one field seen close up."""
    f = _seen(inv, "field")
    if f.n >= 1 and f.px >= 3:
        return _choose(
            rng,
            f"{_count(f.n, 'rectangular farmland')} of {_colors(f.colors)} crops are separated by "
            "narrow paths",
            f"{_count(f.n, 'piece')} of {_colors(f.colors)} farmland form a regular patchwork",
        )
    c = f.colors or Counter(["green"])
    return _choose(
        rng,
        f"rows of {_colors(c)} crops in a farmland",
        f"a close view of farmland with {_colors(c)} crops planted in straight rows",
    )


def _caption_circular_farmland(scene, inv, res, rng):
    """The centre pivots and their crops, or the part of one pivot the frame shows."""
    pv = _seen(inv, "pivot")
    if pv.n >= 1 and pv.px >= 3:
        lay = "are neatly arranged" if pv.n >= 3 else "lie side by side" if pv.n == 2 else "lies"
        what = _count(pv.n, _colors(pv.colors) + " circular farmland")
        return _choose(
            rng,
            f"{what} {lay} on dry land",
            f"there {'is' if pv.n == 1 else 'are'} {what} in this image",
        )
    if pv.frac > 0.95:
        return (
            f"the {_colors(pv.colors) or 'green'} crops of a circular farmland fill the whole image"
        )
    return (
        f"part of a {_colors(pv.colors) or 'green'} circular farmland with a curved edge "
        "next to bare land"
    )


def _caption_forest(scene, inv, res, rng):
    """Tree crowns where resolved, clearings and a track."""
    t = _seen(inv, "tree")
    s = (
        _choose(
            rng,
            f"a dense forest with {_count(t.n, 'tree')} of different shades of green",
            f"{_count(t.n, 'tree crown')} crowd together in a forest",
        )
        if t.n > 0
        else _choose(
            rng, "a large dark green forest covers the area", "a dense forest seen from high above"
        )
    )
    if _seen(inv, "clearing").frac > 0.05:
        s += ", with a grassy clearing"
    if _seen(inv, "track").frac > 0.005:
        s += ", and a narrow track winds through the forest"
    return s


def _caption_river(scene, inv, res, rng):
    """The river's colour, width and direction, its bank or the fields beside it."""
    rv, river_txt = _seen(inv, "river"), _river_crossing(inv)
    col = _colors(rv.colors) or "dark"
    if rv.frac > 0.5:
        return (
            f"the {col} water of a wide river next to its "
            f"{'sandy ' if _seen(inv, 'bank').frac else ''}bank"
        )
    s = _choose(
        rng,
        f"a {col} river crosses the image {river_txt}" if river_txt else f"a {col} river",
        f"a {'wide' if rv.px > 8 else 'narrow'} {col} river runs {river_txt}",
    )
    if _seen(inv, "field").n > 1:
        s += " between farmlands"
    return s


def _caption_lake(scene, inv, res, rng):
    """Where the lake lies in the frame, what surrounds it, the ponds nearby."""

    def get(k):
        return _seen(inv, k)

    lk = get("lake")
    if lk.frac > 0:
        s = f"a {_colors(lk.colors) or 'dark'} lake lies {_position(lk.mask)} of the image"
        near = [
            w
            for k, w in (
                ("forest", "forest"),
                ("tree", "trees"),
                ("shore", "a sandy shore"),
                ("field", "farmland"),
            )
            if get(k).frac > 0.05
        ]
        s += f", surrounded by {' and '.join(near[:2])}" if near else ""
    else:
        s = "green land near a lake"
    if get("pond").n:
        s += f", and {_count(get('pond').n, 'small pond')}"
    return s


def _caption_beach(scene, inv, res, rng):
    """The side of the frame the sea lies on."""
    side = _compass(scene.params["sea_dir"])
    if _seen(inv, "sea").frac + _seen(inv, "shallow").frac > 0:
        return _choose(
            rng,
            f"the blue sea lies to the {side} and a sandy beach runs along the coast",
            f"waves break on a sandy beach with the sea to the {side}",
        )
    return "a sandy beach near the sea"


def _caption_desert(scene, inv, res, rng):
    """Sand, the dunes where the pixel size resolves their rows, rocks and shrubs."""
    s = _choose(rng, "a vast orange desert", "an empty desert of orange sand")
    if _band(scene.params["stripe_m"], res) > 0:
        s += " with rows of sand dunes"
    if _seen(inv, "rock").frac > 0.05:
        s += " and dark rocky outcrops"
    shrubs = _seen(inv, "shrub").n
    if shrubs > 0:
        s += f", {_count(shrubs, 'small shrub')} {'dots' if shrubs == 1 else 'dot'} the sand"
    return s


def _caption_bare_land(scene, inv, res, rng):
    """Bare soil, its dirt tracks and shrubs."""
    s = _choose(rng, "a piece of brown bare land", "bare land with dry brown soil")
    if _seen(inv, "track").n > 0:
        s += " crossed by dirt tracks"
    shrubs = _seen(inv, "shrub").n
    if shrubs > 0:
        s += f" and {_count(shrubs, 'small shrub')}"
    return s


def _caption_airport(scene, inv, res, rng):
    """Runways, parked aircraft and the terminal; the markings when a runway fills the frame."""
    rw, ac = _seen(inv, "runway"), _seen(inv, "aircraft")
    if rw.frac > 0.6 and ac.n == 0:
        return "white markings on the grey runway of an airport"
    s = "an airport"
    if rw.n:
        s += f" with {_count(rw.n, 'runway')}"
    elif rw.frac:
        s += " with a long runway"
    if ac.n:
        s += (
            f", where {_count(ac.n, 'airplane')} {'is' if ac.n == 1 else 'are'} parked on the apron"
        )
    elif _seen(inv, "terminal").frac > 0:
        s += " and a terminal building"
    return s


def silent_caption(level: float, rng=None) -> str:
    """A caption that does not reveal the class: a generic overhead image at this level's scale
    (a wide area from high above at low levels, a close view at high ones), no class name and no
    class-specific object. The training caption of ProceduralEarth(omit_class=p) with probability
    p, and the class-silent prompt of a location-only evaluation."""
    rng = np.random.default_rng(0) if rng is None else rng
    res = resolution_m(level)
    if res > 16:  # below level 13
        return _choose(
            rng,
            "a satellite image of a wide area seen from high above",
            "a wide area seen from high above",
            "an overhead view of a large area",
        )
    if res > 2:  # levels 13 to 16
        return _choose(
            rng,
            "a satellite image of the area",
            "an overhead image of the area",
            "a remote sensing image of the area",
        )
    return _choose(
        rng,
        "a close overhead view of the area",
        "a detailed satellite image of a small area",
        "a high resolution overhead image of the ground",
    )


_CAPTIONS = {
    "dense_residential": _caption_residential,
    "sparse_residential": _caption_residential,
    "industrial": _caption_industrial,
    "farmland": _caption_farmland,
    "circular_farmland": _caption_circular_farmland,
    "forest": _caption_forest,
    "river": _caption_river,
    "lake": _caption_lake,
    "beach": _caption_beach,
    "desert": _caption_desert,
    "bare_land": _caption_bare_land,
    "airport": _caption_airport,
}


def caption(
    scene: Scene, level: float, size: int = 64, rng=None, center=None, _composed=None
) -> str:
    """A caption of what the frame shows at this level (counts, colours, layout where true)."""
    rng = np.random.default_rng(0) if rng is None else rng
    inv = inventory(scene, level, size, center, _composed)
    rule = _CAPTIONS.get(scene.name)
    if rule is None:
        raise ValueError(f"no caption rule for class {scene.name!r}")
    return rule(scene, inv, resolution_m(level), rng)
