"""Tests for the data readers (data/datasets.py, data/shards.py, data/transforms.py) on tiny
generated data."""

import io
import json
import logging
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.datasets import CaptionFolder, Git10M, KarpathyCaptions
from data.levels import (
    level_from_resolution,
    parse_google_location,
    parse_level_prefix,
    tile_to_lonlat,
)
from data.sampler import ResumableSampler
from data.samples import FILTERED, BadDataCounter, BadDataError, build_sample, collate
from data.shards import ShardDataset, write_shards
from data.transforms import (
    ImageTransform,
    eval_transform,
    pil_to_tensor,
    random_dihedral,
    train_transform,
)

UCM = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "ucm_captions"

# -----------------------------------------------------------------------------
# helpers


def _rgb(seed, w=20, h=16):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(arr, mode=None):
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _tensor(arr):
    return torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1


def _make_folder(tmp, n=10, fmt="jsonl", extra=None):
    """n PNG images + a manifest; row i has caption 'cap i', resolution_m 2**(i % 3)
    (level 17 - i % 3)."""
    rows = []
    for i in range(n):
        (tmp / f"im{i}.png").write_bytes(_png(_rgb(i)))
        rows.append(
            {
                "file": f"im{i}.png",
                "caption": f"cap {i}",
                "resolution_m": 2.0 ** (i % 3),
                "quality": 4.0 + 0.2 * i,
            }
        )
    for r in extra or []:
        rows.append(r)
    if fmt == "jsonl":
        p = tmp / "meta.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        p = tmp / "meta.csv"
        cols = ["file", "caption", "resolution_m", "quality"]
        lines = [",".join(str(r.get(c, "")) for c in cols) for r in rows]
        p.write_text("\n".join([",".join(cols)] + lines) + "\n")
    return p


