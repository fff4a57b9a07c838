"""Loading and saving weights.

- Our checkpoints: one safetensors file, the `ModelConfig` as JSON in its metadata, so a file
  rebuilds its model with no other input (`save_model` / `load_model`). A file may hold some parts
  only (`parts=("vae",)`: a pretrained VAE to train a U-Net on, as Text2Earth trains on SD2's);
  `load_part` reads one part of it, and `load_pretrained` starts a run from it.
- The release (diffusers layout, read by model/release.py): `load_diffusers` builds the model it
  describes. The same code loads SD2-base, Text2Earth and Text2Earth-inpainting.
- A run's starting point (`load_pretrained`): a release folder or one of our checkpoints loaded into
  the model the run's config describes, what the config adds initialised so that the model starts
  equal to its source.
- An OpenCLIP checkpoint file for the text tower (`load_openclip_text`).
- Files shipped in the repository (the demo's VAE and probe): their content hash and recipe in a
  manifest.json beside them (`record_file`), checked before use (`check_recorded`).

Loading is strict: a missing or unexpected key or a wrong shape is a `WeightsError` naming the file
and the key. Nothing is unpickled except through `torch.load(weights_only=True)`.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from model.config import CONDITION_FIELDS, ModelConfig
from model.release import WeightsError, config_from_diffusers, read_diffusers, read_tensors
from model.text import TextEncoder
from model.text2earth import Text2Earth
from model.unet import UNet
from model.vae import AutoencoderKL

ALIGNMENT = 64  # bytes: where a loaded weight's memory starts (load_state_strict)


# ----------------------------------------------------------------------------------------------
# Strict loading with clear errors
# ----------------------------------------------------------------------------------------------
def load_state_strict(module, state, source, original_names=None, place=None):
    """Copy `state` into `module`; any missing/unexpected key or shape mismatch
    -> WeightsError naming them.

    `source` names where the tensors came from (a file, or a dict key -> file); `original_names`
    maps our key -> the key as written in that file, so errors quote what the user can find in it.
    With `place=(device, dtype)` the tensors become the module's own instead of being copied (a
    module built on the meta device is loaded without a second copy of its weights): each is moved
    to `device` and, if floating, converted to `dtype`, one at a time, so a memory-mapped source
    tensor goes as its converted copy comes; one already on `device` in `dtype` is used as it is.
    """
    original_names = original_names or {}
    where = (lambda k: source[k]) if isinstance(source, dict) else (lambda k: source)
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing:
        k = missing[0]
        src = source if not isinstance(source, dict) else sorted({str(v) for v in source.values()})
        raise WeightsError(
            f"{src}: missing key for '{k}' (shape {tuple(expected[k].shape)}); "
            f"{len(missing)} missing in all"
        )
    if unexpected:
        k = unexpected[0]
        raise WeightsError(
            f"{where(k)}: unexpected key '{original_names.get(k, k)}' (no such parameter here); "
            f"{len(unexpected)} unexpected in all"
        )
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise WeightsError(
                f"{where(k)}: key '{original_names.get(k, k)}' has shape {tuple(v.shape)}, "
                f"expected {tuple(expected[k].shape)}"
            )
    if place is None:
        module.load_state_dict(state, strict=True)
        return
    device, dtype = place
    for k, v in state.items():  # in place, key by key: the source tensor is dropped at once
        v = v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype)
        # a tensor still on a file's memory map may start anywhere the file put it; the CPU
        # kernels' results can depend on that, so the weights get memory of their own, aligned as
        # a fresh model's are, and a model computes the same whatever its file's header length
        state[k] = v.clone() if v.data_ptr() % ALIGNMENT else v
    module.load_state_dict(state, strict=True, assign=True)


# ----------------------------------------------------------------------------------------------
# Our own checkpoints
# ----------------------------------------------------------------------------------------------
PARTS = ("unet", "vae", "text_encoder")


class SaveError(OSError):
    """A file could not be written (disk full, quota, permission): the message names it and why; the
    file it would have replaced is untouched and no temporary file is left."""


def write_atomically(path, write):
    """Call write(tmp) on a temporary file beside `path`, then rename it to `path`: an
    interruption leaves the old file or none, never half of one. The file gets the mode any new
    file gets here (0644 under the usual umask). A failed write is a SaveError naming the path,
    the reason and the free space left."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # safetensors writes its files 0600
        os.replace(tmp, path)
    except (OSError, RuntimeError, SafetensorError) as e:
        # torch.save reports a short write as a RuntimeError
        reason = (
            e.strerror
            if isinstance(e, OSError) and e.strerror
            else _write_error(tmp) or str(e).splitlines()[0]
        )
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            reason += f" ({shutil.disk_usage(path.parent).free / 2**20:.0f} MiB free there)"
        raise SaveError(f"could not write {path}: {reason}") from None


