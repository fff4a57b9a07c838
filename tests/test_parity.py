"""Parity with the reference implementations, through the real import path: the reference modules are
saved with `save_pretrained` and our importer loads that folder. fp32, same random weights."""

import pytest
import torch

from model.weights import load_diffusers

TOL = 1e-4


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.fixture(scope="module")
def ours(tiny_release):
    folder, _ = tiny_release
    return load_diffusers(folder)


def test_config_read_from_release(ours):
    cfg = ours.cfg
    assert cfg.unet.channels == (32, 64, 64) and cfg.unet.heads == (2, 4, 4)
    assert cfg.unet.attention == (True, True, False) and cfg.unet.scalar_conditions == ("level",)
    assert cfg.vae.channels == (32, 64) and cfg.vae.scaling_factor == 0.18215
    assert cfg.text.width == 64 and cfg.text.layers == 2
    assert cfg.diffusion.steps_offset == 1 and cfg.diffusion.spacing == "leading"


@pytest.mark.parametrize("level", [0.0, 12.0, 18.7])
def test_unet_matches_diffusers(tiny_release, ours, level):
    _, refs = tiny_release
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([3, 777])
    ctx = torch.randn(2, 77, 64, generator=g)
    levels = torch.tensor([level, 15.0])
    with torch.no_grad():
        ref = refs["unet"](x, t, encoder_hidden_states=ctx, class_labels=levels).sample
        out = ours.unet(x, t, {"text": ctx, "level": levels})
    assert ref.abs().mean() > 0.1  # outputs of order 1, so the absolute tolerance means something
    assert max_diff(out, ref) <= TOL


def test_unet_controlnet_residuals_match_diffusers(tiny_release, ours):
    """The ControlNet hook adds to the same features as diffusers' down/mid additional residuals."""
    _, refs = tiny_release
    g = torch.Generator().manual_seed(2)
    x, ctx, t, lv = (
        torch.randn(1, 4, 16, 16, generator=g),
        torch.randn(1, 77, 64, generator=g),
        torch.tensor([5]),
        torch.tensor([14.0]),
    )
    shapes = []  # skip features: conv_in, each res/attn output, each downsampler
    for s, c in [(16, 32)] * 3 + [(8, 32)] + [(8, 64)] * 2 + [(4, 64)] + [(4, 64)] * 2:
        shapes.append((1, c, s, s))
    down = [0.1 * torch.randn(sh, generator=g) for sh in shapes]
    mid = 0.1 * torch.randn(1, 64, 4, 4, generator=g)
    with torch.no_grad():
        ref = refs["unet"](
            x,
            t,
            ctx,
            class_labels=lv,
            down_block_additional_residuals=tuple(down),
            mid_block_additional_residual=mid,
        ).sample
        out = ours.unet(x, t, {"text": ctx, "level": lv}, down_residuals=down, mid_residual=mid)
    assert max_diff(out, ref) <= TOL


def test_inpainting_unet_matches_diffusers(tmp_path):
    from release import make_release

    refs = make_release(tmp_path, in_channels=9, seed=3)
    ours = load_diffusers(tmp_path)
    assert ours.cfg.unet.in_channels == 9
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 9, 16, 16, generator=g), torch.randn(2, 77, 64, generator=g)
    t, lv = torch.tensor([999, 0]), torch.tensor([0.0, 17.0])
    with torch.no_grad():
        ref = refs["unet"](x, t, ctx, class_labels=lv).sample
        out = ours.unet(x, t, {"text": ctx, "level": lv})
    assert max_diff(out, ref) <= TOL


def test_vae_matches_diffusers(tiny_release, ours):
    _, refs = tiny_release
    img = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(5)) * 2 - 1
    with torch.no_grad():
        ref_post = refs["vae"].encode(img).latent_dist
        post = ours.vae.encode(img)
        assert max_diff(post.mean, ref_post.mean) <= TOL
        assert max_diff(post.logvar, ref_post.logvar) <= TOL
        z = ref_post.mean
        ref_img = refs["vae"].decode(z).sample
        out_img = ours.vae.decode(z)
    assert ref_img.abs().mean() > 0.1
    assert max_diff(out_img, ref_img) <= TOL


def test_text_encoder_matches_transformers(tiny_release, ours):
    _, refs = tiny_release
    from transformers import CLIPTokenizer

    folder, _ = tiny_release
    hf_tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    prompts = [
        "",
        "a dense residential area with many buildings",
        "15_GOOGLE_LEVEL_farmland, rivers and roads",
    ]
    ids = ours.tokenizer(prompts)
    hf_ids = hf_tok(
        prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt"
    ).input_ids
    assert torch.equal(ids, hf_ids)  # the same BPE vocabulary and padding (0 = "!")
    with torch.no_grad():
        ref = refs["text_encoder"](ids).last_hidden_state
        out = ours.text_encoder(ids)
    assert out.shape == (3, 77, 64)
    assert max_diff(out, ref) <= TOL


def test_text_encoder_is_open_clip_penultimate_layer(tmp_path):
    """Our tower with L layers == open_clip's (L+1)-layer tower read at the penultimate block + ln_final,
    loaded through the OpenCLIP-checkpoint path (the extra block and the projection are dropped)."""
    from open_clip.transformer import TextTransformer
    from safetensors.torch import save_file

    from model.config import TextConfig
    from model.text import TextEncoder
    from model.weights import load_openclip_text

    torch.manual_seed(6)
    full = TextTransformer(
        context_length=77, vocab_size=49408, width=64, heads=4, layers=3, output_dim=32
    ).eval()
    state = {k: v for k, v in full.state_dict().items()}
    state["visual.conv1.weight"] = torch.zeros(
        1
    )  # a full CLIP checkpoint also holds the vision tower
    save_file(state, str(tmp_path / "open_clip.safetensors"))
    ours = TextEncoder(TextConfig(width=64, heads=4, layers=2)).eval()
    load_openclip_text(tmp_path / "open_clip.safetensors", ours)
    ids = torch.randint(1, 49406, (2, 77), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        x, mask = full._embeds(ids)
        for blk in full.transformer.resblocks[:2]:
            x = blk(x, attn_mask=mask)
        ref = full.ln_final(x)
        out = ours(ids)
    assert max_diff(out, ref) <= TOL


def test_long_prompt_truncated_with_warning(ours, caplog):
    prompt = "a very long caption about fields and rivers " * 20
    with caplog.at_level("WARNING"):
        ids = ours.tokenizer([prompt])
    assert ids.shape == (1, 77) and ids[0, -1].item() == 49407  # ends with the end-of-text token
    assert "truncated" in caplog.text
