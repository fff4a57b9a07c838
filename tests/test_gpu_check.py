"""benchmarks/gpu_check.py: its CPU dry run writes every section of the report without a failure (the same code
paths as the GPU run: report writing, section guards, every subprocess call); without CUDA it asks for --dry-run."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
HEADINGS = [
    "Environment",
    "1. Kernel tests",
    "2. Attention kernels",
    "3. U-Net training step",
    "4. Sampling",
]


def test_dry_run_writes_every_section(tmp_path):
    out = tmp_path / "results" / "gpu_check.md"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    text = out.read_text()
    for heading in HEADINGS:
        assert f"\n## {heading}" in text, heading
    assert text.count("\nStatus: ok (") == len(HEADINGS), text
    assert "FAILED" not in text and "still running" not in text
    assert "| eager | 16x16 |" in text  # a sampling row was timed


@pytest.mark.skipif(
    torch.cuda.is_available(), reason="this machine has CUDA: the real check would run"
)
def test_without_cuda_needs_dry_run(tmp_path):
    out = tmp_path / "gpu.md"
    r = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == "gpu_check: no CUDA device; use --dry-run on a CPU"
    assert not out.exists()
