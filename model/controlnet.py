"""ControlNet (Zhang, Rao & Agrawala 2023, "Adding Conditional Control to Text-to-Image Diffusion
Models"): a trainable copy of the U-Net's encoder that also reads a control image (PAN, NIR, SAR,
low-res, hazy) and adds its features to the frozen U-Net's skip features through 1x1 convolutions
initialised at zero, so that at initialisation the model is exactly the base model.

    # encoder weights copied, zero convolutions at 0
    controlnet = ControlNet.from_unet(model.unet)
    # control (B, 3, H, W) in [-1, 1], the image's size
    down, mid = controlnet(x_t, t, cond, control)
    # the U-Net's down_residuals / mid_residual inputs
    out = model.unet(x_t, t, cond, down, mid)
    # the U-Net's call, for samplers and guidance
    net = Controlled(model.unet, [(controlnet, control, 1.0)])

The ControlNet reads the same conditions as the U-Net (text context and every scalar condition:
Text2Earth's level) and the control image in [-1, 1] like every image here; it maps it to [0, 1]
before its embedding, the range diffusers' ControlNet pipelines feed, so weights trained with
diffusers load unchanged (load_controlnet). Under classifier-free guidance every branch, the null
one included, sees the control image (diffusers' default). Shapes: B batch, C channels, h, w latent
size, H, W image size (h * f, f the VAE's downsampling).
"""

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch.nn as nn
import torch.nn.functional as F

from model.config import UNetConfig
from model.release import (
    UNET_KEYS,
    WeightsError,
    read_tensors,
    rename_keys,
    unet_config_from_diffusers,
)
from model.unet import Encoder
from model.weights import read_metadata, write_tensors

FORMAT = "text2earth-controlnet"
CONTROLNET_KEYS = [
    (r"^controlnet_cond_embedding\.", "control_embed."),
    (r"^controlnet_down_blocks\.", "zero_convs."),
    (r"^controlnet_mid_block\.", "zero_mid."),
] + UNET_KEYS
# what must match the U-Net's
ARCHITECTURE = (
    "in_channels",
    "channels",
    "layers_per_level",
    "attention",
    "heads",
    "context_dim",
    "norm_groups",
    "norm_eps",
    "time_dim",
    "scalar_conditions",
    "place_conditions",
    "scale_shift_norm",
)


@dataclass
class ControlNetConfig:
    conditioning_channels: int = 3  # channels of the control image (grey bands repeated on 3)
    # the control image's encoder: len - 1 stride-2 convolutions,
    # as many as the VAE's downsamplings (SD's 8x: 4 entries)
    embedding_channels: tuple = (16, 32, 96, 256)


