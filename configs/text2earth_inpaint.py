"""Text2Earth-inpainting: the same model with 9 input channels [x_t (4), mask (1), masked-image latent (4)]."""
from model.config import ModelConfig, UNetConfig

model = ModelConfig(unet=UNetConfig(in_channels=9))
