"""The denoising U-Net: SD2-base layout (Rombach et al. 2022) plus Text2Earth's
resolution embedding.

    unet(x_t, t, cond) -> prediction (eps, v or x0, as the diffusion config says)
    cond = {"text": (B, L, D) context, "level": (B,), "location": (B, 2), ...}
    (model/conditions.py)

The Google map level L (resolution_m = 2 ** (17 - L); 0 = "no resolution") is embedded exactly like
the timestep and *added* to the time embedding, so every res-block is told the ground resolution.
Every name in `scalar_conditions` is embedded that way, each with its own MLP: a new scalar
condition needs no new code here. Every name in `place_conditions` (a location: latitude and
longitude) is embedded on the sphere (PlaceEmbedding) and added the same way.

Open for extension without rewrites:
- `in_channels` = 9 gives the inpainting model
  ([x_t, mask, masked-image latent] concatenated on channels);
- `down_residuals` / `mid_residual` are added to the skip features (what a ControlNet produces);
- every linear / conv is a plain nn.Linear / nn.Conv2d that an adapter (LoRA) can wrap.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model.attention import SpatialTransformer
from model.config import UNetConfig


def sinusoidal_embedding(t, dim, max_period=10000.0):
    """t: (B,) float -> (B, dim) as [cos(t w_i), sin(t w_i)], w_i = max_period ** (-i / (dim / 2))
    (DDPM's, cos first)."""
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    )
    angles = t.float()[:, None] * freqs[None]  # B, dim/2
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=-1)  # B, dim


class EmbeddingMLP(nn.Module):
    """Linear -> SiLU -> Linear, from the sinusoidal features to the time-embedding width."""

    def __init__(self, in_dim, dim):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, x):
        return self.fc2(F.silu(self.fc1(x)))


class ScalarEmbedding(EmbeddingMLP):
    """One number per sample (the level) -> the time-embedding width: its sinusoidal features, as
    the timestep's, through an MLP. Takes (B,) values."""

    width = 1  # numbers per sample

    def forward(self, value):
        features = sinusoidal_embedding(value, self.fc1.in_features)  # B, in_dim
        return super().forward(features.to(self.fc1.weight.dtype))


