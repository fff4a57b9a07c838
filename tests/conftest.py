import os
import sys
from pathlib import Path

import pytest
import torch

# Triton decides at import whether it interprets kernels on the CPU; set it before anything imports
# triton.language (open_clip and diffusers do), so the kernel tests run in-process on CPU-only machines.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


@pytest.fixture(scope="session")
def tiny_release(tmp_path_factory):
    """A tiny release-shaped diffusers folder with random weights, and the reference modules it was saved from."""
    from release import make_release
    folder = tmp_path_factory.mktemp("release")
    refs = make_release(folder)
    return folder, refs


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory):
    """One of our checkpoints of configs/tiny.py, random weights (seed 0), written by save_model."""
    from model.config import load_config
    from model.text2earth import Text2Earth
    from model.weights import save_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_model(Text2Earth(load_config("configs/tiny.py").model), path)
    return path


@pytest.fixture(scope="session")
def fast_demo(tmp_path_factory):
    """The shortened from-scratch demo (demo.py --fast), run once for every test that reads it: (out folder, the
    summary demo.main returns); out holds model.safetensors and its own probe.safetensors."""
    import demo
    out = tmp_path_factory.mktemp("demo")
    summary = demo.main(["--fast", f"--out={out}"])
    return out, summary
