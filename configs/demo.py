"""The embedded default's model (demo.py): a tiny Text2Earth for 32 px procedural scenes, trained in minutes on a
CPU. The two training stages are plain train.py configs that take it from here, configs/demo_vae.py and
configs/demo_unet.py; the demo's own settings are demo.py's DemoConfig. Why the recipe is what it is, with the
figures measured for each choice: docs/demo.md.
"""
from model.config import DiffusionConfig, ModelConfig, TextConfig, UNetConfig, VAEConfig

model = ModelConfig(
    unet=UNetConfig(channels=(48, 96, 96), layers_per_level=1, attention=(True, True, True), heads=(2, 2, 2),
                    context_dim=64, norm_groups=16),
    vae=VAEConfig(channels=(16, 32, 64), layers_per_level=1, norm_groups=8),    # 32x32 images -> 8x8x4 latents
    text=TextConfig(width=64, heads=4, layers=2),
    diffusion=DiffusionConfig(prediction="v", spacing="trailing", steps_offset=0),  # v: learns conditions sooner
)
