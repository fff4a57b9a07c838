"""The demo's second stage (demo.py runs it): U-Net + the small text tower
on the VAE's latent shards.

The same model, scenes and schedule shape as the VAE stage (configs/demo_vae.py), then what differs.
demo.py gives --init_from (the VAE: the shipped configs/pretrained/demo_vae.safetensors, or a
from-scratch run's own), --data_path (the latent shards), --out_dir, and --max_minutes (what the
demo's time budget leaves) or --max_steps.
"""

from configs.demo_vae import *  # noqa: F401,F403  (model, image_size, levels, workers, warmup, lr decay, clipping)

train = "unet+text_encoder"
objective = "t2i"
channels_last = False  # no gain for the 8x8 U-Net
max_steps = 6000  # a cap: under the demo's budget the measured pace sets the length
batch_size = 32
lr = 1e-3
ema_decay = 0.995
ckpt_every = 1000  # and on SIGTERM: an interrupted run resumes from where it stopped
timestep_power = 1.0
min_snr_gamma = 5.0  # Hang et al. 2023
# the scenes at places of the procedural globe outside the held-out regions (data/places.py), their
# class drawn from the place's; one caption in five does not name the class, so the place must tell
synthetic_located = True
places = "train"
synthetic_omit_class = 0.2
