"""Text2Earth-inpainting (lcybuaa/Text2Earth-inpainting): the same model with 9 U-Net input channels
[x_t (4), mask (1), masked-image latent (4)], trained from the text-to-image model on Git-10M with
the masks of model/masks.py (whole image, boxes, brush strokes, clouds, one side for outpainting).

    torchrun --nproc_per_node=8 train.py --config configs/text2earth_inpaint.py \\
        --init_from=/path/to/Text2Earth --data_path=/path/to/Git-10M

--init_from takes the released text-to-image folder (lcybuaa/Text2Earth) or our stage 2 export
(the default below). The 5 added conv_in channels start at zero, so step 0 predicts what the
text-to-image model predicts. `model` is also the released inpainting model's architecture.
"""

from model.config import ModelConfig, UNetConfig

model = ModelConfig(unet=UNetConfig(in_channels=9))

out_dir = "out/text2earth_inpaint"
init_from = "out/text2earth_stage2/model.safetensors"  # stage 2's export, or the release folder
objective = "inpaint"  # random masks, the masked image's latent beside x_t
train = "unet"  # the VAE and the text encoder stay frozen, as in Text2Earth
data = "git10m"  # --data_path=/path/to/Git-10M (the save_to_disk folder)
image_size = 256
batch_size = 32
grad_accum = 4  # global batch 1024 on 8 GPUs, the paper's
# Text2Earth's own lr, not a small fine-tuning one: SD's inpainting models kept their pretraining lr
# (7.5e-5 to 1e-4 at batch 2048) for 200k+ steps, as the zero-initialised mask and masked-image
# channels learn from nothing.
lr = 1e-4
warmup_steps = 2500
max_steps = 100_000
ema_decay = 0.9999
num_workers = 8
ckpt_every = 2000
