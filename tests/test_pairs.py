"""Paired cloudy / clear folders (data/pairs.py) in Sen2-MTC's layout and in cloudy/ + clear/, their pixels (8-bit
PNG and TIFF, Sentinel-2's 16-bit four-band TIFFs), unpaired files; `edit.py declouds --pairs` end to end with a
tiny random model, and the scores it writes against an independent computation."""

import json
import re
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import edit
from data.pairs import FOLDERS, SEN2_MTC, CloudPairs, find_pairs, read_image
from evaluation.editing import psnr, ssim, to_unit

# ----------------------------------------------------------------------------------------------
# Writing test images
# ----------------------------------------------------------------------------------------------


def write_tiff(
    path, a, *, planar=False, deflate=False, predictor=False, order="<", rows=3, compression=None
):
    """A striped TIFF of a (H, W, C) integer array, as GDAL or tifffile write Sentinel-2 tiles: chunky or planar,
    `rows` rows a strip, uncompressed or Deflate, with or without the horizontal predictor, either byte order;
    `compression` writes that code over raw strips (a file this reader must refuse)."""
    H, W, C = a.shape
    data = np.ascontiguousarray(a.transpose(2, 0, 1) if planar else a).astype(
        a.dtype.newbyteorder(order)
    )
    axis = 2 if planar else 1
    if predictor:
        diff = data.copy()
        # wraps around in the integer type, as TIFF's differences do
        diff[(slice(None),) * axis + (slice(1, None),)] = np.diff(data, axis=axis)
        data = diff
    blocks = [data[c] for c in range(C)] if planar else [data]
    strips = [b[r : r + rows].tobytes() for b in blocks for r in range(0, H, rows)]
    strips = [zlib.compress(s) for s in strips] if deflate else strips
    offsets, pos = [], 8
    for s in strips:
        offsets.append(pos)
        pos += len(s)
    extra = {"bits": pos}
    arrays = struct.pack(f"{order}{C}H", *[a.dtype.itemsize * 8] * C)
    extra["offsets"] = pos + len(arrays)
    arrays += struct.pack(f"{order}{len(strips)}I", *offsets)
    extra["counts"] = pos + len(arrays)
    arrays += struct.pack(f"{order}{len(strips)}I", *map(len, strips))
    ifd_at = pos + len(arrays)
    code = compression or (8 if deflate else 1)
    short = lambda tag, v: struct.pack(f"{order}HHIHH", tag, 3, 1, v, 0)
    entries = [
        struct.pack(f"{order}HHII", 256, 4, 1, W),
        struct.pack(f"{order}HHII", 257, 4, 1, H),
        struct.pack(f"{order}HHII", 258, 3, C, extra["bits"]),
        short(259, code),
        short(262, 2),
        struct.pack(f"{order}HHII", 273, 4, len(strips), extra["offsets"]),
        short(277, C),
        struct.pack(f"{order}HHII", 278, 4, 1, rows),
        struct.pack(f"{order}HHII", 279, 4, len(strips), extra["counts"]),
        short(284, 2 if planar else 1),
        *([short(317, 2)] if predictor else []),
        *([short(338, 0)] if C == 4 else []),
    ]
    ifd = struct.pack(f"{order}H", len(entries)) + b"".join(entries) + b"\0\0\0\0"
    magic = b"II*\0" if order == "<" else b"MM\0*"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(magic + struct.pack(f"{order}I", ifd_at) + b"".join(strips) + arrays + ifd)


def save(path, a):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


def scene(seed, h=32, w=32, cloud=None, bands=3):
    """An 8-bit scene (H, W, bands): a dark textured field, and with `cloud` a bright white patch."""
    rng = np.random.default_rng(seed)
    a = (60 + rng.random((h, w, bands)) * 60).astype(np.uint8)
    if cloud is not None:
        y, x = cloud
        a[y : y + 10, x : x + 12, :3] = 245
    return a


