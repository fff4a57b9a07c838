"""Model configuration: plain dataclasses whose defaults are the released Text2Earth model.

A `ModelConfig` is stored inside every checkpoint (as JSON) and is all that is needed to
rebuild the model. Files in `configs/` instantiate these with plain values; nothing here
names a class by string.
"""

import ast
from dataclasses import asdict, dataclass, field, fields, is_dataclass


@dataclass
class UNetConfig:
    """SD2-base cross-attention U-Net plus Text2Earth's resolution (Google map level) embedding."""

    in_channels: int = 4  # 9 for the inpainting model: [x_t, mask, masked latent]
    out_channels: int = 4
    channels: tuple = (320, 640, 1280, 1280)  # one entry per resolution level
    layers_per_level: int = 2  # res-blocks per down level (up levels have one more)
    attention: tuple = (True, True, True, False)  # cross-attention transformer at this level?
    heads: tuple = (5, 10, 20, 20)  # attention heads per level (head dim 64 at the defaults)
    context_dim: int = 1024  # width of the text states cross-attention reads
    norm_groups: int = 32
    norm_eps: float = 1e-5
    time_dim: int = 0  # width of the time embedding; 0 = 4 * channels[0]
    # embedded like the timestep, added to the time embedding
    # (the release's level: class_embed_type="timestep")
    scalar_conditions: tuple = ("level",)
    # places on the globe (fields lat, lon in degrees), embedded on the sphere (PlaceEmbedding)
    place_conditions: tuple = ()
    scale_shift_norm: bool = False  # ADM's AdaGN in the res-blocks (the release: False)
    gradient_checkpointing: bool = False

    def embedded_conditions(self):
        """Every condition the U-Net embeds and adds to the time embedding, in guidance order."""
        return tuple(name for f in CONDITION_FIELDS for name in getattr(self, f))


# the UNetConfig fields that name embedded conditions, one per way of embedding (model/unet.py)
CONDITION_FIELDS = ("scalar_conditions", "place_conditions")


@dataclass
class VAEConfig:
    """KL-regularised autoencoder (Rombach et al. 2022), downsampling 2 ** (len(channels) - 1)."""

    in_channels: int = 3
    latent_channels: int = 4
    channels: tuple = (128, 256, 512, 512)
    layers_per_level: int = 2
    norm_groups: int = 32
    scaling_factor: float = 0.18215  # latents are multiplied by this before diffusion


@dataclass
class TextConfig:
    """OpenCLIP text tower; `layers` is how many blocks run
    (SD2: 23 of ViT-H-14's 24 = the penultimate layer)."""

    width: int = 1024
    heads: int = 16
    layers: int = 23
    vocab_size: int = 49408
    context_length: int = 77


@dataclass
class DiffusionConfig:
    """The training noise process (the release's scheduler: scaled-linear betas 0.00085..0.012,
    1000 steps)."""

    num_steps: int = 1000
    schedule: str = "scaled_linear"  # "scaled_linear" | "linear" | "cosine"
    beta_start: float = 0.00085
    beta_end: float = 0.012
    prediction: str = "eps"  # "eps" | "v" | "x0"
    spacing: str = "leading"  # how samplers pick timesteps (release: "leading")
    steps_offset: int = 1  # added to "leading" timesteps (release: 1)


@dataclass
class ConditionConfig:
    """One condition besides x_t and t (model/conditions.py): where a batch holds it, its null value
    ("absent": what DCA dropout puts in its place and what the null branch of guidance gets), its
    dropout probability, the range of its values."""

    # the key readers fill in a sample (data/), or several: ("lat", "lon") is one value of two
    field: object = "level"
    null: object = 0.0  # "" for the text, 0.0 (no resolution) for the level, nan (no place)
    p_drop: float = 0.1  # DCA: dropped with this probability, independently
    # (low, high) per field, checked where values are given; () = any finite number
    bounds: tuple = ()

    def field_names(self):
        """The batch fields the condition reads, as a tuple."""
        return (self.field,) if isinstance(self.field, str) else tuple(self.field)


