"""The recipe for real imagery (`demo.py --data`) and evaluate.py's realism metrics, on a few UC Merced
images from ../shared/data (skipped where it is absent): the recipe end to end in CI size, the evaluation
of copies of the test images (the two-sample test at exactly one half), the feature net reused, and the
errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import demo
from data.transforms import tensor_to_pil
from evaluation.realism import FilesAsTrained, two_sample_accuracy
from evaluation.testset import karpathy
from test_mhn import run_evaluate  # evaluate.main in this process: (exit code, printed text)

UCM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ucm_captions"
needs_ucm = pytest.mark.skipif(
    not (UCM / "dataset.json").is_file(),
    reason=f"UCM-Captions not found at {UCM} (shared data, absent on a fresh clone)",
)
PER_SPLIT = {"train": 8, "val": 3, "test": 3}  # images of each of the first three classes


@pytest.fixture
def mini_ucm(tmp_path):
    """A Karpathy json of UCM's first three classes, 8 train, 3 val and 3 test images each, its
    images beside it (a link to the shared folder)."""
    meta = json.loads((UCM / "dataset.json").read_text())
    kept, count = [], {}
    for im in meta["images"]:
        key = (im["class_id"], im["split"])
        if im["class_id"] < 3 and count.get(key, 0) < PER_SPLIT[im["split"]]:
            count[key] = count.get(key, 0) + 1
            kept.append(im)
    root = tmp_path / "mini"
    root.mkdir()
    (root / "images").symlink_to(UCM / "images")
    (root / "dataset.json").write_text(json.dumps({**meta, "images": kept}))
    return root / "dataset.json"


def test_paired_copies_score_exactly_one_half():
    """A set against a copy of itself: with each image and its copy in one part, no net can tell them
    apart, and every pair is scored once right and once wrong."""
    x = torch.rand(24, 3, 16, 16) * 2 - 1
    r = two_sample_accuracy(x, x.clone(), size=16, steps=20, paired=True)
    assert r["accuracy"] == 0.5 and r["real_accuracy"] + r["fake_accuracy"] == 1.0, r
    with pytest.raises(ValueError, match="paired=True needs one generated image per real one: 24"):
        two_sample_accuracy(x, x[:20], size=16, paired=True)


@needs_ucm
def test_realism_of_copies_of_the_test_images(mini_ucm, tmp_path, capsys):
    """evaluate.py --realism on the test images themselves (another method's output): the two-sample
    test reads exactly 1/2, the feature FID ~0, the val split stands beside them as the real reference;
    a second evaluation reuses the feature net file given."""
    out, net = tmp_path / "eval", tmp_path / "net.safetensors"
    meta = json.loads(mini_ucm.read_text())
    for im in meta["images"]:
        if im["split"] == "test":
            src = Image.open(UCM / "images" / im["filename"]).convert("RGB")
            (out / "generated").mkdir(parents=True, exist_ok=True)
            src.resize((64, 64), Image.BICUBIC).save(
                out / "generated" / f"{Path(im['filename']).stem}_0.png"
            )
    args = ["--test", mini_ucm, "--out", out, "--n", 1, "--size", 64, 64, "--cls-size", 64]
    args += ["--cls-epochs", 1, "--realism", "--realism-net", net, "--realism-steps", 20]
    code, text = run_evaluate(args, capsys)
    assert code == 0, text
    m = json.loads((out / "report.json").read_text())["metrics"]
    assert m["c2st"]["value"] == 0.5 and m["c2st"]["n_real"] == m["c2st"]["n_fake"] == 9
    assert m["c2st"]["reference"]["split"] == "val"
    assert 0 <= m["c2st"]["reference"]["value"] <= 1
    assert m["feature_fid"]["value"] < 1e-2 and m["feature_fid"]["net"]["n"] == 24
    assert "C2ST acc." in (out / "report.md").read_text()
    made = net.stat().st_mtime_ns
    code, text = run_evaluate(args + ["--overwrite"], capsys)
    assert code == 0 and "training the feature net" not in text and net.stat().st_mtime_ns == made
    again = json.loads((out / "report.json").read_text())["metrics"]
    assert again["feature_fid"]["value"] == m["feature_fid"]["value"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--realism-size", "8"], "--realism-size must be >= 16"),
        (["--realism-reference", "val"], "--realism-reference val: needs a Karpathy json --test"),
        (
            ["--realism-train", "nowhere.json"],
            "--realism-train nowhere.json: not a Karpathy json with a train split",
        ),
    ],
)
def test_realism_flags_are_checked(tmp_path, capsys, extra, message):
    args = ["--test", "procedural:12", "--out", tmp_path / "e", "--realism", *extra]
    code, text = run_evaluate(args, capsys)
    assert code == 2 and message in text, text


def test_recipe_refuses_what_is_not_a_caption_json(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main([f"--data={tmp_path / 'none.json'}", f"--out={tmp_path / 'out'}"])
    assert e.value.code == 2 and "no such file (a Karpathy caption json)" in capsys.readouterr().err
    (tmp_path / "only_train.json").write_text(
        json.dumps(
            {"images": [{"filename": "1.jpg", "split": "train", "sentences": [{"raw": "a"}]}]}
        )
    )
    with pytest.raises(SystemExit) as e:
        demo.main([f"--data={tmp_path / 'only_train.json'}", f"--out={tmp_path / 'out'}"])
    assert e.value.code == 2 and "no images in split 'test'" in capsys.readouterr().err


@needs_ucm
def test_recipe_end_to_end_on_a_few_real_images(mini_ucm, tmp_path, capsys):
    """demo.py --data in CI size (5 VAE and 5 U-Net steps): the train split into shards (every caption
    its own sample), both stages, the three evaluations, the overview and results.json; a finished
    run is not overwritten."""
    out = tmp_path / "out"
    tiny = ["--vae_steps=5", "--unet_steps=5", "--eval_n=2", "--cls_epochs=1", "--steps=2"]
    summary = demo.main([f"--data={mini_ucm}", f"--out={out}", "--realism_steps=20", *tiny])
    made = json.loads((out / "images" / "made_from.json").read_text())
    assert made["n"] == 5 * 24 and made["size"] == 64  # 24 images, 5 captions each
    assert summary["stages"]["vae"]["steps"] == 5 and summary["stages"]["unet"]["steps"] == 5
    rows = summary["figures"]
    ours = rows["generated from the test captions (ours)"]
    assert 0 <= ours["cls_oa"] <= 1 and 0 <= ours["c2st"] <= 1 and ours["feature_fid"] >= 0
    assert rows["chance (3 classes)"]["cls_oa"] == pytest.approx(1 / 3)
    assert "real training images, as many (ceiling)" in rows
    assert "real val images against test (floor)" in rows
    for name in ("eval", "eval_vae", "eval_real"):
        report = json.loads((out / name / "report.json").read_text())
        assert {"c2st", "feature_fid"} <= set(report["metrics"]), name
    # every evaluation scored in the one feature net
    nets = {json.loads((out / n / "report.json").read_text())["metrics"]["feature_fid"]["net"]["file"]
            for n in ("eval", "eval_vae", "eval_real")}  # fmt: skip
    assert nets == {str(out / "realism_net.safetensors")}
    assert len(list((out / "eval" / "generated").glob("*.png"))) == 2 * 9
    assert len(list((out / "eval_vae" / "generated").glob("*_0.png"))) == 9
    # as many real training images: the j-th test image of a class gets its 2j-th and 2j+1-th
    assert len(list((out / "eval_real" / "generated").glob("*.png"))) == 2 * 9
    train, seen = karpathy(mini_ucm, "train"), {}
    for im in karpathy(mini_ucm, "test"):
        j = seen[im.label] = seen.get(im.label, -1) + 1
        pool = [t.path for t in train if t.label == im.label]
        for k in range(2):
            expected = tensor_to_pil(FilesAsTrained([pool[2 * j + k]], 64)[0])
            written = Image.open(out / "eval_real" / "generated" / f"{im.key}_{k}.png")
            assert np.array_equal(np.asarray(written), np.asarray(expected)), (im.key, k)
    assert Image.open(out / "overview.png").size[0] > 600
    assert (out / "model.safetensors").is_file()
    with pytest.raises(SystemExit) as e:
        demo.main([f"--data={mini_ucm}", f"--out={out}", *tiny])
    assert e.value.code == 2 and "holds a finished demo" in capsys.readouterr().err


def test_test_images_are_found_where_the_training_reader_finds_them(tmp_path):
    """RSICD ships its images in RSICD_images/: the test set reads them there, as training does."""
    (tmp_path / "RSICD_images").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "RSICD_images" / "airport_1.jpg")
    entry = {"filename": "airport_1.jpg", "split": "test", "sentences": [{"raw": "an airport"}]}
    (tmp_path / "dataset_rsicd.json").write_text(json.dumps({"images": [entry]}))
    (im,) = karpathy(tmp_path / "dataset_rsicd.json", "test")
    assert im.path == tmp_path / "RSICD_images" / "airport_1.jpg" and im.label == "airport"
