"""Text2Earth-inpainting (lcybuaa/Text2Earth-inpainting): the same model with 9 U-Net input channels
[x_t (4), mask (1), masked-image latent (4)]. Loads and samples; training it needs the inpainting objective."""
from model.config import ModelConfig, UNetConfig

model = ModelConfig(unet=UNetConfig(in_channels=9))

objective = "inpaint"          # train.py: random masks, the masked image's latent beside x_t