def _make_git10m(tmp, layout="caption", files=((2, 1), (3, 2)), image_as_struct=True):
    """HF save_to_disk folder; each file is a list of record-batch sizes. Row g: image seed g."""
    import pyarrow as pa

    root = tmp / "git10m"
    (root / "train").mkdir(parents=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    img_t = pa.binary()
    if image_as_struct:
        img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    if layout == "caption":
        schema = pa.schema(
            [
                ("image", img_t),
                ("img_name", pa.string()),
                ("img_quality_score", pa.float64()),
                ("caption", pa.string()),
                ("caption_length", pa.int64()),
                ("resolution", pa.float64()),
                ("Google_location", pa.string()),
            ]
        )
    else:
        schema = pa.schema([("image", img_t), ("text", pa.string())])
    names, g = [], 0
    for fi, batches in enumerate(files):
        name = f"data-{fi:05d}-of-{len(files):05d}.arrow"
        names.append({"filename": name})
        sink = pa.OSFile(str(root / "train" / name), "wb")
        with sink, pa.ipc.new_stream(sink, schema) as w:
            for nb in batches:
                cols = {n: [] for n in schema.names}
                for _ in range(nb):
                    b = _png(_rgb(g))
                    cols["image"].append({"bytes": b, "path": None} if image_as_struct else b)
                    if layout == "caption":
                        cols["img_name"].append(f"img_{g}.png")
                        cols["img_quality_score"].append([5.0, 4.0, None, 4.9][g % 4])
                        cols["caption"].append(f"caption {g}")
                        cols["caption_length"].append(2)
                        # g % 4 == 1: level from the location
                        cols["resolution"].append([0.5, None, None, 4.0][g % 4])
                        cols["Google_location"].append([None, f"16_{g}_7", None, "12_0_0"][g % 4])
                    else:
                        cols["text"].append(f"{[18, 0, 14][g % 3]}_GOOGLE_LEVEL_caption {g}")
                    g += 1
                w.write_batch(
                    pa.record_batch(
                        [pa.array(cols[n], type=schema.field(n).type) for n in schema.names],
                        schema=schema,
                    )
                )
    (root / "train" / "state.json").write_text(
        json.dumps(
            {
                "_data_files": names,
                "_fingerprint": "x",
                "_format_columns": None,
                "_format_kwargs": {},
                "_format_type": None,
                "_output_all_columns": False,
                "_split": "train",
            }
        )
    )
    return root, g


def _karpathy(tmp, n_train=3, n_val=1, gsd=None):
    (tmp / "images").mkdir()
    images = []
    for i in range(n_train + n_val):
        (tmp / "images" / f"{i}.png").write_bytes(_png(_rgb(i)))
        images.append(
            {
                "filename": f"{i}.png",
                "imgid": i,
                "split": "train" if i < n_train else "val",
                "sentences": [{"raw": f"img {i} sentence {s}"} for s in range(5)],
            }
        )
    meta = {"images": images, "dataset": "toy"}
    if gsd is not None:
        meta["gsd_m"] = gsd
    (tmp / "dataset.json").write_text(json.dumps(meta))
    return tmp / "dataset.json"


# -----------------------------------------------------------------------------
# levels


def test_level_helpers():
    assert level_from_resolution(1.0) == 17.0
    assert level_from_resolution(0.5) == 18.0
    assert level_from_resolution(128) == 10.0
    assert level_from_resolution(0.3048) == pytest.approx(18.71407, abs=1e-5)
    for bad in (0, -1, float("nan"), "x"):
        with pytest.raises(ValueError):
            level_from_resolution(bad)
    assert parse_level_prefix("16_GOOGLE_LEVEL_a river\nbend") == (16.0, "a river\nbend")
    assert parse_level_prefix("0_GOOGLE_LEVEL_fields") == (0.0, "fields")
    assert parse_level_prefix("18.5_GOOGLE_LEVEL_x") == (18.5, "x")
    assert parse_level_prefix("no prefix here") == (0.0, "no prefix here")
    assert parse_google_location("18_5_7") == (18, 5, 7)
    for bad in ("18_5", "a_b_c", "2_4_0"):
        with pytest.raises(ValueError):
            parse_google_location(bad)
    lon, lat = tile_to_lonlat(0, 0, 0)
    assert (lon, lat) == pytest.approx((-180.0, 85.0511288), abs=1e-6)
    assert tile_to_lonlat(1, 1, 1) == pytest.approx((0.0, 0.0), abs=1e-9)
    assert tile_to_lonlat(0, 0, 0, center=True) == pytest.approx((0.0, 0.0), abs=1e-9)


# -----------------------------------------------------------------------------
# Git-10M Arrow


@pytest.mark.parametrize("image_as_struct", [True, False])
def test_git10m_caption_layout(tmp_path, image_as_struct):
    root, n = _make_git10m(tmp_path, image_as_struct=image_as_struct)
    ds = Git10M(root, transform=None)
    assert len(ds) == n == 8
    for g in range(n):
        s = ds[g]
        assert s["key"] == f"img_{g}.png" and s["caption"] == f"caption {g}"
        assert s["level"] == [18.0, 16.0, 0.0, 15.0][g % 4]
        q = [5.0, 4.0, None, 4.9][g % 4]
        assert math.isnan(s["quality"]) if q is None else s["quality"] == q
        assert torch.equal(s["image"], _tensor(_rgb(g)))  # PNG is lossless
    with pytest.raises(IndexError):
        ds[n]
    # same folder, given as the split folder itself
    assert len(Git10M(root / "train")) == n


def test_git10m_text_layout(tmp_path):
    root, n = _make_git10m(tmp_path, layout="text")
    ds = Git10M(root, transform=eval_transform(8))
    for g in range(n):
        s = ds[g]
        assert s["caption"] == f"caption {g}" and s["level"] == [18.0, 0.0, 14.0][g % 3]
        assert math.isnan(s["quality"]) and s["image"].shape == (3, 8, 8)
    with pytest.raises(ValueError, match="img_quality_score"):
        Git10M(root, min_quality=4.8)


def test_git10m_quality_filter_and_pickle(tmp_path):
    root, n = _make_git10m(tmp_path)
    ds = Git10M(root, min_quality=4.8)
    keys = [ds[i]["key"] for i in range(len(ds))]
    # 5.0 and 4.9 kept; not 4.0 or null
    assert keys == [f"img_{g}.png" for g in range(n) if g % 4 in (0, 3)]
    ds2 = pickle.loads(pickle.dumps(ds))  # open memory maps are not pickled (DataLoader workers)
    assert not ds2._maps and [ds2[i]["key"] for i in range(len(ds2))] == keys


def test_git10m_image_cell_variants(tmp_path):
    import pyarrow as pa

    root = tmp_path / "split"
    root.mkdir()
    (root / "im.png").write_bytes(_png(_rgb(9)))
    img_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("image", img_t), ("caption", pa.string())])
    images = [
        {"bytes": None, "path": "im.png"},
        {"bytes": None, "path": None},
        {"bytes": b"junk", "path": None},
    ]
    name = "data-00000-of-00001.arrow"
    with pa.OSFile(str(root / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
        columns = [pa.array(images, type=img_t), pa.array(["a", "b", "c"])]
        w.write_batch(pa.record_batch(columns, schema=schema))
    (root / "state.json").write_text(json.dumps({"_data_files": [{"filename": name}]}))
    c = BadDataCounter(min_samples=10**9)
    ds = Git10M(root, counter=c)
    s = ds[0]  # bytes missing: read from the path, relative to the split folder
    assert torch.equal(s["image"], _tensor(_rgb(9))) and s["key"] == "data-00000-of-00001.arrow:0"
    assert s["level"] == 0.0 and math.isnan(s["quality"])
    assert ds[1] is None and ds[2] is None and c.bad == 2
    assert c.examples[0][1] == "no image and no latent" and "unreadable image" in c.examples[1][1]


def test_git10m_bad_folders(tmp_path):
    root, _ = _make_git10m(tmp_path)
    with pytest.raises(ValueError, match="split 'test'"):
        Git10M(root, split="test")
    with pytest.raises(ValueError, match="state.json"):
        Git10M(tmp_path / "nowhere")
    (root / "train" / "data-00001-of-00002.arrow").unlink()
    with pytest.raises(ValueError, match="data-00001-of-00002.arrow"):
        Git10M(root)


# -----------------------------------------------------------------------------
# Karpathy json


def test_karpathy_captions(tmp_path):
    path = _karpathy(tmp_path, gsd=0.5)
    ds = KarpathyCaptions(path, split="train", transform=None)
    assert len(ds) == 3 and ds[0]["level"] == 18.0
    assert len(KarpathyCaptions(path, split="val")) == 1
    assert len(KarpathyCaptions(path, split=None)) == 4
    assert len(KarpathyCaptions(path, split=["train", "val"], all_captions=True)) == 20
    assert KarpathyCaptions(path, gsd_m=2.0)[0]["level"] == 16.0
    # one caption per visit, reproducible from (seed, epoch, index), varying with the epoch
    caps = []
    for epoch in range(6):
        ds.set_epoch(epoch)
        caps.append([ds[i]["caption"] for i in range(3)])
        assert all(c.startswith(f"img {i} sentence") for i, c in enumerate(caps[-1]))
    ds.set_epoch(2)
    assert [ds[i]["caption"] for i in range(3)] == caps[2]
    assert len({tuple(c) for c in caps}) > 1
    assert torch.equal(ds[1]["image"], _tensor(_rgb(1)))
    alls = KarpathyCaptions(path, all_captions=True)
    assert [alls[i]["caption"] for i in range(5)] == [f"img 0 sentence {s}" for s in range(5)]
    with pytest.raises(ValueError, match="splits present"):
        KarpathyCaptions(path, split="test")


def test_karpathy_without_gsd_is_level_zero(tmp_path):
    ds = KarpathyCaptions(_karpathy(tmp_path), split="train")
    assert ds[0]["level"] == 0.0


def test_karpathy_numeric_image_keys_become_fields(tmp_path):
    """A numeric per-image key ("cloud") is a sample field; the ids (imgid) and text are not."""
    path = _karpathy(tmp_path)
    meta = json.loads(path.read_text())
    for i, im in enumerate(meta["images"]):
        im["cloud"], im["sensor"], im["level"] = 0.1 * i, "toy", 99.0
    path.write_text(json.dumps(meta))
    for ds in (KarpathyCaptions(path), KarpathyCaptions(path, all_captions=True)):
        s = ds[len(ds) - 1]
        assert s["cloud"] == pytest.approx(0.2) and s["level"] == 0.0  # the json's level: not used
        assert "imgid" not in s and "sensor" not in s
    batch = collate([KarpathyCaptions(path)[i] for i in range(3)])
    assert torch.allclose(batch["cloud"], torch.tensor([0.0, 0.1, 0.2]))


@pytest.mark.skipif(
    not (UCM / "dataset.json").is_file(), reason="shared UCM-Captions data not present"
)
def test_ucm_captions_real():
    splits = {
        s: KarpathyCaptions(UCM / "dataset.json", split=s, transform=eval_transform(256))
        for s in ("train", "val", "test")
    }
    assert {s: len(d) for s, d in splits.items()} == {"train": 1680, "val": 210, "test": 210}
    ds = splits["test"]
    assert ds.level == pytest.approx(18.71407, abs=1e-5)
    meta = json.loads((UCM / "dataset.json").read_text())
    raw = {im["filename"]: [s["raw"] for s in im["sentences"]] for im in meta["images"]}
    batch = collate([ds[i] for i in range(0, 210, 15)])
    assert batch["image"].shape == (14, 3, 256, 256)
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].std() > 0.05
    assert all(
        c.strip() in [r.strip() for r in raw[k]] for c, k in zip(batch["caption"], batch["key"])
    )
    assert ds.counter.bad == 0


# -----------------------------------------------------------------------------
# folder + jsonl / csv


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_caption_folder(tmp_path, fmt):
    extra = [
        {"file": "im0.png", "caption": "with level", "level": 12.5},
        {"file": "im1.png", "caption": "no level"},
    ]
    ds = CaptionFolder(_make_folder(tmp_path, 4, fmt, extra), transform=None)
    assert len(ds) == 6
    assert [ds[i]["level"] for i in range(4)] == [17.0, 16.0, 15.0, 17.0]
    assert ds[0]["caption"] == "cap 0" and ds[0]["quality"] == pytest.approx(4.0)
    assert torch.equal(ds[2]["image"], _tensor(_rgb(2)))
    if fmt == "jsonl":  # the csv writer above has no `level` column
        assert ds[4]["level"] == 12.5
    assert ds[5]["level"] == 0.0
    q = CaptionFolder(tmp_path / f"meta.{fmt}", min_quality=4.3)
    assert [q[i]["key"] for i in range(len(q))] == ["im2.png", "im3.png"]


def _cloud_folder(tmp, fmt):
    """4 PNG images + a manifest with the extra columns `cloud` (numeric; empty for im3 in the
    csv, missing in the jsonl), `year` (int) and `sensor` (text)."""
    rows = []
    for i in range(4):
        (tmp / f"im{i}.png").write_bytes(_png(_rgb(i, 16, 16)))
        rows.append(
            {
                "file": f"im{i}.png",
                "caption": f"cap {i}",
                "cloud": 0.25 * i,
                "year": 2020 + i,
                "sensor": "toy",
            }
        )
    del rows[3]["cloud"]
    if fmt == "jsonl":
        p = tmp / "meta.jsonl"
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        p, cols = tmp / "meta.csv", ["file", "caption", "cloud", "year", "sensor"]
        lines = [",".join(str(r.get(c, "")) for c in cols) for r in rows]
        p.write_text("\n".join([",".join(cols)] + lines) + "\n")
    return p


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_caption_folder_extra_numeric_columns(tmp_path, fmt):
    """Every other numeric column is a sample field of its name, batched by collate as (B,)."""
    ds = CaptionFolder(_cloud_folder(tmp_path, fmt), transform=None)
    got = [ds[i] for i in range(4)]
    assert [s["cloud"] for s in got[:3]] == [0.0, 0.25, 0.5] and "cloud" not in got[3]
    assert [s["year"] for s in got] == [2020, 2021, 2022, 2023]
    assert all("sensor" not in s for s in got)  # text, not a number
    assert got[0]["level"] == 0.0 and math.isnan(got[0]["quality"])
    batch = collate(got[:3])
    assert batch["cloud"].dtype == torch.float32 and batch["cloud"].shape == (3,)
    assert batch["cloud"].tolist() == [0.0, 0.25, 0.5]
    assert batch["year"].tolist() == [2020.0, 2021.0, 2022.0]
    # a sample without the field: NaN there (a condition reads it as its null)
    assert (
        collate(got)["cloud"][:3].tolist() == [0.0, 0.25, 0.5] and collate(got)["cloud"][3].isnan()
    )


def test_shards_keep_extra_fields(tmp_path):
    """write_shards stores a sample's extra numeric fields; ShardDataset reads them back."""
    src = CaptionFolder(_cloud_folder(tmp_path, "jsonl"), transform=eval_transform(16))
    write_shards(src, tmp_path / "shards", samples_per_shard=3, image_format="png")
    got = list(ShardDataset(tmp_path / "shards", shuffle_buffer=0, shuffle_shards=False))
    assert [s["key"] for s in got] == [f"im{i}.png" for i in range(4)]
    for i, s in enumerate(got):
        ref = src[i]
        assert s.get("cloud") == ref.get("cloud") and s["year"] == ref["year"]
    assert type(got[0]["year"]) is int and "cloud" not in got[3]
    assert collate(got[:3])["cloud"].tolist() == [0.0, 0.25, 0.5]


def test_caption_folder_bad_manifest(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"file": "a.png"}) + "\n")
    with pytest.raises(ValueError, match="row 1 lacks"):
        CaptionFolder(tmp_path / "m.jsonl")
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(ValueError, match=".jsonl or .csv"):
        CaptionFolder(tmp_path / "m.txt")
    with pytest.raises(ValueError, match="does not exist"):
        CaptionFolder(tmp_path / "none.csv")


