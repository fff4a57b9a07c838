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


def test_fast_demo_follows_the_prompt_and_the_level(fast_demo):
    """The shortened demo (VAE 300 steps, U-Net 350 steps, 32 px) must already learn both conditions: the probe
    reads the class the prompt asked for far more often than on unconditional samples, and the level it reads
    follows the level asked (correlation; accuracy within one level is not asserted: in this short run it is
    within sampling noise of the floor; docs/demo.md has the full demo's figures). Measured on 2 CPU
    cores, 324 samples: class 45.1% against a floor of 10.2%; level correlation 0.21 against 0.01 (standard
    error ~0.055); level within one 34.9% against 33.3%."""
    _, summary = fast_demo
    r = summary["results"]
    real, through_vae = r["real procedural images (ceiling)"], r["real images through the VAE"]
    assert real["class_acc"] > 0.7 and through_vae["class_acc"] > 0.4           # the probe works, also on decodes
    assert real["level_corr"] > 0.5                                              # and reads levels
    ours, floor = r["generated, prompt + level (ours)"], r["unconditional samples (floor)"]
    assert floor["class_acc"] < 0.2, floor                                       # ~1/12 when nothing is followed
    assert ours["class_acc"] > floor["class_acc"] + 0.2, (ours, floor)          # a clear margin over the floor
    assert ours["level_corr"] > floor["level_corr"] + 0.1, (ours, floor)        # the level read follows the asked
    for name in r:
        assert set(r[name]) == {"class_acc", "level_acc", "level_acc_pm1", "level_corr"}


def test_demo_refuses_to_overwrite_a_finished_run(fast_demo):
    out, _ = fast_demo
    with pytest.raises(SystemExit) as e:
        demo.main(["--fast", "--out", str(out)])
    assert e.value.code == 2
