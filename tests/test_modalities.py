"""Paired training data (data/modalities.py): derived controls, ControlPairs, PairedFolder, the procedural
Earth's paired views, build_dataset with a control task, collate of controls."""

import json
import types
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.loader import build_dataset
from data.modalities import (
    BAND_WEIGHTS,
    DERIVED,
    TASKS,
    ControlPairs,
    PairedFolder,
    add_clouds,
    add_haze,
    low_resolution,
    make_control,
    pan_weights,
    to_pan,
)
from data.samples import BadDataCounter, collate
from data.synthetic import ProceduralEarth
from data.transforms import train_transform


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _image(seed=0, size=32):
    """(3, size, size) in [-1, 1]: a smooth gradient + noise, so both low and high frequencies are present."""
    g = _gen(seed)
    ramp = torch.linspace(-0.6, 0.6, size)
    noise = 0.3 * torch.randn(3, size, size, generator=g)
    return (ramp[None, :, None] + ramp[None, None, :] * 0.5 + noise).clamp(-1, 1)


def _laplacian_energy(x):
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).expand(3, 1, 3, 3)
    return (
        F.conv2d(x[None], k, groups=3)[0, :, 4:-4, 4:-4].pow(2).mean()
    )  # interior only (no edge effects)


# -----------------------------------------------------------------------------
# derived controls


def test_to_pan_grey_and_weights():
    x = _image(1)
    p = to_pan(x)
    assert p.shape == x.shape and p.min() >= -1 and p.max() <= 1
    assert torch.equal(p[0], p[1]) and torch.equal(p[1], p[2])
    w = torch.tensor(BAND_WEIGHTS["luma"])
    assert torch.allclose(p[0], (x * w[:, None, None]).sum(0), atol=1e-6)
    assert torch.allclose(to_pan(x, "mean")[0], x.mean(0), atol=1e-6)
    assert torch.allclose(to_pan(x, (1.0, 0.0, 0.0))[0], x[0])
    assert torch.equal(to_pan(x, jitter=0.3), p)  # no generator: no jitter
    jw = pan_weights("luma", _gen(5), jitter=0.3)
    assert jw.sum().item() == pytest.approx(1.0) and not torch.allclose(jw, w)
    assert torch.allclose(
        to_pan(x, generator=_gen(5), jitter=0.3)[0], (x * jw[:, None, None]).sum(0), atol=1e-6
    )
    assert not torch.equal(
        to_pan(x, generator=_gen(6), jitter=0.3), to_pan(x, generator=_gen(5), jitter=0.3)
    )
    assert to_pan(torch.stack([x, x])).shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match="luma"):
        to_pan(x, "worldview")
    with pytest.raises(ValueError, match=r"\(4, 32, 32\)"):
        to_pan(torch.zeros(4, 32, 32))


def test_low_resolution():
    x = _image(2)
    y = low_resolution(x, 4)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    assert _laplacian_energy(y) < 0.02 * _laplacian_energy(x)  # high frequencies gone
    assert abs(y.mean() - x.mean()) < 0.02  # mean kept
    a, b = (
        low_resolution(x, 4, _gen(0), noise_std=0.05),
        low_resolution(x, 4, _gen(0), noise_std=0.05),
    )
    assert torch.equal(a, b) and not torch.equal(a, low_resolution(x, 4, _gen(1), noise_std=0.05))
    assert torch.equal(low_resolution(torch.stack([x, x]), 2)[1], low_resolution(x, 2))
    with pytest.raises(ValueError, match=r"\(3, 30, 30\).*factor 4"):
        low_resolution(torch.zeros(3, 30, 30), 4)


