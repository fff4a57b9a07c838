"""Where a run starts: init_from loads a release folder or our checkpoint into the model the config describes,
what the config adds starts so that the model equals its source, and untrained frozen parts are refused."""

import pytest
import torch

import train
from model.config import ModelConfig
from model.release import config_from_diffusers
from model.text2earth import Text2Earth
from model.weights import WeightsError, load_model, load_pretrained, load_weights, read_metadata

TINY = [
    "--config",
    "configs/tiny.py",
    "--data=synthetic",
    "--image_size=32",
    "--synthetic_samples=16",
    "--num_workers=0",
    "--log_every=1",
    "--warmup_steps=0",
    "--batch_size=2",
    "--ckpt_every=100",
]


@pytest.fixture(scope="module")
def sd2_base(tmp_path_factory):
    """A tiny SD2-base-shaped folder: random weights, no class (level) embedding, written with diffusers."""
    from release import make_release

    folder = tmp_path_factory.mktemp("sd2_base")
    return folder, make_release(folder, seed=5, level=False)


def unet_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(2, 4, 8, 8, generator=g),
        torch.tensor([10, 700]),
        torch.randn(2, 77, 64, generator=g),
    )


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
    assert run["trained"] == {"unet", "vae", "text_encoder"}  # a release: all of it trained
    mlp = ours.unet.cond_embed["level"]
    assert (
        mlp.fc2.weight.abs().max() == 0
        and mlp.fc2.bias.abs().max() == 0
        and mlp.fc1.weight.abs().max() > 0
    )
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
    assert [k for k in ours.state_dict() if k not in theirs] == [
        f"unet.cond_embed.level.{p}" for p in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias")
    ]


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
        assert torch.equal(
            model.unet(torch.cat([x, extra], 1), t, {"text": ctx}), source.unet(x, t, {"text": ctx})
        )


def test_anything_else_that_differs_is_a_clear_error(sd2_base, tmp_path):
    folder, _ = sd2_base
    cfg = config_from_diffusers(folder)
    cfg.unet.heads = (1, 2, 2)  # same shapes, other attention
    with pytest.raises(
        WeightsError, match=r"model.unet.heads = \(1, 2, 2\) but the source has \(2, 4, 4\)"
    ):
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
    with pytest.raises(WeightsError, match="scalar_conditions"):  # a condition cannot be taken away
        load_pretrained(
            Text2Earth(config_from_diffusers(folder)), tmp_path / "with_level.safetensors"
        )


def test_untrained_frozen_parts_are_refused(tmp_path, capsys):
    """From scratch, the U-Net would learn the latents of a random VAE from a random text tower: refused with one
    line, exit code 2, nothing written; --allow_untrained lets a test do it. The VAE stage needs nothing."""
    out = tmp_path / "unet"
    assert train.main(TINY + [f"--out_dir={out}", "--max_steps=1"]) == 2
    err = capsys.readouterr().err
    assert "frozen vae and text_encoder that was never trained" in err and "Traceback" not in err
    assert err.count("\n") == 1 and not out.exists()
    assert (
        train.main(TINY + [f"--out_dir={out}", "--max_steps=1", "--train=unet+text_encoder"]) == 2
    )
    assert "frozen vae that was never" in capsys.readouterr().err
    # the VAE stage from scratch, then the U-Net (+ text tower) from its export: allowed, and recorded
    vae = tmp_path / "vae"
    assert (
        train.main(TINY + [f"--out_dir={vae}", "--max_steps=1", "--train=vae", "--objective=vae"])
        == 0
    )
    assert read_metadata(vae / "model.safetensors")["trained"] == '["vae"]'
    assert (
        train.main(
            TINY
            + [
                f"--out_dir={out}",
                "--max_steps=1",
                "--train=unet+text_encoder",
                f"--init_from={vae / 'model.safetensors'}",
            ]
        )
        == 0
    )
    assert read_metadata(out / "model.safetensors")["trained"] == '["text_encoder", "unet", "vae"]'
    assert (
        load_model(out / "model.safetensors").cfg.vae.scaling_factor
        == load_model(vae / "model.safetensors").cfg.vae.scaling_factor
    )  # the source's latent scale


def test_inpainting_objective_trains_the_nine_channel_unet(tmp_path):
    """configs/text2earth_inpaint.py is a run from the text-to-image model on Git-10M, and one step of its objective
    (random masks, the masked image's latent beside x_t) trains the 9-channel U-Net."""
    cfg = train.parse_config(["--config", "configs/text2earth_inpaint.py"])
    assert (cfg.objective, cfg.train, cfg.data, cfg.image_size, cfg.model.unet.in_channels) == (
        "inpaint",
        "unet",
        "git10m",
        256,
        9,
    )
    assert cfg.init_from.endswith(".safetensors")
    args = [
        "--config",
        "configs/text2earth_inpaint.py",
        "--data=synthetic",
        "--image_size=32",
        "--init_from=",
        "--synthetic_samples=8",
        "--num_workers=0",
        "--batch_size=2",
        "--grad_accum=1",
        "--max_steps=1",
        "--warmup_steps=0",
        "--allow_untrained",
        f"--out_dir={tmp_path}",
        "--model.unet.channels=(32, 64, 64)",
        "--model.unet.attention=(True, True, False)",
        "--model.unet.heads=(2, 4, 4)",
        "--model.unet.context_dim=64",
        "--model.unet.norm_groups=8",
        "--model.vae.channels=(32, 64)",
        "--model.vae.layers_per_level=1",
        "--model.vae.norm_groups=8",
        "--model.text.width=64",
        "--model.text.heads=4",
        "--model.text.layers=2",
    ]
    assert train.main(args) == 0
    assert load_model(tmp_path / "model.safetensors").cfg.unet.in_channels == 9


