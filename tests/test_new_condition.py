"""A scalar condition added to a model's config alone is trained, sampled, edited and evaluated with: the readers
pass the manifest's column through, training reads it, and every script offers its flags (`--cloud V`,
`--cloud-cfg S`) from the model's condition table, with no other code change."""

import io
import json
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

import edit
import evaluate
import sample
import train
from trainer.checkpoint import checkpoint_paths, load_checkpoint

CONFIG = textwrap.dedent("""
    from model.config import ConditionConfig, ModelConfig, TextConfig, UNetConfig, VAEConfig, default_conditions
    model = ModelConfig(
        unet=UNetConfig(channels=(32, 64, 64), attention=(True, True, False), heads=(2, 4, 4), context_dim=64,
                        norm_groups=8, scalar_conditions=("level", "cloud")),
        vae=VAEConfig(channels=(32, 64), layers_per_level=1, norm_groups=8),
        text=TextConfig(width=64, heads=4, layers=2),
        conditions={**default_conditions(), "cloud": ConditionConfig(field="cloud", null=0.0, p_drop=0.1)},
    )
""")


def _folder(root, n=8):
    """Images with a caption, a level and a cloud cover in a jsonl manifest."""
    root.mkdir()
    rows = []
    for i in range(n):
        pixels = torch.randint(
            0, 255, (32, 32, 3), generator=torch.Generator().manual_seed(i), dtype=torch.uint8
        )
        buf = io.BytesIO()
        Image.fromarray(pixels.numpy()).save(buf, format="PNG")
        (root / f"{i}.png").write_bytes(buf.getvalue())
        rows.append(
            json.dumps({"file": f"{i}.png", "caption": f"scene {i}", "level": 15, "cloud": i / n})
        )
    (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return root / "manifest.jsonl"


def test_a_condition_added_to_the_config_is_read_everywhere(tmp_path, capsys):
    (tmp_path / "cloudy.py").write_text(CONFIG)
    manifest = _folder(tmp_path / "data")
    run = tmp_path / "run"
    assert (
        train.main(
            [
                "--config",
                str(tmp_path / "cloudy.py"),
                "--data=folder",
                f"--data_path={manifest}",
                "--image_size=32",
                "--batch_size=4",
                "--max_steps=2",
                "--num_workers=0",
                "--lr=1e-2",
                "--warmup_steps=0",
                "--allow_untrained",
                f"--out_dir={run}",
            ]
        )
        == 0
    )
    weights = run / "model.safetensors"
    embedder = load_checkpoint(checkpoint_paths(run)[-1])["model"]
    assert any(k.startswith("unet.cond_embed.cloud.") for k in embedder)

    common = ["--weights", str(weights), "--steps", "2", "--seed", "3"]
    for cloud, out in (("0.9", "a"), ("0.0", "b")):
        assert (
            sample.main(
                [
                    "--prompt",
                    "scene 1",
                    "--size",
                    "32",
                    "32",
                    "--cloud",
                    cloud,
                    "--cloud-cfg",
                    "2",
                    "--out",
                    str(tmp_path / out),
                    *common,
                ]
            )
            == 0
        )
    a, b = (Image.open(next((tmp_path / d).glob("000_*.png"))) for d in "ab")
    assert a.text["cloud"] == "0.9" and a.text["cloud_cfg"] == "2.0" and b.text["cloud"] == "0"
    assert not torch.equal(
        torch.tensor(list(a.getdata())), torch.tensor(list(b.getdata()))
    )  # it is read

    assert (
        edit.main(
            [
                "img2img",
                "--image",
                str(tmp_path / "data" / "0.png"),
                "--strength",
                "0.5",
                "--prompt",
                "scene 0",
                "--cloud",
                "0.5",
                "--out",
                str(tmp_path / "e"),
                *common,
            ]
        )
        == 0
    )
    assert Image.open(tmp_path / "e" / "0_img2img_seed3.png").text["cloud"] == "0.5"

    assert (
        evaluate.main(
            [
                "--test",
                "procedural:2",
                "--n",
                "1",
                "--size",
                "32",
                "32",
                "--cloud",
                "0.25",
                "--cloud-cfg",
                "1.5",
                "--out",
                str(tmp_path / "eval"),
                *common,
            ]
        )
        == 0
    )
    generation = json.loads((tmp_path / "eval" / "generated" / "generation.json").read_text())
    assert generation["cloud"] == 0.25 and generation["cloud_cfg"] == 1.5
    assert all(
        Image.open(f).text["cloud"] == "0.25"
        for f in (tmp_path / "eval" / "generated").glob("*.png")
    )
    capsys.readouterr()


def test_a_condition_the_model_lacks_has_no_flag(tmp_path, capsys):
    """The flags follow the weights: the plain tiny model offers --level but no --cloud."""
    from model.config import load_config
    from model.text2earth import Text2Earth
    from model.weights import save_model

    save_model(Text2Earth(load_config("configs/tiny.py").model), tmp_path / "tiny.safetensors")
    with pytest.raises(SystemExit) as e:
        sample.main(
            [
                "--weights",
                str(tmp_path / "tiny.safetensors"),
                "--prompt",
                "x",
                "--cloud",
                "1",
                "--out",
                str(tmp_path / "o"),
            ]
        )
    assert e.value.code == 2 and "unrecognized arguments: --cloud 1" in capsys.readouterr().err
    assert not Path(tmp_path / "o").exists()


def test_no_script_imports_another():
    """The scripts (train, sample, edit, evaluate, demo) import library packages only; import-linter checks the
    packages' layers (.importlinter), which cannot name top-level modules."""
    import ast

    scripts = {"train", "sample", "edit", "evaluate", "demo"}
    root = Path(__file__).resolve().parents[1]
    for name in sorted(scripts):
        tree = ast.parse((root / f"{name}.py").read_text())
        imported = {
            a.name.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.Import)
            for a in n.names
        }
        imported |= {
            n.module.split(".")[0]
            for n in ast.walk(tree)
            if isinstance(n, ast.ImportFrom) and n.module
        }
        assert not imported & (scripts - {name}), (name, imported & scripts)