def test_haze_scattering_model():
    x = _image(3)
    hazy, t, A = add_haze(x, _gen(0))
    assert hazy.shape == x.shape and t.shape == (32, 32) and A.shape == (3,)
    J = (x + 1) / 2
    assert torch.allclose(
        (hazy + 1) / 2, J * t + A[:, None, None] * (1 - t), atol=1e-6
    )  # I = J t + A (1 - t)
    assert hazy.min() >= -1 and hazy.max() <= 1
    assert t.min() >= 0.05 and t.max() <= 1.0 and 0.2 < t.mean() < 0.9
    assert 0.75 * 0.92 <= A.min() and A.max() <= 1.0 and A[2] >= A[0]  # near white, slightly bluish
    assert t.std() > 0.01
    # smooth: neighbours differ by a fraction of the spread (white noise: 1.13 std)
    assert (t[:, 1:] - t[:, :-1]).abs().mean() < 0.3 * t.std() and (
        t[1:] - t[:-1]
    ).abs().mean() < 0.3 * t.std()
    again = add_haze(x, _gen(0))
    assert all(torch.equal(u, v) for u, v in zip(again, (hazy, t, A)))
    assert not torch.equal(add_haze(x, _gen(1))[0], hazy)
    hb, tb, Ab = add_haze(torch.stack([x, x]), _gen(0))
    assert hb.shape == (2, 3, 32, 32) and tb.shape == (2, 32, 32) and Ab.shape == (2, 3)
    with pytest.raises(ValueError, match="Generator"):
        add_haze(x, None)


def test_clouds():
    x = _image(4, 64)
    for seed in range(4):
        cloudy, mask = add_clouds(x, _gen(seed))
        assert cloudy.shape == x.shape and mask.shape == (64, 64) and mask.dtype == torch.bool
        assert 0.2 - 0.01 <= mask.float().mean() <= 0.6 + 0.01
        assert cloudy.min() >= -1 and cloudy.max() <= 1
        assert cloudy[:, mask].mean() > x[:, mask].mean() + 0.2  # clouds are bright
        clear = (cloudy == x).all(0)  # alpha = 0: ground untouched
        assert not (clear & mask).any() and clear[~mask].float().mean() > 0.3
    assert torch.equal(add_clouds(x, _gen(0))[0], add_clouds(x, _gen(0))[0])
    assert not torch.equal(add_clouds(x, _gen(0))[0], add_clouds(x, _gen(1))[0])


def test_make_control():
    x = _image(5)
    for task, (control, _) in TASKS.items():
        if control in DERIVED:
            c = make_control(task, x, _gen(0))
            assert c.shape == x.shape and c.min() >= -1 and c.max() <= 1
            assert torch.equal(c, make_control(task, x, _gen(0)))
    assert torch.equal(make_control("dehaze", x, _gen(3)), add_haze(x, _gen(3))[0])
    with pytest.raises(ValueError, match="pan2rgb.*sr"):
        make_control("colorize", x, _gen(0))
    with pytest.raises(ValueError, match="paired"):
        make_control("sar2rgb", x, _gen(0))


# -----------------------------------------------------------------------------
# datasets


class _Reader(torch.utils.data.Dataset):
    """A stand-in reader: item i's image is fixed per index; index 3 is a skipped sample."""

    def __init__(self):
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return 6

    def __getitem__(self, i):
        if i == 3:
            return None
        return {
            "image": _image(i),
            "caption": f"c{i}",
            "level": 17.0,
            "quality": float("nan"),
            "key": str(i),
        }


def test_control_pairs():
    ds = ControlPairs(_Reader(), "dehaze", seed=1)
    a, b = ds[0], ds[0]
    assert (
        torch.equal(a["control"], b["control"])
        and a["caption"] == "c0"
        and a["image"].shape == (3, 32, 32)
    )
    assert not torch.equal(
        ds[1]["control"], ControlPairs(_Reader(), "dehaze", seed=2)[1]["control"]
    )
    assert ds[3] is None and len(ds) == 6
    ds.set_epoch(1)
    assert ds.dataset.epoch == 1 and not torch.equal(ds[0]["control"], a["control"])
    ds.set_epoch(0)
    assert torch.equal(ds[0]["control"], a["control"])
    with pytest.raises(ValueError, match="paired"):
        ControlPairs(_Reader(), "nir2rgb")
    with pytest.raises(ValueError, match="dehaze"):
        ControlPairs(_Reader(), "bogus")


def _position_image(h, w, grey=False, shift=0):
    """Pixels encode their position: r = x, g = y (+ shift), b = 7; grey: one band = x + 8 y."""
    y, x = np.mgrid[0:h, 0:w]
    if grey:
        return Image.fromarray((x + 8 * y).astype(np.uint8), mode="L")
    return Image.fromarray(
        np.stack([x, y + shift, np.full_like(x, 7)], -1).astype(np.uint8), mode="RGB"
    )


