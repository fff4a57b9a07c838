"""Our 9-channel inpainting (model/editing.py, method "model") against diffusers' StableDiffusionInpaintPipeline on a
tiny random release-shaped folder: the same DDIM chain, guidance, mask and masked-image latent, so the latents
before decoding agree to 1e-4. The release's pipeline gives the U-Net the level as `class_labels` (the U-Net's
class_embed_type="timestep"); diffusers' inpainting pipeline has no such argument, so the test wraps the
diffusers U-Net's forward to pass it."""

import pytest
import torch

from model.editing import inpaint_latents, inpaint_method, latent_mask
from model.weights import load_diffusers

TOL = 1e-4
PROMPTS = ["a dense residential area with many buildings", "farmland crossed by rivers and roads"]
LEVELS = [12.0, 17.0]
SIZE = 32  # pixels; the tiny VAE halves it


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on these tiny tensors a second one buys nothing, and on a shared 2-core machine its
    spin-waits made the file 15x slower (150 s against 10 s while a training run shared the cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """(folder, reference modules, our model, diffusers' inpainting pipeline) of one tiny 9-channel release."""
    from diffusers import (
        AutoencoderKL,
        DDIMScheduler,
        StableDiffusionInpaintPipeline,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer
    from release import make_release

    folder = tmp_path_factory.mktemp("inpainting_release")
    refs = make_release(folder, in_channels=9, seed=3)
    # built from the folder's parts (its model_index.json has no _diffusers_version, which the pipeline's
    # from_pretrained requires for an inpainting class)
    pipe = StableDiffusionInpaintPipeline(
        vae=AutoencoderKL.from_pretrained(folder / "vae"),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(folder / "tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(folder / "unet"),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler"),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return folder, refs, load_diffusers(folder), pipe


def inputs():
    """Images (2, 3, H, W) in [-1, 1], soft masks (2, 1, H, W) that binarize (>= 0.5) to one rectangle per image
    with edges on odd pixels (so the nearest-neighbour latent mask is exercised), and the initial noise."""
    g = torch.Generator().manual_seed(7)
    image = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    mask = torch.full((2, 1, SIZE, SIZE), 0.2)
    mask[0, :, 5:21, 9:28] = 0.8
    mask[1, :, 13:32, 0:11] = 0.5  # 0.5 is "regenerate" for both
    noise = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=g)
    return image, mask, noise


def masked_latent(refs, image, mask):
    """The scaled posterior mean of the masked image (release convention image * (mask < 0.5)), diffusers' VAE."""
    vae = refs["vae"]
    with torch.no_grad():
        return vae.encode(image * (mask < 0.5)).latent_dist.mean * vae.config.scaling_factor


@pytest.mark.parametrize(
    "guidance,scale",
    [(None, 4.0), ({"text": 3.5, "level": 3.5}, 3.5)],
    ids=["default-4", "inpainting-3.5"],
)
@pytest.mark.parametrize("steps", [4, 6])
def test_inpainting_matches_diffusers_pipeline(release, monkeypatch, guidance, scale, steps):
    """guidance None is our default (text and level jointly at 4.0, the release's); 3.5 is the inpainting
    release's default. 6 steps do not divide T = 1000 (DDIM's previous timestep is still t - T // steps)."""
    _, refs, ours, pipe = release
    image, mask, noise = inputs()
    z_masked = masked_latent(refs, image, mask)
    levels = torch.tensor(LEVELS)

    # diffusers' inpainting pipeline cannot pass class_labels: wrap its U-Net's forward to give the level as the
    # release's pipeline does. Under CFG diffusers runs the batch [uncond, cond]: uncond at level 0 (our null),
    # cond at each prompt's level.
    forward, calls = pipe.unet.forward, []

    def with_levels(sample, timestep, encoder_hidden_states, **kw):
        assert sample.shape[0] == 2 * len(LEVELS)
        calls.append(int(timestep))
        labels = torch.cat([torch.zeros(len(LEVELS)), levels])
        return forward(sample, timestep, encoder_hidden_states, class_labels=labels, **kw)

    monkeypatch.setattr(pipe.unet, "forward", with_levels)
    seen = {}

    def record(pipeline, i, t, kw):  # the latent mask diffusers built
        seen.setdefault("mask", kw["mask"].clone())
        seen.setdefault("masked_image_latents", kw["masked_image_latents"].clone())
        return {}

    ref = pipe(
        prompt=PROMPTS,
        image=image,
        mask_image=mask,
        masked_image_latents=z_masked,
        latents=noise,
        height=SIZE,
        width=SIZE,
        strength=1.0,
        num_inference_steps=steps,
        guidance_scale=scale,
        eta=0.0,
        output_type="latent",
        callback_on_step_end=record,
        callback_on_step_end_tensor_inputs=["mask", "masked_image_latents"],
    ).images
    assert calls == [
        1 + k * (1000 // steps) for k in reversed(range(steps))
    ]  # "leading", steps_offset 1
    ours_mask = latent_mask((mask >= 0.5).float(), 2)
    assert torch.equal(seen["mask"], torch.cat([ours_mask] * 2))
    assert torch.equal(seen["masked_image_latents"], torch.cat([z_masked] * 2))
    assert 0.05 < ours_mask.mean() < 0.95

    out = inpaint_latents(
        ours,
        {"text": PROMPTS, "level": LEVELS},
        image,
        mask,
        seeds=[0, 1],
        noise=noise,
        masked_latent=z_masked,
        sampler="ddim",
        steps=steps,
        guidance=guidance,
    )
    assert out.shape == ref.shape == noise.shape
    assert (out - noise).abs().max() > 0.1  # the chain moved
    diff = (out - ref).abs().max().item()
    assert diff <= TOL, (
        f"max |ours - diffusers| = {diff:.3g} after {steps} DDIM steps, guidance {scale}"
    )


def test_masked_latent_is_the_vae_mean_of_the_masked_image(release):
    """Without `masked_latent`, ours encodes image * (mask < 0.5) to its scaled posterior mean (diffusers'
    pipeline samples the posterior instead, which is why the parity test passes the latent to both)."""
    _, refs, ours, _ = release
    image, mask, noise = inputs()
    kw = dict(seeds=[0, 1], noise=noise, sampler="ddim", steps=2)
    cond = {"text": PROMPTS, "level": LEVELS}
    given = inpaint_latents(
        ours, cond, image, mask, masked_latent=masked_latent(refs, image, mask), **kw
    )
    own = inpaint_latents(ours, cond, image, mask, **kw)
    assert (own - given).abs().max() <= TOL


def test_inpaint_method_refuses_the_wrong_unet(release, tmp_path):
    from release import make_release

    _, _, nine, _ = release
    make_release(tmp_path, in_channels=4, seed=3)
    four = load_diffusers(tmp_path)
    assert inpaint_method(nine) == "model" and inpaint_method(four) == "replace"
    image, mask, _ = inputs()
    cond = {"text": PROMPTS, "level": LEVELS}
    with pytest.raises(
        ValueError, match="'model' needs a 9-channel inpainting U-Net.*4 input channels"
    ):
        inpaint_latents(four, cond, image, mask, seeds=[0, 1], method="model")
    with pytest.raises(ValueError, match="'replace' needs a text-to-image U-Net"):
        inpaint_latents(nine, cond, image, mask, seeds=[0, 1], method="replace")
    with pytest.raises(ValueError, match="must be one of"):
        inpaint_method(nine, "paste")
