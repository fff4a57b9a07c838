"""The FID network: Inception-v3 with the weights pytorch-fid uses (Heusel et al. 2017, "GANs
Trained by a Two Time-Scale Update Rule"; the network: Szegedy et al. 2016, "Rethinking the
Inception Architecture").

    # pytorch-fid's file, given with --inception
    net = load_fid_inception("pt_inception-2015-12-05-6726825d.pth")
    # (N, 2048) float64; images in [-1, 1]
    feats = fid_features(net, images, resize="pytorch-fid")

The weights are TensorFlow's 2015-12-05 Inception graph, ported by pytorch-fid. The topology is
torchvision's Inception3, with what the TF graph does differently:
    - the 3x3 average pools of the A, C and first E blocks leave the zero padding out of the mean
      (count_include_pad=False; torchvision counts it),
    - the last block (Mixed_7c) pools its `branch_pool` with a 3x3 max pool, not an average,
    - the classifier has the graph's 1008 classes; no aux classifier, no input
      transform; BatchNorm eps 1e-3.
Parameter names are torchvision's Inception3 state-dict keys (Conv2d_1a_3x3.conv.weight, ...,
fc.bias), the layout of pytorch-fid's file, so it loads strictly.

The network reads 299x299 images in [-1, 1]. How images reach that size is where FID implementations
part ways (Parmar et al. 2022, "On Aliased Resizing and Surprising Subtleties in GAN
Evaluation"); `resize_for_fid` has
    "pytorch-fid"  bilinear, no antialiasing, as pytorch-fid's InceptionV3 resizes in the network;
    "clean"        clean-fid's: the image quantised to 8 bits as a saved PNG, then each channel
                   resized as a float PIL image with PIL's (antialiased) bicubic filter.
Shapes: B batch, C channels, H, W spatial.
"""

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from model.release import WeightsError, read_tensors
from model.weights import load_state_strict

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = (
    f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{INCEPTION_FILE}"
)
FID_SIZE = 299  # the network's input size
FEATURES = 2048  # the pool features FID compares
RESIZE_MODES = ("pytorch-fid", "clean")


# ----------------------------------------------------------------------------------------------
# The blocks (keys as torchvision's; channel counts are the paper's)
# ----------------------------------------------------------------------------------------------
class ConvBN(nn.Module):
    """conv (no bias) - BatchNorm (eps 1e-3, TF's) - ReLU; keys `conv.*`, `bn.*` as
    torchvision's BasicConv2d."""

    def __init__(self, in_ch, out_ch, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=1e-3)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)), inplace=True)


def _avg_pool(x):
    """3x3 stride-1 mean over the pixels inside the image: TF's average pool
    leaves the padding out."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class BlockA(nn.Module):
    """Mixed_5b..5d at 35x35: 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1
    -> 224 + pool_ch channels."""

    def __init__(self, in_ch, pool_ch):
        super().__init__()
        self.branch1x1 = ConvBN(in_ch, 64, 1)
        self.branch5x5_1 = ConvBN(in_ch, 48, 1)
        self.branch5x5_2 = ConvBN(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = ConvBN(in_ch, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, padding=1)
        self.branch_pool = ConvBN(in_ch, pool_ch, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))  # (B, 64, 35, 35)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (B, 96, 35, 35)
        bp = self.branch_pool(_avg_pool(x))  # (B, pool_ch, 35, 35)
        return torch.cat([self.branch1x1(x), b5, b3, bp], 1)  # (B, 224 + pool_ch, 35, 35)


class BlockB(nn.Module):
    """Mixed_6a, 35x35 -> 17x17: 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2 -> 768 channels."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3 = ConvBN(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = ConvBN(in_ch, 64, 1)
        self.branch3x3dbl_2 = ConvBN(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = ConvBN(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3(x)  # (B, 384, 17, 17)
        bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))  # (B, 96, 17, 17)
        return torch.cat([b3, bd, F.max_pool2d(x, 3, stride=2)], 1)  # (B, 480 + in_ch, 17, 17)


