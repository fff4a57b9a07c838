"""CLIP and SigLIP embeddings from a local Hugging Face folder, for the CLIP score and CMMD, and
Txt2Img-MHN's CLIP score.

A folder written by transformers' `save_pretrained`: config.json (model_type "clip" or "siglip"),
the weights, preprocessor_config.json and the tokenizer's files. flax-community/clip-rsicd-v2 and
OpenAI's CLIPs are CLIPModels, Git-RSCLIP (the Text2Earth authors' retrieval model, SigLIP
large/16 at 256 px) a SiglipModel. transformers is imported only here, when a folder is loaded
(`pip install transformers`; SigLIP's tokenizer also needs `pip install sentencepiece`). Nothing is
downloaded.

    clip = load_hf_clip("clip-rsicd-v2")
    img, txt = image_embeddings(clip, images), text_embeddings(clip, captions)  # (N, D), unit norm
    clip_score(img, txt)                         # evaluation/clip.py: 100 * mean max(cos, 0)
    clip_dot_score(clip, png_paths, captions)    # Txt2Img-MHN's figure: mean dot product

Images are (3, H, W) in [-1, 1], as evaluation/clip.py takes them: each becomes the 8-bit image a
PNG of it holds, then the folder's preprocessor_config.json is applied as transformers' default
(torchvision) image processor applies it: resize (CLIP: shortest edge, SigLIP: to a square, no
crop; 8-bit bicubic with antialiasing), centre crop, rescale and normalise in float32. Texts: CLIP
pads to the longest caption (77 tokens at most), SigLIP to exactly 64 tokens (its text tower pools
the last token and was trained on padded captions without an attention mask). transformers' PIL
image processor resizes in PIL instead, which moves a few pixels by one grey level.
"""

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torchvision.transforms.functional as TF
import torchvision.transforms.v2.functional as tvF
from PIL import Image

from evaluation.clip import batches_of
from model.release import WeightsError

WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
KINDS = ("clip", "siglip")  # config.json's model_type
RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's codes in preprocessor_config.json
PIL_RESAMPLE = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}
MHN_SIZE = 256  # Txt2Img-MHN's dataset: T.Resize(256) before the CLIP processor


@dataclass(frozen=True)
class ImageSettings:
    """A folder's image preprocessing (its preprocessor_config.json, as transformers reads it)."""

    resize: object  # int S: shortest edge to S; (H, W): to exactly that; None: no resize
    resample: str  # "bicubic" or "bilinear"
    crop: object  # (H, W) centre crop, or None
    rescale: object  # 1 / 255, or None
    mean: object  # per-channel mean after rescaling, or None (no normalisation)
    std: object


@dataclass
class HFClip:
    model: torch.nn.Module  # transformers' CLIPModel or SiglipModel, eval mode
    tokenizer: object  # the folder's tokenizer
    image: ImageSettings
    kind: str  # "clip" or "siglip"
    text_length: int  # CLIP: at most this many tokens; SigLIP: exactly this many
    name: str  # "CLIPModel from FOLDER", for reports
    files: list  # the files that define the network (config, preprocessing, weights): cache keys
    device: str = "cpu"


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ImportError(
            "Hugging Face CLIP / SigLIP folders are read with transformers: "
            "pip install transformers"
        ) from None
    return transformers


def check_folder(folder):
    """The folder's model_type ("clip" or "siglip"); a WeightsError naming what is missing when
    `folder` is not a transformers CLIP / SigLIP folder."""
    folder = Path(folder)
    what = (
        "a transformers save_pretrained folder of a CLIP or SigLIP model (config.json, "
        "model.safetensors, preprocessor_config.json and the tokenizer's files)"
    )
    if not folder.is_dir():
        raise WeightsError(f"{folder}: no such folder; expected {what}")
    missing = [n for n in ("config.json", "preprocessor_config.json") if not (folder / n).is_file()]
    if not any((folder / n).is_file() for n in WEIGHT_FILES):
        missing.append("model.safetensors (or pytorch_model.bin)")
    if missing:
        raise WeightsError(f"{folder}: no {', '.join(missing)}; expected {what}")
    kind = json.loads((folder / "config.json").read_text()).get("model_type")
    if kind not in KINDS:
        raise WeightsError(
            f"{folder}/config.json: model_type {kind!r}; a CLIP ('clip') or SigLIP ('siglip') "
            "model is expected"
        )
    return kind


def _size(d, *keys):
    d = dict(d or {})  # a dict, or transformers 5's SizeDict
    return [d.get(k) for k in keys]