class ControlEmbedding(nn.Module):
    """Control image (B, C, H, W) -> (B, C0, H / 2 ** (n - 1), W / 2 ** (n - 1)): 3x3 convolutions
    with SiLU, a stride-2 one per step of `channels`, then a zero-initialised 3x3 convolution to the
    U-Net's first width C0."""

    def __init__(self, in_ch, channels, out_ch):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, channels[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for a, b in zip(channels[:-1], channels[1:]):
            self.blocks.append(nn.Conv2d(a, a, 3, padding=1))
            self.blocks.append(nn.Conv2d(a, b, 3, padding=1, stride=2))
        self.conv_out = zero(nn.Conv2d(channels[-1], out_ch, 3, padding=1))

    def forward(self, x):
        h = F.silu(self.conv_in(x))
        for conv in self.blocks:
            h = F.silu(conv(h))
        return self.conv_out(h)


def zero(module):
    """The module with every parameter set to 0 (ControlNet's zero convolutions)."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlNet(Encoder):
    """The U-Net encoder's modules (same names: time_embed, cond_embed, conv_in, down, mid) plus
    control_embed and the zero convolutions zero_convs (one per skip feature) and zero_mid."""

    def __init__(self, unet_cfg: UNetConfig, cfg: ControlNetConfig = None):
        super().__init__()
        cfg = cfg or ControlNetConfig()
        if cfg.conditioning_channels < 1 or not cfg.embedding_channels:
            raise ValueError(
                f"ControlNetConfig {cfg}: conditioning_channels >= 1 and embedding_channels "
                "non-empty"
            )
        _, skips = self._build_encoder(unet_cfg)
        self.control_cfg = cfg
        # control image pixels per latent pixel
        self.factor = 2 ** (len(cfg.embedding_channels) - 1)
        self.control_embed = ControlEmbedding(
            cfg.conditioning_channels, cfg.embedding_channels, unet_cfg.channels[0]
        )
        self.zero_convs = nn.ModuleList([zero(nn.Conv2d(c, c, 1)) for c in skips])
        self.zero_mid = zero(nn.Conv2d(unet_cfg.channels[-1], unet_cfg.channels[-1], 1))

    @classmethod
    def from_unet(cls, unet, cfg: ControlNetConfig = None, downsample=None):
        """A ControlNet whose encoder starts as a copy of `unet`'s (the paper's initialisation), on
        its device; `downsample`, the VAE's factor, is checked against the control embedding's."""
        # the config shared: run-time settings too
        net = cls(unet.cfg, cfg).to(next(unet.parameters()).device)
        if downsample is not None and net.factor != downsample:
            n = int(math.log2(downsample)) + 1
            raise ValueError(
                f"--controlnet.embedding_channels={net.control_cfg.embedding_channels} "
                f"down-samples the control image {net.factor}x, the VAE {downsample}x: give {n} "
                f"entries, e.g. {(16, 32, 96, 256, 512)[:n]}"
            )
        mine = net.state_dict()
        net.load_state_dict({k: v for k, v in unet.state_dict().items() if k in mine}, strict=False)
        return net

    def check_control(self, control, x):
        """Refuse a control image that does not fit this ControlNet and x_t (B, C, h, w),
        naming the problem."""
        want = (
            self.control_cfg.conditioning_channels,
            x.shape[2] * self.factor,
            x.shape[3] * self.factor,
        )
        if (
            control.ndim != 4
            or tuple(control.shape[1:]) != want
            or control.shape[0] not in (1, x.shape[0])
        ):
            raise ValueError(
                f"control image of shape {tuple(control.shape)}: this ControlNet reads (B, "
                f"{want[0]}, {want[1]}, {want[2]}) for latents of {x.shape[2]}x{x.shape[3]} "
                f"({want[0]} channels, {self.factor}x the latent size: the size of the image "
                "generated)"
            )

    def forward(self, x, t, cond, control, scale=1.0):
        """x (B, in_channels, h, w), t, cond as the U-Net's; control (B or 1, C, H, W)
        in [-1, 1]. Returns (down residuals [one per skip feature], mid residual), each
        multiplied by `scale`."""
        self.check_control(control, x)
        control = control.to(x.dtype).expand(x.shape[0], *control.shape[1:])
        hint = self.control_embed((control + 1) / 2)  # B, C0, h, w; [0, 1] as diffusers
        h, feats, _ = self.encode(x, t, cond, hint=hint)
        down = [conv(f) * scale for conv, f in zip(self.zero_convs, feats)]
        return down, self.zero_mid(h) * scale


class Controlled(nn.Module):
    """The U-Net with ControlNets [(controlnet, control image (1 or B, C, H, W), scale)], called
    like the U-Net: their residuals summed (several ControlNets at once), the control images
    repeated for the batches guidance stacks. What model/pipeline.generate takes as `unet`."""

    def __init__(self, unet, controls):
        super().__init__()
        self.unet, self.cfg = unet, unet.cfg
        self.nets = nn.ModuleList([net for net, _, _ in controls])
        self.images = [image for _, image, _ in controls]
        self.scales = [float(s) for _, _, s in controls]

    def forward(self, x, t, cond):
        down = mid = None
        for net, image, scale in zip(self.nets, self.images, self.scales):
            image = image.to(x.device)
            d, m = net(x, t, cond, image.repeat(x.shape[0] // image.shape[0], 1, 1, 1), scale)
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        return self.unet(x, t, cond, down, mid)


# ----------------------------------------------------------------------------------------------
# Files: ours (the ControlNet alone, with its configs) and diffusers' ControlNetModel
# ----------------------------------------------------------------------------------------------


def save_controlnet(net, path, info=None):
    """The ControlNet alone, with the U-Net config it belongs to, its own config and `info`
    (task, step, ...)."""
    meta = {
        "format": FORMAT,
        "unet": json.dumps(asdict(net.cfg)),
        "controlnet": json.dumps(asdict(net.control_cfg)),
        "info": json.dumps(info or {}),
    }
    write_tensors(path, net.state_dict(), meta)


def _diffusers_configs(cfg, file):
    """A diffusers ControlNetModel config.json -> (UNetConfig, ControlNetConfig)."""
    for key, allowed in (
        ("controlnet_conditioning_channel_order", "rgb"),
        ("global_pool_conditions", False),
    ):
        if cfg.get(key, allowed) != allowed:
            raise WeightsError(
                f"{file}: '{key}' = {cfg[key]!r} is not supported (supported: {allowed!r})"
            )
    mirrored = [
        "CrossAttnUpBlock2D" if t == "CrossAttnDownBlock2D" else "UpBlock2D"
        for t in reversed(cfg.get("down_block_types", []))
    ]
    unet_cfg = unet_config_from_diffusers(
        {**cfg, "up_block_types": mirrored, "out_channels": cfg["in_channels"]}, file
    )
    return unet_cfg, ControlNetConfig(
        cfg.get("conditioning_channels", 3),
        tuple(cfg.get("conditioning_embedding_out_channels") or (16, 32, 96, 256)),
    )


def _read(path, unet_cfg):
    """(state in our names, our name -> name in the file, UNetConfig, ControlNetConfig, info) of a
    ControlNet file or diffusers folder."""
    path = Path(path)
    if path.is_dir():
        files = [
            f
            for f in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
            if (path / f).is_file()
        ]
        if not (path / "config.json").is_file() or not files:
            raise WeightsError(
                f"{path}: not a diffusers ControlNet folder (config.json and "
                "diffusion_pytorch_model.safetensors expected)"
            )
        try:
            config = json.loads((path / "config.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(f"{path / 'config.json'}: not JSON ({e})") from None
        ucfg, ccfg = _diffusers_configs(config, path / "config.json")
        state, original = rename_keys(read_tensors(path / files[0]), CONTROLNET_KEYS)
        return state, original, ucfg, ccfg, {}
    state = read_tensors(path)
    meta = read_metadata(path) if path.suffix == ".safetensors" else {}
    if meta.get("format") == FORMAT:
        ucfg = UNetConfig(
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in json.loads(meta["unet"]).items()
            }
        )
        c = json.loads(meta["controlnet"])
        return (
            dict(state),
            {},
            ucfg,
            ControlNetConfig(c["conditioning_channels"], tuple(c["embedding_channels"])),
            json.loads(meta.get("info", "{}")),
        )
    if not any(k.startswith("controlnet_cond_embedding.") for k in state):
        raise WeightsError(
            f"{path}: neither a ControlNet of ours (format '{FORMAT}') nor a diffusers "
            "ControlNetModel (no 'controlnet_cond_embedding.' keys)"
        )
    # a lone diffusers file: sizes from its tensors
    state, original = rename_keys(state, CONTROLNET_KEYS)
    convs = sorted(
        (int(k.split(".")[2]), v)
        for k, v in state.items()
        if k.startswith("control_embed.blocks.") and k.endswith(".weight")
    )
    ch = (state["control_embed.conv_in.weight"].shape[0],) + tuple(
        v.shape[0] for i, v in convs if i % 2
    )
    return (
        state,
        original,
        unet_cfg,
        ControlNetConfig(state["control_embed.conv_in.weight"].shape[1], ch),
        {},
    )


def load_controlnet(path, unet, device=None, dtype=None):
    """(ControlNet, info) from our file, a diffusers ControlNetModel folder or its lone safetensors
    file, for the U-Net `unet` (on its device and dtype unless given). WeightsError listing the
    mismatches when it was made for another architecture."""
    state, original, ucfg, ccfg, info = _read(path, unet.cfg)
    differ = [
        f"{f.name}: {getattr(ucfg, f.name)!r} here, {getattr(unet.cfg, f.name)!r} in the U-Net"
        for f in fields(UNetConfig)
        if f.name in ARCHITECTURE
        and tuple_or(getattr(ucfg, f.name)) != tuple_or(getattr(unet.cfg, f.name))
    ]
    if differ:
        raise WeightsError(f"{path}: a ControlNet for another U-Net: " + "; ".join(differ))
    net = ControlNet(
        UNetConfig(**{**asdict(ucfg), "gradient_checkpointing": unet.cfg.gradient_checkpointing}),
        ccfg,
    )
    expected = net.state_dict()
    wrong = [
        f"'{original.get(k, k)}' {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in state.items()
        if k in expected and v.shape != expected[k].shape
    ]
    missing = [k for k in expected if k not in state]
    unexpected = [original.get(k, k) for k in state if k not in expected]
    if wrong or missing or unexpected:
        parts = [
            f"{name} ({len(keys)}): {', '.join(keys[:6])}{' ...' if len(keys) > 6 else ''}"
            for name, keys in (
                ("shapes differ", wrong),
                ("missing", missing),
                ("unexpected", unexpected),
            )
            if keys
        ]
        raise WeightsError(f"{path}: keys do not fit this ControlNet: " + "; ".join(parts))
    net.load_state_dict(state)
    p = next(unet.parameters())
    return net.to(device or p.device, dtype or p.dtype).eval().requires_grad_(False), info


def tuple_or(v):
    return tuple(v) if isinstance(v, (list, tuple)) else v
