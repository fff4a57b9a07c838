"""
Paired training data for image-to-image translation (a ControlNet on the text-to-image model) and
for fine-tunes on other modalities: a task maps a control image to a target image of the same frame.

    TASKS     task -> (control modality, target modality), e.g. "sar2rgb": ("sar", "rgb")
    DERIVED   controls computed from the RGB image itself, as Text2Earth (Liu et al., IEEE GRSM
              2025) made its PAN (grey-level transform), low-resolution (down-sampling) and hazy
              (scattering model) inputs; nir and sar need real pairs (PairedFolder) or the
              procedural Earth (data/synthetic)

    ds = ControlPairs(CaptionFolder(manifest, transform=tf), "dehaze")  # + "control": hazy image
    ds = PairedFolder("SEN1-2", "SEN1-2", replace=(("s1_", "s2_"),))  # real SAR -> optical pairs

Images are float (3, H, W) in [-1, 1] (to_pan and low_resolution also take a batch (B, 3, H, W),
add_haze and add_clouds too, drawing each sample's fields on its own). All randomness comes from the
torch.Generator passed in: the readers seed one per sample from (seed, epoch, index), so a resumed
run sees the same controls.
"""

import json
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from data.samples import BadDataCounter, decode_image, sample_generator
from data.transforms import pil_to_tensor

TASKS = {
    "pan2rgb": ("pan", "rgb"),
    "nir2rgb": ("nir", "rgb"),
    "sar2rgb": ("sar", "rgb"),
    "pan2nir": ("pan", "nir"),
    "sr": ("lowres", "rgb"),
    "dehaze": ("haze", "rgb"),
}
DERIVED = ("pan", "lowres", "haze")
MODALITIES = ("rgb", "pan", "nir", "sar", "lowres", "haze")
SR_FACTOR = 4  # the sr task's down-sampling factor (fixed, so one model learns one scale)

# RGB -> PAN weights. Neither is a sensor's spectral response: "luma" is ITU-R BT.601's luma (a
# display standard, eye-weighted), "mean" the plain average. A real PAN band (e.g. 450-800 nm) also
# sees NIR, which an RGB image does not hold; jitter in to_pan stands in for
# the spread between sensors.
BAND_WEIGHTS = {"luma": (0.299, 0.587, 0.114), "mean": (1 / 3, 1 / 3, 1 / 3)}
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


def _batched(image, name):
    """(3, H, W) or (B, 3, H, W) float -> ((B, 3, H, W), whether a batch was given)."""
    if (
        not torch.is_tensor(image)
        or image.ndim not in (3, 4)
        or image.shape[-3] != 3
        or not image.is_floating_point()
    ):
        shape = tuple(image.shape) if torch.is_tensor(image) else type(image).__name__
        raise ValueError(
            f"{name}: expected a float (3, H, W) or (B, 3, H, W) image in [-1, 1], got {shape}"
        )
    return (image, True) if image.ndim == 4 else (image[None], False)


def _need_generator(generator, name):
    if not isinstance(generator, torch.Generator):
        raise ValueError(
            f"{name} draws random fields and needs a torch.Generator, got {generator!r}"
        )


def _smooth_noise(b, h, w, generator, cells, amps):
    """(B, H, W) low-frequency noise, zero mean and unit std per sample: random (c + 1) x (c + 1)
    grids bilinearly up-sampled to (H, W), one octave per c in `cells` with amplitude amps."""
    field = 0.0
    for c, a in zip(cells, amps):
        grid = torch.randn(b, 1, c + 1, c + 1, generator=generator)
        field = (
            field + a * F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)[:, 0]
        )
    field = field - field.mean((1, 2), keepdim=True)
    return field / field.std(dim=(1, 2), keepdim=True).clamp_min(1e-6)


def _uniform(n, bounds, generator):
    lo, hi = bounds
    return lo + (hi - lo) * torch.rand(n, generator=generator)


# -----------------------------------------------------------------------------
# controls derived from an RGB image


