"""Attention for the U-Net: the one attention function, and the spatial transformer built on it.

Every attention call in the U-Net goes through `attention()`. Which implementation runs is chosen in
exactly one place, `set_backend()`:
  "sdpa"   torch.nn.functional.scaled_dot_product_attention (default; flash / efficient /
           cuDNN / math on its own)
  "triton" our fused FlashAttention-2 kernel (gpu_kernels/flash_attention.py) for CUDA tensors
           (and any tensor under TRITON_INTERPRET=1, Triton's CPU interpreter, which is how CI
           tests it); otherwise SDPA
  "math"   the plain softmax(q k^T / sqrt(D)) v in fp32 math (gpu_kernels/reference.py),
           for reading and testing
"""

import os

import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from gpu_kernels.reference import attention_reference  # plain PyTorch, no Triton import

BACKENDS = ("sdpa", "triton", "math")
_backend = "sdpa"


def set_backend(name):
    """Pick the attention implementation for all later calls (see module docstring)."""
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    _backend = name


def get_backend():
    return _backend


def attention(q, k, v):
    """Scaled dot-product attention, no mask:
    q (B, heads, Lq, D), k/v (B, heads, Lk, D) -> (B, heads, Lq, D)."""
    if _backend == "triton" and (q.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"):
        # imported lazily: triton is only needed on the GPU
        from gpu_kernels.flash_attention import flash_attention

        return flash_attention(q, k, v)
    if _backend == "math":
        return attention_reference(q, k, v)
    return F.scaled_dot_product_attention(q, k, v)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context_dim` is None,
    else cross-attention to the context."""

    def __init__(self, dim, heads, context_dim=None):
        super().__init__()
        context_dim = context_dim or dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x, context=None):
        context = x if context is None else context  # x: B, L, C; context: B, Lc, Cc
        q, k, v = self.to_q(x), self.to_k(context), self.to_v(context)
        q, k, v = (rearrange(t, "b l (h d) -> b h l d", h=self.heads) for t in (q, k, v))
        out = attention(q, k, v)  # B, heads, L, D
        return self.to_out(rearrange(out, "b h l d -> b l (h d)"))  # B, L, C


class FeedForward(nn.Module):
    """GEGLU feed-forward (Shazeer 2020): (x W) * gelu(x V), then back to `dim`."""

    def __init__(self, dim, mult=4):
        super().__init__()
        self.proj_in = nn.Linear(dim, 2 * mult * dim)  # value and gate in one matmul, value first
        self.proj_out = nn.Linear(mult * dim, dim)

    def forward(self, x):
        value, gate = self.proj_in(x).chunk(2, dim=-1)
        return self.proj_out(value * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-norm block: self-attention, cross-attention to the text, GEGLU feed-forward."""

    def __init__(self, dim, heads, context_dim):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """Feature map -> tokens -> transformer block -> feature map, with a residual around it
    (SD2: linear projections)."""

    def __init__(self, channels, heads, context_dim, norm_groups=32):
        super().__init__()
        self.norm = nn.GroupNorm(norm_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, channels)
        self.block = TransformerBlock(channels, heads, context_dim)
        self.proj_out = nn.Linear(channels, channels)

    def forward(self, x, context):
        B, C, H, W = x.shape
        h = rearrange(self.norm(x), "b c h w -> b (h w) c")  # B, L=HW, C
        h = self.proj_out(self.block(self.proj_in(h), context))  # B, L, C
        return x + rearrange(h, "b (h w) c -> b c h w", h=H, w=W)