def test_paired_folder_sen12(tmp_path):
    root = tmp_path / "sen12"
    for season, patch in (("ROIs1158_spring", 1), ("ROIs1158_spring", 2), ("ROIs1868_summer", 1)):
        for s in ("s1", "s2"):
            d = root / season / f"{s}_1"
            d.mkdir(parents=True, exist_ok=True)
            _position_image(10, 16, grey=s == "s1").save(
                d / f"{season}_{s}_1_p{patch}.png"
            )  # 10 x 16
    (root / "ROIs1158_spring" / "s1_1" / "ROIs1158_spring_s1_1_p9.png").write_bytes(
        (root / "ROIs1158_spring" / "s1_1" / "ROIs1158_spring_s1_1_p1.png").read_bytes()
    )  # no partner
    with pytest.warns(UserWarning, match=r"1 of 4.*ROIs1158_spring_s2_1_p9\.png"):
        ds = PairedFolder(
            root,
            root,
            replace=(("s1_", "s2_"),),
            caption="a SAR image",
            level=13.0,
            transform=train_transform(10),
            seed=3,
        )  # no resize: crop, flips
    assert (
        len(ds) == 3
        and [k for k, *_ in ds.pairs][0] == "ROIs1158_spring/s1_1/ROIs1158_spring_s1_1_p1.png"
    )
    for i in range(3):
        item = ds[i]
        assert item["image"].shape == item["control"].shape == (3, 10, 10)
        assert (
            item["caption"] == "a SAR image" and item["level"] == 13.0 and np.isnan(item["quality"])
        )
        c = item["control"]
        assert torch.equal(c[0], c[1]) and torch.equal(c[1], c[2])  # grey SAR: 3 equal channels
        # same crop and flips: the control's x + 8 y equals the target's r + 8 g at every pixel
        to8 = lambda v: ((v + 1) * 127.5).round()
        assert torch.equal(to8(c[0]), to8(item["image"][0]) + 8 * to8(item["image"][1]))
    assert any(
        not torch.equal(ds[i]["image"], ds[0]["image"]) for i in range(1, 3)
    )  # crops do differ
    ds.set_epoch(1)
    assert ds.epoch == 1


def test_paired_folder_qxs(tmp_path):
    (tmp_path / "sar").mkdir()
    (tmp_path / "opt").mkdir()
    for n in range(4):
        _position_image(12, 12, grey=True).save(tmp_path / "sar" / f"{n}.png")
        _position_image(12 if n != 2 else 10, 12).save(
            tmp_path / "opt" / f"{n}.png"
        )  # 2: size mismatch
    caps = tmp_path / "caps.json"
    caps.write_text(json.dumps({"0.png": "by name", "1": "by stem"}))
    counter = BadDataCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every control has a partner
        ds = PairedFolder(tmp_path / "sar", tmp_path / "opt", captions=caps, counter=counter)
    assert len(ds) == 4
    assert [ds[i]["caption"] for i in (0, 1, 3)] == ["by name", "by stem", ""]
    assert ds[0]["image"].shape == (3, 12, 12)
    assert ds[2] is None and counter.bad == 1
    assert "12x12" in counter.examples[0][1] and "12x10" in counter.examples[0][1]
    with pytest.raises(
        ValueError, match=r"under .*sar .*under .*nothing.*nothing/0\.png is missing"
    ):
        PairedFolder(tmp_path / "sar", tmp_path / "nothing")
    with pytest.raises(ValueError, match="no image files"):
        PairedFolder(tmp_path / "sar", tmp_path / "opt", replace=(("s1_", "s2_"),))


