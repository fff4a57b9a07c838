"""Editing (model/editing.py, edit.py): what stays, what changes, the samplers' editing hooks, canvases, bad input.
Tiny random models: these check the procedures; tests/test_edit_truth.py checks what a trained model reaches."""

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

import edit
from model import editing
from model.config import load_config
from model.diffusion import Diffusion
from model.editing import canvas_tiles, feathered, inpaint, inpaint_latents, renoise
from model.samplers import SAMPLERS, make_timesteps
from model.text2earth import Text2Earth
from model.weights import load_part, save_model

STEPS = dict(steps=3)


def tiny(in_channels=4, seed=0):
    cfg = load_config("configs/tiny.py").model
    cfg.unet.in_channels = in_channels
    torch.manual_seed(seed)
    return Text2Earth(cfg).eval()


@pytest.fixture(scope="module")
def models():
    return {"replace": tiny(), "model": tiny(9)}


def scene(b=2, h=32, w=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = (torch.rand(b, 3, h, w, generator=g) * 255).round() / 127.5 - 1  # as read from a PNG
    mask = torch.zeros(b, 1, h, w)
    mask[:, :, 8:21, 10:29] = 1
    return image, mask


@pytest.mark.parametrize("method", ["replace", "model"])
@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim", "euler"])
def test_unmasked_pixels_are_kept_and_masked_ones_change(models, method, sampler):
    """Outside the feathered band every pixel is the input's (<= 1/255: exactly, up to float arithmetic); inside
    the mask the model's pixels replace them; in the band a blend of both."""
    image, mask = scene()
    out = inpaint(
        models[method],
        {"text": ["a forest", "a lake"], "level": [15.0, 17.0]},
        image,
        mask,
        seeds=[0, 1],
        sampler=sampler,
        feather=3,
        **STEPS,
    )
    band = (feathered(mask, 3) > 0).expand_as(image)
    inside = mask.bool().expand_as(image)
    assert out.shape == image.shape
    assert (out - image).abs()[~band].max() <= 1 / 255
    assert (out - image).abs()[inside].mean() > 0.1
    assert (out - image).abs()[band & ~inside].max() > 0  # the band blends


def test_feathered_band_falls_linearly_outside_the_mask():
    mask = torch.zeros(1, 1, 1, 12)
    mask[..., 5] = 1
    w = feathered(mask.expand(1, 1, 9, 12).clone(), 3)[0, 0, 4]
    assert w.tolist() == pytest.approx([0, 0, 0.25, 0.5, 0.75, 1, 0.75, 0.5, 0.25, 0, 0, 0])


def test_replace_method_keeps_the_known_latents_exactly(models):
    model = models["replace"]
    image, mask = scene(1)
    z = inpaint_latents(model, {"text": ["x"], "level": [15.0]}, image, mask, seeds=[0], **STEPS)
    z0 = editing.encode(model, image)
    keep = 1 - editing.latent_mask(mask, model.vae.downsample, mode="any")
    assert torch.equal((z * keep), (z0 * keep)) and not torch.allclose(
        z * (1 - keep), z0 * (1 - keep)
    )


@pytest.mark.parametrize("sampler", ["ddim", "euler", "dpmpp_2m", "ddpm"])
def test_replace_hook_sees_the_variance_preserving_state_at_its_level(sampler):
    """For data that is one point z0, the exact denoiser predicts z0; from x_T = sqrt(abar_T) z0 + sqrt(1 - abar_T) n
    the deterministic samplers stay on sqrt(abar) z0 + sqrt(1 - abar) n, so every state the hook sees must equal
    that at the abar it is told (Euler included, which runs in its own variable). DDPM adds fresh noise: its
    hook is checked on the clean limit only (abar = 1 at the end gives z0)."""
    g = torch.Generator().manual_seed(0)
    z0, n = torch.randn(2, 4, 6, 6, generator=g), torch.randn(2, 4, 6, 6, generator=g)
    d = Diffusion()
    ac = d.alphas_cumprod
    spacing = "trailing" if sampler == "dpmpp_2m" else "leading"
    skip = 2
    t0 = int(make_timesteps(1000, 10, spacing, 0 if spacing == "trailing" else 1)[skip])

    def model_fn(x, t):  # eps of the point mass at z0
        ab = (
            ac[t.long()].reshape(-1, 1, 1, 1).float()
            if sampler != "euler"
            else torch.from_numpy(np.interp(t.numpy(), np.arange(1000), ac.numpy()))
            .reshape(-1, 1, 1, 1)
            .float()
        )
        return (x - ab.sqrt() * z0) / (1 - ab).sqrt()

    seen = []

    def replace(x, abar):
        seen.append(abar)
        if sampler != "ddpm":
            assert torch.allclose(x, renoise(z0, n, abar), atol=2e-4), (
                abar,
                (x - renoise(z0, n, abar)).abs().max(),
            )
        return x

    x = renoise(z0, n, ac[t0].item())
    out = SAMPLERS[sampler](
        model_fn,
        x,
        d,
        10,
        spacing=spacing,
        steps_offset=0 if spacing == "trailing" else 1,
        skip=skip,
        replace=replace,
        generator=torch.Generator().manual_seed(1),
    )
    assert len(seen) == 10 - skip + 1 and seen[0] == pytest.approx(ac[t0].item(), rel=1e-4)
    assert all(b > a for a, b in zip(seen, seen[1:]))  # ever less noise
    if sampler != "ddim":  # DDIM ends at abar_0 (release)
        assert seen[-1] == 1.0 and torch.allclose(out, z0, atol=2e-4)


def test_repaint_resampling_runs_and_keeps_the_known_region(models):
    image, mask = scene(1)
    out = inpaint(
        models["replace"],
        {"text": ["x"], "level": [15.0]},
        image,
        mask,
        seeds=[0],
        sampler="ddim",
        resample=3,
        **STEPS,
    )
    band = (feathered(mask, 3) > 0).expand_as(image)
    assert (out - image).abs()[~band].max() <= 1 / 255
    with pytest.raises(ValueError, match="sampler 'ddim' or 'ddpm'"):
        inpaint(
            models["replace"],
            {"text": ["x"], "level": [15.0]},
            image,
            mask,
            seeds=[0],
            resample=2,
            **STEPS,
        )


def test_methods_refuse_the_wrong_model(models):
    image, mask = scene(1)
    cond = {"text": ["x"], "level": [15.0]}
    with pytest.raises(ValueError, match="needs a 9-channel inpainting U-Net"):
        inpaint(models["replace"], cond, image, mask, seeds=[0], method="model", **STEPS)
    with pytest.raises(ValueError, match="needs a text-to-image U-Net"):
        inpaint(models["model"], cond, image, mask, seeds=[0], method="replace", **STEPS)
    with pytest.raises(ValueError, match="img2img needs a text-to-image U-Net"):
        editing.img2img(models["model"], cond, image, 0.5, seeds=[0], **STEPS)
    with pytest.raises(ValueError, match="multidiffusion needs a text-to-image U-Net"):
        editing.extend(
            models["model"],
            ["x"],
            (32, 64),
            values={"level": 15},
            tile=32,
            overlap=16,
            method="multidiffusion",
        )


def test_img2img_strength_counts_steps_as_diffusers_does():
    assert editing.strength_skip(20, 1.0) == 0 and editing.strength_skip(20, 0.5) == 10
    assert editing.strength_skip(20, 0.01) == 19  # at least one step runs
    for bad in (0, -0.1, 1.01):
        with pytest.raises(ValueError, match=r"strength must lie in \(0, 1\]"):
            editing.strength_skip(20, bad)


def test_img2img_and_super_resolution_shapes(models):
    image, _ = scene(1, 16, 24)
    cond = {"text": ["x"], "level": [16.0]}
    assert (
        editing.img2img(models["replace"], cond, image, 0.5, seeds=[0], **STEPS).shape
        == image.shape
    )
    assert editing.super_resolve(models["replace"], cond, image, 2, seeds=[0], **STEPS).shape == (
        1,
        3,
        32,
        48,
    )


def test_canvas_tiles_cover_the_canvas_evenly():
    origins, grid = canvas_tiles((1024, 4096), 256, 64, 8)
    assert grid == (5, 21) and len(origins) == 105
    ys, xs = sorted({y for y, _ in origins}), sorted({x for _, x in origins})
    assert ys[0] == 0 and ys[-1] == 1024 - 256 and xs[-1] == 4096 - 256
    assert all(b - a <= 256 - 64 and a % 8 == 0 for a, b in zip(xs, xs[1:]))
    with pytest.raises(ValueError, match="multiples of 8"):
        canvas_tiles((1020, 4096), 256, 64, 8)


@pytest.mark.parametrize(
    "method,channels", [("outpaint", 4), ("outpaint", 9), ("multidiffusion", 4)]
)
def test_extend_builds_a_canvas_with_a_prompt_per_tile(method, channels):
    model = tiny(channels)
    out = editing.extend(
        model,
        ["forest", "lake", "desert"],
        (32, 64),
        values={"level": 15},
        tile=32,
        overlap=16,
        method=method,
        **STEPS,
    )
    assert out.shape == (1, 3, 32, 64) and out.abs().max() <= 1
    with pytest.raises(ValueError, match="give 1 prompt or 3"):
        editing.extend(
            model, ["a", "b"], (32, 64), values={"level": 15}, tile=32, overlap=16, method=method
        )


def test_outpainted_tiles_never_rewrite_what_earlier_tiles_made():
    """Tile 0 of a three-tile row is the same whatever the later tiles are asked for, and they differ."""
    model = tiny()
    kw = dict(values={"level": 15}, tile=32, overlap=16, latents=True, **STEPS)
    a = editing.extend(model, ["forest", "lake", "desert"], (32, 64), **kw)
    b = editing.extend(model, ["forest", "beach", "airport"], (32, 64), **kw)
    t = 32 // model.vae.downsample
    assert torch.equal(a[..., :t], b[..., :t]) and not torch.allclose(a[..., t:], b[..., t:])


def test_tiled_vae_codes_as_well_as_one_pass_with_the_trained_demo_vae():
    """The shipped procedural-Earth VAE on a 64x96 render coded in 32 px tiles (8x8 latents, overlap 2): the
    tiles normalise on their own, so the latents differ from one pass (~8% here), but they reconstruct the image
    as well as one pass does (measured: L1 0.0587 tiled encode, 0.0577 one pass)."""
    cfg = load_config("configs/demo.py").model
    model = Text2Earth(cfg).eval()
    model.vae = load_part("configs/pretrained/demo_vae.safetensors", "vae").eval()
    from data.synthetic import sample

    image = (
        torch.from_numpy(sample(3, 14.0, 96)["image"][:64]).permute(2, 0, 1)[None].float() / 127.5
        - 1
    )
    with torch.no_grad():
        whole = editing.encode(model, image)
        one_pass = (model.decode_latents(whole) - image).abs().mean()
        tiled = editing.vae_tiled(model, image, 8, 2, decode_=False)
        assert tiled.shape == whole.shape
        assert (model.decode_latents(tiled) - image).abs().mean() < 1.1 * one_pass
        assert (
            editing.vae_tiled(model, whole, 8, 2, decode_=True) - image
        ).abs().mean() < 1.5 * one_pass


def test_cloud_mask_finds_procedural_clouds():
    """The estimated mask of the procedural Earth's clouds against the true one (alpha > 1/2): IoU > 0.5."""
    from data.synthetic import make_scene, modalities

    ious = []
    for seed in range(12):
        mods = modalities(make_scene(seed, seed % 12), 14.0, 64, seed=seed)
        image = torch.from_numpy(mods["cloud"]).permute(2, 0, 1)[None].float() / 127.5 - 1
        est = editing.cloud_mask(image, dilate=0)[0, 0].bool().numpy()
        truth = mods["cloud_mask"]
        ious.append((est & truth).sum() / max((est | truth).sum(), 1))
    assert np.mean(ious) > 0.5, ious


# ----------------------------------------------------------------------------------------------
# edit.py
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("edit")
    save_model(tiny(), d / "t2i.safetensors")
    save_model(tiny(9), d / "inpaint.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((32, 48, 3)) * 255).astype("uint8")).save(d / "in.png")
    m = np.zeros((32, 48), "uint8")
    m[8:20, 10:30] = 255
    Image.fromarray(m).save(d / "mask.png")
    Image.fromarray(m[::2, ::2]).save(d / "mask_half.png")  # same aspect: resized
    Image.fromarray(m[:, :40]).save(d / "mask_other.png")  # other aspect: refused
    Image.fromarray(np.zeros_like(m)).save(d / "black.png")
    (d / "notes.png").write_text("not an image")
    (d / "empty.txt").write_text("\n\n")
    cloudy = np.full((32, 48, 3), 90, "uint8")
    cloudy[4:14, 6:20] = 245
    Image.fromarray(cloudy).save(d / "cloudy.png")
    return d


def run(files, capsys, *args):
    code = (
        edit.main(
            [*args[:1], "--weights", str(files / "t2i.safetensors"), "--steps", "2", *args[1:]]
        )
        if "--weights" not in args
        else edit.main(list(args) + ["--steps", "2"])
    )
    return code, capsys.readouterr()


def test_cli_inpaint_writes_png_with_settings_and_never_overwrites(files, tmp_path, capsys):
    out = tmp_path / "o"
    code, _ = run(
        files,
        capsys,
        "inpaint",
        "--image",
        str(files / "in.png"),
        "--mask",
        str(files / "mask.png"),
        "--prompt",
        "a forest",
        "--level",
        "15",
        "--out",
        str(out),
        "--n",
        "2",
    )
    assert code == 0
    written = sorted(p.name for p in out.iterdir())
    assert written == ["in_inpaint_seed0.png", "in_inpaint_seed1.png"]
    im = Image.open(out / written[0])
    assert im.size == (48, 32) and im.text["prompt"] == "a forest" and im.text["level"] == "15"
    assert (
        im.text["method"] == "replace"
        and im.text["mask"].endswith("mask.png")
        and im.text["seed"] == "0"
    )
    before = (out / written[0]).read_bytes()
    with pytest.raises(SystemExit) as e:
        run(
            files,
            capsys,
            "inpaint",
            "--image",
            str(files / "in.png"),
            "--mask",
            str(files / "mask.png"),
            "--prompt",
            "x",
            "--out",
            str(out),
        )
    assert e.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / written[0]).read_bytes() == before


def test_cli_every_command_runs(files, tmp_path, capsys):
    img = str(files / "in.png")
    code, _ = run(
        files,
        capsys,
        "declouds",
        "--image",
        str(files / "cloudy.png"),
        "--out",
        str(tmp_path / "d"),
    )
    assert code == 0 and {p.name for p in (tmp_path / "d").iterdir()} == {
        "cloudy_declouds_seed0.png",
        "cloudy_cloudmask.png",
    }
    code, cap = run(
        files,
        capsys,
        "img2img",
        "--image",
        img,
        "--preset",
        "sr",
        "--prompt",
        "x",
        "--level",
        "14",
        "--out",
        str(tmp_path / "s"),
    )
    sr = Image.open(tmp_path / "s" / "in_img2img_seed0.png")
    assert (
        code == 0
        and sr.size == (96, 64)
        and sr.text["level"] == "15"
        and "output level 15" in cap.out
    )
    code, _ = run(
        files,
        capsys,
        "img2img",
        "--image",
        img,
        "--strength",
        "0.4",
        "--prompt",
        "x",
        "--out",
        str(tmp_path / "i"),
    )
    assert (
        code == 0 and Image.open(tmp_path / "i" / "in_img2img_seed0.png").text["strength"] == "0.4"
    )
    prompts = tmp_path / "p.txt"
    prompts.write_text("forest\n\nlake\ndesert\n")
    for method in editing.CANVAS_METHODS:
        code, cap = run(
            files,
            capsys,
            "extend",
            "--prompts",
            str(prompts),
            "--size",
            "32",
            "64",
            "--tile",
            "32",
            "--overlap",
            "16",
            "--method",
            method,
            "--out",
            str(tmp_path / method),
        )
        canvas = Image.open(tmp_path / method / "canvas_extend_seed0.png")
        assert (
            code == 0
            and canvas.size == (64, 32)
            and "1 x 3 tiles" in cap.out
            and canvas.text["method"] == method
        )
    code = edit.main(
        [
            "inpaint",
            "--weights",
            str(files / "inpaint.safetensors"),
            "--image",
            img,
            "--mask",
            str(files / "mask_half.png"),
            "--prompt",
            "x",
            "--steps",
            "2",
            "--out",
            str(tmp_path / "n"),
        ]
    )
    assert (
        code == 0 and Image.open(tmp_path / "n" / "in_inpaint_seed0.png").text["method"] == "model"
    )


@pytest.mark.parametrize(
    "args,message",
    [
        (["inpaint", "--mask", "{d}/mask_other.png"], "sizes and aspect ratios differ"),
        (["inpaint", "--mask", "{d}/black.png"], "all black: nothing to regenerate"),
        (["inpaint", "--mask", "{d}/mask.png", "--image", "{d}/notes.png"], "not an image file"),
        (["inpaint", "--mask", "{d}/mask.png", "--image", "{d}/missing.png"], "no such file"),
        (
            ["inpaint", "--mask", "{d}/mask.png", "--method", "model"],
            "needs a 9-channel inpainting U-Net",
        ),
        (["img2img", "--strength", "1.5"], r"--strength must lie in \(0, 1\]"),
        (["img2img", "--strength", "0"], r"--strength must lie in \(0, 1\]"),
        (["img2img", "--preset", "sr"], "needs the input's --level"),
        (["extend", "--size", "36", "64"], "multiples of 8"),
        (["extend", "--size", "32", "64", "--prompts", "{d}/empty.txt"], "extend needs prompts"),
        (
            ["extend", "--size", "32", "64", "--tile", "32", "--overlap", "16", "--prompt", "a"],
            None,
        ),
        (
            [
                "extend",
                "--size",
                "32",
                "64",
                "--tile",
                "32",
                "--overlap",
                "16",
                "--prompt",
                "a",
                "--prompt",
                "b",
            ],
            "give 1 prompt or 3",
        ),
    ],
)
def test_cli_bad_input_is_one_line_exit_2_nothing_written(files, tmp_path, capsys, args, message):
    d, out = str(files), tmp_path / "o"
    args = [a.format(d=d) for a in args]
    if args[0] != "extend" and "--image" not in args:
        args += ["--image", f"{d}/in.png"]
    if args[0] != "extend" and "--prompt" not in args:
        args += ["--prompt", "x"]
    if args[0] == "extend" and "--prompt" not in args and "--prompts" not in args:
        args += ["--prompt", "a"]
    if message is None:  # the valid twin of the next case
        assert run(files, capsys, *args, "--out", str(out))[0] == 0
        return
    with pytest.raises(SystemExit) as e:
        run(files, capsys, *args, "--out", str(out))
    err = capsys.readouterr().err
    errors = [ln for ln in err.splitlines() if ln.startswith("edit.py: error:")]
    assert e.value.code == 2 and "Traceback" not in err and len(errors) == 1, err
    assert re.search(message, errors[0]), err
    assert not out.exists()


def test_cli_resizes_a_mask_of_the_same_aspect_with_a_warning(files, tmp_path, capsys):
    with pytest.warns(UserWarning, match="resized to the image's 48x32"):
        code, _ = run(
            files,
            capsys,
            "inpaint",
            "--image",
            str(files / "in.png"),
            "--mask",
            str(files / "mask_half.png"),
            "--prompt",
            "x",
            "--out",
            str(tmp_path),
        )
    assert code == 0


def test_seam_ratio_reads_stitching_and_not_texture():
    """evaluation/canvas.py: tiles of independent textures side by side read far above 1; one texture with the same
    borders drawn on it reads ~1; on the period-4 grid, a texture whose every 4th line jumps (a VAE's upsampling)
    still reads ~1, while all lines would read it as a seam."""
    from evaluation.canvas import seam_ratio

    g = torch.Generator().manual_seed(0)
    origins, _ = canvas_tiles((32, 144), 32, 16, 4)
    smooth = torch.nn.functional.avg_pool2d(
        torch.randn(3, 36, 148, generator=g), 5, stride=1
    )  # one texture
    stitched = smooth.clone()
    for k, (_, x) in enumerate(origins[::2]):
        stitched[:, :, x : x + 32] += torch.randn(3, 1, 1, generator=g)  # each tile its own offset
    assert seam_ratio(stitched, origins, 32) > 3 and 0.8 < seam_ratio(smooth, origins, 32) < 1.2
    grid = smooth.clone()
    grid[:, ::4] += 0.3  # every 4th line stands out
    grid[:, :, ::4] += 0.3
    assert (
        seam_ratio(grid, origins, 32) > 1.5 and 0.8 < seam_ratio(grid, origins, 32, period=4) < 1.2
    )
    assert math.isnan(seam_ratio(smooth[:, :, :32], [(0, 0)], 32))
