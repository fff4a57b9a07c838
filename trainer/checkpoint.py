"""Training checkpoints: atomic, the last K kept, resumable to the step; and the export of a
run's weights.

A checkpoint (`ckpt_{step:09d}.pt`, read with torch.load(weights_only=True)) holds the model, the
EMA of the trained parameters, the optimizer, the step, each process's data position, the configs
and the training seconds. The export (`model.safetensors`, model/weights.py) is the whole model with
the EMA weights in the trained parts; a LoRA run exports its adapters alone, a ControlNet run its
ControlNet alone.

What can go wrong, and what is kept:
- a write that fails (disk full, quota, permission) or is killed half-way: the file it would have
  replaced and the older checkpoints are untouched, no temporary file is left (SaveError; a killed
  writer's `.tmp` is removed by `remove_temporaries` when the run restarts);
- a checkpoint that does not load (truncated, corrupt, non-finite weights): `latest_checkpoint`
  walks back to the newest one that does and says which it passed and why; `set_aside` renames those
  to `.unreadable`, out of the rotation, for a person to look at.
"""

import contextlib
import copy
import math
from pathlib import Path

import torch

from model.controlnet import save_controlnet
from model.lora import save_lora
from model.weights import save_model, write_atomically

FIELDS = ("step", "model", "ema", "optimizer", "model_config", "train_config", "data")


class UnreadableCheckpoint(ValueError):
    """A checkpoint that cannot be resumed from; the message names the file and why."""


def checkpoint_paths(out_dir):
    return sorted(Path(out_dir).glob("ckpt_*.pt"))


def checkpoint_step(path):
    """The step a checkpoint was written at, from its name (save_checkpoint's)."""
    return int(Path(path).stem.removeprefix("ckpt_"))


def save_checkpoint(out_dir, state, keep_last):
    """Write `state` as ckpt_{step}.pt atomically, then delete all but the newest `keep_last`
    checkpoints (never before the new one is in place). A failed write is a SaveError and deletes
    nothing."""
    path = Path(out_dir) / f"ckpt_{state['step']:09d}.pt"
    write_atomically(path, lambda tmp: torch.save(state, tmp))
    others = [p for p in checkpoint_paths(out_dir) if p != path]
    for old in others[: max(0, len(others) - (keep_last - 1))]:
        old.unlink()
    return path


def nonfinite(state):
    """The first key of a state dict holding a NaN or an infinity, or None."""
    for key, value in state.items():
        if torch.is_tensor(value) and value.is_floating_point() and not torch.isfinite(value).all():
            return key
    return None