def test_procedural_earth_pairs():
    plain = ProceduralEarth(4, size=32, seed=2)
    for pair in (
        ("pan", "rgb"),
        ("sar", "rgb"),
        ("lowres", "rgb"),
        ("haze", "rgb"),
        ("pan", "nir"),
    ):
        ds = ProceduralEarth(4, size=32, seed=2, pair=pair)
        item, again = ds[1], ds[1]
        assert item["image"].shape == item["control"].shape == (3, 32, 32)
        assert item["image"].min() >= -1 and item["control"].max() <= 1
        assert torch.equal(item["control"], again["control"]) and torch.equal(
            item["image"], again["image"]
        )
        assert item["caption"] == plain[1]["caption"] and item["key"] == plain[1]["key"]
        if pair[1] == "rgb":
            assert torch.equal(item["image"], plain[1]["image"])
        if pair[0] == "pan":
            c = item["control"]
            assert torch.equal(c[0], c[1]) and torch.equal(c[1], c[2])
    sar = ProceduralEarth(4, size=32, seed=2, pair="sar")[1]
    paired = ProceduralEarth(4, size=32, seed=2, pair=("sar", "rgb"))[1]
    assert "control" not in sar and torch.equal(sar["image"], paired["control"])
    batch = collate(
        [ProceduralEarth(4, size=32, seed=2, pair=("sar", "rgb"))[i] for i in range(3)] + [None]
    )
    assert batch["control"].shape == batch["image"].shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="single modality"):
        ProceduralEarth(4, pair="thermal")
    with pytest.raises(ValueError, match="control, target"):
        ProceduralEarth(4, pair=("rgb", "sar"))


# -----------------------------------------------------------------------------
# build_dataset and collate


def _cfg(**kw):
    base = dict(
        data="synthetic",
        data_path="",
        data_split="train",
        image_size=32,
        gsd_m=0.0,
        min_quality=0.0,
        max_bad_fraction=0.5,
        seed=0,
        synthetic_samples=8,
        synthetic_levels=(11.0, 17.0),
        synthetic_integer_levels=False,
    )
    return types.SimpleNamespace(**(base | kw))


def test_build_dataset(tmp_path):
    ds = build_dataset(_cfg(control_task="sar2rgb"))
    assert ds.pair == ("sar", "rgb") and "control" in ds[0]
    assert build_dataset(_cfg(modality="sar")).pair == "sar"
    assert build_dataset(_cfg()).pair is None  # older configs: nothing new
    for i in range(3):
        _position_image(40, 40, shift=i).save(tmp_path / f"{i}.png")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        "".join(json.dumps({"file": f"{i}.png", "caption": f"c{i}"}) + "\n" for i in range(3))
    )
    ds = build_dataset(_cfg(data="folder", data_path=str(manifest), control_task="sr"))
    assert isinstance(ds, ControlPairs) and ds[0]["control"].shape == (3, 32, 32)
    with pytest.raises(ValueError, match="--data=paired"):
        build_dataset(_cfg(data="folder", data_path=str(manifest), control_task="sar2rgb"))
    with pytest.raises(ValueError, match="needs --control_task"):
        build_dataset(_cfg(data="paired", data_path=str(tmp_path)))
    with pytest.raises(ValueError, match="pan2rgb"):
        build_dataset(_cfg(control_task="nope"))
    with pytest.raises(ValueError, match="shards"):
        build_dataset(_cfg(data="shards", data_path=str(tmp_path), control_task="sr"))
    (tmp_path / "sar").mkdir()
    (tmp_path / "opt").mkdir()
    for i in range(2):
        _position_image(40, 40, grey=True).save(tmp_path / "sar" / f"s1_{i}.png")
        _position_image(40, 40).save(tmp_path / "opt" / f"s2_{i}.png")
    ds = build_dataset(
        _cfg(
            data="paired",
            data_path=str(tmp_path / "opt"),
            control_path=str(tmp_path / "sar"),
            control_task="sar2rgb",
            pair_replace=("s1_", "s2_"),
            gsd_m=10.0,
        )
    )
    assert (
        len(ds) == 2
        and ds.replace == (("s1_", "s2_"),)
        and ds[0]["level"] == pytest.approx(17 - np.log2(10))
    )


def test_collate_control():
    items = [
        {
            "image": torch.zeros(3, 4, 4),
            "control": torch.ones(3, 4, 4),
            "caption": "",
            "level": 0.0,
            "quality": float("nan"),
            "key": str(i),
        }
        for i in range(2)
    ]
    batch = collate(items)
    assert batch["control"].shape == (2, 3, 4, 4) and batch["control"].eq(1).all()
    assert "control" not in collate(
        [items[0], {k: v for k, v in items[1].items() if k != "control"}]
    )
    items[1]["control"] = torch.ones(3, 2, 2)
    with pytest.raises(ValueError, match="control shapes differ"):
        collate(items)
