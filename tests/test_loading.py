"""Start-up and loading: what is imported, weights memory-mapped and assigned (no second copy, the file never
written), precision chosen at load time, pre-encoded prompts, sample.py's speed options and their errors."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import sample
from model.pipeline import generate, prepare_for_sampling
from model.weights import load_model, load_weights

ROOT = Path(__file__).resolve().parents[1]


def test_start_up_imports_no_model_zoo():
    """Loading and sampling need neither the open_clip package (its registry pulls in transformers and
    torchvision) nor any reference library; the tokenizer is still open_clip's."""
    code = (
        "import sys, sample; from model.text import Tokenizer; ids = Tokenizer()('a river'); "
        "print(ids[0, :4].tolist()); "
        "print([m for m in ('open_clip', 'transformers', 'torchvision', 'diffusers', 'timm') if m in sys.modules])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    ids, loaded = out.strip().splitlines()
    from open_clip.tokenizer import SimpleTokenizer

    assert json.loads(ids) == SimpleTokenizer()(["a river"])[0, :4].tolist()
    assert loaded == "[]"


def test_loaded_weights_are_the_file_mapped_copy_on_write(tiny_ckpt):
    """Loaded on the CPU in the file's precision, the weights are the file's own pages; changing them (training
    on) never writes to the file."""
    digest = hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest()
    model = load_model(tiny_ckpt)
    reference = load_file(str(tiny_ckpt))
    for k, v in model.state_dict().items():
        assert torch.equal(v, reference[k]), k
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert hashlib.sha256(tiny_ckpt.read_bytes()).hexdigest() == digest
    assert all(p.requires_grad for p in model.parameters())  # trainable as built


def test_precision_is_chosen_at_load(tiny_release, tmp_path):
    """--dtype: the U-Net and text encoder read straight into bf16 (the values are the fp32 weights rounded);
    the VAE stays fp32; a part asked for in fp16 reads the release's `.fp16` variant when there is one."""
    folder, _ = tiny_release
    full = load_weights(folder)
    half = load_weights(folder, dtype={"unet": torch.bfloat16, "text_encoder": torch.bfloat16})
    assert {p.dtype for p in half.unet.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.text_encoder.parameters()} == {torch.bfloat16}
    assert {p.dtype for p in half.vae.parameters()} == {torch.float32}
    for k, v in full.unet.state_dict().items():
        assert torch.equal(half.unet.state_dict()[k], v.to(torch.bfloat16)), k

    copy = tmp_path / "release"
    subprocess.run(["cp", "-r", str(folder), str(copy)], check=True)
    weights = copy / "unet" / "diffusion_pytorch_model.safetensors"
    variant = {
        k: (v * 0.5).half() for k, v in load_file(str(weights)).items()
    }  # recognisably the variant's
    save_file(variant, str(weights.with_name("diffusion_pytorch_model.fp16.safetensors")))
    fp16 = load_weights(copy, dtype={"unet": torch.float16})
    assert torch.equal(fp16.unet.conv_in.weight, variant["conv_in.weight"])
    assert torch.equal(
        load_weights(copy).unet.conv_in.weight, full.unet.conv_in.weight
    )  # fp32: the full file


def test_openclip_file_into_a_meta_built_tower(tmp_path):
    """An OpenCLIP checkpoint (a torch zip file here, as released) read memory-mapped into a tower built on the
    meta device: its weights are the file's, the extra block and the vision tower left out."""
    from model.config import TextConfig
    from model.text import TextEncoder
    from model.weights import load_openclip_text

    torch.manual_seed(3)
    source = TextEncoder(TextConfig(width=64, heads=4, layers=3))
    state = {k.removeprefix("tower."): v for k, v in source.state_dict().items()}
    torch.save(
        {**state, "visual.proj": torch.zeros(2), "logit_scale": torch.ones(())},
        tmp_path / "open_clip.bin",
    )
    with torch.device("meta"):
        tower = TextEncoder(TextConfig(width=64, heads=4, layers=2))
    load_openclip_text(tmp_path / "open_clip.bin", tower)
    for k, v in tower.state_dict().items():
        assert v.device.type == "cpu" and torch.equal(v, source.state_dict()[k]), k
    ids = torch.randint(1, 49406, (1, 77))
    assert torch.isfinite(tower(ids)).all()


def test_prompts_given_encoded_give_the_same_images(tiny_ckpt):
    """generate with contexts encoded beforehand (sample.py frees the text encoder after encoding) == with the
    strings."""
    model = load_model(tiny_ckpt)
    prompts, levels = ["a lake", "an airport"], [15.0, 11.0]
    kw = dict(seeds=[0, 1], steps=3, size=(16, 16))
    strings = generate(model, {"text": prompts, "level": levels}, negative_prompt="clouds", **kw)
    contexts, null = model.encode_text(prompts), model.encode_text(["clouds"])
    model.text_encoder = None
    encoded = generate(model, {"text": contexts, "level": levels}, negative_prompt=null, **kw)
    assert (strings - encoded).abs().max().item() <= 1e-5


def test_channels_last_samples_the_same(tiny_ckpt):
    model = load_model(tiny_ckpt)
    kw = dict(seeds=[0], steps=3, size=(16, 16))
    eager = generate(model, {"text": ["a lake"], "level": [14.0]}, **kw)
    nhwc = generate(
        prepare_for_sampling(model, channels_last=True), {"text": ["a lake"], "level": [14.0]}, **kw
    )
    assert (eager - nhwc).abs().max().item() <= 1e-4


def cli_error(args, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    return err


def test_cli_speed_options_bad_input(tiny_ckpt, tmp_path, capsys, monkeypatch):
    common = [
        "--weights",
        tiny_ckpt,
        "--prompt",
        "x",
        "--size",
        16,
        16,
        "--steps",
        1,
        "--out",
        tmp_path,
    ]
    assert "--dtype fp16 is refused on the CPU" in cli_error(
        common + ["--dtype", "fp16", "--device", "cpu"], capsys
    )
    assert "the Triton kernel runs on CUDA" in cli_error(
        common + ["--attention", "triton", "--device", "cpu"], capsys
    )
    monkeypatch.setattr("model.pipeline.shutil.which", lambda name: None)  # no C++ compiler here
    err = cli_error(common + ["--compile", "--device", "cpu"], capsys)
    assert (
        "--compile: torch.compile on the CPU needs a C++ compiler" in err
        and "without --compile" in err
    )
    assert not list(tmp_path.glob("*.png"))


def test_cli_bf16_on_cpu(tiny_ckpt, tmp_path):
    """bf16 on the CPU samples (the U-Net and text tower in bf16, the VAE in fp32)."""
    args = [
        "--weights",
        tiny_ckpt,
        "--prompt",
        "a lake",
        "--size",
        16,
        16,
        "--steps",
        2,
        "--dtype",
        "bf16",
        "--device",
        "cpu",
        "--channels-last",
        "--out",
        tmp_path,
    ]
    assert sample.main([str(a) for a in args]) == 0
    assert (tmp_path / "000_a_lake_L0_seed0.png").exists()


MEMORY_CHILD = """
import gc, sys, torch
from model.weights import load_weights
def peak():   # VmHWM: this process's own peak RSS (ru_maxrss would start from the parent's, across fork and exec)
    return 1024 * int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1])
torch.ones(1) @ torch.ones(1)                              # the runtime's own pages, before the baseline
gc.collect()
before = peak()
model = load_weights(sys.argv[1])
total = sum(float(p.sum()) for p in model.parameters())    # every weight read: all its pages touched
nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
print(peak() - before, nbytes, total == total)
"""


@pytest.mark.skipif(
    not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)"
)
def test_loading_peak_memory_is_the_weights(tmp_path):
    """A mid-sized release (1.07 GB in fp32): loading it and reading every weight grows the process's peak RSS by
    the weights and a margin (the text tower's q/k/v fused into new tensors), not by twice the weights as loading
    into a model's own memory and copying the file's tensors in does (2.41 GB measured)."""
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_sample_process import (
        make_release,
    )  # diffusers' and transformers' own files

    make_release(tmp_path / "mid", "mid")
    out = subprocess.run(
        [sys.executable, "-c", MEMORY_CHILD, str(tmp_path / "mid")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    grown, weights, finite = int(out[0]), int(out[1]), out[2] == "True"
    assert finite and weights > 1e9
    assert grown <= 1.05 * weights + 64e6, (
        f"peak grew {grown / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"
    )


@pytest.mark.parametrize(
    "header,message",
    [
        ([1, 2], "its header is not a JSON object"),
        ({"w": {"dtype": "F32", "shape": [2]}}, "corrupt header entry for key 'w'"),
        ({"w": {"dtype": "Q9", "shape": [1], "data_offsets": [0, 4]}}, "key 'w' has dtype 'Q9'"),
        ({"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, "lies outside the file"),
    ],
)
def test_corrupt_safetensors_header_is_named(tmp_path, header, message):
    from model.release import WeightsError, read_tensors

    raw = json.dumps(header).encode()
    path = tmp_path / "bad.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + bytes(8))
    with pytest.raises(WeightsError, match=f"{path.name}.*{message}"):
        read_tensors(path)
