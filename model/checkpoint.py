"""Training checkpoints: atomic, the last K kept, resumable to the step; and the export of a run's weights.

A checkpoint (`ckpt_{step:09d}.pt`, read with torch.load(weights_only=True)) holds the model, the EMA of the
trained parts, the optimizer, the step, each process's data position, the configs and the training seconds.
The export (`model.safetensors`, model/weights.py) is the whole model with the EMA weights in the trained parts;
a LoRA run exports its adapters alone, a ControlNet run its ControlNet alone.
"""
import copy
import os
from pathlib import Path

import torch

from model.controlnet import save_controlnet
from model.lora import save_lora
from model.weights import save_model


def checkpoint_paths(out_dir):
    return sorted(Path(out_dir).glob("ckpt_*.pt"))


def checkpoint_step(path):
    """The step a checkpoint was written at, from its name (save_checkpoint's)."""
    return int(Path(path).stem.removeprefix("ckpt_"))


def save_checkpoint(out_dir, state, keep_last):
    path = Path(out_dir) / f"ckpt_{state['step']:09d}.pt"
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)                                   # atomic: a crash leaves the old or the new file
    for old in checkpoint_paths(out_dir)[:-keep_last]:
        old.unlink()
    return path


def load_checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def finished(out_dir, max_steps):
    """Whether the run in out_dir reached its end (max_steps, or the end its time budget set), i.e. was not
    stopped on the way."""
    ckpts = checkpoint_paths(out_dir)
    if not ckpts:
        return False
    if checkpoint_step(ckpts[-1]) >= max_steps:
        return True
    return bool(torch.load(ckpts[-1], map_location="cpu", weights_only=True, mmap=True).get("finished", False))


def check_same_run(before, cfg, path):
    """Refuse to resume the checkpoint `path`, written by a run of train config `before` (a dict), with a config
    `cfg` that trains something else: other parts, objective, LoRA rank or ControlNet task."""
    keys = {"train": cfg.train, "objective": cfg.objective, "lora.rank": cfg.lora.rank,
            "control_task": cfg.control_task}
    was = {k: (before.get("lora") or {}).get("rank", 0) if k == "lora.rank" else before.get(k, "") for k in keys}
    if was != keys:
        raise ValueError(f"{path} is a run of {was}; resume it with the same --train and --objective (and "
                         "--lora.rank, --control_task), or start a new --out_dir")


def export(model, ema, parts, path, step, trained, image_size=None, lora=None, task=""):
    """The whole model with the EMA weights in `parts` (the ModuleDict the EMA copies) as one of our safetensors
    checkpoints; `trained` names the model's parts whose weights have been trained (model/weights.save_model).
    image_size, the training images' size, goes in the metadata (editing's default tile: weights.trained_size).
    lora (a LoRAConfig): a LoRA run exports the EMA adapters alone, lora_{part}.safetensors beside `path`; a
    ControlNet run (parts["controlnet"]) its EMA ControlNet alone, controlnet.safetensors, with its `task`."""
    if "controlnet" in ema:
        info = {"step": step, "task": task, "image_size": image_size}
        return save_controlnet(ema["controlnet"], Path(path).with_name("controlnet.safetensors"), info)
    if lora is not None:
        for name, module in ema.items():
            save_lora(module, Path(path).with_name(f"lora_{name}.safetensors"), lora, {"step": step}, part=name)
        return
    live = copy.deepcopy(parts.state_dict())
    parts.load_state_dict(ema.state_dict())
    try:
        meta = {"step": step} if image_size is None else {"step": step, "image_size": image_size}
        save_model(model, path, metadata=meta, trained=trained)
    finally:
        parts.load_state_dict(live)
