"""LPIPS, the learned perceptual distance of Zhang et al. 2018 ("The Unreasonable Effectiveness of
Deep Features as a Perceptual Metric", CVPR), version 0.1 of the authors' `lpips` package.

    # torchvision's ImageNet file for the trunk, the lpips package's weights/v0.1/alex.pth for lin
    net = load_lpips("alexnet-owt-7be5be79.pth", "alex.pth")
    net = load_lpips("lpips_alex.pth")  # or one file: an lpips.LPIPS(...).state_dict()
    d = net(a, b)                        # a, b (B, 3, H, W) in [0, 1] -> (B,), 0 for equal images

The distance (the paper's Eq. 1, as the package computes it): both images go through an ImageNet
classifier's convolutional trunk (AlexNet, the package's default "alex", or VGG16, "vgg"); at five
ReLU outputs l the features f_l are unit-normalised along the channels, their squared differences
are weighted per channel by the learned non-negative w_l (the "lin" layer, a 1x1 convolution without
bias) and summed over the channels, averaged over the H_l x W_l positions, and the five layers'
figures are added:
    d(a, b) = sum_l mean_hw sum_c w_lc (f_lchw(a) / |f_lhw(a)| - f_lchw(b) / |f_lhw(b)|)^2
Images are in [0, 1], as evaluation/editing.py's psnr and ssim take them; the lpips package's
forward takes [-1, 1] (or [0, 1] with normalize=True). Nothing is downloaded: every weight comes
from a file given to `load_lpips`.

Parameter names: the trunk's are torchvision's `features.{i}.weight` / `.bias`, i the layer's index
in torchvision's `alexnet().features` / `vgg16().features`, so torchvision's file loads as it is;
the lin layers are `lin.{l}.weight` (1, C_l, 1, 1). Shapes: B batch, C channels, H, W spatial.
"""

from pathlib import Path

import torch
import torch.nn as nn

from model.release import WeightsError, read_tensors
from model.weights import load_state_strict

NETS = ("alex", "vgg")
TRUNK_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}  # torchvision's
# in the lpips package's folder
LIN_FILES = {"alex": "weights/v0.1/alex.pth", "vgg": "weights/v0.1/vgg.pth"}

# torchvision's `features`, up to the last layer LPIPS reads: (out channels, kernel, stride,
# padding) a convolution followed by its ReLU, ("pool", kernel, stride) a max pool.
TRUNKS = {
    "alex": [
        (64, 11, 4, 2),
        ("pool", 3, 2),
        (192, 5, 1, 2),
        ("pool", 3, 2),
        (384, 3, 1, 1),
        (256, 3, 1, 1),
        (256, 3, 1, 1),
    ],
    "vgg": [
        *[(64, 3, 1, 1)] * 2,
        ("pool", 2, 2),
        *[(128, 3, 1, 1)] * 2,
        ("pool", 2, 2),
        *[(256, 3, 1, 1)] * 3,
        ("pool", 2, 2),
        *[(512, 3, 1, 1)] * 3,
        ("pool", 2, 2),
        *[(512, 3, 1, 1)] * 3,
    ],
}
# the ReLUs whose outputs are compared: AlexNet's five (relu1..relu5), VGG16's relu1_2, relu2_2,
# relu3_3, relu4_3, relu5_3 (indices in torchvision's `features`)
TAPS = {"alex": (1, 4, 7, 9, 11), "vgg": (3, 8, 15, 22, 29)}
# the smallest image side every tapped layer still has a position for
MIN_SIDE = {"alex": 31, "vgg": 16}

# The trunks were trained on ImageNet-normalised input, (x - mean) / std with x in [0, 1]; the
# package writes this for x in [-1, 1]: shift = 2 mean - 1, scale = 2 std.
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
EPS = 1e-10  # added to the feature norm, as the package does


def _trunk(spec):
    """nn.Sequential with torchvision's layer indices (a ReLU after every convolution)."""
    layers, channels = [], 3
    for item in spec:
        if item[0] == "pool":
            layers.append(nn.MaxPool2d(item[1], item[2]))
        else:
            out, kernel, stride, padding = item
            layers += [nn.Conv2d(channels, out, kernel, stride, padding), nn.ReLU()]
            channels = out
    return nn.Sequential(*layers)


