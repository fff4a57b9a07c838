"""
The sample dict every reader yields (map-style readers in data/datasets.py, tar shards in
data/shards.py), and the shared steps that build and batch it:

    {"image": (3, H, W) float in [-1, 1], "caption": str, "level": float (Google map level,
     0.0 = unknown), "quality": float or nan, "key": str}  (+ "latent": (4, h, w) from shards)
    + any other numeric field a reader has for the sample (a condition's value, e.g. "cloud")

A reader names a sample's fields in one dict ({"key", "caption", "level", "quality", ...}) and
`build_sample` turns it into the sample; a new numeric field needs no change here, in the shards
(write_shards stores it, ShardDataset reads it back) or in `collate` (batched as (B,) float).

Bad data (unreadable / truncated / missing image, unsupported pixel format, empty caption) never
kills a run silently and never hides: the sample comes back as None (drop it with `collate`, which
counts it), and a BadDataCounter logs it with its key and raises BadDataError once the bad
fraction passes its threshold. A sample a filter leaves out (quality, size) comes back as
FILTERED: dropped too, but not bad data. Grey, palette, RGBA and 16-bit images are converted to
8-bit RGB. Per-sample randomness (caption choice, crop, flips) comes from
`sample_generator(seed, epoch, index)`, so it does not depend on num_workers and a run resumed
mid-epoch sees the same pixels.
"""

import io
import logging
import math
from collections import Counter

import numpy as np
import torch
from PIL import Image

from data.transforms import pil_to_tensor

logger = logging.getLogger(__name__)

FIELDS = ("key", "caption", "level", "quality")  # every sample has these (level, quality: numbers)
TENSORS = ("image", "latent", "control")  # per-sample tensors, never taken from `fields`

# -----------------------------------------------------------------------------
# bad-data accounting

FILTERED = "filtered"  # what a reader returns for a sample its filter leaves out (not bad data)
MIN_SAMPLES = 1000  # a bad fraction is judged once this many samples have been read


class BadDataError(RuntimeError):
    """Too much of the data is unreadable; the message names example keys and reasons."""


class BadDataCounter:
    """Counts samples read, skipped (bad), filtered and converted; raises BadDataError when
    bad / read exceeds max_bad_fraction after at least min_samples have been read.
    One counter can be shared by several readers. In DataLoader workers each worker holds
    its own copy, so the threshold applies per worker."""

    def __init__(self, max_bad_fraction=0.01, min_samples=MIN_SAMPLES, max_examples=10):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction = max_bad_fraction
        self.min_samples, self.max_examples = min_samples, max_examples
        self.total = self.bad = self.filtered = self.converted = 0
        self.reasons = Counter()  # reason kind -> count
        self.examples = []  # [(key, reason)] first few bad samples

    def ok(self):
        self.total += 1
        self._check()

    def record_bad(self, key, reason):
        self.total += 1
        self.bad += 1
        self.reasons[reason.split(":")[0]] += 1
        if len(self.examples) < self.max_examples:
            self.examples.append((key, reason))
        logger.warning("skipping bad sample %s: %s", key, reason)
        self._check()

    def record_filtered(self, key, reason):
        self.total += 1
        self.filtered += 1
        logger.debug("filtered sample %s: %s", key, reason)

    def record_converted(self, key, note):
        self.converted += 1
        logger.info("converted sample %s: %s", key, note)

    def _check(self):
        if self.total >= self.min_samples and self.bad > self.max_bad_fraction * self.total:
            examples = "; ".join(f"{k}: {r}" for k, r in self.examples)
            raise BadDataError(
                f"{self.bad} of {self.total} samples read were bad "
                f"({self.bad / self.total:.2%} > max_bad_fraction {self.max_bad_fraction:.2%}); "
                f"reasons {dict(self.reasons)}; examples: {examples}"
            )

    def summary(self):
        return dict(
            total=self.total,
            bad=self.bad,
            filtered=self.filtered,
            converted=self.converted,
            reasons=dict(self.reasons),
            examples=list(self.examples),
        )


# -----------------------------------------------------------------------------
# decoding


def to_rgb8(img):
    """Any PIL image -> (8-bit RGB image, note or None). Grey/palette -> RGB; alpha is
    composited onto black (transparent = no data); 16-bit grey is scaled 0..65535 -> 0..255.
    Raises ValueError for modes with no sensible conversion (e.g. 32-bit float 'F')."""
    mode = img.mode
    if mode == "RGB":
        return img, None
    if mode in ("L", "1", "CMYK", "YCbCr", "LAB", "HSV"):
        return img.convert("RGB"), f"{mode} -> RGB"
    if mode == "P" and "transparency" not in img.info:
        return img.convert("RGB"), "palette -> RGB"
    if mode in ("RGBA", "RGBa", "LA", "La", "PA", "P"):
        a = np.asarray(img.convert("RGBA"), dtype=np.float32)  # (H, W, 4)
        rgb = (a[..., :3] * (a[..., 3:] / 255.0)).round().astype(np.uint8)
        return Image.fromarray(rgb, mode="RGB"), f"{mode} -> RGB (alpha composited on black)"
    if mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I (32-bit int)
        a = np.asarray(img).astype(np.int64)
        if a.min() < 0 or a.max() > 65535:
            raise ValueError(f"integer image (mode {mode}) with values outside 0..65535")
        g = (a / 257.0).round().astype(np.uint8)  # 65535 / 255 = 257
        return Image.fromarray(g, mode="L").convert("RGB"), f"16-bit {mode} -> 8-bit RGB"
    raise ValueError(f"unsupported image mode {mode!r}")


