import sys
from pathlib import Path

import pytest

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
