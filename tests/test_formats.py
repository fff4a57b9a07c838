"""The input formats users already have, read as they are: Hugging Face imagefolder folders
(metadata.jsonl / metadata.csv, train/ and test/ split folders), Karpathy caption json
(Sydney-Captions) and NWPU-Captions' json, captions for paired folders, and train.py reading them."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

import train
from data.datasets import CaptionFolder, KarpathyCaptions, PairCaptions
from data.loader import Batches, build_dataset
from data.modalities import PairedFolder
from data.samples import collate

TINY = [
    "--config",
    "configs/tiny.py",
    "--image_size=16",
    "--batch_size=2",
    "--num_workers=0",
    "--allow_untrained",
]


def _image(path, seed, size=(20, 16), grey=False):
    """A random image file (its format from the suffix); returns its pixels."""
    w, h = size
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, (h, w) if grey else (h, w, 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)
    return arr


def _jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _imagefolder(folder, n=4, image="file_name", caption="text", extra=None):
    """n PNG images in `folder` and its metadata.jsonl, spelled (image, caption); row i's caption
    is f"scene {i}" and it holds extra(i)'s columns."""
    rows = []
    for i in range(n):
        _image(folder / f"im{i}.png", i)
        rows.append({image: f"im{i}.png", caption: f"scene {i}", **(extra(i) if extra else {})})
    return _jsonl(folder / "metadata.jsonl", rows)


# -----------------------------------------------------------------------------
# Hugging Face imagefolder


@pytest.mark.parametrize("image,caption", [("file_name", "text"), ("image", "caption")])
def test_imagefolder_both_spellings_folder_or_file(tmp_path, image, caption):
    metadata = _imagefolder(tmp_path, image=image, caption=caption)
    by_folder = CaptionFolder(tmp_path, transform=None)
    by_file = CaptionFolder(metadata, transform=None)
    for ds in (by_folder, by_file):
        assert ds.manifest == metadata and len(ds) == 4
        got = [ds[i] for i in range(4)]
        assert [s["caption"] for s in got] == [f"scene {i}" for i in range(4)]
        assert [s["key"] for s in got] == [f"im{i}.png" for i in range(4)]
        assert got[0]["level"] == 0.0 and math.isnan(got[0]["quality"])
        assert set(got[0]) == {"image", "caption", "key", "level", "quality"}
    pixels = np.array(Image.open(tmp_path / "im2.png"))
    want = torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1
    assert torch.equal(by_folder[2]["image"], want)


def test_imagefolder_condition_columns(tmp_path):
    """level, resolution_m or gsd_m give the level (level first); lat, lon and other numbers are
    sample fields; text columns are left out."""
    conditions = [
        {"level": 12.5, "gsd_m": 8.0},
        {"resolution_m": 0.5},
        {"gsd_m": 4.0, "lat": 48.85, "lon": 2.35},
        {"cloud": 0.25, "sensor": "toy"},
    ]
    _imagefolder(tmp_path, extra=lambda i: conditions[i])
    got = [CaptionFolder(tmp_path, transform=None)[i] for i in range(4)]
    assert [s["level"] for s in got] == [12.5, 18.0, 15.0, 0.0]
    assert (got[2]["lat"], got[2]["lon"]) == (48.85, 2.35) and "lat" not in got[1]
    assert got[3]["cloud"] == 0.25 and "sensor" not in got[3]
    assert all("gsd_m" not in s and "resolution_m" not in s for s in got)
    batch = collate(got)
    assert batch["lat"][2] == pytest.approx(48.85) and batch["lat"][:2].isnan().all()


def test_imagefolder_metadata_csv(tmp_path):
    for i in range(2):
        _image(tmp_path / f"im{i}.png", i)
    (tmp_path / "metadata.csv").write_text(
        "file_name,text,gsd_m\nim0.png,a farm,2\nim1.png,a port,\n"
    )
    ds = CaptionFolder(tmp_path, transform=None)
    assert [(ds[i]["caption"], ds[i]["level"]) for i in range(2)] == [
        ("a farm", 16.0),
        ("a port", 0.0),
    ]
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "im0.png", "text": "x"}])
    with pytest.raises(ValueError, match="holds both metadata.jsonl and metadata.csv"):
        CaptionFolder(tmp_path)


