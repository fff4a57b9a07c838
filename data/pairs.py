"""
Paired cloudy / clear images of the same ground, for scoring cloud removal against the truth.

    pairs = CloudPairs("Sen2_MTC_New", split="Sen2_MTC_New/test.txt")
    cloudy, clear, name = pairs[0]  # (K, 3, H, W), (3, H, W) in [-1, 1]; "T09WWP_R071/xyz"

Two layouts, told apart by what ROOT holds:
    Sen2-MTC (Huang & Wu 2022, CTGAN; also Sen2_MTC_New, as DiffCR reads it)
        ROOT/<tile>/cloudless/<image>.tif       the clear image
        ROOT/<tile>/cloud/<image>_<k>.tif       its cloudy acquisitions, k = 0, 1, 2
        (or ROOT/Sen2_MTC/<tile>/..., as both are distributed); `split` is a tile list, e.g. the
        dataset's test.txt (one tile a line, a name or a path whose last part is the name). Name
        of a pair: "<tile>/<image>".
    folders
        ROOT/clear/<name>.<ext>  and  ROOT/cloudy/<name>.<ext> or ROOT/cloudy/<name>_<k>.<ext>
A cloudy image pairs with the clear image of its own stem, or of its stem less a `_<k>` suffix;
acquisitions are ordered by k (the unsuffixed one first). Every image file must be paired: an
unpaired one is a ValueError naming it (a partial copy of a dataset would otherwise give figures for
another set of images). Other files (not .png, .jpg, .jpeg, .tif, .tiff) are left alone.

Pixels: the first three bands are R, G, B (Sen2-MTC's four bands are B4, B3, B2, B8 = R, G, B,
NIR); one band is grey. Values are divided by the value of white and clipped to [0, 1]: 255 in
8-bit images; in wider ones `full_scale`, by default 10000 for integers (Sentinel-2 reflectance x
10000, Sen2-MTC's 0..10000) and 1 for floats. Pillow reads 8-bit TIFFs of any band count and
one-band 16-bit images, but reads a TIFF of several 16-bit bands as 8 bits, keeping the high byte;
such files (Sen2-MTC's) are decoded here from their strips, uncompressed or Deflate (with or
without the horizontal predictor). Other TIFFs of several wide bands are a ValueError saying how to
convert them.
"""

import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from data.modalities import IMAGE_EXTENSIONS

SEN2_MTC, FOLDERS = "sen2-mtc", "folders"
SUFFIX = re.compile(r"(.+)_(\d+)")  # <name>_<k>: acquisition k of <name>
EXAMPLES = 3  # unpaired files named in an error


@dataclass
class Pair:
    """One clear image and its cloudy acquisitions (in order)."""

    name: str
    cloudy: list
    clear: Path


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------

# TIFF tags
BITS, COMPRESSION, STRIP_OFFSETS, SAMPLES, STRIP_BYTES, PLANAR = 258, 259, 273, 277, 279, 284
PREDICTOR, TILE_WIDTH, SAMPLE_FORMAT = 317, 322, 339
NONE, DEFLATE, ADOBE_DEFLATE = 1, 8, 32946  # compression codes
SAMPLE_KINDS = {1: "u", 2: "i", 3: "f"}  # SampleFormat: unsigned, signed, IEEE float


def _tag(im, code, default):
    """A TIFF tag's values as a tuple (Pillow gives one value bare)."""
    value = im.tag_v2.get(code, default)
    return value if isinstance(value, tuple) else (value,)


def _wide_tiff(im):
    """Whether Pillow would read this image's samples narrower than they are: a TIFF of several
    bands wider than 8 bits."""
    return im.format == "TIFF" and _tag(im, SAMPLES, 1)[0] > 1 and max(_tag(im, BITS, 8)) > 8


