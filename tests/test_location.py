"""Location conditioning: the place embedding on the sphere, the "no place" null, the model that gains it
equal to its source, the readers (Git-10M's Google_location tiles, manifests, shards, the spatial split) and
the scripts' --lat / --lon / --location-cfg."""

import io
import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from data.datasets import CaptionFolder, Git10M, KarpathyCaptions, google_place
from data.places import held_out_regions, in_split, random_place, region
from data.samples import collate
from data.shards import ShardDataset, write_shards
from model import conditions
from model.config import ModelConfig, load_config, location_condition
from model.pipeline import generate
from model.text2earth import Text2Earth
from model.unet import PlaceEmbedding
from model.weights import load_weights, save_model


def located_config():
    """configs/tiny.py plus a location condition."""
    cfg = load_config("configs/tiny.py").model
    cfg.unet.place_conditions = ("location",)
    cfg.conditions["location"] = location_condition()
    return cfg


# ----------------------------------------------------------------------------------------------
# the embedding and the condition


def test_place_embedding_wraps_longitude_and_is_one_point_at_a_pole():
    torch.manual_seed(0)
    e = PlaceEmbedding(64)
    torch.nn.init.normal_(e.fc2.weight)
    nan = float("nan")
    places = torch.tensor(
        [[10.0, 179.999], [10.0, -179.999], [10.0, 180.0], [10.0, -180.0], [90.0, 0.0], [90.0, 123.0],
         [-90.0, -45.0], [-90.0, 170.0], [nan, nan], [0.0, 0.0], [0.0, 20.0]]
    )  # fmt: skip
    out = e(places)
    scale = out[9].abs().max().item()
    assert (out[0] - out[1]).abs().max() < 0.01 * scale  # across the antimeridian: neighbours
    assert torch.allclose(out[2], out[3], atol=1e-5 * scale)  # the same meridian
    assert torch.allclose(out[4], out[5], atol=1e-5 * scale)  # the north pole, any longitude
    assert torch.allclose(out[6], out[7], atol=1e-5 * scale)
    assert torch.equal(out[8], torch.zeros(64))  # no place: exactly nothing
    assert (out[9] - out[10]).abs().max() > 0.05 * scale  # (0, 0) is a place, unlike the null
    # a NaN row contributes no NaN to the gradient
    places.requires_grad_(False)
    e(places).sum().backward()
    assert all(p.grad.isfinite().all() for p in e.parameters())


def test_the_location_condition_round_trips_and_checks_its_range():
    cfg = located_config()
    again = ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    loc = again.conditions["location"]
    assert loc.field_names() == ("lat", "lon") and math.isnan(loc.null)
    assert loc.bounds == ((-90.0, 90.0), (-180.0, 180.0))
    assert again.condition_names() == ("text", "level", "location")
    raw = conditions.request(cfg, 3, text="a", location=[(31.2, 121.5), None, (0.0, 0.0)])
    assert raw["location"].shape == (3, 2) and raw["location"][1].isnan().all()
    assert torch.equal(raw["location"][2], torch.zeros(2))  # (0, 0) is a place, not the null
    one = conditions.request(cfg, 2, location=(31.2, 121.5))["location"]
    assert torch.equal(one, torch.tensor([[31.2, 121.5]] * 2))
    assert conditions.request(cfg, 2)["location"].isnan().all()  # not given: the null
    with pytest.raises(ValueError, match="location: lat 95 is outside"):
        conditions.request(cfg, 1, location=(95.0, 0.0))
    with pytest.raises(ValueError, match="expected 2 numbers"):
        conditions.request(cfg, 2, location=[(1.0, 2.0, 3.0), None])