def unit(a):
    """What read_image should give for 8-bit values: (3, H, W) in [-1, 1]."""
    return torch.from_numpy(a[..., :3].astype(np.float32) / 255).permute(2, 0, 1) * 2 - 1


# ----------------------------------------------------------------------------------------------
# Pixels
# ----------------------------------------------------------------------------------------------


def test_8bit_four_band_tiff_reads_its_first_three_bands_as_stored(tmp_path):
    a = scene(0, bands=4)
    a[..., 3] = 7  # a NIR band of almost nothing: read as alpha it would darken the image
    save(tmp_path / "rgbn.tif", a)  # Pillow writes it as RGBA
    torch.testing.assert_close(read_image(tmp_path / "rgbn.tif"), unit(a), rtol=0, atol=0)
    grey = a[..., 0]
    save(tmp_path / "grey.png", grey)
    torch.testing.assert_close(
        read_image(tmp_path / "grey.png"), unit(np.stack([grey] * 3, -1)), rtol=0, atol=0
    )


@pytest.mark.parametrize(
    "layout",
    [
        dict(),
        dict(planar=True),
        dict(deflate=True),
        dict(deflate=True, predictor=True),
        dict(planar=True, deflate=True, predictor=True, order=">"),
    ],
)
def test_16bit_four_band_tiff_is_read_at_full_depth(tmp_path, layout):
    """Sen2-MTC's tiles: R, G, B, NIR reflectance x 10000 in uint16. Pillow alone reads them as 8 bits."""
    rng = np.random.default_rng(1)
    a = rng.integers(0, 12000, (8, 8, 4)).astype(np.uint16)  # some above 10000: clipped
    write_tiff(tmp_path / "t.tif", a, **layout)
    for white in (None, 3000):
        unit16 = np.clip(a[..., :3] / (white or 10000), 0, 1).astype(np.float32)
        expected = torch.from_numpy(unit16).permute(2, 0, 1) * 2 - 1
        torch.testing.assert_close(
            read_image(tmp_path / "t.tif", white), expected, rtol=0, atol=1e-6
        )
    if not layout:
        with Image.open(tmp_path / "t.tif") as im:
            assert np.asarray(im).dtype == np.uint8  # what Pillow alone gives


def test_tiffs_this_reader_cannot_decode_are_a_clear_error(tmp_path):
    write_tiff(tmp_path / "lzw.tif", np.ones((8, 8, 4), np.uint16), compression=5)
    with pytest.raises(
        ValueError,
        match=r"lzw.tif: a TIFF of 4 bands of 16 bits with compression 5.*gdal_translate",
    ):
        read_image(tmp_path / "lzw.tif")
    (tmp_path / "notes.png").write_text("not an image")
    with pytest.raises(ValueError, match=r"notes.png: not an image Pillow can read"):
        read_image(tmp_path / "notes.png")
    with pytest.raises(ValueError, match=r"absent.png: no such file"):
        read_image(tmp_path / "absent.png")


# ----------------------------------------------------------------------------------------------
# Pairing
# ----------------------------------------------------------------------------------------------


def sen2_mtc(root, tiles=("T1", "T2"), k=(0, 1, 2)):
    for t, tile in enumerate(tiles):
        for i, name in enumerate(("a", "b")):
            stem = f"{tile}_{name}"
            save(root / tile / "cloudless" / f"{stem}.tif", scene(10 * t + i, bands=4))
            for j in k:
                save(
                    root / tile / "cloud" / f"{stem}_{j}.tif",
                    scene(100 * t + 10 * i + j, cloud=(4, 4), bands=4),
                )
    return root


