"""sample.py: end-to-end parity with the equivalent diffusers computation, the CLI, determinism, bad input."""

import pytest
import torch
from PIL import Image

import sample
from model.pipeline import generate
from model.weights import load_weights, save_model


@pytest.mark.parametrize(
    "sampler,scheduler_cls", [("ddim", "DDIMScheduler"), ("euler", "EulerDiscreteScheduler")]
)
def test_end_to_end_matches_diffusers(tiny_release, sampler, scheduler_cls):
    """Text encoder -> U-Net (class_labels = level; "" and level 0 in the null branch) -> scheduler -> VAE."""
    import diffusers
    from transformers import CLIPTokenizer

    folder, refs = tiny_release
    prompts, levels, cfg, steps = (
        ["a river crosses farmland", "dense residential blocks"],
        [17.0, 12.5],
        4.0,
        6,
    )
    model = load_weights(folder)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    ours = generate(
        model,
        {"text": prompts, "level": levels},
        seeds=[0, 1],
        sampler=sampler,
        steps=steps,
        guidance={"text": cfg, "level": cfg},
        size=(16, 16),
        noise=noise,
    )

    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    sched = getattr(diffusers, scheduler_cls).from_pretrained(folder / "scheduler")
    with torch.no_grad():
        ids = tok(
            prompts + [""],
            padding="max_length",
            max_length=77,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        states = refs["text_encoder"](ids).last_hidden_state
        ctx = torch.cat([states[:2], states[2:].expand(2, -1, -1)])  # [cond, null]
        lv = torch.tensor(levels + [0.0, 0.0])
        sched.set_timesteps(steps)
        x = noise * sched.init_noise_sigma
        for t in sched.timesteps:
            inp = sched.scale_model_input(torch.cat([x, x]), t)
            eps = refs["unet"](inp, t, encoder_hidden_states=ctx, class_labels=lv).sample
            cond, null = eps.chunk(2)
            x = sched.step(null + cfg * (cond - null), t, x).prev_sample
        ref = refs["vae"].decode(x / 0.18215).sample.clamp(-1, 1)
    assert ref.std() > 0.05
    assert (ours - ref).abs().max().item() <= 1e-4


def run(args):
    return sample.main([str(a) for a in args])


def test_cli_writes_pngs_with_metadata_and_is_deterministic(tiny_ckpt, tmp_path):
    common = [
        "--weights",
        tiny_ckpt,
        "--size",
        16,
        16,
        "--steps",
        3,
        "--n",
        2,
        "--prompt",
        "a lake",
        "--prompt",
        "16_GOOGLE_LEVEL_an airport with two runways",
        "--level",
        11,
    ]
    assert run(common + ["--out", tmp_path / "a"]) == 0
    assert run(common + ["--out", tmp_path / "b"]) == 0
    files = sorted(p.name for p in (tmp_path / "a").glob("*.png"))
    assert files == [
        "000_a_lake_L11_seed0.png",
        "001_a_lake_L11_seed1.png",
        "002_an_airport_with_two_runways_L16_seed0.png",
        "003_an_airport_with_two_runways_L16_seed1.png",
        "grid.png",
    ]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (
            tmp_path / "b" / name
        ).read_bytes()  # same seed, same image
    im = Image.open(tmp_path / "a" / files[2])
    assert im.size == (16, 16)
    assert im.text["prompt"] == "an airport with two runways" and im.text["level"] == "16"
    assert im.text["seed"] == "0" and im.text["sampler"] == "dpmpp_2m" and im.text["steps"] == "3"
    assert im.text["cfg"] == "4.0"
    a0, a1 = (torch.tensor(list(Image.open(tmp_path / "a" / f).getdata())) for f in files[:2])
    assert not torch.equal(a0, a1)  # different seeds differ


def test_cli_level_cfg(tiny_ckpt, tmp_path):
    """--level-cfg equal to --cfg is the joint guidance (same image); another value changes the image."""
    common = [
        "--weights",
        tiny_ckpt,
        "--size",
        16,
        16,
        "--steps",
        3,
        "--prompt",
        "a lake",
        "--level",
        15,
        "--cfg",
        3,
    ]
    pixels = lambda d: torch.tensor(
        list(Image.open(d / "000_a_lake_L15_seed0.png").getdata())
    ).float()
    assert run(common + ["--out", tmp_path / "joint"]) == 0
    assert run(common + ["--level-cfg", 3, "--out", tmp_path / "same"]) == 0
    assert run(common + ["--level-cfg", 8, "--out", tmp_path / "sep"]) == 0
    assert torch.equal(pixels(tmp_path / "joint"), pixels(tmp_path / "same"))
    assert (pixels(tmp_path / "joint") - pixels(tmp_path / "sep")).abs().mean() > 0.5
    assert Image.open(tmp_path / "sep" / "000_a_lake_L15_seed0.png").text["level_cfg"] == "8.0"


def test_cli_refuses_to_overwrite(tiny_ckpt, tmp_path):
    args = [
        "--weights",
        tiny_ckpt,
        "--size",
        16,
        16,
        "--steps",
        1,
        "--prompt",
        "x",
        "--out",
        tmp_path,
    ]
    assert run(args) == 0
    with pytest.raises(SystemExit) as e:
        run(args)
    assert e.value.code == 2
    assert run(args + ["--overwrite"]) == 0


@pytest.mark.parametrize(
    "bad,message",
    [
        (["--sampler", "heun"], "invalid choice: 'heun'"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--level", "21"], "outside [0, 20]"),
        (["--prompt", "25_GOOGLE_LEVEL_x"], "outside [0, 20]"),
        (["--size", "100", "64"], "multiples of 8"),
        (["--resolution-m", "-1"], "--resolution-m must be > 0"),
        (["--level-cfg", "-1"], "--level-cfg must be >= 0"),
        (["--weights", "/nonexistent/weights"], "does not exist"),
        (["--prompt", "abc_GOOGLE_LEVEL_farm"], "level prefix 'abc' is not a number"),
        (["--device", "cuda:7" if torch.cuda.is_available() else "cuda"], "CUDA"),
        (["--device", "tpu9"], "is not a device"),
    ],
)
def test_cli_bad_input_is_one_clear_error(bad, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        run(["--prompt", "x", "--out", tmp_path] + bad)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_cli_level_cfg_needs_a_level_embedding(tmp_path, capsys):
    from model.config import load_config
    from model.text2earth import Text2Earth

    cfg = load_config("configs/tiny.py").model
    cfg.unet.scalar_conditions = ()
    save_model(Text2Earth(cfg), tmp_path / "nolevel.safetensors")
    for bad, message in (
        (["--level-cfg", 5], "unrecognized arguments: --level-cfg"),  # no such condition,
        (["--level", 14], "unrecognized arguments: --level"),  # so no such flags
        (["--prompt", "15_GOOGLE_LEVEL_x"], "level: the U-Net of"),
    ):
        with pytest.raises(SystemExit) as e:
            run(
                [
                    "--prompt",
                    "x",
                    "--weights",
                    tmp_path / "nolevel.safetensors",
                    "--out",
                    tmp_path / "o",
                ]
                + bad
            )
        err = capsys.readouterr().err
        assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_cli_weights_that_hold_something_else(tmp_path, capsys):
    (tmp_path / "notes.safetensors").write_bytes(b"not a model")
    with pytest.raises(SystemExit) as e:
        run(["--prompt", "x", "--weights", tmp_path / "notes.safetensors", "--out", tmp_path / "o"])
    assert e.value.code == 2 and "not a readable safetensors file" in capsys.readouterr().err