def test_imagefolder_split_folders(tmp_path):
    """A folder without metadata whose train/ (or the split asked for) holds one."""
    _imagefolder(tmp_path / "train", n=3)
    _imagefolder(tmp_path / "test", n=2)
    train_ds = CaptionFolder(tmp_path, transform=None)
    assert train_ds.manifest == tmp_path / "train" / "metadata.jsonl" and len(train_ds) == 3
    assert train_ds.image_root == tmp_path / "train" and train_ds[2]["caption"] == "scene 2"
    assert len(CaptionFolder(tmp_path, split="test")) == 2
    with pytest.raises(
        ValueError, match=r"split folder validation/\); split folders holding one here: test, train"
    ):
        CaptionFolder(tmp_path, split="validation")
    # metadata.jsonl at the root wins over the split folders (files listed as train/...)
    _jsonl(tmp_path / "metadata.jsonl", [{"file_name": "train/im1.png", "text": "root row"}])
    root = CaptionFolder(tmp_path, transform=None)
    assert (
        len(root) == 1
        and root[0]["caption"] == "root row"
        and root[0]["image"].shape == (3, 16, 20)
    )


def test_imagefolder_bad_lines_name_file_and_line(tmp_path):
    _imagefolder(tmp_path, n=2)
    metadata = tmp_path / "metadata.jsonl"
    good = metadata.read_text()
    metadata.write_text(
        good + "\n" + json.dumps({"file_name": "im0.png", "caption_": "typo"}) + "\n"
    )
    with pytest.raises(
        ValueError, match=r"metadata\.jsonl:4: row 3 lacks a column caption or text"
    ):
        CaptionFolder(tmp_path)
    metadata.write_text(json.dumps({"name": "im0.png", "text": "a"}) + "\n")
    with pytest.raises(
        ValueError, match=r"metadata\.jsonl:1: row 1 lacks a column file or file_name or image"
    ):
        CaptionFolder(tmp_path)
    metadata.write_text(good + json.dumps({"file_name": "gone.png", "text": "lost"}) + "\n")
    with pytest.raises(
        ValueError, match=r"metadata\.jsonl:3: file_name 'gone\.png': no such file .*gone\.png"
    ):
        CaptionFolder(tmp_path)
    metadata.write_text(good + json.dumps({"image": 7, "text": "a number"}) + "\n")
    with pytest.raises(
        ValueError, match=r"metadata\.jsonl:3: row 3: image must name an image file, got 7"
    ):
        CaptionFolder(tmp_path)
    metadata.write_text(good + "{not json\n")
    with pytest.raises(ValueError, match=r"metadata\.jsonl:3: not valid json"):
        CaptionFolder(tmp_path)
    (tmp_path / "m.csv").write_text("file_name,text\nim0.png,ok\nim1.png\n")  # a short row: no text
    assert CaptionFolder(tmp_path / "m.csv")[1] is None  # an empty caption is a bad sample
    (tmp_path / "m.csv").write_text("file_name,caption\nim0.png,ok\ngone.png,lost\n")
    with pytest.raises(ValueError, match=r"m\.csv:3: file_name 'gone\.png'"):
        CaptionFolder(tmp_path / "m.csv")


def test_own_manifest_keeps_its_behaviour(tmp_path):
    """Our `file` manifests: a missing image is a bad sample when read, not an index-time error."""
    _image(tmp_path / "a.png", 0)
    _jsonl(
        tmp_path / "m.jsonl",
        [{"file": "a.png", "caption": "here"}, {"file": "b.png", "caption": "gone"}],
    )
    ds = CaptionFolder(tmp_path / "m.jsonl", transform=None)
    assert len(ds) == 2 and ds[0]["caption"] == "here" and ds[1] is None and ds.counter.bad == 1


# -----------------------------------------------------------------------------
# caption json: Sydney-Captions (Karpathy's layout) and NWPU-Captions


def test_sydney_captions_json(tmp_path):
    """Sydney-Captions as shipped: dataset.json in Karpathy's layout, .tif images in imgs/."""
    images = []
    for i in range(3):
        _image(tmp_path / "imgs" / f"{i + 1}.tif", i)
        sentences = [
            {
                "tokens": ["a", "b"],
                "raw": f"sydney {i} sentence {s} .",
                "imgid": i,
                "sentid": 5 * i + s,
            }
            for s in range(5)
        ]
        images.append({"sentids": list(range(5 * i, 5 * i + 5)), "imgid": i, "sentences": sentences,
                       "split": ["train", "train", "test"][i], "filename": f"{i + 1}.tif"})  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps({"images": images, "dataset": "sydney"}))
    ds = KarpathyCaptions(tmp_path / "dataset.json", transform=None)
    assert ds.image_root == tmp_path / "imgs" and len(ds) == 2
    s = ds[1]
    assert (
        s["key"] == "2.tif"
        and s["caption"].startswith("sydney 1 sentence")
        and s["image"].shape == (3, 16, 20)
    )
    assert "imgid" not in s and "sentids" not in s
    assert len(KarpathyCaptions(tmp_path / "dataset.json", split="test", all_captions=True)) == 5


