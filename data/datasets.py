"""
Map-style readers for Text2Earth training data, each yielding the sample dict of data/samples.py
(None for a bad or filtered sample):

    Git10M             Git-10M as distributed (HF `save_to_disk` Arrow files), read in place
    KarpathyCaptions   caption json + images folder: Karpathy's layout (RSICD, UCM-Captions,
                       Sydney-Captions) or NWPU-Captions' (images listed per class)
    CaptionFolder      a folder of images + a jsonl or csv manifest: ours (`file`, `caption`) or
                       Hugging Face imagefolder's metadata.jsonl (`file_name`, `text`)
    PairCaptions       real pairs (data/modalities.PairedFolder) captioned by such a manifest
(the webdataset tar-shard stream and its writer live in data/shards.py)

Each reader names a sample's fields in one dict, {"key", "caption", "level", "quality"} plus
any other numeric field its source holds per sample (a CaptionFolder manifest's extra columns,
a Karpathy json's numeric per-image keys), and data/samples.build_sample makes the sample.
Levels follow data/levels.py: L = 17 - log2(resolution_m), L = 0 means "no resolution". A
sample's place is its fields "lat" and "lon" (data/places.py; Git-10M: the centre of its
Google_location tile); `places="train"` / `"held_out"` reads one side of the spatial split
(whole regions held out, data/places.in_split), decided at index time.
Per-sample randomness is seeded by (seed, epoch, index), so with ResumableSampler the order
*and* the pixels of a run are reproducible and resumable mid-epoch, whatever num_workers is:

    ds = Git10M(root, transform=train_transform(256), min_quality=4.8)
    sampler = ResumableSampler(len(ds), seed, rank, world_size)      # data/sampler.py
    loader = DataLoader(ds, batch_size, sampler=sampler, num_workers=8,
                        collate_fn=collate)                          # data/samples.py
    for epoch in ...:
        sampler.set_epoch(epoch, start_index=steps_done_in_epoch * batch_size)  # 0 unless resuming
        ds.set_epoch(epoch)
        for batch in loader: ...   # an empty batch: every sample was bad or filtered; skip it
"""

import csv
import json
import math
import os
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from data.levels import (
    level_from_resolution,
    parse_google_location,
    parse_level_prefix,
    tile_to_lonlat,
)
from data.places import check_split, in_split
from data.samples import BadDataCounter, build_sample, extra_fields, is_number, sample_generator

# manifest columns, each by its spellings, the first present read: ours, then Hugging Face
# imagefolder's metadata (file_name, text) and the other spellings users have (image, gsd_m)
FILE_COLUMNS = ("file", "file_name", "image")
CAPTION_COLUMNS = ("caption", "text")
RESOLUTION_COLUMNS = ("resolution_m", "gsd_m")
MANIFEST_COLUMNS = FILE_COLUMNS + CAPTION_COLUMNS + RESOLUTION_COLUMNS + ("level", "quality")
METADATA_FILES = ("metadata.jsonl", "metadata.csv")  # a folder's manifest, as imagefolder names it
KARPATHY_IDS = ("imgid", "cocoid")  # numeric per-image keys of the Karpathy json that are ids
# the image folders the caption datasets ship beside their json: ours, UCM- and Sydney-Captions',
# RSICD's, NWPU-Captions'
KARPATHY_IMAGE_FOLDERS = ("images", "imgs", "RSICD_images", "NWPU_images")
NWPU_CAPTION = re.compile(r"raw(?:_(\d+))?")  # NWPU-Captions' caption keys: raw, raw_1 .. raw_4


def _to_float(v):
    """float(v), or nan for None / '' / unparsable."""
    if v is None:
        return float("nan")
    try:
        return float(v)
    except (TypeError, ValueError):
        return float("nan")


def google_place(loc):
    """Git-10M's Google_location "Z_X_Y" -> {"lat", "lon"} of the tile's centre (WGS84 degrees,
    from the Web-Mercator tile); {} when there is none. ValueError for a malformed one."""
    if not loc:
        return {}
    lon, lat = tile_to_lonlat(*parse_google_location(loc), center=True)
    return {"lat": lat, "lon": lon}


def _check_filter_columns(path, names, min_quality, places):
    """ValueError naming the file when a filter needs a column it lacks."""
    if min_quality is not None and "img_quality_score" not in names:
        raise ValueError(f"{path}: min_quality={min_quality} needs column 'img_quality_score'")
    if places != "all" and "Google_location" not in names:
        raise ValueError(f"{path}: places={places!r} needs column 'Google_location'")


