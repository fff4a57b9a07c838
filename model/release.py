"""The release's diffusers layout (SD2-base, Text2Earth, Text2Earth-inpainting) read into our
configs and key names.

A release folder holds `model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`,
`scheduler/`: configs are read from each `config.json` (features this code does not implement are
refused by name), keys are renamed to ours, the HF CLIP text model's q/k/v are fused into
open_clip's in_proj. Nothing is unpickled except through `torch.load(weights_only=True)`; every
error is a `WeightsError` naming the file and the key.
"""

import json
import mmap
import re
from pathlib import Path

import torch
from model.config import DiffusionConfig, ModelConfig, TextConfig, UNetConfig, VAEConfig


class WeightsError(ValueError):
    """A weights file or folder that cannot be loaded as asked;
    the message names the file and key."""


# ----------------------------------------------------------------------------------------------
# Reading tensors
# ----------------------------------------------------------------------------------------------
SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


def _mapped_tensor(file, start, end, dtype, shape):
    """The bytes [start, end) of an open file as a tensor over a private (copy-on-write) memory map
    of just those pages: nothing is read until the tensor is used, the file is never written, and
    the pages go with the tensor."""
    n = end - start
    if n == 0 or start % dtype.itemsize:  # empty, or misaligned for its dtype: an ordinary read
        file.seek(start)
        data = bytearray(file.read(n))
        return (torch.frombuffer(data, dtype=dtype) if n else torch.empty(0, dtype=dtype)).reshape(
            shape
        )
    page = start - start % mmap.ALLOCATIONGRANULARITY
    buf = mmap.mmap(file.fileno(), end - page, offset=page, access=mmap.ACCESS_COPY)
    return torch.frombuffer(buf, dtype=dtype, count=n // dtype.itemsize, offset=start - page).view(
        shape
    )


def _read_safetensors(path):
    """A safetensors file -> {key: tensor}, each tensor memory-mapped on its own
    (_mapped_tensor)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if not 2 <= n <= size - 8:
            raise WeightsError(
                f"{path}: not a readable safetensors file (truncated or corrupt?): header size {n}"
            )
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise WeightsError(
                f"{path}: not a readable safetensors file (corrupt header: {e})"
            ) from None
        if not isinstance(header, dict):
            raise WeightsError(
                f"{path}: not a readable safetensors file (its header is not a JSON object)"
            )
        header.pop("__metadata__", None)
        state = {}
        for key, info in header.items():
            try:
                dtype = SAFETENSORS_DTYPES.get(info["dtype"])
                start, end = (8 + n + int(o) for o in info["data_offsets"])
                numel = 1
                for d in info["shape"]:
                    numel *= int(d)
            except (KeyError, TypeError, ValueError) as e:
                raise WeightsError(
                    f"{path}: not a readable safetensors file (corrupt header entry for key "
                    f"'{key}': {e!r})"
                ) from None
            if dtype is None:
                raise WeightsError(
                    f"{path}: key '{key}' has dtype {info['dtype']!r}, unknown to this reader"
                )
            if end > size or end - start != numel * dtype.itemsize:
                raise WeightsError(
                    f"{path}: not a readable safetensors file (truncated or corrupt?): key '{key}' "
                    f"lies outside the file or disagrees with its shape {info['shape']}"
                )
            state[key] = _mapped_tensor(f, start, end, dtype, info["shape"])
    return state


def read_tensors(path):
    """A safetensors file (memory-mapped, tensor by tensor: no copy is made until a tensor is
    changed or converted), or a PyTorch file read with torch.load(weights_only=True), memory-mapped
    when it is in the zip format -> {key: tensor}."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:  # the legacy (pre-zip) format cannot be mapped
            if "mmap" not in str(e):
                raise
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        # torch raises many types here (UnpicklingError, RuntimeError, EOFError, ...)
        raise WeightsError(f"{path}: not a readable PyTorch weights file: {e}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path}: expected a dict of tensors")
    return state


