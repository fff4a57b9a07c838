"""Model configuration: plain dataclasses whose defaults are the released Text2Earth model.

A `ModelConfig` is stored inside every checkpoint (as JSON) and is all that is needed to rebuild the
model. Files in `configs/` instantiate these with plain values; nothing here names a class by string.
"""
from dataclasses import asdict, dataclass, field, fields


@dataclass
class UNetConfig:
    """SD2-base cross-attention U-Net plus Text2Earth's resolution (Google map level) embedding."""
    in_channels: int = 4                                 # 9 for the inpainting model: [x_t, mask, masked latent]
    out_channels: int = 4
    channels: tuple = (320, 640, 1280, 1280)             # one entry per resolution level
    layers_per_level: int = 2                            # res-blocks per down level (up levels have one more)
    attention: tuple = (True, True, True, False)         # cross-attention transformer at this level?
    heads: tuple = (5, 10, 20, 20)                       # attention heads per level (head dim 64 at the defaults)
    context_dim: int = 1024                              # width of the text states cross-attention reads
    norm_groups: int = 32
    norm_eps: float = 1e-5
    time_dim: int = 0                                    # width of the time embedding; 0 = 4 * channels[0]
    level_embedding: bool = True                         # diffusers' class_embed_type="timestep"
    scale_shift_norm: bool = False                       # ADM's AdaGN in the res-blocks (the release: False)
    gradient_checkpointing: bool = False


@dataclass
class VAEConfig:
    """KL-regularised autoencoder (Rombach et al. 2022), downsampling 2 ** (len(channels) - 1)."""
    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple = (128, 256, 512, 512)
    layers_per_level: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215                      # latents are multiplied by this before diffusion


@dataclass
class TextConfig:
    """OpenCLIP text tower; `layers` is how many blocks run (SD2: 23 of ViT-H-14's 24 = the penultimate layer)."""
    width: int = 1024
    heads: int = 16
    layers: int = 23
    vocab_size: int = 49408
    context_length: int = 77


@dataclass
class DiffusionConfig:
    """The training noise process (SPEC section 3)."""
    num_steps: int = 1000
    schedule: str = "scaled_linear"                      # "scaled_linear" | "linear" | "cosine"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: str = "eps"                              # "eps" | "v" | "x0"
    spacing: str = "leading"                             # how samplers pick timesteps (release: "leading")
    steps_offset: int = 1                                # added to "leading" timesteps (release: 1)


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Inverse of `to_dict`; unknown keys are an error (a checkpoint from another codebase, or a typo)."""
        parts = {"unet": UNetConfig, "vae": VAEConfig, "text": TextConfig, "diffusion": DiffusionConfig}
        unknown = set(d) - set(parts)
        if unknown:
            raise ValueError(f"model config has unknown sections {sorted(unknown)}; expected {sorted(parts)}")
        kwargs = {}
        for name, sub in parts.items():
            values = dict(d.get(name, {}))
            known = {f.name for f in fields(sub)}
            bad = set(values) - known
            if bad:
                raise ValueError(f"model config section '{name}' has unknown keys {sorted(bad)}")
            kwargs[name] = sub(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
        return cls(**kwargs)


def load_config(path):
    """Execute a config file (plain Python assignments, see configs/) and return its public names as a dict-like
    namespace. `model` in it is a ModelConfig; training files add plain values (lr, batch size, ...)."""
    import runpy
    import types
    from pathlib import Path
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    values = {k: v for k, v in runpy.run_path(str(path)).items()
              if not k.startswith("_") and not isinstance(v, (types.ModuleType, type, types.FunctionType))}
    return types.SimpleNamespace(**values)
