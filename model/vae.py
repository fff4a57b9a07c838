"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022, Sec. 3 and App. G).

    image (B, 3, H, W) in [-1, 1]  --encode-->  posterior over (B, 4, H/8, W/8)  --decode-->  image

Diffusion runs on `scaling_factor * z` (0.18215 for the SD / Text2Earth VAE) so latents have
unit-ish variance; `encode_latents` / `decode_latents` apply that factor,
`encode` / `decode` do not.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from model.config import VAEConfig


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 shortcut when the width changes (no time embedding)."""

    def __init__(self, in_ch, out_ch, groups):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=1e-6)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=1e-6)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over all H*W positions (only used once, in the mid-block)."""

    def __init__(self, ch, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(ch, ch) for _ in range(4))

    def forward(self, x):
        B, C, H, W = x.shape
        h = rearrange(self.norm(x), "b c h w -> b 1 (h w) c")  # B, 1 head, L, C
        out = F.scaled_dot_product_attention(self.to_q(h), self.to_k(h), self.to_v(h))
        out = rearrange(self.to_out(out), "b 1 (h w) c -> b c h w", h=H, w=W)
        return x + out


class MidBlock(nn.Module):
    def __init__(self, ch, groups):
        super().__init__()
        self.res1 = ResBlock(ch, ch, groups)
        self.attn = SelfAttention(ch, groups)
        self.res2 = ResBlock(ch, ch, groups)

    def forward(self, x):
        return self.res2(self.attn(self.res1(x)))