# -----------------------------------------------------------------------------
# tar shards


def _toy_encode(x):  # (B, 3, H, W) -> (B, 4, H/4, W/4)
    p = F.avg_pool2d(x, 4)
    return torch.cat([p, p.mean(1, keepdim=True)], 1)


def test_write_and_read_shards(tmp_path):
    src = CaptionFolder(_make_folder(tmp_path, 10), transform=eval_transform(16))
    out = tmp_path / "shards"
    paths = write_shards(src, out, samples_per_shard=3, image_format="png")
    assert [p.name for p in paths] == [f"shard-{i:06d}.tar" for i in range(4)]
    index = json.loads((out / "index.json").read_text())
    assert [s["count"] for s in index["shards"]] == [3, 3, 3, 1]
    ds = ShardDataset(out, shuffle_buffer=0, shuffle_shards=False)
    got = list(ds)
    assert [s["key"] for s in got] == [f"im{i}.png" for i in range(10)]
    for i, s in enumerate(got):
        ref = src[i]
        assert s["caption"] == ref["caption"] and s["level"] == ref["level"]
        assert s["quality"] == pytest.approx(ref["quality"])
        assert torch.allclose(s["image"], ref["image"], atol=0.5 / 127.5)  # 8-bit rounding only
    with pytest.raises(FileExistsError, match="overwrite=True"):
        write_shards(src, out, samples_per_shard=3)
    write_shards(src, out, samples_per_shard=5, overwrite=True)
    assert sorted(p.name for p in out.glob("*.tar")) == ["shard-000000.tar", "shard-000001.tar"]
    # without index.json the reader counts samples from the tar headers
    (out / "index.json").unlink()
    assert ShardDataset(out).counts == [5, 5]


