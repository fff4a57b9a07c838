"""What a training run survives: a diverging loss, a corrupt checkpoint, a full disk, a killed torchrun worker with
unreadable data on its rank, changed model overrides on resume. (A SIGKILL while saving: test_train.py.)"""

import hashlib
import io
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import train
from trainer import objectives
from trainer.checkpoint import checkpoint_paths, checkpoint_step, load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--config",
    "configs/tiny.py",
    "--data=synthetic",
    "--image_size=32",
    "--synthetic_samples=64",
    "--num_workers=0",
    "--log_every=1",
    "--warmup_steps=0",
    "--lr=1e-3",
    "--ema_decay=0.9",
    "--allow_untrained",
    "--batch_size=2",
]


def steps(out_dir):
    return [checkpoint_step(p) for p in checkpoint_paths(out_dir)]


def digest(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def all_finite(out_dir):
    """Every checkpoint's model and EMA and the export hold finite numbers only."""
    for path in checkpoint_paths(out_dir):
        state = torch.load(path, weights_only=True)
        for name in ("model", "ema"):
            assert all(v.isfinite().all() for v in state[name].values() if v.is_floating_point()), (
                path,
                name,
            )
    export = Path(out_dir) / "model.safetensors"
    return not export.exists() or all(v.isfinite().all() for v in load_file(export).values())


def one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("train.py: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_a_nonfinite_step_is_skipped_counted_and_the_run_goes_on(tmp_path, monkeypatch):
    """A NaN loss at step 1 of 3: no optimizer or EMA update there (2 of each), the skip is counted in the
    checkpoint, the checkpoint due at step 2 waits for the next good step, and the run ends normally."""
    real, calls, ema_steps = objectives.t2i_loss, [], []

    def nan_once(*args, **kw):
        loss, stats = real(*args, **kw)
        calls.append(1)
        return (loss * float("nan"), stats) if len(calls) == 2 else (loss, stats)

    monkeypatch.setattr(objectives, "t2i_loss", nan_once)
    real_ema = train.ema_update
    monkeypatch.setattr(
        train,
        "ema_update",
        lambda ema, live, decay, step: ema_steps.append(step) or real_ema(ema, live, decay, step),
    )
    train.train(
        train.parse_config(TINY + [f"--out_dir={tmp_path}", "--max_steps=3", "--ckpt_every=1"])
    )
    state = load_checkpoint(checkpoint_paths(tmp_path)[-1])
    assert state["step"] == 3 and state["skipped_steps"] == 1 and ema_steps == [0, 2]
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {
        2
    }  # Adam's update count
    assert steps(tmp_path) == [1, 3] and all_finite(tmp_path)


def test_a_diverging_run_stops_and_keeps_its_good_checkpoints(tmp_path, capsys):
    """--lr=1e9 on a healthy run: the loss turns NaN, the steps are skipped, after --max_skipped_steps in a row the
    run stops (exit 1) naming the step and the last good checkpoint; the checkpoints and the export are the good
    ones, untouched, and nothing non-finite was ever written, from scratch either."""
    good = TINY + [f"--out_dir={tmp_path / 'run'}", "--ckpt_every=2", "--keep_last=2"]
    assert train.main(good + ["--max_steps=4"]) == 0
    kept = {
        p.name: digest(p)
        for p in [*checkpoint_paths(tmp_path / "run"), tmp_path / "run/model.safetensors"]
    }
    capsys.readouterr()
    diverge = ["--lr=1e9", "--grad_clip=0", "--max_skipped_steps=3", "--max_steps=40"]
    assert train.main(good + diverge) == 1
    line = one_error_line(capsys)
    assert (
        "not finite for 3 steps in a row" in line
        and "ckpt_000000004.pt" in line
        and "lower --lr" in line
    )
    assert {
        p.name: digest(p)
        for p in [*checkpoint_paths(tmp_path / "run"), tmp_path / "run/model.safetensors"]
    } == kept
    assert all_finite(tmp_path / "run")
    assert train.main(TINY + [f"--out_dir={tmp_path / 'scratch'}", "--ckpt_every=1", *diverge]) == 1
    assert "the run diverged" in one_error_line(capsys)
    assert steps(tmp_path / "scratch") == [1] and all_finite(
        tmp_path / "scratch"
    )  # step 0's update was finite


def test_resume_walks_back_past_unreadable_checkpoints(tmp_path, capsys, caplog):
    """The newest checkpoint truncated and the one before holding NaN weights: the run resumes from the one before
    those, says which it passed and why, sets them aside as .unreadable and ends where a straight run ends, with
    the same weights. With no checkpoint that loads it refuses in one line (exit 2)."""
    common = TINY + ["--ckpt_every=2", "--keep_last=3"]
    train.main(common + [f"--out_dir={tmp_path / 'straight'}", "--max_steps=8"])
    split = tmp_path / "split"
    train.main(common + [f"--out_dir={split}", "--max_steps=6"])
    newest, before = checkpoint_paths(split)[-1], checkpoint_paths(split)[-2]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a node lost mid-copy
    state = torch.load(before, weights_only=True)
    next(v for v in state["model"].values() if v.is_floating_point()).fill_(float("nan"))
    torch.save(state, before)
    caplog.clear()
    with caplog.at_level("INFO", logger="train"):
        assert train.main(common + [f"--out_dir={split}", "--max_steps=8"]) == 0
    assert "ckpt_000000006.pt: does not load (RuntimeError" in caplog.text
    assert "ckpt_000000004.pt: non-finite values in model weights" in caplog.text
    assert "resumed from" in caplog.text and "ckpt_000000002.pt at step 2" in caplog.text
    assert sorted(p.name for p in split.glob("*.unreadable")) == [
        "ckpt_000000004.pt.unreadable",
        "ckpt_000000006.pt.unreadable",
    ]
    a, b = (load_checkpoint(checkpoint_paths(d)[-1]) for d in (tmp_path / "straight", split))
    assert a["step"] == b["step"] == 8
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"]) <= 1e-5
    for path in checkpoint_paths(split):
        path.write_bytes(b"not a checkpoint")
    assert train.main(common + [f"--out_dir={split}", "--max_steps=10"]) == 2
    assert "no checkpoint in" in one_error_line(capsys)


def test_a_full_disk_is_one_line_and_loses_nothing(tmp_path):
    """Checkpoints that cannot be written (a 1 MiB file-size limit: the write fails half-way, as on a full disk):
    the run goes on and retries at the next checkpoint, stops at its last save with one line naming the file and
    the error (exit 1); no temporary file is left, the previous checkpoint and export are untouched, and the same
    command resumes from them once there is room."""
    out = tmp_path / "run"
    args = TINY + [f"--out_dir={out}", "--ckpt_every=2"]
    assert train.main(args + ["--max_steps=2"]) == 0
    kept = {p.name: digest(p) for p in [*checkpoint_paths(out), out / "model.safetensors"]}

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (2**20, resource.RLIM_INFINITY))

    res = subprocess.run(
        [sys.executable, "train.py", *args, "--max_steps=6"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=limit_file_size,
    )
    assert res.returncode == 1, res.stderr[-3000:]
    errors = [line for line in res.stderr.splitlines() if line.startswith("train.py: error:")]
    assert len(errors) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert "step 6: not saved: could not write" in errors[0] and "ckpt_000000006.pt" in errors[0]
    assert "File too large" in errors[0] and "ckpt_000000002.pt" in errors[0]
    assert "the save is tried again at step 6" in res.stderr  # step 4 failed, training went on
    assert not list(out.glob("*.tmp"))
    assert {p.name: digest(p) for p in [*checkpoint_paths(out), out / "model.safetensors"]} == kept
    assert train.main(args + ["--max_steps=6"]) == 0 and steps(out)[-1] == 6  # room again: resumes
    export = "from model.weights import write_tensors; import torch; write_tensors({!r}, {{'w': torch.ones(2 ** 19)}}, {{}})"
    res = subprocess.run(
        [sys.executable, "-c", export.format(str(out / "model.safetensors"))],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=limit_file_size,
    )
    assert "SaveError: could not write" in res.stderr and "File too large" in res.stderr, (
        res.stderr[-2000:]
    )
    assert not list(out.glob("*.tmp")) and all_finite(out)  # the export before it is intact


def test_model_overrides_on_resume_are_applied_or_refused(tmp_path, capsys):
    """A resumed run keeps its model: a changed architecture field is refused in one line; a condition's dropout
    (and gradient checkpointing) may change, and the change is applied and stored."""
    args = TINY + [f"--out_dir={tmp_path}", "--ckpt_every=1"]
    assert train.main(args + ["--max_steps=1"]) == 0
    capsys.readouterr()
    assert train.main(args + ["--max_steps=2", "--model.unet.norm_groups=4"]) == 2
    line = one_error_line(capsys)
    assert "model.unet.norm_groups: 8 -> 4" in line and "a resumed run keeps its model" in line
    assert train.main(args + ["--max_steps=2", "--model.conditions.level.p_drop=0.5"]) == 0
    state = load_checkpoint(checkpoint_paths(tmp_path)[-1])
    assert state["step"] == 2 and state["model_config"]["conditions"]["level"]["p_drop"] == 0.5


def _png(seed):
    buf = io.BytesIO()
    Image.fromarray(
        torch.randint(
            0, 255, (32, 32, 3), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
        ).numpy()
    ).save(buf, format="PNG")
    return buf.getvalue()


def _folder(root, n, bad_every):
    """A caption folder of n images where every `bad_every`-th one is not an image."""
    root.mkdir()
    rows = []
    for i in range(n):
        (root / f"{i}.png").write_bytes(b"garbage" if i % bad_every == 0 else _png(i))
        rows.append(json.dumps({"file": f"{i}.png", "caption": f"scene {i % 5}"}))
    (root / "manifest.jsonl").write_text("\n".join(rows) + "\n")
    return root / "manifest.jsonl"


def test_unreadable_data_stops_every_process_together(tmp_path, capsys):
    """The bad-sample budget counts what all processes read; over it the run stops in one line (exit 2) after
    saving its good steps; a process whose every sample is unreadable stops the run the same way, never hangs."""
    mostly_bad = _folder(tmp_path / "mostly_bad", 64, bad_every=1)  # i % 1 == 0: all unreadable
    args = TINY + ["--data=folder", f"--data_path={mostly_bad}", "--max_steps=50", "--batch_size=8"]
    assert train.main(args + [f"--out_dir={tmp_path / 'a'}"]) == 2
    assert "read 1000 samples in a row that were all unreadable" in one_error_line(capsys)
    half = _folder(tmp_path / "half", 64, bad_every=2)
    args = TINY + [
        "--data=folder",
        f"--data_path={half}",
        "--max_steps=200",
        "--batch_size=32",
        "--ckpt_every=1000",
        "--max_bad_fraction=0.3",
    ]
    assert train.main(args + [f"--out_dir={tmp_path / 'b'}"]) == 2
    line = one_error_line(capsys)
    assert (
        "samples read by 1 process(es) were unreadable" in line
        and "> --max_bad_fraction=0.3" in line
    )
    assert 0 < steps(tmp_path / "b")[-1] < 200  # the good steps before it were saved


def _worker_pids(out_dir, local_rank):
    """The torchrun workers of the run writing out_dir with LOCAL_RANK=local_rank."""
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"--out_dir={out_dir}".encode() in cmd and f"LOCAL_RANK={local_rank}".encode() in env:
            pids.append(int(proc.name))
    return pids


@pytest.mark.skipif(
    not Path("/proc/self/environ").exists(), reason="finds the workers through /proc"
)
def test_torchrun_restarts_a_killed_worker_and_unreadable_batches_on_one_rank(tmp_path):
    """torchrun --max-restarts=1, 2 processes at batch 1 on a folder where half the images are unreadable (a rank
    often gets nothing readable: it reads on, and both take part in every collective); one worker SIGKILLed after
    the first checkpoint: the restarted workers meet again, resume from the latest checkpoint and reach
    max_steps."""
    out = tmp_path / "run"
    data = _folder(tmp_path / "half", 32, bad_every=2)
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "--max-restarts=1",
        "train.py",
        *TINY,
        "--device=cpu",
        "--data=folder",
        f"--data_path={data}",
        "--batch_size=1",
        "--max_bad_fraction=0.7",
        "--max_steps=24",
        "--ckpt_every=4",
        f"--out_dir={out}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while not checkpoint_paths(out) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        victims = _worker_pids(out, 1)
        assert victims and proc.poll() is None, "no checkpoint / worker to kill"
        os.kill(victims[0], signal.SIGKILL)
        output, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-4000:]
    assert "resumed from" in output and "skipping bad sample" in output
    state = load_checkpoint(checkpoint_paths(out)[-1])
    assert state["step"] == 24 and state["finished"] and len(state["data"]) == 2
