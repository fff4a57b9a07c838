"""Fused Triton attention (gpu_kernels/flash_attention.py) vs the plain PyTorch reference, forward and backward.

Without CUDA the kernels run in Triton's numpy interpreter. Triton reads TRITON_INTERPRET when a function is
decorated with `@triton.jit`: for our kernels when gpu_kernels.flash_attention is imported, and for triton.language's
own helpers (tl.zeros, tl.sum, tl.max, ...) when triton.language is first imported -- which open_clip and
diffusers do at import. Importing torch first is harmless. So the variable is set here before any import of
triton; if another test module already imported triton in compiled mode, this file re-runs itself in a fresh
interpreter process (test_in_fresh_interpreter_process). Setting it in tests/conftest.py avoids that.
With CUDA the same tests run on the GPU, in bf16 as well.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from gpu_kernels import flash_attention as fa  # noqa: E402
from gpu_kernels.reference import attention_reference  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels_runnable_in_this_process():
    if DEVICE == "cuda":
        return True
    from triton.runtime.interpreter import InterpretedFunction

    return fa._INTERPRET and isinstance(tl.zeros, InterpretedFunction)


IN_PROCESS = _kernels_runnable_in_this_process()
in_process = pytest.mark.skipif(
    not IN_PROCESS,
    reason="triton was imported before TRITON_INTERPRET=1 was set; "
    "see test_in_fresh_interpreter_process",
)


def _interpreter_bf16_dot_works():
    """Triton's interpreter has run tl.dot on bf16 as a product of the raw uint16 bits (triton 3.8): probe it."""
    if DEVICE == "cuda":
        return True
    if not IN_PROCESS:
        return False

    @triton.jit
    def _probe(X, Y, N: tl.constexpr):
        offs = tl.arange(0, N)
        x = tl.load(X + offs[:, None] * N + offs[None, :])
        tl.store(Y + offs[:, None] * N + offs[None, :], tl.dot(x, x))

    x = torch.randn(16, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    y = torch.empty(16, 16)
    _probe[(1,)](x, y, N=16)
    return torch.allclose(y, x.float() @ x.float(), atol=1e-2, rtol=1e-2)


_TOL = {torch.float32: 2e-3, torch.float16: 1e-2, torch.bfloat16: 1e-2}
if DEVICE == "cuda" or _interpreter_bf16_dot_works():
    DTYPES = [torch.float32, torch.float16, torch.bfloat16]
else:
    DTYPES = [
        torch.float32,
        torch.float16,
        pytest.param(
            torch.bfloat16,
            marks=pytest.mark.skip(
                reason="Triton interpreter computes bf16 tl.dot on raw bits; bf16 is tested on CUDA"
            ),
        ),
    ]

# (B, heads, Lq, Lk, D): the U-Net's situations in miniature
SHAPES = [
    (
        1,
        2,
        33,
        77,
        64,
    ),  # cross-attention: 77 text keys (not a multiple of any block), odd query count
    (1, 2, 16, 16, 32),  # tiny self-attention, one partial block
    (1, 2, 64, 5, 40),  # few keys, non-power-of-2 head dim, query count a multiple of the block
    (1, 1, 20, 64, 64),  # keys a multiple of the block (unmasked key loop)
    (2, 3, 9, 12, 32),  # several (batch, head) pairs
    (1, 1, 17, 23, 80),  # head dim 80 padded to 128
]


def _inputs(B, H, Lq, Lk, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, H, Lk, D, generator=g)
    v = torch.randn(B, H, Lk, D, generator=g)
    do = torch.randn(B, H, Lq, D, generator=g)
    return [t.to(DEVICE, dtype) for t in (q, k, v, do)]


def _check_against_reference(q, k, v, do, tol, sm_scale=None):
    """Forward output and dq, dk, dv of flash_attention vs attention_reference (fp32 math)."""
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    o = fa.flash_attention(q, k, v, sm_scale)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)

    qr, kr, vr = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    o_ref = attention_reference(qr, kr, vr, sm_scale)
    dq_ref, dk_ref, dv_ref = torch.autograd.grad(o_ref, (qr, kr, vr), do.float())

    assert o.dtype == q.dtype and o.shape == q.shape
    for name, got, ref in (
        ("o", o, o_ref),
        ("dq", dq, dq_ref),
        ("dk", dk, dk_ref),
        ("dv", dv, dv_ref),
    ):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(
            got.float(), ref, atol=tol, rtol=tol, msg=lambda m: f"{name}: {m}"
        )