def test_shards_with_latents(tmp_path):
    src = CaptionFolder(_make_folder(tmp_path, 5), transform=eval_transform(16))
    write_shards(
        src,
        tmp_path / "a",
        samples_per_shard=2,
        encode_fn=_toy_encode,
        batch_size=2,
        latent_dtype=torch.float32,
    )
    got = list(ShardDataset(tmp_path / "a", shuffle_buffer=0, shuffle_shards=False))
    for i, s in enumerate(got):
        assert s["latent"].shape == (4, 4, 4) and s["image"].shape == (3, 16, 16)
        assert torch.allclose(s["latent"], _toy_encode(src[i]["image"][None])[0], atol=1e-6)
    write_shards(
        src, tmp_path / "b", samples_per_shard=2, encode_fn=_toy_encode, write_images=False
    )
    ds = ShardDataset(
        tmp_path / "b",
        shuffle_buffer=0,
        shuffle_shards=False,
        load_images=False,
        augment_latents=True,
    )
    batch = collate(list(ds))
    assert "image" not in batch and batch["latent"].shape == (5, 4, 4, 4)
    assert batch["latent"].dtype == torch.float32
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "small.png").write_bytes(_png(_rgb(0, 16, 16)))
    (mixed / "big.png").write_bytes(_png(_rgb(1, 24, 24)))
    (mixed / "m.jsonl").write_text(
        json.dumps({"file": "small.png", "caption": "a"})
        + "\n"
        + json.dumps({"file": "big.png", "caption": "b"})
        + "\n"
    )
    with pytest.raises(ValueError, match="equal image sizes"):
        write_shards(CaptionFolder(mixed / "m.jsonl"), tmp_path / "c", encode_fn=_toy_encode)


