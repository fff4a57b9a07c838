"""Editing measured against the truth: cloud removal, dehazing and super-resolution of procedural
Earth frames whose clean render is known, and inpainting part of a scene as another class,
each beside its baselines.

    fr = frames(96, seed=0)  # truth, cloud + cloud_mask, haze, caption, level, label
    results = run_all(model, probe, fr, steps=20, guidance=GUIDANCE)  # {task: {row: figures}}
    print(markdown(results))

The pairs (data/synthetic/sensors.py renders every view pixel-aligned with the clean one):
    cloud    input the cloudy view, its true mask cloud_alpha > 1/2; inpainted where
             editing.cloud_mask (estimated) or the true mask says, against the cloudy input and a
             mean-colour fill of the same mask
    haze     input the hazy view (I = J t + A (1 - t)); img2img at PRESETS["dehaze"], against the
             hazy input and the dark channel prior (He et al. 2009)
    sr       input the truth area-averaged 2x or 4x (the same ground at a level 1 or 2 coarser);
             super_resolve to 32 px at the truth's level, against bicubic upsampling
    forest   scenes of the 11 other classes with a large region inpainted under a forest caption:
             how often the probe reads the whole image as forest (chance 1/12)
Every edit is prompted with the clean frame's caption at its level (forest: a forest frame's caption
at that level). Row figures, means over the images: PSNR (dB) and SSIM (Wang et al. 2004) against
the truth; hf, the energy above half the Nyquist frequency over the truth's (1 = as much fine
detail, < 1 blurrier); what the conditioning probe (evaluation/probe.py) reads off the whole image:
class kept (its class is the truth's label) and the mean level. Metrics take images in [0, 1]
(to_unit); the editing library's images are in [-1, 1].

Real pairs (data/pairs.py: Sen2-MTC, or cloudy/ + clear/ folders) are scored by `score_pairs`: each
output against its pair's clear image, beside the cloudy input itself (the do-nothing baseline), in
PSNR, SSIM and, given a network (evaluation/lpips.py), LPIPS:
    rows = score_pairs(CloudPairs(root), {name: [output files]}, lpips=load_lpips(...))
    print(scores_table({"outputs": mean_scores(rows["outputs"]), ...}, lpips_net="alex"))
"""

import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from data.pairs import read_image
from data.synthetic import CLASSES, make_scene, modalities, sample
from model import conditions
from model.editing import PRESETS, cloud_mask, encode, img2img, inpaint, super_resolve, upsample
from model.pipeline import decode

GUIDANCE = {"text": 3.0, "level": 6.0}  # the demo's (demo.DemoConfig cfg / level_cfg)
FOREST = CLASSES.index("forest")
STRENGTHS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)  # the img2img strengths sweep tries


# ----------------------------------------------------------------------------------------------
# Metrics: images (B, C, H, W) in [0, 1] -> one figure per image (B,)
# ----------------------------------------------------------------------------------------------


def to_unit(x):
    """Images in [-1, 1] -> [0, 1], float32."""
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(a, b):
    """Peak signal-to-noise ratio in dB, 10 log10(1 / MSE), per image; equal images give 120 dB."""
    mse = (a.double() - b.double()).square().flatten(1).mean(1)
    return (10 * torch.log10(1 / mse.clamp_min(1e-12))).float()


SSIM_WINDOW, SSIM_SIGMA, SSIM_K = 11, 1.5, (0.01, 0.03)


