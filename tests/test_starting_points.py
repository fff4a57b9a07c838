"""Where a run starts: init_from loads a release folder or our checkpoint into the model the config describes,
what the config adds starts so that the model equals its source, and untrained frozen parts are refused."""
import pytest
import torch

import train
from model.config import ModelConfig
from model.release import config_from_diffusers
from model.text2earth import Text2Earth
from model.weights import WeightsError, load_model, load_pretrained, load_weights, read_metadata

TINY = ["--config", "configs/tiny.py", "--data=synthetic", "--image_size=32", "--synthetic_samples=16",
        "--num_workers=0", "--log_every=1", "--warmup_steps=0", "--batch_size=2", "--ckpt_every=100"]


@pytest.fixture(scope="module")
def sd2_base(tmp_path_factory):
    """A tiny SD2-base-shaped folder: random weights, no class (level) embedding, written with diffusers."""
    from release import make_release
    folder = tmp_path_factory.mktemp("sd2_base")
    return folder, make_release(folder, seed=5, level=False)


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([10, 700]), torch.randn(2, 77, 64, generator=g)


def test_level_model_from_sd2_base_predicts_what_its_source_predicts(sd2_base, tmp_path):
    """The config adds Text2Earth's level MLP to SD2-base: it starts with its last layer at zero, so at step 0
    (through train.py's own setup) the U-Net predicts exactly what the level-less source predicts, at every
    level, and what diffusers' source U-Net predicts (to float rounding)."""
    folder, refs = sd2_base
    source_cfg = config_from_diffusers(folder)
    assert source_cfg.unet.scalar_conditions == ()
    cfg = ModelConfig.from_dict(source_cfg.to_dict())
    cfg.unet.scalar_conditions = ("level",)
    run_cfg = train.parse_config(TINY + [f"--out_dir={tmp_path}", f"--init_from={folder}"])
    run_cfg.model = cfg
    run = train.setup(run_cfg)
    ours, source = run["model"].eval(), load_weights(folder)
    assert run["trained"] == {"unet", "vae", "text_encoder"}                 # a release: all of it trained
    mlp = ours.unet.cond_embed["level"]
    assert mlp.fc2.weight.abs().max() == 0 and mlp.fc2.bias.abs().max() == 0 and mlp.fc1.weight.abs().max() > 0
    x, t, ctx = unet_inputs()
    with torch.no_grad():
        plain = source.unet(x, t, {"text": ctx})
        for level in (0.0, 12.0, 18.7):
            out = ours.unet(x, t, {"text": ctx, "level": torch.full((2,), level)})
            assert torch.equal(out, plain), level
        ref = refs["unet"](x, t, encoder_hidden_states=ctx).sample
    assert (plain - ref).abs().max().item() <= 1e-4
    # the rest is the source's, exactly: VAE, text tower and every U-Net weight the source has
    theirs = source.state_dict()
    assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items() if k in theirs)
    assert [k for k in ours.state_dict() if k not in theirs] == [f"unet.cond_embed.level.{p}" for p in
                                                                   ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")]


def test_extra_input_channels_start_at_zero(sd2_base):
    """An inpainting U-Net (9 input channels) from a 4-channel source: the extra conv_in weights start at zero, so
    whatever the mask and masked latent, it predicts what the source predicts from x_t."""
    folder, _ = sd2_base
    cfg = config_from_diffusers(folder)
    cfg.unet.in_channels = 9
    model = Text2Earth(cfg)
    load_pretrained(model, folder)
    source = load_weights(folder)
    x, t, ctx = unet_inputs(1)
    extra = torch.randn(2, 5, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.unet(torch.cat([x, extra], 1), t, {"text": ctx}), source.unet(x, t, {"text": ctx}))


def test_anything_else_that_differs_is_a_clear_error(sd2_base, tmp_path):
    folder, _ = sd2_base
    cfg = config_from_diffusers(folder)
    cfg.unet.heads = (1, 2, 2)                                               # same shapes, other attention
    with pytest.raises(WeightsError, match=r"model.unet.heads = \(1, 2, 2\) but the source has \(2, 4, 4\)"):
        load_pretrained(Text2Earth(cfg), folder)
    cfg = config_from_diffusers(folder)
    cfg.unet.channels = (32, 64, 128)
    with pytest.raises(WeightsError, match="unet.channels"):
        load_pretrained(Text2Earth(cfg), folder)
    level_cfg = config_from_diffusers(folder)
    level_cfg.unet.scalar_conditions = ("level",)
    torch.manual_seed(0)
    Text2Earth(level_cfg).cpu()
    from model.weights import save_model
    save_model(Text2Earth(level_cfg), tmp_path / "with_level.safetensors")
    with pytest.raises(WeightsError, match="scalar_conditions"):            # a condition cannot be taken away
        load_pretrained(Text2Earth(config_from_diffusers(folder)), tmp_path / "with_level.safetensors")


def test_untrained_frozen_parts_are_refused(tmp_path, capsys):
    """From scratch, the U-Net would learn the latents of a random VAE from a random text tower: refused with one
    line, exit code 2, nothing written; --allow_untrained lets a test do it. The VAE stage needs nothing."""
    out = tmp_path / "unet"
    assert train.main(TINY + [f"--out_dir={out}", "--max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "frozen vae and text_encoder that was never trained" in err and "Traceback" not in err
    assert err.count("\n") == 1 and not out.exists()
    assert train.main(TINY + [f"--out_dir={out}", "--max_steps=1", "--train=unet+text_encoder"]) == 2
    assert "frozen vae that was never" in capsys.readouterr().err
    # the VAE stage from scratch, then the U-Net (+ text tower) from its export: allowed, and recorded
    vae = tmp_path / "vae"
    assert train.main(TINY + [f"--out_dir={vae}", "--max_steps=1", "--train=vae", "--objective=vae"]) == 0
    assert read_metadata(vae / "model.safetensors")["trained"] == '["vae"]'
    assert train.main(TINY + [f"--out_dir={out}", "--max_steps=1", "--train=unet+text_encoder",
                              f"--init_from={vae / 'model.safetensors'}"]) == 0
    assert read_metadata(out / "model.safetensors")["trained"] == '["text_encoder", "unet", "vae"]'
    assert load_model(out / "model.safetensors").cfg.vae.scaling_factor == \
        load_model(vae / "model.safetensors").cfg.vae.scaling_factor             # the source's latent scale


def test_inpainting_objective_trains_the_nine_channel_unet(tmp_path):
    """configs/text2earth_inpaint.py's objective: random masks, the masked image's latent beside x_t."""
    from model.objectives import random_masks
    g = torch.Generator().manual_seed(0)
    masks = random_masks(400, 16, 16, g)
    full = masks.flatten(1).mean(1) == 1
    assert set(masks.unique().tolist()) == {0.0, 1.0} and 0.15 < full.float().mean() < 0.35
    assert (masks[~full].flatten(1).mean(1) > 0).all()                       # every other mask covers something
    args = ["--config", "configs/text2earth_inpaint.py", "--data=synthetic", "--image_size=32",
            "--synthetic_samples=8", "--num_workers=0", "--batch_size=2", "--max_steps=1", "--allow_untrained",
            f"--out_dir={tmp_path}", "--model.unet.channels=(32, 64, 64)", "--model.unet.attention=(True, True, False)",
            "--model.unet.heads=(2, 4, 4)", "--model.unet.context_dim=64", "--model.unet.norm_groups=8",
            "--model.vae.channels=(32, 64)", "--model.vae.layers_per_level=1", "--model.vae.norm_groups=8",
            "--model.text.width=64", "--model.text.heads=4", "--model.text.layers=2"]
    assert train.main(args) == 0
    assert load_model(tmp_path / "model.safetensors").cfg.unet.in_channels == 9


def test_a_vae_only_file_starts_a_unet_of_any_architecture(tmp_path, capsys):
    """save_model(parts=("vae",)) writes the VAE alone (as the demo ships it): load_part reads it back exactly,
    load_model refuses it (not a whole model), and train.py trains a U-Net whose architecture the file says
    nothing about on it, the VAE loaded and frozen, the U-Net and text tower from the config's initialisation."""
    from model.release import read_tensors
    from model.weights import load_part, save_model, trained_parts
    cfg = train.parse_config(TINY).model
    torch.manual_seed(0)
    source = Text2Earth(cfg)
    vae_file = tmp_path / "vae.safetensors"
    save_model(source, vae_file, parts=("vae",), trained=("vae",))
    assert {k.split(".")[0] for k in read_tensors(vae_file)} == {"vae"}
    assert trained_parts(vae_file) == {"vae"}
    vae = load_part(vae_file, "vae")
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(vae.reconstruct(x), source.vae.reconstruct(x), rtol=0, atol=0)
    with pytest.raises(WeightsError, match="holds only"):
        load_model(vae_file)
    with pytest.raises(WeightsError, match="holds no unet"):
        load_part(vae_file, "unet")
    out = tmp_path / "unet"
    other_unet = ["--model.unet.attention=(False, True, False)", "--model.unet.channels=(32, 48, 48)"]
    assert train.main(TINY + [f"--out_dir={out}", "--max_steps=1", "--train=unet+text_encoder",
                              f"--init_from={vae_file}"] + other_unet) == 0, capsys.readouterr().err
    trained = load_model(out / "model.safetensors")
    assert trained.cfg.unet.channels == (32, 48, 48)
    for k, v in source.vae.state_dict().items():                                 # frozen, as loaded
        torch.testing.assert_close(trained.vae.state_dict()[k], v, rtol=0, atol=0)
    assert trained_parts(out / "model.safetensors") == {"unet", "text_encoder", "vae"}
