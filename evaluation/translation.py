"""Multi-modal generation against the truth on the procedural Earth, where every frame has
pixel-aligned RGB, PAN, NIR and SAR views (data/synthetic/sensors.py):

- text -> SAR (a LoRA fine-tune): are the generated images SAR-like? A simple statistic, the colour
  spread (chroma: the std over the RGB channels, 0 for a grey image), separates SAR views from RGB
  renders; its threshold is fitted on the VAE's reconstructions of both (what the decoder makes of
  them), then applied to the LoRA's images and the base model's for the same prompts. Does the scene
  class still follow the prompt? A probe (evaluation/probe.py) trained on SAR views
  through the VAE reads the class.
- PAN -> RGB (a ControlNet): the colour error of the output against the true RGB frame, mean |chroma
  vector difference| (rgb minus its luma, 0..255 units), against two baselines: the colourless
  output (the PAN image itself) and the base model without control, from the
  same caption, level and seed.

    # docs/multimodal.md has the commands
    figures, sar_images = sar_figures(base_model, model_with_lora)
    figures, rgb_images = translation_figures(model, controlnet, "pan2rgb")
"""

import torch

from data.modalities import BAND_WEIGHTS, TASKS
from data.synthetic import ProceduralEarth
from evaluation.probe import evaluate_probe, train_probe
from model import conditions
from model.controlnet import Controlled
from model.pipeline import generate

GUIDANCE = {"text": 3.0, "level": 6.0}  # the demo's


def frames(n, pair, size=32, seed=1, levels=(10.0, 18.0), rgb=True):
    """n procedural frames (classes cycling) as one batch: image (the target view), control
    (with a task's pair), rgb (the RGB render of the same frame, unless rgb=False),
    caption, level, label."""
    views = ProceduralEarth(n, size=size, levels=levels, seed=seed, integer_levels=True, pair=pair)
    items = [views[i] for i in range(n)]
    out = {
        "image": torch.stack([it["image"] for it in items]),
        "caption": [it["caption"] for it in items],
        "level": torch.tensor([it["level"] for it in items]),
        "label": torch.tensor([it["label"] for it in items]),
    }
    if rgb:
        plain = ProceduralEarth(n, size=size, levels=levels, seed=seed, integer_levels=True)
        out["rgb"] = torch.stack([plain[i]["image"] for i in range(n)])
    if "control" in items[0]:
        out["control"] = torch.stack([it["control"] for it in items])
    return out


def chroma(images):
    """(N, 3, H, W) in [-1, 1] -> (N,): the mean over pixels of the std over the 3
    channels, in [0, 1] units."""
    return ((images + 1) / 2).std(dim=1, unbiased=False).mean(dim=(1, 2))


def colour_error(images, truth):
    """Mean |chroma(images) - chroma(truth)| over pixels and channels, 0..255 units;
    chroma = rgb - its luma."""
    w = torch.tensor(BAND_WEIGHTS["luma"])[None, :, None, None]
    c = lambda x: (x + 1) * 127.5 - ((x + 1) * 127.5 * w).sum(1, keepdim=True)  # noqa: E731
    return (c(images) - c(truth)).abs().mean().item()


def _generate(model, fr, unet=None, seed=0, batch=48, steps=20):
    n = len(fr["caption"])
    out = []
    for a in range(0, n, batch):
        b = min(n, a + batch)
        cond = conditions.request(model.cfg, b - a, text=fr["caption"][a:b], level=fr["level"][a:b])
        net = unet(a, b) if unet is not None else None
        out.append(
            generate(
                model,
                cond,
                seeds=list(range(seed + a, seed + b)),
                steps=steps,
                guidance=GUIDANCE,
                size=tuple(fr["image"].shape[2:]),
                unet=net,
            )
        )
    return torch.cat(out)