def test_dca_drops_the_location_on_its_own():
    cfg = located_config()
    for name, p in (("text", 0.1), ("level", 0.3), ("location", 0.5)):
        cfg.conditions[name].p_drop = p
    B = 20000
    raw = {
        "text": [f"c{i}" for i in range(B)],
        "level": torch.full((B,), 17.0),
        "location": torch.tensor([[31.2, 121.5]]).expand(B, 2),
    }
    out = conditions.drop(cfg, raw, torch.Generator().manual_seed(0), torch.arange(B), B)
    text = torch.tensor([t == "" for t in out["text"]])
    level = out["level"] == 0
    place = out["location"].isnan().all(dim=1)
    assert not (out["location"].isnan().any(dim=1) & ~place).any()  # both fields or neither
    assert abs(place.float().mean() - 0.5) < 0.02
    assert abs((text & place).float().mean() - 0.05) < 0.01  # independent of the text
    assert abs((level & place).float().mean() - 0.15) < 0.015  # and of the level


def test_from_batch_reads_lat_lon_and_gives_the_null_to_samples_without():
    cfg = located_config()
    samples = [
        {"caption": "a", "key": "0", "level": 17.0, "quality": 0.0, "lat": 31.2, "lon": 121.5},
        {"caption": "b", "key": "1", "level": 17.0, "quality": 0.0},  # no place
        {"caption": "c", "key": "2", "level": 17.0, "quality": 0.0, "lat": 95.0, "lon": 3.0},
        {"caption": "d", "key": "3", "level": 17.0, "quality": 0.0, "lat": 0.0, "lon": 0.0},
    ]
    batch = collate(samples)
    raw = conditions.from_batch(cfg, batch)
    loc = raw["location"]
    assert torch.equal(loc[0], torch.tensor([31.2, 121.5]))
    assert loc[1].isnan().all() and loc[2].isnan().all()  # none; outside the range
    assert torch.equal(loc[3], torch.zeros(2))


# ----------------------------------------------------------------------------------------------
# a model that gains the location equals its source


def test_a_release_plus_the_location_predicts_what_it_did(tiny_release, tmp_path):
    """A release-shaped folder (text + level) loaded into a config that adds the location: at step 0 the
    U-Net predicts exactly what the source predicts, at every place and at none."""
    import train

    folder, _ = tiny_release
    source = load_weights(folder).eval()
    cfg = ModelConfig.from_dict(source.cfg.to_dict())
    cfg.unet.place_conditions = ("location",)
    cfg.conditions["location"] = location_condition()
    run_cfg = train.parse_config(
        ["--config", "configs/tiny.py", "--image_size=32", f"--out_dir={tmp_path}"]
        + [f"--init_from={folder}", "--num_workers=0"]
    )
    run_cfg.model = cfg
    ours = train.setup(run_cfg)["model"].eval()
    fc2 = ours.unet.cond_embed["location"].fc2
    assert fc2.weight.abs().max() == 0 and fc2.bias.abs().max() == 0
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 77, 64, generator=g)
    t, level = torch.tensor([10, 700]), torch.tensor([17.0, 0.0])
    with torch.no_grad():
        plain = source.unet(x, t, {"text": ctx, "level": level})
        for place in ([[31.2, 121.5], [-33.9, 151.2]], [[float("nan")] * 2] * 2):
            out = ours.unet(x, t, {"text": ctx, "level": level, "location": torch.tensor(place)})
            assert torch.equal(out, plain), place


def test_the_null_location_samples_what_the_model_without_it_samples(tmp_path):
    """After training moved the location embedder (here: random weights), "no location" still gives the
    location-less model's samples bit for bit, guided or not; a place changes them."""
    torch.manual_seed(0)
    ours = Text2Earth(located_config()).eval()
    torch.nn.init.normal_(ours.unet.cond_embed["location"].fc2.weight, std=0.5)
    plain_cfg = load_config("configs/tiny.py").model
    plain = Text2Earth(plain_cfg).eval()
    missing, unexpected = plain.load_state_dict(ours.state_dict(), strict=False)
    assert not missing and all(k.startswith("unet.cond_embed.location.") for k in unexpected)
    kw = dict(seeds=[3, 4], steps=3, size=(32, 32))
    scales = {"text": 3.0, "level": 3.0}
    a = generate(
        plain, conditions.request(plain_cfg, 2, text="a farm", level=15), guidance=scales, **kw
    )
    b = generate(
        ours,
        conditions.request(ours.cfg, 2, text="a farm", level=15),
        guidance={**scales, "location": 5.0},
        **kw,
    )
    assert torch.equal(a, b)
    c = generate(
        ours,
        conditions.request(ours.cfg, 2, text="a farm", level=15, location=(31.2, 121.5)),
        guidance={**scales, "location": 5.0},
        **kw,
    )
    assert not torch.equal(a, c)


