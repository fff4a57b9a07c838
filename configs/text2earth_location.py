"""Text2Earth plus location: fine-tune the release (or stage 2's export) on Git-10M with the
latitude and longitude of each image's centre (its Google_location tile) as a third condition,
leaving whole regions out for a spatial evaluation (data/places.py).

The location embedder starts with its last layer at zero, so at step 0 the model is exactly the
release; the null location ("no place") is NaN, so images without a Google_location train it, and
DCA drops the place on its own (p 0.1), as it does the text and the level.

    torchrun --nproc_per_node=8 train.py --config configs/text2earth_location.py \\
        --data_path=/path/to/Git-10M --init_from=/path/to/Text2Earth
    python sample.py --weights out/text2earth_location/model.safetensors --prompt "a harbour" \\
        --level 17 --lat 31.2 --lon 121.5 --location-cfg 4
    python evaluate.py --weights out/text2earth_location/model.safetensors --places held_out ...
"""

from model.config import ModelConfig, UNetConfig, default_conditions, location_condition

model = ModelConfig(
    unet=UNetConfig(place_conditions=("location",)),
    conditions={**default_conditions(), "location": location_condition()},
)

out_dir = "out/text2earth_location"
init_from = ""  # the release folder (Text2Earth) or our export: --init_from=...
train = "unet"
data = "git10m"
places = "train"  # the held-out regions stay out, for evaluate.py --places held_out
min_quality = 4.8
image_size = 256
batch_size = 32
grad_accum = 4
lr = 5e-5
warmup_steps = 500
max_steps = 20_000
ema_decay = 0.9999
num_workers = 8
ckpt_every = 2000
sample_every = 2000
