"""train.py: single process, torchrun DDP equivalence, exact resume, crash safety, learning on real data."""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import train
from trainer.checkpoint import checkpoint_paths, checkpoint_step, finished, load_checkpoint
from model.diffusion import Diffusion
from trainer.schedule import lr_at
from model.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
UCM = ROOT.parent / "shared" / "data" / "ucm_captions"
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
]
VAE = ["--train=vae", "--objective=vae"]


def run_inprocess(tmp, *overrides):
    cfg = train.parse_config(TINY + [f"--out_dir={tmp}", *overrides])
    return train.train(cfg)


def unet_state(out_dir):
    ckpt = load_checkpoint(checkpoint_paths(out_dir)[-1])
    return {k: v for k, v in ckpt["model"].items() if k.startswith("unet.")}, ckpt


def max_diff(a, b):
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_config_overrides_are_type_checked():
    cfg = train.parse_config(
        [
            "--config",
            "configs/tiny.py",
            "--lr=3e-4",
            "--model.unet.gradient_checkpointing=true",
            "--sample_levels=(12, 13.5)",
        ]
    )
    assert (
        cfg.lr == 3e-4
        and cfg.model.unet.gradient_checkpointing is True
        and cfg.sample_levels == (12, 13.5)
    )
    assert cfg.model.unet.channels == (32, 64, 64)  # from the config file
    hyphens = train.parse_config(
        ["--config", "configs/tiny.py", "--max-steps=7", "--allow-untrained"]
    )
    assert (
        hyphens.max_steps == 7 and hyphens.allow_untrained is True
    )  # a hyphen in a key is an underscore
    for bad, msg in [
        ("--lrr=1", "unknown config key --lrr"),
        ("--max_steps=ten", "expected int"),
        ("--model.unet.chanels=1", "unknown config key"),
        ("--resume=maybe", "expected a boolean"),
    ]:
        with pytest.raises(ValueError, match=msg):
            train.parse_config(["--config", "configs/tiny.py", bad])
    assert train.main(["--nonsense"]) == 2


def test_timestep_sampling_power():
    """power 1 is uniform over [0, T); power k has density k (t/T)^(k-1): mean T k / (k + 1), all in range."""
    g = torch.Generator().manual_seed(0)
    uniform = Diffusion().sample_timesteps(200_000, g, power=1.0).double()
    assert uniform.min() == 0 and uniform.max() == 999 and abs(uniform.mean().item() - 499.5) < 3
    high = Diffusion().sample_timesteps(200_000, g, power=2.0).double()
    assert high.min() >= 0 and high.max() == 999
    assert abs(high.mean().item() - 1000 * 2 / 3) < 3  # E[T u^(1/2)] = 2T/3
    assert abs((high < 500).double().mean().item() - 0.25) < 0.005  # P(t < T/2) = (1/2)^2
    with pytest.raises(ValueError, match="timestep_power must be > 0"):
        run_inprocess(Path("/nonexistent"), "--timestep_power=0")
    cfg = train.TrainConfig(timestep_power=-1.0)  # built in code (demo.py), not parsed
    with pytest.raises(ValueError, match="timestep_power must be > 0"):
        train.train(cfg)
    assert train.main(["--config", "configs/tiny.py", "--timestep_power=0"]) == 2


def test_single_process_trains_and_exports(tmp_path):
    run_inprocess(tmp_path, "--batch_size=4", "--max_steps=3", "--ckpt_every=2", "--keep_last=1")
    assert [p.name for p in checkpoint_paths(tmp_path)] == ["ckpt_000000003.pt"]  # keep_last=1
    model = load_model(tmp_path / "model.safetensors")  # sample.py can use it directly
    assert model.cfg.unet.channels == (32, 64, 64)
    assert (tmp_path / "tb").is_dir() and json.loads((tmp_path / "config.json").read_text())[
        "max_steps"
    ] == 3


def at_step_start(monkeypatch, fn):
    """Call fn(step) at the start of every optimiser step (train.py asks lr_at for that step's learning rate)."""
    real = train.lr_at

    def hooked(step, *args):
        fn(step)
        return real(step, *args)

    monkeypatch.setattr(train, "lr_at", hooked)


