"""ControlNet: the base U-Net exactly at initialisation, parity with diffusers' ControlNetModel (class_embed_type
"timestep", random weights, loaded through our reader from the folder and the lone file diffusers writes), our
file round trip, and the errors for another architecture and a control image that does not fit."""

import copy
import re

import pytest
import torch
from safetensors.torch import save_file

from model.config import load_config
from model.controlnet import (
    ControlNet,
    ControlNetConfig,
    Controlled,
    load_controlnet,
    save_controlnet,
)
from model.release import WeightsError
from model.unet import UNet
from model.weights import load_diffusers
from release import randomize


def inputs(seed=1, size=16, factor=2, channels=64):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(2, 4, size, size, generator=g), torch.tensor([3, 777])
    cond = {"text": torch.randn(2, 77, channels, generator=g), "level": torch.tensor([12.0, 18.7])}
    control = torch.rand(2, 3, size * factor, size * factor, generator=g) * 2 - 1
    return x, t, cond, control


def test_zero_convolutions_give_the_base_unet_exactly():
    torch.manual_seed(0)
    unet = UNet(load_config("configs/tiny.py").model.unet).eval()
    net = ControlNet.from_unet(unet, ControlNetConfig(embedding_channels=(8, 16))).eval()
    for k, v in unet.state_dict().items():  # the encoder starts as the U-Net's copy
        if k in net.state_dict():
            assert torch.equal(net.state_dict()[k], v), k
    x, t, cond, control = inputs(channels=unet.cfg.context_dim)
    with torch.no_grad():
        base = unet(x, t, cond)
        down, mid = net(x, t, cond, control)
        controlled = Controlled(unet, [(net, control, 1.0)])(x, t, cond)
    assert all(not r.any() for r in down) and not mid.any()
    assert torch.equal(controlled, base)


def test_parity_with_diffusers_controlnet(tiny_release, tmp_path):
    """diffusers' ControlNetModel.from_unet of the release's U-Net, every weight random (zero convolutions too), saved
    with save_pretrained: our residuals and the controlled U-Net's prediction match diffusers' (control in [0, 1]
    there, [-1, 1] here)."""
    from diffusers import ControlNetModel

    folder, refs = tiny_release
    ref = randomize(
        ControlNetModel.from_unet(refs["unet"], conditioning_embedding_out_channels=(8, 16)), 5
    ).eval()
    assert ref.config.class_embed_type == "timestep"
    ref.save_pretrained(tmp_path / "controlnet")
    ours = load_diffusers(folder).eval()
    net, _ = load_controlnet(tmp_path / "controlnet", ours.unet)
    x, t, cond, control = inputs()
    with torch.no_grad():
        r_down, r_mid = ref(
            x,
            t,
            encoder_hidden_states=cond["text"],
            controlnet_cond=(control + 1) / 2,
            class_labels=cond["level"],
            conditioning_scale=0.7,
            return_dict=False,
        )
        expected = refs["unet"](
            x,
            t,
            encoder_hidden_states=cond["text"],
            class_labels=cond["level"],
            down_block_additional_residuals=r_down,
            mid_block_additional_residual=r_mid,
        ).sample
        down, mid = net(x, t, cond, control, scale=0.7)
        out = Controlled(ours.unet, [(net, control, 0.7)])(x, t, cond)
        plain = ours.unet(x, t, cond)
    assert len(down) == len(r_down)
    for a, b in zip(down, r_down):
        assert (a - b).abs().max() <= 1e-4 * max(1.0, b.abs().max().item())
    assert (mid - r_mid).abs().max() <= 1e-4 * max(1.0, r_mid.abs().max().item())
    assert (expected - plain).abs().max() > 1e-2  # the control changes the prediction
    assert (out - expected).abs().max() <= 1e-4
    # the lone file (diffusers' keys, no config): the architecture is the U-Net's, the embedding read off the keys
    save_file(
        {k: v.contiguous() for k, v in ref.state_dict().items()}, tmp_path / "lone.safetensors"
    )
    lone, _ = load_controlnet(tmp_path / "lone.safetensors", ours.unet)
    assert lone.control_cfg == ControlNetConfig(3, (8, 16))
    with torch.no_grad():
        assert torch.equal(lone(x, t, cond, control)[1], net(x, t, cond, control)[1])


