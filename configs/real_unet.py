"""The U-Net + text stage of `demo.py --data` (docs/real.md), on the VAE's latent shards (16x16x4
at 64 px). demo.py gives --init_from (the run's VAE), --data_path (the latents), --out_dir and
--max_minutes (what the budget leaves once the evaluation is reserved) or --max_steps."""

from configs.real_vae import *  # noqa: F401,F403  (model, image_size, workers, warmup, lr decay, clipping)

train = "unet+text_encoder"
objective = "t2i"
channels_last = False
max_steps = 20000  # a cap: under the budget the measured pace sets the length
batch_size = 32
lr = 1e-3
ema_decay = 0.995
ckpt_every = 1000
timestep_power = 1.0
min_snr_gamma = 5.0  # Hang et al. 2023
