"""Paper stage 1: the released architecture trained on all of Git-10M (SPEC section 5).

8 x A100 in the paper: global batch 1024 = 32 per GPU x 4 accumulation x 8 GPUs here; AdamW, lr 1e-4, bf16, 256 px.
"""
from model.config import ModelConfig

model = ModelConfig()

out_dir = "out/text2earth_stage1"
data = "git10m"                # --data_path=/path/to/Git-10M (the save_to_disk folder)
image_size = 256
batch_size = 32
grad_accum = 4
lr = 1e-4
warmup_steps = 1000
max_steps = 200_000
p_text = 0.1
p_res = 0.1
ema_decay = 0.9999
num_workers = 8
ckpt_every = 2000
sample_every = 2000