def load_rgb(src):
    """Encoded bytes or a path -> (8-bit RGB PIL image, conversion note or None).
    Raises FileNotFoundError / OSError (corrupt, truncated) / ValueError (unsupported mode)."""
    f = io.BytesIO(bytes(src)) if isinstance(src, (bytes, bytearray, memoryview)) else src
    with Image.open(f) as img:
        img.load()  # decodes fully here, so truncated files fail here and not later
        out, note = to_rgb8(img)
        return (out.copy() if out is img else out), note


def sample_generator(seed, epoch, index):
    """torch.Generator seeded from (seed, epoch, index): per-sample randomness independent of
    worker count and resumable."""
    seq = np.random.SeedSequence([int(seed), int(epoch), int(index)])
    return torch.Generator().manual_seed(int(seq.generate_state(1, np.uint64)[0]))


def decode_image(key, src, counter):
    """Bytes or a path -> 8-bit RGB PIL image, or None when it cannot be read (recorded bad in
    `counter`, as are conversions)."""
    try:
        img, note = load_rgb(src)
    except FileNotFoundError:
        counter.record_bad(key, f"missing file: {src}")
        return None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        counter.record_bad(key, f"unreadable image: {type(e).__name__}: {e}")
        return None
    if note is not None:
        counter.record_converted(key, note)
    return img


# -----------------------------------------------------------------------------
# the sample dict


def is_number(v):
    """Whether v is an int or a float (a bool is not): the values an extra field may hold."""
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def extra_fields(fields, skip=()):
    """The numeric entries of a dict other than FIELDS, TENSORS and `skip`, unchanged: the extra
    per-sample fields (a condition's value, e.g. "cloud" or "lat") that readers pass through,
    shards store and collate batches."""
    return {
        k: v
        for k, v in fields.items()
        if is_number(v) and k not in FIELDS and k not in TENSORS and k not in skip
    }


def build_sample(
    fields,
    image,
    *,
    transform,
    generator,
    counter,
    min_size=0,
    allow_empty_caption=False,
    latent=None,
):
    """The shared pipeline: check the caption, decode the image (bytes/path) or take a latent,
    filter by size, transform -> sample dict, or None (bad) / FILTERED (counted in `counter`).

    fields: the sample's fields by name: "key", "caption", "level" (missing or None: 0.0),
    "quality" (missing or None: nan), and any other numeric field, copied into the sample as it
    is. image: encoded bytes or a path, or None when a latent (4, h, w) is given."""
    key = fields["key"]
    caption = fields.get("caption")
    if not isinstance(caption, str):
        counter.record_bad(key, f"caption: not a string ({type(caption).__name__})")
        return None
    caption = caption.strip()
    if not caption and not allow_empty_caption:
        counter.record_bad(key, "empty caption")
        return None
    level, quality = fields.get("level"), fields.get("quality")
    sample = {
        **extra_fields(fields),
        "caption": caption,
        "key": key,
        "level": 0.0 if level is None else float(level),
        "quality": float("nan") if quality is None else float(quality),
    }
    if image is not None:
        img = decode_image(key, image, counter)
        if img is None:
            return None
        if min(img.size) < min_size:
            size = f"{img.size[0]}x{img.size[1]}"
            counter.record_filtered(key, f"size {size} < min_size {min_size}")
            return FILTERED
        sample["image"] = transform(img, generator) if transform is not None else pil_to_tensor(img)
    if latent is not None:
        sample["latent"] = latent
    if "image" not in sample and "latent" not in sample:
        counter.record_bad(key, "no image and no latent")
        return None
    counter.ok()
    return sample


# -----------------------------------------------------------------------------
# batching


def collate(batch):
    """List of sample dicts (None = unreadable, FILTERED = left out by a filter) -> a batch:

        "image" (B, 3, H, W), "latent" (B, 4, h, w), "control" (B, 3, H, W): each when every
        sample has it; "caption" [B str], "key" [B str], "level" (B,), "quality" (B,);
        "label" (B,) when every sample has one; every other numeric field: (B,) float, NaN for
        a sample without it (an image with no place has no "lat"); "n_bad": how many were
        unreadable, "n_filtered": how many filtered.

    When no sample is left the batch is {"caption": [], "key": [], "n_bad", "n_filtered"}: a
    training loop refills it, or skips it and still counts it as consumed, so resume positions
    stay exact."""
    counts = {
        "n_bad": sum(s is None for s in batch),
        "n_filtered": sum(isinstance(s, str) for s in batch),
    }
    batch = [s for s in batch if isinstance(s, dict)]
    if not batch:
        return {"caption": [], "key": [], **counts}
    out = {
        "caption": [s["caption"] for s in batch],
        "key": [s["key"] for s in batch],
        "level": torch.tensor([s["level"] for s in batch], dtype=torch.float32),
        "quality": torch.tensor([s["quality"] for s in batch], dtype=torch.float32),
    }
    if all("label" in s for s in batch):  # class labels (procedural Earth)
        out["label"] = torch.tensor([s["label"] for s in batch])
    for name in TENSORS:  # control: the paired input of data/modalities.py
        if all(name in s for s in batch):
            shapes = {tuple(s[name].shape) for s in batch}
            if len(shapes) > 1:
                ex = [(s["key"], tuple(s[name].shape)) for s in batch[:4]]
                raise ValueError(
                    f"collate: {name} shapes differ within a batch {sorted(shapes)}; e.g. {ex} "
                    "(use a transform with a fixed size)"
                )
            out[name] = torch.stack([s[name] for s in batch])
    names = {name for s in batch for name in s} - set(out) - set(TENSORS)
    for name in sorted(names):  # other numeric fields; NaN where a sample lacks one
        if all(is_number(s.get(name)) or name not in s for s in batch):
            out[name] = torch.tensor([float(s.get(name, math.nan)) for s in batch])
    return {**out, **counts}