def pan_weights(weights="luma", generator=None, jitter=0.0):
    """(3,) RGB -> PAN weights summing to 1: a BAND_WEIGHTS name or 3 non-negative numbers; with a
    generator and jitter > 0 each weight is scaled by exp(jitter * z),
    z ~ N(0, 1), then renormalised."""
    if isinstance(weights, str):
        if weights not in BAND_WEIGHTS:
            raise ValueError(f"unknown PAN weights {weights!r}; names: {sorted(BAND_WEIGHTS)}")
        weights = BAND_WEIGHTS[weights]
    w = torch.as_tensor(weights, dtype=torch.float32)
    if w.shape != (3,) or (w < 0).any() or w.sum() <= 0:
        raise ValueError(
            f"PAN weights must be 3 non-negative numbers with a positive sum, got {weights!r}"
        )
    if generator is not None and jitter > 0:
        w = w * torch.exp(jitter * torch.randn(3, generator=generator))
    return w / w.sum()


def to_pan(image, weights="luma", generator=None, jitter=0.0):
    """Panchromatic view: the grey level sum_c w_c x_c of (3, H, W) or (B, 3, H, W) in [-1, 1],
    repeated on 3 channels (same shape, same range); weights as in
    pan_weights, jittered per call."""
    _batched(image, "to_pan")
    w = pan_weights(weights, generator, jitter).to(image)
    grey = (image * w[:, None, None]).sum(-3, keepdim=True).clamp(-1, 1)  # (..., 1, H, W)
    return grey.expand_as(image).contiguous()


def _gaussian_blur(x, sigma):
    """(B, 3, H, W) blurred by a separable Gaussian of std sigma px (radius 3
    sigma, edges replicated)."""
    r = max(1, int(3 * sigma + 0.5))
    k = torch.exp(-0.5 * (torch.arange(-r, r + 1, dtype=x.dtype) / sigma) ** 2)
    k = (k / k.sum()).to(x.device)
    x = F.pad(x, (r, r, r, r), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(3, 1, 1, -1), groups=3)  # along W
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(3, 1, -1, 1), groups=3)  # along H


def low_resolution(image, factor, generator=None, sigma=None, noise_std=0.0):
    """The classical degradation y = (x * k) down_s + n (Elad & Feuer 1997; Real-ESRGAN, Wang et al.
    2021, Sec. 3.1): Gaussian PSF k of std sigma (default 0.5 * factor, scaled by U(0.8, 1.2) per
    call when a generator is given), area down-sampling by `factor`, Gaussian noise of std noise_std
    (in [-1, 1] units; needs the generator), then bicubic up-sampling back to (H, W) so the control
    has the target's size. (3, H, W) or (B, 3, H, W) in [-1, 1] -> same
    shape, clamped to [-1, 1]."""
    x, batched = _batched(image, "low_resolution")
    H, W = x.shape[-2:]
    if int(factor) != factor or factor < 1 or H % factor or W % factor:
        raise ValueError(
            f"low_resolution: image of shape {tuple(image.shape)} cannot be down-sampled by factor "
            f"{factor} (H and W must be divisible by a positive integer factor)"
        )
    factor = int(factor)
    if factor == 1:
        return image.clone()
    sigma = 0.5 * factor if sigma is None else float(sigma)
    if generator is not None:
        sigma *= float(_uniform(1, (0.8, 1.2), generator))
    y = F.avg_pool2d(_gaussian_blur(x, sigma) if sigma > 0 else x, factor)  # (B, 3, H / f, W / f)
    if noise_std > 0:
        _need_generator(generator, "low_resolution with noise_std > 0")
        y = y + noise_std * torch.randn(y.shape, generator=generator).to(y)
    y = F.interpolate(y, size=(H, W), mode="bicubic", align_corners=False).clamp(-1, 1)
    return y if batched else y[0]


def add_haze(image, generator, transmission=(0.3, 0.8), airlight=(0.75, 1.0)):
    """Atmospheric scattering (Koschmieder; He et al. 2009, Eq. 1), I = J t + A (1 - t), in [0, 1]
    intensity: t a smooth field (octaves of 2, 4, 8 cells) around a mean drawn in `transmission`,
    clipped to [0.05, 1]; A near-white and slightly bluish, brightness drawn in `airlight`.
    (3, H, W) in [-1, 1] -> (hazy (3, H, W) in [-1, 1], t (H, W), A (3,)); a
    batch gives (B, ...) each."""
    _need_generator(generator, "add_haze")
    x, batched = _batched(image, "add_haze")
    B, _, H, W = x.shape
    mean = _uniform(B, transmission, generator)[:, None, None]
    t = (mean + 0.1 * _smooth_noise(B, H, W, generator, (2, 4, 8), (1.0, 0.5, 0.25))).clamp(
        0.05, 1.0
    )
    blue = _uniform(B, (0.0, 0.08), generator)[:, None]  # less red and green than blue
    A = _uniform(B, airlight, generator)[:, None] * (1 - blue * torch.tensor([1.0, 0.5, 0.0]))
    J = ((x + 1) / 2).clamp(0, 1)
    t, A = t.to(x), A.to(x)
    hazy01 = J * t[:, None] + A[:, :, None, None] * (1 - t[:, None])
    hazy = hazy01 * 2 - 1
    return (hazy, t, A) if batched else (hazy[0], t[0], A[0])


