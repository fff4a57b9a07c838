"""The model on its own: sizes, checkpoints, bad weights, tiled decoding, gradient checkpointing."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.config import ModelConfig, load_config
from model.text2earth import Text2Earth
from model.weights import WeightsError, load_diffusers, load_weights, save_model


def test_text2earth_parameter_counts():
    with torch.device("meta"):
        model = Text2Earth(load_config("configs/text2earth.py").model)
    c = model.parameter_counts()
    assert 860e6 < c["unet"] < 870e6  # SD2-base U-Net 865.9 M + the level MLP 2.05 M
    assert 83e6 < c["vae"] < 84.5e6  # 83.65 M
    assert 335e6 < c["text_encoder"] < 345e6  # 23 ViT-H text blocks + embeddings: 340.4 M
    assert 1.28e9 < c["total"] < 1.30e9
    with torch.device("meta"):
        inpaint = Text2Earth(load_config("configs/text2earth_inpaint.py").model)
    assert inpaint.unet.conv_in.weight.shape == (320, 9, 3, 3)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Text2Earth(load_config("configs/tiny.py").model).eval()


def test_tiny_shapes_and_level_changes_output(tiny):
    x, ctx = torch.randn(2, 4, 16, 16), tiny.encode_text(["a river", ""])
    with torch.no_grad():
        a = tiny.unet(x, torch.tensor([10, 10]), {"text": ctx, "level": torch.tensor([18.0, 18.0])})
        b = tiny.unet(x, torch.tensor([10, 10]), {"text": ctx, "level": torch.tensor([11.0, 11.0])})
    assert a.shape == x.shape
    assert (a - b).abs().max() > 1e-3  # the level embedding reaches the output
    with pytest.raises(ValueError, match="input channels"):
        tiny.unet(torch.randn(1, 9, 16, 16), 1, {"text": ctx[:1], "level": 0.0})


def test_scale_shift_norm_lets_the_embedding_past_the_group_norm():
    """SD's res-block adds the embedding before its second GroupNorm, which removes the part of it shared by a
    channel group; ADM's scale-shift (scale_shift_norm) sets scale and shift after the norm. An embedding that
    moves every channel alike is lost in the first and reaches the output in the second; scale -1 leaves the
    shift alone in the block's inner path."""
    from model.unet import ResBlock

    torch.manual_seed(0)
    x, emb = torch.randn(2, 8, 6, 6), torch.randn(2, 16)

    def block(scale_shift, bias):
        torch.manual_seed(1)  # the same convolutions each time
        b = ResBlock(8, 8, 16, groups=2, eps=1e-5, scale_shift=scale_shift)
        b.emb_proj.weight.data.zero_()
        b.emb_proj.bias.data = torch.tensor(bias, dtype=torch.float32)
        return b

    with torch.no_grad():
        add0, add3 = block(False, [0.0] * 8)(x, emb), block(False, [3.0] * 8)(x, emb)
        assert (add0 - add3).abs().max() < 1e-4  # a group-wide offset: normalised away
        ss0, ss3 = block(True, [0.0] * 16)(x, emb), block(True, [0.0] * 8 + [3.0] * 8)(x, emb)
        assert (ss0 - ss3).abs().max() > 0.1  # the same offset as a shift: kept
        b = block(True, [-1.0] * 8 + [0.5] * 8)
        shift_only = b.conv2(torch.nn.functional.silu(torch.full((2, 8, 6, 6), 0.5)))
        assert (b(x, emb) - x - shift_only).abs().max() < 1e-5
    cfg = load_config("configs/tiny.py").model
    cfg.unet.scale_shift_norm = True
    torch.manual_seed(0)
    model = Text2Earth(cfg).eval()
    assert (
        model.unet.mid.res1.emb_proj.weight.shape[0] == 2 * model.unet.mid.res1.conv1.out_channels
    )
    x, ctx = torch.randn(2, 4, 16, 16), model.encode_text(["a river", ""])
    with torch.no_grad():
        a, b = (
            model.unet(x, torch.tensor([10, 10]), {"text": ctx, "level": torch.tensor([lv, lv])})
            for lv in (18.0, 11.0)
        )
    assert a.shape == x.shape and (a - b).abs().max() > 1e-3


def test_checkpoint_roundtrip_rebuilds_model(tiny, tmp_path):
    path = tmp_path / "ckpt.safetensors"
    save_model(tiny, path, metadata={"step": 7})
    loaded = load_weights(path)
    assert loaded.cfg == tiny.cfg
    x, ctx = torch.randn(1, 4, 16, 16), tiny.encode_text(["farmland"])
    with torch.no_grad():
        assert torch.equal(
            loaded.unet(x, 5, {"text": ctx, "level": 12.0}),
            tiny.unet(x, 5, {"text": ctx, "level": 12.0}),
        )
        assert torch.equal(loaded.encode_text(["farmland"]), ctx)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write leaves no temporary file behind


def test_config_dict_roundtrip_rejects_unknown_keys():
    cfg = ModelConfig()
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    d = cfg.to_dict()
    d["unet"]["chanels"] = [1]
    with pytest.raises(ValueError, match="chanels"):
        ModelConfig.from_dict(d)