def default_conditions():
    """Text2Earth's: the caption and the map level, each dropped with probability 0.1
    (the paper does not say)."""
    return {
        "text": ConditionConfig(field="caption", null="", p_drop=0.1),
        "level": ConditionConfig(field="level", null=0.0, p_drop=0.1),
    }


def location_condition(p_drop=0.1):
    """The image centre's latitude and longitude in degrees, from the fields "lat" and "lon"; its
    null, "no place", is NaN, never confused with (0, 0), a real place in the Gulf of Guinea. Goes
    with a name in UNetConfig.place_conditions."""
    return ConditionConfig(
        field=("lat", "lon"),
        null=float("nan"),
        p_drop=p_drop,
        bounds=((-90.0, 90.0), (-180.0, 180.0)),
    )


@dataclass
class ModelConfig:
    unet: UNetConfig = field(default_factory=UNetConfig)
    vae: VAEConfig = field(default_factory=VAEConfig)
    text: TextConfig = field(default_factory=TextConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    # name -> ConditionConfig; "text" and the U-Net's embedded_conditions() are read
    conditions: dict = field(default_factory=default_conditions)

    def condition_names(self):
        """The conditions this model reads, in guidance order: the text,
        then those the U-Net embeds."""
        return ("text", *self.unet.embedded_conditions())

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, d):
        """Inverse of `to_dict`; unknown keys are an error (a checkpoint from another codebase,
        or a typo)."""
        parts = {
            "unet": UNetConfig,
            "vae": VAEConfig,
            "text": TextConfig,
            "diffusion": DiffusionConfig,
        }
        unknown = set(d) - set(parts) - {"conditions"}
        if unknown:
            raise ValueError(
                f"model config has unknown sections {sorted(unknown)}; expected {sorted(parts)}"
            )
        kwargs = {}
        if "conditions" in d:
            known = {f.name for f in fields(ConditionConfig)}
            for name, c in d["conditions"].items():
                if set(c) - known:
                    raise ValueError(
                        f"model config condition '{name}' has unknown keys {sorted(set(c) - known)}"
                    )
            kwargs["conditions"] = {
                name: ConditionConfig(**_tuples(c)) for name, c in d["conditions"].items()
            }
        for name, sub in parts.items():
            values = dict(d.get(name, {}))
            known = {f.name for f in fields(sub)}
            bad = set(values) - known
            if "level_embedding" in bad:
                raise ValueError(
                    "model config has 'level_embedding': written by an earlier text2earth, before "
                    "the level became one of unet.scalar_conditions; retrain it, or load its "
                    "weights by hand"
                )
            if bad:
                raise ValueError(f"model config section '{name}' has unknown keys {sorted(bad)}")
            kwargs[name] = sub(
                **{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
            )
        return cls(**kwargs)


def _tuples(values):
    """JSON's lists back to the tuples a config holds (nested: bounds)."""

    def tup(v):
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    return {k: tup(v) for k, v in values.items()}


# ----------------------------------------------------------------------------------------------
# The one config mechanism: a dataclass of defaults, a config file of plain values,
# --key=value overrides
# ----------------------------------------------------------------------------------------------
def load_config(path):
    """Execute a config file (plain Python assignments, see configs/) and return its public names as
    a namespace. `model` in it is a ModelConfig; training files add plain values
    (lr, batch size, ...)."""
    import runpy
    import types
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {path} does not exist")
    try:
        values = runpy.run_path(str(path))
    except SyntaxError as e:
        raise ValueError(
            f"config file {path}: not a Python config file (line {e.lineno}: {e.msg})"
        ) from None
    except Exception as e:
        # a config file is user code: name the file, not a traceback from inside runpy
        raise ValueError(f"config file {path}: {type(e).__name__}: {e}") from None
    return types.SimpleNamespace(
        **{
            k: v
            for k, v in values.items()
            if not k.startswith("_")
            and not isinstance(v, (types.ModuleType, type, types.FunctionType))
        }
    )


def _parse_value(text, default, key):
    """`text` as the type of `default` (bool, int, float, tuple or str);
    ValueError naming --key otherwise."""
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError(f"--{key}: expected a boolean, got {text!r}")
    if isinstance(default, (int, float)):
        try:
            return float(text) if isinstance(default, float) else int(ast.literal_eval(text))
        except (ValueError, SyntaxError, TypeError):
            raise ValueError(f"--{key}: expected {type(default).__name__}, got {text!r}") from None
    if isinstance(default, tuple):
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            raise ValueError(f"--{key}: expected a tuple like (1, 2), got {text!r}") from None
        return tuple(value) if isinstance(value, (list, tuple)) else (value,)
    return text


def set_key(cfg, key, text):
    """Set the field at dotted path `key` (through dataclasses and dicts,
    e.g. model.conditions.level.p_drop)."""
    *path, name = key.split(".")
    obj = cfg
    for p in path:
        if isinstance(obj, dict) and p in obj:
            obj = obj[p]
        elif is_dataclass(obj) and p in {f.name for f in fields(obj)}:
            obj = getattr(obj, p)
        else:
            raise ValueError(f"unknown config key --{key}")
    if not is_dataclass(obj) or name not in {f.name for f in fields(obj)}:
        raise ValueError(f"unknown config key --{key}")
    setattr(obj, name, _parse_value(text, getattr(obj, name), key))


def configure(cfg, argv):
    """`--config FILE` (each, in order) then `--key=value ...` (a bare `--flag` sets a boolean; a
    hyphen in a key is an underscore) applied to the dataclass `cfg`, in place. Unknown keys, in the
    file or on the command line, and values of the wrong type are ValueErrors."""
    argv = [part for a in argv for part in (a.split("=", 1) if a.startswith("--config=") else [a])]
    while "--config" in argv:  # config files first, in order
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise ValueError("--config needs a file")
        values = vars(load_config(argv[i + 1]))
        del argv[i : i + 2]
        names = {f.name for f in fields(cfg)}
        for k, v in values.items():
            if k not in names:
                raise ValueError(
                    f"config file: unknown key {k!r} (not a {type(cfg).__name__} field)"
                )
            default = getattr(cfg, k)
            if is_dataclass(default):
                if type(v) is not type(default):
                    raise ValueError(f"config file: {k} should be a {type(default).__name__}")
            elif not isinstance(v, type(default)) and not (
                isinstance(default, float) and isinstance(v, int)
            ):
                raise ValueError(f"config file: {k} = {v!r} should be {type(default).__name__}")
            setattr(cfg, k, float(v) if isinstance(default, float) else v)
    for arg in argv:
        if not arg.startswith("--"):
            raise ValueError(f"arguments are --config FILE and --key=value overrides; got {arg!r}")
        key, eq, text = arg[2:].partition("=")
        key = key.replace("-", "_")  # --train-vae is --train_vae
        if not eq:  # --flag: a boolean set to True
            text = "true"
            if not isinstance(_field_default(cfg, key), bool):
                raise ValueError(f"--{key} needs a value: --{key}=...")
        set_key(cfg, key, text)
    return cfg


def _field_default(cfg, key):
    try:
        obj = cfg
        for p in key.split("."):
            obj = obj[p] if isinstance(obj, dict) else getattr(obj, p)
        return obj
    except (AttributeError, KeyError):
        raise ValueError(f"unknown config key --{key}") from None


def usage(doc, cfg):
    """A script's help: its docstring, then every field of its config dataclass with the default."""
    lines = [doc.strip(), "", f"{type(cfg).__name__} (--key=value):"]
    lines += [
        f"  --{f.name}={getattr(cfg, f.name)!r}"
        for f in fields(cfg)
        if not is_dataclass(getattr(cfg, f.name))
    ]
    return "\n".join(lines)
