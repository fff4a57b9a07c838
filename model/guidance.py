"""Classifier-free guidance with dynamic condition adaptation (DCA), as one model-function wrapper.

    out = out(null) + s * (out(text, L) - out(null)),   null = (empty-prompt embedding, level 0)

Ho & Salimans 2022, "Classifier-free diffusion guidance", Eq. 6, with Text2Earth's joint condition:
text and resolution level are dropped together for the null branch (SPEC section 3). Guidance is
linear in the model output, so it holds for eps, v and x0 prediction alike. A negative prompt is its
embedding passed as null_context. Optional refinements:
- level_scale: the level guided on its own (Brooks et al. 2023, "InstructPix2Pix", Eq. 3: one scale
  per condition), from a third branch with the text but no level, which DCA training provides by
  dropping the two independently:
      out = out(null) + s * (out(text, 0) - out(null)) + s_L * (out(text, L) - out(text, 0));
  s_L = s is the joint formula above.
- interval: guide only for timesteps in [lo, hi] (Kynkaanniemi et al. 2024, "Applying guidance in a
  limited interval improves sample and distribution quality", Sec. 3); outside it only the
  conditional branch runs, so the null forward pass is skipped.
- rescale: phi of Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
  Eq. 15-16, which rescales the guided output to the conditional output's standard deviation.
"""
import torch


def _batch(v, B, name):
    """Broadcast a per-sample condition (a tensor with batch 1 or B, or a number) to batch B."""
    v = torch.as_tensor(v)
    if v.ndim == 0:
        return v.expand(B)
    if v.shape[0] not in (1, B):
        raise ValueError(f"{name} has batch {v.shape[0]}, expected 1 or {B}")
    return v.expand(B, *v.shape[1:])


def rescale_guidance(guided, cond, phi):
    """Lin et al. 2024, Eq. 15-16: x_rescaled = x_cfg * std(x_pos) / std(x_cfg) (per sample), then
    x_final = phi * x_rescaled + (1 - phi) * x_cfg. guided, cond (B, C, H, W)."""
    dims = tuple(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)                                  # B, 1, 1, 1
    std_cfg = guided.std(dim=dims, keepdim=True)
    return phi * guided * (std_cond / std_cfg) + (1 - phi) * guided


def cfg_model_fn(unet, context, level, null_context, null_level, scale, *, level_scale=None, interval=None,
                 rescale=0.0):
    """Wrap unet(x, t, context, level) into the model_fn(x, t) the samplers call.

    context (B, L, D) or (1, L, D); level (B,), (1,) or a number (0 = no resolution; None if the
    U-Net has no level embedding, then null_level must be None too); null_context like context
    (the empty-prompt, or a negative-prompt, embedding); null_level usually 0; scale s (1 = no
    guidance, one forward pass); level_scale s_L (None: the level is guided jointly with the text,
    with s; else its own scale, one more branch); interval (lo, hi) in timesteps, guidance where
    lo <= t <= hi; rescale phi in [0, 1]. All branches run as one forward of batch 2B (3B with s_L).
    """
    if scale < 0 or (level_scale is not None and level_scale < 0):
        raise ValueError(f"guidance scales must be >= 0, got scale={scale}, level_scale={level_scale}")
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale phi must lie in [0, 1], got {rescale}")
    if interval is not None and (len(interval) != 2 or interval[0] > interval[1]):
        raise ValueError(f"guidance interval must be (lo, hi) with lo <= hi, got {interval!r}")
    if (level is None) != (null_level is None):
        raise ValueError("level and null_level must both be given or both be None")
    if level is None and level_scale is not None:
        raise ValueError("level_scale needs a U-Net with a level embedding (level is None)")
    if context.ndim != 3 or null_context.ndim != 3 or context.shape[1:] != null_context.shape[1:]:
        raise ValueError(f"context {tuple(context.shape)} and null_context {tuple(null_context.shape)} "
                         "must both be (B, L, D) with the same L and D")
    separate = level_scale is not None and level_scale != scale

    def model_fn(x, t):
        B = x.shape[0]                                                           # x: B, C, H, W; t: B
        t = _batch(t, B, "t").to(x.device)
        c = _batch(context, B, "context")                                        # B, L, D
        lv = None if level is None else _batch(level, B, "level").to(x.device, torch.float32)
        if scale == 1 and not separate:
            return unet(x, t, c, lv)
        guide = torch.ones(B, dtype=torch.bool, device=x.device)
        if interval is not None:
            guide = (t >= interval[0]) & (t <= interval[1])                     # B
            if not bool(guide.any()):
                return unet(x, t, c, lv)                                         # skip the null forward
        nc = _batch(null_context, B, "null_context").to(c)
        nlv = None if lv is None else _batch(null_level, B, "null_level").to(x.device, torch.float32)
        if separate:                                                             # (text, L), (text, 0), null
            out = unet(torch.cat([x, x, x]), torch.cat([t, t, t]), torch.cat([c, c, nc]), torch.cat([lv, nlv, nlv]))
            cond, text, null = out.chunk(3)                                      # each B, C, H, W
            guided = null + scale * (text - null) + level_scale * (cond - text)  # Brooks et al. 2023, Eq. 3
        else:
            out = unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([c, nc]),
                       None if lv is None else torch.cat([lv, nlv]))             # 2B, C, H, W
            cond, null = out.chunk(2)
            guided = null + scale * (cond - null)                                # Ho & Salimans 2022, Eq. 6
        if rescale > 0:
            guided = rescale_guidance(guided, cond, rescale)
        if not bool(guide.all()):                                                # mixed batch: per-sample choice
            guided = torch.where(guide.reshape(-1, *([1] * (x.ndim - 1))), guided, cond)
        return guided

    return model_fn