@in_process
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}h{}q{}k{}d{}".format(*s))
def test_matches_reference(shape, dtype):
    q, k, v, do = _inputs(*shape, dtype)
    _check_against_reference(q, k, v, do, _TOL[dtype])


def test_reference_is_softmax_attention():
    # the reference itself, against the definition written out with explicit sums
    q, k, v, _ = _inputs(1, 1, 3, 4, 8, torch.float32)
    s = torch.einsum("bhqd,bhkd->bhqk", q.double(), k.double()) / 8**0.5
    w = s.exp() / s.exp().sum(-1, keepdim=True)
    o = torch.einsum("bhqk,bhkd->bhqd", w, v.double())
    torch.testing.assert_close(attention_reference(q, k, v).double(), o, atol=1e-6, rtol=1e-6)


@in_process
def test_non_contiguous_inputs_and_grad():
    # the U-Net produces q, k, v as (B, L, heads, D) views transposed to (B, heads, L, D), possibly as parts of
    # one fused projection; v here is contiguous so that q, k and v all have different strides.
    # o.sum() hands the backward an expanded (stride 0) gradient.
    B, H, Lq, Lk, D = 1, 2, 21, 77, 40
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, Lq, H, D, generator=g).to(DEVICE).transpose(1, 2)
    kv = torch.randn(B, Lk, 2, H, D, generator=g).to(DEVICE)
    k = kv[:, :, 0].transpose(1, 2)
    v = torch.randn(B, H, Lk, D, generator=g).to(DEVICE)
    assert not q.is_contiguous() and not k.is_contiguous() and k.stride() != v.stride()
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    o = fa.flash_attention(q, k, v)
    o.sum().backward()
    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o_ref = attention_reference(qr, kr, vr)
    o_ref.sum().backward()
    torch.testing.assert_close(o, o_ref, atol=2e-3, rtol=2e-3)
    for got, ref in ((q.grad, qr.grad), (k.grad, kr.grad), (v.grad, vr.grad)):
        torch.testing.assert_close(got, ref, atol=2e-3, rtol=2e-3)


@in_process
@pytest.mark.filterwarnings(
    "error::RuntimeWarning"
)  # in the interpreter, numpy overflow would mean an inf
def test_custom_scale_and_very_negative_scores():
    # every score about -200 nats: exp(0 - logsumexp) of a zero-padded key would overflow if the padded keys
    # (Lk = 19 is not a block multiple) were not masked out of dQ; the softmax itself stays uniform and finite
    B, H, Lq, Lk, D = 1, 1, 5, 19, 32
    q = torch.ones(B, H, Lq, D, device=DEVICE)
    k = -torch.ones(B, H, Lk, D, device=DEVICE) + 0.01 * torch.randn(B, H, Lk, D, device=DEVICE)
    v = torch.randn(B, H, Lk, D, device=DEVICE)
    do = torch.randn(B, H, Lq, D, device=DEVICE)
    _check_against_reference(q, k, v, do, 2e-3, sm_scale=200.0 / D)


def test_math_backend_is_the_reference():
    # model.attention's "math" backend is gpu_kernels/reference.py's function, and agrees with SDPA
    from model import attention as attn

    q, k, v, _ = _inputs(2, 3, 9, 77, 40, torch.float32)
    attn.set_backend("math")
    try:
        o = attn.attention(q, k, v)
    finally:
        attn.set_backend("sdpa")
    assert torch.equal(o, attention_reference(q, k, v))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(
        o, sdpa, atol=_TOL[torch.float32], rtol=_TOL[torch.float32]
    )  # TF32 may be on (CUDA)


def test_errors():
    q = torch.randn(1, 2, 8, 32, device=DEVICE)
    with pytest.raises(ValueError, match="shape"):
        fa.flash_attention(q[0], q[0], q[0])
    with pytest.raises(ValueError, match="head dim"):
        fa.flash_attention(
            q, torch.randn(1, 2, 8, 16, device=DEVICE), torch.randn(1, 2, 8, 16, device=DEVICE)
        )
    big = torch.randn(1, 1, 4, 160, device=DEVICE)
    with pytest.raises(ValueError, match="160"):
        fa.flash_attention(big, big, big)
    with pytest.raises(ValueError, match="dtype"):
        fa.flash_attention(q, q.half(), q.half())
    with pytest.raises(ValueError, match="same shape"):
        fa.flash_attention(q, q, q[:, :, :5])
    with pytest.raises(ValueError, match=r"\(B, heads\)"):
        fa.flash_attention(q, q[:, :1], q[:, :1])