def add_clouds(image, generator, cover=(0.2, 0.6)):
    """Clouds over the frame: a fractal density (octaves of 4, 8, 16 cells) thresholded at the
    quantile that leaves a cover fraction drawn in `cover`, soft edges (alpha ramps from 0 to 1
    across 0.5 std of the density), a bright grey-white colour. (3, H, W) in [-1, 1] -> (cloudy
    (3, H, W) in [-1, 1], mask (H, W) bool = alpha > 0.5); a batch gives (B, ...) each."""
    _need_generator(generator, "add_clouds")
    x, batched = _batched(image, "add_clouds")
    B, _, H, W = x.shape
    d = _smooth_noise(B, H, W, generator, (4, 8, 16), (1.0, 0.5, 0.25))  # (B, H, W)
    frac = _uniform(B, cover, generator)
    q = torch.stack([torch.quantile(d[b].flatten(), 1 - frac[b]) for b in range(B)])[:, None, None]
    alpha = (0.5 + (d - q) / 0.5).clamp(0, 1)
    colour = (
        _uniform(B, (0.85, 0.97), generator)[:, None, None] + 0.05 * (d - q).clamp(0, 1)
    ).clamp(max=1)
    alpha, colour = alpha.to(x)[:, None], colour.to(x)[:, None]
    cloudy = x + alpha * (colour * 2 - 1 - x)  # J (1 - alpha) + C alpha, written in [-1, 1]
    mask = d > q  # = alpha > 0.5
    return (cloudy, mask) if batched else (cloudy[0], mask[0])


def _derived(task):
    """The control modality of `task`, which must be derived from the RGB
    image; ValueError otherwise."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {sorted(TASKS)}")
    control = TASKS[task][0]
    if control not in DERIVED:
        raise ValueError(
            f"task {task!r}: its control ({control}) cannot be derived from an RGB image; it needs "
            "paired data (--data=paired with --control_path) or the procedural Earth "
            "(--data=synthetic)"
        )
    return control


def make_control(task, image, generator):
    """The control image (3, H, W) in [-1, 1] of a task whose control is DERIVED from the RGB image:
    pan2rgb, pan2nir -> to_pan (luma, weights jittered by 0.1); sr -> low_resolution by SR_FACTOR
    (PSF width jittered); dehaze -> add_haze's hazy image."""
    control = _derived(task)
    if control == "pan":
        return to_pan(image, "luma", generator, jitter=0.1)
    if control == "lowres":
        return low_resolution(image, SR_FACTOR, generator)
    return add_haze(image, generator)[0]


# -----------------------------------------------------------------------------
# datasets of pairs


