"""CLIP embeddings from a local open_clip checkpoint, for the CLIP score and CMMD.

RemoteCLIP and GeoRSCLIP are open_clip state dicts: the model is named by open_clip's architecture
name and the file, e.g. ViT-B-32 and RemoteCLIP-ViT-B-32.pt. Hugging Face folders (clip-rsicd-v2,
Git-RSCLIP) are read by evaluation/hf_clip.py, with functions of the same names and results.
Nothing is downloaded.

    clip = load_clip("ViT-B-32", "RemoteCLIP-ViT-B-32.pt")
    img, txt = image_embeddings(clip, images), text_embeddings(clip, captions)  # (N, D), unit norm
    clip_score(img, txt)  # 100 * mean max(cos, 0)
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from model.release import WeightsError

HF = "hf"  # parse_spec's first field for a Hugging Face folder


@dataclass
class Clip:
    model: torch.nn.Module
    preprocess: object  # open_clip's evaluation transform: PIL image -> (3, S, S)
    tokenizer: object
    name: str  # "ARCH from FILE", for reports
    device: str = "cpu"


def parse_spec(spec):
    """The --clip flag's format: 'ARCH:FILE' (an open_clip architecture and checkpoint) ->
    (ARCH, FILE); a Hugging Face folder, 'hf:FOLDER' or a folder holding config.json, ->
    (HF, FOLDER), read by evaluation/hf_clip.py."""
    spec = str(spec)
    if spec.startswith(HF + ":") or (Path(spec) / "config.json").is_file():
        folder = spec[len(HF) + 1 :] if spec.startswith(HF + ":") else spec
        if folder:
            return HF, Path(folder)
    arch, sep, path = spec.partition(":")
    if not sep or not arch or not path or arch == HF:
        raise ValueError(
            f"--clip {spec!r}: expected ARCH:FILE, an open_clip architecture name and a local "
            "checkpoint (e.g. ViT-B-32:RemoteCLIP-ViT-B-32.pt), or hf:FOLDER, a Hugging Face CLIP "
            "or SigLIP folder (e.g. hf:clip-rsicd-v2)"
        )
    return arch, Path(path)


def architectures():
    """open_clip's architecture names (those of its configs, and any added with
    open_clip.add_model_config)."""
    import open_clip  # heavy: imported only by what evaluates with CLIP

    return open_clip.list_models()


def load_clip(arch, path, device="cpu"):
    """An open_clip model of architecture `arch` with the weights in the local
    file `path`, in eval mode."""
    import open_clip  # heavy: imported only by what evaluates with CLIP

    path = Path(path)
    if not path.is_file():
        raise WeightsError(
            f"CLIP weights {path} do not exist: give an open_clip checkpoint of {arch} (e.g. "
            f"RemoteCLIP or GeoRSCLIP) as --clip {arch}:FILE"
        )
    if arch not in open_clip.list_models():
        raise ValueError(
            f"--clip: unknown open_clip architecture {arch!r}; known: "
            f"{', '.join(open_clip.list_models()[:20])}, ..."
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(
            arch, pretrained=str(path), device=device
        )
    except RuntimeError as e:  # state-dict mismatch: open_clip's message names the keys
        raise WeightsError(
            f"{path}: not a {arch} checkpoint: {str(e).splitlines()[0][:400]}"
        ) from None
    return Clip(
        model.eval(), preprocess, open_clip.get_tokenizer(arch), f"{arch} from {path.name}", device
    )


def _pil(image):
    """(3, H, W) in [-1, 1] -> the uint8 RGB image a PNG of it would hold."""
    u8 = ((image.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(u8))


def batches_of(images, batch_size):
    """Batches of images: a tensor (N, 3, H, W) cut into batch_size pieces, or an iterable of
    batches (ImageFiles.batches) as it is."""
    if not torch.is_tensor(images):
        return images
    return (images[i : i + batch_size] for i in range(0, len(images), batch_size))


@torch.no_grad()
def image_embeddings(clip, images, batch_size=64):
    """Unit-norm image embeddings (N, D) float64 for images, a tensor (N, 3, H, W) in [-1, 1] or an
    iterable of such batches, through open_clip's own evaluation transform (resize, centre crop,
    the model's mean/std)."""
    out = []
    for b in batches_of(images, batch_size):
        x = torch.stack([clip.preprocess(_pil(im)) for im in b]).to(clip.device)
        e = clip.model.encode_image(x).double()
        out.append((e / e.norm(dim=1, keepdim=True)).cpu())
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(clip, texts, batch_size=256):
    """Unit-norm text embeddings (N, D) float64 of the strings `texts`."""
    out = []
    for i in range(0, len(texts), batch_size):
        e = clip.model.encode_text(
            clip.tokenizer(list(texts[i : i + batch_size])).to(clip.device)
        ).double()
        out.append((e / e.norm(dim=1, keepdim=True)).cpu())
    return torch.cat(out)


def clip_score(image_emb, text_emb):
    """CLIP score of paired rows: 100 * mean over pairs of max(cos(image, text), 0) (Hessel et al.
    2021's per-pair clamp, with 100 for their weight 2.5; torchmetrics clamps the mean instead, the
    same unless cosines go negative)."""
    if image_emb.shape != text_emb.shape:
        raise ValueError(
            f"CLIP score pairs images with texts: {tuple(image_emb.shape)} vs "
            f"{tuple(text_emb.shape)}"
        )
    return (100 * (image_emb * text_emb).sum(1).clamp_min(0).mean()).item()