def _write_error(tmp):
    """The operating system's reason a write to `tmp` fails (e.g. "No space left on device",
    "File too large"), found by appending 1 MiB to it; None when that succeeds. torch.save only
    reports "unexpected pos"."""
    try:
        with open(tmp, "ab") as f:
            f.write(bytes(2**20))
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        return e.strerror
    return None


def write_tensors(path, tensors, metadata):
    """A safetensors file written atomically (write_atomically). metadata: str -> str."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def save_model(model: Text2Earth, path, metadata=None, trained=PARTS, parts=PARTS):
    """Write the weights of `parts` (all by default) plus the config to one safetensors file,
    atomically. `trained` names the parts whose weights were ever trained (a part built from scratch
    and never trained is left out), so that a run starting from this file can refuse to freeze an
    untrained VAE or text encoder; a part not written counts as untrained."""
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f"parts must be some of {PARTS}, got {parts}")
    tensors = {k: v for k, v in model.state_dict().items() if k.split(".")[0] in parts}
    meta = {
        "format": "text2earth",
        "config": json.dumps(model.cfg.to_dict()),
        "trained": json.dumps(sorted(set(trained) & set(parts))),
        "parts": json.dumps(sorted(parts)),
    }
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    write_tensors(path, tensors, meta)


def trained_size(path):
    """The image size a checkpoint of ours was trained at (its metadata, written by train.py), or
    None (a release folder, or a file without it)."""
    path = Path(path)
    if path.is_dir() or not path.is_file():
        return None
    size = read_metadata(path).get("image_size")
    return int(size) if size and size.isdigit() else None


def read_metadata(path):
    try:
        with safe_open(str(path), framework="pt") as f:
            return f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise WeightsError(
            f"{path}: not a readable safetensors file (truncated or corrupt?): {e}"
        ) from None


def _our_config(path):
    """(ModelConfig, trained parts, parts held) from the metadata of one of our checkpoints."""
    meta = read_metadata(path)
    if meta.get("format") != "text2earth" or "config" not in meta:
        raise WeightsError(
            f"{path}: not a text2earth checkpoint (no 'config' in its safetensors metadata)"
        )
    try:
        cfg = ModelConfig.from_dict(json.loads(meta["config"]))
    except (ValueError, TypeError) as e:
        raise WeightsError(f"{path}: {e}") from None
    held = set(json.loads(meta.get("parts", json.dumps(PARTS))))
    return cfg, set(json.loads(meta.get("trained", json.dumps(PARTS)))) & held, held


def read_config(path) -> ModelConfig:
    """The ModelConfig of a release folder or one of our checkpoints, read without its tensors
    (WeightsError when it is neither)."""
    path = Path(path)
    if path.is_dir():
        return config_from_diffusers(path)
    if not path.is_file():
        raise WeightsError(f"{path}: does not exist")
    return _our_config(path)[0]


def trained_parts(path):
    """The parts of the model at `path` whose weights were trained: all of a release folder; what
    one of our checkpoints records."""
    path = Path(path)
    return set(PARTS) if path.is_dir() else _our_config(path)[1]


def _dtype_of(dtype, part):
    """A loader's `dtype`: one torch dtype for every part, or {part: dtype}
    (parts not named: float32)."""
    return dtype.get(part, torch.float32) if isinstance(dtype, dict) else dtype


def _built(cfg, parts, device, dtype):
    """The model `cfg` describes, built on the meta device, the tensors of `parts`
    ({part: (state, source, original names)}) made its own weights on `device` in their part's
    dtype (load_state_strict's `place`)."""
    with torch.device("meta"):
        model = Text2Earth(cfg)
    for part, (state, source, original) in parts.items():
        load_state_strict(
            getattr(model, part),
            state,
            source,
            original,
            place=(torch.device(device), _dtype_of(dtype, part)),
        )
    return model.eval()


def load_part(path, part, device="cpu", dtype=torch.float32):
    """One part (`"vae"`, `"unet"` or `"text_encoder"`) of a release folder or one of our
    checkpoints, whole or partial, as its module in eval mode; a VAE keeps the source's latent
    scaling factor in its config."""
    cfg, parts = _read_source(path)
    if part not in parts:
        raise WeightsError(f"{path}: holds no {part} (it holds {sorted(parts)})")
    with torch.device("meta"):
        module = {
            "unet": lambda: UNet(cfg.unet),
            "vae": lambda: AutoencoderKL(cfg.vae),
            "text_encoder": lambda: TextEncoder(cfg.text),
        }[part]()
    load_state_strict(module, *parts[part], place=(torch.device(device), dtype))
    return module.eval()


def load_model(path, device="cpu", dtype=torch.float32) -> Text2Earth:
    """Rebuild a `Text2Earth` from one of our checkpoints, config included. `dtype`: a torch dtype
    for all parts or {part: dtype}; the weights are memory-mapped from the file and used in place
    when device and dtype allow."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: no such file")
    cfg, _, held = _our_config(path)
    if held != set(PARTS):
        raise WeightsError(
            f"{path}: holds only {sorted(held)}, not a whole model (model/weights.load_part reads "
            "a part; train.py --init_from starts a run from it)"
        )
    return _built(*_read_source(path), device, dtype)


def load_weights(path, device="cpu", dtype=torch.float32) -> Text2Earth:
    """Either a diffusers-format folder (the release) or one of our `.safetensors` checkpoints."""
    path = Path(path)
    if path.is_dir():
        return load_diffusers(path, device, dtype)
    if path.is_file():
        return load_model(path, device, dtype)
    raise WeightsError(
        f"{path}: does not exist (expected a diffusers-format folder or a text2earth .safetensors "
        "file)"
    )


def load_diffusers(folder, device="cpu", dtype=torch.float32) -> Text2Earth:
    """Build and load a `Text2Earth` from a diffusers-format folder (the released weights). A part
    asked for in float16 reads the folder's `.fp16` weights files when there are some (the
    release's fp16 variant)."""
    fp16 = [part for part in PARTS if _dtype_of(dtype, part) == torch.float16]
    return _built(*read_diffusers(folder, fp16_parts=fp16), device, dtype)


# ----------------------------------------------------------------------------------------------
# Starting a run from pretrained weights: the model the config describes,
# what the source has loaded into it
# ----------------------------------------------------------------------------------------------
def _read_source(path):
    """A release folder or one of our checkpoints
    -> (ModelConfig, {part: (state, source, original names)}) for the parts it holds."""
    path = Path(path)
    if path.is_dir():
        return read_diffusers(path)
    if not path.is_file():
        raise WeightsError(
            f"{path}: does not exist (expected a diffusers-format folder or a text2earth "
            ".safetensors file)"
        )
    cfg, _, held = _our_config(path)
    tensors = read_tensors(path)
    parts = {
        part: {k[len(part) + 1 :]: v for k, v in tensors.items() if k.startswith(part + ".")}
        for part in held
    }
    stray = [k for k in tensors if not k.startswith(tuple(p + "." for p in PARTS))]
    if stray:
        raise WeightsError(
            f"{path}: unexpected key '{stray[0]}' (not in unet, vae or text_encoder)"
        )
    return cfg, {part: (state, path, {}) for part, state in parts.items()}


# not architecture: the source's scaling wins
RUN_TIME = {"unet.gradient_checkpointing", "vae.scaling_factor"}


SECTION = {"unet": "unet", "vae": "vae", "text_encoder": "text"}  # part -> its ModelConfig section


def _check_architecture(cfg, source_cfg, path, parts=PARTS):
    """Every architecture field of the run's config must equal the source's, for the parts the
    source holds, except two that may grow, each started so that the model equals its source
    (load_pretrained): the U-Net's conditions (config.CONDITION_FIELDS: a condition the source
    lacks) and unet.in_channels (more input channels)."""
    for section in (SECTION[p] for p in PARTS if p in parts):
        ours, theirs = getattr(cfg, section).__dict__, getattr(source_cfg, section).__dict__
        for key, value in ours.items():
            name = f"{section}.{key}"
            if name in RUN_TIME or value == theirs[key]:
                continue
            if section == "unet" and key in CONDITION_FIELDS and set(theirs[key]) <= set(value):
                continue
            if name == "unet.in_channels" and value > theirs[key]:
                continue
            raise WeightsError(
                f"{path}: the config's model.{name} = {value!r} but the source has "
                f"{theirs[key]!r}; make the config match (only the U-Net's conditions and "
                "unet.in_channels may grow)"
            )


@torch.no_grad()
def load_pretrained(model: Text2Earth, path):
    """Load the weights at `path` (a release-format folder such as SD2-base or Text2Earth, or one
    of our checkpoints) into `model`, which is built from the run's own config. What the config
    adds starts so that the model computes exactly what its source computes: a scalar condition
    the source lacks (Text2Earth's level on SD2-base) gets its embedding MLP with the last layer
    at zero, extra U-Net input channels (inpainting) get zero conv_in weights. Everything else
    must match, key for key and shape for shape (WeightsError). A source that holds some parts
    only (save_model's `parts`) loads those; the others keep the model's own initialisation. The
    latent scaling factor is the source's if it holds the VAE. Returns the parts of the source
    that were trained."""
    source_cfg, parts = _read_source(path)
    _check_architecture(model.cfg, source_cfg, path, parts)
    for part, (state, source, original) in parts.items():
        target = getattr(model, part)
        if part == "unet":
            state = dict(state)
            for name in model.cfg.unet.embedded_conditions():
                if name not in source_cfg.unet.embedded_conditions():  # added: zero last layer
                    mlp = target.cond_embed[name]
                    torch.nn.init.zeros_(mlp.fc2.weight)
                    torch.nn.init.zeros_(mlp.fc2.bias)
                    state.update(
                        {
                            f"cond_embed.{name}.{k}": v.detach().clone()
                            for k, v in mlp.state_dict().items()
                        }
                    )
                    if isinstance(source, dict):
                        source.update(
                            {
                                f"cond_embed.{name}.{k}": "(added by the config)"
                                for k in mlp.state_dict()
                            }
                        )
            w = state.get("conv_in.weight")
            if w is not None and w.shape[1] < model.cfg.unet.in_channels:
                # added input channels: zeros
                grown = w.new_zeros(w.shape[0], model.cfg.unet.in_channels, *w.shape[2:])
                grown[:, : w.shape[1]] = w
                state["conv_in.weight"] = grown
        load_state_strict(target, state, source, original)
    if "vae" in parts:
        # model.vae.cfg is the same object
        model.cfg.vae.scaling_factor = source_cfg.vae.scaling_factor
    return trained_parts(path)


def load_openclip_text(path, text_encoder, device="cpu", dtype=torch.float32):
    """Load the text tower from an OpenCLIP checkpoint (e.g. ViT-H-14 laion2b): the vision tower,
    the projection and the transformer blocks past `cfg.layers` (SD2 drops the last one) are
    ignored. A text encoder built on the meta device takes the file's (memory-mapped) tensors as its
    weights, on `device` in `dtype`; any other is copied into."""
    state = read_tensors(path)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    on_meta = any(p.is_meta for p in text_encoder.parameters())
    n = text_encoder.cfg.layers
    kept = {}
    for k, v in state.items():
        if k.startswith("visual.") or k in (
            "text_projection",
            "logit_scale",
            "logit_bias",
            "attn_mask",
        ):
            continue
        m = re.match(r"^transformer\.resblocks\.(\d+)\.", k)
        if m and int(m.group(1)) >= n:
            continue
        kept["tower." + k] = v
    del state  # what is not kept is unmapped now
    load_state_strict(
        text_encoder, kept, Path(path), place=(torch.device(device), dtype) if on_meta else None
    )


# ----------------------------------------------------------------------------------------------
# Recorded files: content hash, recipe and measured figures in the manifest.json of their folder
# ----------------------------------------------------------------------------------------------
def sha256(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def manifest_of(path):
    """{file name: its record} from the manifest.json beside `path` ({} if there is none)."""
    manifest = Path(path).with_name("manifest.json")
    return json.loads(manifest.read_text()) if manifest.exists() else {}


def record_file(path, entry):
    """Enter `path`'s content hash and `entry` (its recipe, figures: JSON-able) in its folder's
    manifest.json."""
    path = Path(path)
    manifest = manifest_of(path)
    manifest[path.name] = {"sha256": sha256(path), **entry}
    tmp = path.with_name("manifest.json.tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path.with_name("manifest.json"))


def check_recorded(path, remake="remake it"):
    """WeightsError unless `path` exists and, when its folder's manifest records it, has the
    recorded hash. Returns its record ({} if none). `remake` says how to make the file again."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path} does not exist: {remake}")
    entry = manifest_of(path).get(path.name, {})
    if entry and entry["sha256"] != sha256(path):
        raise WeightsError(
            f"{path}: content hash {sha256(path)[:12]}... is not the one recorded in "
            f"{path.with_name('manifest.json')} ({entry['sha256'][:12]}...): {remake}"
        )
    return entry
