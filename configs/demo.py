"""The embedded default: a tiny Text2Earth trained on the procedural Earth (data/synthetic.py) in minutes on a CPU.

demo.py trains the VAE (stage `vae_stage`), then the U-Net and the small text tower (`unet_stage`), each with
train.py's own training loop; `common` applies to both. Plain values only; see train.TrainConfig for the keys.
"""
from model.config import DiffusionConfig, ModelConfig, TextConfig, UNetConfig, VAEConfig

model = ModelConfig(
    unet=UNetConfig(channels=(48, 96, 96), layers_per_level=1, attention=(True, True, True), heads=(2, 2, 2),
                    context_dim=64, norm_groups=16),
    vae=VAEConfig(channels=(32, 64, 64), layers_per_level=1, norm_groups=16),    # 64x64 images -> 16x16x4 latents
    text=TextConfig(width=64, heads=4, layers=2),
    diffusion=DiffusionConfig(spacing="trailing", steps_offset=0),
)

common = dict(data="synthetic", image_size=64, synthetic_samples=200_000, synthetic_levels=(10.0, 18.0),
              synthetic_integer_levels=True, num_workers=1, log_every=10, keep_last=1, warmup_steps=50,
              lr_decay="cosine", grad_clip=1.0)
vae_stage = dict(train="vae", max_steps=120, batch_size=16, lr=2e-3, ema_decay=0.99, ckpt_every=100)
unet_stage = dict(train="unet", max_steps=300, batch_size=32, lr=1e-3, ema_decay=0.995, ckpt_every=100,
                  train_text_encoder=True, p_text=0.1, p_res=0.1)

# The CI version (demo.py --fast): same pipeline, a fraction of the steps.
fast = dict(vae_steps=20, unet_steps=30, probe_train_images=1080, probe_steps=150)

# The conditioning probe (model/probe.py): procedural training images and optimisation steps.
probe_train_images = 3240
probe_steps = 500
