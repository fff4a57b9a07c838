"""Realism without downloads: the two-sample test's arithmetic, balance and determinism, FID / KID in a
learnt feature space, save / load; then the scale on real UC Merced images (two halves of a set, a blurred
set, noise) and on procedural renders where no real data is needed."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from evaluation.probe import blur, make_probe_data
from evaluation.realism import (
    Critic,
    FilesAsTrained,
    _binomial_tail,
    _wilson,
    feature_distances,
    features,
    load_feature_net,
    save_feature_net,
    to_grid,
    train_feature_net,
    two_sample_accuracy,
)
from evaluation.testset import read_image
from model.release import WeightsError

UCM = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "ucm_captions"


def _noise(shape, seed):
    """Gaussian noise images, std 0.5, clamped to [-1, 1]."""
    return (0.5 * torch.randn(shape, generator=torch.Generator().manual_seed(seed))).clamp(-1, 1)


def _noisy(x, std, seed=0):
    """x with Gaussian noise of standard deviation `std` added, clamped to [-1, 1]."""
    return (x + std * torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))).clamp(
        -1, 1
    )


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module (restored after): where another process shares the two
    cores, OpenMP threads waiting on each other stall; beside a CI run the UCM feature net trained
    in 53 s on one thread and 448 s on two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def renders():
    """Procedural renders at 32 px, 12 classes: 240 to train a feature net on, 120 held out."""
    return make_probe_data(240, size=32, seed=11), make_probe_data(120, size=32, seed=12)


# ----------------------------------------------------------------------------------------------
# Images and arithmetic
# ----------------------------------------------------------------------------------------------
def test_to_grid_resizes_and_rounds_to_8_bit_levels():
    x = torch.rand(3, 48, 40) * 2.4 - 1.2  # values beyond [-1, 1] are clamped
    g = to_grid([x, torch.zeros(3, 16, 16)], 16)
    assert g.shape == (2, 3, 16, 16) and g.dtype == torch.float32
    assert g.min() >= -1 and g.max() <= 1
    levels = (g + 1) * 127.5
    assert torch.allclose(levels, levels.round(), atol=1e-4)  # on the 8-bit grid
    # 0 is level 127.5, rounded to 128 (float32 cancellation in 128 / 127.5 - 1: atol)
    assert torch.allclose(g[1], torch.full((3, 16, 16), 128 / 127.5 - 1), atol=1e-6)
    # already 8-bit at its size: kept
    u8 = torch.randint(0, 256, (2, 3, 16, 16)).float() / 127.5 - 1
    assert torch.allclose(to_grid(u8, 16), u8, atol=1e-6)
    with pytest.raises(ValueError, match=r"image 0 must be \(3, H, W\)"):
        to_grid([torch.zeros(1, 8, 8)], 8)


def test_files_as_trained_read_as_the_training_transform(tmp_path):
    from PIL import Image

    from data.transforms import eval_transform

    u8 = torch.randint(
        0, 256, (50, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)
    )
    Image.fromarray(u8.numpy()).save(tmp_path / "a.png")
    files = FilesAsTrained([tmp_path / "a.png"], 16)
    assert len(files) == 1
    with Image.open(tmp_path / "a.png") as im:
        assert torch.equal(files[0], eval_transform(16)(im.convert("RGB")))
    assert files[0].shape == (3, 16, 16)


def test_critic_shapes_and_its_smallest_image():
    net = Critic(5, width=4)
    assert net(torch.zeros(2, 3, 16, 16)).shape == (2, 5)
    assert net.features(torch.zeros(2, 3, 24, 24)).shape == (2, 32)  # mean and std of 4 * 4
    with pytest.raises(ValueError, match="at least 16 x 16 pixels"):
        net(torch.zeros(2, 3, 8, 8))


def test_binomial_tail_and_wilson_interval():
    assert _binomial_tail(0, 10) == 1.0
    assert _binomial_tail(10, 10) == 2**-10
    assert _binomial_tail(3, 4) == 5 / 16  # P(3) + P(4) = (4 + 1) / 16
    assert abs(_binomial_tail(210, 420) - 0.5 - math.comb(420, 210) / 2**421) < 1e-12  # symmetry
    lo, hi = _wilson(0.5, 420)
    assert lo < 0.5 < hi and abs((hi - lo) / 2 - 1.96 * 0.5 / math.sqrt(420)) < 1e-3
    lo, hi = _wilson(1.0, 100)  # stays inside [0, 1] where the normal interval would not
    assert 0.95 < lo < 1.0 and hi == pytest.approx(1.0)


def test_two_sample_accuracy_refuses_too_few_images():
    x = torch.zeros(5, 3, 16, 16)
    with pytest.raises(ValueError, match="2 images per fold of each set: 4 folds, 5 real and 9"):
        two_sample_accuracy(x, torch.zeros(9, 3, 16, 16), folds=4)
    with pytest.raises(ValueError, match="folds >= 2"):
        two_sample_accuracy(x, x, folds=1)


# ----------------------------------------------------------------------------------------------
# The two-sample test on procedural renders
# ----------------------------------------------------------------------------------------------
def test_two_sample_accuracy_balances_the_sets_and_is_seeded(renders):
    (x, _, _), _ = renders
    real, fake = x[:40], _noisy(x[40:100], 0.2)  # 40 against 60: 40 of each are used
    kw = dict(size=32, folds=4, steps=20, seed=3)
    r = two_sample_accuracy(real, fake, **kw)
    assert (r["n_real"], r["n_fake"], r["n_real_given"], r["n_fake_given"]) == (40, 40, 40, 60)
    assert len(r["fold_accuracy"]) == 4 and r["folds"] == 4 and r["steps"] == 20
    assert r["interval"][0] <= r["accuracy"] <= r["interval"][1]
    assert r["stderr"] == pytest.approx(math.sqrt(r["accuracy"] * (1 - r["accuracy"]) / 80))
    assert r["accuracy"] == pytest.approx((r["real_accuracy"] + r["fake_accuracy"]) / 2)
    assert r["accuracy"] == pytest.approx(sum(r["fold_accuracy"]) / 4)  # 20 images in each part
    rng = torch.get_rng_state()
    again = two_sample_accuracy(real, fake, **kw)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    assert {k: v for k, v in again.items() if k != "seconds"} == {
        k: v for k, v in r.items() if k != "seconds"
    }


def test_procedural_renders_against_noise_are_told_apart(renders):
    """No real data needed: 60 renders against 60 noise images at 32 px, 60 steps; measured 1.0."""
    (x, _, _), _ = renders
    r = two_sample_accuracy(x[:60], _noise((60, 3, 32, 32), 1), size=32, steps=60)
    assert r["accuracy"] > 0.95 and r["p_value"] < 1e-6, r


# ----------------------------------------------------------------------------------------------
# FID / KID in a learnt feature space, on procedural renders
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def render_net(renders):
    """A feature net trained on 240 renders' 12 classes at 32 px, 150 steps."""
    (x, y, _), _ = renders
    return train_feature_net(x, y, 12, size=32, steps=150, width=8)


