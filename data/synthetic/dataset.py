"""Samples of the procedural Earth: one seeded sample, a torch Dataset, and an
ordered multi-process reader.

    # image, caption, level, label, name, resolution_m, scene
    s = sample(seed=7, level=14.0, size=64)
    ds = ProceduralEarth(100_000, size=64)  # items in the dataset readers' common sample dict
    ds = ProceduralEarth(1000, pair=("sar", "rgb"))  # + control: the SAR view of the same frame
    ds = ProceduralEarth(1000, located=True, places="train")  # + lat, lon; class from the place
"""

import math

import numpy as np
import torch

from data.modalities import MODALITIES, SR_FACTOR, TASKS, make_control
from data.places import check_split, random_place
from data.samples import sample_generator

from .captions import caption, silent_caption
from .compose import _compose, _finish
from .geography import class_probabilities
from .scenes import make_scene
from .sensors import modalities
from .world import CLASSES, LEVEL_RANGE, resolution_m


def sample(seed: int, level: float | None = None, size: int = 64, cls=None) -> dict:
    """One sample: image (H, W, 3) uint8, caption, level, label, class name, resolution_m, scene.
    The level is drawn from LEVEL_RANGE when not given, the class from the seed when cls is None."""
    rng = np.random.default_rng([int(seed), 2])
    if level is None:
        level = float(rng.uniform(*LEVEL_RANGE))
    scene = make_scene(seed, cls)
    composed = _compose(scene, level, size)
    image = (_finish(scene, composed[0], composed[3]) + 0.5).astype(np.uint8)
    text = caption(scene, level, size, rng, _composed=composed)
    return dict(
        image=image,
        caption=text,
        level=float(level),
        label=scene.label,
        name=scene.name,
        resolution_m=resolution_m(level),
        scene=scene,
    )


def _view(views, name, i, seed):
    """One modality of a frame as (3, H, W) float32 in [-1, 1]: single bands repeated on 3 channels;
    lowres degraded from rgb (data/modalities.py) with the item's own generator."""
    if name == "lowres":
        return make_control("sr", _view(views, "rgb", i, seed), sample_generator(seed + 7919, 0, i))
    x = torch.from_numpy(views[name]).float() / 127.5 - 1.0
    return x.permute(2, 0, 1).contiguous() if x.ndim == 3 else x.expand(3, -1, -1).contiguous()


