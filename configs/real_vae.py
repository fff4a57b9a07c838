"""The VAE stage of `demo.py --data` (docs/real.md): the KL-VAE of configs/real.py on the training
split's images at 64 px, each caption's copy of an image under its own flip or rotation. demo.py
gives --data_path (those image shards), --out_dir and --max_minutes (its share of the budget)."""

from configs.real import model  # noqa: F401  (the recipe's model)

train = "vae"
objective = "vae"
data = "shards"
image_size = 64
num_workers = 1
log_every = 20
keep_last = 1
warmup_steps = 50
lr_decay = "cosine"
grad_clip = 1.0
max_steps = 4000  # a cap: under the budget the measured pace sets the length
batch_size = 16
lr = 2e-3
ema_decay = 0.99
ckpt_every = 500  # and on SIGTERM: an interrupted run resumes
channels_last = True
