"""The FID Inception: parity with pytorch-fid's own InceptionV3 (its real import path, our random weights), the
FID-specific blocks against torchvision's, the two resize modes, batching, and loading errors.

Inception at 299 px costs ~0.07 s per image on 2 CPU cores (Xeon, AVX-512): a few images at a time.
"""

import io

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from data.transforms import tensor_to_pil
from evaluation.inception import (
    FEATURES,
    INCEPTION_FILE,
    RESIZE_MODES,
    FIDInception,
    fid_features,
    load_fid_inception,
    resize_for_fid,
)
from model.release import WeightsError


def rel_diff(a, b):
    """max |a - b| / max |b|: the relative tolerance the parity checks use."""
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.fixture(scope="module")
def weights(random_fid_inception):
    return random_fid_inception


@pytest.fixture(scope="module")
def pytorch_fid_net(weights):
    """pytorch_fid.inception.InceptionV3([3]) (use_fid_inception=True), its download replaced by our file."""
    import pytorch_fid.inception as pfi

    asked = []

    def fake_download(url, **kwargs):
        asked.append(url)
        return torch.load(weights[0], weights_only=True)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(pfi, "load_state_dict_from_url", fake_download)
        ref = pfi.InceptionV3([3]).eval()
    assert len(asked) == 1 and asked[0].endswith(
        INCEPTION_FILE
    )  # it asked for the file we stand in for
    return ref


@pytest.fixture(scope="module")
def loaded(weights):
    return load_fid_inception(weights[0])


def unit_images(n, size, seed):
    """n images (n, 3, size, size) in [0, 1]: noise over a smooth ramp, different statistics per image."""
    g = torch.Generator().manual_seed(seed)
    ramp = torch.linspace(0, 1, size).expand(size, size)
    x = torch.rand(n, 3, size, size, generator=g) * 0.6 + 0.4 * ramp
    return x ** torch.linspace(0.5, 2.0, n).view(n, 1, 1, 1)


# ----------------------------------------------------------------------------------------------
# Parity with pytorch-fid
# ----------------------------------------------------------------------------------------------
def test_loads_strictly_what_pytorch_fid_loads(weights, loaded, tmp_path):
    path, net = weights
    expected = net.state_dict()
    got = loaded.state_dict()
    assert got.keys() == expected.keys() and not loaded.training
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    # a safetensors copy, and a file without BatchNorm's step counters (older torch wrote none), load the same
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in expected.items()}, str(tmp_path / "fid.safetensors"))
    no_counters = {k: v for k, v in expected.items() if not k.endswith("num_batches_tracked")}
    torch.save(no_counters, tmp_path / "old.pth")
    for p in (tmp_path / "fid.safetensors", tmp_path / "old.pth"):
        state = load_fid_inception(p).state_dict()
        assert all(torch.equal(state[k], expected[k]) for k in no_counters)


def test_pool_features_match_pytorch_fid_at_299(loaded, pytorch_fid_net):
    x01 = unit_images(2, 299, seed=1)
    with torch.no_grad():
        ref = pytorch_fid_net(x01)[0].flatten(1)  # resize_input is a no-op at 299; it does 2x - 1
        ours = loaded(2 * x01 - 1)  # our input scale
    assert ours.shape == (2, FEATURES) and ours.dtype == torch.float32
    d = rel_diff(ours, ref)
    print(f"299 px: max |ours - pytorch-fid| / max |pytorch-fid| = {d:.2e}")
    assert d <= 1e-4
    assert rel_diff(ours[0], ours[1]) > 1e-2  # the features depend on the image
    with torch.no_grad():
        logits = loaded.logits(2 * x01[:1] - 1)
    assert logits.shape == (1, 1008)
    assert torch.allclose(logits, loaded.fc(ours[:1]), rtol=1e-5, atol=1e-5)


def test_pool_features_match_pytorch_fid_through_its_resize(loaded, pytorch_fid_net):
    x01 = unit_images(2, 256, seed=2)
    with torch.no_grad():
        ref = pytorch_fid_net(x01)[0].flatten(1)  # its bilinear resize to 299, then 2x - 1
    ours = fid_features(loaded, 2 * x01 - 1, resize="pytorch-fid")
    assert ours.shape == (2, FEATURES) and ours.dtype == torch.float64
    d = rel_diff(ours, ref)
    print(f"256 px via resize_for_fid: max |ours - pytorch-fid| / max |pytorch-fid| = {d:.2e}")
    assert d <= 1e-4


def test_fid_blocks_differ_from_torchvision_inception(weights):
    """torchvision's Inception3 has the same keys but counts padding in its average pools and averages in Mixed_7c:
    the same weights give other features, so the FID-specific pools are in place."""
    import torchvision

    path, net = weights
    tv = torchvision.models.inception_v3(
        weights=None, aux_logits=False, init_weights=False, num_classes=1008
    )
    tv.load_state_dict(net.state_dict())  # strict: our layout is torchvision's key for key
    tv.fc = nn.Identity()  # its pool features, flattened (dropout is off in eval)
    x = 2 * unit_images(1, 299, seed=1) - 1
    with torch.no_grad():
        d = rel_diff(tv.eval()(x), net(x))
    print(f"torchvision Inception3, same weights: relative difference {d:.2e}")
    assert d > 1e-2