def _read_folder_tensors(folder, fp16=False):
    """All weights of one diffusers component folder: the full-precision files, or with `fp16` the
    `.fp16` variant when there is one (either is used when the folder holds only it)."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    half = [f for f in files if ".fp16." in f.name]
    full = [f for f in files if ".fp16." not in f.name]
    files = (half if fp16 else full) or files
    if not files:
        raise WeightsError(f"{folder}: no *.safetensors (or *.bin) weights file")
    state, origin = {}, {}
    for f in files:
        for k, v in read_tensors(f).items():
            state[k], origin[k] = v, f
    return state, origin


def _read_json(path):
    if not path.is_file():
        raise WeightsError(f"{path}: missing (every diffusers component folder needs its config)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path}: invalid JSON: {e}") from None


# ----------------------------------------------------------------------------------------------
# The release: diffusers layout
# ----------------------------------------------------------------------------------------------
def _require(cfg, file, key, allowed):
    """Refuse configs that ask for architecture features this code does not implement."""
    value = cfg.get(key, allowed[0])
    if value not in allowed:
        raise WeightsError(f"{file}: '{key}' = {value!r} is not supported (supported: {allowed})")


def unet_config_from_diffusers(cfg, file):
    down = cfg.get("down_block_types", [])
    attention = tuple(t == "CrossAttnDownBlock2D" for t in down)
    for t in down:
        if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
            raise WeightsError(f"{file}: down block type {t!r} is not supported")
    ups = tuple(t == "CrossAttnUpBlock2D" for t in cfg.get("up_block_types", []))
    if ups != attention[::-1]:
        raise WeightsError(f"{file}: up_block_types must mirror down_block_types")
    for key, allowed in [
        ("use_linear_projection", [True]),
        ("flip_sin_to_cos", [True]),
        ("freq_shift", [0]),
        ("act_fn", ["silu"]),
        ("class_embed_type", [None, "timestep"]),
        ("time_embedding_type", ["positional"]),
        ("addition_embed_type", [None]),
        ("mid_block_type", ["UNetMidBlock2DCrossAttn"]),
        ("only_cross_attention", [False]),
        ("dual_cross_attention", [False]),
        ("resnet_time_scale_shift", ["default"]),
        ("encoder_hid_dim", [None]),
        ("num_class_embeds", [None]),
        ("center_input_sample", [False]),
        ("transformer_layers_per_block", [1]),
        ("time_embedding_dim", [None]),
        ("cross_attention_norm", [None]),
    ]:
        _require(cfg, file, key, allowed)
    n = len(down)
    # diffusers' historical naming
    heads = cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8)
    heads = tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * n
    return UNetConfig(
        in_channels=cfg["in_channels"],
        out_channels=cfg["out_channels"],
        channels=tuple(cfg["block_out_channels"]),
        layers_per_level=cfg["layers_per_block"],
        attention=attention,
        heads=heads,
        context_dim=cfg["cross_attention_dim"],
        norm_groups=cfg.get("norm_num_groups", 32),
        norm_eps=cfg.get("norm_eps", 1e-5),
        scalar_conditions=("level",) if cfg.get("class_embed_type") == "timestep" else (),
    )


def vae_config_from_diffusers(cfg, file):
    for t in cfg.get("down_block_types", []):
        if t != "DownEncoderBlock2D":
            raise WeightsError(f"{file}: down block type {t!r} is not supported")
    for key, allowed in [
        ("act_fn", ["silu"]),
        ("mid_block_add_attention", [True]),
        ("use_quant_conv", [True]),
        ("use_post_quant_conv", [True]),
        ("shift_factor", [None]),
    ]:
        _require(cfg, file, key, allowed)
    if cfg.get("out_channels", cfg["in_channels"]) != cfg["in_channels"]:
        raise WeightsError(f"{file}: out_channels != in_channels is not supported")
    return VAEConfig(
        in_channels=cfg["in_channels"],
        latent_channels=cfg["latent_channels"],
        channels=tuple(cfg["block_out_channels"]),
        layers_per_level=cfg["layers_per_block"],
        norm_groups=cfg.get("norm_num_groups", 32),
        scaling_factor=cfg.get("scaling_factor", 0.18215),
    )


def text_config_from_diffusers(cfg, file):
    _require(cfg, file, "hidden_act", ["gelu"])
    if cfg["intermediate_size"] != 4 * cfg["hidden_size"]:
        raise WeightsError(f"{file}: intermediate_size must be 4 * hidden_size (open_clip's MLP)")
    return TextConfig(
        width=cfg["hidden_size"],
        heads=cfg["num_attention_heads"],
        layers=cfg["num_hidden_layers"],
        vocab_size=cfg["vocab_size"],
        context_length=cfg.get("max_position_embeddings", 77),
    )


def diffusion_config_from_diffusers(cfg, file):
    prediction = {"epsilon": "eps", "v_prediction": "v", "sample": "x0"}.get(
        cfg.get("prediction_type", "epsilon")
    )
    if prediction is None:
        raise WeightsError(
            f"{file}: prediction_type {cfg.get('prediction_type')!r} is not supported"
        )
    return DiffusionConfig(
        num_steps=cfg.get("num_train_timesteps", 1000),
        schedule=cfg.get("beta_schedule", "scaled_linear"),
        beta_start=cfg.get("beta_start", 0.00085),
        beta_end=cfg.get("beta_end", 0.012),
        prediction=prediction,
        spacing=cfg.get("timestep_spacing", "leading"),
        steps_offset=cfg.get("steps_offset", 0),
    )


# diffusers key -> our key, applied in order (regex, replacement)
UNET_KEYS = [
    (r"^time_embedding\.linear_(\d)", r"time_embed.fc\1"),
    (r"^class_embedding\.linear_(\d)", r"cond_embed.level.fc\1"),
    (r"^conv_norm_out\.", "norm_out."),
    (r"^(down|up)_blocks\.(\d+)\.resnets\.", r"\1.\2.res."),
    (r"^(down|up)_blocks\.(\d+)\.attentions\.", r"\1.\2.attn."),
    (r"^(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.", r"\1.\2.resample."),
    (r"^mid_block\.resnets\.0\.", "mid.res1."),
    (r"^mid_block\.resnets\.1\.", "mid.res2."),
    (r"^mid_block\.attentions\.0\.", "mid.attn."),
    (r"\.time_emb_proj\.", ".emb_proj."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.transformer_blocks\.0\.", ".block."),
    (r"\.ff\.net\.0\.proj\.", ".ff.proj_in."),
    (r"\.ff\.net\.2\.", ".ff.proj_out."),
    (r"\.to_out\.0\.", ".to_out."),
]
VAE_KEYS = [
    (r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.resnets\.", r"\1.levels.\3.res."),
    (
        r"^(encoder|decoder)\.(down|up)_blocks\.(\d+)\.(down|up)samplers\.0\.",
        r"\1.levels.\3.resample.",
    ),
    (r"\.mid_block\.resnets\.0\.", ".mid.res1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.res2."),
    (r"\.mid_block\.attentions\.0\.", ".mid.attn."),
    (r"\.conv_norm_out\.", ".norm_out."),
    (r"\.conv_shortcut\.", ".skip."),
    (r"\.group_norm\.", ".norm."),
    (r"\.to_out\.0\.", ".to_out."),
    (r"\.query\.", ".to_q."),
    (r"\.key\.", ".to_k."),
    (r"\.value\.", ".to_v."),  # older diffusers names
    (r"\.proj_attn\.", ".to_out."),
]
TEXT_KEYS = [  # "text_model." prefix: older transformers write it, version 5 does not
    (r"^(text_model\.)?embeddings\.token_embedding\.", "tower.token_embedding."),
    (r"^(text_model\.)?embeddings\.position_embedding\.weight$", "tower.positional_embedding"),
    (r"^(text_model\.)?final_layer_norm\.", "tower.ln_final."),
    (r"^(text_model\.)?encoder\.layers\.(\d+)\.", r"tower.transformer.resblocks.\2."),
    (r"\.self_attn\.out_proj\.", ".attn.out_proj."),
    (r"\.layer_norm1\.", ".ln_1."),
    (r"\.layer_norm2\.", ".ln_2."),
    (r"\.mlp\.fc1\.", ".mlp.c_fc."),
    (r"\.mlp\.fc2\.", ".mlp.c_proj."),
]


def rename_keys(state, rules):
    """Apply the (regex, replacement) rules to every key
    -> (renamed state, our key -> original key)."""
    out, original = {}, {}
    for k, v in state.items():
        new = k
        for pattern, repl in rules:
            new = re.sub(pattern, repl, new)
        out[new], original[new] = v, k
    return out, original


def _import_vae(state):
    """VAE attention weights stored as 1x1 convs (older checkpoints) become linear weights."""
    return {
        k: v[:, :, 0, 0] if (".mid.attn.to_" in k and v.ndim == 4) else v for k, v in state.items()
    }


def _import_hf_text(state, origin, file):
    """HF CLIPTextModel keys -> open_clip's: q/k/v projections are fused into one in_proj."""
    state = {k: v for k, v in state.items() if not k.endswith("position_ids")}
    state, original = rename_keys(state, TEXT_KEYS)
    fused = {}
    for k in list(state):
        m = re.match(r"^(.*)\.self_attn\.(q|k|v)_proj\.(weight|bias)$", k)
        if m:
            fused.setdefault((m.group(1), m.group(3)), {})[m.group(2)] = state.pop(k)
    for (prefix, kind), parts in fused.items():
        if set(parts) != {"q", "k", "v"}:
            missing = sorted({"q", "k", "v"} - set(parts))
            raise WeightsError(f"{file}: '{prefix}' is missing the {missing} projection {kind}")
        state[f"{prefix}.attn.in_proj_{kind}"] = torch.cat(
            [parts["q"], parts["k"], parts["v"]], dim=0
        )
    return state, original