def _tiff_samples(im, path):
    """A striped TIFF's samples as they are stored -> (H, W, bands) array, decoded here from the
    strips (uncompressed or Deflate, chunky or planar, the horizontal predictor undone)."""
    bands, bits = _tag(im, SAMPLES, 1)[0], _tag(im, BITS, 8)
    compression, predictor = _tag(im, COMPRESSION, NONE)[0], _tag(im, PREDICTOR, 1)[0]
    kind = SAMPLE_KINDS.get(_tag(im, SAMPLE_FORMAT, 1)[0])
    what = f"{path}: a TIFF of {bands} bands of {bits[0]} bits"
    convert = (
        "; Pillow would read it as 8 bits. Rewrite it uncompressed (gdal_translate -co "
        "COMPRESS=NONE IN OUT) or as 8-bit RGB (gdal_translate -b 1 -b 2 -b 3 -ot Byte -scale 0 "
        "10000 0 255 IN OUT)"
    )
    if TILE_WIDTH in im.tag_v2:
        raise ValueError(f"{what} stored in tiles, not strips{convert}")
    if compression not in (NONE, DEFLATE, ADOBE_DEFLATE):
        raise ValueError(f"{what} with compression {compression} (not none or Deflate){convert}")
    if len(set(bits)) != 1 or bits[0] not in (16, 32, 64) or kind is None:
        raise ValueError(f"{what}: bands of {bits} bits, sample format {kind}{convert}")
    if predictor not in (1, 2) or (predictor == 2 and kind == "f"):
        raise ValueError(f"{what} with predictor {predictor}{convert}")
    with open(path, "rb") as f:
        order = "<" if f.read(2) == b"II" else ">"
        strips = []
        for offset, count in zip(_tag(im, STRIP_OFFSETS, ()), _tag(im, STRIP_BYTES, ())):
            f.seek(offset)
            data = f.read(count)
            try:
                strips.append(zlib.decompress(data) if compression != NONE else data)
            except zlib.error as e:
                raise ValueError(
                    f"{what}: the strip at byte {offset} does not inflate ({e})"
                ) from None
    # strips hold whole rows (of one band when planar): their concatenation is the image
    W, H = im.size
    planar = _tag(im, PLANAR, 1)[0] == 2
    values = np.frombuffer(b"".join(strips), dtype=np.dtype(f"{order}{kind}{bits[0] // 8}"))
    if values.size < H * W * bands:
        raise ValueError(f"{what}: its strips hold {values.size} values, {H * W * bands} expected")
    shape = (bands, H, W) if planar else (H, W, bands)
    values = values[: H * W * bands].reshape(shape)
    if predictor == 2:  # each sample stored as the difference to its left neighbour
        values = np.cumsum(values, axis=2 if planar else 1, dtype=values.dtype)
    return np.moveaxis(values, 0, -1) if planar else values


