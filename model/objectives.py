"""Training objectives: one function per kind of training, each the loss of one micro-batch.

    t2i_loss      Text2Earth's diffusion loss with DCA condition dropout (text-to-image; the U-Net)
    inpaint_loss  the same for the inpainting U-Net,
                  which also reads a mask and the masked image's latent
    control_loss  the same through a frozen U-Net with a trainable ControlNet reading the
                  batch's control images
    vae_loss      the KL-VAE's reconstruction + KL loss

Every random draw comes from `generator` and is made for the global micro-batch of `global_batch`
samples, of which `idx` are this process's positions: one process with batch 2B draws exactly what
two processes with B draw, and a resumed run the same as one that never stopped. Shapes: B batch, C
channels, H, W spatial.
"""

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from model import conditions
from model.masks import random_masks


def t2i_loss(  # noqa: PLR0913 (keyword-only options of the training loss)
    model,
    unet,
    batch,
    *,
    diffusion,
    generator,
    idx,
    global_batch,
    autocast,
    train_text=False,
    timestep_power=1.0,
    min_snr_gamma=0.0,
    inpaint=False,
    controlnet=None,
):
    """DCA diffusion loss of one micro-batch: drop each condition to its null
    (model.cfg.conditions), encode the images (or take the batch's pre-encoded latents), noise,
    predict with `unet` (model.unet, or its DDP wrapper). inpaint: the U-Net also reads
    [mask, masked-image latent] beside x_t (inpaint_loss); controlnet: its residuals for the batch's
    "control" images go into the U-Net (control_loss). Returns (mean loss, {"mse": float})."""
    g, GB = generator, global_batch
    device = next(model.unet.parameters()).device
    idx = idx[: len(batch["caption"])]
    cond = conditions.drop(model.cfg, conditions.from_batch(model.cfg, batch), g, idx, GB)
    t = diffusion.sample_timesteps(GB, g, power=timestep_power)[idx]
    with torch.no_grad():
        if "latent" in batch:
            x0 = batch["latent"].to(device).float()  # B, 4, h, w (scaled)
        else:
            post = model.vae.encode(batch["image"].to(device))
            eps_vae = torch.randn((GB, *post.mean.shape[1:]), generator=g)[idx].to(device)
            x0 = (post.mean + post.std * eps_vae) * model.cfg.vae.scaling_factor  # B, 4, h, w
    noise = torch.randn((GB, *x0.shape[1:]), generator=g)[idx].to(device)
    extra = masked_inputs(model, batch["image"].to(device), g, idx, GB) if inpaint else None
    control = batch["control"].to(device) if controlnet is not None else None  # B, 3, H, W
    with torch.set_grad_enabled(train_text), autocast:
        encoded = model.encode_conditions(cond, device)  # text: B, 77, D

    def model_fn(x_t, tt):
        with autocast:
            x_in = x_t if extra is None else torch.cat([x_t, extra], dim=1)  # B, 4 (+ 5), h, w
            if control is None:
                return unet(x_in, tt.to(device), encoded).float()
            down, mid = controlnet(x_in, tt.to(device), encoded, control)
            return unet(x_in, tt.to(device), encoded, down, mid).float()

    out = diffusion.training_losses(
        model_fn,
        x0,
        t.to(device),
        noise,
        prediction=model.cfg.diffusion.prediction,
        min_snr_gamma=min_snr_gamma or None,
    )
    return out["loss"].mean(), {"mse": out["mse"].mean().item()}


def inpaint_loss(model, unet, batch, **kw):
    """The inpainting U-Net's loss (Text2Earth-inpainting, SD2's inpainting recipe): t2i_loss with
    the U-Net also given, on its input channels, a random mask (1 = regenerate; model/masks.py) at
    latent size and the latent of the image with the masked pixels set to 0 (image * (mask < 0.5)).
    Needs images in the batch, not pre-encoded latents."""
    if "image" not in batch:
        raise ValueError(
            "the inpainting objective needs images (it encodes the masked image): not latent-only "
            "data"
        )
    return t2i_loss(model, unet, batch, inpaint=True, **kw)


def control_loss(model, controlnet, batch, **kw):
    """The ControlNet's loss (Zhang et al. 2023): t2i_loss through the frozen model.unet, with
    `controlnet` (or its DDP wrapper) reading the batch's "control" images (B, C, H, W) in [-1, 1]
    beside x_t, t and the same DCA-dropped conditions; only the ControlNet learns. The paper drops
    half the prompts so that the control alone is learned too:
    --model.conditions.text.p_drop=0.5."""
    if "control" not in batch:
        raise ValueError(
            "the ControlNet objective needs control images in the batch (a --control_task's data)"
        )
    return t2i_loss(model, model.unet, batch, controlnet=controlnet, **kw)


@torch.no_grad()
def masked_inputs(model, images, generator, idx, global_batch):
    """The inpainting U-Net's extra input channels for images (B, 3, H, W):
    [mask at latent size (1), latent of the masked image (4)] -> (B, 5, h, w). The masks
    (model/masks.py) are drawn for the global batch; only this process's are rendered."""
    f = model.vae.downsample
    masks = random_masks(
        global_batch, images.shape[2], images.shape[3], generator, idx=idx, device=images.device
    )
    # B, 4, h, w
    masked = model.vae.encode(images * (masks < 0.5)).mean * model.cfg.vae.scaling_factor
    return torch.cat([F.interpolate(masks, scale_factor=1 / f, mode="nearest"), masked], dim=1)


def vae_loss(
    vae, batch, *, generator, idx, global_batch, autocast, kl_weight=1e-6, channels_last=False
):
    """L1 reconstruction (summed over pixels) + kl_weight * KL (summed over the latent), both per
    image, normalised by the pixel count so the learning rate does not depend on image size (LDM's
    recipe without the perceptual and adversarial terms, whose weights cannot be downloaded here).
    `vae` may be DDP-wrapped. Returns (mean loss, {"l1": float, "kl": float})."""
    device = next(vae.parameters()).device
    x = batch["image"].to(device)  # B, 3, H, W
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    idx = idx[: x.shape[0]]
    plain = vae.module if isinstance(vae, DDP) else vae
    f = plain.downsample
    eps = torch.randn(
        (global_batch, plain.cfg.latent_channels, x.shape[2] // f, x.shape[3] // f),
        generator=generator,
    )[idx].to(device)
    with autocast:
        recon, post = vae(x, noise=eps)  # through DDP's forward
    rec = (recon.float() - x).abs().flatten(1).mean(1)  # B
    kl = post.kl().float() / x[0].numel()  # B
    return (rec + kl_weight * kl).mean(), {"l1": rec.mean().item(), "kl": kl.mean().item()}


@torch.no_grad()
def latent_scale(vae, batches, n_batches=4):
    """1 / std of the VAE's latents (posterior means) over n_batches of `batches`, as SD chose
    0.18215 for its VAE: the scaling that gives the diffusion unit-variance latents."""
    device = next(vae.parameters()).device
    zs = []
    for _ in range(n_batches):
        batch = next(batches)
        if batch["caption"]:  # a batch whose samples were all unreadable is empty
            zs.append(vae.encode(batch["image"].to(device)).mean.flatten())
    return float(1.0 / torch.cat(zs).std())