def _keys_for(out, rank, world, workers, **kw):
    ds = ShardDataset(out, rank=rank, world_size=world, **kw)
    dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate)
    return [k for b in dl for k in b["key"]]


def test_shard_rank_worker_split_covers_once(tmp_path):
    src = CaptionFolder(_make_folder(tmp_path, 23), transform=eval_transform(8))
    out = tmp_path / "shards"
    write_shards(src, out, samples_per_shard=3)
    every = {f"im{i}.png" for i in range(23)}
    for world, workers in ((1, 0), (2, 2), (3, 2)):
        keys = [
            k
            for r in range(world)
            for k in _keys_for(out, r, world, workers, drop_remainder=False, shuffle_buffer=4)
        ]
        assert len(keys) == 23 and set(keys) == every, (world, workers)
    # drop_remainder: equal counts per rank, still no duplicates
    per = [_keys_for(out, r, 3, 2, shuffle_buffer=4) for r in range(3)]
    assert [len(p) for p in per] == [7, 7, 7] and len(set(sum(per, []))) == 21


def test_shard_order_reproducible_and_resumable(tmp_path):
    src = CaptionFolder(_make_folder(tmp_path, 23), transform=eval_transform(8))
    out = tmp_path / "shards"
    write_shards(src, out, samples_per_shard=3)
    kw = dict(rank=1, world_size=2, seed=3, shuffle_buffer=4, transform=train_transform(8))

    def run(skip=0, epoch=0, workers=2):  # -> list of batches of (key, image)
        ds = ShardDataset(out, batch_size=2, **kw)
        ds.set_epoch(epoch, skip)
        dl = torch.utils.data.DataLoader(ds, batch_size=2, num_workers=workers, collate_fn=collate)
        return [list(zip(b["key"], b["image"])) for b in dl]

    def same(xs, ys):
        return [k for k, _ in xs] == [k for k, _ in ys] and all(
            torch.equal(a, b) for (_, a), (_, b) in zip(xs, ys)
        )

    full = run()
    flat = sum(full, [])
    assert len(flat) == 11 and len({k for k, _ in flat}) == 11
    assert same(flat, sum(run(), []))
    assert [k for k, _ in sum(run(epoch=1), [])] != [k for k, _ in flat]
    # skip counts batches; 2 workers with 5 and 6 samples -> batches of 2, 2, 2, 2, 1, 2
    for skip in (1, 3, 4, 5):
        assert same(sum(run(skip=skip), []), sum(full[skip:], [])), skip
    assert run(skip=6) == []
    with pytest.raises(ValueError, match="past the end"):
        # (in a worker it raises too, but the test would wait on the worker's shutdown)
        run(skip=7, workers=0)
    single = [s["key"] for s in ShardDataset(out, **kw)]  # no DataLoader: batches of 1
    assert [s["key"] for s in ShardDataset(out, skip_batches=5, **kw)] == single[5:]
    assert sorted(single) == sorted(k for k, _ in flat)


