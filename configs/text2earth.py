"""Text2Earth as released (lcybuaa/Text2Earth: SD2-base layout + the level embedding);
every default is its value."""

from model.config import ModelConfig

model = ModelConfig()
