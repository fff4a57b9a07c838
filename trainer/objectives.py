"""The kinds of training train.py runs, one record each: what it optimises, the frozen parts it
needs trained, the U-Net input it feeds and its loss of one micro-batch (the losses themselves are
in model/objectives.py).

    objective = OBJECTIVES[cfg.objective]
    loss, stats = objective.loss(model, net, batch, draw, settings)

Adding a kind of training is its loss in model/objectives.py, a record here and, if it has settings
of its own, their dataclass nested in train.py's TrainConfig (as `control` and `lora` are).
"""

from dataclasses import dataclass
from typing import Callable

import torch

from model.objectives import control_loss, inpaint_loss, t2i_loss, vae_loss


@dataclass(frozen=True)
class Draw:
    """The randomness of one micro-batch: the generator of the global micro-batch, this process's
    positions in it (B,) and its size (model/objectives.py)."""

    generator: torch.Generator
    idx: torch.Tensor
    global_batch: int


@dataclass(frozen=True)
class LossSettings:
    """What the losses read from the run besides the batch: set once when the run starts."""

    diffusion: object  # model/diffusion.Diffusion of the model's noise process
    autocast: object  # torch.autocast context (a no-op in fp32)
    train_text: bool = False  # the text encoder trains: its forward keeps its graph
    timestep_power: float = 1.0
    min_snr_gamma: float = 0.0
    kl_weight: float = 1e-6
    channels_last: bool = False


@dataclass(frozen=True)
class Objective:
    """One kind of training."""

    name: str
    trains: str  # the network the loss calls, DDP wraps: "unet", "controlnet" or "vae"
    uses: tuple  # the frozen parts it runs, which must have been trained
    # ModelConfig -> the U-Net input channels it feeds (None: no U-Net)
    unet_inputs: Callable | None
    loss: Callable  # (model, net, batch, Draw, LossSettings) -> (loss, {name: float})


def _diffusion_loss(loss_fn, model, net, batch, draw, s):
    return loss_fn(
        model,
        net,
        batch,
        diffusion=s.diffusion,
        generator=draw.generator,
        idx=draw.idx,
        global_batch=draw.global_batch,
        autocast=s.autocast,
        train_text=s.train_text,
        timestep_power=s.timestep_power,
        min_snr_gamma=s.min_snr_gamma,
    )


def _t2i(model, net, batch, draw, s):
    return _diffusion_loss(t2i_loss, model, net, batch, draw, s)


def _inpaint(model, net, batch, draw, s):
    return _diffusion_loss(inpaint_loss, model, net, batch, draw, s)


def _control(model, net, batch, draw, s):
    return _diffusion_loss(control_loss, model, net, batch, draw, s)


def _vae(model, net, batch, draw, s):
    return vae_loss(
        net,
        batch,
        generator=draw.generator,
        idx=draw.idx,
        global_batch=draw.global_batch,
        autocast=s.autocast,
        kl_weight=s.kl_weight,
        channels_last=s.channels_last,
    )


def _latents(cfg):
    return cfg.vae.latent_channels


def _inpainting_inputs(cfg):
    return 2 * cfg.vae.latent_channels + 1  # [x_t, mask, masked-image latent]


OBJECTIVES = {
    "t2i": Objective("t2i", "unet", ("vae", "text_encoder"), _latents, _t2i),
    "inpaint": Objective("inpaint", "unet", ("vae", "text_encoder"), _inpainting_inputs, _inpaint),
    "control": Objective(
        "control", "controlnet", ("unet", "vae", "text_encoder"), _latents, _control
    ),
    "vae": Objective("vae", "vae", (), None, _vae),
}