def _nwpu(tmp, classes=("airplane", "harbor"), n=3):
    """dataset_nwpu.json as NWPU-Captions ships it, {class: [entries]}, and the images in
    NWPU_images/<class>/."""
    meta, imgid = {}, 0
    for c in classes:
        meta[c] = []
        for i in range(n):
            name = f"{c}_{i + 1:03d}.jpg"
            _image(tmp / "NWPU_images" / c / name, imgid)
            entry = {"filename": name, "imgid": imgid, "split": ["train", "val", "test"][i % 3]}
            for k in range(5):
                key = "raw" if k == 0 else f"raw_{k}"
                entry[key] = f"{c} {i} caption {k}"
                entry["sentids" if k == 0 else f"sentids_{k}"] = 5 * imgid + k
            meta[c].append(entry)
            imgid += 1
    path = tmp / "dataset_nwpu.json"
    path.write_text(json.dumps(meta))
    return path, meta


def test_nwpu_captions_json(tmp_path):
    path, meta = _nwpu(tmp_path)
    ds = KarpathyCaptions(path, transform=None, gsd_m=2.0)
    assert ds.image_root == tmp_path / "NWPU_images" and len(ds) == 2  # one train image per class
    assert [e[1] for e in ds.entries] == [tmp_path / "NWPU_images" / "airplane" / "airplane_001.jpg",
                                          tmp_path / "NWPU_images" / "harbor" / "harbor_001.jpg"]  # fmt: skip
    assert ds.entries[0][2] == [f"airplane 0 caption {k}" for k in range(5)]  # raw, raw_1 .. raw_4
    s = ds[1]
    assert s["caption"].startswith("harbor 0 caption") and s["level"] == 16.0
    assert s["image"].shape == (3, 16, 20) and ds.counter.bad == 0
    assert set(s) == {"image", "caption", "key", "level", "quality"}  # ids are not fields
    every = KarpathyCaptions(path, split=None, all_captions=True)
    assert len(every) == 30 and every[29]["caption"] == "harbor 2 caption 4"


def test_caption_json_in_neither_layout_names_the_key(tmp_path):
    path, meta = _nwpu(tmp_path, classes=("airplane",), n=1)
    bad = tmp_path / "bad.json"
    for content, message in [
        (
            {**meta, "version": "1.0"},
            r"bad\.json: neither Karpathy's caption json .* key 'version' holds a str",
        ),
        (
            {"airplane": [{"filename": "a.jpg", "split": "train"}]},
            r"bad\.json: airplane\[0\] lacks 'filename' or 'raw'",
        ),
        (
            {"airplane": [{**meta["airplane"][0], "raw_2": None}]},
            r"bad\.json: airplane\[0\]\['raw_2'\] is a NoneType",
        ),
        ({"images": {"a": 1}}, r"bad\.json: key 'images' must hold a list"),
        (
            {"images": [{"filename": "a.jpg"}]},
            r"bad\.json: images\[0\] lacks 'filename' or 'sentences'",
        ),
        ([1, 2], r"bad\.json: expected Karpathy's caption json .* got a list"),
    ]:
        bad.write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message):
            KarpathyCaptions(bad)


# -----------------------------------------------------------------------------
# paired folders with captions


def _pairs(tmp, n=3):
    """sar/s1_<i>.png (grey) and opt/s2_<i>.png, 20x16."""
    for i in range(n):
        _image(tmp / "sar" / f"s1_{i}.png", i, grey=True)
        _image(tmp / "opt" / f"s2_{i}.png", 10 + i)
    return PairedFolder(tmp / "sar", tmp / "opt", replace=(("s1_", "s2_"),), level=13.0)


