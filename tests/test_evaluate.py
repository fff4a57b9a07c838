"""evaluate.py: the distances respond to distortion through the real networks' code paths, and the one command runs
the protocol (generation resumable, every metric, the report) on a tiny model and on the fast demo's model."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
from evaluation import classifier, clip as clipnet, metrics
from evaluation.inception import fid_features
from evaluation.probe import Probe, blur, make_probe_data, save_probe

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"


# ----------------------------------------------------------------------------------------------
# The distances grow with the distortion
# ----------------------------------------------------------------------------------------------


def test_fid_kid_cmmd_are_zero_on_the_set_itself_and_grow_with_noise_and_blur(
    random_fid_inception, tiny_clip
):
    """24 procedural renders against noised (sigma 0.05 / 0.15 / 0.4) and blurred (0.5 / 1 / 2 px) copies, through
    the FID Inception (pool features at 299 px) and a CLIP image tower, both with random weights: the pipeline from
    pixels to distance responds monotonically. Measured (Xeon AVX-512): FID 0.26 / 5.97 / 60.1 for noise,
    0.09 / 0.48 / 1.25 for blur, self -2e-5."""
    _, net = random_fid_inception
    net.eval()
    clip = clipnet.load_clip("tiny-clip-test", tiny_clip)
    x, _, _ = make_probe_data(24, size=32, seed=5)
    g = torch.Generator().manual_seed(0)
    distorted = {
        "noise": [
            (x + s * torch.randn(x.shape, generator=g)).clamp(-1, 1) for s in (0.05, 0.15, 0.4)
        ],
        "blur": [blur(x, s) for s in (0.5, 1.0, 2.0)],
    }
    fx, cx = fid_features(net, x), clipnet.image_embeddings(clip, x)
    with pytest.warns(UserWarning, match="rank-deficient"):  # 24 images of 2048-d features
        assert abs(metrics.fid(fx, fx)) < 1e-3
    assert metrics.clip_mmd(cx, cx) == pytest.approx(0, abs=1e-9)
    for kind, sets in distorted.items():
        fids, kids, cmmds = [], [], []
        for d in sets:
            f, c = fid_features(net, d), clipnet.image_embeddings(clip, d)
            with pytest.warns(UserWarning):
                fids.append(metrics.fid(fx, f))
            kids.append(metrics.kernel_distance(fx, f)["mean"])
            cmmds.append(metrics.clip_mmd(cx, c))
        for name, v in (("FID", fids), ("KID", kids), ("CMMD", cmmds)):
            assert v[0] < v[1] < v[2], (kind, name, v)
        assert fids[0] > 1e-2, (kind, fids)


# ----------------------------------------------------------------------------------------------
# The one command on a tiny random model
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nets(tmp_path_factory, random_fid_inception, tiny_clip):
    """Files for every metric: the random FID Inception, the tiny CLIP, an untrained probe as the level net."""
    d = tmp_path_factory.mktemp("nets")
    torch.manual_seed(0)
    save_probe(Probe(), d / "probe.safetensors")
    return dict(
        inception=random_fid_inception[0],
        clip=f"tiny-clip-test:{tiny_clip}",
        probe=d / "probe.safetensors",
    )


def run(args, capsys=None):
    """evaluate.main in this process; returns (exit code, printed text)."""
    try:
        code = evaluate.main([str(a) for a in args])
    except SystemExit as e:
        code = e.code
    text = capsys.readouterr() if capsys is not None else None
    return code, (text.out + text.err) if text else ""


def tiny_args(ckpt, nets, out, *extra):
    return [
        "--weights",
        ckpt,
        "--test",
        "procedural:12",
        "--size",
        32,
        32,
        "--n",
        2,
        "--steps",
        2,
        "--out",
        out,
        "--inception",
        nets["inception"],
        "--clip",
        nets["clip"],
        "--level-net",
        nets["probe"],
        "--cls-size",
        32,
        "--cls-epochs",
        1,
        *extra,
    ]


def test_one_command_generates_scores_and_reports(tiny_ckpt, nets, tmp_path, capsys):
    out = tmp_path / "eval"
    code, text = run(tiny_args(tiny_ckpt, nets, out), capsys)
    assert code == 0, text
    generated = sorted((out / "generated").glob("*.png"))
    assert len(generated) == 24 and (out / "generated" / "scene00000_1.png").is_file()
    report = json.loads((out / "report.json").read_text())
    m = report["metrics"]
    assert set(m) == {
        "fid",
        "kid",
        "precision",
        "recall",
        "clip_score",
        "cmmd",
        "cls_oa",
        "level",
        "probe_class",
    }
    assert report["skipped"] == {} and report["n_test"] == 12 and report["n_generated"] == 24
    assert (
        m["fid"]["n_real"] == 12
        and m["fid"]["n_fake"] == 24
        and "resize pytorch-fid" in m["fid"]["implementation"]
    )
    assert 0 <= m["cls_oa"]["value"] <= 1 and "scratch" in m["cls_oa"]["implementation"]
    assert m["level"]["n"] == 24 and report["generation"]["steps"] == 2
    md = (out / "report.md").read_text()
    assert (
        "| method | FID (lower) | zero-shot Cls-OA | CLIP score |" in md
        and "sampler dpmpp_2m, 2 steps" in md
    )
    assert len(list((out / "cache").glob("*.npy"))) == 2  # the real set's Inception and CLIP

    # complete: a rerun asks for --overwrite; with it nothing is regenerated, and the cache is reused
    code, text = run(tiny_args(tiny_ckpt, nets, out), capsys)
    assert code == 2 and "report.json exists" in text
    # interrupted: images missing and no report -> only the missing ones are generated, the rest kept
    kept = {p: p.stat().st_mtime_ns for p in generated[5:]}
    for p in generated[:5]:
        p.unlink()
    (out / "report.json").unlink()
    code, text = run(tiny_args(tiny_ckpt, nets, out), capsys)
    assert code == 0 and "19 of 24 images already written, 5 to go" in text, text
    assert all(p.stat().st_mtime_ns == t for p, t in kept.items())
    # other generation settings: refused, naming them; --regenerate starts over
    (out / "report.json").unlink()
    code, text = run(tiny_args(tiny_ckpt, nets, out, "--steps", 3, "--seed", 1), capsys)
    assert code == 2 and "other settings (steps, seed: 2, 0); pass --regenerate" in text, text
    code, text = run(
        tiny_args(tiny_ckpt, nets, out, "--steps", 3, "--seed", 1, "--regenerate"), capsys
    )
    assert code == 0 and "0 of 24 images already written, 24 to go" in text, text
    assert json.loads((out / "generated" / "generation.json").read_text())["steps"] == 3


def test_images_of_unknown_origin_are_not_taken_as_generated(tiny_ckpt, nets, tmp_path, capsys):
    gen = tmp_path / "eval" / "generated"
    gen.mkdir(parents=True)
    (gen / "scene00000_0.png").write_bytes(b"")
    code, text = run(tiny_args(tiny_ckpt, nets, tmp_path / "eval"), capsys)
    assert (
        code == 2 and "no generation.json: images of unknown settings; pass --regenerate" in text
    ), text
    assert (gen / "scene00000_0.png").exists()


def test_a_failing_metric_leaves_the_others_reported(tiny_ckpt, nets, tmp_path, capsys):
    """Precision / recall need more than k = 3 images a set: with 3 test images it fails, FID and KID still land."""
    out = tmp_path / "eval"
    args = tiny_args(tiny_ckpt, nets, out, "--n", 1)
    args[args.index("procedural:12")] = "procedural:3"
    code, text = run(args, capsys)
    assert (
        code == 2 and "precision_recall: precision/recall with k=3 needs more than 3 images" in text
    ), text
    report = json.loads((out / "report.json").read_text())
    assert set(report["failed"]) == {"precision_recall"}
    assert {"fid", "kid", "clip_score", "cmmd", "cls_oa", "level"} <= set(report["metrics"])


def test_without_weights_the_images_in_place_are_evaluated(tiny_ckpt, nets, tmp_path, capsys):
    out = tmp_path / "eval"
    assert run(tiny_args(tiny_ckpt, nets, out, "--n", 1), capsys)[0] == 0
    (out / "report.json").unlink()
    code, text = run(
        [
            "--test",
            "procedural:12",
            "--size",
            32,
            32,
            "--n",
            1,
            "--out",
            out,
            "--inception",
            nets["inception"],
            "--cls-size",
            32,
            "--cls-epochs",
            1,
        ],
        capsys,
    )
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert set(report["skipped"]) == {"clip", "level"} and "fid" in report["metrics"]
    assert report["weights"] == str(tiny_ckpt)  # read from the generation record
    code, text = run(
        ["--test", "procedural:12", "--size", 32, 32, "--n", 3, "--out", tmp_path / "x"], capsys
    )
    assert code == 2 and "36 missing" in text


def test_a_level_net_is_fitted_on_known_levels_and_used(tiny_ckpt, nets, tmp_path, capsys):
    out = tmp_path / "eval"
    args = tiny_args(tiny_ckpt, nets, out, "--n", 1, "--fit-level-net", "procedural:48")
    (
        args.remove("--inception"),
        args.remove(nets["inception"]),
        args.remove("--clip"),
        args.remove(nets["clip"]),
    )
    code, text = run(args, capsys)
    assert code == 0 and "level net: 48 images of levels 10..13" in text, text
    net, info = classifier.load_net(out / "level_net.safetensors")
    assert (
        info["kind"] == "levels"
        and info["trained_on"] == "procedural:48"
        and net.levels == (10, 13)
    )
    report = json.loads((out / "report.json").read_text())
    assert "level net level_net.safetensors" in report["metrics"]["level"]["implementation"]
    assert set(report["skipped"]) == {"fid", "precision_recall", "clip"}
    code, text = run(
        tiny_args(tiny_ckpt, nets, tmp_path / "x", "--fit-level-net", "nowhere"), capsys
    )
    assert code == 2 and "--fit-level-net nowhere: no such folder or manifest" in text


def test_rsicd_names_without_a_class_are_left_out_of_cls_oa(tiny_ckpt, tmp_path, capsys):
    from PIL import Image

    names = ["river_1.jpg", "river_2.jpg", "lake_1.jpg", "lake_7.jpg", "00012.jpg"]
    (tmp_path / "images").mkdir()
    for k, n in enumerate(names):
        Image.new("RGB", (40, 40), (20 * k, 90, 60)).save(tmp_path / "images" / n)
    (tmp_path / "captions.json").write_text(json.dumps({n: f"scene {n}" for n in names}))
    code, text = run(
        [
            "--weights",
            tiny_ckpt,
            "--test",
            tmp_path / "captions.json",
            "--level",
            15,
            "--n",
            2,
            "--size",
            32,
            32,
            "--steps",
            1,
            "--out",
            tmp_path / "eval",
            "--cls-size",
            32,
            "--cls-epochs",
            1,
        ],
        capsys,
    )
    assert code == 0, text
    report = json.loads((tmp_path / "eval" / "report.json").read_text())
    assert report["classes"] == ["lake", "river"] and report["n_generated"] == 10
    cls = report["metrics"]["cls_oa"]
    assert (
        cls["n_test"] == 4
        and cls["n_train"] == 8
        and "1 test images without a class left out" in cls["implementation"]
    )


@pytest.mark.skipif(
    not (SHARED / "ucm_captions").is_dir(), reason="../shared/data/ucm_captions is absent"
)
def test_ucm_captions_end_to_end_with_a_tiny_model(tiny_ckpt, tmp_path, capsys):
    """The real test set through the whole command: its first captions, its class_id classes, its gsd level."""
    out = tmp_path / "eval"
    code, text = run(
        [
            "--weights",
            tiny_ckpt,
            "--test",
            SHARED / "ucm_captions" / "dataset.json",
            "--limit",
            30,
            "--n",
            2,
            "--size",
            32,
            32,
            "--steps",
            2,
            "--out",
            out,
            "--cls-size",
            32,
            "--cls-epochs",
            1,
        ],
        capsys,
    )
    assert code == 0, text
    report = json.loads((out / "report.json").read_text())
    assert len(report["classes"]) == 21 and report["n_test"] == 30 and report["n_generated"] == 60
    cls = report["metrics"]["cls_oa"]
    assert cls["n_train"] == 60 and cls["n_test"] == 30 and 0 <= cls["value"] <= 1
    first = json.loads((SHARED / "ucm_captions" / "dataset.json").read_text())["images"]
    first = next(im for im in first if im["split"] == "test")
    from PIL import Image

    info = Image.open(out / "generated" / f"{Path(first['filename']).stem}_0.png").text
    assert info["prompt"] == first["sentences"][0]["raw"].strip() and info["level"] == "18.71406519"


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["--inception", "nowhere/pt_inception.pth"],
            "--inception nowhere/pt_inception.pth: no such file (expected "
            "pytorch-fid's pt_inception-2015-12-05-6726825d.pth there)",
        ),
        (["--resnet-init", "r18.pth"], "--resnet-init r18.pth: no such file"),
        (["--clip", "ViT-B-32"], "expected ARCH:FILE"),
        (
            ["--classes", "forest,lake"],
            "--classes does not match the test set's classes: in the test set only: airport",
        ),
        (["--test", "procedural:x"], "procedural:N"),
        (["--size", "0"], "--size >= 8"),
        (["--level-net", "configs/tiny.py"], "--level-net: configs/tiny.py"),
        (["--weights", "nowhere.safetensors"], "--weights: nowhere.safetensors: does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny_ckpt, nets, tmp_path, extra, message):
    args = tiny_args(tiny_ckpt, nets, tmp_path / "e")
    if "--clip" not in extra:  # the tiny CLIP architecture is registered in this process only
        i = args.index("--clip")
        del args[i : i + 2]
    for k in range(0, len(extra), 2):
        i = args.index(extra[k]) if extra[k] in args else None
        if i is None:
            args += extra[k : k + 2]
        else:
            args[i + 1] = extra[k + 1]
    r = subprocess.run(
        [sys.executable, "evaluate.py", *map(str, args)], cwd=ROOT, capture_output=True, text=True
    )
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not (tmp_path / "e" / "generated").exists()


# ----------------------------------------------------------------------------------------------
# The fast demo's model on procedural test scenes
# ----------------------------------------------------------------------------------------------


def test_fast_demo_model_evaluated_by_the_one_command(fast_demo, nets, tmp_path, capsys):
    """The fast demo's model (U-Net 600 steps from scratch) on 48 procedural test scenes, 10 images each (the
    protocol's N), 20 steps, its own probe as the level net, Cls-OA at 32 px from scratch. The FID Inception and
    CLIP are random here (nothing can be downloaded), so only the probe's and the classifier's figures mean
    something. Measured (Xeon AVX-512, 2 cores, 70 s): Cls-OA 47.9%, probe class 59.0%, level exact 24.4%,
    within one 51.0%, corr. 0.43 (chance: 8.3% for the classes, 11% for the levels)."""
    out, _ = fast_demo
    code, text = run(
        [
            "--weights",
            out / "model.safetensors",
            "--test",
            "procedural:48",
            "--n",
            10,
            "--cfg",
            3,
            "--level-cfg",
            6,
            "--out",
            tmp_path / "eval",
            "--inception",
            nets["inception"],
            "--clip",
            nets["clip"],
            "--level-net",
            out / "probe.safetensors",
            "--cls-size",
            32,
        ],
        capsys,
    )
    assert code == 0, text
    m = json.loads((tmp_path / "eval" / "report.json").read_text())["metrics"]
    assert m["cls_oa"]["value"] > 0.25 and m["cls_oa"]["n_train"] == 480, m["cls_oa"]
    assert m["probe_class"]["value"] > 0.4, m["probe_class"]
    assert m["level"]["within_one"] > 0.35 and m["level"]["corr"] > 0.25, m["level"]