class ProceduralEarth(torch.utils.data.Dataset):
    """n synthetic samples, deterministic per index: classes cycle (balanced), levels uniform.

    Items: image (3, H, W) float32 in [-1, 1], caption str, level float, label int, quality nan, key
    str. pair = (control, target) modalities, one of data.modalities.TASKS' values, e.g.
    ("sar", "rgb"): image is the target view and control (3, H, W) the control view, pixel-aligned
    (sensors.modalities); a single modality, e.g. pair="sar", makes image that view alone (a
    text -> SAR fine-tune).

    located=True gives each item a place, drawn uniformly over the sphere's area within `places`
    (a data.places split: "all", "train", "held_out"), and its class drawn from the geography of
    that place (geography.class_probabilities, balanced over the sphere); the items get float
    fields lat and lon. omit_class = p replaces the caption, with probability p, by one that does
    not reveal the class (captions.silent_caption), so the model learns what a place alone shows.
    The defaults (located=False, omit_class=0) give the same items as before they existed."""

    def __init__(
        self,
        n: int,
        size: int = 64,
        levels=LEVEL_RANGE,
        seed: int = 0,
        integer_levels: bool = False,
        pair=None,
        located: bool = False,
        places: str = "all",
        omit_class: float = 0.0,
    ):
        if n <= 0 or size <= 0:
            raise ValueError(f"n and size must be positive, got n={n}, size={size}")
        if not (0 < levels[0] <= levels[1] <= 24):
            raise ValueError(f"levels must be (min, max) with 0 < min <= max <= 24, got {levels}")
        self.n, self.size, self.levels, self.seed = (
            n,
            size,
            (float(levels[0]), float(levels[1])),
            seed,
        )
        self.integer_levels = integer_levels  # whole Google levels only, as most real data has
        self.classes = CLASSES
        if isinstance(pair, str) and pair not in MODALITIES:
            raise ValueError(f"pair={pair!r}: a single modality must be one of {MODALITIES}")
        if pair is not None and not isinstance(pair, str) and tuple(pair) not in TASKS.values():
            raise ValueError(
                f"pair={pair!r}: (control, target) must be one of {sorted(set(TASKS.values()))}"
            )
        if pair is not None and "lowres" in pair and size % SR_FACTOR:
            raise ValueError(
                f"pair={pair!r}: lowres needs size divisible by {SR_FACTOR}, got size={size}"
            )
        self.pair = pair if pair is None or isinstance(pair, str) else tuple(pair)
        check_split(places, what="places")
        if not 0.0 <= omit_class <= 1.0:
            raise ValueError(f"omit_class must be a probability in [0, 1], got {omit_class}")
        self.located, self.places, self.omit_class = located, places, float(omit_class)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if not -self.n <= i < self.n:
            raise IndexError(f"index {i} out of range for ProceduralEarth of length {self.n}")
        i %= self.n
        rng = np.random.default_rng([self.seed, i, 4])
        seed = int(rng.integers(1 << 62))
        if self.integer_levels:
            level = float(rng.integers(math.ceil(self.levels[0]), math.floor(self.levels[1]) + 1))
        else:
            level = float(rng.uniform(*self.levels))
        cls, where = i % len(CLASSES), {}
        if self.located:  # its own stream: the draws above stay those of an unlocated item
            place_rng = np.random.default_rng([self.seed, i, 5])
            lat, lon = random_place(place_rng, self.places)
            cls = int(place_rng.choice(len(CLASSES), p=class_probabilities(lat, lon)))
            where = dict(lat=float(lat), lon=float(lon))
        s = sample(seed, level, self.size, cls=cls)
        text = s["caption"]
        if self.omit_class > 0:
            omit_rng = np.random.default_rng([self.seed, i, 6])
            if omit_rng.random() < self.omit_class:
                text = silent_caption(s["level"], omit_rng)
        img = torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 127.5 - 1.0
        item = dict(
            image=img,
            caption=text,
            level=s["level"],
            label=s["label"],
            quality=float("nan"),
            key=f"procedural-{self.seed}-{i}",
            **where,
        )  # the readers' common sample dict
        if self.pair is None:
            return item
        # rgb: the same pixels
        views = modalities(s["scene"], level, self.size, seed) | {"rgb": s["image"]}
        if isinstance(self.pair, str):
            return item | {"image": _view(views, self.pair, i, self.seed)}
        return item | {
            "image": _view(views, self.pair[1], i, self.seed),
            "control": _view(views, self.pair[0], i, self.seed),
        }


class InOrder(torch.utils.data.IterableDataset):
    """The items of a map-style dataset (e.g. ProceduralEarth), in index order, rendered by
    `processes` worker processes (DataLoader workers, `chunk` items each at a time): the renderer is
    numpy on one core, so rendering scales with the processes given. Same items as dataset[0],
    dataset[1], ...; a Dataset with a length, so write_shards sees the count."""

    def __init__(self, dataset, processes: int = 1, chunk: int = 256):
        if processes < 1 or chunk < 1:
            raise ValueError(
                f"processes and chunk must be >= 1, got processes={processes}, chunk={chunk}"
            )
        self.dataset, self.processes, self.chunk = dataset, processes, chunk

    def __len__(self):
        return len(self.dataset)

    def __iter__(self):
        if self.processes == 1:
            return (self.dataset[i] for i in range(len(self.dataset)))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.chunk, num_workers=self.processes, collate_fn=list
        )  # lists of items, delivered in index order
        return (item for items in loader for item in items)