class BlockC(nn.Module):
    """Mixed_6b..6e at 17x17, 7x7 convs factored into 1x7 and 7x1:
    1x1 | 7x7 | 7x7-7x7 | avgpool-1x1 -> 768."""

    def __init__(self, in_ch, c7):
        super().__init__()
        self.branch1x1 = ConvBN(in_ch, 192, 1)
        self.branch7x7_1 = ConvBN(in_ch, c7, 1)
        self.branch7x7_2 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = ConvBN(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = ConvBN(in_ch, c7, 1)
        self.branch7x7dbl_2 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = ConvBN(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = ConvBN(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = ConvBN(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = ConvBN(in_ch, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))  # (B, 192, 17, 17)
        bd = self.branch7x7dbl_1(x)  # (B, c7, 17, 17)
        for conv in (
            self.branch7x7dbl_2,
            self.branch7x7dbl_3,
            self.branch7x7dbl_4,
            self.branch7x7dbl_5,
        ):
            bd = conv(bd)  # -> (B, 192, 17, 17)
        bp = self.branch_pool(_avg_pool(x))  # (B, 192, 17, 17)
        return torch.cat([self.branch1x1(x), b7, bd, bp], 1)  # (B, 768, 17, 17)


class BlockD(nn.Module):
    """Mixed_7a, 17x17 -> 8x8: 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2 -> 1280 channels."""

    def __init__(self, in_ch):
        super().__init__()
        self.branch3x3_1 = ConvBN(in_ch, 192, 1)
        self.branch3x3_2 = ConvBN(192, 320, 3, stride=2)
        self.branch7x7x3_1 = ConvBN(in_ch, 192, 1)
        self.branch7x7x3_2 = ConvBN(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = ConvBN(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = ConvBN(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))  # (B, 320, 8, 8)
        b7 = self.branch7x7x3_1(x)
        for conv in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
            b7 = conv(b7)  # -> (B, 192, 8, 8)
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)  # (B, 512 + in_ch, 8, 8)


class BlockE(nn.Module):
    """Mixed_7b, 7c at 8x8, each 3x3 split into parallel 1x3 and 3x1:
    1x1 | 3x3 | 3x3-3x3 | pool-1x1 -> 2048.

    `max_pool`: the pool branch takes a 3x3 max (Mixed_7c in the TF graph) instead of
    the padding-free mean."""

    def __init__(self, in_ch, max_pool=False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = ConvBN(in_ch, 320, 1)
        self.branch3x3_1 = ConvBN(in_ch, 384, 1)
        self.branch3x3_2a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = ConvBN(in_ch, 448, 1)
        self.branch3x3dbl_2 = ConvBN(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = ConvBN(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = ConvBN(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = ConvBN(in_ch, 192, 1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)  # (B, 384, 8, 8)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)  # (B, 768, 8, 8)
        bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))  # (B, 384, 8, 8)
        bd = torch.cat([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], 1)  # (B, 768, 8, 8)
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        bp = self.branch_pool(pooled)  # (B, 192, 8, 8)
        return torch.cat([self.branch1x1(x), b3, bd, bp], 1)  # (B, 2048, 8, 8)


# ----------------------------------------------------------------------------------------------
# The network
# ----------------------------------------------------------------------------------------------
class FIDInception(nn.Module):
    """Images (B, 3, 299, 299) in [-1, 1] -> pool features (B, 2048), the input to
    FID; `logits` adds the fc.

    Built with PyTorch's default init: its weights come from a file (load_fid_inception)."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = ConvBN(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = ConvBN(32, 32, 3)
        self.Conv2d_2b_3x3 = ConvBN(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = ConvBN(64, 80, 1)
        self.Conv2d_4a_3x3 = ConvBN(80, 192, 3)
        self.Mixed_5b = BlockA(192, pool_ch=32)
        self.Mixed_5c = BlockA(256, pool_ch=64)
        self.Mixed_5d = BlockA(288, pool_ch=64)
        self.Mixed_6a = BlockB(288)
        self.Mixed_6b = BlockC(768, c7=128)
        self.Mixed_6c = BlockC(768, c7=160)
        self.Mixed_6d = BlockC(768, c7=160)
        self.Mixed_6e = BlockC(768, c7=192)
        self.Mixed_7a = BlockD(768)
        self.Mixed_7b = BlockE(1280)
        self.Mixed_7c = BlockE(2048, max_pool=True)
        self.fc = nn.Linear(FEATURES, 1008)

    def forward(self, x):
        if x.ndim != 4 or tuple(x.shape[1:]) != (3, FID_SIZE, FID_SIZE):
            raise ValueError(
                f"FIDInception expects images (B, 3, {FID_SIZE}, {FID_SIZE}) in [-1, 1], got shape "
                f"{tuple(x.shape)}: resize them with resize_for_fid"
            )
        x = self.Conv2d_1a_3x3(x)  # (B, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (B, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (B, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (B, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (B, 192, 71, 71)
        x = F.max_pool2d(x, 3, stride=2)  # (B, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (B, 288, 35, 35)
        x = self.Mixed_6a(x)  # (B, 768, 17, 17)
        x = self.Mixed_6e(self.Mixed_6d(self.Mixed_6c(self.Mixed_6b(x))))  # (B, 768, 17, 17)
        x = self.Mixed_7a(x)  # (B, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (B, 2048, 8, 8)
        return x.mean((2, 3))  # (B, 2048) global average pool

    def logits(self, x):
        """Images (B, 3, 299, 299) in [-1, 1] -> the graph's 1008 class logits (B, 1008),
        as for Inception Score."""
        return self.fc(self.forward(x))


def load_fid_inception(path, device="cpu"):
    """pytorch-fid's `pt_inception-2015-12-05-6726825d.pth` (or a .safetensors with its
    keys) -> FIDInception in eval mode on `device`. Loading is strict: a missing, unexpected or
    misshapen key is a WeightsError naming it; only BatchNorm's step counters
    (`*.num_batches_tracked`, unused in eval) may be absent, as torch allows."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"{path}: no such file. FID needs the Inception-v3 weights pytorch-fid uses, "
            f"{INCEPTION_FILE} ({INCEPTION_URL}); give its path with --inception"
        )
    state = dict(read_tensors(path))
    net = FIDInception()
    for k, v in net.state_dict().items():
        if k.endswith(".num_batches_tracked"):
            state.setdefault(k, v)
    load_state_strict(net, state, path)
    return net.to(device).eval()


# ----------------------------------------------------------------------------------------------
# Resizing to 299 px
# ----------------------------------------------------------------------------------------------
def _clean_resize(images):
    """(B, 3, H, W) in [-1, 1] -> (B, 3, 299, 299) float32 in 0..255 on the CPU,
    clean-fid's "clean" resize."""
    # as a saved PNG
    u8 = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    u8 = u8.numpy()
    out = np.empty((len(u8), 3, FID_SIZE, FID_SIZE), np.float32)
    for b, c in np.ndindex(len(u8), 3):
        channel = Image.fromarray(u8[b, c].astype(np.float32), mode="F")  # (H, W) float image
        # no re-quantisation
        out[b, c] = np.asarray(channel.resize((FID_SIZE, FID_SIZE), Image.BICUBIC))
    return torch.from_numpy(np.clip(out, 0, 255))  # clean-fid clips the bicubic's overshoot


def resize_for_fid(images, mode):
    """Images (B, 3, H, W) float in [-1, 1] -> (B, 3, 299, 299) float32 in
    [-1, 1] on the same device.

    mode "pytorch-fid": what pytorch-fid's InceptionV3 does: x in [0, 1], bilinear
    (align_corners=False, no antialiasing), 2x - 1. Values are not quantised nor clamped
    (pytorch-fid's own script reads 8-bit files). mode "clean": clean-fid's: quantised to uint8 as
    data.transforms.tensor_to_pil saves it, each channel resized as a PIL "F" image with
    Image.BICUBIC, clipped to 0..255 but kept as floats, then x / 255 * 2 - 1."""
    if mode not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {mode!r}; the modes are {', '.join(RESIZE_MODES)}")
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(
            f"resize_for_fid expects images (B, 3, H, W), got shape {tuple(images.shape)}"
        )
    if mode == "pytorch-fid":
        x = (images.float() + 1) / 2  # (B, 3, H, W) in [0, 1]
        x = F.interpolate(x, size=(FID_SIZE, FID_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1  # (B, 3, 299, 299)
    return (_clean_resize(images) / 255 * 2 - 1).to(images.device)  # (B, 3, 299, 299)


# ----------------------------------------------------------------------------------------------
# Features of many images
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def fid_features(net, images, resize="pytorch-fid", batch_size=50, device=None):
    """Pool features (N, 2048) of `images`, a CPU float64 tensor (FID's mean and
    covariance are taken in float64).

    images: a tensor (N, 3, H, W) in [-1, 1], or an iterable of batches, each a tensor (B, 3, H, W)
    or a list of (3, H, W) tensors of any sizes (files as read, each resized on its own); run
    `batch_size` images at a time, resized by `resize_for_fid(.., resize)`. `device`: where to run,
    the net is moved there (in place, as Module.to does); by default where the net is. The
    net must be in eval mode."""
    if resize not in RESIZE_MODES:
        raise ValueError(f"unknown resize mode {resize!r}; the modes are {', '.join(RESIZE_MODES)}")
    if net.training:
        raise ValueError(
            "fid_features needs the net in eval mode (BatchNorm's running statistics): call "
            "net.eval()"
        )
    if device is not None:
        net.to(device)
    weight = next(net.parameters())
    batches = [images] if torch.is_tensor(images) else images
    out = []
    for batch in batches:
        if isinstance(batch, (list, tuple)) and all(
            torch.is_tensor(im) and im.ndim == 3 for im in batch
        ):
            chunks = [
                torch.cat(
                    [
                        resize_for_fid(im[None].to(weight.device), resize)
                        for im in batch[i : i + batch_size]
                    ]
                )
                for i in range(0, len(batch), batch_size)
            ]  # (b, 3, 299, 299) each
        elif torch.is_tensor(batch):
            chunks = [
                resize_for_fid(c.to(weight.device), resize)
                for c in batch.split(batch_size)
                if len(c)
            ]
        else:
            raise TypeError(
                "fid_features expects image tensors (B, 3, H, W) or lists of (3, H, W), got a "
                f"batch of type {type(batch)}"
            )
        out += [net(x.to(weight.dtype)).double().cpu() for x in chunks]  # (b, 2048) each
    return torch.cat(out) if out else torch.zeros(0, FEATURES, dtype=torch.float64)