def load_checkpoint(path):
    """A checkpoint's state; UnreadableCheckpoint when the file does not load, lacks a field or
    holds non-finite weights."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 (a damaged zip or pickle fails in many ways; each means this)
        reason = str(e).splitlines()[0][:120] if str(e) else "no message"
        raise UnreadableCheckpoint(
            f"{path}: does not load ({type(e).__name__}: {reason})"
        ) from None
    if not isinstance(state, dict) or any(k not in state for k in FIELDS):
        raise UnreadableCheckpoint(f"{path}: not a training checkpoint (fields {FIELDS} expected)")
    for name in ("model", "ema"):
        key = nonfinite(state[name])
        if key is not None:
            raise UnreadableCheckpoint(f"{path}: non-finite values in {name} weights ({key})")
    return state


def latest_checkpoint(out_dir):
    """(path, state, passed) of the newest checkpoint in out_dir that loads, walking back past those
    that do not; passed = [UnreadableCheckpoint, ...] for each one passed, newest first.
    (None, None, passed) when none loads."""
    passed = []
    for path in reversed(checkpoint_paths(out_dir)):
        try:
            return path, load_checkpoint(path), passed
        except UnreadableCheckpoint as e:
            passed.append((path, e))
    return None, None, passed


def set_aside(paths):
    """Rename unreadable checkpoints to ckpt_*.pt.unreadable: out of the rotation and of the next
    resume, kept."""
    for path in paths:
        with contextlib.suppress(FileNotFoundError):  # another process set it aside first
            Path(path).rename(Path(path).with_name(Path(path).name + ".unreadable"))


def remove_temporaries(out_dir):
    """Remove the `.tmp` files a writer killed half-way left in out_dir (checkpoints, exports)."""
    for tmp in [*Path(out_dir).glob("ckpt_*.pt.tmp"), *Path(out_dir).glob("*.safetensors.tmp")]:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def finished(out_dir, max_steps):
    """Whether the run in out_dir reached its end (max_steps, or the end its time budget set), i.e.
    was not stopped on the way; judged by its newest checkpoint that loads."""
    for path in reversed(checkpoint_paths(out_dir)):
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception:  # noqa: BLE001 (unreadable: the one before decides, as on resume)
            continue
        return checkpoint_step(path) >= max_steps or bool(state.get("finished", False))
    return False


def check_same_run(before, cfg, path):
    """Refuse to resume the checkpoint `path`, written by a run of train config `before` (a dict),
    with a config `cfg` that trains something else: other parts, objective, LoRA rank or ControlNet
    task."""
    keys = {
        "train": cfg.train,
        "objective": cfg.objective,
        "lora.rank": cfg.lora.rank,
        "control_task": cfg.control_task,
    }
    was = {
        k: (before.get("lora") or {}).get("rank", 0) if k == "lora.rank" else before.get(k, "")
        for k in keys
    }
    if was != keys:
        raise ValueError(
            f"{path} is a run of {was}; resume it with the same --train and --objective (and "
            "--lora.rank, --control_task), or start a new --out_dir"
        )


# model fields a resumed run may change
RESUME_MAY_CHANGE = ("unet.gradient_checkpointing", ".p_drop")


def _flat(d, prefix=""):
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _same(a, b):
    """a == b, with NaN equal to NaN (the location's null)."""
    nan = isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b)
    return nan or a == b


def model_changes(before, now, path):
    """The model fields a resumed run changes: {field: new value} of those it may change (condition
    dropout, gradient checkpointing); any other field of `now` (the command's model config, a
    JSON-like dict) that differs from `before` (the one the checkpoint's run was given) is a
    ValueError naming it, since a resumed run keeps its model."""
    old, new = _flat(before), _flat(now)
    changed = sorted(k for k in new if k in old and not _same(old[k], new[k]))
    fixed = [k for k in changed if not any(k.endswith(s) for s in RESUME_MAY_CHANGE)]
    if fixed:
        shown = "; ".join(f"model.{k}: {old[k]!r} -> {new[k]!r}" for k in fixed[:3])
        raise ValueError(
            f"{path}: this command changes the model of the run it resumes ({shown}"
            f"{'; ...' if len(fixed) > 3 else ''}); a resumed run keeps its model (only "
            "model.conditions.*.p_drop and model.unet.gradient_checkpointing may change): drop the "
            "override, or start a new --out_dir with --init_from=<this run's model.safetensors>"
        )
    return {k: new[k] for k in changed}


def export(model, ema, parts, path, step, trained, image_size=None, lora=None, task=""):
    """The whole model with the EMA weights in `parts` (the ModuleDict the EMA copies) as one of our
    safetensors checkpoints; `trained` names the model's parts whose weights have been trained
    (model/weights.save_model). image_size, the training images' size, goes in the metadata
    (editing's default tile: weights.trained_size). lora (a LoRAConfig): a LoRA run exports the EMA
    adapters alone, lora_{part}.safetensors beside `path`; a ControlNet run (parts["controlnet"])
    its EMA ControlNet alone, controlnet.safetensors, with its `task`. Every file is written
    atomically; a failed write is a SaveError."""
    if "controlnet" in ema:
        info = {"step": step, "task": task, "image_size": image_size}
        return save_controlnet(
            ema["controlnet"], Path(path).with_name("controlnet.safetensors"), info
        )
    if lora is not None:
        for name, module in ema.items():
            save_lora(
                module,
                Path(path).with_name(f"lora_{name}.safetensors"),
                lora,
                {"step": step},
                part=name,
            )
        return
    live = copy.deepcopy(parts.state_dict())
    parts.load_state_dict(ema.state_dict())
    try:
        meta = {"step": step} if image_size is None else {"step": step, "image_size": image_size}
        save_model(model, path, metadata=meta, trained=trained)
    finally:
        parts.load_state_dict(live)
