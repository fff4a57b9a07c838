"""LoRA (model/lora.py): the zero-initialised adapter changes nothing, merged equals live, files are small and round
trip, a diffusers / peft LoRA gives diffusers' own output, and adapters for another architecture are refused."""

import copy

import pytest
import torch

from model import lora
from model.config import load_config
from model.release import WeightsError
from model.text2earth import Text2Earth
from model.unet import UNet
from model.weights import load_diffusers

ALL = lora.ATTENTION + lora.FEED_FORWARD + lora.CONVOLUTIONS


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return Text2Earth(load_config("configs/tiny.py").model).eval()


def inputs(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    x = torch.randn(2, cfg.unet.in_channels, 8, 8, generator=g)
    ctx = torch.randn(2, 77, cfg.unet.context_dim, generator=g)
    return x, torch.tensor([10, 900]), {"text": ctx, "level": torch.tensor([12.0, 17.0])}


def randomize_b(module, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_layers(module):
            m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g) * 0.05)


def test_zero_initialised_adapters_change_nothing_bitwise(tiny):
    unet = copy.deepcopy(tiny.unet)
    x, t, cond = inputs(tiny)
    with torch.no_grad():
        before = unet(x, t, cond)
        names = lora.add_lora(unet, lora.LoRAConfig(rank=4, alpha=8, targets=ALL))
        after = unet(x, t, cond)
    assert torch.equal(before, after)
    assert any(n.endswith("to_q") for n in names) and any(n.endswith("conv1") for n in names)
    assert set(unet.state_dict()) - set(tiny.unet.state_dict()) == {
        f"{n}.{k}" for n in names for k in ("lora_A", "lora_B")
    }


def test_merged_equals_live_and_unmerge_restores(tiny):
    unet = copy.deepcopy(tiny.unet)
    lora.add_lora(unet, lora.LoRAConfig(rank=4, alpha=8, targets=ALL))
    randomize_b(unet)
    x, t, cond = inputs(tiny)
    with torch.no_grad():
        live = unet(x, t, cond)
        lora.merge_lora(unet)
        merged = unet(x, t, cond)
        lora.unmerge_lora(unet)
        again = unet(x, t, cond)
    base = tiny.unet(x, t, cond)
    assert (live - base).abs().max() > 1e-3  # the adapters do something
    assert (merged - live).abs().max() <= 1e-5 and (again - live).abs().max() <= 1e-5


def test_only_adapters_train_and_the_file_round_trips(tiny, tmp_path):
    unet = copy.deepcopy(tiny.unet)
    cfg = lora.LoRAConfig(rank=2, alpha=2, targets=lora.ATTENTION)
    lora.add_lora(unet, cfg)
    params = lora.lora_parameters(unet)
    assert all(p.requires_grad for p in params) and len(params) == 2 * len(lora.lora_layers(unet))
    randomize_b(unet)
    lora.save_lora(unet, tmp_path / "a.safetensors", cfg, {"task": "test"})
    x, t, cond = inputs(tiny)
    fresh = copy.deepcopy(tiny.unet)
    with torch.no_grad():
        live = unet(x, t, cond)
        handle = lora.load_lora(fresh, tmp_path / "a.safetensors")
        loaded = fresh(x, t, cond)
        lora.unload_lora(fresh, handle)
        half = lora.load_lora(fresh, tmp_path / "a.safetensors", scale=0.5)
        halfway = fresh(x, t, cond)
        lora.unload_lora(fresh, half)
    assert (loaded - live).abs().max() <= 1e-5
    for _, m in lora.lora_layers(unet):
        m.lora_B.data /= 2  # scale 0.5 = half the update
    with torch.no_grad():
        assert (halfway - unet(x, t, cond)).abs().max() <= 1e-5
    for (k, v), w in zip(fresh.state_dict().items(), tiny.unet.state_dict().values()):
        torch.testing.assert_close(v, w, atol=1e-6, rtol=0, msg=k)


