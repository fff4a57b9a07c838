"""Set distances (evaluation/metrics.py) against pytorch-fid and direct formulas; the CLIP score
(evaluation/clip.py) against open_clip's own model; the test-set readers (evaluation/testset.py)."""

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from evaluation import metrics
from evaluation.testset import EvalImage, check_classes, class_from_name, load_testset, read_image

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def features(n, d, seed, shift=0.0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g) / math.sqrt(d)  # correlated dimensions
    return (torch.randn(n, d, generator=g) @ mix) * scale + shift


# ----------------------------------------------------------------------------------------------
# FID
# ----------------------------------------------------------------------------------------------


def test_frechet_distance_equals_pytorch_fid():
    from pytorch_fid.fid_score import calculate_frechet_distance

    a, b = features(400, 24, 0), features(300, 24, 1, shift=0.3, scale=1.2)
    (m1, s1), (m2, s2) = metrics.stats(a), metrics.stats(b)
    ref = calculate_frechet_distance(m1.numpy(), s1.numpy(), m2.numpy(), s2.numpy())
    ours, other = (
        metrics.frechet_distance(m1, s1, m2, s2),
        metrics.frechet_distance_eigvals(m1, s1, m2, s2),
    )
    assert ours == pytest.approx(ref, rel=1e-6) and other == pytest.approx(ref, rel=1e-6)
    np.testing.assert_allclose(
        s1.numpy(), np.cov(a.double().numpy(), rowvar=False), rtol=1e-12
    )  # pytorch-fid's


