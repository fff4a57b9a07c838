"""Conditioning probes: integer-level data, shapes, accuracy arithmetic, determinism, a run that learns."""

import numpy as np
import pytest
import torch

from data.synthetic import CLASSES
from evaluation.probe import Probe, augment, blur, evaluate_probe, make_probe_data, train_probe


@pytest.fixture(scope="module")
def small_data():
    """Train and held-out procedural renders at 32 px (disjoint seeds), 8 and 2 of each (class, level)."""
    return make_probe_data(864, size=32, seed=0), make_probe_data(216, size=32, seed=1)


# ----------------------------------------------------------------------------------------------
# Data and shapes
# ----------------------------------------------------------------------------------------------
def test_make_probe_data_integer_levels_balanced_and_seeded():
    x, y, lv = make_probe_data(108, size=32, seed=3)
    assert x.shape == (108, 3, 32, 32) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert torch.equal(y, torch.arange(108) % len(CLASSES))
    assert torch.equal(lv, lv.round()) and lv.min() == 10 and lv.max() == 18
    pairs = set(zip(y.tolist(), lv.tolist()))
    assert len(pairs) == 108  # each (class, level) once
    x2, _, _ = make_probe_data(12, size=32, seed=3)
    assert torch.equal(x2, x[:12])  # sample i depends on (seed, i) only
    x3, _, _ = make_probe_data(12, size=32, seed=4)
    assert not torch.equal(x3, x[:12])
    _, _, lf = make_probe_data(12, size=32, seed=3, integer_levels=False)
    assert not torch.equal(lf, lf.round()) and lf.min() >= 10 and lf.max() <= 18


@pytest.mark.parametrize("size", [32, 64])
def test_probe_output_shapes(size):
    probe = Probe().eval()
    c, l = probe(torch.zeros(2, 3, size, size))
    assert c.shape == (2, len(CLASSES)) and l.shape == (2, 9)
    cls, lev = probe.predict(torch.zeros(3, 3, size, size))
    assert cls.shape == lev.shape == (3,) and ((lev >= 10) & (lev <= 18)).all()


def test_shape_errors_are_clear():
    probe = Probe()
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        probe(torch.zeros(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        probe(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match="16x16"):
        probe(torch.zeros(1, 3, 8, 8))
    with pytest.raises(ValueError, match="labels and levels"):
        evaluate_probe(probe, torch.zeros(4, 3, 32, 32), torch.zeros(3), torch.zeros(4))
    with pytest.raises(ValueError, match=r"images must be \(N, 3, H, W\)"):
        evaluate_probe(probe, torch.zeros(4, 32, 32), torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="labels and levels"):
        train_probe(
            (torch.zeros(4, 3, 32, 32), torch.zeros(4), torch.zeros(5)), steps=1, batch_size=2
        )
    with pytest.raises(ValueError, match="integers"):
        Probe(levels=(10, 18.5))
    with pytest.raises(ValueError, match="positive"):
        make_probe_data(0, size=32)


def test_augment_keeps_shape_range_and_blur_keeps_mean():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(8, 3, 32, 32) * 2 - 1
    y = augment(x, g)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    b = blur(x, 1.0)
    assert b.shape == x.shape
    torch.testing.assert_close(b.mean((-2, -1)), x.mean((-2, -1)), atol=0.03, rtol=0)
    assert b.std() < x.std()  # white noise loses most of its variance
    flat = torch.full((1, 3, 16, 16), 0.3)
    torch.testing.assert_close(blur(flat, 0.8), flat)


# ----------------------------------------------------------------------------------------------
# evaluate_probe arithmetic on a hand-made case
# ----------------------------------------------------------------------------------------------
class _Oracle(Probe):
    """Predicts the class and level written into pixel (0, 0) of channels 0 and 1."""

    def forward(self, x):
        cls = x[:, 0, 0, 0].round().long()
        lev = x[:, 1, 0, 0].round().long() - self.levels[0]
        return (
            torch.nn.functional.one_hot(cls, self.num_classes).float(),
            torch.nn.functional.one_hot(lev, self.levels[1] - self.levels[0] + 1).float(),
        )


def test_evaluate_probe_arithmetic():
    pred_cls, pred_lev = [0, 1, 2, 3, 4], [10, 12, 15, 18, 14]
    x = torch.zeros(5, 3, 16, 16)
    x[:, 0, 0, 0], x[:, 1, 0, 0] = torch.tensor(pred_cls).float(), torch.tensor(pred_lev).float()
    asked_cls = torch.tensor([0, 1, 5, 5, 4])  # 3 of 5 right
    asked_lev = torch.tensor([10.0, 13.0, 17.0, 18.0, 11.6])  # errors 0, 1, 2, 0, 2 (11.6 -> 12)
    r = evaluate_probe(_Oracle(), x, asked_cls, asked_lev)
    corr = np.corrcoef(pred_lev, [10, 13, 17, 18, 12])[0, 1]
    assert r == pytest.approx(
        dict(class_acc=0.6, level_acc=0.4, level_acc_pm1=0.6, level_corr=corr)
    )
    x[:, 1, 0, 0] = 14.0  # one level read for all: no trend
    assert evaluate_probe(_Oracle(), x, asked_cls, asked_lev)["level_corr"] == 0.0


# ----------------------------------------------------------------------------------------------
# Training: determinism and a tiny run that learns
# ----------------------------------------------------------------------------------------------
def test_training_is_deterministic_for_a_seed(small_data):
    (x, y, lv), _ = small_data
    data = (x[:64], y[:64], lv[:64])
    a, b = (train_probe(data, steps=3, batch_size=16, seed=5) for _ in range(2))
    c = train_probe(data, steps=3, batch_size=16, seed=6)
    for (k, p), q, r in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values()
    ):
        assert torch.equal(p, q), k
    assert any(not torch.equal(p, r) for p, r in zip(a.parameters(), c.parameters()))
    assert not a.training


def test_probe_learns_far_above_chance(small_data):
    train, (x, y, lv) = small_data
    probe = train_probe(train, steps=400, batch_size=32, lr=3e-3, seed=0)
    r = evaluate_probe(probe, x, y, lv)
    # chance: class 1/12 = 0.08, exact level 1/9 = 0.11, level within +-1 25/81 = 0.31. Measured 0.89,
    # 0.22, 0.53: at 32 px and 400 steps the level is only starting to be learnt (64 px, 1000 steps:
    # 0.98, 0.54, 0.83)
    assert r["class_acc"] > 0.6, r
    assert r["level_acc"] > 0.16, r
    assert r["level_acc_pm1"] > 0.45, r
