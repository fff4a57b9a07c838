"""Test sets for evaluation: each image with its first caption, its scene class and its level.

    # Karpathy json (RSICD, UCM)
    images, classes = load_testset("data/rsicd/dataset_rsicd.json", split="test")
    # {file name: caption}
    images, classes = load_testset("rsicd_sample/captions.json")
    # procedural Earth renders; at places of the procedural globe, in the held-out regions
    images, classes = load_testset("procedural:120", out="eval/real")
    images, classes = load_testset("procedural-globe:120", out="eval/real", places="held_out")

RSICD's classes are its file names' prefix (`<class>_<n>.jpg`; numeric names have none);
UCM-Captions gives a `class_id` per image into its `classes` list. Levels come from the json's
dataset-wide `gsd_m` (or --level); an image's other numeric keys (its place: "lat", "lon") are its
fields.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.datasets import KARPATHY_IMAGE_FOLDERS, CaptionFolder, Git10M
from data.levels import level_from_resolution
from data.samples import extra_fields
from data.places import random_place
from data.synthetic import CLASSES as PROCEDURAL_CLASSES, class_probabilities, sample
from data.transforms import eval_transform
from evaluation.probe import make_probe_data


@dataclass
class EvalImage:
    key: str  # unique name (the file name's stem), the generated images' prefix
    path: Path
    caption: str  # the first caption
    label: str = None  # scene class name, None when the set has none
    level: float = None  # Google map level, None when unknown
    # other numbers the set gives the image, by name: its place "lat", "lon" (data/places.py)
    fields: dict = field(default_factory=dict)


_RSICD_NAME = re.compile(r"^([a-z]+(?:[a-z_]*[a-z])?)_\d+$")


def class_from_name(filename):
    """RSICD's class of a file name: 'denseresidential_12.jpg' -> 'denseresidential';
    None for '00012.jpg'."""
    m = _RSICD_NAME.match(Path(filename).stem)
    return m.group(1) if m else None


def _read_json(path):
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"test set {path} does not exist")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"test set {path}: not valid json ({e})") from None


def split_holds(image_split, split):
    """Whether an image of Karpathy split `image_split` belongs to the asked `split`: that name, "!"
    + a name for every other image (Txt2Img-MHN's RSICD test set is "!train"), None for all."""
    if split is None:
        return True
    if split.startswith("!"):
        return image_split != split[1:]
    return image_split == split


def karpathy(path, split="test", image_root=None):
    """The `split` images of a Karpathy-format json ({"images": [{"filename", "split", "sentences",
    "class_id"?}], "classes"?, "gsd_m"?}) (split: a name, "!name" for every image not in it, None
    for all); images in image_root (default: the first of images/, imgs/, RSICD_images/,
    NWPU_images/ beside the json that exists)."""
    meta = _read_json(path)
    if image_root is None:  # as the training reader finds them (images/, RSICD_images/, ...)
        found = [Path(path).parent / d for d in KARPATHY_IMAGE_FOLDERS]
        image_root = next((d for d in found if d.is_dir()), found[0])
    root = Path(image_root)
    names = meta.get("classes")
    level = level_from_resolution(meta["gsd_m"]) if meta.get("gsd_m") else None
    out = []
    for n, im in enumerate(meta.get("images", [])):
        if not split_holds(im.get("split"), split):
            continue
        if "filename" not in im or not isinstance(im.get("sentences"), list) or not im["sentences"]:
            raise ValueError(f"{path}: images[{n}] lacks 'filename' or a 'sentences' list")
        first = im["sentences"][0]
        caption = first.get("raw") if isinstance(first, dict) else None
        if not isinstance(caption, str) or not caption.strip():
            raise ValueError(
                f"{path}: images[{n}] ({im['filename']}): its first sentence has no 'raw' caption"
            )
        if names is not None and "class_id" in im:
            if not isinstance(im["class_id"], int) or not 0 <= im["class_id"] < len(names):
                raise ValueError(
                    f"{path}: images[{n}] ({im['filename']}): class_id {im['class_id']!r} is not "
                    f"an index into its {len(names)} classes"
                )
            label = names[im["class_id"]]
        else:
            label = class_from_name(im["filename"])
        out.append(
            EvalImage(
                Path(im["filename"]).stem,
                root / im.get("filepath", "") / im["filename"],
                caption.strip(),
                label,
                level,
                extra_fields(im, skip=("imgid", "cocoid", "class_id")),
            )
        )
    if not out:
        found = sorted({str(im.get("split")) for im in meta.get("images", [])})
        raise ValueError(
            f"{path}: no images in split {split!r} (splits present: {', '.join(found) or 'none'})"
        )
    return out


def caption_map(path, image_root=None):
    """A json {file name: caption} (RSICD's naming gives the classes), images in image_root
    (default: an `images` folder beside the json, else the json's folder)."""
    meta = _read_json(path)
    root = Path(image_root) if image_root else Path(path).parent
    if not image_root and (root / "images").is_dir():
        root = root / "images"
    empty = [f for f, c in meta.items() if not str(c).strip()]
    if empty:
        raise ValueError(f"{path}: {len(empty)} images have an empty caption, e.g. {empty[0]}")
    return [
        EvalImage(Path(f).stem, root / f, str(c).strip(), class_from_name(f))
        for f, c in sorted(meta.items())
    ]


def procedural(n, out, size=32, seed=0, levels=(10, 18)):
    """n procedural Earth renders written once to out/{key}.png: class i % 12, integer level lo + 4
    b % 9 for block b = i // 12 (every 108 images hold each pair once), scenes seeded from
    (seed, i, 23), disjoint from training's."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lo, hi = levels
    span = hi - lo + 1
    stride = next(k for k in range(max(1, span // 2), span + 1) if math.gcd(k, span) == 1)
    images = []
    for i in range(n):
        level = float(lo + (i // len(PROCEDURAL_CLASSES)) * stride % span)
        s = sample(
            int(np.random.default_rng([int(seed), i, 23]).integers(1 << 62)),
            level,
            size,
            cls=i % len(PROCEDURAL_CLASSES),
        )
        path = out / f"scene{i:05d}.png"
        if not path.exists():
            tmp = path.with_suffix(".tmp.png")
            Image.fromarray(s["image"]).save(tmp)
            tmp.replace(path)
        images.append(
            EvalImage(path.stem, path, s["caption"], PROCEDURAL_CLASSES[s["label"]], level)
        )
    return images


def procedural_globe(n, out, size=32, seed=0, levels=(10, 18), places="all"):
    """n procedural Earth renders at places of the procedural globe, written once to
    out/globe_{places}_{i}.png: image i at a place drawn uniformly over the sphere's area within
    the spatial split `places` (seeded from (seed, i, 29)), its class drawn from the place's
    (data/synthetic/geography.py), its level and scene as procedural()'s; its fields are the
    place."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    images = []
    for i in range(n):
        rng = np.random.default_rng([int(seed), i, 29])
        lat, lon = random_place(rng, places)
        cls = int(rng.choice(len(PROCEDURAL_CLASSES), p=class_probabilities(lat, lon)))
        level = float(rng.integers(levels[0], levels[1] + 1))
        scene_seed = int(np.random.default_rng([int(seed), i, 23]).integers(1 << 62))
        s = sample(scene_seed, level, size, cls)
        path = out / f"globe_{places}_{i:05d}.png"
        if not path.exists():
            tmp = path.with_suffix(".tmp.png")
            Image.fromarray(s["image"]).save(tmp)
            tmp.replace(path)
        place = {"lat": float(lat), "lon": float(lon)}
        images.append(
            EvalImage(path.stem, path, s["caption"], PROCEDURAL_CLASSES[cls], level, place)
        )
    return images


def _count(spec):
    """N of "procedural:N" / "procedural-globe:N"."""
    try:
        n = int(str(spec).split(":", 1)[1])
    except ValueError:
        name = str(spec).split(":", 1)[0]
        raise ValueError(f"test set {spec!r}: expected {name}:N with N a whole number") from None
    if n < 2:
        raise ValueError(f"test set {spec!r}: needs at least 2 images")
    return n


def load_testset(spec, split="test", image_root=None, out=None, size=32, seed=0, places="all"):
    """(test images, sorted class names or None) for a test-set spec: "procedural:N",
    "procedural-globe:N" (at places within the spatial split `places`), a Karpathy json, or a
    {file name: caption} json. Every image file must exist, keys must be unique."""
    if str(spec).startswith("procedural:"):
        images = procedural(_count(spec), out, size=size, seed=seed)
    elif str(spec).startswith("procedural-globe:"):
        images = procedural_globe(_count(spec), out, size=size, seed=seed, places=places)
    else:
        meta = _read_json(spec)
        is_karpathy = isinstance(meta, dict) and isinstance(meta.get("images"), list)
        if not is_karpathy and not (
            isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())
        ):
            raise ValueError(
                f"test set {spec}: neither a Karpathy json (an 'images' list) nor {{file name: "
                f"caption}}"
            )
        images = karpathy(spec, split, image_root) if is_karpathy else caption_map(spec, image_root)
    missing = [im.path for im in images if not im.path.is_file()]
    if missing:
        raise ValueError(
            f"test set {spec}: {len(missing)} image files are missing, e.g. {missing[0]}"
        )
    keys = [im.key for im in images]
    if len(set(keys)) != len(keys):
        dup = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"test set {spec}: image name {dup!r} appears more than once")
    labels = [im.label for im in images if im.label is not None]
    return images, (sorted(set(labels)) if labels else None)