def _in_places(fields, places):
    """Whether a sample's fields put it in the spatial split `places` (data/places.in_split)."""
    return in_split(fields.get("lat"), fields.get("lon"), places)


# -----------------------------------------------------------------------------
# shared base for map-style readers


class CaptionImageDataset(torch.utils.data.Dataset):
    """Base of the map-style readers: subclasses define __len__ and _record(i, generator) ->
    (fields, image): the sample's fields by name ({"key", "caption", "level", "quality"} + other
    numeric fields, see build_sample) and its image bytes or path; __getitem__ runs build_sample.
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
        fields, image = self._record(i, g)
        return build_sample(
            fields,
            image,
            transform=self.transform,
            generator=g,
            counter=self.counter,
            min_size=self.min_size,
            allow_empty_caption=self.allow_empty_caption,
        )


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
    Level: from `resolution` (m/px) when positive, else from Google_location's Z, else 0. Place:
    lat / lon of the Google_location tile's centre (either layout), none without one.
    min_quality keeps rows with img_quality_score > min_quality (stage 2: 4.8) and places the
    rows of one side of the spatial split, both decided at index time from those columns alone,
    so len() is the filtered size.
    `root` may also be the split folder itself (the one holding state.json).
    """

    def __init__(
        self,
        root,
        split="train",
        transform=None,
        min_quality=None,
        min_size=0,
        counter=None,
        seed=0,
        max_open_files=64,
        allow_empty_caption=False,
        places="all",
    ):
        super().__init__(transform, min_size, counter, seed, allow_empty_caption)
        import pyarrow  # noqa: F401  (fail here, before indexing, when pyarrow is missing)

        check_split(places)

        root = Path(root)
        split_dir = root if (root / "state.json").is_file() else root / split
        if not (root / "state.json").is_file() and (root / "dataset_dict.json").is_file():
            splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
            if split not in splits:
                raise ValueError(
                    f"{root / 'dataset_dict.json'}: split {split!r} not in splits {splits}"
                )
        state_path = split_dir / "state.json"
        if not state_path.is_file():
            raise ValueError(
                f"Git10M: no state.json at {state_path} (expected an HF save_to_disk folder)"
            )
        state = json.loads(state_path.read_text())
        if not state.get("_data_files"):
            raise ValueError(f"{state_path}: no '_data_files' listed")
        self.files = [split_dir / d["filename"] for d in state["_data_files"]]
        for f in self.files:
            if not f.is_file():
                raise ValueError(f"Git10M: data file {f} listed in {state_path} does not exist")
        self.split_dir, self.max_open_files = split_dir, max_open_files
        # file index -> memory-mapped pyarrow.Buffer (an LRU per process, not pickled)
        self._maps = OrderedDict()

        # index: one entry per record batch (file, byte span, rows); nothing is decoded but the
        # batch headers, and the quality column when filtering
        self.schemas, b_file, b_span, b_rows, keep = [], [], [], [], []
        for fi, f in enumerate(self.files):
            schema, spans = _index_arrow_stream(f)
            names = set(schema.names)
            if fi == 0:
                self.layout = (
                    "caption" if "caption" in names else "text" if "text" in names else None
                )
                if self.layout is None or "image" not in names:
                    raise ValueError(
                        f"{f}: expected columns 'image' and 'caption' (or 'text'), got "
                        f"{sorted(names)}"
                    )
            if not {"image", self.layout} <= names:
                raise ValueError(
                    f"{f}: missing columns {sorted({'image', self.layout} - names)} (has "
                    f"{sorted(names)})"
                )
            _check_filter_columns(f, names, min_quality, places)
            self.schemas.append(schema)
            for span in spans:
                batch = self._batch(fi, span)
                if min_quality is not None or places != "all":
                    kept = self._kept_rows(batch, min_quality, places)
                    keep.append(np.flatnonzero(kept) + sum(b_rows))
                b_file.append(fi)
                b_span.append(span)
                b_rows.append(batch.num_rows)
        self.batch_file = np.asarray(b_file, dtype=np.int64)  # (n_batches,)
        # (n_batches, 2) byte start, end
        self.batch_span = np.asarray(b_span, dtype=np.int64).reshape(-1, 2)
        # (n_batches + 1,) first row of each batch
        self.batch_offset = np.concatenate([[0], np.cumsum(b_rows)]).astype(np.int64)
        first_batch = np.searchsorted(self.batch_file, np.arange(len(self.files)))
        self.file_offset = self.batch_offset[first_batch]  # (n_files,) first row of each file
        self.rows = None  # kept row numbers (min_quality, places), or None for all
        if min_quality is not None or places != "all":
            self.rows = np.concatenate(keep).astype(np.int64) if keep else np.zeros(0, np.int64)
        self.min_quality = min_quality
        self._maps.clear()

    @staticmethod
    def _kept_rows(batch, min_quality, places):
        """(rows,) bool: the rows of a record batch with quality > min_quality (nan never) and a
        place in `places` (a malformed Google_location counts as no place)."""
        kept = np.ones(batch.num_rows, dtype=bool)
        if min_quality is not None:
            q = batch.column("img_quality_score").to_numpy(zero_copy_only=False)
            kept &= np.asarray(q, dtype=np.float64) > min_quality
        if places != "all":
            for j, loc in enumerate(batch.column("Google_location").to_pylist()):
                try:
                    place = google_place(loc)
                except ValueError:
                    place = {}
                kept[j] = kept[j] and _in_places(place, places)
        return kept

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
        message = pa.ipc.read_message(buf.slice(start, end - start))
        return pa.ipc.read_record_batch(message, self.schemas[fi])

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
        fields = {"key": key, "quality": _to_float(row.get("img_quality_score"))}
        try:
            fields.update(google_place(row.get("Google_location")))
        except ValueError as e:
            self.counter.record_converted(key, f"place and level unknown: {e}")
        if self.layout == "text":
            text = row["text"] if isinstance(row["text"], str) else ""
            fields["level"], fields["caption"] = parse_level_prefix(text)
            return fields, image
        level = 0.0
        m = _to_float(row.get("resolution"))
        if math.isfinite(m) and m > 0:
            level = level_from_resolution(m)
        elif "lat" in fields:
            level = float(parse_google_location(row["Google_location"])[0])
        return {**fields, "caption": row["caption"], "level": level}, image


