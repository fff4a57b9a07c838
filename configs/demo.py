"""The embedded default: a tiny Text2Earth trained on the procedural Earth (data/synthetic.py) in minutes on a CPU.

demo.py trains the VAE (stage `vae_stage`), then the U-Net and the small text tower (`unet_stage`), each with
train.py's own training loop; `common` applies to both. Plain values only; see train.TrainConfig for the keys.

What the 10-minute budget forced (measured on 2 CPU cores; docs/demo.md has the figures):
- The VAE limits everything downstream: after 120 steps on 64 px images its reconstructions kept 32% of the
  probe's class accuracy, so nothing generated through it could score higher. It is narrow (16/32/64 channels,
  half the cost) and trains on 32 px renders (the same level, so the same metres per pixel: a crop of the
  64 px scene; a quarter of the cost per image), 320 steps at batch 32 instead of 120 at batch 16.
- v-prediction and timesteps drawn with density rising in t (timestep_power=2): with the release's
  eps-prediction and uniform t, 300 steps learnt no conditioning at all (class accuracy at the floor); with
  these two, the same 300 steps took class accuracy from the floor (6%) to what that VAE let through (~35%).
"""
from model.config import DiffusionConfig, ModelConfig, TextConfig, UNetConfig, VAEConfig

model = ModelConfig(
    unet=UNetConfig(channels=(48, 96, 96), layers_per_level=1, attention=(True, True, True), heads=(2, 2, 2),
                    context_dim=64, norm_groups=16),
    vae=VAEConfig(channels=(16, 32, 64), layers_per_level=1, norm_groups=8),    # 64x64 images -> 16x16x4 latents
    text=TextConfig(width=64, heads=4, layers=2),
    diffusion=DiffusionConfig(prediction="v", spacing="trailing", steps_offset=0),
)

common = dict(data="synthetic", image_size=32, synthetic_samples=200_000, synthetic_levels=(10.0, 18.0),
              synthetic_integer_levels=True, num_workers=1, log_every=10, keep_last=1, warmup_steps=50,
              lr_decay="cosine", grad_clip=1.0)
vae_stage = dict(train="vae", max_steps=320, batch_size=32, lr=2e-3, ema_decay=0.99, ckpt_every=160)
unet_stage = dict(train="unet", max_steps=1000, batch_size=32, lr=1e-3, ema_decay=0.995, ckpt_every=100,
                  train_text_encoder=True, p_text=0.1, p_res=0.1, timestep_power=2.0)

# The U-Net's training set: this many scenes rendered and VAE-encoded once into latent shards (demo.encode_pool).
latent_pool = 8000

# The CI version (demo.py --fast): same pipeline, fewer steps; still long enough to learn text conditioning.
fast = dict(vae_steps=200, unet_steps=350, latent_pool=4000, probe_train_images=1080, probe_steps=300)

# The conditioning probe (model/probe.py): procedural training images and optimisation steps. Half of its
# training images go through the demo's VAE first, so that it judges content, not the VAE's softness.
probe_train_images = 3240
probe_steps = 800
