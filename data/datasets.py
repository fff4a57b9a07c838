"""
Map-style readers for Text2Earth training data, all yielding one sample dict:

    {"image": (3, H, W) float in [-1, 1], "caption": str, "level": float (Google map level,
     0.0 = unknown), "quality": float or nan, "key": str}  (+ "latent": (4, h, w) from shards)

Readers:
    Git10M             Git-10M as distributed (HF `save_to_disk` Arrow files), read in place
    KarpathyCaptions   RSICD / UCM-Captions style caption json + images folder
    CaptionFolder      a folder of images + a jsonl or csv manifest
(the webdataset tar-shard stream and its writer live in data/shards.py)

Levels: resolution_m = 2 ** (17 - L), so L = 17 - log2(resolution_m); L = 0 means "no resolution".

Bad data (unreadable / truncated / missing image, unsupported pixel format, empty caption) never
kills a run silently and never hides: the sample comes back as None (drop it with `collate`),
and a BadDataCounter logs it with its key and raises BadDataError once the bad fraction passes
its threshold. Grey, palette, RGBA and 16-bit images are converted to 8-bit RGB.
Per-sample randomness (caption choice, crop, flips) comes from a generator seeded by
(seed, epoch, index), so with ResumableSampler the order *and* the pixels of a run are
reproducible and resumable mid-epoch, whatever num_workers is:

    ds = Git10M(root, transform=train_transform(256), min_quality=4.8)
    sampler = ResumableSampler(len(ds), seed, rank, world_size)
    loader = DataLoader(ds, batch_size, sampler=sampler, num_workers=8, collate_fn=collate)
    for epoch in ...:
        sampler.set_epoch(epoch, start_index=steps_done_in_epoch * batch_size)  # 0 unless resuming
        ds.set_epoch(epoch)
        for batch in loader: ...   # batch None -> every sample was bad; skip it
"""
import csv
import io
import json
import logging
import math
import re
from collections import Counter, OrderedDict
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.transforms import pil_to_tensor

logger = logging.getLogger(__name__)

# -----------------------------------------------------------------------------
# levels and locations


def level_from_resolution(resolution_m):
    """Ground sample distance in metres/pixel -> Google map level, L = 17 - log2(m)."""
    m = float(resolution_m)
    if not math.isfinite(m) or m <= 0:
        raise ValueError(f"resolution must be a positive number of metres per pixel, got {resolution_m!r}")
    return 17.0 - math.log2(m)


def resolution_from_level(level):
    """Google map level -> metres per pixel, 2 ** (17 - L)."""
    return 2.0 ** (17.0 - float(level))


_LEVEL_PREFIX = re.compile(r"^\s*(\d+(?:\.\d+)?)_GOOGLE_LEVEL_(.*)$", re.DOTALL)


def parse_level_prefix(text):
    """'{L}_GOOGLE_LEVEL_{caption}' -> (float(L), caption); text without the prefix -> (0.0, text).
    L = 0 in the prefix means no resolution."""
    if not isinstance(text, str):
        raise ValueError(f"parse_level_prefix expects a str, got {type(text).__name__}")
    m = _LEVEL_PREFIX.match(text)
    if m is None:
        return 0.0, text
    return float(m.group(1)), m.group(2)


def parse_google_location(loc):
    """Git-10M `Google_location` 'Z_X_Y' -> (z, x, y) ints; z is the map level."""
    parts = str(loc).strip().split("_")
    try:
        z, x, y = (int(p) for p in parts)
    except ValueError:
        raise ValueError(f"Google_location must look like 'Z_X_Y' with integers, got {loc!r}") from None
    if not (0 <= z <= 30 and 0 <= x < 2 ** z and 0 <= y < 2 ** z):
        raise ValueError(f"Google_location {loc!r} is not a valid web-map tile (need 0 <= x, y < 2**z)")
    return z, x, y