# -----------------------------------------------------------------------------
# map-style resume


def test_resumable_sampler():
    n, W = 23, 3
    for epoch in (0, 1):
        parts = []
        for r in range(W):
            s = ResumableSampler(n, seed=7, rank=r, world_size=W)
            s.set_epoch(epoch)
            parts.append(list(s))
        flat = sum(parts, [])
        assert [len(p) for p in parts] == [7, 7, 7]
        assert len(set(flat)) == 21 and set(flat) <= set(range(n))
        if epoch == 0:
            first = parts
    assert parts != first
    s = ResumableSampler(n, seed=7, rank=1, world_size=W, start_index=4)
    assert list(s) == first[1][4:] and len(s) == 3
    s.set_epoch(0)  # start_index applies to the resumed epoch only
    assert list(s) == first[1]
    pad = [
        list(ResumableSampler(n, seed=7, rank=r, world_size=W, drop_last=False)) for r in range(W)
    ]
    assert [len(p) for p in pad] == [8, 8, 8] and set(sum(pad, [])) == set(range(n))
    tiny = [i for r in range(5) for i in ResumableSampler(2, rank=r, world_size=5, drop_last=False)]
    assert sorted(tiny) == [0, 0, 0, 1, 1]
    with pytest.raises(ValueError, match="start_index"):
        ResumableSampler(n, rank=0, world_size=W, start_index=8)
    with pytest.raises(ValueError, match="rank"):
        ResumableSampler(n, rank=3, world_size=W)


def test_map_style_resume_reproduces_samples(tmp_path):
    ds = KarpathyCaptions(_karpathy(tmp_path, n_train=9), transform=train_transform(8), seed=1)

    def run(start, workers):
        sampler = ResumableSampler(len(ds), seed=5, rank=0, world_size=1)
        sampler.set_epoch(2, start)
        ds.set_epoch(2)
        dl = torch.utils.data.DataLoader(
            ds, batch_size=2, sampler=sampler, num_workers=workers, collate_fn=collate
        )
        return [(k, c, img) for b in dl for k, c, img in zip(b["key"], b["caption"], b["image"])]

    full = run(0, 0)
    tail = run(4, 2)
    assert [x[:2] for x in tail] == [x[:2] for x in full[4:]]
    assert all(torch.equal(a[2], b[2]) for a, b in zip(tail, full[4:]))


# -----------------------------------------------------------------------------
# transforms and DCA


def _dihedral8(x):
    return [torch.rot90(y, k, (-2, -1)) for y in (x, x.flip(-1)) for k in range(4)]


