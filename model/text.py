"""The frozen text encoder: OpenCLIP's text transformer (ViT-H-14 for Text2Earth), SD2 convention.

SD2 conditions on the *penultimate* layer of the 24-layer ViT-H-14 text tower, followed by the
final LayerNorm. We simply build the tower with `layers = 23` and apply `ln_final` to every
token: identical to running 24 layers and reading layer 23, and identical to the release's
23-layer HF `CLIPTextModel`.

The tower is written here with open_clip's parameter names (`token_embedding`,
`positional_embedding`, `transformer.resblocks.N.{ln_1, attn.in_proj_*, attn.out_proj, ln_2,
mlp.c_fc, mlp.c_proj}`, `ln_final`), so OpenCLIP checkpoints load by name; tests/test_parity.py
checks it against open_clip's own TextTransformer. Importing the `open_clip` package costs seconds
(it builds its model registry and pulls in transformers and torchvision); only its tokenizer file is
read, and only when a `Tokenizer` is made.
"""

import importlib.util
import logging
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

from model.config import TextConfig

log = logging.getLogger(__name__)


class CausalSelfAttention(nn.Module):
    """nn.MultiheadAttention's parameters (q, k, v fused in `in_proj`),
    computed by SDPA with a causal mask."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x):  # B, L, width
        B, L, C = x.shape
        q, k, v = (
            F.linear(x, self.in_proj_weight, self.in_proj_bias)
            .view(B, L, 3, self.heads, -1)
            .unbind(2)
        )
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )  # B, heads, L, D
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class ResidualBlock(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a GELU MLP (4x width)."""

    def __init__(self, width, heads):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential()
        self.mlp.add_module("c_fc", nn.Linear(width, 4 * width))
        self.mlp.add_module("gelu", nn.GELU())
        self.mlp.add_module("c_proj", nn.Linear(4 * width, width))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class TextTower(nn.Module):
    """open_clip's TextTransformer without pooling or projection
    (SD2 uses every token's hidden state)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        # an empty weight given: Embedding's own init (normal_) would cost seconds of
        # imports on the meta device
        self.token_embedding = nn.Embedding(
            cfg.vocab_size, cfg.width, _weight=torch.empty(cfg.vocab_size, cfg.width)
        )
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.width))
        self.transformer = nn.Module()
        self.transformer.resblocks = nn.ModuleList(
            ResidualBlock(cfg.width, cfg.heads) for _ in range(cfg.layers)
        )
        self.ln_final = nn.LayerNorm(cfg.width)
        # built on the meta device, the weights are loaded next
        if not self.positional_embedding.is_meta:
            self.init_parameters(cfg)

    def init_parameters(self, cfg):
        """open_clip's initialisation (normal, scaled by width and depth);
        biases keep nn.Linear's."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        proj_std = cfg.width**-0.5 * (2 * cfg.layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=cfg.width**-0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * cfg.width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)

    def forward(self, ids):
        x = self.token_embedding(ids) + self.positional_embedding[: ids.shape[1]]  # B, L, width
        for block in self.transformer.resblocks:
            x = block(x)
        return self.ln_final(x)  # B, L, width


class TextEncoder(nn.Module):
    """Token ids (B, 77) -> hidden states (B, 77, width), the U-Net's cross-attention context."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.tower = TextTower(cfg)

    def forward(self, ids):
        return self.tower(ids)


def _open_clip_tokenizer_module():
    """open_clip/tokenizer.py (which imports nothing of its package), loaded without running the
    package's __init__; the package's own module when open_clip is already imported."""
    if "open_clip.tokenizer" in sys.modules:
        return sys.modules["open_clip.tokenizer"]
    name = "model._open_clip_tokenizer"
    if name not in sys.modules:
        spec = importlib.util.find_spec("open_clip")  # locates; runs nothing
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("open_clip_torch is not installed (pip install -r requirements.txt)")
        path = f"{spec.submodule_search_locations[0]}/tokenizer.py"
        module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, path))
        module.__spec__.loader.exec_module(module)
        sys.modules[name] = module
    return sys.modules[name]


class Tokenizer:
    """open_clip's BPE tokenizer (the same vocabulary as the release's `tokenizer/` files).

    Pads with 0 like open_clip and SD2's tokenizer ("!" = id 0). Prompts over the context length are
    truncated, keeping the end-of-text token, with a warning. The vocabulary is read on first use.
    """

    def __init__(self, context_length=77):
        self.context_length = context_length
        self._bpe = None

    @property
    def bpe(self):
        if self._bpe is None:
            self._bpe = _open_clip_tokenizer_module().SimpleTokenizer(
                context_length=self.context_length
            )
        return self._bpe

    def __call__(self, prompts):
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        for p in prompts:
            n = len(self.bpe.encode(p)) + 2  # + start and end tokens
            if n > self.context_length:
                log.warning(
                    "prompt of %d tokens truncated to %d: %r", n, self.context_length, p[:80]
                )
        return self.bpe(prompts)  # B, 77 long


@torch.no_grad()
def encode_prompts(text_encoder, tokenizer, prompts, device=None):
    """List of strings -> (B, 77, width) context on `device`.
    The empty prompt "" is the null condition."""
    device = device or next(text_encoder.parameters()).device
    return text_encoder(tokenizer(prompts).to(device))