@pytest.fixture(scope="module")
def inpainting_masks():
    """400 masks (400, 1, 32, 48) of model/masks.py's mixture, their kinds (400,) and coverages (400,)."""
    from model import masks

    params = masks.draw_params(400, torch.Generator().manual_seed(0))
    m = masks.render(params, 32, 48)
    return m, [list(masks.KINDS)[k] for k in masks.kinds_of(params)], m.flatten(1).mean(1)


def test_inpainting_masks_mix_every_kind_in_its_share(inpainting_masks):
    """Every kind appears with about its share of MIX; masks are exactly 0 or 1; the whole image is masked in
    15-25% of them, and only by the full kind."""
    from model.masks import MIX

    m, kinds, coverage = inpainting_masks
    assert (
        m.shape == (400, 1, 32, 48)
        and m.dtype == torch.float32
        and set(m.unique().tolist()) == {0.0, 1.0}
    )
    total = sum(MIX.values())
    for kind, share in MIX.items():
        assert abs(kinds.count(kind) / 400 - share / total) < 0.06, kind
    full = coverage == 1
    assert 0.15 <= full.float().mean() <= 0.25
    assert full.tolist() == [k == "full" for k in kinds]


def test_each_kind_of_inpainting_mask_has_its_shape(inpainting_masks):
    """Boxes, strokes and clouds cover something but not everything, clouds 20-70% of the image; an outpainting
    mask is a band of 25-75% of the image along exactly one side."""
    m, kinds, coverage = inpainting_masks
    for kind in ("rectangles", "strokes", "clouds"):
        c = coverage[[k == kind for k in kinds]]
        assert len(c) and (c > 0).all() and (c < 1).all(), kind
    c = coverage[[k == "clouds" for k in kinds]]
    assert (c >= 0.2 - 1e-3).all() and (c <= 0.7 + 1e-3).all()
    sides = set()
    for mask in m[[k == "outpaint" for k in kinds], 0].bool():
        full_edge = [
            bool(mask[0].all()),
            bool(mask[-1].all()),
            bool(mask[:, 0].all()),
            bool(mask[:, -1].all()),
        ]
        assert sum(full_edge) == 1
        side = full_edge.index(True)
        sides.add(side)
        band = [mask, mask.flip(0), mask.T, mask.T.flip(0)][side]  # the band at the top
        depth = int(band.all(1).sum())
        assert (band == (torch.arange(band.shape[0])[:, None] < depth)).all()
        assert 0.25 * band.shape[0] - 1 <= depth <= 0.75 * band.shape[0] + 1
    assert sides == {0, 1, 2, 3}


def test_inpainting_masks_draw_the_same_numbers_whatever_the_size_kind_and_split(monkeypatch):
    """n masks take the same numbers from the generator whatever H, W and the mixture: the first 4 of a global
    batch of 8 are a draw of 4, a process's positions (idx) are those of the whole batch, and the generator ends
    in the same state."""
    from model import masks
    from model.objectives import random_masks

    def draw(n, H, W, **kw):
        g = torch.Generator().manual_seed(1)
        return random_masks(n, H, W, g, **kw), g.get_state()

    batch, state = draw(8, 16, 16)
    assert torch.equal(draw(4, 16, 16)[0], batch[:4])
    assert torch.equal(draw(8, 16, 16, idx=torch.tensor([1, 3, 5, 7]))[0], batch[1::2])
    assert torch.equal(draw(8, 40, 24)[1], state)
    monkeypatch.setattr(masks, "MIX", {"strokes": 1.0})
    strokes, other = draw(8, 24, 40)
    assert torch.equal(other, state) and (strokes.flatten(1).mean(1) < 1).all()


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
    other_unet = [
        "--model.unet.attention=(False, True, False)",
        "--model.unet.channels=(32, 48, 48)",
    ]
    assert (
        train.main(
            TINY
            + [
                f"--out_dir={out}",
                "--max_steps=1",
                "--train=unet+text_encoder",
                f"--init_from={vae_file}",
            ]
            + other_unet
        )
        == 0
    ), capsys.readouterr().err
    trained = load_model(out / "model.safetensors")
    assert trained.cfg.unet.channels == (32, 48, 48)
    for k, v in source.vae.state_dict().items():  # frozen, as loaded
        torch.testing.assert_close(trained.vae.state_dict()[k], v, rtol=0, atol=0)
    assert trained_parts(out / "model.safetensors") == {"unet", "text_encoder", "vae"}