def image_settings(processor, folder=""):
    """The ImageSettings of a transformers CLIP / SigLIP image processor."""
    resize = None
    if processor.do_resize:
        size = processor.size
        short, longest, h, w = _size(size, "shortest_edge", "longest_edge", "height", "width")
        if short and not longest:
            resize = int(short)
        elif h and w:
            resize = (int(h), int(w))
        else:
            raise ValueError(
                f"{folder}: image size {dict(processor.size)} is neither a shortest edge nor a "
                "height and width"
            )
    resample = RESAMPLE.get(int(processor.resample))
    if resample is None:
        raise ValueError(
            f"{folder}: resample {processor.resample} is not bicubic (3) or bilinear (2)"
        )
    crop = None
    if getattr(processor, "do_center_crop", False):
        h, w = _size(processor.crop_size, "height", "width")
        crop = (int(h), int(w))
    norm = bool(processor.do_normalize)
    return ImageSettings(
        resize,
        resample,
        crop,
        float(processor.rescale_factor) if processor.do_rescale else None,
        tuple(float(m) for m in processor.image_mean) if norm else None,
        tuple(float(s) for s in processor.image_std) if norm else None,
    )


def load_hf_clip(folder, device="cpu"):
    """The CLIPModel or SiglipModel saved in the local folder `folder`, with its tokenizer and image
    preprocessing, in eval mode."""
    folder = Path(folder)
    kind = check_folder(folder)
    transformers = _transformers()
    if kind == "siglip" and importlib.util.find_spec("sentencepiece") is None:
        raise ImportError(
            f"{folder}: SigLIP's tokenizer needs sentencepiece: pip install sentencepiece"
        )
    try:
        model = transformers.AutoModel.from_pretrained(folder, local_files_only=True)
        tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
        processor = transformers.AutoImageProcessor.from_pretrained(folder, local_files_only=True)
    except (OSError, ValueError) as e:  # a missing or unreadable file: transformers names it
        raise WeightsError(f"{folder}: {str(e).splitlines()[0][:400]}") from None
    text_cfg = model.config.text_config
    text_length = min(int(tokenizer.model_max_length), int(text_cfg.max_position_embeddings))
    weights = sorted([*folder.glob("model*.safetensors"), *folder.glob("pytorch_model*.bin")])
    files = [folder / "config.json", folder / "preprocessor_config.json", *weights]
    return HFClip(
        model.eval().to(device),
        tokenizer,
        image_settings(processor, folder),
        kind,
        text_length,
        f"{type(model).__name__} from {folder.name}",
        files,
        device,
    )


# ----------------------------------------------------------------------------------------------
# Embeddings
# ----------------------------------------------------------------------------------------------


def _resized_size(h, w, resize):
    """(height, width) after a resize to `resize` (int: shortest edge, as transformers and
    torchvision compute it; (H, W): exactly)."""
    if not isinstance(resize, int):
        return tuple(resize)
    short, long = (w, h) if w <= h else (h, w)
    long = int(resize * long / short)
    return (long, resize) if w <= h else (resize, long)


def _center_crop(x, size):
    """Centre crop of (C, H, W) to size (h, w), zero-padded first where the image is smaller."""
    h, w = x.shape[-2:]
    ch, cw = size
    if ch > h or cw > w:
        pw, ph = max(cw - w, 0), max(ch - h, 0)
        x = torch.nn.functional.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
        h, w = x.shape[-2:]
    top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return x[..., top : top + ch, left : left + cw]


def _normalise(x, s):
    """uint8 (C, H, W) -> float32, rescaled and normalised as s says (transformers' torchvision
    processor folds the rescale into mean and std)."""
    x = x.float()
    if s.mean is None:
        return x * s.rescale if s.rescale is not None else x
    k = 1.0 / s.rescale if s.rescale is not None else 1.0
    mean = torch.tensor(s.mean)[:, None, None] * k
    std = torch.tensor(s.std)[:, None, None] * k
    return (x - mean) / std


def pixel_values(s, images):
    """uint8 images, each (3, H, W), -> the model's input (B, 3, h, w) float32 under settings s."""
    out = []
    for u8 in images:
        x = u8.cpu()
        if s.resize is not None:
            size = _resized_size(*x.shape[-2:], s.resize)
            mode = tvF.InterpolationMode(s.resample)
            x = tvF.resize(x, list(size), interpolation=mode, antialias=True)
        if s.crop is not None:
            x = _center_crop(x, s.crop)
        out.append(_normalise(x, s))
    if len({tuple(x.shape) for x in out}) > 1:
        raise ValueError(
            f"images of different sizes after preprocessing ({sorted({x.shape for x in out})}): "
            "the folder's preprocessing has no crop to a common size"
        )
    return torch.stack(out)


def _uint8(image):
    """(3, H, W) in [-1, 1] -> the uint8 image a PNG of it would hold."""
    return ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def _features(out):
    """get_image_features / get_text_features' projected features: a tensor (transformers 4) or
    the pooler_output of its output (transformers 5)."""
    return out if torch.is_tensor(out) else out.pooler_output


def _unit(e):
    e = e.double()
    return (e / e.norm(dim=1, keepdim=True)).cpu()