# ----------------------------------------------------------------------------------------------
# readers

# Four landmarks, their zoom-17 Web-Mercator tiles worked out by hand with the forward formulas
# x = floor((lon + 180) / 360 * 2^17), y = floor((1 - ln(tan(lat) + sec(lat)) / pi) / 2 * 2^17)
LANDMARKS = {
    "eiffel_tower": (48.85837, 2.294481, "17_66371_45091"),
    "sydney_opera_house": (-33.856784, 151.215297, "17_120591_78650"),
    "statue_of_liberty": (40.689247, -74.044502, "17_38577_49291"),
    "christ_the_redeemer": (-22.951916, -43.210487, "17_49803_74125"),
}


def _tile_of(lat, lon, z=17):
    n = 2**z
    r = math.radians(lat)
    return int((lon + 180) / 360 * n), int(
        (1 - math.log(math.tan(r) + 1 / math.cos(r)) / math.pi) / 2 * n
    )


def _png(seed):
    buf = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 255, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _git10m_with_places(root, layout):
    """A Git-10M-layout Arrow folder, one row per landmark and one without a location."""
    import pyarrow as pa

    (root / "train").mkdir(parents=True)
    (root / "dataset_dict.json").write_text(json.dumps({"splits": ["train"]}))
    image_t = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    rows = [(name, loc) for name, (_, _, loc) in LANDMARKS.items()] + [("nowhere", None)]
    if layout == "caption":
        schema = pa.schema(
            [("image", image_t), ("img_name", pa.string()), ("img_quality_score", pa.float64()),
             ("caption", pa.string()), ("caption_length", pa.int64()), ("resolution", pa.float64()),
             ("Google_location", pa.string())]
        )  # fmt: skip
        cols = {
            "image": [{"bytes": _png(i), "path": None} for i in range(len(rows))],
            "img_name": [name for name, _ in rows],
            "img_quality_score": [5.0] * len(rows),
            "caption": [f"a view of the {name}" for name, _ in rows],
            "caption_length": [5] * len(rows),
            "resolution": [None] * len(rows),
            "Google_location": [loc for _, loc in rows],
        }
    else:
        schema = pa.schema(
            [("image", image_t), ("text", pa.string()), ("Google_location", pa.string())]
        )
        cols = {
            "image": [{"bytes": _png(i), "path": None} for i in range(len(rows))],
            "text": [f"17_GOOGLE_LEVEL_a view of the {name}" for name, _ in rows],
            "Google_location": [loc for _, loc in rows],
        }
    with pa.OSFile(str(root / "train" / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, schema) as w:
            w.write_batch(pa.record_batch([pa.array(cols[n], type=schema.field(n).type) for n in schema.names],
                                          schema=schema))  # fmt: skip
    state = {"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": "train"}
    (root / "train" / "state.json").write_text(json.dumps(state))
    return root


@pytest.mark.parametrize("layout", ["caption", "text"])
def test_git10m_google_location_is_the_tile_centre(tmp_path, layout):
    for lat, lon, loc in LANDMARKS.values():
        assert loc == "17_{}_{}".format(*_tile_of(lat, lon))
    ds = Git10M(_git10m_with_places(tmp_path / "git10m", layout))
    assert len(ds) == len(LANDMARKS) + 1
    half_tile = 360 / 2**17 / 2  # degrees of longitude; latitude spans less
    for i, (lat, lon, _) in enumerate(LANDMARKS.values()):
        s = ds[i]
        assert s["level"] == 17.0
        assert abs(s["lon"] - lon) <= half_tile and abs(s["lat"] - lat) <= half_tile, s
    assert "lat" not in ds[len(LANDMARKS)]  # no location: no place (the null when batched)
    # the centre, exactly: the tile's west edge plus half a tile
    assert google_place("17_66371_45091")["lon"] == pytest.approx(
        (66371.5) / 2**17 * 360 - 180, abs=1e-9
    )
    batch = collate([ds[i] for i in range(len(ds))])
    raw = conditions.from_batch(located_config(), batch)
    assert raw["location"][:4].isfinite().all() and raw["location"][4].isnan().all()


def test_the_spatial_split_keeps_whole_regions_out(tmp_path):
    held = held_out_regions()
    assert len(held) == 9  # 1/8 of the 72 cells of 30 degrees
    rng = np.random.default_rng(0)
    for _ in range(200):
        lat, lon = random_place(rng, "held_out")
        assert region(lat, lon) in held and in_split(lat, lon, "held_out")
        assert not in_split(lat, lon, "train")
    assert in_split(float("nan"), float("nan"), "train") and not in_split(None, None, "held_out")
    # readers: a manifest with lat / lon columns, read on either side; shards keep the place
    (tmp_path / "data").mkdir()
    rows = []
    for i in range(40):
        lat, lon = random_place(rng)
        (tmp_path / "data" / f"{i}.png").write_bytes(_png(i))
        rows.append({"file": f"{i}.png", "caption": f"scene {i}", "lat": lat, "lon": lon})
    rows.append({"file": "0.png", "caption": "no place"})
    manifest = tmp_path / "data" / "m.jsonl"
    manifest.write_text("\n".join(json.dumps(r) for r in rows))
    train_rows = CaptionFolder(manifest, places="train")
    held_rows = CaptionFolder(manifest, places="held_out")
    assert len(train_rows) + len(held_rows) == len(rows) and len(held_rows) > 0
    assert all(not in_split(s["lat"], s["lon"], "train") for s in held_rows)
    assert sum("lat" not in train_rows[i] for i in range(len(train_rows))) == 1
    with pytest.raises(ValueError, match="spatial split 'nowhere'"):
        CaptionFolder(manifest, places="nowhere")
    write_shards(CaptionFolder(manifest), tmp_path / "shards", 16)
    read = list(ShardDataset(tmp_path / "shards", shuffle_buffer=0, places="held_out"))
    kept = [s for s in read if isinstance(s, dict)]
    assert sorted(s["key"] for s in kept) == sorted(
        held_rows[i]["key"] for i in range(len(held_rows))
    )
    assert all(s["lat"] == rows[int(s["key"].split(".")[0])]["lat"] for s in kept)


def test_karpathy_images_carry_their_place(tmp_path):
    (tmp_path / "images").mkdir()
    images = []
    for i, (lat, lon, _) in enumerate(LANDMARKS.values()):
        (tmp_path / "images" / f"{i}.png").write_bytes(_png(i))
        images.append({"filename": f"{i}.png", "split": "train", "sentences": [{"raw": f"s {i}"}],
                       "lat": lat, "lon": lon})  # fmt: skip
    (tmp_path / "d.json").write_text(json.dumps({"images": images}))
    ds = KarpathyCaptions(tmp_path / "d.json")
    assert [(ds[i]["lat"], ds[i]["lon"]) for i in range(len(ds))] == [
        (a, b) for a, b, _ in LANDMARKS.values()
    ]


# ----------------------------------------------------------------------------------------------
# the scripts


@pytest.fixture(scope="module")
def located_weights(tmp_path_factory):
    torch.manual_seed(0)
    model = Text2Earth(located_config())
    torch.nn.init.normal_(model.unet.cond_embed["location"].fc2.weight, std=0.5)
    path = tmp_path_factory.mktemp("located") / "model.safetensors"
    save_model(model, path)
    return path


def test_sample_reads_lat_lon_and_records_them(located_weights, tmp_path, capsys):
    import sample

    common = [
        "--weights",
        str(located_weights),
        "--steps",
        "2",
        "--size",
        "32",
        "32",
        "--prompt",
        "a farm",
    ]
    assert (
        sample.main(
            [
                *common,
                "--lat",
                "31.2",
                "--lon",
                "121.5",
                "--location-cfg",
                "2",
                "--out",
                str(tmp_path / "a"),
            ]
        )
        == 0
    )
    assert sample.main([*common, "--out", str(tmp_path / "b")]) == 0
    a, b = (Image.open(next((tmp_path / d).glob("000_*.png"))) for d in "ab")
    assert (a.text["lat"], a.text["lon"], a.text["location_cfg"]) == ("31.2", "121.5", "2.0")
    assert (b.text["lat"], b.text["lon"]) == ("none", "none")
    assert not np.array_equal(np.asarray(a), np.asarray(b))
    for bad, message in (
        (["--lat", "31.2"], "the location needs --lat and --lon together"),
        (["--lat", "95", "--lon", "0"], "location: lat 95 is outside"),
        (["--lat", "1", "--lon", "0", "--location-cfg", "-1"], "--location-cfg must be >= 0"),
    ):
        with pytest.raises(SystemExit) as e:
            sample.main([*common, *bad, "--out", str(tmp_path / "c")])
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_model_without_location_has_no_lat_flag(tiny_ckpt, tmp_path, capsys):
    import sample

    with pytest.raises(SystemExit) as e:
        sample.main(
            [
                "--weights",
                str(tiny_ckpt),
                "--prompt",
                "a",
                "--lat",
                "1",
                "--lon",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
    assert e.value.code == 2 and "unrecognized arguments: --lat" in capsys.readouterr().err


def test_edit_and_evaluate_at_a_place(located_weights, tmp_path):
    import edit
    import evaluate

    (tmp_path / "images").mkdir()
    images = []
    for i, (lat, lon, _) in enumerate(list(LANDMARKS.values())[:2]):
        Image.fromarray(
            np.random.default_rng(i).integers(0, 255, (32, 32, 3), dtype=np.uint8)
        ).save(tmp_path / "images" / f"{i}.png")
        images.append({"filename": f"{i}.png", "split": "test", "sentences": [{"raw": f"scene {i}"}],
                       "lat": lat, "lon": lon})  # fmt: skip
    (tmp_path / "test.json").write_text(json.dumps({"images": images, "gsd_m": 1.0}))
    common = ["--weights", str(located_weights), "--steps", "2", "--seed", "3"]
    assert edit.main(["img2img", "--image", str(tmp_path / "images" / "0.png"), "--strength", "0.5",
                      "--prompt", "a farm", "--lat", "-33.9", "--lon", "151.2", "--out", str(tmp_path / "e"),
                      *common]) == 0  # fmt: skip
    assert Image.open(tmp_path / "e" / "0_img2img_seed3.png").text["lat"] == "-33.9"
    assert evaluate.main(["--test", str(tmp_path / "test.json"), "--n", "1", "--size", "32", "32",
                          "--out", str(tmp_path / "eval"), *common]) == 0  # fmt: skip
    for i, (lat, lon, _) in enumerate(list(LANDMARKS.values())[:2]):
        png = Image.open(tmp_path / "eval" / "generated" / f"{i}_0.png")
        assert (float(png.text["lat"]), float(png.text["lon"])) == pytest.approx(
            (lat, lon), abs=1e-4
        )


def test_evaluate_on_held_out_places_of_the_procedural_globe(located_weights, tmp_path):
    import evaluate

    out = tmp_path / "eval"
    assert evaluate.main(["--test", "procedural-globe:3", "--places", "held_out", "--n", "1", "--size", "32", "32",
                          "--weights", str(located_weights), "--steps", "1", "--out", str(out)]) == 0  # fmt: skip
    made = sorted((out / "generated").glob("*.png"))
    assert len(made) == 3
    for png in made:
        lat, lon = float(Image.open(png).text["lat"]), float(Image.open(png).text["lon"])
        assert region(lat, lon) in held_out_regions()
    assert json.loads((out / "generated" / "generation.json").read_text())["places"] == "held_out"
