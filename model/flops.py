"""FLOP bookkeeping for MFU: the accelerators' peak FLOP/s and the U-Net's training FLOPs per image;
the CPU's name for CPU timings (`cpu_name`).

    peak = peak_tflops(torch.cuda.get_device_name())  # 756.0 on an H100 PCIe, None if unknown
    flops = unet_train_flops(UNetConfig(), latent_size=32, context_len=77)  # per 256x256 image
    mfu = images_per_s * flops / (peak * 1e12)

MFU (model FLOPs utilisation, as Chowdhery et al. define it in "PaLM", 2022) counts model FLOPs:
forward + backward = 3 x forward, whatever gradient checkpointing recomputes.
"""

import os
import platform
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from model.unet import UNet

# Dense (no structured sparsity) bf16 tensor-core peaks in TFLOP/s, fp32 accumulation, from the
# vendors' datasheets (the sparse figures printed next to them are twice these).
# torch.cuda.get_device_name() is matched against the fragments in order, case-insensitively, and
# the first one found wins: the more specific fragments come first ("H100 PCIe" before "H100",
# "L40S" before "L40" before "L4").
PEAK_TFLOPS = [
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),  # H100 NVL (per GPU)
    ("H800 PCIe", 756.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.0),  # Grace Hopper: the H100/H200 SXM die
    ("H100", 989.0),  # H100 SXM5 ("NVIDIA H100 80GB HBM3")
    ("H200", 989.0),  # H200 SXM
    ("H800", 989.0),  # H800 SXM
    ("H20", 148.0),
    ("A100", 312.0),  # A100 SXM4 and PCIe
    ("A800", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),  # GeForce RTX 4090, fp32 accumulation (330 with fp16 accumulation)
    ("MI300X", 1307.0),  # AMD Instinct MI300X (ROCm)
]


def cpu_name():
    """The CPU as /proc/cpuinfo names it, with its family and model numbers and its widest
    vector unit (AVX-512 or AVX2), since CPU timings depend on all three:
    "AMD EPYC (family 25 model 17, AVX-512)"."""
    info = {}
    if Path("/proc/cpuinfo").exists():
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            info.setdefault(key.strip(), value.strip())
    flags = info.get("flags", "").split()
    vector = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    name = info.get("model name") or platform.processor() or platform.machine()
    return f"{name} (family {info.get('cpu family', '?')} model {info.get('model', '?')}, {vector})"


def usable_cores():
    """The CPU cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def peak_tflops(device_name):
    """Dense bf16 peak TFLOP/s of the accelerator named `device_name`,
    or None if it is not in PEAK_TFLOPS."""
    name = device_name.lower()
    return next((peak for fragment, peak in PEAK_TFLOPS if fragment.lower() in name), None)


def unet_forward_flops(unet_cfg, latent_size, context_len):
    """FLOPs of one U-Net forward for one image: latents (in_channels, latent_size, latent_size),
    context_len text tokens, the config's other conditions. Counted by torch's FlopCounterMode on
    the meta device (no memory, no compute); it counts matmuls, convolutions and attention, not
    norms or activations."""
    with torch.device("meta"):
        unet = UNet(unet_cfg).eval()
        x = torch.zeros(1, unet_cfg.in_channels, latent_size, latent_size)  # 1, C, h, w
        t = torch.zeros(1)
        cond = {"text": torch.zeros(1, context_len, unet_cfg.context_dim)}  # 1, L, D
        for name, embedder in unet.cond_embed.items():  # 1 or (1, k) each
            cond[name] = torch.zeros(1) if embedder.width == 1 else torch.zeros(1, embedder.width)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(x, t, cond)
    return counter.get_total_flops()


def unet_train_flops(unet_cfg, latent_size, context_len):
    """Model FLOPs of one training step for one image: 3 x the forward (the backward takes two
    matmuls per forward matmul, one for the input gradient and one for the weight gradient)."""
    return 3 * unet_forward_flops(unet_cfg, latent_size, context_len)
