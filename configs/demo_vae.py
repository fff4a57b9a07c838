"""The demo's VAE stage: the KL-VAE on the rendered procedural scenes, 32 px. `python demo.py
--train-vae --vae_steps=3600` makes the shipped configs/pretrained/demo_vae.safetensors with it;
`--from-scratch` runs it inside the demo's budget (at most its 1200 steps)."""

from configs.demo import model  # noqa: F401  (the demo's model)

train = "vae"
objective = "vae"
data = "shards"  # demo.py gives --data_path (its rendered scenes) and --out_dir
image_size = 32
synthetic_levels = (10.0, 18.0)
synthetic_integer_levels = True
num_workers = 1
log_every = 10
keep_last = 1
warmup_steps = 50
lr_decay = "cosine"
grad_clip = 1.0
max_steps = 1200  # 600 steps: 71% of classes readable through it, 1200: 91%
batch_size = 32
lr = 2e-3
ema_decay = 0.99
ckpt_every = 600
channels_last = True  # 0.20 s a step on 2 CPU cores instead of 0.25 s