def test_finished_and_signal_handlers_restored(tmp_path, monkeypatch):
    """Every step runs once; finished() tells a stopped run from a complete one; train() leaves the caller's SIGINT
    handler as it found it (demo.py's Ctrl-C must work after training)."""
    before = signal.getsignal(signal.SIGINT)
    seen = []
    at_step_start(monkeypatch, seen.append)
    cfg = train.parse_config(
        TINY + [f"--out_dir={tmp_path}", "--batch_size=2", "--max_steps=3", "--ckpt_every=5"]
    )
    assert not finished(cfg.out_dir, cfg.max_steps)  # nothing yet
    train.train(cfg)
    assert seen == [0, 1, 2] and finished(cfg.out_dir, cfg.max_steps)
    assert signal.getsignal(signal.SIGINT) is before

    def interrupt(step):  # a Ctrl-C arriving during step 2
        if step == 1:
            signal.raise_signal(signal.SIGINT)

    at_step_start(monkeypatch, interrupt)
    cfg = train.parse_config(
        TINY + [f"--out_dir={tmp_path / 'stopped'}", "--batch_size=2", "--max_steps=5"]
    )
    train.train(cfg)
    assert [p.name for p in checkpoint_paths(cfg.out_dir)] == ["ckpt_000000002.pt"]  # stopped there
    assert not finished(cfg.out_dir, cfg.max_steps)
    assert signal.getsignal(signal.SIGINT) is before


def test_time_budget_ends_the_run_and_plans_its_decay(tmp_path, monkeypatch):
    """max_minutes: on a clock that moves 1 s a step, a 30 s budget ends a run capped at 1000 steps at step 30,
    with the cosine decay of a 30-step run and finished() true; a run stopped at step 20 and resumed ends at the
    same step with the same weights (the plan and the seconds spent travel in the checkpoint); once the budget is
    spent, resuming trains nothing."""
    clock = {"t": 0.0}
    monkeypatch.setattr(train.time, "perf_counter", lambda: clock["t"])
    stop = {"at": None}

    def tick(step):  # each step takes 1 s
        clock["t"] += 1.0
        if step + 1 == stop["at"]:  # a Ctrl-C during step `at`
            signal.raise_signal(signal.SIGINT)

    at_step_start(monkeypatch, tick)
    args = [
        "--batch_size=2",
        "--max_steps=1000",
        "--max_minutes=0.5",
        "--log_every=5",
        "--ckpt_every=1000",
        "--lr_decay=cosine",
    ]
    cfg = train.parse_config(TINY + [f"--out_dir={tmp_path / 'straight'}", *args])
    train.train(cfg)
    ckpt = checkpoint_paths(cfg.out_dir)
    assert [checkpoint_step(p) for p in ckpt] == [30] and finished(cfg.out_dir, cfg.max_steps)
    state = load_checkpoint(ckpt[-1])
    assert state["finished"] and state["planned_steps"] == 30 and state["train_seconds"] == 30.0
    last_lr = state["optimizer"]["param_groups"][0]["lr"]
    assert (
        last_lr == pytest.approx(lr_at(29, 30, cfg.lr, cfg.warmup_steps, cfg.lr_decay))
        and last_lr < 0.11 * cfg.lr
    )  # decayed

    clock["t"], stop["at"] = 0.0, 20
    split = train.parse_config(TINY + [f"--out_dir={tmp_path / 'split'}", *args])
    train.train(split)
    stopped = load_checkpoint(checkpoint_paths(split.out_dir)[-1])
    assert (
        stopped["step"] == 20
        and stopped["planned_steps"] == 30
        and not finished(split.out_dir, split.max_steps)
    )
    clock["t"], stop["at"] = 1000.0, None  # resumed later: only training time counts
    train.train(split)
    a, ca = unet_state(tmp_path / "straight")
    b, cb = unet_state(tmp_path / "split")
    assert (
        cb["step"] == 30
        and cb["train_seconds"] == 30.0
        and finished(split.out_dir, split.max_steps)
    )
    assert max_diff(a, b) <= 1e-5
    seen = []
    at_step_start(monkeypatch, seen.append)
    train.train(split)  # the budget is spent
    assert seen == [] and [checkpoint_step(p) for p in checkpoint_paths(split.out_dir)][-1] == 30


def test_plan_steps_fits_the_budget_within_max_steps():
    from trainer.schedule import first_plan, plan_steps

    cfg = train.TrainConfig(max_steps=500, max_minutes=2.0)
    budget = (cfg.max_minutes, cfg.max_steps)
    assert first_plan(0, 0.0, 0, *budget) == 500  # a fresh run: max_steps until planned
    assert first_plan(40, 60.0, 90, *budget) == 90  # stopped: the plan it had
    assert (
        first_plan(90, 119.9, 90, *budget, ended_budget=2.0) == 90
    )  # ended by its budget: nothing more
    assert (
        first_plan(90, 119.9, 90, *budget, ended_budget=1.0) == 500
    )  # a larger budget now: on, re-planned
    assert first_plan(90, 120.0, 90, *budget) == 90  # the budget is spent
    assert plan_steps(100, 60.0, 0.5, *budget) == 220  # 60 s left at 0.5 s a step
    assert plan_steps(100, 30.0, 0.1, *budget) == 500  # more would fit: capped at max_steps
    assert plan_steps(100, 130.0, 0.5, *budget) == 100  # over budget: stop now
    with pytest.raises(ValueError, match="max_minutes must be >= 0"):
        train.check_config(train.TrainConfig(train="unet", max_minutes=-1.0))


