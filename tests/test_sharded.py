"""Generation shared among torchrun's processes (cli/distributed.py): evaluate.py and sample.py
--prompts-file make on two processes the images one process makes, resume only what is missing,
and sample.py reads caption files, .jsonl and Karpathy jsons into a manifest CaptionFolder reads."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import sample
from cli.distributed import share_of_batches

ROOT = Path(__file__).resolve().parents[1]
# --standalone: a rendezvous on a free port; "--" ends torchrun's flags (else it reads --n as an
# ambiguous abbreviation of its own --nnodes / --nproc_per_node)
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def launch(script, args, processes):
    """Run a script as one process or under torchrun; both with one thread a process (torchrun's
    OMP_NUM_THREADS on the CPU), so the floats are computed alike."""
    head = [sys.executable] if processes == 1 else [*TORCHRUN, "--"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    r = subprocess.run(
        [*head, str(ROOT / script), *map(str, args)],
        cwd=ROOT,
        env={**env, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def pixels(folder):
    """{file name: pixel array} of the PNGs in folder."""
    return {f.name: np.asarray(Image.open(f)) for f in sorted(Path(folder).glob("*.png"))}


def assert_same_pixels(a, b, n):
    assert sorted(a) == sorted(b) and len(a) == n
    assert all(np.array_equal(a[k], b[k]) for k in a), [
        k for k in a if not np.array_equal(a[k], b[k])
    ]


def test_evaluate_on_two_processes_makes_the_images_of_one_and_one_report(tiny_ckpt, tmp_path):
    """ddpm draws its noise per batch: 8 images in batches of 3 dealt to 2 processes, the same."""
    args = ["--weights", tiny_ckpt, "--test", "procedural:4", "--size", 32, 32, "--n", 2]
    args += ["--steps", 2, "--batch", 3, "--sampler", "ddpm", "--cls-size", 32, "--cls-epochs", 1]
    two = launch("evaluate.py", [*args, "--out", tmp_path / "two"], processes=2)
    launch("evaluate.py", [*args, "--out", tmp_path / "one"], processes=1)
    assert "0 of 8 images already written, 8 to go (2 processes)" in two
    assert two.count("# Evaluation of") == 1  # the report, printed by rank 0 alone
    assert_same_pixels(
        pixels(tmp_path / "two" / "generated"), pixels(tmp_path / "one" / "generated"), 8
    )
    reports = [json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two")]
    assert reports[0]["generation"] == reports[1]["generation"] and reports[1]["n_generated"] == 8


def test_prompts_file_on_two_processes_resumes_and_trains_as_a_caption_folder(
    tiny_ckpt, tmp_path, capsys
):
    from data.datasets import CaptionFolder
    from data.samples import collate
    from data.transforms import eval_transform

    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"text": "a river", "level": 14},
        {"caption": "farmland", "resolution_m": 2},
        {"text": "15_GOOGLE_LEVEL_an airport"},
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    args = [
        "--weights",
        tiny_ckpt,
        "--prompts-file",
        prompts,
        "--size",
        32,
        32,
        "--n",
        2,
        "--steps",
        2,
    ]
    args += ["--batch", 4, "--sampler", "ddpm", "--level", 12]
    two, one = tmp_path / "two", tmp_path / "one"
    text = launch("sample.py", [*args, "--out", two], processes=2)
    assert "0 of 6 images already in" in text and "6 to go (2 processes)" in text
    launch("sample.py", [*args, "--out", one], processes=1)
    made = pixels(two)
    assert_same_pixels(made, pixels(one), 6)
    assert not (two / "grid.png").exists()
    manifest = (two / "manifest.jsonl").read_text()
    assert manifest == (one / "manifest.jsonl").read_text()
    assert json.loads(manifest.splitlines()[3]) == {
        "file": "000001_1.png",
        "caption": "farmland",
        "level": 16.0,
        "seed": 3,
    }

    # the folder trains as it is
    ds = CaptionFolder(two / "manifest.jsonl", transform=eval_transform(32))
    batch = collate([ds[i] for i in range(len(ds))])
    assert batch["image"].shape == (6, 3, 32, 32) and batch["caption"][4] == "an airport"
    assert batch["level"].tolist() == [14, 14, 16, 16, 15, 15]

    # interrupted: one image missing in each batch -> those two are made again, as before
    kept = {f: f.stat().st_mtime_ns for f in two.glob("*.png")}
    for name in ("000000_1.png", "000002_0.png"):
        (two / name).unlink()
        del kept[two / name]
    text = launch("sample.py", [*args, "--out", two], processes=2)
    assert "4 of 6 images already in" in text and "2 to go (2 processes)" in text
    assert all(f.stat().st_mtime_ns == t for f, t in kept.items())
    assert_same_pixels(pixels(two), made, 6)
    assert (two / "manifest.jsonl").read_text() == manifest

    # other settings are refused, naming them; --overwrite makes the images again
    with pytest.raises(SystemExit) as e:
        sample.main([str(a) for a in [*args, "--steps", 1, "--out", two]])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "other settings (steps: 2); pass --overwrite" in err, err


def test_a_caption_file_and_a_karpathy_json_are_read(tiny_ckpt, tmp_path):
    captions = tmp_path / "captions.txt"
    captions.write_text("a river\n\n   \n16_GOOGLE_LEVEL_farmland\n")
    args, _ = sample.parse_args(
        ["--weights", str(tiny_ckpt), "--prompts-file", str(captions), "--n", "2", "--level", "12"]
    )
    assert [(j.text, j.values["level"], j.seed) for j in args.jobs] == [
        ("a river", 12, 0),
        ("a river", 12, 1),
        ("farmland", 16, 2),
        ("farmland", 16, 3),
    ]
    assert args.names == ["000000_0.png", "000000_1.png", "000001_0.png", "000001_1.png"]

    karpathy = tmp_path / "dataset.json"
    images = [
        {
            "filename": "a.jpg",
            "split": "train",
            "sentences": [{"raw": "a river ."}, {"raw": "a river ."}, {"raw": "green fields "}],
        },
        {"filename": "b.jpg", "split": "test", "sentences": [{"raw": "a port"}, {"raw": " "}]},
    ]
    karpathy.write_text(json.dumps({"gsd_m": 2.0, "images": images}))
    read = lambda *extra: [
        (j.text, j.values["level"])
        for j in sample.parse_args(
            ["--weights", str(tiny_ckpt), "--prompts-file", str(karpathy), "--level", "12", *extra]
        )[0].jobs
    ]
    # every distinct sentence of each image, at the json's gsd_m (2 m: level 16) over --level
    assert read() == [("a river .", 16), ("green fields", 16), ("a port", 16)]
    assert read("--split", "train") == [("a river .", 16), ("green fields", 16)]


@pytest.mark.parametrize(
    "write,extra,message",
    [
        ("x\n", ["--prompt", "y"], "argument --prompt: not allowed with argument --prompts-file"),
        ("\n  \n", [], "prompts.txt: no prompts in it"),
        ("x\n", ["--split", "train"], "--split picks the images of a Karpathy json"),
        ('{"text": "x"}\n{"level": 3}\n', [], "prompts.jsonl:2: no 'text' or 'caption' string"),
        ('{"text": "x", "level": 25}\n', [], "prompts.jsonl:1: level 25 is outside [0, 20]"),
        (
            '{"images": [{"split": "test", "sentences": [{"raw": "x"}]}]}',
            ["--split", "val"],
            "no captions in --split val (splits present: test)",
        ),
        (None, [], "prompts.txt: no such file"),
    ],
)
def test_bad_prompts_files_are_one_line_and_exit_2(
    tiny_ckpt, tmp_path, capsys, write, extra, message
):
    name = "prompts.jsonl" if write and write.startswith('{"text"') else "prompts.txt"
    name = "prompts.json" if write and write.startswith('{"images"') else name
    if write is not None:
        (tmp_path / name).write_text(write)
    with pytest.raises(SystemExit) as e:
        sample.main(
            [
                "--weights",
                str(tiny_ckpt),
                "--prompts-file",
                str(tmp_path / name),
                "--out",
                str(tmp_path / "o"),
                *extra,
            ]
        )
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "o").exists()


def test_one_process_takes_every_batch_with_a_file_missing(tmp_path):
    paths = [tmp_path / f"{i}.png" for i in range(7)]
    for i in (0, 1, 2, 4):
        paths[i].write_bytes(b"")
    mine, missing = share_of_batches(paths, 3)
    assert [list(r) for r in mine] == [[3, 4, 5], [6]] and missing == 3
    mine, missing = share_of_batches(paths, 3, redo=True)
    assert [list(r) for r in mine] == [[0, 1, 2], [3, 4, 5], [6]] and missing == 7