class LPIPS(nn.Module):
    """The LPIPS distance with an AlexNet ("alex") or VGG16 ("vgg") trunk; random weights until
    loaded (load_lpips)."""

    def __init__(self, net="alex"):
        super().__init__()
        if net not in NETS:
            raise ValueError(f"LPIPS net must be one of {NETS}, got {net!r}")
        self.net = net
        self.features = _trunk(TRUNKS[net])
        self.taps = TAPS[net]
        channels = [self.features[i - 1].out_channels for i in self.taps]
        self.lin = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in channels)
        self.register_buffer("shift", torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("scale", torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)

    def forward(self, a, b):
        """a, b (B, 3, H, W) in [0, 1] -> the distance of each pair (B,)."""
        if a.shape != b.shape or a.ndim != 4 or a.shape[1] != 3:
            raise ValueError(
                f"LPIPS compares two (B, 3, H, W) batches of one shape, got {tuple(a.shape)} and "
                f"{tuple(b.shape)}"
            )
        if min(a.shape[-2:]) < MIN_SIDE[self.net]:
            raise ValueError(
                f"LPIPS ({self.net}) needs images of at least {MIN_SIDE[self.net]} pixels a side, "
                f"got {a.shape[-2]}x{a.shape[-1]}"
            )
        B = a.shape[0]
        x = torch.cat([a, b]).to(self.shift.dtype) * 2 - 1  # 2B, 3, H, W in [-1, 1]
        x = (x - self.shift) / self.scale
        distance, lin = 0, iter(self.lin)
        for i, layer in enumerate(self.features):
            x = layer(x)  # 2B, C_l, H_l, W_l
            if i in self.taps:
                unit = x / (x.square().sum(1, keepdim=True).sqrt() + EPS)
                diff = (unit[:B] - unit[B:]).square()  # B, C_l, H_l, W_l
                distance = distance + next(lin)(diff).mean((1, 2, 3))  # B
        return distance


# ----------------------------------------------------------------------------------------------
# Loading: torchvision's trunk file and the lpips package's lin file, or one file holding both
# ----------------------------------------------------------------------------------------------
def _our_key(key):
    """A key of a file LPIPS reads -> our key, or "" for one it has no use for (torchvision's
    classifier head, the package's fixed scaling constants), or None for one it does not know.
    Known: torchvision's `features.{i}.*`, lpips.LPIPS's `net.slice{s}.{i}.*` (i the torchvision
    index), `lin{l}.model.{0|1}.weight` (0 without dropout) and its copy `lins.{l}.model.*`, and
    ours (`features.*`, `lin.{l}.weight`)."""
    parts = key.split(".")
    if parts[0] in ("classifier", "scaling_layer", "lins"):  # lins: lpips.LPIPS's copy of lin{l}
        return ""
    if parts[0] in ("features", "lin") and len(parts) == 3:
        return key
    if parts[0] == "net" and len(parts) == 4 and parts[1].startswith("slice"):
        return f"features.{parts[2]}.{parts[3]}"
    if (
        len(parts) == 4
        and parts[0][:3] == "lin"
        and parts[0][3:].isdigit()
        and parts[1] == "model"
        and parts[3] == "weight"
    ):
        return f"lin.{parts[0][3:]}.weight"
    return None


def _net_of(state, files):
    """'alex' or 'vgg', read off the first convolution's kernel (11x11 or 3x3)."""
    w = state.get("features.0.weight")
    if w is None:
        names = ", ".join(str(f) for f in files)
        raise WeightsError(
            f"{names}: no trunk weights ('features.0.weight' in torchvision's "
            f"{TRUNK_FILES['alex']} / {TRUNK_FILES['vgg']}, or 'net.slice1.0.weight' in an "
            "lpips.LPIPS state dict)"
        )
    kernel = tuple(w.shape[-2:])
    net = {(11, 11): "alex", (3, 3): "vgg"}.get(kernel)
    if net is None:
        raise WeightsError(
            f"{files[0]}: 'features.0.weight' has shape {tuple(w.shape)}: neither AlexNet's "
            "11x11 nor VGG16's 3x3 first convolution"
        )
    return net


def load_lpips(*paths, net=None, device="cpu"):
    """LPIPS in eval mode from local files: torchvision's ImageNet file for the trunk
    (alexnet-owt-7be5be79.pth, vgg16-397923af.pth) and the lpips package's lin file
    (weights/v0.1/alex.pth, vgg.pth), in either order, or one file holding both (an
    lpips.LPIPS(...).state_dict() saved with torch.save, or ours). .pth / .pt / .safetensors.
    `net` ("alex", "vgg"): the trunk expected (default: the one the files hold). Loading is strict:
    a missing, unknown or misshapen key, or one given by two files, is a WeightsError naming the
    file and the key."""
    if not paths:
        raise WeightsError("LPIPS needs its weights: a trunk file and a lin file, or one file")
    state, source, original = {}, {}, {}
    for path in map(Path, paths):
        for key, value in read_tensors(path).items():
            ours = _our_key(key)
            if ours is None:
                raise WeightsError(
                    f"{path}: unexpected key '{key}': not a torchvision AlexNet / VGG16 file, an "
                    "lpips lin file or an lpips.LPIPS state dict (squeeze is not supported)"
                )
            if not ours:
                continue
            if ours in state:
                raise WeightsError(
                    f"{path}: key '{key}' is given twice (also by {source[ours]}): give the trunk "
                    "and the lin layers once each"
                )
            state[ours], source[ours], original[ours] = value.float(), path, key
    found = _net_of(state, [Path(p) for p in paths])
    if net is not None and net != found:
        raise WeightsError(f"{source['features.0.weight']}: holds the {found} trunk, not {net}")
    lpips = LPIPS(found)
    if not any(k.startswith("lin.") for k in state):
        raise WeightsError(
            f"{', '.join(map(str, paths))}: no lin layers ('lin0.model.1.weight' ...: the lpips "
            f"package's {LIN_FILES[found]})"
        )
    load_state_strict(lpips, state, source, original)
    return lpips.to(device).eval().requires_grad_(False)