def check_classes(found, given):
    """The class list to use: `given` (a list of names) must hold exactly the classes found in the
    test set; otherwise a ValueError names the ones on either side only."""
    if given is None:
        return found
    extra, absent = sorted(set(found or []) - set(given)), sorted(set(given) - set(found or []))
    if extra or absent:
        raise ValueError(
            "--classes does not match the test set's classes: "
            + "; ".join(
                s
                for s in (
                    f"in the test set only: {', '.join(extra)}" if extra else "",
                    f"in --classes only: {', '.join(absent)}" if absent else "",
                )
                if s
            )
        )
    return list(given)


def level_images(spec, size, limit):
    """Images of known levels to train a level net on: (images (N, 3, size, size) in [-1, 1], levels
    (N,)), at most `limit`, from "procedural:N" (renders at integer levels 10..18), a Git-10M folder
    or a caption manifest."""
    if spec.startswith("procedural:"):
        n = int(spec.split(":", 1)[1]) if spec.split(":", 1)[1].isdigit() else 0
        if n < 2:
            raise ValueError(f"--fit-level-net {spec!r}: expected procedural:N, N >= 2")
        # scenes apart from the test set's
        images, _, levels = make_probe_data(min(n, limit), size=size, seed=7)
        return images, levels
    path, transform = Path(spec), eval_transform(size)
    if path.is_dir():
        data = Git10M(path, split="train", transform=transform)
    elif path.is_file():
        data = CaptionFolder(path, transform=transform)
    else:
        raise ValueError(f"--fit-level-net {spec}: no such folder or manifest")
    items = [
        x
        for x in (data[i] for i in range(min(len(data), limit)))
        if x is not None and x["level"] > 0
    ]
    if len(items) < 2:
        raise ValueError(f"--fit-level-net {spec}: fewer than 2 images with a known level (> 0)")
    return torch.stack([x["image"] for x in items]), torch.tensor([x["level"] for x in items])


# ----------------------------------------------------------------------------------------------
# Image files as tensors
# ----------------------------------------------------------------------------------------------


def read_image(path, size=None):
    """An image file -> (3, H, W) float32 in [-1, 1] (RGB), resized to size x size (bilinear,
    antialiased) if given."""
    with Image.open(path) as im:
        u8 = np.asarray(im.convert("RGB"))
    x = torch.from_numpy(u8.copy()).permute(2, 0, 1).float() / 127.5 - 1
    if size is not None and tuple(x.shape[1:]) != (size, size):
        x = torch.nn.functional.interpolate(
            x[None], (size, size), mode="bilinear", antialias=True, align_corners=False
        )[0].clamp(-1, 1)
    return x


class ImageFiles(torch.utils.data.Dataset):
    """Image files read lazily: item i is read_image(paths[i], size)."""

    def __init__(self, paths, size=None):
        self.paths, self.size = [Path(p) for p in paths], size

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        return read_image(self.paths[i], self.size)

    def batches(self, batch_size):
        """Lists of (3, H, W) tensors, batch_size at a time (sizes may differ between
        files when size is None)."""
        for i in range(0, len(self), batch_size):
            yield [self[j] for j in range(i, min(i + batch_size, len(self)))]
