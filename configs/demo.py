"""The embedded default's model (demo.py): a tiny Text2Earth for 32 px procedural scenes, trained in
minutes on a CPU. The two training stages are plain train.py configs that take it from here,
configs/demo_vae.py and configs/demo_unet.py; the demo's own settings are demo.py's DemoConfig. Why
the recipe is what it is, with the figures measured for each choice: docs/demo.md.
"""

from model.config import (
    DiffusionConfig,
    ModelConfig,
    TextConfig,
    UNetConfig,
    VAEConfig,
    default_conditions,
    location_condition,
)

model = ModelConfig(
    # attention at the 4x4 and 2x2 levels only, none on the 8x8 latent itself: a U-Net + text step
    # costs 0.16 s instead of 0.25 s on 2 cores, and a budget of its steps
    # learns as much (docs/demo.md)
    unet=UNetConfig(
        channels=(48, 96, 96),
        layers_per_level=1,
        attention=(False, True, True),
        heads=(2, 2, 2),
        context_dim=64,
        norm_groups=16,
        # where the scene is on the procedural globe: what grows, is built or is dry there
        place_conditions=("location",),
    ),
    # 32x32 images -> 8x8x4 latents
    vae=VAEConfig(channels=(16, 32, 64), layers_per_level=1, norm_groups=8),
    # the scenes' captions: at most 43 tokens
    text=TextConfig(width=64, heads=4, layers=2, context_length=48),
    # v: learns conditions sooner
    diffusion=DiffusionConfig(prediction="v", spacing="trailing", steps_offset=0),
    # text, level and location, each dropped with probability 0.1
    conditions={**default_conditions(), "location": location_condition()},
)
