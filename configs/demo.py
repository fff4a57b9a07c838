"""The embedded default: a tiny Text2Earth trained on the procedural Earth (data/synthetic.py) in minutes on a CPU.

demo.py renders `pool` training scenes once, trains the VAE on them (stage `vae_stage`), encodes them, then trains
the U-Net and the small text tower on the latents (`unet_stage`), each with train.py's own training loop; `common`
applies to both. Plain values only; see train.TrainConfig for the keys.

What the 10-minute budget forced (measured on 2 CPU cores; docs/demo.md has the figures):
- 32 px images (8x8x4 latents). The probe reads class and level off 32 px nearly as well as off 64 px (on real
  renders 93% / 71% within one level, against 96% / 76%), and a U-Net step costs 0.27 s instead of 0.68 s, so
  the U-Net gets 900-1000 steps instead of 400 (at 1000, class accuracy went from 62% to 69%).
- Every scene is rendered once and VAE-encoded once: rendering (and encoding) every batch anew costs half as
  much again as the training step itself on two cores. 8000 scenes: the VAE sees each ~4.8 times, the U-Net ~2.6.
- The VAE limits what any sample can show: the probe reads the class on 63% of real images passed through it
  after 320 steps, 71% after 600, 91% after 1200 (held-out L1 0.082 -> 0.070 -> 0.056). It is narrow (16/32/64
  channels). With 1200 VAE steps and 600 U-Net steps the samples show the asked class 72-73% of the time, where
  600 and 1000 gave 58-61%; the level within one 46-47% against 51-54%. But the VAE's seed moves the samples'
  class by 20-30 points (seeds 1 and 2: 60% and 47%), more than anything else tried; a VAE made to reconstruct
  far better (zero_init with beta2 0.99) gave samples no better (docs/demo.md, sessions 8 and 9).
- The U-Net trains for what the time budget (`minutes`) leaves: ~600 steps on the AVX2 host of sessions 1-9,
  1000-1250 on session 10's Zen 4, 2000-2500 on session 11's Zen 5, where three seeds read 89% / 76% / 75%
  class and 77% / 67% / 71% of the levels within one (324 samples, session 11's probe; on the Zen 4 81/67/72%
  and 56-59%; with 600 steps 73/60/47% and 46-49%). The samples then sit 3-10 points below what the probe reads
  through their VAE for the class, 10-12 for the level. zero_init + beta2 0.99 for the VAE (session 9's best
  reconstruction) did not raise them over three seeds (docs/demo.md, session 11).
- v-prediction: with the release's eps-prediction, 300 U-Net steps learnt no conditioning at all (class
  accuracy at the floor); with v, the same 300 steps reached 35%. Timesteps are uniform (the release's): at
  300 steps a density rising in t (timestep_power=2) learnt the class a little faster; at 1000 steps it no
  longer pays (324 samples: within one level 46% against 44%, class 67% against 69%: within noise).
- Min-SNR-5 loss weighting (Hang et al. 2023): on 324 samples, within one level 52-54% against 50%, class
  the same or better (docs/demo.md, section 5).
- The probe trains 4000 steps on 6480 renders (session 11; 1.4 min on one core beside the U-Net): on held-out real
  renders it reads the level within one 95.4% (89.6% with the 2000 steps on 3240 renders of sessions 4-10; 94.8%
  with 4000 steps on 3240), exactly 71.9% (60.6%), through the VAE 89.3% (84.1%); on the same samples it reads
  about what the smaller probe read (within one 77.2% against 76.2%): the samples' level errors are theirs.
- What pays for the 1200-step VAE: the training scenes render in one process per core, the probe trains in a
  process of its own beside the U-Net (whose second thread gains it only ~1.2x), fewer checkpoints; on the AVX2
  host the U-Net then had 600 steps (650 took 9.0-9.8 min, 700 9.6-10.0 min).
- What paid for 1000 U-Net steps and the 2000-step probe (session 5): AdamW's fused kernel on the CPU too (train.py; the
  U-Net + text tower step 0.24-0.28 s instead of 0.34 s in isolation), the VAE in channels-last layout (0.20 s
  a step instead of 0.25 s) and U-Net checkpoints every 200 steps instead of 100 (119 MB each). 900 -> 1000
  U-Net steps with the 2000-step probe: within one level 45% -> 51-54% (two runs; docs/demo.md).
"""
from model.config import DiffusionConfig, ModelConfig, TextConfig, UNetConfig, VAEConfig

model = ModelConfig(
    unet=UNetConfig(channels=(48, 96, 96), layers_per_level=1, attention=(True, True, True), heads=(2, 2, 2),
                    context_dim=64, norm_groups=16),
    vae=VAEConfig(channels=(16, 32, 64), layers_per_level=1, norm_groups=8),    # 32x32 images -> 8x8x4 latents
    text=TextConfig(width=64, heads=4, layers=2),
    diffusion=DiffusionConfig(prediction="v", spacing="trailing", steps_offset=0),
)

# the scenes: procedural, 32 px, integer levels 10..18 (demo.py renders them into shards: data="shards" there)
common = dict(image_size=32, synthetic_levels=(10.0, 18.0), synthetic_integer_levels=True, num_workers=1, log_every=10,
              keep_last=1, warmup_steps=50, lr_decay="cosine", grad_clip=1.0)
vae_stage = dict(train="vae", max_steps=1200, batch_size=32, lr=2e-3, ema_decay=0.99, ckpt_every=600,
                 channels_last=True)
unet_stage = dict(train="unet", max_steps=3000, batch_size=32, lr=1e-3, ema_decay=0.995, ckpt_every=300,
                  train_text_encoder=True, p_text=0.1, p_res=0.1, timestep_power=1.0, min_snr_gamma=5.0)

# The time budget of the whole run (demo.py --minutes): the U-Net trains for what rendering, the VAE and encoding
# leave of it (minus demo.SAMPLING_SECONDS), as many steps as its measured pace allows, at most unet_stage's
# max_steps. --fast and --unet-steps N train a fixed number of steps instead.
minutes = 9.5

# The training scenes: rendered once into image shards for the VAE, then encoded once into latent shards for the
# U-Net (demo.render_pool, demo.encode_pool).
pool = 8000

# The measurement: samples per (class, level) prompt, 108 prompts each. Three make 324 samples: the standard error
# of an accuracy near 80% is then ~2.2 points (~4 with one), at ~20 s more sampling on 2 cores.
eval_seeds = 3

# The CI version (demo.py --fast): same pipeline, fewer steps; still long enough to learn text conditioning and
# some level control. VAE and U-Net 600 steps each (3.2 min on session 11's Zen 5): with 300 / 350 the level
# trend depended on the host, correlation 0.29-0.34 on the AVX2 host but 0.10 (floor -0.01) on the Zen 5, at
# tests/test_demo.py's threshold; with 600 / 600 there 0.35 (floor -0.04).
fast = dict(vae_steps=600, unet_steps=600, pool=4000, probe_train_images=2160, probe_steps=1000, eval_seeds=3)

# The conditioning probe (model/probe.py): procedural training images and optimisation steps. Half of its
# training images go through the demo's VAE first, so that it judges content, not the VAE's softness.
probe_train_images = 6480
probe_steps = 4000