def read_image(path, full_scale=None):
    """An image file -> (3, H, W) float32 in [-1, 1]: its first three bands (one band: grey),
    divided by the value of white and clipped to [0, 1]. White is 255 in 8-bit images; in wider ones
    `full_scale` (default 10000 for integers, Sentinel-2 reflectance x 10000; 1 for floats). A file
    Pillow cannot read, or reads wrongly, is a ValueError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if _wide_tiff(im):
                values = _tiff_samples(im, path)
            else:
                im.load()
                if im.mode in ("P", "PA", "1", "YCbCr", "LAB", "HSV"):
                    im = im.convert("RGB")
                values = np.asarray(im)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise ValueError(f"{path}: not an image Pillow can read ({e})") from None
    values = values[..., None] if values.ndim == 2 else values  # H, W, bands
    if values.shape[-1] < 3:
        values = values[..., :1].repeat(3, -1)  # grey (a second band, alpha, left out)
    values = values[..., :3]
    if values.dtype.itemsize == 1:
        full_scale = 255.0
    elif full_scale is None:
        full_scale = 1.0 if values.dtype.kind == "f" else 10000.0
    unit = np.clip(values.astype(np.float32) / np.float32(full_scale), 0, 1)
    return torch.from_numpy(np.ascontiguousarray(unit)).permute(2, 0, 1) * 2 - 1


# ----------------------------------------------------------------------------------------------
# Pairing
# ----------------------------------------------------------------------------------------------


def _images(folder):
    return sorted(
        p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )


def _match(cloudy_dir, clear_dir, prefix=""):
    """(pairs, unpaired files) of one cloudy folder and its clear folder."""
    clear = {}
    for p in _images(clear_dir):
        if p.stem in clear:
            raise ValueError(f"{clear[p.stem]} and {p}: two clear images of one name")
        clear[p.stem] = p
    groups, unpaired = {stem: [] for stem in clear}, []
    for p in _images(cloudy_dir):
        m = SUFFIX.fullmatch(p.stem)
        if p.stem in clear:
            groups[p.stem].append((-1, p))
        elif m and m[1] in clear:
            groups[m[1]].append((int(m[2]), p))
        else:
            unpaired.append(p)
    pairs = []
    for stem, found in groups.items():
        if not found:
            unpaired.append(clear[stem])
            continue
        pairs.append(Pair(prefix + stem, [p for _, p in sorted(found)], clear[stem]))
    return pairs, unpaired


def _tiles(root, split):
    """Sen2-MTC's tile folders under root (or root/Sen2_MTC), only those `split` lists."""
    base = root / "Sen2_MTC" if (root / "Sen2_MTC").is_dir() else root
    tiles = {
        d.name: d
        for d in sorted(base.iterdir())
        if (d / "cloud").is_dir() and (d / "cloudless").is_dir()
    }
    if split is None:
        return list(tiles.values())
    try:
        lines = Path(split).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"split {split}: cannot read it as text ({e})") from None
    names = [re.split(r"[\\/]", ln.strip().rstrip("\\/"))[-1] for ln in lines if ln.strip()]
    unknown = [n for n in names if n not in tiles]
    if unknown:
        raise ValueError(
            f"split {split}: {len(unknown)} of its {len(names)} tiles are not under {base} "
            f"(e.g. {', '.join(unknown[:EXAMPLES])})"
        )
    if not names:
        raise ValueError(f"split {split} lists no tile")
    return [tiles[n] for n in dict.fromkeys(names)]


def find_pairs(root, split=None):
    """(layout, [Pair]) of a folder in one of the two layouts, every image paired."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: not a folder")
    if (root / "cloudy").is_dir() and (root / "clear").is_dir():
        if split is not None:
            raise ValueError(f"split {split}: a tile list is for Sen2-MTC's layout, not {root}")
        layout, (pairs, unpaired) = FOLDERS, _match(root / "cloudy", root / "clear")
    else:
        tiles = _tiles(root, split)
        if not tiles:
            raise ValueError(
                f"{root}: neither layout: expected cloudy/ and clear/ folders, or tile folders "
                "holding cloud/ and cloudless/ (Sen2-MTC)"
            )
        layout, pairs, unpaired = SEN2_MTC, [], []
        for tile in tiles:
            found, lost = _match(tile / "cloud", tile / "cloudless", f"{tile.name}/")
            pairs += found
            unpaired += lost
    if unpaired:
        raise ValueError(
            f"{root}: {len(unpaired)} image files have no partner (a cloudy <name> or "
            f"<name>_<k> for each clear <name>), e.g. {', '.join(map(str, unpaired[:EXAMPLES]))}"
        )
    if not pairs:
        raise ValueError(f"{root}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in its folders")
    return layout, pairs


class CloudPairs(torch.utils.data.Dataset):
    """The pairs of a folder (find_pairs). Items: (cloudy (K, 3, H, W), clear (3, H, W), both in
    [-1, 1], name); an unreadable file or images of different sizes are a ValueError naming them."""

    def __init__(self, root, split=None, full_scale=None):
        if full_scale is not None and not full_scale > 0:
            raise ValueError(f"full_scale must be > 0, got {full_scale}")
        self.root, self.split, self.full_scale = Path(root), split, full_scale
        self.layout, self.pairs = find_pairs(root, split)

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        pair = self.pairs[i]
        clear = read_image(pair.clear, self.full_scale)
        cloudy = [read_image(p, self.full_scale) for p in pair.cloudy]
        for p, image in zip(pair.cloudy, cloudy):
            if image.shape != clear.shape:
                raise ValueError(
                    f"{p} is {image.shape[2]}x{image.shape[1]} and its clear image {pair.clear} "
                    f"{clear.shape[2]}x{clear.shape[1]}"
                )
        return torch.stack(cloudy), clear, pair.name