# -----------------------------------------------------------------------------
# Karpathy caption json (RSICD dataset_rsicd.json, UCM- and Sydney-Captions dataset.json) and
# NWPU-Captions' dataset_nwpu.json


def _kind(v):
    """A value's type and its start, for an error message."""
    return f"a {type(v).__name__} ({str(v)[:40]!r})"


def _karpathy_images(meta, json_path):
    """The images of Karpathy's layout, {"images": [{"filename", "sentences": [{"raw"}], "split",
    "filepath"?}]} -> [(entry, its subfolder, [captions])]."""
    if not isinstance(meta["images"], list):
        raise ValueError(f"{json_path}: key 'images' must hold a list, not {_kind(meta['images'])}")
    out = []
    for n, im in enumerate(meta["images"]):
        if not isinstance(im, dict) or "filename" not in im or "sentences" not in im:
            raise ValueError(f"{json_path}: images[{n}] lacks 'filename' or 'sentences'")
        caps = [s.get("raw", "") for s in im["sentences"]] or [""]
        out.append((im, im.get("filepath", ""), caps))
    return out


def _nwpu_images(meta, json_path):
    """The images of NWPU-Captions' layout, {class: [{"filename", "split", "raw", "raw_1" ..
    "raw_4"}]} with each class's images in a folder of its name -> [(entry, its subfolder,
    [captions])]. A top-level "gsd_m" is the dataset's resolution, as in Karpathy's layout."""
    out = []
    for name, ims in meta.items():
        if name == "gsd_m":
            continue
        if not isinstance(ims, list):
            raise ValueError(
                f"{json_path}: neither Karpathy's caption json (an 'images' list) nor "
                f"NWPU-Captions' ({{class: [images]}}): key {name!r} holds {_kind(ims)}"
            )
        for n, im in enumerate(ims):
            if not isinstance(im, dict) or "filename" not in im or "raw" not in im:
                raise ValueError(f"{json_path}: {name}[{n}] lacks 'filename' or 'raw'")
            keys = sorted(
                (k for k in im if NWPU_CAPTION.fullmatch(k)),
                key=lambda k: int(NWPU_CAPTION.fullmatch(k)[1] or 0),
            )
            for k in keys:
                if not isinstance(im[k], str):
                    raise ValueError(f"{json_path}: {name}[{n}][{k!r}] is {_kind(im[k])}")
            out.append((im, name, [im[k] for k in keys]))
    return out