def test_feature_fid_is_zero_on_a_set_against_itself_and_grows_with_noise(renders, render_net):
    """Measured: 1e-11 against itself; 0.06, 0.79, 7.5, 21 for noise of std 0.05, 0.1, 0.2, 0.4."""
    _, (held, _, _) = renders
    same = feature_distances(render_net, held, held)
    assert abs(same["fid"]) < 1e-6 and same["dim"] == 64 and same["n_real"] == 120
    fids = [
        feature_distances(render_net, held, _noisy(held, s))["fid"] for s in (0.05, 0.1, 0.2, 0.4)
    ]
    assert fids[0] > 0.01 and all(a < b for a, b in zip(fids, fids[1:])), fids


def test_feature_net_learns_the_classes(renders, render_net):
    """The feature space reads scene content: held-out renders' classes from the net's head, far
    above chance (1/12); measured 0.82."""
    _, (held, labels, _) = renders
    with torch.no_grad():
        pred = render_net(to_grid(held, 32)).argmax(-1)
    assert (pred == labels).double().mean() > 0.5


def test_feature_net_save_and_load(tmp_path, renders, render_net):
    _, (held, _, _) = renders
    path = tmp_path / "net.safetensors"
    save_feature_net(render_net, path, {"recipe": "renders"})
    net, info = load_feature_net(path)
    assert info == {"recipe": "renders", "num_classes": 12, "width": 8, "size": 32}
    assert net.size == 32 and not net.training
    assert torch.equal(features(net, held[:10]), features(render_net, held[:10]))
    other = tmp_path / "other.safetensors"
    save_file({"w": torch.zeros(1)}, str(other), metadata={"format": "text2earth-probe"})
    with pytest.raises(WeightsError, match="not a realism feature net"):
        load_feature_net(other)