def test_adapter_sizes_for_the_text2earth_unet(capsys):
    """Adapter parameters on the 865 M-parameter SD2 U-Net (built on the meta device), attention projections."""
    cfg = load_config("configs/text2earth.py").model
    sizes = {}
    for rank in (4, 16, 64):
        with torch.device("meta"):
            unet = UNet(cfg.unet)
        lora.add_lora(unet, lora.LoRAConfig(rank=rank, alpha=rank))
        sizes[rank] = sum(p.numel() for p in lora.lora_parameters(unet))
    print({r: f"{n / 1e6:.2f} M params, {2 * n / 2**20:.1f} MiB in fp16" for r, n in sizes.items()})
    assert sizes[16] == 4 * sizes[4] and sizes[64] == 16 * sizes[4]
    assert 0.5e6 < sizes[4] < 2e6  # a few MB against the U-Net's 3.5 GB


def test_peft_lora_in_the_diffusers_layout_matches_diffusers(tiny_release, tmp_path):
    """A LoRA attached to diffusers' U-Net by peft (rank 4, alpha 8, random B), saved as diffusers writes LoRA files
    (`unet.`-prefixed peft keys), merged into our U-Net: the same prediction as diffusers' U-Net with it."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    folder, refs = tiny_release
    ref = copy.deepcopy(refs["unet"]).eval()
    torch.manual_seed(3)
    ref.add_adapter(
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
            init_lora_weights=False,
        )
    )
    state = {f"unet.{k}": v.contiguous() for k, v in get_peft_model_state_dict(ref).items()}
    save_file(state, tmp_path / "pytorch_lora_weights.safetensors")
    ours = load_diffusers(folder).eval()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(2, 4, 16, 16, generator=g), torch.tensor([3, 777])
    ctx, levels = torch.randn(2, 77, 64, generator=g), torch.tensor([12.0, 18.7])
    with torch.no_grad():
        expected = ref(x, t, encoder_hidden_states=ctx, class_labels=levels).sample
        plain = ours.unet(x, t, {"text": ctx, "level": levels})
        lora.load_lora(ours.unet, tmp_path / "pytorch_lora_weights.safetensors", alpha=8)
        out = ours.unet(x, t, {"text": ctx, "level": levels})
    assert (expected - plain).abs().max() > 1e-2  # the LoRA changes the output
    assert (out - expected).abs().max() <= 1e-4


def test_adapters_for_another_architecture_are_refused_by_name(tiny, tmp_path):
    unet = copy.deepcopy(tiny.unet)
    cfg = lora.LoRAConfig(rank=2, alpha=2)
    lora.add_lora(unet, cfg)
    lora.save_lora(unet, tmp_path / "a.safetensors", cfg)
    other = load_config("configs/tiny.py").model
    other.unet.channels = tuple(2 * c for c in other.unet.channels)
    with pytest.raises(
        WeightsError,
        match=r"LoRA for another architecture; \d+ of \d+ adapters do not fit: "
        r"down\.0\.attn\.0\.block\.attn1\.to_k \(\(32, 32\) vs the layer.s \(64, 64\)\)",
    ):
        lora.load_lora(UNet(other.unet), tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="match no linear or conv layer"):
        lora.add_lora(copy.deepcopy(tiny.unet), lora.LoRAConfig(targets=("to_qq",)))
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, tmp_path / "x.safetensors")
    with pytest.raises(WeightsError, match="neither a LoRA file"):
        lora.load_lora(unet, tmp_path / "x.safetensors")
    save_file(
        {
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qq.lora_A.weight": torch.zeros(
                2, 32
            ),
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_qq.lora_B.weight": torch.zeros(
                32, 2
            ),
        },
        tmp_path / "p.safetensors",
    )
    with pytest.raises(
        WeightsError, match=r"down\.0\.attn\.0\.block\.attn1\.to_qq \(no such layer\)"
    ):
        lora.load_lora(unet, tmp_path / "p.safetensors")


def test_sample_py_merges_loras_and_refuses_a_mismatched_one(tiny_ckpt, tmp_path, capsys):
    import sample
    from model.weights import load_model

    unet = load_model(tiny_ckpt).unet
    cfg = lora.LoRAConfig(rank=2, alpha=2)
    lora.add_lora(unet, cfg)
    randomize_b(unet, seed=5)
    for _, m in lora.lora_layers(unet):
        m.lora_B.data *= 20  # an effect visible in the image
    lora.save_lora(unet, tmp_path / "style.safetensors", cfg)
    base = [
        "--weights",
        str(tiny_ckpt),
        "--prompt",
        "a forest",
        "--size",
        "32",
        "32",
        "--steps",
        "2",
        "--level",
        "15",
    ]
    assert sample.main(base + ["--out", str(tmp_path / "a")]) == 0
    assert (
        sample.main(
            base + ["--out", str(tmp_path / "b"), "--lora", f"{tmp_path / 'style.safetensors'}:0.7"]
        )
        == 0
    )
    from PIL import Image

    a, b = (Image.open(next((tmp_path / d).glob("000_*.png"))) for d in "ab")
    assert a.tobytes() != b.tobytes()
    other = load_config("configs/tiny.py").model
    other.unet.channels = (16, 32, 32)
    small = UNet(other.unet)
    lora.add_lora(small, cfg)
    lora.save_lora(small, tmp_path / "other.safetensors", cfg)
    with pytest.raises(SystemExit) as e:
        sample.main(
            base + ["--out", str(tmp_path / "c"), "--lora", str(tmp_path / "other.safetensors")]
        )
    assert e.value.code == 2 and "--lora: " in capsys.readouterr().err


def test_a_lora_run_trains_the_adapters_alone_and_resumes_exactly(tiny_ckpt, tmp_path):
    """train.py --lora.rank=4 from a checkpoint: the base weights never move, the export is the adapters alone
    (lora_unet.safetensors, no model.safetensors), and 2 + 2 resumed steps equal 4 straight."""
    import train
    from trainer.checkpoint import checkpoint_paths, load_checkpoint
    from model.weights import load_model

    args = [
        "--config",
        "configs/tiny.py",
        "--data=synthetic",
        "--image_size=32",
        "--synthetic_samples=16",
        "--num_workers=0",
        "--warmup_steps=0",
        "--lr=1e-2",
        "--batch_size=4",
        f"--init_from={tiny_ckpt}",
        "--lora.rank=4",
        "--lora.alpha=4",
        "--ckpt_every=100",
        "--allow_untrained",
    ]
    train.train(train.parse_config(args + [f"--out_dir={tmp_path / 'straight'}", "--max_steps=4"]))
    train.train(train.parse_config(args + [f"--out_dir={tmp_path / 'split'}", "--max_steps=2"]))
    train.train(train.parse_config(args + [f"--out_dir={tmp_path / 'split'}", "--max_steps=4"]))
    base = load_model(tiny_ckpt).unet.state_dict()
    ckpt = load_checkpoint(checkpoint_paths(tmp_path / "straight")[-1])
    resumed = load_checkpoint(checkpoint_paths(tmp_path / "split")[-1])
    for k, v in base.items():
        assert torch.equal(ckpt["model"][f"unet.{k}"], v), k  # frozen, bit for bit
    adapters = {k: v for k, v in ckpt["model"].items() if ".lora_" in k}
    assert adapters and any(v.abs().max() > 0 for k, v in adapters.items() if k.endswith("lora_B"))
    assert max((v - resumed["model"][k]).abs().max().item() for k, v in adapters.items()) <= 1e-6
    assert set(ckpt["ema"]) == set(adapters)  # the EMA holds no copy of the base
    assert max((v - resumed["ema"][k]).abs().max().item() for k, v in ckpt["ema"].items()) <= 1e-6
    out = tmp_path / "straight"
    assert (out / "lora_unet.safetensors").is_file() and not (out / "model.safetensors").exists()
    adapters_file, cfg = lora.read_lora(out / "lora_unet.safetensors")
    assert cfg["rank"] == 4 and cfg["part"] == "unet" and len(adapters_file) == len(adapters) // 2
    with pytest.raises(train.BadInput, match="--lora.rank"):
        train.train(
            train.parse_config(
                args + [f"--out_dir={tmp_path / 'split'}", "--max_steps=6", "--lora.rank=8"]
            )
        )