def test_sen2_mtc_layout_pairs_every_clear_image_with_its_acquisitions_in_order(tmp_path):
    # DiffCR's copy holds the tiles one level down
    root = sen2_mtc(tmp_path / "Sen2_MTC_New" / "Sen2_MTC", k=(0, 1, 2, 10))
    pairs = CloudPairs(tmp_path / "Sen2_MTC_New")
    assert pairs.layout == SEN2_MTC
    assert [p.name for p in pairs.pairs] == ["T1/T1_a", "T1/T1_b", "T2/T2_a", "T2/T2_b"]
    assert [p.name for p in pairs.pairs[0].cloudy] == [
        "T1_a_0.tif",
        "T1_a_1.tif",
        "T1_a_2.tif",
        "T1_a_10.tif",
    ]
    cloudy, clear, name = pairs[1]
    assert name == "T1/T1_b" and cloudy.shape == (4, 3, 32, 32) and clear.shape == (3, 32, 32)
    torch.testing.assert_close(clear, unit(scene(1, bands=4)), rtol=0, atol=0)
    torch.testing.assert_close(cloudy[1], unit(scene(11, cloud=(4, 4), bands=4)), rtol=0, atol=0)

    split = tmp_path / "test.txt"
    # the dataset's lists hold paths; the last part is the tile
    split.write_text("/data/elsewhere/Sen2_MTC/T2\n\n")
    assert [p.name for p in CloudPairs(tmp_path / "Sen2_MTC_New", split=split).pairs] == [
        "T2/T2_a",
        "T2/T2_b",
    ]
    split.write_text("T2\nT9\n")
    with pytest.raises(ValueError, match=r"1 of its 2 tiles are not under .*Sen2_MTC \(e.g. T9\)"):
        find_pairs(tmp_path / "Sen2_MTC_New", split)
    assert root.is_dir()


def test_folders_layout_pairs_by_stem(tmp_path):
    save(tmp_path / "clear" / "x.png", scene(0))
    save(tmp_path / "cloudy" / "x.png", scene(1, cloud=(2, 2)))
    save(tmp_path / "clear" / "y.jpg", scene(2))
    save(tmp_path / "cloudy" / "y_0.png", scene(3, cloud=(2, 2)))
    (tmp_path / "cloudy" / "README.txt").write_text("not an image file: left alone")
    layout, pairs = find_pairs(tmp_path)
    assert layout == FOLDERS and [(p.name, [c.name for c in p.cloudy]) for p in pairs] == [
        ("x", ["x.png"]),
        ("y", ["y_0.png"]),
    ]
    with pytest.raises(ValueError, match="a tile list is for Sen2-MTC's layout"):
        find_pairs(tmp_path, tmp_path / "test.txt")


def test_unpaired_files_are_an_error_naming_them(tmp_path):
    save(tmp_path / "clear" / "x.png", scene(0))
    save(tmp_path / "cloudy" / "x.png", scene(1))
    save(tmp_path / "clear" / "lonely.png", scene(2))
    save(tmp_path / "cloudy" / "stray_a.png", scene(3))
    with pytest.raises(
        ValueError, match=r"2 image files have no partner .* e.g. .*stray_a.png, .*lonely.png"
    ):
        find_pairs(tmp_path)
    (tmp_path / "clear" / "lonely.png").unlink()
    save(tmp_path / "clear" / "x.tif", scene(0))
    with pytest.raises(ValueError, match=r"x.png and .*x.tif: two clear images of one name"):
        find_pairs(tmp_path)


def test_folders_neither_layout_and_sizes_that_differ_are_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither layout: expected cloudy/ and clear/"):
        find_pairs(tmp_path / "empty")
    save(tmp_path / "p" / "clear" / "x.png", scene(0))
    save(tmp_path / "p" / "cloudy" / "x.png", scene(1, h=24))
    with pytest.raises(
        ValueError, match=r"cloudy/x.png is 32x24 and its clear image .*clear/x.png 32x32"
    ):
        CloudPairs(tmp_path / "p")[0]


# ----------------------------------------------------------------------------------------------
# edit.py declouds --pairs
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lpips_file(tmp_path_factory):
    """An lpips.LPIPS(net="alex") state dict: random trunk, the package's own lin weights."""
    lpips = pytest.importorskip("lpips")
    torch.manual_seed(0)
    with pytest.warns(UserWarning):  # torchvision's note that `pretrained=` is deprecated
        ref = lpips.LPIPS(net="alex", pretrained=True, pnet_rand=True, verbose=False).eval()
    path = tmp_path_factory.mktemp("lpips") / "lpips_alex.pth"
    torch.save(ref.state_dict(), path)
    return path, ref