def test_dihedral_is_exact_permutation():
    x = torch.arange(3 * 6 * 6, dtype=torch.float32).reshape(3, 6, 6)
    seen = set()
    for seed in range(64):
        y = random_dihedral(x, torch.Generator().manual_seed(seed))
        match = [i for i, d in enumerate(_dihedral8(x)) if torch.equal(y, d)]
        assert len(match) == 1
        seen.add(match[0])
        y = random_dihedral(x, torch.Generator().manual_seed(seed), vflip=False, rot90=False)
        assert torch.equal(y, x) or torch.equal(y, x.flip(-1))
    assert seen == set(range(8))


def test_image_transform_shapes_and_crops():
    arr = _rgb(0, w=24, h=16)
    img = Image.fromarray(arr)
    full = pil_to_tensor(img)  # (3, 16, 24)
    windows = [full[:, :, i : i + 16] for i in range(9)]
    seen = set()
    for seed in range(30):
        crop = ImageTransform(16, hflip=False, vflip=False, rot90=False)
        y = crop(img, torch.Generator().manual_seed(seed))
        idx = [i for i, w in enumerate(windows) if torch.equal(y, w)]
        assert len(idx) == 1
        seen.add(idx[0])
    assert len(seen) > 3
    assert torch.equal(eval_transform(16)(img), windows[4])  # centered
    y = train_transform(8)(img, torch.Generator().manual_seed(0))
    assert y.shape == (3, 8, 8) and y.min() >= -1 and y.max() <= 1
    assert eval_transform(32)(Image.fromarray(_rgb(1, w=20, h=30))).shape == (3, 32, 32)  # upscales
    assert torch.equal(ImageTransform(None)(img), full)


# -----------------------------------------------------------------------------
# bad data: one case each


def _one(tmp_path, data, caption="a caption", name="x.png", counter=None, **kw):
    if data is not None:
        (tmp_path / name).write_bytes(data)
    (tmp_path / "m.jsonl").write_text(json.dumps({"file": name, "caption": caption}) + "\n")
    counter = counter or BadDataCounter(min_samples=10**9)
    return CaptionFolder(tmp_path / "m.jsonl", counter=counter, **kw)[0], counter