def test_resume_continues_the_same_curve(tmp_path):
    """N steps + stop + resume N steps == 2N steps straight, with grad accumulation and data reshuffles."""
    common = ["--batch_size=4", "--grad_accum=2", "--synthetic_samples=24", "--ckpt_every=100"]
    run_inprocess(tmp_path / "straight", *common, "--max_steps=6")
    run_inprocess(tmp_path / "split", *common, "--max_steps=3")
    run_inprocess(tmp_path / "split", *common, "--max_steps=6")  # resumes from step 3
    a, ca = unet_state(tmp_path / "straight")
    b, cb = unet_state(tmp_path / "split")
    assert ca["step"] == cb["step"] == 6
    assert (
        ca["data"] == cb["data"] == [{"epoch": 1, "batch_in_epoch": 6}]
    )  # 12 batches of 4 from 24: one wrap
    assert max_diff(a, b) <= 1e-5
    ema_a, ema_b = ca["ema"], cb["ema"]
    assert max(((ema_a[k] - ema_b[k]).abs().max().item() for k in ema_a)) <= 1e-5


def test_channels_last_trains_the_same_vae(tmp_path):
    """channels_last changes only the memory layout: the same VAE steps give the same weights (to float rounding
    of other convolution kernels), its checkpoints resume and its export loads as usual."""
    common = [*VAE, "--batch_size=4", "--ckpt_every=2", "--lr=1e-3"]
    run_inprocess(tmp_path / "nchw", *common, "--max_steps=4")
    run_inprocess(tmp_path / "nhwc", *common, "--max_steps=2", "--channels_last=true")
    run_inprocess(
        tmp_path / "nhwc", *common, "--max_steps=4", "--channels_last=true"
    )  # resumes from step 2
    a, b = (load_checkpoint(checkpoint_paths(tmp_path / d)[-1]) for d in ("nchw", "nhwc"))
    assert a["step"] == b["step"] == 4
    vae = [k for k in a["model"] if k.startswith("vae.")]
    assert any(
        b["model"][k].ndim == 4 and not b["model"][k].is_contiguous() for k in vae
    )  # really NHWC
    step2 = load_checkpoint(checkpoint_paths(tmp_path / "nhwc")[0])["model"]
    assert (
        max((step2[k] - b["model"][k]).abs().max().item() for k in vae) > 1e-3
    )  # the steps did move them
    assert max((a["model"][k] - b["model"][k]).abs().max().item() for k in vae) <= 1e-4
    assert max((a["ema"][k] - b["ema"][k]).abs().max().item() for k in a["ema"]) <= 1e-4
    exported = load_model(tmp_path / "nhwc" / "model.safetensors").state_dict()
    reference = load_model(tmp_path / "nchw" / "model.safetensors").state_dict()
    assert max((exported[k] - reference[k]).abs().max().item() for k in reference) <= 1e-4


def _torchrun(args, nproc):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "train.py",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]


@pytest.mark.parametrize("extra", [[], ["--train=unet+text_encoder"]], ids=["unet", "unet+text"])
def test_ddp_two_processes_equal_one_process_with_double_batch(tmp_path, extra):
    """torchrun --nproc_per_node=2 (gloo) with batch B each == one process with batch 2B, update for update.

    Adam divides by sqrt(v) + eps, which turns a 1e-7 difference in a near-zero gradient (all-reduce order)
    into a difference of up to lr in the update; eps = 1e-3 keeps the update linear in such gradients, so
    the comparison tests the gradients DDP averages, not Adam's sign of rounding noise."""
    common = TINY + ["--max_steps=2", "--ckpt_every=100", "--device=cpu", "--adam_eps=1e-3", *extra]
    _torchrun(common + [f"--out_dir={tmp_path / 'ddp'}", "--batch_size=2"], nproc=2)
    _torchrun(common + [f"--out_dir={tmp_path / 'one'}", "--batch_size=4"], nproc=1)
    a, ca = unet_state(tmp_path / "ddp")
    b, _ = unet_state(tmp_path / "one")
    assert len(ca["data"]) == 2  # one data position per rank
    torch.manual_seed(0)  # train.py's seed -> the initial weights
    init_model = train.Text2Earth(train.parse_config(TINY).model)
    init = init_model.unet.state_dict()
    init_text = {f"text_encoder.{k}": v for k, v in init_model.text_encoder.state_dict().items()}
    moved = max((a[k] - init[k.removeprefix("unet.")]).abs().max().item() for k in a)
    assert moved > 1e-4  # the runs did update the weights
    assert max_diff(a, b) <= 1e-5
    if extra:  # the text tower trained too: same there
        ta, tb = (
            load_checkpoint(checkpoint_paths(tmp_path / r)[-1])["model"] for r in ("ddp", "one")
        )
        text = [k for k in ta if k.startswith("text_encoder.")]
        assert max((ta[k] - tb[k]).abs().max().item() for k in text) <= 1e-5
        assert max((ta[k] - init_text[k]).abs().max().item() for k in text) > 1e-4