class Downsample(nn.Module):
    """Stride-2 3x3 conv with the LDM's asymmetric padding (pad right and bottom only)."""

    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, ch):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    def __init__(self, in_ch, out_ch, n_res, groups, resample):
        super().__init__()
        self.res = nn.ModuleList(
            [ResBlock(in_ch if i == 0 else out_ch, out_ch, groups) for i in range(n_res)]
        )
        self.resample = resample

    def forward(self, x):
        for res in self.res:
            x = res(x)
        return x if self.resample is None else self.resample(x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g, n = cfg.channels, cfg.norm_groups, len(cfg.channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, chs[0], 3, padding=1)
        self.levels = nn.ModuleList(
            [
                Level(
                    chs[max(i - 1, 0)],
                    chs[i],
                    cfg.layers_per_level,
                    g,
                    Downsample(chs[i]) if i < n - 1 else None,
                )
                for i in range(n)
            ]
        )
        self.mid = MidBlock(chs[-1], g)
        self.norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        # mean and log-variance
        self.conv_out = nn.Conv2d(chs[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)  # B, C0, H, W
        for level in self.levels:
            h = level(h)  # ... B, C_last, H/f, W/f
        return self.conv_out(F.silu(self.norm_out(self.mid(h))))  # B, 2*4, H/f, W/f


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        chs, g = cfg.channels[::-1], cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.latent_channels, chs[0], 3, padding=1)
        self.mid = MidBlock(chs[0], g)
        self.levels = nn.ModuleList(
            [
                Level(
                    chs[max(i - 1, 0)],
                    chs[i],
                    cfg.layers_per_level + 1,
                    g,
                    Upsample(chs[i]) if i < len(chs) - 1 else None,
                )
                for i in range(len(chs))
            ]
        )
        self.norm_out = nn.GroupNorm(g, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], cfg.in_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid(self.conv_in(z))  # B, C_last, h, w
        for level in self.levels:
            h = level(h)  # ... B, C0, H, W
        return self.conv_out(F.silu(self.norm_out(h)))  # B, 3, H, W


class DiagonalGaussian:
    """The encoder's posterior q(z|x) = N(mean, diag(exp(logvar)))."""

    def __init__(self, moments):
        self.mean, logvar = moments.chunk(2, dim=1)  # B, 4, h, w each
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)

    def sample(self, generator=None):
        noise = torch.randn(
            self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype
        )
        return self.mean + self.std * noise

    def mode(self):
        return self.mean

    def kl(self):
        """KL(q || N(0, I)) summed over latent dimensions: (B,)."""
        return 0.5 * (self.mean.pow(2) + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoencoderKL(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)

    @property
    def downsample(self):
        return 2 ** (len(self.cfg.channels) - 1)

    def encode(self, x):
        """x: (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over (B, 4, H/f, W/f)."""
        f = self.downsample
        if x.ndim != 4 or x.shape[1] != self.cfg.in_channels or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(
                f"VAE.encode expects (B, {self.cfg.in_channels}, H, W) with H, W multiples of {f}, "
                f"got {tuple(x.shape)}"
            )
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z):
        """z: (B, 4, h, w) unscaled latents -> (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x, noise=None, generator=None):
        """Reconstruction for VAE training: returns (reconstruction, posterior).
        `noise` (B, 4, h, w), if given, is the standard normal draw of the reparameterised sample
        z = mean + std * noise."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if noise is None else posterior.mean + posterior.std * noise
        return self.decode(z), posterior

    @torch.no_grad()
    def reconstruct(self, x, batch=256):
        """Images (N, 3, H, W) in [-1, 1] encoded and decoded (posterior means),
        clamped to [-1, 1]."""
        return torch.cat(
            [self.decode(self.encode(x[i : i + batch]).mean) for i in range(0, len(x), batch)]
        ).clamp(-1, 1)

    def encode_latents(self, x, generator=None, sample=True, tile=None):
        """Images -> scaled latents, the space diffusion runs in. With `tile` (latent pixels),
        encode tile by tile."""
        f = self.downsample
        if tile is None or (x.shape[2] <= tile * f and x.shape[3] <= tile * f):
            posterior = self.encode(x)
        else:  # the posterior's moments, cross-faded

            def moments(piece):
                q = self.encode(piece)
                return torch.cat([q.mean, q.logvar], dim=1)  # B, 8, th, tw

            posterior = DiagonalGaussian(
                self.tiled(
                    moments, x, tile * f, tile // 4 * f, 1 / f, 2 * self.cfg.latent_channels, unit=f
                )
            )
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.cfg.scaling_factor

    def decode_latents(self, z, tile=None, overlap=None):
        """Scaled latents -> images in [-1, 1] (unclamped). With `tile` (latent pixels),
        decode tile by tile."""
        z = z / self.cfg.scaling_factor
        if tile is None or (z.shape[2] <= tile and z.shape[3] <= tile):
            return self.decode(z)
        return self.decode_tiled(z, tile, overlap if overlap is not None else tile // 4)

    # ----------------------------------------------------------------------------------------------
    # Tiled encoding and decoding, for canvases larger than memory allows in one pass
    # (unbounded scenes). Overlapping tiles are coded separately and cross-faded with weights that
    # fall linearly to zero across the overlap, so every output value is a convex blend and no
    # hard tile edge appears.
    # Limitation: each tile normalises with its own GroupNorm statistics and its own mid-block
    # attention, so the result is close to, not equal to, a whole pass; larger tiles
    # (64 latents = 512 px) bring it closer.
    # ----------------------------------------------------------------------------------------------
    def decode_tiled(self, z, tile, overlap):
        """z: (B, 4, h, w) unscaled latents; tile and overlap in latent pixels,
        0 <= overlap < tile."""
        return self.tiled(self.decode, z, tile, overlap, self.downsample, self.cfg.in_channels)

    @staticmethod
    def tiled(fn, x, tile, overlap, scale, out_channels, unit=1):
        """fn applied to overlapping tiles of x (B, C, h, w) (tile, overlap in x's pixels; tiles
        start at multiples of `unit`), each result (scale times the tile's size, out_channels)
        cross-faded into one (B, out_channels, h * scale, w * scale)."""
        if not 0 <= overlap < tile:
            raise ValueError(f"tiled VAE pass: need 0 <= overlap ({overlap}) < tile ({tile})")
        B, _, h, w = x.shape
        out = torch.zeros(
            B, out_channels, round(h * scale), round(w * scale), device=x.device, dtype=x.dtype
        )
        weight = torch.zeros(1, 1, *out.shape[2:], device=x.device, dtype=x.dtype)
        for y0 in tile_starts(h // unit, tile // unit, overlap // unit, unit):
            for x0 in tile_starts(w // unit, tile // unit, overlap // unit, unit):
                piece = fn(x[:, :, y0 : y0 + tile, x0 : x0 + tile])  # B, out, th*scale, tw*scale
                ramp_y = blend_ramp(
                    piece.shape[2], round(overlap * scale), y0 > 0, y0 + tile < h, x
                )
                ramp_x = blend_ramp(
                    piece.shape[3], round(overlap * scale), x0 > 0, x0 + tile < w, x
                )
                wgt = ramp_y[:, None] * ramp_x[None, :]  # th*scale, tw*scale
                oy, ox = round(y0 * scale), round(x0 * scale)
                ys, xs = slice(oy, oy + piece.shape[2]), slice(ox, ox + piece.shape[3])
                out[:, :, ys, xs] += piece * wgt
                weight[:, :, ys, xs] += wgt
        return out / weight


def tile_starts(size, tile, overlap, unit=1):
    """Start offsets of the fewest tiles of length `tile` that cover `size` with at least `overlap`
    shared, spread evenly so the first starts at 0 and the last ends flush with `size`; all three in
    units of `unit` pixels, the offsets returned in pixels."""
    if size <= tile:
        return [0]
    n = 1 + math.ceil((size - tile) / (tile - overlap))
    return [unit * round(i * (size - tile) / (n - 1)) for i in range(n)]


def blend_ramp(n, overlap, fade_in, fade_out, like):
    """Per-pixel blend weight along one axis: rises over the first `overlap` pixels
    (if a tile precedes) and falls over the last `overlap` pixels (if a tile follows);
    1 elsewhere. Never exactly 0."""
    wgt = torch.ones(n, device=like.device, dtype=like.dtype)
    if overlap > 0:
        ramp = (torch.arange(overlap, device=like.device, dtype=like.dtype) + 0.5) / overlap
        if fade_in:
            wgt[:overlap] = torch.minimum(wgt[:overlap], ramp)
        if fade_out:
            wgt[-overlap:] = torch.minimum(wgt[-overlap:], ramp.flip(0))
    return wgt
