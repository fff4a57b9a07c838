"""The whole model: U-Net, KL-VAE and text encoder built from one `ModelConfig`, plus the small
glue between them (conditions -> what the U-Net reads, prompts -> context, images <-> scaled
latents). Diffusion and sampling live elsewhere (model/diffusion.py, model/pipeline.py); this
class holds weights only."""

import torch
import torch.nn as nn

from model.config import ModelConfig
from model.text import TextEncoder, Tokenizer, encode_prompts
from model.unet import UNet
from model.vae import AutoencoderKL


class Text2Earth(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        missing = [name for name in cfg.condition_names() if name not in cfg.conditions]
        if missing:
            raise ValueError(
                f"model config: the U-Net reads the conditions {missing}, which model.conditions "
                f"lacks (it has {sorted(cfg.conditions)}): give each its field, null and p_drop"
            )
        self.cfg = cfg
        self.unet = UNet(cfg.unet)
        self.vae = AutoencoderKL(cfg.vae)
        self.text_encoder = TextEncoder(cfg.text)
        self.tokenizer = Tokenizer(cfg.text.context_length)

    def encode_text(self, prompts):
        """list[str] -> (B, 77, width) context; "" gives the null condition used by
        classifier-free guidance."""
        return encode_prompts(self.text_encoder, self.tokenizer, prompts)

    def encode_conditions(self, cond, device=None):
        """Raw conditions (model/conditions.py: {"text": [B str], "level": (B,)}) -> what the
        U-Net reads: the text through the text encoder (with grad if it trains), every scalar as a
        float tensor on `device`. A text given as a tensor is an encoded context already
        (B, 77, width) and is used as it is, so sampling can encode its prompts once and then free
        the text encoder (sample.py)."""
        device = device or next(self.text_encoder.parameters()).device
        out = {}
        for name in self.cfg.condition_names():
            if name == "text" and torch.is_tensor(cond[name]):
                out[name] = cond[name].to(device)  # B, 77, width
            elif name == "text":
                # B, 77, width
                out[name] = self.text_encoder(self.tokenizer(list(cond[name])).to(device))
            else:
                out[name] = torch.as_tensor(cond[name], dtype=torch.float32).to(device)  # B
        return out

    @torch.no_grad()
    def encode_images(self, images, generator=None, sample=True):
        """(B, 3, H, W) in [-1, 1] -> scaled latents (B, 4, H/8, W/8)."""
        return self.vae.encode_latents(images, generator, sample)

    @torch.no_grad()
    def decode_latents(self, z, tile=None):
        """Scaled latents -> images (B, 3, H, W) clamped to [-1, 1]."""
        return self.vae.decode_latents(z, tile=tile).clamp(-1, 1)

    def parameter_counts(self):
        """Parameters per component and in total (works on the meta device)."""
        counts = {
            name: sum(p.numel() for p in getattr(self, name).parameters())
            for name in ("unet", "vae", "text_encoder")
        }
        counts["total"] = sum(counts.values())
        return counts