def ssim(a, b):
    """Structural similarity, Wang et al. 2004 ("Image quality assessment: from error visibility to
    structural similarity", IEEE TIP), Eq. 13 with the paper's settings: local means, variances and
    covariance under an 11x11 Gaussian window (sigma 1.5) wherever the window fits (the authors'
    code: filter2 'valid'), C1 = (0.01 L)^2, C2 = (0.03 L)^2, L = 1. The mean of the SSIM map per
    channel, then over the channels."""
    C = a.shape[1]
    g = torch.exp(
        -0.5
        * ((torch.arange(SSIM_WINDOW, dtype=torch.float64) - SSIM_WINDOW // 2) / SSIM_SIGMA) ** 2
    )
    g = g / g.sum()
    w = (g[:, None] * g[None, :]).expand(C, 1, SSIM_WINDOW, SSIM_WINDOW)  # C, 1, 11, 11
    a, b = a.double(), b.double()

    def mean(x):
        return F.conv2d(x, w, groups=C)  # B, C, H - 10, W - 10

    mu_a, mu_b = mean(a), mean(b)
    var_a, var_b = mean(a * a) - mu_a**2, mean(b * b) - mu_b**2
    cov = mean(a * b) - mu_a * mu_b
    c1, c2 = SSIM_K[0] ** 2, SSIM_K[1] ** 2
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean((2, 3)).mean(1).float()


HF_CUTOFF = 0.25  # cycles per pixel: half the Nyquist frequency (0.5)


def hf_energy(x):
    """Energy above half the Nyquist frequency per image: the sum of |FFT|^2 over the frequencies of
    radius > HF_CUTOFF cycles per pixel, all channels, per pixel. The image is first mirrored into a
    2H x 2W periodic one (the even extension the DCT assumes), so its borders add no false edges."""
    x = torch.cat([x, x.flip(-1)], -1).double()
    x = torch.cat([x, x.flip(-2)], -2)  # B, C, 2H, 2W
    H, W = x.shape[-2:]
    radius = (
        torch.fft.fftfreq(H, dtype=torch.float64)[:, None] ** 2
        + torch.fft.fftfreq(W, dtype=torch.float64)[None] ** 2
    ).sqrt()
    power = torch.fft.fft2(x).abs().square()  # B, C, 2H, 2W
    return ((power * (radius > HF_CUTOFF)).sum((1, 2, 3)) / (H * W) ** 2).float()


def dark_channel_dehaze(x, patch=3, omega=0.95, t0=0.1, top=0.01):
    """He et al. 2009, "Single image haze removal using dark channel prior" (CVPR), without the soft
    matting: dark channel = min over channels and a patch (Eq. 5); airlight A = the brightest input
    pixel among the `top` share with the brightest dark channel (Sec. 4.4); t = 1 - omega
    dark(I / A) (Eq. 12); J = (I - A) / max(t, t0) + A (Eq. 22). x (B, 3, H, W) in [0, 1]; patch 3
    on 32 px frames (the paper's 15 on ~600 px)."""

    def dark(y):
        return -F.max_pool2d(-y.amin(1, keepdim=True), patch, 1, patch // 2)  # B, 1, H, W

    B = x.shape[0]
    d = dark(x).flatten(1)  # B, HW
    idx = d.topk(max(1, int(top * d.shape[1])), dim=1).indices  # B, k
    cand = x.flatten(2).gather(2, idx[:, None].expand(-1, 3, -1))  # B, 3, k
    A = cand[torch.arange(B), :, cand.sum(1).argmax(1)][:, :, None, None]  # B, 3, 1, 1
    t = (1 - omega * dark(x / A.clamp_min(1e-3))).clamp_min(t0)
    return ((x - A) / t + A).clamp(0, 1)


def mean_fill(image, mask):
    """The masked pixels (mask 1) of images (B, 3, H, W) set to the mean
    colour of the unmasked ones."""
    keep = 1 - mask
    colour = (image * keep).sum((2, 3), keepdim=True) / keep.sum((2, 3), keepdim=True).clamp_min(1)
    return image * keep + colour * mask


def area_downsample(image, scale):
    """Area averaging by an integer scale: the same ground at a level log2(scale) coarser."""
    return F.avg_pool2d(image, scale)


# ----------------------------------------------------------------------------------------------
# The frames: every view of each, pixel-aligned with the clean render
# ----------------------------------------------------------------------------------------------


def _image(u8):
    return torch.from_numpy(np.ascontiguousarray(u8)).permute(2, 0, 1).float() / 127.5 - 1.0


def frames(n, seed=0, size=32, levels=(10, 18)):
    """n frames in blocks of 12, one of each class (i % 12); block b at integer level lo + 4 b % 9
    (10, 14, 18, 13, ...: the first blocks already spread over the range, every 108 frames hold each
    pair once); each scene seeded from (seed, i). Returns truth, cloud, haze (N, 3, H, W) in
    [-1, 1], cloud_mask (N, 1, H, W) of 0 and 1, caption (N captions of the clean frame),
    forest_caption (a forest frame's caption at the same level), level, label (N,)."""
    lo, hi = levels
    span = hi - lo + 1
    # 4 for 9 levels
    stride = next(k for k in range(max(1, span // 2), span + 1) if math.gcd(k, span) == 1)
    out = {
        k: []
        for k in (
            "truth",
            "cloud",
            "haze",
            "cloud_mask",
            "caption",
            "forest_caption",
            "level",
            "label",
        )
    }
    for i in range(n):
        rng = np.random.default_rng([int(seed), i, 11])
        scene_seed, forest_seed = (int(s) for s in rng.integers(1 << 62, size=2))
        cls, level = i % len(CLASSES), float(lo + (i // len(CLASSES)) * stride % span)
        s = sample(scene_seed, level, size, cls=cls)
        views = modalities(make_scene(scene_seed, cls), level, size, seed=scene_seed)
        out["truth"].append(_image(s["image"]))
        out["cloud"].append(_image(views["cloud"]))
        out["haze"].append(_image(views["haze"]))
        out["cloud_mask"].append(torch.from_numpy(views["cloud_mask"]).float()[None])
        out["caption"].append(s["caption"])
        out["forest_caption"].append(sample(forest_seed, level, size, cls=FOREST)["caption"])
        out["level"].append(level)
        out["label"].append(s["label"])
    for k in ("truth", "cloud", "haze", "cloud_mask"):
        out[k] = torch.stack(out[k])
    out["level"], out["label"] = torch.tensor(out["level"]), torch.tensor(out["label"])
    return out


# ----------------------------------------------------------------------------------------------
# Running the edits and scoring them
# ----------------------------------------------------------------------------------------------


def figures(probe, out, truth, labels):
    """A row's figures for outputs (B, 3, H, W) in [-1, 1] against the truth: psnr (mean, and its
    standard error psnr_se), ssim, hf (mean energy over the truth's), class_kept
    (share), level_read (mean)."""
    a, b = to_unit(out), to_unit(truth)
    p = psnr(a, b)
    cls, lev = probe.predict(out)
    return dict(
        psnr=p.mean().item(),
        psnr_se=(p.std() / math.sqrt(len(p))).item() if len(p) > 1 else 0.0,
        ssim=ssim(a, b).mean().item(),
        hf=(hf_energy(a).mean() / hf_energy(b).mean()).item(),
        class_kept=(cls == labels).float().mean().item(),
        level_read=lev.float().mean().item(),
    )


def _seeds(fr, seed):
    n = len(fr["label"])
    return list(range(seed * n, (seed + 1) * n))


def _batched(model, edit, fr, seed, batch, *images, text="caption"):
    """edit(cond, seeds, *images) over the frames in batches of `batch`, prompted with
    fr[text] at fr's levels."""
    seeds = _seeds(fr, seed)
    outs = []
    for i in range(0, len(seeds), batch):
        cut = slice(i, i + batch)
        cond = conditions.request(
            model.cfg, len(seeds[cut]), text=fr[text][cut], level=fr["level"][cut]
        )
        outs.append(edit(cond, seeds[cut], *(x[cut] for x in images)))
    return torch.cat(outs)


@torch.no_grad()
def run_reference(model, probe, fr):
    """The truth as rendered and through the VAE (encode, decode): the most any
    latent edit can reach."""
    through = decode(model, encode(model, fr["truth"]))
    return {
        "truth": figures(probe, fr["truth"], fr["truth"], fr["label"]),
        "truth through the VAE": figures(probe, through, fr["truth"], fr["label"]),
    }


def run_cloud(model, probe, fr, *, true_mask=True, seed=0, batch=108, **sampling):
    """Cloud removal by inpainting the estimated (editing.cloud_mask) and, with true_mask, the true
    cloud mask, against the cloudy input and a mean-colour fill of the same mask. Returns (rows, the
    estimated mask's cover, precision and recall)."""
    est, true = cloud_mask(fr["cloud"]), fr["cloud_mask"]

    def fill(cond, seeds, image, mask):
        return inpaint(model, cond, image, mask, seeds=seeds, **sampling)

    outs = {
        "cloudy input": fr["cloud"],
        "mean-colour fill, estimated mask": mean_fill(fr["cloud"], est),
        "inpainting, estimated mask": _batched(model, fill, fr, seed, batch, fr["cloud"], est),
    }
    if true_mask:
        outs["mean-colour fill, true mask"] = mean_fill(fr["cloud"], true)
        outs["inpainting, true mask"] = _batched(model, fill, fr, seed, batch, fr["cloud"], true)
    mask = dict(
        cover_true=true.mean().item(),
        cover_estimated=est.mean().item(),
        cover_clear=cloud_mask(fr["truth"]).mean().item(),  # marked on the cloud-free frames
        precision=((est * true).sum() / est.sum().clamp_min(1)).item(),
        recall=((est * true).sum() / true.sum().clamp_min(1)).item(),
    )
    return {k: figures(probe, v, fr["truth"], fr["label"]) for k, v in outs.items()}, mask


def _dehazed(model, fr, strength, seed, batch, sampling):
    def edit(cond, seeds, image):
        return img2img(model, cond, image, strength, seeds=seeds, **sampling)

    return _batched(model, edit, fr, seed, batch, fr["haze"])


def _super_resolved(model, fr, scale, strength, seed, batch, sampling):
    def edit(cond, seeds, image):
        return super_resolve(model, cond, image, scale, seeds=seeds, strength=strength, **sampling)

    return _batched(model, edit, fr, seed, batch, area_downsample(fr["truth"], scale))


CAPTION_ALONE = "caption alone (img2img strength 1)"


def run_haze(
    model,
    probe,
    fr,
    *,
    strength=PRESETS["dehaze"]["strength"],
    caption_alone=True,
    seed=0,
    batch=108,
    **sampling,
):
    """Dehazing by img2img at `strength` under the clean caption, against the hazy input and the
    dark channel prior; caption_alone adds strength 1, a sample of the caption that keeps next
    to nothing of the input."""
    outs = {
        "hazy input": fr["haze"],
        "dark channel prior": dark_channel_dehaze(to_unit(fr["haze"])) * 2 - 1,
        f"img2img, strength {strength:g}": _dehazed(model, fr, strength, seed, batch, sampling),
    }
    if caption_alone:
        outs[CAPTION_ALONE] = _dehazed(model, fr, 1.0, seed, batch, sampling)
    return {k: figures(probe, v, fr["truth"], fr["label"]) for k, v in outs.items()}


def _gain(probe, a, b):
    """The mean over the images of the level read on a minus that on b, and its
    standard error (paired)."""
    d = (probe.predict(a)[1] - probe.predict(b)[1]).float()
    return dict(
        mean=d.mean().item(), se=(d.std() / math.sqrt(len(d))).item() if len(d) > 1 else 0.0
    )


def run_sr(
    model,
    probe,
    fr,
    scale,
    *,
    strength=PRESETS["sr"]["strength"],
    coarse_ask=True,
    seed=0,
    batch=108,
    **sampling,
):
    """Super-resolution x`scale` of the area-averaged truth back to its size and level, against
    bicubic and bicubic through the VAE (super_resolve's limit at strength 0). coarse_ask adds the
    same edit asked at the input's coarser level (the level condition's own effect). Returns
    (rows, gains): gains holds the paired level differences (_gain) of the SR output over the
    bicubic input, over its VAE round trip, and over the coarse ask."""
    bicubic = upsample(area_downsample(fr["truth"], scale), scale)
    sr = _super_resolved(model, fr, scale, strength, seed, batch, sampling)
    with torch.no_grad():
        through = decode(model, encode(model, bicubic))
    outs = {
        f"bicubic x{scale}": bicubic,
        f"bicubic x{scale} through the VAE": through,
        f"super_resolve x{scale}, strength {strength:g}": sr,
    }
    gains = {
        "bicubic": _gain(probe, sr, bicubic),
        "bicubic through the VAE": _gain(probe, sr, through),
    }
    if coarse_ask:
        coarse = {**fr, "level": fr["level"] - math.log2(scale)}
        low = _super_resolved(model, coarse, scale, strength, seed, batch, sampling)
        outs[f"super_resolve x{scale}, asked at the input's level"] = low
        gains["asked at the input's level"] = _gain(probe, sr, low)
    return {k: figures(probe, v, fr["truth"], fr["label"]) for k, v in outs.items()}, gains


def centre_mask(n, size, border):
    """(n, 1, size, size): 1 inside the centre square that leaves `border` pixels on every side."""
    m = torch.zeros(n, 1, size, size)
    m[:, :, border : size - border, border : size - border] = 1
    return m


def left_mask(n, size, share=0.75):
    """(n, 1, size, size): 1 on the left `share` of the columns."""
    m = torch.zeros(n, 1, size, size)
    m[..., : round(share * size)] = 1
    return m


REGIONS = ("centre 24x24", "left 3/4")  # of a 32 px frame: 56% and 75% of it


def run_forest(
    model, probe, fr, *, regions=REGIONS, own_caption=True, seed=0, batch=108, **sampling
):
    """Scenes of the other 11 classes, a large region (REGIONS) inpainted under a forest frame's
    caption and, with own_caption, as a control, under their own caption: the share the probe reads
    as forest and as their own class, whole image."""
    other = fr["label"] != FOREST
    sub = {
        k: v[other] if torch.is_tensor(v) else [x for x, o in zip(v, other.tolist()) if o]
        for k, v in fr.items()
    }
    n, size = len(sub["label"]), sub["truth"].shape[-1]
    masks = {"centre 24x24": centre_mask(n, size, size // 8), "left 3/4": left_mask(n, size)}

    def fill(cond, seeds, image, mask):
        return inpaint(model, cond, image, mask, seeds=seeds, **sampling)

    outs = {"as rendered": sub["truth"]}
    for name in regions:
        if own_caption:
            outs[f"{name}, own caption"] = _batched(
                model, fill, sub, seed, batch, sub["truth"], masks[name]
            )
        outs[f"{name}, forest caption"] = _batched(
            model, fill, sub, seed, batch, sub["truth"], masks[name], text="forest_caption"
        )
    rows = {}
    for k, v in outs.items():
        cls, _ = probe.predict(v)
        rows[k] = dict(
            forest=(cls == FOREST).float().mean().item(),
            own_class=(cls == sub["label"]).float().mean().item(),
            n=n,
        )
    return rows


def run_all(model, probe, fr, *, seed=0, batch=108, strengths=None, log=None, **sampling):
    """Every task on the frames: {"reference", "cloud", "cloud_mask", "haze", "sr2", "sr4",
    "forest", "seconds"}; strengths: {"dehaze": s, "sr": s} replacing PRESETS' for the img2img
    tasks; log(task, seconds) after each."""
    s = {
        "dehaze": PRESETS["dehaze"]["strength"],
        "sr": PRESETS["sr"]["strength"],
        **(strengths or {}),
    }
    kw = dict(seed=seed, batch=batch, **sampling)
    tasks = {
        "reference": lambda: run_reference(model, probe, fr),
        "cloud": lambda: run_cloud(model, probe, fr, **kw),
        "haze": lambda: run_haze(model, probe, fr, strength=s["dehaze"], **kw),
        "sr2": lambda: run_sr(model, probe, fr, 2, strength=s["sr"], **kw),
        "sr4": lambda: run_sr(model, probe, fr, 4, strength=s["sr"], **kw),
        "forest": lambda: run_forest(model, probe, fr, **kw),
    }
    out = {"seconds": {}}
    for name, task in tasks.items():
        t0 = time.perf_counter()
        out[name] = task()
        out["seconds"][name] = time.perf_counter() - t0
        if log is not None:
            log(name, out["seconds"][name])
    out["cloud"], out["cloud_mask"] = out["cloud"]
    (out["sr2"], out["sr2_gains"]), (out["sr4"], out["sr4_gains"]) = out["sr2"], out["sr4"]
    return out


def sweep(model, probe, fr, strengths=STRENGTHS, *, seed=0, batch=108, **sampling):
    """The img2img tasks at each strength: {"dehaze" | "sr2" | "sr4": {strength: figures}}."""
    out = {"dehaze": {}, "sr2": {}, "sr4": {}}
    for s in strengths:
        out["dehaze"][s] = figures(
            probe, _dehazed(model, fr, s, seed, batch, sampling), fr["truth"], fr["label"]
        )
        for scale in (2, 4):
            sr = _super_resolved(model, fr, scale, s, seed, batch, sampling)
            out[f"sr{scale}"][s] = figures(probe, sr, fr["truth"], fr["label"])
    return out


def best_strengths(swept, truth_level):
    """Dehazing: the strength of the highest PSNR. Super-resolution (x2 and x4 together): the
    strength whose mean level read lies closest to the truth's (`truth_level`, the probe's mean on
    the truth), summed over both scales: the finer level is what SR is asked for, and PSNR favours
    the least change (bicubic)."""
    dehaze = max(swept["dehaze"], key=lambda s: swept["dehaze"][s]["psnr"])
    sr = min(
        swept["sr2"],
        key=lambda s: sum(abs(swept[k][s]["level_read"] - truth_level) for k in ("sr2", "sr4")),
    )
    return {"dehaze": dehaze, "sr": sr}


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

_HEAD = (
    "| {} | PSNR dB | SSIM | HF / truth | class kept | level read |\n|---|---|---|---|---|---|\n"
)


def _row(name, f):
    return (
        f"| {name} | {f['psnr']:.2f} ± {f['psnr_se']:.2f} | {f['ssim']:.3f} | {f['hf']:.2f} | "
        f"{f['class_kept']:.1%} | {f['level_read']:.2f} |\n"
    )


def table(rows, first="method"):
    """A markdown table of {row name: figures}."""
    return _HEAD.format(first) + "".join(_row(k, f) for k, f in rows.items())


def markdown(results, fr):
    """The tables of run_all's results, each with what it measures."""
    n, asked = len(fr["label"]), fr["level"].mean().item()
    ref, m = results["reference"], results["cloud_mask"]
    truth = ref["truth"]
    ref = {k: v for k, v in ref.items() if k != "truth"}
    forest = results["forest"]
    lines = [
        f"{n} frames, 32 px, 12 classes x levels 10-18 (mean level {asked:.2f}); the probe reads "
        f"the truth's class {truth['class_kept']:.1%} of the time and its level at "
        f"{truth['level_read']:.2f} on average.",
        "",
        "### Reference",
        "",
        table(ref, "images"),
        "### Cloud removal",
        "",
        f"Cloud cover {m['cover_true']:.1%} (true mask, alpha > 1/2); the estimated mask covers "
        f"{m['cover_estimated']:.1%}, precision {m['precision']:.1%}, recall {m['recall']:.1%}; on "
        f"the same frames without cloud it marks {m['cover_clear']:.1%} (white roofs, tanks, surf, "
        "runways).",
        "",
        table(results["cloud"]),
        "### Dehazing (prompt: the clean caption)",
        "",
        table(results["haze"]),
        "### Super-resolution (asked at the truth's level, input 1 or 2 levels coarser)",
        "",
        table({**results["sr2"], **results["sr4"]}),
        _gains(results),
        f"### Inpainting as forest ({next(iter(forest.values()))['n']} frames of the 11 other "
        "classes; chance 1/12)",
        "",
        "| region, prompt | read as forest | read as own class |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {f['forest']:.1%} | {f['own_class']:.1%} |" for k, f in forest.items()]
    return "\n".join(lines) + "\n"


def _gains(results):
    lines = ["| level read on the SR output minus on | x2 | x4 |", "|---|---|---|"]
    for k in results["sr2_gains"]:
        g2, g4 = results["sr2_gains"][k], results["sr4_gains"][k]
        lines.append(
            f"| {k} | {g2['mean']:+.2f} ± {g2['se']:.2f} | {g4['mean']:+.2f} ± {g4['se']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def sweep_markdown(swept):
    """One table per img2img task, a row per strength."""
    out = []
    for task, rows in swept.items():
        out += [f"### {task}", "", table({f"{s:g}": f for s, f in rows.items()}, "strength")]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------
# Real pairs: outputs scored against the clear image
# ----------------------------------------------------------------------------------------------


def pair_scores(image, truth, lpips=None):
    """One image (3, H, W) in [-1, 1] against its truth: {"psnr" (dB, 120 for equal images),
    "ssim", "lpips" (None without a network)}."""
    a, b = to_unit(image)[None], to_unit(truth)[None]
    scores = {"psnr": psnr(a, b).item(), "ssim": ssim(a, b).item(), "lpips": None}
    if lpips is not None:
        device = next(lpips.parameters()).device
        with torch.no_grad():
            scores["lpips"] = lpips(a.to(device), b.to(device)).item()
    return scores


def score_pairs(pairs, outputs, lpips=None):
    """Every output file against its pair's clear image, and each pair's first cloudy acquisition
    (what was declouded) as the do-nothing baseline. pairs: a data.pairs.CloudPairs; outputs:
    {pair name: [files]} (read as the pairs' images are). Returns {"outputs": rows, "cloudy input":
    rows}, a row {"name", "file", "psnr", "ssim", "lpips"}. An output of another size than its
    clear image is a ValueError naming both."""
    rows = {"outputs": [], "cloudy input": []}
    for i, pair in enumerate(pairs.pairs):
        cloudy, clear, name = pairs[i]
        rows["cloudy input"].append(
            {"name": name, "file": str(pair.cloudy[0]), **pair_scores(cloudy[0], clear, lpips)}
        )
        for path in outputs[name]:
            image = read_image(path, pairs.full_scale)
            if image.shape != clear.shape:
                raise ValueError(
                    f"{path} is {image.shape[2]}x{image.shape[1]} and its clear image "
                    f"{pair.clear} {clear.shape[2]}x{clear.shape[1]}"
                )
            rows["outputs"].append(
                {"name": name, "file": str(path), **pair_scores(image, clear, lpips)}
            )
    return rows


def mean_scores(rows):
    """The means of score rows: {"n", "psnr", "psnr_se" (its standard error), "ssim", "lpips"
    (None when not measured)}."""
    p = torch.tensor([r["psnr"] for r in rows], dtype=torch.float64)
    lp = [r["lpips"] for r in rows]
    return {
        "n": len(rows),
        "psnr": p.mean().item(),
        "psnr_se": (p.std() / math.sqrt(len(p))).item() if len(p) > 1 else 0.0,
        "ssim": sum(r["ssim"] for r in rows) / len(rows),
        "lpips": None if None in lp else sum(lp) / len(lp),
    }


def scores_table(means, lpips_net=None):
    """A markdown table of {row name: mean_scores}; LPIPS "not measured" without a network."""
    head = f"LPIPS ({lpips_net})" if lpips_net else "LPIPS"
    lines = [f"| images | n | PSNR dB | SSIM | {head} |", "|---|---|---|---|---|"]
    for name, m in means.items():
        lp = "not measured" if m["lpips"] is None else f"{m['lpips']:.4f}"
        lines.append(
            f"| {name} | {m['n']} | {m['psnr']:.2f} ± {m['psnr_se']:.2f} | {m['ssim']:.4f} | {lp} |"
        )
    return "\n".join(lines) + "\n"