@torch.no_grad()
def image_embeddings(clip, images, batch_size=64):
    """Unit-norm image embeddings (N, D) float64 for images, a tensor (N, 3, H, W) in [-1, 1] or an
    iterable of such batches, through the folder's own preprocessing."""
    out = []
    for b in batches_of(images, batch_size):
        x = pixel_values(clip.image, [_uint8(im) for im in b]).to(clip.device)
        out.append(_unit(_features(clip.model.get_image_features(pixel_values=x))))
    return torch.cat(out)


def _text_features(clip, texts):
    """Projected, unnormalised text features (N, D) of the strings `texts`."""
    if clip.kind == "siglip":  # padded to its length, no attention mask: as SigLIP was trained
        t = clip.tokenizer(
            list(texts),
            padding="max_length",
            max_length=clip.text_length,
            truncation=True,
            return_tensors="pt",
        )
        return _features(clip.model.get_text_features(input_ids=t["input_ids"].to(clip.device)))
    t = clip.tokenizer(
        list(texts), padding=True, max_length=clip.text_length, truncation=True, return_tensors="pt"
    )
    return _features(
        clip.model.get_text_features(
            input_ids=t["input_ids"].to(clip.device),
            attention_mask=t["attention_mask"].to(clip.device),
        )
    )


@torch.no_grad()
def text_embeddings(clip, texts, batch_size=256):
    """Unit-norm text embeddings (N, D) float64 of the strings `texts`."""
    return torch.cat(
        [
            _unit(_text_features(clip, texts[i : i + batch_size]))
            for i in range(0, len(texts), batch_size)
        ]
    )


# ----------------------------------------------------------------------------------------------
# Txt2Img-MHN's CLIP score
# ----------------------------------------------------------------------------------------------


def mhn_pixels(image, s):
    """One image file (or PIL image) as Txt2Img-MHN's clip_score.py hands it to clip-rsicd-v2:
    (3, h, w) float32.

    Their dataset reads the PNG as RGB, resizes its shorter side to 256 (T.Resize(256): PIL
    bilinear, nothing done at 256) and makes floats in [0, 1] (ToTensor). CLIPProcessor is given
    those floats; we reproduce transformers 4.27, the release under which their loop reads the
    images (docs/evaluation.md): to PIL by * 255 truncated to uint8 (the 8-bit image back, exactly,
    for every value), PIL resize of the shortest edge (bicubic), centre crop, uint8 * (1 / 255) in
    float64 stored as float32, (x - mean) / std in float32."""
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            return mhn_pixels(im.convert("RGB"), s)
    im = image.convert("RGB") if image.mode != "RGB" else image
    x = TF.to_tensor(TF.resize(im, MHN_SIZE))  # (3, H, W) float32 in [0, 1]
    u8 = (x * 255).to(torch.uint8)  # to_pil_image: rescale by 255, astype(uint8)
    pil = Image.fromarray(u8.permute(1, 2, 0).numpy())
    if s.resize is not None:
        h, w = _resized_size(pil.height, pil.width, s.resize)
        pil = pil.resize((w, h), PIL_RESAMPLE[s.resample])
    x = torch.from_numpy(np.array(pil)).permute(2, 0, 1)  # uint8 (3, h, w)
    if s.crop is not None:
        x = _center_crop(x, s.crop)
    x = (x.double() * s.rescale).float() if s.rescale is not None else x.float()
    if s.mean is None:
        return x
    mean = torch.tensor(s.mean, dtype=torch.float32)[:, None, None]
    std = torch.tensor(s.std, dtype=torch.float32)[:, None, None]
    return (x - mean) / std


@torch.no_grad()
def clip_dot_score(clip, images, captions, batch_size=64):
    """Txt2Img-MHN's CLIP score (github YonghaoXu/Txt2Img-MHN, clip_score.py), the figure of the
    RSICD tables (Txt2Img-MHN 20.27, Text2Earth 25.62): the mean over (image, caption) pairs of the
    dot product of the projected, unnormalised image and text features of flax-community/
    clip-rsicd-v2. Their script prints the mean of dot / 100; the papers print it times 100, this.

    images: image files (or PIL images), each paired with the caption of the same index (theirs:
    10 generated images per test image, each with its first caption); read as mhn_pixels reads
    them."""
    if len(images) != len(captions):
        raise ValueError(f"{len(images)} images and {len(captions)} captions: pairs are expected")
    dots = []
    for i in range(0, len(images), batch_size):
        x = torch.stack([mhn_pixels(im, clip.image) for im in images[i : i + batch_size]])
        img = _features(clip.model.get_image_features(pixel_values=x.to(clip.device)))
        txt = _text_features(clip, captions[i : i + batch_size])
        dots.append((img.double() * txt.double()).sum(1).cpu())
    return torch.cat(dots).mean().item()
