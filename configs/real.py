"""The model of `demo.py --data` (docs/real.md): a small Text2Earth for a captioned remote-sensing
set at 64 px, trained from scratch on a CPU in half an hour (128 px on a GPU: `demo.py --data=...
--image_size=128`). The stages are plain train.py configs that take it from here,
configs/real_vae.py and configs/real_unet.py.
"""

from model.config import (
    DiffusionConfig,
    ModelConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
    default_conditions,
)

model = ModelConfig(
    # 64x64 images -> 16x16x8 latents; attention at the 8x8 and 4x4 levels of the U-Net
    unet=UNetConfig(
        in_channels=8,
        out_channels=8,
        channels=(64, 128, 128),
        layers_per_level=1,
        attention=(False, True, True),
        heads=(2, 4, 4),
        context_dim=64,
        norm_groups=16,
    ),
    vae=VAEConfig(channels=(16, 32, 64), layers_per_level=1, norm_groups=8, latent_channels=8),
    # remote-sensing captions: RSICD's longest run to ~60 tokens
    text=TextConfig(width=64, heads=4, layers=2, context_length=64),
    diffusion=DiffusionConfig(prediction="v", spacing="trailing", steps_offset=0),
    # text and level, each dropped with probability 0.1
    conditions=default_conditions(),
)
