"""Text2Earth as released (SD2-base layout + resolution embedding, SPEC section 2); the paper's training values."""
from model.config import ModelConfig

model = ModelConfig()          # every default is the released model's value