def test_bad_corrupt_image(tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        s, c = _one(tmp_path, b"\x89PNG not really an image" * 10)
    assert s is None and c.bad == 1 and "unreadable image" in c.examples[0][1]
    assert "x.png" in caplog.text


def test_bad_truncated_image(tmp_path):
    b = _png(_rgb(0, 64, 64))
    s, c = _one(tmp_path, b[: len(b) // 2])
    assert s is None and c.bad == 1 and "unreadable image" in c.examples[0][1]


def test_bad_missing_file(tmp_path):
    s, c = _one(tmp_path, None)
    assert s is None and c.bad == 1 and c.examples[0][1].startswith("missing file")


def test_grey_image_converted(tmp_path):
    g = np.random.default_rng(0).integers(0, 256, (16, 16), dtype=np.uint8)
    s, c = _one(tmp_path, _png(g, "L"))
    assert c.bad == 0 and c.converted == 1 and s["image"].shape == (3, 16, 16)
    ref = torch.from_numpy(g).float() / 127.5 - 1
    assert all(torch.equal(s["image"][i], ref) for i in range(3))


def test_rgba_and_palette_converted(tmp_path):
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., :3] = 200
    rgba[:4, ..., 3] = 255  # top half opaque, bottom transparent
    s, c = _one(tmp_path, _png(rgba, "RGBA"))
    assert c.converted == 1 and s["image"].shape == (3, 8, 8)
    assert torch.allclose(s["image"][:, :4], torch.tensor(200 / 127.5 - 1))
    assert torch.all(s["image"][:, 4:] == -1)  # transparent -> black
    pal = Image.fromarray(_rgb(3, 8, 8)).convert("P", palette=Image.ADAPTIVE, colors=16)
    buf = io.BytesIO()
    pal.save(buf, format="PNG")
    s, c = _one(tmp_path, buf.getvalue(), name="p.png")
    assert c.converted == 1 and torch.equal(s["image"], pil_to_tensor(pal.convert("RGB")))


def test_16bit_image_converted(tmp_path):
    a = np.array([[0, 257 * 100, 65535, 257 * 7]], dtype=np.uint16).repeat(4, 0)  # (4, 4)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG")
    assert Image.open(io.BytesIO(buf.getvalue())).mode.startswith("I")
    s, c = _one(tmp_path, buf.getvalue())
    assert c.converted == 1 and s["image"].shape == (3, 4, 4)
    assert torch.equal(s["image"][0, 0], torch.tensor([0, 100, 255, 7]) / 127.5 - 1)


def test_bad_empty_caption(tmp_path):
    s, c = _one(tmp_path, _png(_rgb(0)), caption="   ")
    assert s is None and c.bad == 1 and c.examples[0][1] == "empty caption"
    s, c = _one(tmp_path, _png(_rgb(0)), caption="", allow_empty_caption=True)
    assert s is not None and s["caption"] == "" and c.bad == 0


def test_min_size_filter(tmp_path):
    s, c = _one(tmp_path, _png(_rgb(0, 20, 16)), min_size=17)
    assert s == FILTERED and c.filtered == 1 and c.bad == 0


def test_bad_fraction_threshold_raises(tmp_path):
    counter = BadDataCounter(max_bad_fraction=0.2, min_samples=5)
    extra = [{"file": "gone.png", "caption": "lost"}]
    ds = CaptionFolder(_make_folder(tmp_path, 3, extra=extra), counter=counter)
    [ds[i] for i in range(4)]  # 1 bad in 4: below min_samples
    assert counter.bad == 1
    with pytest.raises(BadDataError, match=r"gone\.png: missing file"):
        ds[3]  # 2 bad of 5 = 40% > 20%
    ok = BadDataCounter(max_bad_fraction=0.5, min_samples=5)
    ds = CaptionFolder(tmp_path / "meta.jsonl", counter=ok)
    assert sum(ds[i] is None for i in range(4) for _ in range(2)) == 2 and ok.total == 8


def test_bad_shard_members(tmp_path):
    import tarfile

    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for name, data in [
            ("a.json", b'{"caption": "ok"}'),
            ("a.png", _png(_rgb(0))),
            ("b.json", b"{broken"),
            ("b.png", _png(_rgb(1))),
            ("c.json", b'{"caption": "no image"}'),
            ("d.json", b'{"caption": "bad jpeg"}'),
            ("d.jpg", b"garbage"),
        ]:
            ti = tarfile.TarInfo(name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    c = BadDataCounter(min_samples=10**9)
    got = list(ShardDataset(path, shuffle_buffer=0, counter=c))
    assert [s is not None for s in got] == [True, False, False, False] and c.bad == 3
    assert [k for k, _ in c.examples] == ["b", "c", "d"]


def test_build_sample_takes_fields_by_name():
    """build_sample copies every extra int / float field as it is (bools, text and the names
    of tensors are left out), fills level 0.0 and quality nan when missing, checks the
    caption."""
    c = BadDataCounter(min_samples=10**9)
    kw = dict(transform=None, generator=None, counter=c)
    fields = {
        "key": "k",
        "caption": " a field ",
        "cloud": 0.25,
        "lat": -33.9,
        "year": 2020,
        "flag": True,
        "sensor": "toy",
        "image": 1.0,
    }
    s = build_sample(fields, _png(_rgb(0, 8, 8)), **kw)
    assert s["caption"] == "a field" and s["key"] == "k"
    assert s["cloud"] == 0.25 and s["lat"] == -33.9 and s["year"] == 2020
    assert type(s["year"]) is int and s["level"] == 0.0 and math.isnan(s["quality"])
    assert "flag" not in s and "sensor" not in s and s["image"].shape == (3, 8, 8)
    assert fields["caption"] == " a field "  # the reader's dict is not changed
    s = build_sample(
        {"key": "k", "caption": "a", "level": 12, "quality": None},
        None,
        **kw,
        latent=torch.zeros(4, 2, 2),
    )
    assert s["level"] == 12.0 and math.isnan(s["quality"]) and s["latent"].shape == (4, 2, 2)
    assert build_sample({"key": "e", "caption": " "}, _png(_rgb(0)), **kw) is None
    assert build_sample({"key": "n"}, _png(_rgb(0)), **kw) is None
    assert [r for _, r in c.examples] == ["empty caption", "caption: not a string (NoneType)"]


def test_collate():
    def s(k, size):
        return {
            "image": torch.zeros(3, size, size),
            "caption": k,
            "level": 1.0,
            "quality": float("nan"),
            "key": k,
        }

    b = collate([s("a", 4), None, s("b", 4), FILTERED])
    assert b["image"].shape == (2, 3, 4, 4) and b["key"] == ["a", "b"]
    assert b["level"].tolist() == [1.0, 1.0]
    assert b["n_bad"] == 1 and b["n_filtered"] == 1  # counted apart: a filter is not bad data
    assert collate([None, FILTERED, None]) == {
        "caption": [],
        "key": [],
        "n_bad": 2,
        "n_filtered": 1,
    }
    with pytest.raises(ValueError, match="shapes differ"):
        collate([s("a", 4), s("b", 8)])
