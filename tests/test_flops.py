"""model/flops.py: the accelerator peak table and the U-Net's FLOP count."""

import pytest

from model.config import UNetConfig
from model.flops import PEAK_TFLOPS, peak_tflops, unet_forward_flops, unet_train_flops


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 PCIe", 756.0),  # not the SXM part's 989: the more specific fragment wins
        ("NVIDIA H100 80GB HBM3", 989.0),
        ("NVIDIA H100 NVL", 835.0),
        ("NVIDIA GH200 480GB", 989.0),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA L40S", 362.0),
        ("NVIDIA L40", 181.0),
        ("NVIDIA L4", 121.0),
    ],
)
def test_peak_tflops(name, peak):
    assert peak_tflops(name) == peak


def test_peak_tflops_unknown_device():
    assert peak_tflops("Tesla T4") is None
    assert peak_tflops("") is None


def test_more_specific_fragments_come_first():
    # a fragment that contains an earlier one would never be matched
    for i, (fragment, _) in enumerate(PEAK_TFLOPS):
        for earlier, _ in PEAK_TFLOPS[:i]:
            assert earlier.lower() not in fragment.lower(), (earlier, fragment)


def test_released_unet_flops_at_256px():
    # the released U-Net (SD2-base layout plus the level embedding) at 256x256: latent 32x32, 77 text tokens.
    # Counted: 181.09 GFLOP forward, 0.5433 TFLOP training (3 x forward); the reference is 181 GFLOP forward,
    # ~0.54 TFLOP per training image (3 x 181 = 0.543).
    fwd = unet_forward_flops(UNetConfig(), latent_size=32, context_len=77)
    assert abs(fwd / 181e9 - 1) < 0.005
    train = unet_train_flops(UNetConfig(), latent_size=32, context_len=77)
    assert train == 3 * fwd
    assert abs(train / (3 * 181e9) - 1) < 0.005