def tile_to_lonlat(z, x, y, center=False):
    """Web-map (slippy map / Web Mercator) tile -> (lon, lat) in degrees of its north-west corner
    (or its center). OpenStreetMap "Slippy map tilenames": lon = x / 2^z * 360 - 180,
    lat = atan(sinh(pi * (1 - 2 y / 2^z)))."""
    n = 2.0 ** z
    xf, yf = (x + 0.5, y + 0.5) if center else (float(x), float(y))
    lon = xf / n * 360.0 - 180.0
    lat = math.degrees(math.atan(math.sinh(math.pi * (1.0 - 2.0 * yf / n))))
    return lon, lat


def _to_float(v):
    """float(v), or nan for None / '' / unparsable."""
    if v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


# -----------------------------------------------------------------------------
# bad-data accounting


class BadDataError(RuntimeError):
    """Too much of the data is unreadable; the message names example keys and reasons."""


class BadDataCounter:
    """Counts samples read, skipped (bad), filtered and converted; raises BadDataError when
    bad / read exceeds max_bad_fraction after at least min_samples have been read.
    One counter can be shared by several readers. In DataLoader workers each worker holds
    its own copy, so the threshold applies per worker."""

    def __init__(self, max_bad_fraction=0.01, min_samples=1000, max_examples=10):
        if not 0.0 <= max_bad_fraction <= 1.0:
            raise ValueError(f"max_bad_fraction must be in [0, 1], got {max_bad_fraction}")
        self.max_bad_fraction, self.min_samples, self.max_examples = max_bad_fraction, min_samples, max_examples
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
                f"{self.bad} of {self.total} samples read were bad ({self.bad / self.total:.2%} > "
                f"max_bad_fraction {self.max_bad_fraction:.2%}); reasons {dict(self.reasons)}; "
                f"examples: {examples}")

    def summary(self):
        return dict(total=self.total, bad=self.bad, filtered=self.filtered, converted=self.converted,
                    reasons=dict(self.reasons), examples=list(self.examples))


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
    state = np.random.SeedSequence([int(seed), int(epoch), int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def build_sample(key, image, caption, level, quality, *, transform, generator, counter,
                 min_size=0, allow_empty_caption=False, latent=None):
    """The shared pipeline: check caption, decode image (bytes/path) or take a latent, filter by
    size, transform -> sample dict, or None (bad or filtered, counted in `counter`).
    image may be None when a latent (4, h, w) is given."""
    if not isinstance(caption, str):
        counter.record_bad(key, f"caption: not a string ({type(caption).__name__})")
        return None
    caption = caption.strip()
    if not caption and not allow_empty_caption:
        counter.record_bad(key, "empty caption")
        return None
    sample = {"caption": caption, "level": float(level), "quality": float(quality), "key": key}
    if image is not None:
        try:
            img, note = load_rgb(image)
        except FileNotFoundError:
            counter.record_bad(key, f"missing file: {image}")
            return None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            counter.record_bad(key, f"unreadable image: {type(e).__name__}: {e}")
            return None
        if note is not None:
            counter.record_converted(key, note)
        if min(img.size) < min_size:
            counter.record_filtered(key, f"size {img.size[0]}x{img.size[1]} < min_size {min_size}")
            return None
        sample["image"] = transform(img, generator) if transform is not None else pil_to_tensor(img)
    if latent is not None:
        sample["latent"] = latent
    if "image" not in sample and "latent" not in sample:
        counter.record_bad(key, "no image and no latent")
        return None
    counter.ok()
    return sample


# -----------------------------------------------------------------------------
# shared base for map-style readers


class CaptionImageDataset(torch.utils.data.Dataset):
    """Base of the map-style readers: subclasses define __len__ and _record(i, generator) ->
    (key, image bytes or path, caption, level, quality); __getitem__ runs build_sample.
    Call set_epoch(epoch) (like ResumableSampler's) to change per-sample randomness per epoch."""

    def __init__(self, transform=None, min_size=0, counter=None, seed=0, allow_empty_caption=False):
        self.transform = transform
        self.min_size = min_size
        self.counter = counter if counter is not None else BadDataCounter()
        self.seed, self.epoch = seed, 0
        self.allow_empty_caption = allow_empty_caption

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def _record(self, i, generator):
        raise NotImplementedError

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"{type(self).__name__} index {i} out of range [0, {len(self)})")
        g = sample_generator(self.seed, self.epoch, i)
        key, image, caption, level, quality = self._record(i, g)
        return build_sample(key, image, caption, level, quality, transform=self.transform, generator=g,
                            counter=self.counter, min_size=self.min_size,
                            allow_empty_caption=self.allow_empty_caption)


# -----------------------------------------------------------------------------
# Git-10M: HF datasets `save_to_disk` folder read in place


def _index_arrow_stream(path):
    """Walk the messages of an Arrow IPC *stream* file (what HF `save_to_disk` writes) without
    decoding data -> (schema, [(byte start, byte end)] of each record batch)."""
    import pyarrow as pa
    src = pa.memory_map(str(path), "r")
    try:
        reader = pa.ipc.MessageReader.open_stream(src)
        schema, spans, pos = None, [], 0
        while True:
            try:
                msg = reader.read_next_message()
            except StopIteration:
                break
            if msg.type == "schema":
                schema = pa.ipc.read_schema(msg)
            elif msg.type == "record batch":
                spans.append((pos, src.tell()))
            else:
                raise ValueError(f"{path}: unsupported Arrow message type {msg.type!r}")
            pos = src.tell()
    except (pa.ArrowInvalid, OSError) as e:
        raise ValueError(f"{path}: not a readable Arrow IPC stream ({e})") from None
    finally:
        src.close()
    if schema is None:
        raise ValueError(f"{path}: Arrow stream without a schema message")
    return schema, spans


class Git10M(CaptionImageDataset):
    """Git-10M as distributed: `root/dataset_dict.json` + `root/{split}/state.json` listing
    `_data_files`, each `data-*.arrow` an Arrow IPC stream, memory-mapped and read in place
    (the index holds each record batch's byte span, so a row costs one small zero-copy read).

    Columns: image (struct {bytes, path} as the HF Image feature stores it, or raw binary),
    img_name, img_quality_score, caption, caption_length, resolution, Google_location; or the
    older revision's single `text` column '{L}_GOOGLE_LEVEL_{caption}'.
    Level: from `resolution` (m/px) when positive, else from Google_location's Z, else 0.
    min_quality keeps rows with img_quality_score > min_quality (stage 2: 4.8), decided at
    index time from the quality column alone, so len() is the filtered size.
    `root` may also be the split folder itself (the one holding state.json).
    """

    def __init__(self, root, split="train", transform=None, min_quality=None, min_size=0,
                 counter=None, seed=0, max_open_files=64, allow_empty_caption=False):
        super().__init__(transform, min_size, counter, seed, allow_empty_caption)
        import pyarrow  # noqa: F401  (fail here, before indexing, when pyarrow is missing)
        root = Path(root)
        split_dir = root if (root / "state.json").is_file() else root / split
        if not (root / "state.json").is_file() and (root / "dataset_dict.json").is_file():
            splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
            if split not in splits:
                raise ValueError(f"{root / 'dataset_dict.json'}: split {split!r} not in splits {splits}")
        state_path = split_dir / "state.json"
        if not state_path.is_file():
            raise ValueError(f"Git10M: no state.json at {state_path} (expected an HF save_to_disk folder)")
        state = json.loads(state_path.read_text())
        if not state.get("_data_files"):
            raise ValueError(f"{state_path}: no '_data_files' listed")
        self.files = [split_dir / d["filename"] for d in state["_data_files"]]
        for f in self.files:
            if not f.is_file():
                raise ValueError(f"Git10M: data file {f} listed in {state_path} does not exist")
        self.split_dir, self.max_open_files = split_dir, max_open_files
        self._maps = OrderedDict()  # file index -> memory-mapped pyarrow.Buffer (per process LRU, not pickled)

        # index: one entry per record batch (file, byte span, rows); nothing is decoded but the
        # batch headers, and the quality column when filtering
        self.schemas, b_file, b_span, b_rows, keep = [], [], [], [], []
        for fi, f in enumerate(self.files):
            schema, spans = _index_arrow_stream(f)
            names = set(schema.names)
            if fi == 0:
                self.layout = "caption" if "caption" in names else "text" if "text" in names else None
                if self.layout is None or "image" not in names:
                    raise ValueError(f"{f}: expected columns 'image' and 'caption' (or 'text'), got {sorted(names)}")
            if not {"image", self.layout} <= names:
                raise ValueError(f"{f}: missing columns {sorted({'image', self.layout} - names)} (has {sorted(names)})")
            if min_quality is not None and "img_quality_score" not in names:
                raise ValueError(f"{f}: min_quality={min_quality} needs column 'img_quality_score'")
            self.schemas.append(schema)
            for span in spans:
                batch = self._batch(fi, span)
                if min_quality is not None:
                    q = np.asarray(batch.column("img_quality_score").to_numpy(zero_copy_only=False), dtype=np.float64)
                    keep.append(np.flatnonzero(q > min_quality) + sum(b_rows))  # nan fails the test
                b_file.append(fi)
                b_span.append(span)
                b_rows.append(batch.num_rows)
        self.batch_file = np.asarray(b_file, dtype=np.int64)  # (n_batches,)
        self.batch_span = np.asarray(b_span, dtype=np.int64).reshape(-1, 2)  # (n_batches, 2) byte start, end
        self.batch_offset = np.concatenate([[0], np.cumsum(b_rows)]).astype(np.int64)  # (n_batches + 1,)
        self.file_offset = self.batch_offset[np.searchsorted(self.batch_file, np.arange(len(self.files)))]  # (n_files,)
        self.rows = (np.concatenate(keep).astype(np.int64) if keep else np.zeros(0, np.int64)) \
            if min_quality is not None else None
        self.min_quality = min_quality
        self._maps.clear()

    def __len__(self):
        return int(self.batch_offset[-1]) if self.rows is None else len(self.rows)

    def __getstate__(self):  # memory maps stay in the process that opened them
        state = self.__dict__.copy()
        state["_maps"] = OrderedDict()
        return state

    def _batch(self, fi, span):
        """Record batch at byte span (start, end) of file fi, zero-copy from its memory map."""
        import pyarrow as pa
        buf = self._maps.pop(fi, None)
        if buf is None:
            with pa.memory_map(str(self.files[fi]), "r") as m:
                buf = m.read_buffer()  # keeps the mapping alive after the file object closes
        self._maps[fi] = buf
        while len(self._maps) > self.max_open_files:
            self._maps.popitem(last=False)
        start, end = (int(v) for v in span)
        return pa.ipc.read_record_batch(pa.ipc.read_message(buf.slice(start, end - start)), self.schemas[fi])

    def _record(self, i, generator):
        g = int(self.rows[i]) if self.rows is not None else i
        b = int(np.searchsorted(self.batch_offset, g, side="right") - 1)
        fi, j = int(self.batch_file[b]), g - int(self.batch_offset[b])
        row = self._batch(fi, self.batch_span[b]).slice(j, 1).to_pylist()[0]
        key = row.get("img_name") or f"{self.files[fi].name}:{g - int(self.file_offset[fi])}"
        image = row["image"]
        if isinstance(image, dict):  # HF Image feature: {"bytes": ..., "path": ...}
            if image.get("bytes") is not None:
                image = image["bytes"]
            elif image.get("path"):
                p = Path(image["path"])
                image = p if p.is_absolute() else self.split_dir / p
            else:
                image = None  # -> counted as bad by build_sample
        quality = _to_float(row.get("img_quality_score"))
        if self.layout == "text":
            text = row["text"] if isinstance(row["text"], str) else ""
            level, caption = parse_level_prefix(text)
            return key, image, caption, level, quality
        level = 0.0
        m = _to_float(row.get("resolution"))
        if math.isfinite(m) and m > 0:
            level = level_from_resolution(m)
        elif row.get("Google_location"):
            try:
                level = float(parse_google_location(row["Google_location"])[0])
            except ValueError as e:
                self.counter.record_converted(key, f"level unknown: {e}")
        return key, image, row["caption"], level, quality


# -----------------------------------------------------------------------------
# Karpathy caption json (RSICD dataset_rsicd.json, UCM-Captions dataset.json)


class KarpathyCaptions(CaptionImageDataset):
    """Karpathy-format caption json: {"images": [{"filename", "split", "sentences": [{"raw"}]}]},
    images in `image_root` (default: the `images` folder beside the json; an entry's "filepath"
    is joined in when present).

    split: 'train' / 'val' / 'test', a list of them, or None for all.
    all_captions=False draws one caption per visit (from the per-sample generator);
    True makes every (image, caption) pair its own sample.
    gsd_m: dataset-wide ground sample distance in m/px -> one level for every image; None uses
    the json's "gsd_m" key when present, else level 0 (unknown).
    """

    def __init__(self, json_path, split="train", image_root=None, transform=None, all_captions=False,
                 gsd_m=None, min_size=0, counter=None, seed=0, allow_empty_caption=False):
        super().__init__(transform, min_size, counter, seed, allow_empty_caption)
        json_path = Path(json_path)
        if not json_path.is_file():
            raise ValueError(f"KarpathyCaptions: caption file {json_path} does not exist")
        try:
            meta = json.loads(json_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path}: not valid json ({e})") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("images"), list):
            raise ValueError(f"{json_path}: expected a Karpathy json with an 'images' list")
        self.image_root = Path(image_root) if image_root is not None else json_path.parent / "images"
        splits = {split} if isinstance(split, str) else set(split) if split is not None else None
        if gsd_m is None:
            gsd_m = meta.get("gsd_m")
        self.level = level_from_resolution(gsd_m) if gsd_m is not None else 0.0
        self.all_captions = all_captions
        self.entries = []  # [(key, path, [captions])]
        for n, im in enumerate(meta["images"]):
            if "filename" not in im or "sentences" not in im:
                raise ValueError(f"{json_path}: images[{n}] lacks 'filename' or 'sentences'")
            if splits is not None and im.get("split") not in splits:
                continue
            path = self.image_root / im.get("filepath", "") / im["filename"]
            caps = [s.get("raw", "") for s in im["sentences"]] or [""]
            self.entries.append((im["filename"], path, caps))
        if not self.entries:
            found = sorted({str(im.get("split")) for im in meta["images"]})
            raise ValueError(f"{json_path}: no images in split {split!r} (splits present: {found})")
        # all_captions: flat index -> (entry, caption)
        self.pairs = [(e, c) for e, (_, _, caps) in enumerate(self.entries) for c in range(len(caps))]

    def __len__(self):
        return len(self.pairs) if self.all_captions else len(self.entries)

    def _record(self, i, generator):
        if self.all_captions:
            e, c = self.pairs[i]
            key, path, caps = self.entries[e]
            key = f"{key}#{c}"
        else:
            key, path, caps = self.entries[i]
            c = int(torch.randint(0, len(caps), (1,), generator=generator))
        return key, path, caps[c], self.level, float("nan")


# -----------------------------------------------------------------------------
# folder of images + jsonl / csv manifest


class CaptionFolder(CaptionImageDataset):
    """Images + a manifest (.jsonl: one object per line, or .csv with a header) with columns
    `file, caption` and optionally `level` or `resolution_m` (level wins when both are set)
    and `quality`. Files are relative to `image_root` (default: the manifest's folder).
    min_quality keeps rows whose quality > min_quality."""

    def __init__(self, manifest, image_root=None, transform=None, min_quality=None, min_size=0,
                 counter=None, seed=0, allow_empty_caption=False):
        super().__init__(transform, min_size, counter, seed, allow_empty_caption)
        manifest = Path(manifest)
        if not manifest.is_file():
            raise ValueError(f"CaptionFolder: manifest {manifest} does not exist")
        self.image_root = Path(image_root) if image_root is not None else manifest.parent
        if manifest.suffix == ".jsonl":
            rows = []
            with open(manifest) as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{manifest}:{n}: not valid json ({e})") from None
        elif manifest.suffix == ".csv":
            with open(manifest, newline="") as f:
                rows = list(csv.DictReader(f))
        else:
            raise ValueError(f"CaptionFolder: manifest {manifest} must end in .jsonl or .csv")
        self.rows = []  # [(key, path, caption, level, quality)]
        for n, r in enumerate(rows, 1):
            if not isinstance(r, dict) or "file" not in r or "caption" not in r:
                raise ValueError(f"{manifest}: row {n} lacks 'file' or 'caption' ({r!r})")
            level = _to_float(r.get("level"))
            if not math.isfinite(level):
                res = _to_float(r.get("resolution_m"))
                level = level_from_resolution(res) if math.isfinite(res) and res > 0 else 0.0
            quality = _to_float(r.get("quality"))
            if min_quality is not None and not quality > min_quality:
                continue
            self.rows.append((str(r["file"]), self.image_root / str(r["file"]), r["caption"], level, quality))
        if not self.rows:
            raise ValueError(f"{manifest}: no rows (after min_quality={min_quality})")

    def __len__(self):
        return len(self.rows)

    def _record(self, i, generator):
        return self.rows[i]


# -----------------------------------------------------------------------------
# resumable sampling and batching


def _dist_rank_world(rank, world_size):
    """Explicit (rank, world_size), else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank, world_size = (0 if rank is None else rank), (1 if world_size is None else world_size)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    return rank, world_size


class ResumableSampler(torch.utils.data.Sampler):
    """Per-epoch permutation of range(n) (seeded by seed + epoch), split by rank as
    perm[rank::world_size], starting at `start_index` (samples this rank already consumed in
    the epoch). Since it runs in the main process, the order does not depend on num_workers.
    drop_last=True truncates to a multiple of world_size; False pads by wrapping around
    (so every rank gets the same count)."""

    def __init__(self, n, seed=0, rank=None, world_size=None, start_index=0, shuffle=True, drop_last=True):
        if n <= 0:
            raise ValueError(f"ResumableSampler needs n > 0, got {n}")
        self.n, self.seed, self.shuffle, self.drop_last = n, seed, shuffle, drop_last
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        if drop_last and n < self.world_size:
            raise ValueError(f"n={n} samples cannot be split over world_size={self.world_size} with drop_last")
        self.epoch = 0
        self._set_start(start_index)

    def _set_start(self, start_index):
        if not 0 <= start_index <= self.num_per_rank:
            raise ValueError(f"start_index {start_index} not in [0, {self.num_per_rank}]")
        self.start_index = start_index

    @property
    def num_per_rank(self):
        W = self.world_size
        return self.n // W if self.drop_last else -(-self.n // W)

    def set_epoch(self, epoch, start_index=0):
        """Select the epoch; start_index > 0 resumes it mid-way."""
        self.epoch = int(epoch)
        self._set_start(start_index)

    def indices(self):
        """All of this rank's indices for the current epoch (ignoring start_index)."""
        if self.shuffle:
            perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            perm = torch.arange(self.n)
        total = self.num_per_rank * self.world_size
        perm = perm.repeat(-(-total // self.n))[:total]  # truncate, or pad by wrapping around
        return perm[self.rank:total:self.world_size].tolist()

    def __iter__(self):
        return iter(self.indices()[self.start_index:])

    def __len__(self):
        return self.num_per_rank - self.start_index


def collate(batch):
    """List of sample dicts (None = skipped) -> {"image": (B, 3, H, W), "latent": (B, 4, h, w)
    (each when every sample has it), "caption": [B str], "level": (B,), "quality": (B,),
    "key": [B str]}; None when every sample was skipped: the training loop should skip such a
    batch but still count it as a step, so resume positions stay exact."""
    batch = [s for s in batch if s is not None]
    if not batch:
        return None
    out = {"caption": [s["caption"] for s in batch], "key": [s["key"] for s in batch],
           "level": torch.tensor([s["level"] for s in batch], dtype=torch.float32),
           "quality": torch.tensor([s["quality"] for s in batch], dtype=torch.float32)}
    if all("label" in s for s in batch):                      # class labels (procedural Earth)
        out["label"] = torch.tensor([s["label"] for s in batch])
    for name in ("image", "latent"):
        if all(name in s for s in batch):
            shapes = {tuple(s[name].shape) for s in batch}
            if len(shapes) > 1:
                ex = [(s["key"], tuple(s[name].shape)) for s in batch[:4]]
                raise ValueError(f"collate: {name} shapes differ within a batch {sorted(shapes)}; "
                                 f"e.g. {ex} (use a transform with a fixed size)")
            out[name] = torch.stack([s[name] for s in batch])
    return out