def test_frechet_distance_of_gaussians_in_closed_form():
    """Diagonal covariances: FID = |mu1 - mu2|^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    s1, s2 = torch.tensor([1.0, 4.0, 9.0]).double(), torch.tensor([4.0, 4.0, 1.0]).double()
    mu1, mu2 = torch.zeros(3).double(), torch.tensor([1.0, 2.0, 0.0]).double()
    expected = 5.0 + ((s1.sqrt() - s2.sqrt()) ** 2).sum().item()
    assert metrics.frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(
        expected, rel=1e-12
    )


def test_fid_of_a_set_with_itself_is_zero_and_few_images_warn():
    a = features(200, 16, 2)
    assert abs(metrics.fid(a, a)) < 1e-8
    with pytest.warns(
        UserWarning, match="FID from 200 real and 10 generated images of 16-d features"
    ):
        metrics.fid(a, features(10, 16, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        metrics.fid(a, features(100, 16, 3))  # 200 and 100 images of 16-d: no warning


# ----------------------------------------------------------------------------------------------
# KID, CMMD, precision / recall
# ----------------------------------------------------------------------------------------------


def test_kid_averages_the_mmd_of_random_subsets_drawn_as_torch_fidelity_draws_them():
    """KID = mean and std over subsets of polynomial_mmd, the subsets drawn by numpy's RandomState(seed).choice
    without replacement, real then generated, in turn (torch-fidelity's order: its figure from the same features).
    torch-fidelity itself is not a dev dependency: it installs a top-level `tests` package over ours."""
    a, b = features(120, 32, 4).float(), features(100, 32, 5, shift=0.2).float()
    rng = np.random.RandomState(2020)
    mmds = []
    for _ in range(7):
        i, j = rng.choice(120, 50, replace=False), rng.choice(100, 50, replace=False)
        mmds.append(metrics.polynomial_mmd(a[i].double(), b[j].double()))
    ours = metrics.kernel_distance(a, b, subsets=7, subset_size=50, seed=2020)
    assert ours["mean"] == pytest.approx(np.mean(mmds), rel=1e-12) and ours["std"] == pytest.approx(
        np.std(mmds)
    )
    whole = metrics.kernel_distance(
        a[:100], b, subsets=1, subset_size=1000
    )  # every image, in some order
    assert whole["subset_size"] == 100 and whole["mean"] == pytest.approx(
        metrics.polynomial_mmd(a[:100].double(), b.double())
    )


def test_polynomial_mmd_matches_a_direct_double_sum():
    x, y = features(6, 5, 6).double(), features(6, 5, 7, shift=0.5).double()

    def k(a, b):
        return (float(a @ b) / 5 + 1) ** 3

    m = 6
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m**2
    assert metrics.polynomial_mmd(x, y) == pytest.approx(xx + yy - 2 * xy, rel=1e-10)


def test_cmmd_matches_a_direct_double_sum_and_scales_with_shift():
    x, y = features(7, 4, 8).double(), features(5, 4, 9, shift=1.0).double()
    xn, yn = x / x.norm(dim=1, keepdim=True), y / y.norm(dim=1, keepdim=True)

    def k(a, b):
        return sum(math.exp(-float((u - v).square().sum()) / 200) for u in a for v in b) / (
            len(a) * len(b)
        )

    assert metrics.clip_mmd(x, y) == pytest.approx(
        1000 * (k(xn, xn) + k(yn, yn) - 2 * k(xn, yn)), rel=1e-9
    )
    assert metrics.clip_mmd(x, x) == pytest.approx(0, abs=1e-9)


def test_precision_recall_on_known_layouts():
    real = features(200, 8, 10)
    assert metrics.precision_recall(real, real) == dict(precision=1.0, recall=1.0, k=3)
    far = metrics.precision_recall(real, real + 100)
    assert far["precision"] == 0 and far["recall"] == 0
    two = torch.cat([real[:100], real[100:] + 50])  # two separate modes
    pr = metrics.precision_recall(two, two[:100])  # a fake set that drops one of them
    assert pr["precision"] == 1.0 and pr["recall"] == 0.5
    pr = metrics.precision_recall(two[:100], two)  # and one that adds a mode
    assert pr["precision"] == 0.5 and pr["recall"] == 1.0
    with pytest.raises(ValueError, match="more than 3"):
        metrics.precision_recall(real, real[:3])


def test_feature_cache_is_reused_only_for_the_same_files(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"1"), b.write_bytes(b"22")
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(2, 3)

    k1 = metrics.cache_key([a, b], net="x")
    f = metrics.cached_features(tmp_path / "cache", "inception", k1, compute)
    g = metrics.cached_features(tmp_path / "cache", "inception", k1, compute)
    assert torch.equal(f, g) and len(calls) == 1 and f.dtype == torch.float64
    assert metrics.cache_key([a], net="x") != k1 and metrics.cache_key([a, b], net="y") != k1


# ----------------------------------------------------------------------------------------------
# CLIP score through open_clip
# ----------------------------------------------------------------------------------------------


def test_clip_score_equals_open_clip_cosines(tiny_clip):
    import open_clip
    from evaluation import clip as clipnet

    net = clipnet.load_clip("tiny-clip-test", tiny_clip)
    images = torch.rand(3, 3, 40, 40) * 2 - 1
    texts = ["a forest", "a river crossing farmland", "dense residential area"]
    img, txt = clipnet.image_embeddings(net, images), clipnet.text_embeddings(net, texts)
    model, _, preprocess = open_clip.create_model_and_transforms(
        "tiny-clip-test", pretrained=str(tiny_clip)
    )
    with torch.no_grad():
        ri = model.encode_image(
            torch.stack([preprocess(clipnet._pil(im)) for im in images])
        ).double()
        rt = model.encode_text(open_clip.get_tokenizer("tiny-clip-test")(texts)).double()
    cos = torch.nn.functional.cosine_similarity(ri, rt)
    assert clipnet.clip_score(img, txt) == pytest.approx(
        100 * cos.clamp_min(0).mean().item(), rel=1e-6
    )
    assert torch.allclose(img.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_clip_errors_name_the_file_and_the_format(tiny_clip, tmp_path):
    from evaluation import clip as clipnet
    from model.release import WeightsError

    with pytest.raises(ValueError, match="ARCH:FILE"):
        clipnet.parse_spec("RemoteCLIP.pt")
    with pytest.raises(WeightsError, match="missing.pt"):
        clipnet.load_clip("tiny-clip-test", tmp_path / "missing.pt")
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        clipnet.load_clip("no-such-arch", tiny_clip)


# ----------------------------------------------------------------------------------------------
# Test sets
# ----------------------------------------------------------------------------------------------


def test_rsicd_class_names_and_class_checks():
    assert class_from_name("denseresidential_12.jpg") == "denseresidential"
    assert class_from_name("00012.jpg") is None and class_from_name("airport_3.png") == "airport"
    assert check_classes(["a", "b"], None) == ["a", "b"]
    with pytest.raises(ValueError, match="in the test set only: b; in --classes only: c"):
        check_classes(["a", "b"], ["a", "c"])


def test_procedural_test_set_is_written_once_and_labelled(tmp_path):
    images, classes = load_testset("procedural:24", out=tmp_path, size=32)
    assert len(images) == 24 and len(classes) == 12 and isinstance(images[0], EvalImage)
    assert [im.level for im in images[:12]] == [10.0] * 12 and images[12].level == 14.0
    first = read_image(images[0].path)
    assert first.shape == (3, 32, 32) and -1 <= first.min() and first.max() <= 1
    mtime = images[0].path.stat().st_mtime_ns
    again, _ = load_testset("procedural:24", out=tmp_path, size=32)
    assert again == images and images[0].path.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="procedural:N"):
        load_testset("procedural:many", out=tmp_path)


def test_testset_errors(tmp_path):
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match="neither a Karpathy json"):
        load_testset(tmp_path / "bad.json")
    (tmp_path / "caps.json").write_text(json.dumps({"river_1.jpg": "a river"}))
    with pytest.raises(ValueError, match="1 image files are missing"):
        load_testset(tmp_path / "caps.json")
    with pytest.raises(ValueError, match="does not exist"):
        load_testset(tmp_path / "none.json")
    for entry, message in (
        ({"filename": "a_1.jpg", "split": "test", "sentences": ["a river"]}, "no 'raw' caption"),
        (
            {"filename": "a_1.jpg", "split": "test", "sentences": [{"raw": "x"}], "class_id": 5},
            "class_id 5 is not an index into its 2 classes",
        ),
    ):
        (tmp_path / "k.json").write_text(json.dumps({"images": [entry], "classes": ["a", "b"]}))
        with pytest.raises(ValueError, match=message):
            load_testset(tmp_path / "k.json")
    (tmp_path / "caps.json").write_text(json.dumps({"river_1.jpg": " "}))
    with pytest.raises(ValueError, match="1 images have an empty caption"):
        load_testset(tmp_path / "caps.json")


@pytest.mark.skipif(
    not (SHARED / "ucm_captions").is_dir(), reason="../shared/data/ucm_captions is absent"
)
def test_real_test_sets_read_their_classes_and_levels():
    ucm, classes = load_testset(SHARED / "ucm_captions" / "dataset.json", split="test")
    assert (
        len(ucm) == 210 and len(classes) == 21 and ucm[0].level == pytest.approx(18.714, abs=1e-3)
    )
    assert all(im.label in classes and im.caption for im in ucm)
    rsicd, classes = load_testset(SHARED / "rsicd_sample" / "captions.json")
    assert len(rsicd) == 40 and "stadium" in classes and rsicd[0].level is None