class KarpathyCaptions(CaptionImageDataset):
    """Caption json + images, in either layout the remote-sensing caption datasets ship:
    Karpathy's {"images": [{"filename", "split", "sentences": [{"raw"}]}]} (RSICD, UCM-Captions,
    Sydney-Captions; an entry's "filepath" is a subfolder of the images), or NWPU-Captions'
    {class: [{"filename", "split", "raw", "raw_1" .. "raw_4"}]} (each class's images in a
    subfolder of its name). A json in neither is a ValueError naming the key that is not.
    image_root: default the first of KARPATHY_IMAGE_FOLDERS beside the json that exists
    (images, imgs, RSICD_images, NWPU_images), else `images`.

    split: 'train' / 'val' / 'test', a list of them, or None for all.
    all_captions=False draws one caption per visit (from the per-sample generator);
    True makes every (image, caption) pair its own sample.
    gsd_m: dataset-wide ground sample distance in m/px -> one level for every image; None uses
    the json's "gsd_m" key when present, else level 0 (unknown).
    Numeric per-image keys become sample fields of the same name, except the ids (imgid,
    cocoid, sentids*) and level, quality (the level comes from gsd_m, the quality is nan); "lat"
    and "lon" keys are the image's place, and places keeps one side of the spatial split.
    """

    def __init__(
        self,
        json_path,
        split="train",
        image_root=None,
        transform=None,
        all_captions=False,
        gsd_m=None,
        min_size=0,
        counter=None,
        seed=0,
        allow_empty_caption=False,
        places="all",
    ):
        super().__init__(transform, min_size, counter, seed, allow_empty_caption)
        check_split(places)
        json_path = Path(json_path)
        if not json_path.is_file():
            raise ValueError(f"KarpathyCaptions: caption file {json_path} does not exist")
        try:
            meta = json.loads(json_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{json_path}: not valid json ({e})") from None
        if not isinstance(meta, dict) or not meta:
            raise ValueError(
                f"{json_path}: expected Karpathy's caption json ({{'images': [...]}}) or "
                f"NWPU-Captions' ({{class: [images]}}), got {_kind(meta)}"
            )
        images = (_karpathy_images if "images" in meta else _nwpu_images)(meta, json_path)
        if image_root is None:
            found = [json_path.parent / d for d in KARPATHY_IMAGE_FOLDERS]
            image_root = next((d for d in found if d.is_dir()), found[0])
        self.image_root = Path(image_root)
        splits = {split} if isinstance(split, str) else set(split) if split is not None else None
        if gsd_m is None:
            gsd_m = meta.get("gsd_m")
        self.level = level_from_resolution(gsd_m) if gsd_m is not None else 0.0
        self.all_captions = all_captions
        self.entries = []  # [(key, path, [captions], {extra field: number})]
        for im, folder, caps in images:
            if splits is not None and im.get("split") not in splits:
                continue
            ids = KARPATHY_IDS + tuple(k for k in im if k.startswith("sentid"))
            extra = extra_fields(im, ids)
            if _in_places(extra, places):
                path = self.image_root / folder / im["filename"]
                self.entries.append((im["filename"], path, caps, extra))
        if not self.entries:
            found = sorted({str(im.get("split")) for im, _, _ in images})
            raise ValueError(
                f"{json_path}: no images in split {split!r}, places {places!r} (splits present: "
                f"{found})"
            )
        # all_captions: flat index -> (entry, caption)
        self.pairs = [(e, c) for e, entry in enumerate(self.entries) for c in range(len(entry[2]))]

    def __len__(self):
        return len(self.pairs) if self.all_captions else len(self.entries)

    def _record(self, i, generator):
        if self.all_captions:
            e, c = self.pairs[i]
            key, path, caps, extra = self.entries[e]
            key = f"{key}#{c}"
        else:
            key, path, caps, extra = self.entries[i]
            c = int(torch.randint(0, len(caps), (1,), generator=generator))
        fields = {
            **extra,
            "key": key,
            "caption": caps[c],
            "level": self.level,
            "quality": float("nan"),
        }
        return fields, path


# -----------------------------------------------------------------------------
# folder of images + jsonl / csv manifest


def find_manifest(path, split="train"):
    """The manifest a path names: the path itself when it is not a folder; for a folder, the
    METADATA_FILES it holds (Hugging Face imagefolder's metadata.jsonl or metadata.csv), or, when
    it holds none, its `split` subfolder's (imagefolder's train/ and test/ layout)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for folder in [path] if split is None else [path, path / split]:
        found = [folder / name for name in METADATA_FILES if (folder / name).is_file()]
        if len(found) > 1:
            raise ValueError(f"{folder}: holds both {' and '.join(METADATA_FILES)}; keep one")
        if found:
            return found[0]
    splits = sorted(
        d.name for d in path.iterdir() if any((d / name).is_file() for name in METADATA_FILES)
    )
    raise ValueError(
        f"{path} is a folder; give the manifest (.jsonl or .csv), or a folder holding "
        f"{' or '.join(METADATA_FILES)}"
        + (f" (itself or its split folder {split}/)" if split is not None else "")
        + (f"; split folders holding one here: {', '.join(splits)}" if splits else "")
    )


def _read_rows(manifest):
    """[(line, row)] of a .jsonl manifest (one json object a line, blank lines skipped) or a .csv
    one (a header, then a row a record; line: where the record ends)."""
    if manifest.suffix == ".jsonl":
        rows = []
        with open(manifest, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append((n, json.loads(line)))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{manifest}:{n}: not valid json ({e})") from None
        return rows
    if manifest.suffix == ".csv":
        with open(manifest, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            return [(reader.line_num, r) for r in reader]
    raise ValueError(f"CaptionFolder: manifest {manifest} must end in .jsonl or .csv")


def _numeric_cells(row, parse_text):
    """The numeric cells of a manifest row outside MANIFEST_COLUMNS, by column name: ints and
    floats as they are; with parse_text (csv), text that parses as a float. Empty cells, other
    text and bools are left out."""
    out = {}
    for name, v in row.items():
        if not isinstance(name, str) or name in MANIFEST_COLUMNS:
            continue
        if parse_text and isinstance(v, str):
            try:
                v = float(v)
            except ValueError:
                continue
        if is_number(v):
            out[name] = v
    return out


def _row_level(row):
    """A manifest row's level: its `level`, else the level of its resolution (the first of
    RESOLUTION_COLUMNS that is a positive number of m/px), else None."""
    level = _to_float(row.get("level"))
    if math.isfinite(level):
        return level
    for name in RESOLUTION_COLUMNS:
        res = _to_float(row.get(name))
        if math.isfinite(res) and res > 0:
            return level_from_resolution(res)
    return None


def read_manifest(manifest):
    """A manifest's rows -> [(line, fields, file column, file)]: fields {"key": file, "caption",
    "level" (None: the row has none), "quality" (nan: none), + its other numeric columns}; each of
    file and caption is the first of its spellings (FILE_COLUMNS, CAPTION_COLUMNS) the row holds.
    A row without one is a ValueError naming the manifest and line, as is a file_name or image
    cell that is not a path."""
    manifest = Path(manifest)
    out = []
    for n, (line, r) in enumerate(_read_rows(manifest), 1):
        where = f"{manifest}:{line}: row {n}"
        if not isinstance(r, dict):
            raise ValueError(f"{where} lacks columns: it is {_kind(r)}, not an object")
        column = next((c for c in FILE_COLUMNS if c in r), None)
        caption = next((c for c in CAPTION_COLUMNS if c in r), None)
        for name, names in ((column, FILE_COLUMNS), (caption, CAPTION_COLUMNS)):
            if name is None:
                raise ValueError(f"{where} lacks a column {' or '.join(names)}: {r!r}")
        file = r[column]
        if column != "file" and not (isinstance(file, str) and file):
            raise ValueError(f"{where}: {column} must name an image file, got {file!r}")
        fields = {
            **_numeric_cells(r, parse_text=manifest.suffix == ".csv"),
            "key": str(file),
            "caption": r[caption],
            "level": _row_level(r),
            "quality": _to_float(r.get("quality")),
        }
        out.append((line, fields, column, str(file)))
    return out


class CaptionFolder(CaptionImageDataset):
    """Images + a manifest: .jsonl (one object per line) or .csv (with a header). Columns: the
    image file, `file` (or Hugging Face imagefolder's `file_name`, or `image`); its caption,
    `caption` (or `text`); optionally `level` or `resolution_m` (or `gsd_m`; level wins when both
    are set) and `quality`. Every other numeric column (e.g. `cloud`) becomes a sample field of
    the same name; in a csv a cell is numeric when it parses as a float, and an empty cell leaves
    the field out of that row's sample; `lat` and `lon` columns are the image's place. Files are
    relative to `image_root` (default: the manifest's folder). min_quality keeps rows whose
    quality > min_quality, places one side of the spatial split.
    `manifest` may be a folder: its metadata.jsonl (or metadata.csv), or its `split` subfolder's
    (find_manifest). A file_name or image a manifest lists must exist (ValueError naming the line
    and file); a missing `file` is a bad sample when read."""

    def __init__(
        self,
        manifest,
        image_root=None,
        transform=None,
        min_quality=None,
        min_size=0,
        counter=None,
        seed=0,
        allow_empty_caption=False,
        places="all",
        split="train",
    ):
        super().__init__(transform, min_size, counter, seed, allow_empty_caption)
        check_split(places)
        manifest = find_manifest(manifest, split)
        if not manifest.is_file():
            raise ValueError(f"CaptionFolder: manifest {manifest} does not exist")
        self.manifest = manifest
        self.image_root = Path(image_root) if image_root is not None else manifest.parent
        self.rows, missing = [], []  # [(fields, image path)], ["manifest:line: ..."]
        for line, fields, column, file in read_manifest(manifest):
            path = self.image_root / file
            if column != "file" and not path.is_file():
                missing.append(f"{manifest}:{line}: {column} {file!r}: no such file {path}")
                continue
            if min_quality is not None and not fields["quality"] > min_quality:
                continue
            if fields["level"] is None:
                fields["level"] = 0.0
            if _in_places(fields, places):
                self.rows.append((fields, path))
        if missing:
            more = f" (and {len(missing) - 1} more missing)" if len(missing) > 1 else ""
            raise ValueError(missing[0] + more)
        if not self.rows:
            raise ValueError(
                f"{manifest}: no rows (after min_quality={min_quality}, places={places!r})"
            )

    def __len__(self):
        return len(self.rows)

    def _record(self, i, generator):
        return self.rows[i]


# -----------------------------------------------------------------------------
# real pairs captioned by a manifest


class PairCaptions(torch.utils.data.Dataset):
    """Real pairs (data/modalities.PairedFolder, whose `pairs` are [(key, control path, target
    path)]) captioned by a manifest of CaptionFolder's columns (a folder: its metadata.jsonl,
    find_manifest). A pair takes the row of its target image, else the row of its control image;
    a row's file is relative to the manifest's folder. The row's caption, its level when it has one
    (else the pairs' dataset-wide level stays), quality and numeric columns go into the pair's
    item. A pair without a row, a row of a pair without a caption, or a file listed twice is a
    ValueError naming it; rows of other files are left alone."""

    def __init__(self, pairs, manifest, split="train"):
        self.dataset = pairs
        manifest = find_manifest(manifest, split)
        if not manifest.is_file():
            raise ValueError(f"PairCaptions: manifest {manifest} does not exist")
        rows = {}  # absolute image path -> (line, fields)
        for line, fields, _, file in read_manifest(manifest):
            path = os.path.abspath(manifest.parent / file)
            if path in rows:
                raise ValueError(
                    f"{manifest}:{line}: {file!r} is listed again (first on line {rows[path][0]})"
                )
            rows[path] = (line, fields)
        self.fields, lacking = [], []  # [the pair's fields from its row], [(key, target path)]
        for key, control, target in pairs.pairs:
            found = rows.get(os.path.abspath(target)) or rows.get(os.path.abspath(control))
            if found is None:
                lacking.append((key, target))
                continue
            line, fields = found
            caption = fields["caption"]
            if not isinstance(caption, str) or not caption.strip():
                raise ValueError(f"{manifest}:{line}: {fields['key']!r} has no caption")
            item = {k: v for k, v in fields.items() if k not in ("key", "level")}
            if fields["level"] is not None:
                item["level"] = fields["level"]
            self.fields.append({**item, "caption": caption.strip()})
        if lacking:
            key, target = lacking[0]
            raise ValueError(
                f"{manifest}: {len(lacking)} of {len(pairs.pairs)} pairs have no row (one for "
                f"their target or control image), e.g. {key} (target {target})"
            )

    @property
    def transform(self):
        return self.dataset.transform

    @transform.setter
    def transform(self, transform):  # write_shards sets the reader's transform
        self.dataset.transform = transform

    def set_epoch(self, epoch):
        self.dataset.set_epoch(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        return {**item, **self.fields[i]} if isinstance(item, dict) else item
