"""
Image transforms for overhead imagery, PIL <-> tensor conversion and image grids.

Every random choice is drawn from a torch.Generator passed in by the caller, so a sample's
augmentation is a pure function of its seed (the readers seed one generator per sample from
(seed, epoch, index)); this is what makes a resumed run see the same pixels.

Overhead images have no "up": besides resize + crop, horizontal/vertical flips and
90-degree rotations are label-preserving, and all of them are exact pixel permutations.
"""

import numpy as np
import torch
from PIL import Image

# -----------------------------------------------------------------------------
# PIL -> tensor


def _pil_to_uint8(img):
    """8-bit RGB PIL image -> uint8 tensor (3, H, W)."""
    if img.mode != "RGB":
        raise ValueError(f"expected an RGB image, got mode {img.mode!r}")
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)  # (3, H, W)


def _uint8_to_unit(x):
    """uint8 (3, H, W) -> float (3, H, W) in [-1, 1]: x / 127.5 - 1."""
    return x.float().div_(127.5).sub_(1.0)


def pil_to_tensor(img):
    """8-bit RGB PIL image -> float tensor (3, H, W) in [-1, 1]."""
    return _uint8_to_unit(_pil_to_uint8(img))


def tensor_to_pil(x):
    """Float tensor (3, H, W) in [-1, 1] -> 8-bit RGB PIL image (rounded, clamped)."""
    if x.ndim != 3 or x.shape[0] != 3:
        raise ValueError(f"tensor_to_pil expects a (3, H, W) tensor, got shape {tuple(x.shape)}")
    x = ((x.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return Image.fromarray(x.permute(1, 2, 0).numpy(), mode="RGB")


# -----------------------------------------------------------------------------
# geometry


def resize_shorter_side(img, size):
    """Resize so the shorter side is `size` (bicubic, antialiased by PIL);
    no-op if it already is."""
    w, h = img.size
    if min(w, h) == size:
        return img
    scale = size / min(w, h)
    new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
    return img.resize((new_w, new_h), Image.BICUBIC)


def crop_box(w, h, size, generator=None):
    """(left, top) of a size x size crop: uniform random if a generator is given, else centered."""
    if w < size or h < size:
        raise ValueError(f"cannot crop {size}x{size} from an image of {w}x{h}")
    if generator is None:
        return (w - size) // 2, (h - size) // 2
    left = int(torch.randint(0, w - size + 1, (1,), generator=generator))
    top = int(torch.randint(0, h - size + 1, (1,), generator=generator))
    return left, top


def random_dihedral(x, generator, hflip=True, vflip=True, rot90=True):
    """Random flips / 90-degree rotations of a (..., H, W) tensor; exact permutations of pixels.
    Three draws are always made (in this order) so the generator advances the same way
    whatever is enabled."""
    r = torch.rand(3, generator=generator)
    k = int(torch.randint(0, 4, (1,), generator=generator))
    if hflip and r[0] < 0.5:
        x = x.flip(-1)
    if vflip and r[1] < 0.5:
        x = x.flip(-2)
    if rot90 and k:
        x = torch.rot90(x, k, dims=(-2, -1))
    return x


class ImageTransform:
    """PIL RGB image -> (3, size, size) tensor in [-1, 1].

    Resize the shorter side to `size`, crop (random when a generator is given and random_crop,
    else centered), then optional flips / rot90. size=None keeps the full image (no resize/crop).
    """

    def __init__(self, size=256, random_crop=True, hflip=True, vflip=True, rot90=True):
        if size is not None and size <= 0:
            raise ValueError(f"ImageTransform size must be positive, got {size}")
        self.size, self.random_crop = size, random_crop
        self.hflip, self.vflip, self.rot90 = hflip, vflip, rot90

    def __call__(self, img, generator=None):
        if self.size is not None:
            img = resize_shorter_side(img, self.size)
            left, top = crop_box(*img.size, self.size, generator if self.random_crop else None)
            img = img.crop((left, top, left + self.size, top + self.size))
        x = _pil_to_uint8(img)  # (3, H, W); flips on uint8 are cheaper and just as exact
        if generator is not None and (self.hflip or self.vflip or self.rot90):
            x = random_dihedral(x, generator, self.hflip, self.vflip, self.rot90)
        return _uint8_to_unit(x)

    def __repr__(self):
        return (
            f"ImageTransform(size={self.size}, random_crop={self.random_crop}, hflip={self.hflip}, "
            f"vflip={self.vflip}, rot90={self.rot90})"
        )


def train_transform(size=256):
    """Training: resize shorter side, random crop, h/v flips, 90-degree rotations."""
    return ImageTransform(size, random_crop=True, hflip=True, vflip=True, rot90=True)


def eval_transform(size=256):
    """Evaluation / shard conversion: resize shorter side, center crop, nothing random."""
    return ImageTransform(size, random_crop=False, hflip=False, vflip=False, rot90=False)


def image_grid(images, cols):
    """PIL images of one size -> one PIL image, `cols` per row, row-major."""
    import math

    w, h = images[0].size
    rows = math.ceil(len(images) / cols)
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid
