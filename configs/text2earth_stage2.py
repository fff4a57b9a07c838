"""Paper stage 2: continue from stage 1's exported (EMA) weights on the high-quality subset
(img_quality_score > 4.8).

    torchrun --nproc_per_node=8 train.py --config configs/text2earth_stage2.py \\
        --data_path=/path/to/Git-10M
"""

from model.config import ModelConfig

model = ModelConfig()

out_dir = "out/text2earth_stage2"
init_from = "out/text2earth_stage1/model.safetensors"  # stage 1's export
train = "unet"
data = "git10m"
min_quality = 4.8
image_size = 256
batch_size = 32
grad_accum = 4
lr = 1e-4
warmup_steps = 500
max_steps = 50_000
ema_decay = 0.9999
num_workers = 8
ckpt_every = 2000
sample_every = 2000
