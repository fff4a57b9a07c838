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


@pytest.fixture(scope="session")
def random_fid_inception(tmp_path_factory):
    """A seeded random FIDInception saved as pytorch-fid's file is (torch.save of the state dict), and the net.

    He-normal convs keep the features image-dependent through the ~95 layers (PyTorch's default init makes them
    constant); BatchNorm weight, bias and running statistics are random, so eval-mode BN is not an identity."""
    import torch.nn as nn
    from evaluation.inception import INCEPTION_FILE, FIDInception

    torch.manual_seed(0)
    net = FIDInception()
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5), m.bias.normal_(0, 0.2)
                m.running_mean.normal_(0, 0.2), m.running_var.uniform_(0.5, 2.0)
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(net.state_dict(), path)
    return path, net.eval()


TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """A registered tiny open_clip architecture 'tiny-clip-test' and a random checkpoint of it (its path)."""
    import json
    import open_clip

    d = tmp_path_factory.mktemp("clip")
    (d / "tiny-clip-test.json").write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(d / "tiny-clip-test.json")
    torch.manual_seed(0)
    model = open_clip.create_model("tiny-clip-test")
    torch.save(model.state_dict(), d / "tiny.pt")
    return d / "tiny.pt"