def test_cpu_tensors_rejected_when_compiled(monkeypatch):
    # outside the interpreter the kernels are compiled for the GPU: CPU tensors must fail with a clear message
    monkeypatch.setattr(fa, "_INTERPRET", False)
    q = torch.randn(1, 1, 8, 32)
    with pytest.raises(ValueError, match="CUDA"):
        fa.flash_attention(q, q, q)


@pytest.mark.skipif(IN_PROCESS, reason="the kernel tests ran in this process")
def test_in_fresh_interpreter_process():
    # triton was imported (by open_clip, diffusers, ...) before TRITON_INTERPRET=1 could be set in this process:
    # run this file's kernel tests in a new process where it is set from the start
    root = Path(__file__).resolve().parents[1]
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        str(Path(__file__).resolve()),
        "-k",
        "not test_in_fresh_interpreter_process",
    ]
    r = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " passed" in r.stdout and " failed" not in r.stdout


def test_autotune_pruning_fits_blocks_to_the_sequence():
    # on the GPU the autotuner only tries blocks no larger than the (power-of-2 rounded) sequence lengths
    configs = [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}) for m in (16, 64, 128) for n in (32, 64, 128)
    ]
    kept = fa._prune_configs(configs, {"N_CTX_Q": 16, "N_CTX_K": 77}, HEAD_DIM_PAD=64)
    assert {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept} == {
        (16, 32),
        (16, 64),
        (16, 128),
    }
    kept = fa._prune_configs(configs, {"N_CTX_Q": 1024, "N_CTX_K": 1024}, HEAD_DIM_PAD=128)
    assert (
        all(c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 128 * 64 for c in kept) and len(kept) == 8
    )
    big = [
        triton.Config({"BLOCK_M": 128, "BLOCK_N": 128}),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}),
    ]
    kept = fa._prune_configs(big, {"N_CTX_Q": 5, "N_CTX_K": 5}, HEAD_DIM_PAD=64)
    assert [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) for c in kept] == [(64, 128)]


def test_benchmark_shape_bookkeeping():
    # the benchmark's U-Net shape table (SD2 layout): 16 transformers (5 per attention level + 1 mid block), each
    # with a self- and a cross-attention; attention core ~4.7% of the U-Net's 181 GFLOP per sample at 256 px
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_attention.py"
    spec = importlib.util.spec_from_file_location("bench_attention", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    shapes = bench.unet_shapes(256, batch=1)
    assert sum(s.count for s in shapes) == 32
    assert {(s.heads, s.Lq, s.Lk) for s in shapes} == {
        (5, 1024, 1024),
        (5, 1024, 77),
        (10, 256, 256),
        (10, 256, 77),
        (20, 64, 64),
        (20, 64, 77),
        (20, 16, 16),
        (20, 16, 77),
    }
    gflop = sum(s.flops_fwd() * s.count for s in shapes) / 1e9
    assert 0.04 < gflop / 181 < 0.05
    assert [s.Lq for s in bench.unet_shapes(512, batch=1) if "self" in s.name] == [
        4096,
        1024,
        256,
        64,
    ]


# ----------------------------------------------------------------------------------------------------
# The kernel inside the U-Net: a full forward + backward through the "triton" backend matches SDPA
# ----------------------------------------------------------------------------------------------------
@in_process
def test_unet_forward_backward_with_kernel_matches_sdpa():
    from model import attention as attn
    from model.config import load_config
    from model.unet import UNet

    if not fa.is_available():
        pytest.skip("triton kernels need CUDA or TRITON_INTERPRET=1")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config("configs/tiny.py").model.unet
    torch.manual_seed(0)
    unet = UNet(cfg).to(device)
    x = torch.randn(1, 4, 8, 8, device=device)
    cond = {
        "text": torch.randn(
            1, 77, cfg.context_dim, device=device
        ),  # 77 text keys: masked key blocks
        "level": torch.tensor([15.0], device=device),
    }
    results = {}
    for backend in ("sdpa", "triton"):
        attn.set_backend(backend)
        try:
            unet.zero_grad()
            out = unet(x, torch.tensor([500], device=device), cond)
            out.square().mean().backward()
        finally:
            attn.set_backend("sdpa")
        results[backend] = (out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters()})
    (o1, g1), (o2, g2) = results["sdpa"], results["triton"]
    assert (o1 - o2).abs().max().item() <= 2e-3
    for name in g1:
        scale = g1[name].abs().max().item() + 1e-8
        assert (g1[name] - g2[name]).abs().max().item() <= 2e-3 * max(1.0, scale), name
