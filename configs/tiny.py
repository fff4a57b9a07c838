"""A tiny model with the released layout, for CPU tests and quick experiments (forward
pass in milliseconds)."""

from model.config import ModelConfig, TextConfig, UNetConfig, VAEConfig

model = ModelConfig(
    unet=UNetConfig(
        channels=(32, 64, 64),
        attention=(True, True, False),
        heads=(2, 4, 4),
        context_dim=64,
        norm_groups=8,
    ),
    vae=VAEConfig(channels=(32, 64), layers_per_level=1, norm_groups=8),
    text=TextConfig(width=64, heads=4, layers=2),
)
