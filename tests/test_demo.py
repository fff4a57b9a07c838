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


def test_fast_demo_follows_the_prompt(fast_demo):
    """The shortened demo (VAE 200 steps, U-Net 150 steps) must already learn text conditioning: the probe reads
    the class the prompt asked for far more often than on unconditional samples. Measured on 2 CPU cores:
    47% against a floor of 6.5% (the full demo: 51% against 7%). The level is not asserted: it is not learnt
    in this budget (samples at the floor, ~14% exact); docs/demo.md has the figures and the reasons."""
    _, summary = fast_demo
    r = summary["results"]
    assert r["real procedural images (ceiling)"]["class_acc"] > 0.7            # the probe itself works
    assert r["real images through the VAE"]["class_acc"] > 0.4                  # and sees through the VAE
    ours, floor = r["generated, prompt + level (ours)"], r["unconditional samples (floor)"]
    assert floor["class_acc"] < 0.2, floor                                       # ~1/12 when nothing is followed
    assert ours["class_acc"] > floor["class_acc"] + 0.2, (ours, floor)          # a clear margin over the floor
    for name in r:
        assert set(r[name]) == {"class_acc", "level_acc", "level_acc_pm1"}


def test_demo_refuses_to_overwrite_a_finished_run(fast_demo):
    out, _ = fast_demo
    with pytest.raises(SystemExit) as e:
        demo.main(["--fast", "--out", str(out)])
    assert e.value.code == 2