def test_train_feature_net_checks_labels():
    x = torch.zeros(4, 3, 16, 16)
    with pytest.raises(ValueError, match=r"one per image, shape \(4,\)"):
        train_feature_net(x, [0, 1], 2, size=16)
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\), got \[0, 2\]"):
        train_feature_net(x, [0, 1, 2, 0], 2, size=16)


# ----------------------------------------------------------------------------------------------
# The scale on real UC Merced images at 64 px
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ucm():
    """UCM-Captions' val and test images at 64 px (read_image: torch's antialiased bilinear resize),
    shuffled (seed 0), and their classes."""
    if not (UCM / "dataset.json").is_file():
        pytest.skip(f"UCM-Captions not found at {UCM} (shared data, absent on a fresh clone)")
    d = json.loads((UCM / "dataset.json").read_text())
    items = [i for i in d["images"] if i["split"] in ("val", "test")]
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    x = torch.stack([read_image(UCM / "images" / items[i]["filename"], 64) for i in order])
    return x, torch.tensor([items[i]["class_id"] for i in order])


def test_ucm_two_halves_are_indistinguishable(ucm):
    """210 against 210 real images: chance is 1/2, the binomial standard error 0.5 / sqrt(420) =
    0.024, and over 11 other splits and seeds the accuracy measured 0.46..0.54 (sd 0.026); on this
    split 0.531, 0.519, 0.519 at seeds 0-2 (one thread). The bound 0.1 is four standard errors."""
    x, _ = ucm
    r = two_sample_accuracy(x[:210], x[210:420])
    assert abs(r["accuracy"] - 0.5) < 0.1 and r["n_real"] == 210, r


def test_ucm_blur_lies_between_halves_and_noise(ucm):
    """A Gaussian blur of sigma 0.5 px at 64 px is a mild softening: measured 0.693, 0.714, 0.700 at
    seeds 0-2 on one thread (0.72-0.75 on two), between the halves' 1/2 and noise's 1.0; the bounds
    lie four standard errors (0.022) beyond that range. Noise: 1.0 from 64 images a side."""
    x, _ = ucm
    r = two_sample_accuracy(x[:210], blur(x[210:420], 0.5))
    assert 0.6 < r["accuracy"] < 0.9, r
    noise = two_sample_accuracy(x[:64], _noise((64, 3, 64, 64), 2), steps=60)
    assert noise["accuracy"] > 0.95, noise


def test_ucm_feature_fid_grows_with_degradation(ucm):
    """A feature net trained on 210 val and test images' 21 classes, scored on the other 210 as two
    halves: FID of one half against the other is the floor (measured 1.9), noise added to the
    second half lies above it in order of strength (5.5 at std 0.1, 36 at 0.3)."""
    x, y = ucm
    net = train_feature_net(x[:210], y[:210], 21, steps=150, width=8)
    a, b = x[210:315], x[315:420]
    fid = {
        name: feature_distances(net, a, f)["fid"]
        for name, f in (("halves", b), ("noise 0.1", _noisy(b, 0.1)), ("noise 0.3", _noisy(b, 0.3)))
    }
    assert fid["halves"] < fid["noise 0.1"] < fid["noise 0.3"], fid
