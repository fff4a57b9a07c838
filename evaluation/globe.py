"""Location on the procedural globe, judged by the probe: at a place, do a model's samples show the
classes the world puts there (data/synthetic/geography.py)?

For each place, k samples of one prompt that does not name the class (silent_caption) are read by
the probe (evaluation/probe.py) into class shares, compared with the world's class distribution at
that place by the total-variation distance TV(p, q) = 1/2 sum_c |p_c - q_c| (0: the same
distribution, 1: disjoint). The same samples without the place show the model's prior over the
whole globe; k real renders at the place, read by the same probe, are the floor (what k draws and
the probe's errors leave even for a perfect model).

    places = places_in("held_out", 4, seed=0)
    figures, shown = place_figures(model, probe, places, k=16, size=32, guidance=..., steps=20)
    figures["tv_place"], figures["tv_no_place"], figures["tv_real"]   # means over the places
"""

import numpy as np
import torch

from data.places import random_place
from data.synthetic import CLASSES, class_probabilities, sample, silent_caption
from model import conditions
from data.transforms import tensor_to_pil
from evaluation.showcase import draw_strip
from model.pipeline import generate

SILENT_LEVEL = 14.0  # the level the class-silent prompt is asked at


def places_in(split, n, seed=0):
    """n places drawn uniformly over the sphere's area within `split` of the spatial split
    (data/places.py), seeded from (seed, i, 37)."""
    return [random_place(np.random.default_rng([int(seed), i, 37]), split) for i in range(n)]


def place_for_class(cls, rng, split="all"):
    """A place where the world shows class `cls`: places drawn uniformly within `split`, each kept
    with the probability the world gives cls there (so places come from p(place | class))."""
    while True:
        lat, lon = random_place(rng, split)
        if rng.random() < class_probabilities(lat, lon)[cls]:
            return lat, lon


def tv_distance(p, q):
    """Total-variation distance of two distributions over the classes."""
    return 0.5 * float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def class_shares(probe, images):
    """The fraction of `images` (N, 3, H, W) in [-1, 1] the probe reads as each class: (C,)."""
    cls, _ = probe.predict(images)
    return np.bincount(cls.numpy(), minlength=len(CLASSES)) / len(cls)


def real_renders(place, k, size, level=SILENT_LEVEL, seed=0):
    """k procedural renders at `place`: each class drawn from the world's distribution there,
    scenes seeded from (seed, j, 41); (k, 3, H, W) in [-1, 1]."""
    p = class_probabilities(*place)
    out = []
    for j in range(k):
        rng = np.random.default_rng([int(seed), j, 41])
        cls = int(rng.choice(len(CLASSES), p=p))
        u8 = sample(int(rng.integers(1 << 62)), level, size, cls=cls)["image"]
        out.append(torch.from_numpy(u8).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(out)


def _generate(model, prompt, places, k, size, guidance, steps, batch=64):
    """k samples of `prompt` at each of `places` (None: no place), seeds j for sample j of a place;
    (len(places) * k, 3, H, W)."""
    jobs = [(place, j) for place in places for j in range(k)]
    images = []
    for i in range(0, len(jobs), batch):
        part = jobs[i : i + batch]
        placed = [place for place, _ in part]
        cond = conditions.request(
            model.cfg,
            len(part),
            text=prompt,
            level=SILENT_LEVEL,
            location=placed if any(placed) else None,
        )
        images.append(
            generate(
                model,
                cond,
                seeds=[j for _, j in part],
                steps=steps,
                guidance=guidance,
                size=(size, size),
            )
        )
    return torch.cat(images)


def place_figures(model, probe, places, k, size, guidance, steps, seed=0):
    """(figures, shown). figures: the mean over `places` of the TV distance between the world's
    class distribution at each place and the class shares the probe reads from k samples of the
    class-silent prompt with the place ("tv_place"), without it ("tv_no_place"), and from k real
    renders there ("tv_real", the floor), and per place the same with the world's top class.
    shown: [(place or None, k samples)] for an overview, the places then no place."""
    prompt = silent_caption(SILENT_LEVEL, np.random.default_rng(0))
    located = _generate(model, prompt, places, k, size, guidance, steps)
    unlocated = _generate(model, prompt, [None], k, size, guidance, steps)
    prior = class_shares(probe, unlocated)  # the same samples stand for every place
    per_place, shown = [], []
    for n, place in enumerate(places):
        truth = class_probabilities(*place)
        samples = located[n * k : (n + 1) * k]
        top = int(np.argmax(truth))
        per_place.append(
            {
                "lat": place[0],
                "lon": place[1],
                "top_class": CLASSES[top],
                "top_share": float(truth[top]),
                "tv_place": tv_distance(truth, class_shares(probe, samples)),
                "tv_no_place": tv_distance(truth, prior),
                "tv_real": tv_distance(
                    truth, class_shares(probe, real_renders(place, k, size, seed=seed + n))
                ),
            }
        )
        shown.append((place, samples))
    shown.append((None, unlocated))
    figures = {
        key: float(np.mean([p[key] for p in per_place]))
        for key in ("tv_place", "tv_no_place", "tv_real")
    }
    return {**figures, "prompt": prompt, "level": SILENT_LEVEL, "k": k, "places": per_place}, shown


def place_label(place):
    """'31.2 N, 121.5 E' for (31.2, 121.5); 'no place' for None."""
    if place is None:
        return "no place"
    lat, lon = place
    return f"{abs(lat):.1f} {'N' if lat >= 0 else 'S'}, {abs(lon):.1f} {'E' if lon >= 0 else 'W'}"


def places_strip(figures, shown, size, held_out=False, per_place=6, cell=64):
    """The overview's strip: one class-silent prompt at each place (its first `per_place` samples),
    the world's top class there, then without a place. held_out: the places are in the regions
    training left out (said in each title)."""
    rows = {}
    for (place, samples), info in zip(shown, [*figures["places"], None]):
        if info is None:
            title = f"{place_label(None)}: the model's prior over the globe"
        else:
            where = " (held-out region)" if held_out else ""
            top = info["top_class"].replace("_", " ")
            title = (
                f"{place_label(place)}{where}: the world shows {top} {info['top_share']:.0%}; "
                f"TV {info['tv_place']:.2f} (no place "
                f"{info['tv_no_place']:.2f}, real {info['tv_real']:.2f})"
            )
        rows[title] = [("", tensor_to_pil(x)) for x in samples[:per_place]]
    heading = (
        f'"{figures["prompt"]}", level {figures["level"]:g}, at places of the globe '
        f"(the same seeds in every row); TV: the classes the probe reads against the world's"
    )
    return draw_strip(rows, size, cell, heading=heading)
