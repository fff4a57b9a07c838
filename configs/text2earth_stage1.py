"""Paper stage 1: the released architecture trained on all of Git-10M, from Stable Diffusion 2-base.

Text2Earth stands on SD2-base's pretrained KL-VAE, OpenCLIP ViT-H-14 text tower and U-Net; the level
MLP is what it adds (it starts at zero, so step 0 predicts what SD2-base predicts). Give the
starting point and the data:
    torchrun --nproc_per_node=8 train.py --config configs/text2earth_stage1.py \\
        --init_from=/path/to/stable-diffusion-2-base --data_path=/path/to/Git-10M
(or --init_from=/path/to/Text2Earth to continue from the release). 8 x A100 in the paper: global
batch 1024 = 32 per GPU x 4 accumulation x 8 GPUs here; AdamW, lr 1e-4, bf16, 256 px. DCA drops the
text and the level with probability 0.1 each (model.conditions; the paper
does not publish its values).
"""

from model.config import ModelConfig

model = ModelConfig()

out_dir = "out/text2earth_stage1"
train = "unet"  # the VAE and the text encoder stay frozen, as in Text2Earth
data = "git10m"  # --data_path=/path/to/Git-10M (the save_to_disk folder)
image_size = 256
batch_size = 32
grad_accum = 4
lr = 1e-4
warmup_steps = 1000
max_steps = 200_000
ema_decay = 0.9999
num_workers = 8
ckpt_every = 2000
sample_every = 2000