def config_from_diffusers(folder) -> ModelConfig:
    folder = Path(folder)
    return ModelConfig(
        unet=unet_config_from_diffusers(
            _read_json(folder / "unet" / "config.json"), folder / "unet" / "config.json"
        ),
        vae=vae_config_from_diffusers(
            _read_json(folder / "vae" / "config.json"), folder / "vae" / "config.json"
        ),
        text=text_config_from_diffusers(
            _read_json(folder / "text_encoder" / "config.json"),
            folder / "text_encoder" / "config.json",
        ),
        diffusion=diffusion_config_from_diffusers(
            _read_json(folder / "scheduler" / "scheduler_config.json"),
            folder / "scheduler" / "scheduler_config.json",
        ),
    )


def read_diffusers(folder, fp16_parts=()):
    """A diffusers-format folder -> (ModelConfig, {part: (state in our key names, source of each
    key, our key -> the key in the file)}) for the parts unet, vae and text_encoder; the parts in
    `fp16_parts` read the `.fp16` weights variant when the folder has one. The tensors are
    memory-mapped (read_tensors)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsError(f"{folder}: not a folder")
    if not (folder / "unet").is_dir():
        raise WeightsError(f"{folder}: not a diffusers-format model folder (no unet/ inside)")
    cfg = config_from_diffusers(folder)
    parts = {}
    for part, rules in (("unet", UNET_KEYS), ("vae", VAE_KEYS)):
        state, origin = _read_folder_tensors(folder / part, part in fp16_parts)
        state, original = rename_keys(state, rules)
        if part == "vae":
            state = _import_vae(state)
        parts[part] = (state, {k: origin[original[k]] for k in state}, original)
    state, origin = _read_folder_tensors(folder / "text_encoder", "text_encoder" in fp16_parts)
    files = ", ".join(sorted({str(f) for f in origin.values()}))
    state, original = _import_hf_text(state, origin, files)
    parts["text_encoder"] = (state, files, original)
    return cfg, parts
