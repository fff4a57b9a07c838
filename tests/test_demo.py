"""The embedded default (the README's main command), shortened: the whole pipeline runs end to end."""
import json

import pytest

import demo


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    summary = demo.main(["--fast", "--out", str(out)])
    return out, summary


def test_fast_demo_writes_everything(fast_demo):
    out, summary = fast_demo
    for name in ("model.safetensors", "grid.png", "overview.png", "results.json"):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["fast"] is True


def test_fast_demo_measures_with_a_working_probe(fast_demo):
    """The probe that judges the demo's samples must itself see class on real procedural images. (Whether the
    generated images beat the unconditional floor after the shortened run is not asserted: see issue 5.)"""
    _, summary = fast_demo
    r = summary["results"]
    assert r["real procedural images (ceiling)"]["class_acc"] > 0.5
    for name in ("generated, prompt + level (ours)", "unconditional samples (floor)"):
        assert set(r[name]) == {"class_acc", "level_acc", "level_acc_pm1"}


def test_demo_refuses_to_overwrite_a_finished_run(fast_demo):
    out, _ = fast_demo
    with pytest.raises(SystemExit) as e:
        demo.main(["--fast", "--out", str(out)])
    assert e.value.code == 2