class ControlPairs(torch.utils.data.Dataset):
    """Any reader of sample dicts (image (3, H, W) in [-1, 1]; None = skipped) + "control" derived
    from the image, with its own per-sample generator from (seed + 7919, epoch, index)."""

    def __init__(self, dataset, task, seed=0):
        _derived(task)
        self.dataset, self.task, self.seed, self.epoch = dataset, task, seed, 0

    def set_epoch(self, epoch):
        self.epoch = int(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        item = self.dataset[i]
        if not isinstance(item, dict):  # unreadable (None) or filtered: passed on
            return item
        g = sample_generator(self.seed + 7919, self.epoch, i)
        return dict(item, control=make_control(self.task, item["image"], g))


class PairedFolder(torch.utils.data.Dataset):
    """Real pairs: each image under control_root (recursive) and its partner image_root / (the same
    relative path with every (old, new) of `replace` substituted). SEN1-2:
    control_root = image_root = the dataset, replace=(("s1_", "s2_"),) (only paths holding the first
    `old` are controls); QXS-SAROPT: .../sar and .../opt, same names. Captions: `caption` for all,
    or a `captions` json {relative path, file name or stem: caption} ("" for a file not in it);
    `level`: the dataset's map level (0 = unknown). Target and control get the same crop and flips.
    Items: image, control (3, H, W) in [-1, 1], caption, level, quality (nan), key (the control's
    relative path); None for a bad pair (counted in `counter`)."""

    def __init__(
        self,
        control_root,
        image_root,
        *,
        replace=(),
        caption="",
        captions=None,
        level=0.0,
        transform=None,
        counter=None,
        seed=0,
    ):
        self.control_root, self.image_root = Path(control_root), Path(image_root)
        self.replace = tuple(tuple(p) for p in replace)
        if not all(
            len(p) == 2 and all(isinstance(s, str) for s in p) and p[0] for p in self.replace
        ):
            raise ValueError(
                "PairedFolder: replace must be (old, new) string pairs, old not empty; got "
                f"{replace!r}"
            )
        self.caption, self.level, self.transform, self.seed, self.epoch = (
            caption,
            float(level),
            transform,
            seed,
            0,
        )
        self.counter = counter if counter is not None else BadDataCounter()
        if not self.control_root.is_dir():
            raise ValueError(f"PairedFolder: control_root {self.control_root} is not a folder")
        need = self.replace[0][0] if self.replace else ""
        controls = sorted(
            r
            for r in (
                p.relative_to(self.control_root).as_posix()
                for p in self.control_root.rglob("*")
                if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
            )
            if need in r
        )
        if not controls:
            raise ValueError(
                f"PairedFolder: no image files ({', '.join(IMAGE_EXTENSIONS)}) under "
                f"{self.control_root}" + (f" with {need!r} in their path" if need else "")
            )
        self.pairs, missing = [], []  # [(key, control path, image path)], [image path]
        for rel in controls:
            partner = rel
            for old, new in self.replace:
                partner = partner.replace(old, new)
            if (self.image_root / partner).is_file():
                self.pairs.append((rel, self.control_root / rel, self.image_root / partner))
            else:
                missing.append(self.image_root / partner)
        if not self.pairs:
            raise ValueError(
                f"PairedFolder: none of the {len(controls)} images under {self.control_root} has a "
                f"partner under {self.image_root} (replace={self.replace}); e.g. {missing[0]} is "
                "missing"
            )
        if missing:
            warnings.warn(
                f"PairedFolder: {len(missing)} of {len(controls)} control images have no partner "
                f"under {self.image_root} and are skipped; e.g. {missing[0]}"
            )
        self.captions = None
        if captions is not None:
            try:
                self.captions = json.loads(Path(captions).read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise ValueError(
                    f"PairedFolder: captions file {captions} is not readable json ({e})"
                ) from None
            if not isinstance(self.captions, dict) or not all(
                isinstance(v, str) for v in self.captions.values()
            ):
                raise ValueError(
                    f"PairedFolder: captions file {captions} must hold one object {{file: caption}}"
                )

    def set_epoch(self, epoch):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.pairs)

    def _caption(self, rel):
        if self.captions is None:
            return self.caption
        name = rel.rsplit("/", 1)[-1]
        return next(
            (self.captions[k] for k in (rel, name, name.rsplit(".", 1)[0]) if k in self.captions),
            "",
        )

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"PairedFolder index {i} out of range [0, {len(self)})")
        key, control_path, image_path = self.pairs[i]
        control = decode_image(key, control_path, self.counter)  # grey SAR -> 3 equal channels
        image = decode_image(key, image_path, self.counter) if control is not None else None
        if image is None:
            return None
        if control.size != image.size:
            self.counter.record_bad(
                key,
                f"size mismatch: control {control.size[0]}x{control.size[1]} ({control_path}) vs "
                f"image {image.size[0]}x{image.size[1]} ({image_path})",
            )
            return None
        if self.transform is None:
            image, control = pil_to_tensor(image), pil_to_tensor(control)
        else:  # two generators in one state: the same crop and flips for both
            g, g_control = sample_generator(self.seed, self.epoch, i), torch.Generator()
            g_control.set_state(g.get_state())
            image, control = self.transform(image, g), self.transform(control, g_control)
        self.counter.ok()
        return {
            "image": image,
            "control": control,
            "caption": self._caption(key).strip(),
            "level": self.level,
            "quality": float("nan"),
            "key": key,
        }
