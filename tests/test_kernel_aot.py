"""The attention kernels compile ahead of time for sm_90 (bf16) and sm_80 (fp16), no GPU needed (gpu_kernels/aot.py).

Each of the 4 kernels in its largest configs (tile area, then stages) at head dim 128, where the most shared
memory is: the compile succeeds and the shared memory per block fits the device's limit (the forward's 64x128
tile in 3 stages uses 98% of an A100's). benchmarks/compile_kernels.py compiles every config.

The compiles run in a child process without TRITON_INTERPRET: tests/conftest.py sets it on CPU-only machines,
and triton.compile needs triton.language imported without it, which this process may not have. The child gets
its own Triton cache, so each kernel really compiles.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]
KERNELS = {"_attn_fwd", "_attn_bwd_preprocess", "_attn_bwd_dkdv", "_attn_bwd_dq"}
HEAD_DIM = 128

_CHILD = f"""
import json
from dataclasses import asdict
from gpu_kernels import aot
for kernel, config in aot.kernel_configs({HEAD_DIM}, largest_only=True):
    for dtype, target in aot.CHECKS:
        print(json.dumps(asdict(aot.compile_for(kernel, config, dtype, {HEAD_DIM}, target))), flush=True)
"""


def _has_ptxas():
    try:
        return bool(triton.knobs.nvidia.ptxas.path)
    except (AttributeError, RuntimeError):  # no knobs in this triton, or no ptxas binary
        return False


@pytest.fixture(scope="module")
def records(tmp_path_factory):
    if not _has_ptxas():
        pytest.skip("triton finds no ptxas binary (it ships in the Linux wheels)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    child = subprocess.run(
        [sys.executable, "-c", _CHILD],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert child.returncode == 0, child.stderr[-3000:]
    return [json.loads(line) for line in child.stdout.splitlines() if line.startswith("{")]


def _name(r):
    return f"{r['kernel']} [{r['config']}] {r['dtype']} {r['target']}"


def test_covers_every_kernel_and_target(records):
    assert {r["kernel"] for r in records} == KERNELS
    assert len(records) % 2 == 0 and len(records) >= 2 * len(
        KERNELS
    )  # bf16 sm_90 and fp16 sm_80 for each
    assert {(r["dtype"], r["target"][:5]) for r in records} == {
        ("bf16", "sm_90"),
        ("fp16", "sm_80"),
    }


def test_every_compile_succeeds(records):
    failed = [f"{_name(r)}: {r['error']}" for r in records if r["error"] is not None]
    assert not failed, "\n".join(failed)


def test_shared_memory_fits_the_device(records):
    over = [
        f"{_name(r)}: {r['shared']} > {r['shared_limit']} bytes"
        for r in records
        if r["error"] is None and r["shared"] > r["shared_limit"]
    ]
    assert not over, "\n".join(over)