CRASH_SCRIPT = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {root!r})
    import train
    real_save, calls = torch.save, [0]
    def dying_save(obj, f, *a, **k):
        calls[0] += 1
        if calls[0] == 2:                      # the second checkpoint: write half of it, then die hard
            real_save(obj, f, *a, **k)
            data = open(f, "rb").read()
            open(f, "wb").write(data[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    train.torch.save = dying_save
    train.train(train.parse_config({args!r}))
""")


def test_sigkill_while_saving_leaves_previous_checkpoint(tmp_path):
    args = TINY + [f"--out_dir={tmp_path}", "--batch_size=2", "--max_steps=4", "--ckpt_every=1"]
    script = tmp_path / "crash.py"
    script.write_text(CRASH_SCRIPT.format(root=str(ROOT), args=args))
    res = subprocess.run([sys.executable, str(script)], cwd=ROOT, capture_output=True, timeout=300)
    assert res.returncode == -signal.SIGKILL
    paths = checkpoint_paths(tmp_path)
    assert [p.name for p in paths] == ["ckpt_000000001.pt"]  # the half-written one is only a .tmp
    assert load_checkpoint(paths[-1])["step"] == 1
    assert [p.name for p in tmp_path.glob("*.tmp")] == ["ckpt_000000002.pt.tmp"]
    model, _ = run_inprocess(
        tmp_path, "--batch_size=2", "--max_steps=2", "--ckpt_every=1"
    )  # resumes from it
    assert load_checkpoint(checkpoint_paths(tmp_path)[-1])["step"] == 2
    assert not list(tmp_path.glob("*.tmp"))  # what the killed writer left is removed


def test_sigterm_saves_and_stops(tmp_path):
    args = TINY + [
        f"--out_dir={tmp_path}",
        "--batch_size=2",
        "--max_steps=100000",
        "--ckpt_every=100000",
    ]
    proc = subprocess.Popen(
        [sys.executable, "train.py", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    for line in proc.stdout:  # wait until training runs
        if "training unet" in line:
            break
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out[-2000:]
    step = load_checkpoint(checkpoint_paths(tmp_path)[-1])["step"]
    assert 0 < step < 100000 and "stopped by signal" in out


@pytest.mark.skipif(not UCM.is_dir(), reason="../shared/data/ucm_captions not present")
def test_learns_on_ucm_captions_and_samples_follow_the_prompt(tmp_path):
    from model.pipeline import generate

    torch.manual_seed(0)
    args = [
        "--data=karpathy",
        f"--data_path={UCM / 'dataset.json'}",
        "--gsd_m=0.3048",
        "--batch_size=8",
        "--max_steps=40",
        "--ckpt_every=1000",
        "--lr=2e-3",
        "--image_size=32",
    ]
    cfg = train.parse_config(TINY + [f"--out_dir={tmp_path}", *args])
    model, ema = train.train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    losses = [e.value for e in acc.Scalars("loss")]
    first, last = sum(losses[:8]) / 8, sum(losses[-8:]) / 8
    assert last < 0.8 * first, (first, last)
    model.eval()
    a, b = generate(
        model,
        {
            "text": ["many buildings and green trees", "a river with sandy beach"],
            "level": [18.7, 18.7],
        },
        seeds=[0, 0],
        steps=10,
        size=(32, 32),
        unet=ema["unet"],
    )
    assert (a - b).abs().mean() > 0.02  # same noise, different prompt -> different image


def test_trains_from_shards_with_pre_encoded_latents(tmp_path):
    """The at-scale path: shards written with the VAE latents pre-encoded, then training reads only latents."""
    from data.shards import write_shards
    from data.synthetic import ProceduralEarth
    from model.config import load_config
    from model.text2earth import Text2Earth
    from model.weights import save_model

    torch.manual_seed(0)
    model = Text2Earth(load_config("configs/tiny.py").model).eval()
    save_model(model, tmp_path / "init.safetensors")
    write_shards(
        ProceduralEarth(16, size=32, seed=3),
        tmp_path / "shards",
        samples_per_shard=8,
        encode_fn=model.encode_images,
        write_images=False,
    )
    run_inprocess(
        tmp_path / "run",
        "--data=shards",
        f"--data_path={tmp_path / 'shards'}",
        "--batch_size=4",
        "--max_steps=2",
        f"--init_from={tmp_path / 'init.safetensors'}",
    )
    assert load_checkpoint(checkpoint_paths(tmp_path / "run")[-1])["step"] == 2


def test_every_config_file_parses():
    for path in sorted(Path(ROOT / "configs").glob("*.py")):
        if path.name != "demo.py":  # demo.py's stages are read by demo.py
            assert train.parse_config(["--config", str(path)]).model is not None, path


@pytest.mark.parametrize(
    "bad,message",
    [
        (["--batch_size=-3"], "--batch_size must be >= 1, got -3"),
        (
            ["--data=karpathy", "--data_path=/nonexistent.json"],
            "caption file /nonexistent.json does not exist",
        ),
        (["--data=folder", "--data_path={tmp}"], "is a folder; give the manifest (.jsonl or .csv)"),
        (["--init_from=/nonexistent"], "/nonexistent: does not exist"),
        (["--device=cuda:99" if torch.cuda.is_available() else "--device=cuda"], "cuda"),
        (["--config", "README.md"], "config file README.md: not a Python config file"),
        (["--objective=nope"], "--objective must be one of"),
        (["--train=unet+wings"], "--train='unet+wings'"),
        (["--data=nonsense"], "--data must be one of"),
        (["--model.conditions.level.p_drop=2"], "p_drop must lie in [0, 1]"),
        (["--model.conditions.colour.p_drop=0.1"], "unknown config key"),
        (["--data=git10m", "--data_path={tmp}"], "no state.json"),
    ],
)
def test_bad_input_is_one_line_exit_2_nothing_written(bad, message, tmp_path, capsys):
    out = tmp_path / "run"
    args = (
        TINY
        + [f"--out_dir={out}", "--max_steps=1"]
        + [a.replace("{tmp}", str(tmp_path)) for a in bad]
    )
    assert train.main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and err.count("\n") == 1, err
    assert not out.exists()


def test_write_shards_with_the_latents_of_a_trained_vae(tmp_path):
    """--write_shards: the run's data as shards, with the VAE's latents when init_from's VAE was trained (none from
    scratch); a U-Net run then reads latents only."""
    from model.weights import save_model

    torch.manual_seed(0)
    save_model(
        train.Text2Earth(train.parse_config(TINY).model), tmp_path / "init.safetensors"
    )  # "trained"
    common = TINY + ["--synthetic_samples=12"]
    assert train.main(common + [f"--write_shards={tmp_path / 'plain'}"]) == 0
    assert (
        train.main(
            common
            + [f"--write_shards={tmp_path / 'lat'}", f"--init_from={tmp_path / 'init.safetensors'}"]
        )
        == 0
    )
    plain, lat = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("plain", "lat"))
    assert plain["total"] == lat["total"] == 12 and not plain["latents"] and lat["latents"]
    assert train.main(common + [f"--write_shards={tmp_path / 'lat'}"]) == 2  # never overwritten
    run_inprocess(
        tmp_path / "run",
        "--data=shards",
        f"--data_path={tmp_path / 'lat'}",
        "--batch_size=4",
        "--max_steps=1",
        f"--init_from={tmp_path / 'init.safetensors'}",
    )
    assert load_checkpoint(checkpoint_paths(tmp_path / "run")[-1])["step"] == 1


def test_resume_keeps_what_trains_and_config_files_take_both_forms(tmp_path, capsys):
    run_inprocess(tmp_path, "--batch_size=2", "--max_steps=1")
    capsys.readouterr()
    args = TINY + [f"--out_dir={tmp_path}", "--batch_size=2", "--max_steps=2"]
    assert (
        train.main(args + ["--train=unet+text_encoder"]) == 2
    )  # another run than the checkpoint's
    err = capsys.readouterr().err
    assert "resume it with the same --train and --objective" in err and err.count("\n") == 1
    cfg = train.parse_config(["--config=configs/tiny.py", "--lr=3e-4"])
    assert cfg.model.unet.channels == (32, 64, 64) and cfg.lr == 3e-4
