"""LPIPS (evaluation/lpips.py) against the authors' `lpips` package on random trunks, loaded both ways a user can:
one lpips.LPIPS state dict, or torchvision's trunk file with the package's own lin file; and the loader's errors.
Nothing is downloaded: pnet_rand=True builds the package's trunk without ImageNet weights, and its lin weights
(pretrained=True) are the files shipped inside the package."""

import warnings
from pathlib import Path

import pytest
import torch

from evaluation.lpips import LIN_FILES, LPIPS, load_lpips
from model.release import WeightsError

lpips_pkg = pytest.importorskip("lpips")
torchvision = pytest.importorskip("torchvision")
PACKAGE_LIN = {net: Path(lpips_pkg.__file__).parent / LIN_FILES[net] for net in ("alex", "vgg")}


def reference(net, lin_from_package):
    """The package's LPIPS with a random trunk; its lin layers the package's file, or random positive weights."""
    with warnings.catch_warnings():  # torchvision's note that `pretrained=` is deprecated
        warnings.simplefilter("ignore")
        ref = lpips_pkg.LPIPS(net=net, pretrained=lin_from_package, pnet_rand=True, verbose=False)
    if not lin_from_package:
        with torch.no_grad():
            for lin in ref.lins:
                lin.model[-1].weight.uniform_(0.01, 1.0)  # learned lin weights are >= 0
    return ref.eval()


def torchvision_trunk_file(net, path):
    """A torchvision-format trunk file (`features.{i}.*`, plus a classifier key the loader leaves alone), from a
    randomly initialised torchvision model; returns that model's features."""
    torch.manual_seed(1)
    features = (
        torchvision.models.alexnet() if net == "alex" else torchvision.models.vgg16()
    ).features
    state = {f"features.{k}": v for k, v in features.state_dict().items()}
    state["classifier.6.bias"] = torch.zeros(1000)
    torch.save(state, path)
    return features


def images(seed, b=3, size=64):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 3, size, size, generator=g), torch.rand(b, 3, size, size, generator=g)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_the_package_loaded_from_its_state_dict(net, tmp_path):
    torch.manual_seed(0)
    ref = reference(net, lin_from_package=False)
    torch.save(ref.state_dict(), tmp_path / "lpips.pth")
    ours = load_lpips(tmp_path / "lpips.pth")
    assert ours.net == net
    a, b = images(0, size=64 if net == "alex" else 48)
    with torch.no_grad():
        d = ours(a, b)
        torch.testing.assert_close(d, ref(a * 2 - 1, b * 2 - 1).flatten(), rtol=1e-5, atol=0)
        torch.testing.assert_close(d, ref(a, b, normalize=True).flatten(), rtol=1e-5, atol=0)
        torch.testing.assert_close(d, ours(b, a), rtol=1e-6, atol=0)
        assert (ours(a, a) == 0).all()


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_matches_the_package_from_a_torchvision_trunk_file_and_the_packages_lin_file(net, tmp_path):
    features = torchvision_trunk_file(net, tmp_path / "trunk.pth")
    ref = reference(net, lin_from_package=True)
    with torch.no_grad():  # the package's trunk given torchvision's random weights
        for key, value in ref.state_dict().items():
            if key.startswith("net.slice"):
                value.copy_(features.state_dict()[".".join(key.split(".")[2:])])
    a, b = images(1, b=2, size=64 if net == "alex" else 48)
    with torch.no_grad():
        expected = ref(a * 2 - 1, b * 2 - 1).flatten()
    for order in [("trunk.pth", PACKAGE_LIN[net]), (PACKAGE_LIN[net], "trunk.pth")]:
        ours = load_lpips(*[tmp_path / f for f in order], net=net)
        with torch.no_grad():
            torch.testing.assert_close(ours(a, b), expected, rtol=1e-5, atol=0)
    lin = ours.lin[0].weight  # the package's own, learned: non-negative
    assert (lin >= 0).all() and lin.sum() > 0


def test_distance_grows_with_the_difference():
    torch.manual_seed(0)
    net = LPIPS("alex").eval()
    with torch.no_grad():
        for lin in net.lin:
            lin.weight.uniform_(0.01, 1.0)
    a = torch.rand(1, 3, 48, 48)
    noise = torch.randn(1, 3, 48, 48)
    with torch.no_grad():
        d = [net(a, (a + s * noise).clamp(0, 1)).item() for s in (0.0, 0.05, 0.2, 0.5)]
    assert d[0] == 0 and d[1] < d[2] < d[3], d


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("lpips")
    torch.manual_seed(0)
    state = reference("alex", lin_from_package=False).state_dict()
    torch.save(state, d / "alex_all.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("net.")}, d / "trunk_only.pth")
    torch.save({k: v for k, v in state.items() if k.startswith("lin")}, d / "lin_only.pth")
    torch.save({k: v for k, v in state.items() if k != "net.slice2.3.weight"}, d / "missing.pth")
    torch.save({**state, "net.extra": torch.zeros(1)}, d / "unknown.pth")
    (d / "notes.pth").write_text("not weights")
    return d


@pytest.mark.parametrize(
    "names, kwargs, message",
    [
        (
            ["trunk_only.pth"],
            {},
            r"trunk_only.pth: no lin layers \('lin0.model.1.weight'.*weights/v0.1/alex.pth",
        ),
        (["lin_only.pth"], {}, r"lin_only.pth: no trunk weights \('features.0.weight'"),
        (
            ["trunk_only.pth", "{vgg}"],
            {},
            r"vgg.pth: key 'lin1.model.1.weight' has shape \(1, 128, 1, 1\), expected \(1, 192, 1, 1\)",
        ),
        (
            ["missing.pth"],
            {},
            r"missing.pth.*missing key for 'features.3.weight' \(shape \(192, 64, 5, 5\)\)",
        ),
        (["unknown.pth"], {}, r"unknown.pth: unexpected key 'net.extra'"),
        (
            ["alex_all.pth", "{alex}"],
            {},
            r"alex.pth: key 'lin0.model.1.weight' is given twice \(also by .*alex_all.pth\)",
        ),
        (["alex_all.pth"], {"net": "vgg"}, r"alex_all.pth: holds the alex trunk, not vgg"),
        (["absent.pth"], {}, r"absent.pth: no such file"),
        (["notes.pth"], {}, r"notes.pth: not a readable PyTorch weights file"),
        ([], {}, r"LPIPS needs its weights"),
    ],
)
def test_loader_errors_name_the_file_and_key(files, names, kwargs, message):
    paths = [n.format(vgg=PACKAGE_LIN["vgg"], alex=PACKAGE_LIN["alex"]) for n in names]
    with pytest.raises(WeightsError, match=message):
        load_lpips(*[files / p for p in paths], **kwargs)


def test_bad_images_are_a_clear_error():
    net = LPIPS("alex")
    with pytest.raises(ValueError, match=r"at least 31 pixels a side, got 16x16"):
        net(torch.rand(1, 3, 16, 16), torch.rand(1, 3, 16, 16))
    with pytest.raises(ValueError, match=r"one shape, got \(1, 3, 32, 32\) and \(1, 3, 32, 40\)"):
        net(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 40))
    with pytest.raises(ValueError, match="must be one of"):
        LPIPS("squeeze")
