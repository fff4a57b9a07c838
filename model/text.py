"""The frozen text encoder: OpenCLIP's text transformer (ViT-H-14 for Text2Earth), SD2 convention.

SD2 conditions on the *penultimate* layer of the 24-layer ViT-H-14 text tower, followed by the final
LayerNorm. We simply build the tower with `layers = 23` and apply `ln_final` to every token: identical to
running 24 layers and reading layer 23, and identical to the release's 23-layer HF `CLIPTextModel`.
"""
import logging

import torch
import torch.nn as nn
from open_clip.tokenizer import SimpleTokenizer
from open_clip.transformer import TextTransformer

from model.config import TextConfig

log = logging.getLogger(__name__)


class TextEncoder(nn.Module):
    """Token ids (B, 77) -> hidden states (B, 77, width), the U-Net's cross-attention context."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        # open_clip's own module, so its checkpoints load by name; no projection head (SD2 never uses it).
        self.tower = TextTransformer(context_length=cfg.context_length, vocab_size=cfg.vocab_size, width=cfg.width,
                                     heads=cfg.heads, layers=cfg.layers, output_dim=None, proj_type="none")

    def forward(self, ids):
        t = self.tower
        x = t.token_embedding(ids) + t.positional_embedding[: ids.shape[1]]      # B, 77, width
        x = t.transformer(x, attn_mask=t.attn_mask)                              # causal self-attention
        return t.ln_final(x)                                                     # B, 77, width


class Tokenizer:
    """open_clip's BPE tokenizer (the same vocabulary as the release's `tokenizer/` files).

    Pads with 0 like open_clip and SD2's tokenizer ("!" = id 0). Prompts over the context length are
    truncated, keeping the end-of-text token, with a warning.
    """

    def __init__(self, context_length=77):
        self.bpe = SimpleTokenizer(context_length=context_length)
        self.context_length = context_length

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            n = len(self.bpe.encode(p)) + 2                                      # + start and end tokens
            if n > self.context_length:
                log.warning("prompt of %d tokens truncated to %d: %r", n, self.context_length, p[:80])
        return self.bpe(prompts)                                                 # B, 77 long


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts, device=None):
    """List of strings -> (B, 77, width) context on `device`. The empty prompt "" is the null condition."""
    device = device or next(text_encoder.parameters()).device
    return text_encoder(tokenizer(prompts).to(device))