def test_paired_folder_takes_captions_from_a_manifest(tmp_path):
    pairs = _pairs(tmp_path)
    assert [pairs[i]["caption"] for i in range(3)] == ["", "", ""]  # no manifest: as before
    # HF metadata beside the targets, one row with its own resolution and place
    rows = [{"file_name": f"s2_{i}.png", "text": f" optical {i} "} for i in range(3)]
    rows[1].update(gsd_m=0.5, lat=10.0, lon=20.0)
    _jsonl(tmp_path / "opt" / "metadata.jsonl", rows)
    ds = PairCaptions(pairs, tmp_path / "opt")
    got = [ds[i] for i in range(3)]
    assert [s["caption"] for s in got] == ["optical 0", "optical 1", "optical 2"]
    assert [s["level"] for s in got] == [13.0, 18.0, 13.0]  # the row's level, else the dataset's
    assert (got[1]["lat"], got[1]["lon"]) == (10.0, 20.0) and "lat" not in got[0]
    assert [s["key"] for s in got] == ["s1_0.png", "s1_1.png", "s1_2.png"]
    assert torch.equal(got[2]["image"], pairs[2]["image"])
    assert torch.equal(got[2]["control"], pairs[2]["control"])
    assert collate(got)["control"].shape == (3, 3, 16, 20)
    # our manifest at the common root, naming the control images
    _jsonl(
        tmp_path / "captions.jsonl",
        [{"file": f"sar/s1_{i}.png", "caption": f"sar {i}"} for i in range(3)],
    )
    assert PairCaptions(pairs, tmp_path / "captions.jsonl")[1]["caption"] == "sar 1"


def test_paired_folder_caption_errors(tmp_path):
    pairs = _pairs(tmp_path)
    manifest = tmp_path / "opt" / "metadata.jsonl"
    _jsonl(manifest, [{"file_name": f"s2_{i}.png", "text": f"o {i}"} for i in range(2)])
    with pytest.raises(
        ValueError, match=r"1 of 3 pairs have no row .* e\.g\. s1_2\.png \(target .*s2_2\.png\)"
    ):
        PairCaptions(pairs, manifest)
    _jsonl(manifest, [{"file_name": f"s2_{i}.png", "text": f"o {i}"} for i in (0, 1, 2, 1)])
    with pytest.raises(
        ValueError, match=r"metadata\.jsonl:4: 's2_1\.png' is listed again \(first on line 2\)"
    ):
        PairCaptions(pairs, manifest)
    _jsonl(manifest, [{"file_name": f"s2_{i}.png", "text": ["o", " ", "o"][i]} for i in range(3)])
    with pytest.raises(ValueError, match=r"metadata\.jsonl:2: 's2_1\.png' has no caption"):
        PairCaptions(pairs, manifest)


# -----------------------------------------------------------------------------
# train.py


def test_train_reads_an_imagefolder_folder(tmp_path):
    """--data=folder --data_path=FOLDER (no metadata there, a train/ split folder): train.py's
    config builds batches of its captions; a paired run takes --pair_captions."""
    _imagefolder(tmp_path / "hf" / "train", n=4, extra=lambda i: {"gsd_m": 2.0})
    cfg = train.parse_config(TINY + ["--data=folder", f"--data_path={tmp_path / 'hf'}"])
    batch = next(Batches(cfg, rank=0, world=1))
    assert batch["image"].shape == (2, 3, 16, 16) and batch["level"].tolist() == [16.0, 16.0]
    assert set(batch["caption"]) <= {f"scene {i}" for i in range(4)} and batch["n_bad"] == 0

    _pairs(tmp_path)
    _jsonl(
        tmp_path / "opt" / "metadata.jsonl",
        [{"file_name": f"s2_{i}.png", "text": f"o {i}"} for i in range(3)],
    )
    paired = TINY + ["--data=paired", f"--data_path={tmp_path / 'opt'}", f"--control_path={tmp_path / 'sar'}",
                     "--pair_replace=('s1_', 's2_')", "--objective=control", "--control_task=sar2rgb",
                     "--train=controlnet"]  # fmt: skip
    with_captions = train.parse_config(paired + [f"--pair_captions={tmp_path / 'opt'}"])
    batch = next(Batches(with_captions, rank=0, world=1))
    assert set(batch["caption"]) <= {"o 0", "o 1", "o 2"}
    assert batch["control"].shape == (2, 3, 16, 16)
    no_captions = build_dataset(train.parse_config(paired))  # none given: as before
    assert isinstance(no_captions, PairedFolder) and no_captions[0]["caption"] == ""
    folder = train.parse_config(TINY + ["--data=folder", f"--data_path={tmp_path / 'hf'}",
                                        f"--pair_captions={tmp_path / 'opt'}"])  # fmt: skip
    with pytest.raises(ValueError, match="--pair_captions captions --data=paired's pairs"):
        build_dataset(folder)


def test_train_runs_on_an_imagefolder(tmp_path):
    """One optimiser step of train.py on an imagefolder folder, start to checkpoint."""
    _imagefolder(tmp_path / "hf", n=2)
    cfg = train.parse_config(TINY + ["--data=folder", f"--data_path={tmp_path / 'hf'}",
                                     f"--out_dir={tmp_path / 'run'}", "--max_steps=1", "--log_every=1"])  # fmt: skip
    train.train(cfg)
    assert (tmp_path / "run" / "model.safetensors").is_file()