def _accuracy(a, b, thr):
    """The fraction of scores a below `thr` and of b at or above it, averaged over the
    two sets (1/2 is chance)."""
    return ((a < thr).float().mean() + (b >= thr).float().mean()).item() / 2


def _split(a, b):
    """(threshold, accuracy): the midpoint of the medians of scores a (below: class A)
    and b, and its _accuracy."""
    thr = ((a.median() + b.median()) / 2).item()
    return thr, _accuracy(a, b, thr)


def sar_figures(base, tuned, n=48, size=32, seed=1, probe_frames=1080, probe_steps=600, steps=20):
    """text -> SAR: `tuned` is the model with the SAR LoRA merged, `base` without it, prompted with
    the captions of n frames. A SAR view is grey (chroma 0), an RGB render is not; but what the
    model generates passes its VAE's decoder, which tints grey images, so the chroma threshold that
    judges generated images is fitted on the VAE's reconstructions of the n real SAR views and of
    their RGB renders (what the decoder makes of each). Returns the accuracy of a threshold on real
    views (the statistic on the truth), on reconstructions (its ceiling through this VAE), on
    generated images (the LoRA's read as SAR, the base model's as RGB, with the reconstructions'
    threshold), the mean chroma of each set, and the class accuracy (chance 1/12) of a probe trained
    on `probe_frames` SAR views through the VAE (seed + 1) on the reconstructions of the n views
    (its ceiling), on the LoRA's images and on the base model's RGB images."""
    fr = frames(n, "sar", size, seed)
    through = lambda x: base.decode_latents(base.encode_images(x, sample=False))  # noqa: E731
    with torch.no_grad():
        sar, rgb = _generate(tuned, fr, steps=steps), _generate(base, fr, steps=steps)
        recon_sar, recon_rgb = through(fr["image"]), through(fr["rgb"])
    c = {
        k: chroma(v)
        for k, v in dict(
            real_sar=fr["image"],
            real_rgb=fr["rgb"],
            recon_sar=recon_sar,
            recon_rgb=recon_rgb,
            lora=sar,
            base=rgb,
        ).items()
    }
    thr, recon_acc = _split(c["recon_sar"], c["recon_rgb"])
    held = frames(probe_frames, "sar", size, seed + 1, rgb=False)
    with torch.no_grad():
        held["image"] = torch.cat([through(x) for x in held["image"].split(256)])
    probe = train_probe((held["image"], held["label"], held["level"]), steps=probe_steps)
    figures = dict(
        real_accuracy=_split(c["real_sar"], c["real_rgb"])[1],
        recon_accuracy=recon_acc,
        threshold=thr,
        generated_accuracy=_accuracy(c["lora"], c["base"], thr),
        **{f"chroma_{k}": v.mean().item() for k, v in c.items()},
        class_recon_sar=evaluate_probe(probe, recon_sar, fr["label"], fr["level"])["class_acc"],
        class_lora=evaluate_probe(probe, sar, fr["label"], fr["level"])["class_acc"],
        class_base=evaluate_probe(probe, rgb, fr["label"], fr["level"])["class_acc"],
    )
    return figures, sar


def translation_figures(
    model, controlnet, task="pan2rgb", n=48, size=32, seed=1, steps=20, scale=1.0
):
    """PAN -> RGB (or another task to RGB): colour error of the ControlNet's output, of the
    colourless control image itself and of the base model without control (same caption, level,
    seed) against the true RGB frame."""
    fr = frames(n, TASKS[task], size, seed)
    controlled = lambda a, b: Controlled(model.unet, [(controlnet, fr["control"][a:b], scale)])  # noqa: E731
    with torch.no_grad():
        out, plain = (
            _generate(model, fr, controlled, steps=steps),
            _generate(model, fr, steps=steps),
        )
    return dict(
        controlnet=colour_error(out, fr["image"]),
        colourless=colour_error(fr["control"], fr["image"]),
        base=colour_error(plain, fr["image"]),
    ), out