@pytest.fixture
def folder(tmp_path):
    """Three pairs: two clouded, one whose cloudy image is its clear one (nothing to remove)."""
    root = tmp_path / "pairs"
    for name, seed, cloud in (("a", 0, (4, 6)), ("b", 1, (16, 12)), ("c", 2, None)):
        clear = scene(seed)
        cloudy = clear.copy()
        if cloud:
            cloudy[cloud[0] : cloud[0] + 10, cloud[1] : cloud[1] + 12] = 245
        save(root / "clear" / f"{name}.png", clear)
        save(root / "cloudy" / f"{name}.png", cloudy)
    return root


def declouds(capsys, *args):
    code = edit.main(["declouds", *map(str, args)])
    return code, capsys.readouterr()


def test_declouds_pairs_writes_outputs_and_scores_them_against_the_clear_images(
    folder, tmp_path, tiny_ckpt, lpips_file, capsys
):
    out, (lpips_path, ref) = tmp_path / "out", lpips_file
    model = ["--weights", tiny_ckpt, "--steps", "2"]
    code, cap = declouds(capsys, "--pairs", folder, *model, "--out", out, "--lpips", lpips_path)
    assert code == 0, cap.err
    made = [f"{n}_{k}.png" for n in "abc" for k in ("cloudmask", "declouds_seed0")]
    assert sorted(p.name for p in out.iterdir()) == made + ["scores.json"]
    scores = json.loads((out / "scores.json").read_text())
    assert (
        scores["layout"] == FOLDERS
        and scores["lpips"]["net"] == "alex"
        and scores["no_cloud_found"] == ["c"]
    )
    assert scores["settings"]["steps"] == 2

    # every figure recomputed here from the files: psnr / ssim of evaluation/editing.py, LPIPS by the package
    for kind, files in (
        ("outputs", [out / f"{n}_declouds_seed0.png" for n in "abc"]),
        ("cloudy input", [folder / "cloudy" / f"{n}.png" for n in "abc"]),
    ):
        rows = scores["images"][kind]
        clear = torch.stack(
            [unit(np.asarray(Image.open(folder / "clear" / f"{n}.png"))) for n in "abc"]
        )
        made = torch.stack([unit(np.asarray(Image.open(f))) for f in files])
        with torch.no_grad():
            lp = ref(made, clear).flatten()
        for i, row in enumerate(rows):
            assert row["file"] == str(files[i])
            assert row["psnr"] == pytest.approx(
                psnr(to_unit(made[i : i + 1]), to_unit(clear[i : i + 1])).item(), rel=1e-6
            )
            assert row["ssim"] == pytest.approx(
                ssim(to_unit(made[i : i + 1]), to_unit(clear[i : i + 1])).item(), rel=1e-6
            )
            assert row["lpips"] == pytest.approx(lp[i].item(), rel=1e-5)
        mean = scores["mean"][kind]
        assert mean["n"] == 3 and mean["psnr"] == pytest.approx(
            np.mean([r["psnr"] for r in rows]), rel=1e-9
        )
        assert mean["lpips"] == pytest.approx(lp.mean().item(), rel=1e-5)
        # the pair without cloud: its output is its input, equal to the clear image
        assert rows[2]["psnr"] == 120.0 and rows[2]["lpips"] == 0.0
        assert rows[2]["ssim"] == pytest.approx(1.0)
    assert scores["images"]["cloudy input"][0]["psnr"] < 40
    table = re.search(
        r"\| images \| n \| PSNR dB \| SSIM \| LPIPS \(alex\) \|.*", cap.out, re.S
    ).group(0)
    assert "| declouded | 3 |" in table and "| cloudy input (do nothing) | 3 |" in table

    # a finished run is refused; an interrupted one resumes, keeping what it wrote
    with pytest.raises(SystemExit) as e:
        declouds(capsys, "--pairs", folder, *model, "--out", out)
    assert e.value.code == 2 and "scores.json exists" in capsys.readouterr().err
    (out / "scores.json").unlink()
    (out / "b_declouds_seed0.png").unlink()
    kept = (out / "a_declouds_seed0.png").read_bytes()
    code, cap = declouds(capsys, "--pairs", folder, *model, "--out", out)
    assert code == 0 and "2 of 3 outputs already written, 1 to go" in cap.out
    assert "| not measured |" in cap.out
    assert (out / "a_declouds_seed0.png").read_bytes() == kept
    assert json.loads((out / "scores.json").read_text())["lpips"] == "not measured"
    (out / "scores.json").unlink()
    with pytest.raises(SystemExit) as e:
        declouds(capsys, "--pairs", folder, "--weights", tiny_ckpt, "--steps", "3", "--out", out)
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(
        r"a_declouds_seed0.png was made with other settings \(steps '2' not '3'\)", err
    ), err

    # scoring without a model: this run's outputs, or another method's DIR/<name>.png
    code, _ = declouds(capsys, "--pairs", folder, "--outputs", out, "--out", tmp_path / "again")
    again = json.loads((tmp_path / "again" / "scores.json").read_text())["images"]["outputs"]
    assert code == 0 and again == [{**r, "lpips": None} for r in scores["images"]["outputs"]]
    perfect = tmp_path / "perfect"
    code, _ = declouds(
        capsys,
        "--pairs",
        folder,
        "--outputs",
        folder / "clear",
        "--out",
        perfect,
        "--lpips",
        lpips_path,
    )
    perfect = json.loads((perfect / "scores.json").read_text())["mean"]["outputs"]
    assert code == 0 and perfect["psnr"] == 120.0 and perfect["lpips"] == 0.0
    assert perfect["ssim"] == pytest.approx(1.0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--pairs", "{pairs}", "--mask", "{pairs}/clear/a.png"], "--mask is one image's"),
        (["--image", "{pairs}/cloudy/a.png", "--lpips", "x.pth"], "--lpips goes with --pairs"),
        (
            ["--pairs", "{pairs}", "--outputs", "{pairs}/clear", "--weights", "{ckpt}"],
            "give --weights or --outputs, not both",
        ),
        (["--pairs", "{pairs}", "--outputs", "{pairs}/cloudy", "--n", "2"], "--n does not apply"),
        (["--pairs", "{pairs}", "--full-scale", "0"], "--full-scale must be > 0"),
        (["--pairs", "{pairs}/clear"], "neither layout"),
        (
            ["--pairs", "{pairs}", "--outputs", "{tmp}"],
            r"3 of 3 pairs have no image there \(e.g. .*a.png",
        ),
        (
            ["--pairs", "{pairs}", "--lpips", "{ckpt}"],
            r"--lpips: .*tiny.safetensors: unexpected key",
        ),
        (
            ["--pairs", "{pairs}", "--lpips", "{tmp}/absent.pth"],
            r"--lpips: .*absent.pth: no such file",
        ),
        (["--pairs", "{pairs}", "--image", "{pairs}/cloudy/a.png"], "not allowed with argument"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(
    folder, tmp_path, tiny_ckpt, capsys, args, message
):
    out = tmp_path / "o"
    args = [a.format(pairs=folder, ckpt=tiny_ckpt, tmp=tmp_path) for a in args]
    if "--weights" not in args and "--outputs" not in args:
        args += ["--weights", str(tiny_ckpt)]
    with pytest.raises(SystemExit) as e:
        declouds(capsys, *args, "--steps", "2", "--out", out)
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if re.match(r"edit.py( declouds)?: error:", ln)]
    assert e.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert re.search(message, errors[0]), err
    assert not out.exists()