# ----------------------------------------------------------------------------------------------
# Resizing
# ----------------------------------------------------------------------------------------------
def clean_fid_expected(images):
    """clean-fid's resize, done the long way: each image saved as an 8-bit PNG and read back, each channel a PIL "F"
    image resized bicubic to 299x299, clipped to 0..255, mapped to [-1, 1]."""
    out = []
    for img in images:
        buf = io.BytesIO()
        tensor_to_pil(img).save(buf, format="PNG")
        rgb = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB")).astype(
            np.float32
        )  # (H, W, 3)
        chans = [
            np.asarray(Image.fromarray(rgb[..., c], mode="F").resize((299, 299), Image.BICUBIC))
            for c in range(3)
        ]
        out.append(np.clip(np.stack(chans), 0, 255) / 255 * 2 - 1)
    return torch.from_numpy(np.stack(out)).float()


def test_clean_resize_is_pil_bicubic_per_channel_of_the_8_bit_image():
    g = torch.Generator().manual_seed(3)
    x = (
        torch.rand(2, 3, 64, 48, generator=g) * 2.2 - 1.1
    )  # not square, and past [-1, 1]: PNG clamps
    got = resize_for_fid(x, "clean")
    assert got.shape == (2, 3, 299, 299) and got.dtype == torch.float32
    assert (got - clean_fid_expected(x)).abs().max() <= 1e-5
    assert got.min() >= -1 and got.max() <= 1  # the bicubic's overshoot is clipped
    assert (got - resize_for_fid(x, "pytorch-fid")).abs().max() > 1e-2
    # at 299 px an 8-bit image passes unchanged
    u8 = torch.randint(0, 256, (1, 3, 299, 299), generator=g).float() / 127.5 - 1
    assert (resize_for_fid(u8, "clean") - u8).abs().max() <= 1e-5


def test_pytorch_fid_resize_is_identity_at_299_and_keeps_device_and_range():
    x = unit_images(1, 299, seed=4) * 2 - 1
    assert (resize_for_fid(x, "pytorch-fid") - x).abs().max() <= 1e-6
    y = resize_for_fid(x[:, :, :200, :100], "pytorch-fid")
    assert y.shape == (1, 3, 299, 299) and y.min() >= -1 and y.max() <= 1


def test_unknown_resize_mode_names_the_modes():
    with pytest.raises(ValueError, match="pytorch-fid, clean"):
        resize_for_fid(torch.zeros(1, 3, 8, 8), "bicubic")
    assert RESIZE_MODES == ("pytorch-fid", "clean")


# ----------------------------------------------------------------------------------------------
# fid_features batching (a stand-in network: the real one is slow) and input checks
# ----------------------------------------------------------------------------------------------
class Stub(nn.Module):
    """(B, 3, 299, 299) -> (B, 2048): the first 2048 pixel values, and how many images each call saw."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))
        self.calls = []

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and x.dtype == torch.float32
        self.calls.append(len(x))
        return x.flatten(1)[:, :FEATURES] * self.w


def test_fid_features_runs_in_batches_and_returns_float64():
    x = unit_images(5, 32, seed=5) * 2 - 1
    stub = Stub().eval()
    whole = fid_features(stub, x, batch_size=2)
    assert (
        whole.shape == (5, FEATURES) and whole.dtype == torch.float64 and whole.device.type == "cpu"
    )
    assert stub.calls == [2, 2, 1]
    expected = resize_for_fid(x, "pytorch-fid").flatten(1)[:, :FEATURES].double()
    assert torch.allclose(whole, expected, atol=1e-6)
    stub.calls.clear()
    parts = fid_features(stub, (b for b in (x[:3], x[3:])), batch_size=2)  # a generator of batches
    assert stub.calls == [2, 1, 2] and torch.allclose(parts, whole, atol=1e-6)
    clean = fid_features(stub, x, resize="clean")
    assert torch.allclose(clean, resize_for_fid(x, "clean").flatten(1)[:, :FEATURES].double())
    assert fid_features(stub, x[:0]).shape == (0, FEATURES)


def test_fid_features_refuses_train_mode_and_non_tensors():
    with pytest.raises(ValueError, match="eval"):
        fid_features(Stub().train(), torch.zeros(1, 3, 8, 8))
    with pytest.raises(TypeError, match="image tensors"):
        fid_features(Stub().eval(), [np.zeros((1, 3, 8, 8))])
    with pytest.raises(ValueError, match="unknown resize mode"):
        fid_features(Stub().eval(), torch.zeros(1, 3, 8, 8), resize="nearest")


def test_network_refuses_other_sizes():
    with pytest.raises(ValueError, match="resize_for_fid"):
        FIDInception()(torch.zeros(1, 3, 256, 256))


# ----------------------------------------------------------------------------------------------
# Loading errors
# ----------------------------------------------------------------------------------------------
def test_missing_file_names_it_and_the_pytorch_fid_file(tmp_path):
    path = tmp_path / "nowhere" / "inception.pth"
    with pytest.raises(WeightsError) as e:
        load_fid_inception(path)
    assert str(path) in str(e.value) and "pt_inception-2015-12-05-6726825d.pth" in str(e.value)
    assert "--inception" in str(e.value)


@pytest.mark.parametrize(
    "change, key",
    [
        ("rename", "fc.weight"),  # a missing key is named by ours
        ("extra", "AuxLogits.fc.weight"),  # torchvision's ImageNet file has an aux classifier
        ("shape", "fc.weight"),  # ... and 1000 classes
    ],
)
def test_wrong_key_or_shape_is_named(weights, tmp_path, change, key):
    state = dict(weights[1].state_dict())
    if change == "rename":
        state["fc.weights"] = state.pop("fc.weight")
    elif change == "extra":
        state["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    else:
        state["fc.weight"], state["fc.bias"] = torch.zeros(1000, FEATURES), torch.zeros(1000)
    path = tmp_path / "bad.pth"
    torch.save(state, path)
    with pytest.raises(WeightsError, match=key.replace(".", r"\.")) as e:
        load_fid_inception(path)
    assert str(path) in str(e.value)