class PlaceEmbedding(EmbeddingMLP):
    """A place on the globe, (lat, lon) in degrees -> the time-embedding width. The place becomes
    its 3-D unit vector u = (cos lat cos lon, cos lat sin lon, sin lat), so 179.9 E sits next to
    179.9 W and every longitude at a pole is one point; the features are sin and cos of each
    coordinate of u at `frequencies` frequencies from 1 to `max_frequency` (geometric; at 32 the
    fastest has a period of about 360 / 32 = 11 degrees of arc, so places a few degrees apart
    differ while the function stays smooth enough to reach regions never trained on; on the demo's
    globe 32 did a little better than 128 in held-out regions), then an MLP. Smooth on the whole
    sphere as spherical harmonics are (SatCLIP, whose L = 40 resolves ~9 degrees), at a fixed cost
    and with no Legendre recursions. A row with a NaN (the null: no place) embeds to exactly zero,
    so the model without a place computes what the model without the embedder computes. Takes
    (B, 2)."""

    width = 2  # numbers per sample

    def __init__(self, dim, frequencies=16, max_frequency=32.0):
        super().__init__(6 * frequencies, dim)
        self.frequencies, self.max_frequency = frequencies, max_frequency
        # the last layer starts at zero, from scratch too: the place joins a U-Net that learns
        # the text and the level undisturbed, and grows in as it is learnt (DiT's adaLN-Zero)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, place):
        place = place.float()
        given = place.isfinite().all(dim=-1)  # B
        # no NaN reaches the MLP, not even in rows thrown away (its gradient would be NaN)
        lat, lon = torch.deg2rad(torch.where(given[:, None], place, 0.0)).unbind(-1)  # B each
        u = torch.stack([lat.cos() * lon.cos(), lat.cos() * lon.sin(), lat.sin()], dim=-1)  # B, 3
        freqs = torch.logspace(
            0.0, math.log2(self.max_frequency), self.frequencies, base=2.0, device=u.device
        )  # F
        angles = (u[:, :, None] * freqs).flatten(1)  # B, 3F
        features = torch.cat([angles.sin(), angles.cos()], dim=-1)  # B, 6F
        out = super().forward(features.to(self.fc1.weight.dtype))  # B, dim
        return torch.where(given[:, None], out, torch.zeros_like(out))


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added in between (DDPM / SD residual block).

    scale_shift: the embedding sets a per-channel scale and shift of the normalised features instead
    (ADM's AdaGN, Dhariwal & Nichol 2021): h = norm2(h) * (1 + scale) + shift. SD's additive bias
    comes before norm2, which removes its mean over each channel group."""

    def __init__(self, in_ch, out_ch, emb_dim, groups, eps, scale_shift=False):
        super().__init__()
        self.scale_shift = scale_shift
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, 2 * out_ch if scale_shift else out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))  # B, out, H, W
        e = self.emb_proj(F.silu(emb))[:, :, None, None]  # B, out (or 2 out), 1, 1
        if self.scale_shift:
            scale, shift = e.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + e)
        h = self.conv2(F.silu(h))
        return self.skip(x) + h


class Downsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution level: res-blocks, each optionally followed by a spatial transformer,
    then a resampler."""

    def __init__(self, in_chs, out_ch, emb_dim, heads, cfg, attention, resample):
        super().__init__()
        g, eps = cfg.norm_groups, cfg.norm_eps
        self.res = nn.ModuleList(
            [ResBlock(c, out_ch, emb_dim, g, eps, cfg.scale_shift_norm) for c in in_chs]
        )
        self.attn = nn.ModuleList(
            [SpatialTransformer(out_ch, heads, cfg.context_dim, g) for _ in in_chs]
            if attention
            else []
        )
        self.resample = resample


class MidBlock(nn.Module):
    def __init__(self, ch, emb_dim, heads, cfg):
        super().__init__()
        self.res1 = ResBlock(ch, ch, emb_dim, cfg.norm_groups, cfg.norm_eps, cfg.scale_shift_norm)
        self.attn = SpatialTransformer(ch, heads, cfg.context_dim, cfg.norm_groups)
        self.res2 = ResBlock(ch, ch, emb_dim, cfg.norm_groups, cfg.norm_eps, cfg.scale_shift_norm)


class Encoder(nn.Module):
    """The first half of the U-Net: embeddings, input conv, down path and middle block. UNet
    completes it with the up path; a ControlNet (model/controlnet.py) is a trainable copy of it, so
    both have the same parameter names."""

    def _build_encoder(self, cfg: UNetConfig):
        """Build the shared modules; returns (time-embedding width,
        channels of every skip feature kept)."""
        n = len(cfg.channels)
        if not (len(cfg.attention) == len(cfg.heads) == n):
            raise ValueError(
                f"UNetConfig: channels {cfg.channels}, attention {cfg.attention} and heads "
                f"{cfg.heads} must have one entry per level"
            )
        self.cfg = cfg
        ch0 = cfg.channels[0]
        emb_dim = cfg.time_dim or 4 * ch0
        self.time_embed = EmbeddingMLP(ch0, emb_dim)
        # every embedder ends in fc2 (started at zero when a condition is added to a trained
        # model, model/weights.load_pretrained)
        self.cond_embed = nn.ModuleDict(
            {name: ScalarEmbedding(ch0, emb_dim) for name in cfg.scalar_conditions}
            | {name: PlaceEmbedding(emb_dim) for name in cfg.place_conditions}
        )
        self.conv_in = nn.Conv2d(cfg.in_channels, ch0, 3, padding=1)
        skips, ch = [ch0], ch0
        self.down = nn.ModuleList()
        for i, out in enumerate(cfg.channels):
            last = i == n - 1
            in_chs = [ch] + [out] * (cfg.layers_per_level - 1)
            self.down.append(
                Level(
                    in_chs,
                    out,
                    emb_dim,
                    cfg.heads[i],
                    cfg,
                    cfg.attention[i],
                    None if last else Downsample(out),
                )
            )
            skips += [out] * (cfg.layers_per_level + (0 if last else 1))
            ch = out
        self.mid = MidBlock(ch, emb_dim, cfg.heads[-1], cfg)
        return emb_dim, skips

    def _call(self, module, *args):
        """Run a block, recomputing its activations in the backward pass when gradient
        checkpointing is on."""
        if self.cfg.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def embed(self, t, cond):
        """Time embedding plus the embedding of every condition but the text:
        t (B,), cond[name] (B,) or (B, k) -> (B, time_dim)."""
        ch0 = self.cfg.channels[0]
        dtype = self.time_embed.fc1.weight.dtype
        emb = self.time_embed(sinusoidal_embedding(t, ch0).to(dtype))
        for name, embedder in self.cond_embed.items():
            if name not in cond:
                raise ValueError(
                    f"this U-Net reads the condition {name!r}: pass it in cond (its null value "
                    "means absent, e.g. level 0 = no resolution)"
                )
            emb = emb + embedder(cond[name])  # B, time_dim
        return emb

    def encode(self, x, t, cond, hint=None):
        """x: (B, in_channels, H, W), t: (B,) or scalar,
        cond: {"text": (B, Lc, context_dim), scalar name: (B,) or scalar}; hint (B, C0, H, W) is
        added after the input conv (a ControlNet's embedded control image). Returns (middle block
        output, skip features [B, C, H', W'], time embedding (B, time_dim))."""
        B = x.shape[0]
        if x.shape[1] != self.cfg.in_channels:
            raise ValueError(
                f"U-Net expects {self.cfg.in_channels} input channels, got x of shape "
                f"{tuple(x.shape)}"
            )
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(B)
        values = {}  # name -> (B,) or (B, k)
        for name in self.cond_embed:
            if name in cond:
                v = torch.as_tensor(cond[name], device=x.device, dtype=torch.float32)
                v = v.reshape(1) if v.ndim == 0 else v
                values[name] = v.expand(B, *v.shape[1:])
        emb = self.embed(t, values)  # B, time_dim
        context = cond["text"]  # B, Lc, context_dim
        h = self.conv_in(x)  # B, C0, H, W
        if hint is not None:
            h = h + hint
        feats = [h]
        for lvl in self.down:
            for j, res in enumerate(lvl.res):
                h = self._call(res, h, emb)
                if lvl.attn:
                    h = self._call(lvl.attn[j], h, context)
                feats.append(h)
            if lvl.resample is not None:
                h = lvl.resample(h)  # B, C, H/2, W/2
                feats.append(h)
        h = self._call(self.mid.res1, h, emb)
        h = self._call(self.mid.attn, h, context)
        h = self._call(self.mid.res2, h, emb)
        return h, feats, emb


class UNet(Encoder):
    def __init__(self, cfg: UNetConfig):
        super().__init__()
        emb_dim, skips = self._build_encoder(cfg)
        ch = cfg.channels[-1]
        # Up path: one more res-block per level than on the way down, each eating one skip.
        self.up = nn.ModuleList()
        for i, out in reversed(list(enumerate(cfg.channels))):
            in_chs = []
            for _ in range(cfg.layers_per_level + 1):
                in_chs.append(ch + skips.pop())
                ch = out
            self.up.append(
                Level(
                    in_chs,
                    out,
                    emb_dim,
                    cfg.heads[i],
                    cfg,
                    cfg.attention[i],
                    Upsample(out) if i > 0 else None,
                )
            )
        self.norm_out = nn.GroupNorm(cfg.norm_groups, cfg.channels[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(cfg.channels[0], cfg.out_channels, 3, padding=1)

    def forward(self, x, t, cond, down_residuals=None, mid_residual=None):
        """x: (B, in_channels, H, W), t: (B,) or scalar,
        cond: {"text": (B, Lc, context_dim), scalar name: (B,) or scalar}. H and W must be multiples
        of 2 ** (levels - 1). Returns (B, out_channels, H, W). down_residuals (one per skip
        feature) and mid_residual are added to the skips and to the middle block's output (what a
        ControlNet produces, model/controlnet.py).
        """
        h, feats, emb = self.encode(x, t, cond)
        if down_residuals is not None:  # ControlNet: one per skip feature
            if len(down_residuals) != len(feats):
                raise ValueError(
                    f"down_residuals: expected {len(feats)} tensors, got {len(down_residuals)}"
                )
            feats = [f + r for f, r in zip(feats, down_residuals)]
        if mid_residual is not None:
            h = h + mid_residual
        context = cond["text"]
        for lvl in self.up:
            for j, res in enumerate(lvl.res):
                h = self._call(res, torch.cat([h, feats.pop()], dim=1), emb)
                if lvl.attn:
                    h = self._call(lvl.attn[j], h, context)
            if lvl.resample is not None:
                h = lvl.resample(h)  # B, C, 2H, 2W
        return self.conv_out(F.silu(self.norm_out(h)))  # B, out_channels, H, W
