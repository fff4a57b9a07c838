"""Classifier-free guidance with dynamic condition adaptation (DCA), one scale per condition,
as a model wrapper.

Conditions are added one group at a time, in the model's order (text, then level, ...);
consecutive conditions with the same scale form one group. With groups c_1 .. c_G, scales
s_1 .. s_G and branches
    b_0 = out(all null),  b_k = out(c_1 .. c_k given, the rest null),
the guided output is
    out = b_0 + sum_k s_k (b_k - b_{k-1})
(Brooks et al. 2023, "InstructPix2Pix", Eq. 3: one scale per condition, which DCA training provides
by dropping each condition independently). One group is Ho & Salimans 2022,
"Classifier-free diffusion guidance", Eq. 6, with Text2Earth's joint null (empty prompt, level 0):
out = out(null) + s (out(text, L) - out(null)), the release's guidance; {"text": 3, "level": 6}
guides the level on its own with 6. Guidance is linear in the model output, so it holds for eps, v
and x0 prediction alike. A negative prompt is the text's null. Refinements:
- interval: guide only for timesteps in [lo, hi] (Kynkaanniemi et al. 2024, "Applying guidance in a
  limited interval improves sample and distribution quality", Sec. 3); outside it only the
  conditional branch runs, so the other forward passes are skipped.
- a group whose conditions are their nulls in every sample (a location not given) adds nothing,
  and its branch is not run.
- rescale: phi of Lin et al. 2024, "Common diffusion noise schedules and sample steps are flawed",
  Eq. 15-16, which rescales the guided output to the conditional output's standard deviation.
"""

import torch


from model import conditions


def groups(scales):
    """{name: scale} in order -> [(names, scale)],
    consecutive conditions with the same scale merged."""
    out = []
    for name, scale in scales.items():
        if out and out[-1][1] == scale:
            out[-1][0].append(name)
        else:
            out.append(([name], scale))
    return out


def rescale_guidance(guided, cond, phi):
    """Lin et al. 2024, Eq. 15-16: x_rescaled = x_cfg * std(x_pos) / std(x_cfg) (per sample), then
    x_final = phi * x_rescaled + (1 - phi) * x_cfg. guided, cond (B, C, H, W)."""
    dims = tuple(range(1, guided.ndim))
    std_cond = cond.std(dim=dims, keepdim=True)  # B, 1, 1, 1
    std_cfg = guided.std(dim=dims, keepdim=True)
    return phi * guided * (std_cond / std_cfg) + (1 - phi) * guided


def _is_null(value, null):
    """Whether an encoded condition equals its null in every sample (NaN equal to NaN)."""
    value, null = torch.as_tensor(value), torch.as_tensor(null).to(value)
    if value.shape[1:] != null.shape[1:]:
        return False
    same = (value == null) | (value.isnan() & null.isnan())
    return bool(same.all())


def guided_model_fn(denoiser, cond, null, scales, *, interval=None, rescale=0.0):
    """Wrap denoiser(x, t, cond) into the model_fn(x, t) the samplers call.

    cond, null: encoded conditions (model/conditions.py), each entry with batch B or 1 (null: the
    empty-prompt, or a negative-prompt, embedding and level 0); scales: {name: scale} over the
    guided conditions, in the order they are added (conditions not in it are given in every
    branch); all scales 1 = no guidance, one forward pass; interval (lo, hi) in timesteps,
    guidance where lo <= t <= hi; rescale phi in [0, 1]. All branches run as one forward of batch
    (G + 1) B for G groups.
    """
    if any(s < 0 for s in scales.values()):
        raise ValueError(f"guidance scales must be >= 0, got {scales}")
    if not scales:
        raise ValueError("guidance needs a scale for at least one condition")
    unknown = [name for name in scales if name not in cond or name not in null]
    if unknown:
        raise ValueError(
            f"guidance scales for {unknown}: conditions the model does not read (it reads "
            f"{sorted(cond)})"
        )
    if not 0.0 <= rescale <= 1.0:
        raise ValueError(f"guidance rescale phi must lie in [0, 1], got {rescale}")
    if interval is not None and (len(interval) != 2 or interval[0] > interval[1]):
        raise ValueError(f"guidance interval must be (lo, hi) with lo <= hi, got {interval!r}")
    if "text" in cond and (
        cond["text"].ndim != 3
        or null["text"].ndim != 3
        or cond["text"].shape[1:] != null["text"].shape[1:]
    ):
        raise ValueError(
            f"text context {tuple(cond['text'].shape)} and its null {tuple(null['text'].shape)} "
            "must both be (B, L, D) with the same L and D"
        )
    # a group given as its null in every sample adds s_k (b_k - b_{k-1}) = 0: not run, so a
    # condition left out computes exactly what a model without it computes
    steps = [
        (names, s)
        for names, s in groups(scales)
        if not all(_is_null(cond[k], null[k]) for k in names)
    ]
    plain = all(s == 1 for _, s in steps)  # the sum telescopes to b_G

    def model_fn(x, t):
        B = x.shape[0]  # x: B, C, H, W; t: B
        t = conditions.expand({"t": t}, B)["t"].to(x.device)
        c = conditions.expand(cond, B)
        if plain:
            return denoiser(x, t, c)
        guide = torch.ones(B, dtype=torch.bool, device=x.device)
        if interval is not None:
            guide = (t >= interval[0]) & (t <= interval[1])  # B
            if not bool(guide.any()):
                return denoiser(x, t, c)  # skip the other branches
        n = conditions.expand(null, B)
        n = {k: v.to(c[k]) for k, v in n.items()}
        branches, given = [], set()
        for names, _ in [([], None)] + steps:  # b_0 (all null), b_1, .., b_G
            given |= set(names)
            branches.append({k: c[k] if (k in given or k not in scales) else n[k] for k in c})
        G = len(steps)
        out = denoiser(torch.cat([x] * (G + 1)), torch.cat([t] * (G + 1)), conditions.cat(branches))
        b = out.chunk(G + 1)  # each B, C, H, W
        guided = b[0]
        for k, (_, scale) in enumerate(steps, start=1):
            guided = guided + scale * (b[k] - b[k - 1])  # Brooks et al. 2023, Eq. 3
        if rescale > 0:
            guided = rescale_guidance(guided, b[G], rescale)
        if not bool(guide.all()):  # mixed batch: per-sample choice
            guided = torch.where(guide.reshape(-1, *([1] * (x.ndim - 1))), guided, b[G])
        return guided

    return model_fn
