"""The files the default demo starts from (configs/pretrained/, made by `python demo.py --train-vae --train-probe`):
each has the content hash its manifest records and still measures what the manifest says it measured."""

import json
import shutil
from pathlib import Path

import pytest

from evaluation.probe import evaluate_probe, load_probe, load_probe_info, make_probe_data
from model.config import load_config
from model.weights import WeightsError, check_recorded, load_part, sha256, trained_parts

FOLDER = Path("configs/pretrained")
MANIFEST = json.loads((FOLDER / "manifest.json").read_text())


@pytest.mark.parametrize("name", ["demo_vae.safetensors", "demo_probe.safetensors"])
def test_shipped_files_have_their_recorded_hash_and_recipe(name):
    entry = MANIFEST[name]
    assert sha256(FOLDER / name) == entry["sha256"]
    assert check_recorded(FOLDER / name) == entry
    assert entry["command"].startswith("python demo.py --train-")
    assert (FOLDER / name).stat().st_size < 4_000_000  # a few MB at most in the repository


def test_a_changed_file_is_refused(tmp_path):
    for name in ("demo_vae.safetensors", "manifest.json"):
        shutil.copy(FOLDER / name, tmp_path / name)
    with open(tmp_path / "demo_vae.safetensors", "r+b") as f:  # one byte of the weights
        f.seek(-3, 2)
        byte = f.read(1)
        f.seek(-3, 2)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(WeightsError, match="content hash"):
        check_recorded(tmp_path / "demo_vae.safetensors")


def test_shipped_vae_reconstructs_held_out_renders_to_its_recorded_error():
    """The VAE alone (no U-Net, no text tower in the file), the demo's architecture, its recorded latent scale;
    held-out renders (never in its training pool) come back with the recorded mean absolute error."""
    held = MANIFEST["demo_vae.safetensors"]["held_out"]
    assert trained_parts(FOLDER / "demo_vae.safetensors") == {"vae"}
    vae = load_part(FOLDER / "demo_vae.safetensors", "vae")
    demo_vae = dict(
        load_config("configs/demo.py").model.vae.__dict__, scaling_factor=vae.cfg.scaling_factor
    )
    assert vae.cfg.__dict__ == demo_vae  # the demo's architecture
    images = make_probe_data(held["n"], size=held["size"], seed=held["seed"])[0]
    latents = vae.encode_latents(images, sample=False)  # scaled by the factor measured on them
    assert latents.shape == (held["n"], 4, 8, 8) and 0.7 < latents.std().item() < 1.4
    l1 = (vae.reconstruct(images) - images).abs().mean().item()
    assert abs(l1 - held["l1"]) < 1e-4, (l1, held["l1"])
    assert l1 < 0.08  # and that is a working VAE


def test_shipped_probe_reads_held_out_renders_at_its_recorded_accuracy():
    """The probe reads the class and the level of 540 held-out real renders as recorded (to a sample or two:
    another CPU may round a borderline logit the other way), and it was made on the shipped VAE."""
    entry = MANIFEST["demo_probe.safetensors"]
    assert entry["vae_sha256"] == MANIFEST["demo_vae.safetensors"]["sha256"]
    probe = load_probe(FOLDER / "demo_probe.safetensors")
    recorded = entry["held_out"]["real procedural images (ceiling)"]
    assert (
        load_probe_info(FOLDER / "demo_probe.safetensors")["results"][
            "real procedural images (ceiling)"
        ]
        == recorded
    )
    images, labels, levels = make_probe_data(
        entry["held_out"]["n"], size=32, seed=entry["held_out"]["seed"]
    )
    measured = evaluate_probe(probe, images, labels, levels)
    for key in ("class_acc", "level_acc", "level_acc_pm1"):
        assert abs(measured[key] - recorded[key]) <= 2.5 / 540, (key, measured[key], recorded[key])
    assert measured["class_acc"] > 0.9 and measured["level_acc_pm1"] > 0.85
    vae = load_part(FOLDER / "demo_vae.safetensors", "vae")
    through = evaluate_probe(probe, vae.reconstruct(images), labels, levels)
    recorded = entry["held_out"]["real images through the VAE"]
    assert abs(through["class_acc"] - recorded["class_acc"]) <= 2.5 / 540