# ----------------------------------------------------------------------------------------------------
# Bad weights: one clear error naming the file and the key
# ----------------------------------------------------------------------------------------------------
@pytest.fixture
def release_copy(tiny_release, tmp_path):
    folder, _ = tiny_release
    dst = tmp_path / "release"
    shutil.copytree(folder, dst)
    return dst


def _edit_unet(folder, fn):
    f = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(f))
    fn(state)
    save_file(state, str(f))
    return f


def test_missing_key_is_named(release_copy):
    _edit_unet(release_copy, lambda s: s.pop("mid_block.resnets.0.conv1.weight"))
    with pytest.raises(WeightsError, match=r"unet.*missing key for 'mid.res1.conv1.weight'"):
        load_diffusers(release_copy)


def test_unexpected_key_is_named(release_copy):
    f = _edit_unet(release_copy, lambda s: s.__setitem__("extra.weight", torch.zeros(2)))
    with pytest.raises(WeightsError, match=rf"{f.name}.*unexpected key 'extra.weight'"):
        load_diffusers(release_copy)


def test_wrong_shape_is_named(release_copy):
    k = "down_blocks.0.resnets.0.conv1.weight"
    f = _edit_unet(release_copy, lambda s: s.__setitem__(k, torch.zeros(3, 3)))
    with pytest.raises(
        WeightsError, match=rf"{f.name}.*'{k}' has shape \(3, 3\), expected \(32, 32, 3, 3\)"
    ):
        load_diffusers(release_copy)


def test_missing_config_is_named(release_copy):
    (release_copy / "vae" / "config.json").unlink()
    with pytest.raises(WeightsError, match=r"vae/config.json: missing"):
        load_diffusers(release_copy)


def test_truncated_safetensors_is_named(release_copy):
    f = release_copy / "vae" / "diffusion_pytorch_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(WeightsError, match=rf"{f.name}: not a readable safetensors file"):
        load_diffusers(release_copy)


def test_unsupported_architecture_is_refused(release_copy):
    cfg_file = release_copy / "unet" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["use_linear_projection"] = False
    cfg_file.write_text(json.dumps(cfg))
    with pytest.raises(WeightsError, match="use_linear_projection"):
        load_diffusers(release_copy)


def test_not_a_model_path(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        load_weights(tmp_path / "nope")
    with pytest.raises(WeightsError, match="no unet/"):
        load_weights(tmp_path)
    other = tmp_path / "other.safetensors"
    save_file({"a": torch.zeros(1)}, str(other))
    with pytest.raises(WeightsError, match="not a text2earth checkpoint"):
        load_weights(other)


# ----------------------------------------------------------------------------------------------------
# Tiled decoding and gradient checkpointing
# ----------------------------------------------------------------------------------------------------
def test_tiled_decode_matches_whole_and_has_no_seams(tiny):
    torch.manual_seed(1)
    z = torch.nn.functional.interpolate(
        torch.randn(1, 4, 6, 6), size=(24, 24), mode="bicubic"
    )  # smooth latent
    f = tiny.vae.downsample
    with torch.no_grad():
        whole = tiny.vae.decode_latents(z)
        single = tiny.vae.decode_latents(z, tile=24)  # one tile covers it: exactly the whole decode
        hard = tiny.vae.decode_latents(z, tile=12, overlap=0)  # tiles butted together: the control
        tiled = tiny.vae.decode_latents(z, tile=12, overlap=4)
    assert torch.equal(single, whole)
    assert tiled.shape == whole.shape

    # Each tile normalises with its own GroupNorm statistics, so tiles are not bit-equal to the whole decode
    # (a known limitation, see AutoencoderKL.decode_tiled). What must hold is that no edge appears where a
    # tile ends: the mean jump between neighbouring columns, relative to the whole decode's, stays ordinary
    # there. The butted control shows the measure does see a seam.
    def seam(
        im, col
    ):  # mean |x[c+1] - x[c]| at the column where a tile ends, relative to the whole decode
        return (
            im.diff(dim=3).abs().mean(dim=(0, 1, 2)) / whole.diff(dim=3).abs().mean(dim=(0, 1, 2))
        )[col]

    assert seam(hard, 12 * f - 1) > 2.0
    for start in (0, 6, 12):  # tiles start at latent 0, 6, 12
        for col in (start * f, (start + 12) * f - 1):
            if col < whole.shape[3] - 1:
                assert seam(tiled, col) < 1.5, col


def test_gradient_checkpointing_same_gradients(tiny):
    cfg = load_config("configs/tiny.py").model
    torch.manual_seed(2)
    a = Text2Earth(cfg).unet.train()
    cfg.unet.gradient_checkpointing = True
    b = Text2Earth(cfg).unet.train()
    b.load_state_dict(a.state_dict())
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 77, 64)
    for m in (a, b):
        m(
            x, torch.tensor([1, 900]), {"text": ctx, "level": torch.tensor([0.0, 16.0])}
        ).square().mean().backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, atol=1e-6), name