def test_file_round_trip_and_errors(tmp_path):
    torch.manual_seed(0)
    cfg = load_config("configs/tiny.py").model.unet
    unet = UNet(cfg).eval()
    net = ControlNet.from_unet(unet, ControlNetConfig(embedding_channels=(8, 16)))
    with torch.no_grad():
        for p in net.zero_mid.parameters():
            p.normal_()
    save_controlnet(net, tmp_path / "c.safetensors", {"task": "pan2rgb"})
    back, info = load_controlnet(tmp_path / "c.safetensors", unet)
    assert info == {"task": "pan2rgb"}
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in net.state_dict().items())
    x, t, cond, control = inputs(channels=cfg.context_dim)
    with pytest.raises(
        ValueError,
        match=r"control image of shape \(2, 1, 32, 32\): this ControlNet reads "
        r"\(B, 3, 32, 32\)",
    ):
        back(x, t, cond, control[:, :1])
    with pytest.raises(ValueError, match=r"control image of shape \(2, 3, 16, 16\)"):
        back(x, t, cond, control[:, :, :16, :16])
    other = copy.deepcopy(cfg)
    other.channels = tuple(2 * c for c in cfg.channels)
    with pytest.raises(
        WeightsError,
        match=r"a ControlNet for another U-Net: channels: \(32, 64, 64\) here, "
        r"\(64, 128, 128\) in the U-Net",
    ):
        load_controlnet(tmp_path / "c.safetensors", UNet(other))
    state = {k: v for k, v in net.state_dict().items() if not k.startswith("zero_mid")}
    state["down.0.res.0.conv1.weight"] = torch.zeros(3, 3, 3, 3)
    save_file(
        state,
        tmp_path / "broken.safetensors",
        metadata=dict(
            __import__("model.weights", fromlist=["read_metadata"]).read_metadata(
                tmp_path / "c.safetensors"
            )
        ),
    )
    with pytest.raises(
        WeightsError,
        match=r"shapes differ \(1\): 'down\.0\.res\.0\.conv1\.weight' \(3, 3, 3, 3\).*"
        r"missing \(2\): zero_mid\.weight, zero_mid\.bias",
    ):
        load_controlnet(tmp_path / "broken.safetensors", unet)
    save_file({"w": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(WeightsError, match="neither a ControlNet of ours"):
        load_controlnet(tmp_path / "x.safetensors", unet)


def test_a_controlnet_run_trains_it_alone_resumes_exactly_and_translates(
    tiny_ckpt, tmp_path, capsys
):
    """train.py --objective=control on the procedural Earth's PAN -> RGB pairs from a checkpoint: the model's weights
    never move, the export is the ControlNet alone with its task, 2 + 2 resumed steps equal 4 straight; edit.py
    translate runs it and refuses what does not fit."""
    import edit
    import train
    from trainer.checkpoint import checkpoint_paths, load_checkpoint
    from PIL import Image
    from model.weights import load_model

    args = [
        "--config",
        "configs/tiny.py",
        "--data=synthetic",
        "--image_size=32",
        "--synthetic_samples=16",
        "--num_workers=0",
        "--warmup_steps=0",
        "--lr=1e-3",
        "--batch_size=4",
        f"--init_from={tiny_ckpt}",
        "--objective=control",
        "--train=controlnet",
        "--control_task=pan2rgb",
        "--controlnet.embedding_channels=(8, 16)",
        "--ckpt_every=100",
    ]
    train.train(train.parse_config(args + [f"--out_dir={tmp_path / 'straight'}", "--max_steps=4"]))
    train.train(train.parse_config(args + [f"--out_dir={tmp_path / 'split'}", "--max_steps=2"]))
    train.train(train.parse_config(args + [f"--out_dir={tmp_path / 'split'}", "--max_steps=4"]))
    base = load_model(tiny_ckpt).state_dict()
    ckpt = load_checkpoint(checkpoint_paths(tmp_path / "straight")[-1])
    resumed = load_checkpoint(checkpoint_paths(tmp_path / "split")[-1])
    for k, v in base.items():
        assert torch.equal(ckpt["model"][k], v), k  # frozen, bit for bit
    learned = {k: v for k, v in ckpt["model"].items() if k.startswith("controlnet.")}
    assert any(
        v.abs().max() > 0 for k, v in learned.items() if "zero_" in k
    )  # the zero convolutions moved
    assert max((v - resumed["model"][k]).abs().max().item() for k, v in learned.items()) <= 1e-6
    out = tmp_path / "straight"
    assert (out / "controlnet.safetensors").is_file() and not (out / "model.safetensors").exists()
    net, info = load_controlnet(out / "controlnet.safetensors", load_model(tiny_ckpt).unet)
    assert info["task"] == "pan2rgb" and info["step"] == 4
    with pytest.raises(train.BadInput, match="--control_task"):
        train.train(
            train.parse_config(
                args + [f"--out_dir={tmp_path / 'split'}", "--max_steps=6", "--control_task=dehaze"]
            )
        )
    with pytest.raises(train.BadInput, match="--objective=control and --control_task go together"):
        train.parse_config(
            [a for a in args if a not in ("--objective=control", "--train=controlnet")]
        )

    Image.fromarray((torch.rand(32, 32) * 255).byte().numpy(), mode="L").save(tmp_path / "pan.png")
    run = [
        "translate",
        "--weights",
        str(tiny_ckpt),
        "--controlnet",
        str(out / "controlnet.safetensors"),
        "--control",
        str(tmp_path / "pan.png"),
        "--prompt",
        "a forest",
        "--level",
        "15",
        "--steps",
        "2",
    ]
    assert edit.main(run + ["--out", str(tmp_path / "t")]) == 0
    made = Image.open(tmp_path / "t" / "pan_translate_seed0.png")
    assert made.size == (32, 32) and made.text["task"] == "pan2rgb"
    Image.new("RGBA", (32, 32)).save(tmp_path / "rgba.png")
    Image.new("L", (36, 36)).save(tmp_path / "odd.png")
    for extra, message in (
        (["--task", "sr"], "--task sr: .* was trained for pan2rgb"),
        (["--size", "64", "64"], "the output has the control image's size, 32 32"),
        (["--control", str(tmp_path / "rgba.png")], "has mode RGBA \\(4 bands\\)"),
        (["--control", str(tmp_path / "odd.png")], "36x36: width and height must be multiples"),
        (["--controlnet", str(tiny_ckpt)], "--controlnet: .*neither a ControlNet of ours"),
    ):
        with pytest.raises(SystemExit) as e:
            edit.main(run + ["--out", str(tmp_path / "u")] + extra)
        err = capsys.readouterr().err
        assert e.value.code == 2 and re.search(message, err), err
