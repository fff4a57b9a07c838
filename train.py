"""Train Text2Earth (U-Net, U-Net + text tower, inpainting U-Net or KL-VAE) on one CPU, a GPU or a
torchrun fleet.

    python train.py --config configs/tiny.py --max_steps=100 --allow_untrained
    torchrun --nproc_per_node=8 train.py --config configs/text2earth_stage1.py \\
        --init_from=SD2_BASE --data_path=GIT10M

A config file holds `model = ModelConfig(...)` and plain values for any field of `TrainConfig`
below. `--key=value` overrides them (type-checked; unknown keys are errors); model fields by dotted
path, e.g. `--model.unet.gradient_checkpointing=True`, `--model.conditions.level.p_drop=0.2`.

The parts named in `train` are optimised, averaged (EMA) and exported, the rest is frozen; the loss
is `objective` (a record of trainer/objectives.py). The model is the config's: `init_from` loads a
release folder (SD2-base, Text2Earth) or our checkpoint into it (model/weights.load_pretrained); a
frozen part the objective uses that was never trained is refused. Exact resume: every random draw
is a function of (seed, step, position in the global batch) or (seed, epoch, sample index);
checkpoints (atomic, every `ckpt_every` steps and on SIGTERM / SIGINT) hold model, EMA, optimizer,
step and data position, so a resumed run continues the same curve.

Faults lose nothing (README, "What a run survives"): a step with a non-finite loss or gradient norm
is skipped on every process alike and a run of them stops the run; weights that are not finite are
never written; resume walks back past checkpoints that do not load; a failed save leaves the
previous files; a process whose batch is unreadable reads on, and the bad-sample budget is counted
over all processes; torchrun restarts resume.
"""

import collections
import contextlib
import copy
import dataclasses
import json
import logging
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from data.samples import MIN_SAMPLES, sample_generator
from data.loader import DATA, Batches, build_dataset
from data.shards import write_shards as write
from data.transforms import eval_transform, image_grid, tensor_to_pil
from model import attention
from model.config import ModelConfig, configure, usage
from model.controlnet import ControlNet, ControlNetConfig
from model.diffusion import Diffusion
from model.flops import peak_tflops, unet_train_flops
from model.lora import LoRAConfig, add_lora_to, lora_parameters
from model.objectives import latent_scale
from model.pipeline import preview
from model.text2earth import Text2Earth
from model.weights import PARTS, SaveError, load_pretrained
from trainer.checkpoint import (
    check_same_run,
    export,
    latest_checkpoint,
    model_changes,
    nonfinite,
    remove_temporaries,
    save_checkpoint,
    set_aside,
)
from trainer.objectives import OBJECTIVES, Draw, LossSettings
from trainer.optim import adamw, ema_update
from trainer.processes import average_grads, from_rank0, init_processes, sum_over_ranks
from trainer.schedule import PACE_MIN_STEPS, PACE_WINDOW, first_plan, lr_at, plan_steps

log = logging.getLogger("train")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class BadInput(ValueError):
    """A config, path, device, starting point or data the run cannot go on with: one line, exit code
    2."""


class RunStopped(RuntimeError):
    """A fault the run stopped at (it diverged, a last save failed): one line, exit code 1. What was
    saved before stays; the message says what to do."""


@dataclass
class TrainConfig:
    # what to train, from where
    out_dir: str = "out/run"
    train: str = (
        "unet"  # the parts optimised, EMA'd and exported: "unet", "unet+text_encoder", "vae",
    )
    # "controlnet"
    objective: str = (
        "t2i"  # "t2i" (DCA diffusion loss) | "inpaint" (the 9-channel U-Net) | "vae" | "control"
    )
    init_from: str = (
        ""  # "" = from scratch, or a release folder (SD2-base, Text2Earth) / our .safetensors
    )
    allow_untrained: bool = (
        False  # let the objective use a frozen part that was never trained (tests only)
    )
    lora: LoRAConfig = field(
        default_factory=lambda: LoRAConfig(rank=0)
    )  # rank > 0: train adapters on the parts
    controlnet: ControlNetConfig = field(
        default_factory=ControlNetConfig
    )  # --objective=control: a ControlNet
    resume: bool = True  # continue from out_dir's latest checkpoint if there is one
    write_shards: str = (
        ""  # write the data as shards here and exit (+ latents of init_from's trained VAE)
    )
    # data
    data: str = "synthetic"  # "synthetic" | "karpathy" | "folder" | "git10m" | "shards" | "paired"
    data_path: str = ""
    control_task: str = ""  # --objective=control: pan2rgb, nir2rgb, sar2rgb, pan2nir, sr, dehaze
    control_path: str = ""  # --data=paired: the control images' folder (data_path: the targets')
    # --data=paired: (old, new, ...) turning a control's path into its target's
    pair_replace: tuple = ()
    # --data=paired: a manifest (or a folder's metadata.jsonl) captioning each pair by its target's
    # or control's file ("" = no captions)
    pair_captions: str = ""
    modality: str = (
        ""  # --data=synthetic: "sar" | "nir" | "pan" images for a modality LoRA ("" = rgb)
    )
    data_split: str = "train"
    gsd_m: float = 0.0  # dataset-wide metres/pixel when samples carry no resolution (0 = none)
    min_quality: float = 0.0  # keep img_quality_score > this (stage 2: 4.8); 0 = keep all
    image_size: int = 256
    synthetic_samples: int = 100_000
    synthetic_levels: tuple = (10.0, 18.0)
    synthetic_integer_levels: bool = False
    # --data=synthetic: each scene at a place of the procedural globe, its class drawn from the
    # place's ("lat", "lon" fields); and the fraction of captions that do not name the class
    synthetic_located: bool = False
    synthetic_omit_class: float = 0.0
    # spatial split (data/places.py): "all", "train" (whole held-out regions left out), "held_out"
    places: str = "all"
    num_workers: int = 2
    max_bad_fraction: float = (
        0.01  # stop when more than this fraction of the samples read (all processes) is
    )
    # unreadable (judged after 1000)
    # optimisation (paper: AdamW, lr 1e-4, global batch 1024)
    batch_size: int = 32  # per device and micro-step; global = batch_size * grad_accum * world_size
    grad_accum: int = 1
    max_steps: int = 100_000
    max_minutes: float = (
        0.0  # > 0: a time budget too (training time over resumes; trainer/schedule.py)
    )
    lr: float = 1e-4
    warmup_steps: int = 1000
    lr_decay: str = "constant"  # "constant" | "cosine" (to 10% at the last step)
    weight_decay: float = 0.01
    betas: tuple = (0.9, 0.999)
    adam_eps: float = 1e-8
    grad_clip: float = 1.0
    max_skipped_steps: int = (
        20  # a step whose loss or gradient norm is not finite is skipped (no update); stop
    )
    # after this many in a row
    ema_decay: float = 0.9999
    min_snr_gamma: float = 0.0  # 0 = off; 5 is Hang et al.'s choice
    timestep_power: float = (
        1.0  # t = T * u ** (1 / k), u ~ U(0, 1): 1 = uniform (the paper), 2 = more high-noise t
    )
    kl_weight: float = 1e-6  # VAE: weight of KL(sum over latent) against L1 (sum over pixels)
    # system
    device: str = ""  # "" = cuda when available, else cpu
    dtype: str = ""  # "" = bf16 on cuda, fp32 on cpu; "fp32" | "bf16" | "fp16"
    tf32: bool = True
    channels_last: bool = (
        False  # the trained parts and their images in NHWC layout (faster convs on CPU)
    )
    attention: str = "sdpa"  # "sdpa" | "triton" | "math"
    threads: int = 0  # torch's CPU threads (0 = its default, one per core)
    seed: int = 0
    # logging and checkpoints
    log_every: int = 10
    ckpt_every: int = 1000
    keep_last: int = 3
    sample_every: int = 0  # 0 = never; else a grid of sample_prompts every N steps
    sample_prompts: tuple = (
        "a dense residential area with many buildings",
        "green farmland and a river",
    )
    sample_levels: tuple = (17.0, 14.0)
    sample_steps: int = 20
    model: ModelConfig = field(default_factory=ModelConfig)


def check_config(cfg):
    """Values no type check catches, as one-line ValueErrors before anything starts."""
    parts = cfg.train.split("+")
    if cfg.objective not in OBJECTIVES:
        raise ValueError(f"--objective must be one of {sorted(OBJECTIVES)}, got {cfg.objective!r}")
    if any(p not in PARTS + ("controlnet",) for p in parts) or len(set(parts)) != len(parts):
        raise ValueError(
            f"--train={cfg.train!r}: name parts of {PARTS} joined by '+', e.g. unet+text_encoder, "
            "or controlnet"
        )
    if (cfg.objective == "control") != bool(cfg.control_task) or (
        cfg.objective == "control" and cfg.lora.rank
    ):
        raise ValueError(
            "--objective=control and --control_task go together (a ControlNet learns the task's "
            "pairs; "
            "not with --lora.rank)"
        )
    objective = OBJECTIVES[cfg.objective]
    if objective.trains not in parts:
        raise ValueError(
            f"--objective={cfg.objective} trains the {objective.trains}: put it in --train"
        )
    inputs = (
        objective.unet_inputs(cfg.model) if objective.unet_inputs else cfg.model.unet.in_channels
    )
    if cfg.model.unet.in_channels != inputs:
        raise ValueError(
            f"--objective={cfg.objective} feeds the U-Net {inputs} channels but "
            f"model.unet.in_channels = {cfg.model.unet.in_channels} (9 channels: "
            "--objective=inpaint)"
        )
    if cfg.data not in DATA:
        raise ValueError(f"--data must be one of {DATA}, got {cfg.data!r}")
    return check_ranges(cfg)


def check_ranges(cfg):
    """The numeric settings' ranges and the string settings' choices, as one-line ValueErrors."""
    lowest = {
        **dict.fromkeys(
            (
                "batch_size",
                "grad_accum",
                "max_steps",
                "log_every",
                "ckpt_every",
                "keep_last",
                "max_skipped_steps",
            ),
            1,
        ),
        **dict.fromkeys(
            ("max_minutes", "kl_weight", "min_snr_gamma", "warmup_steps", "num_workers"), 0
        ),
        "threads": 0,
    }
    for key, low in lowest.items():
        if not getattr(cfg, key) >= low:
            raise ValueError(f"--{key} must be >= {low}, got {getattr(cfg, key)}")
    for key in ("lr", "timestep_power"):
        if not getattr(cfg, key) > 0:
            raise ValueError(f"--{key} must be > 0, got {getattr(cfg, key)}")
    for name, c in cfg.model.conditions.items():
        if not 0.0 <= c.p_drop <= 1.0:
            raise ValueError(f"--model.conditions.{name}.p_drop must lie in [0, 1], got {c.p_drop}")
    if not 0.0 <= cfg.max_bad_fraction <= 1.0:
        raise ValueError(f"--max_bad_fraction must lie in [0, 1], got {cfg.max_bad_fraction}")
    choices = {
        "lr_decay": ("constant", "cosine"),
        "dtype": ("", *DTYPES),
        "attention": attention.BACKENDS,
    }
    for key, allowed in choices.items():
        if getattr(cfg, key) not in allowed:
            raise ValueError(f"--{key} must be one of {allowed}, got {getattr(cfg, key)!r}")
    return cfg


def parse_config(argv):
    """`--config FILE` then `--key=value ...` -> a checked TrainConfig (BadInput when it is not
    one)."""
    try:
        return check_config(configure(TrainConfig(), argv))
    except ValueError as e:
        raise BadInput(str(e)) from None


def resume_point(cfg, rank, world, device, ddp):
    """The newest checkpoint in out_dir that loads, or (None, None) when there is none (or
    --resume=false). Checkpoints that do not load (truncated, corrupt, non-finite) are passed, named
    in the log and set aside; every process must resume from the same step."""
    if not cfg.resume:
        return None, None
    path, state, passed = latest_checkpoint(cfg.out_dir)
    for _, reason in passed:
        log.warning("passing over %s", reason)
    if passed and path is None:
        raise ValueError(
            f"no checkpoint in {cfg.out_dir} loads ({passed[0][1]}; {len(passed)} in all): move "
            "them "
            "away to start over, or pass --resume=false"
        )
    if passed and rank == 0:
        set_aside([bad for bad, _ in passed])
        log.warning(
            "resuming from %s; set aside as .unreadable: %s",
            path.name,
            ", ".join(b.name for b, _ in passed),
        )
    step = state["step"] if state is not None else -1
    total, squares = sum_over_ranks([step, step * step], device, ddp)
    if total * total != squares * world:
        raise ValueError(
            f"the processes found different checkpoints in {cfg.out_dir} to resume from (this one: "
            f"{path}); is out_dir on a file system every node sees?"
        )
    return path, state


def setup(cfg):
    """Processes, device, model (resume > init_from > scratch), trained parts, EMA, optimizer:
    everything that can fail on bad input fails here, before a step is taken."""
    ddp, rank, world, device = init_processes(cfg.device)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, format="%(asctime)s %(message)s"
    )
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.tf32
    attention.set_backend(cfg.attention)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if rank == 0 and Path(cfg.out_dir).is_dir():
        remove_temporaries(cfg.out_dir)  # what a process killed while writing left
    path, resume = resume_point(cfg, rank, world, device, ddp)
    torch.manual_seed(cfg.seed)  # every rank builds the same weights
    if resume is not None:
        check_same_run(resume["train_config"], cfg, path)
        model = Text2Earth(ModelConfig.from_dict(resume["model_config"]))
        now = json.loads(json.dumps(dataclasses.asdict(cfg.model), default=str))
        for key, value in model_changes(resume["train_config"]["model"], now, path).items():
            if key.startswith("conditions."):  # e.g. conditions.level.p_drop
                name = key.split(".")[1]
                model.cfg.conditions[name].p_drop = value
                log.info("resumed with model.%s = %s", key, value)
        trained = set(resume.get("trained", PARTS))
    else:
        model = Text2Earth(copy.deepcopy(cfg.model))
        trained = load_pretrained(model, cfg.init_from) if cfg.init_from else set()
    if cfg.objective == "control":  # the encoder copied from the (loaded) U-Net
        model.controlnet = ControlNet.from_unet(model.unet, cfg.controlnet, model.vae.downsample)
    add_lora_to(model, cfg.train, cfg.lora)
    if resume is not None:
        model.load_state_dict(resume["model"])
    model.unet.cfg.gradient_checkpointing = (
        cfg.model.unet.gradient_checkpointing
    )  # a run-time choice, not stored
    parts, objective = cfg.train.split("+"), OBJECTIVES[cfg.objective]
    untrained = [p for p in objective.uses if p not in parts and p not in trained]
    if untrained and not cfg.allow_untrained:
        raise ValueError(
            f"--objective={cfg.objective} would use a frozen {' and '.join(untrained)} that was "
            "never "
            "trained (random weights): --init_from a release folder (e.g. "
            "stable-diffusion-2-base) or a "
            "checkpoint that trained it, train it too (--train), or --allow_untrained for a test"
        )
    model.to(device).requires_grad_(False).eval()  # frozen parts stay in eval mode
    averaged = torch.nn.ModuleDict(
        {p: getattr(model, p) for p in parts}
    )  # what the EMA tracks and export swaps in
    if cfg.channels_last:
        averaged.to(memory_format=torch.channels_last)  # before the EMA copy and the optimizer
    averaged.train()
    params = [
        p.requires_grad_()
        for p in (lora_parameters(averaged) if cfg.lora.rank else averaged.parameters())
    ]
    frozen = {id(p): p for p in averaged.parameters() if not p.requires_grad}
    ema = copy.deepcopy(
        averaged, memo=frozen
    ).eval()  # frozen weights (LoRA's base) shared, not copied
    for p in ema.parameters():
        p.requires_grad_(False)
    opt = adamw(params, cfg.lr, cfg.betas, cfg.adam_eps, cfg.weight_decay, device)
    step, data_state, spent, planned, ended = 0, {"epoch": 0, "batch_in_epoch": 0}, 0.0, 0, 0.0
    if resume is not None:
        load_ema(ema, averaged, resume["ema"], path)
        opt.load_state_dict(resume["optimizer"])
        if len(resume["data"]) != world:
            raise ValueError(
                f"{path} was written by {len(resume['data'])} processes; resume with the same "
                f"world size (now {world}) for an exact data position"
            )
        step, data_state, spent = (
            resume["step"],
            resume["data"][rank],
            resume.get("train_seconds", 0.0),
        )
        planned = resume.get("planned_steps", 0)
        ended = resume["train_config"]["max_minutes"] if resume.get("finished") else 0.0
        log.info("resumed from %s at step %d", path, step)
    net = getattr(model, objective.trains)
    net = DDP(net, device_ids=[device] if device.type == "cuda" else None) if ddp else net
    batches = Batches(cfg, rank, world, **data_state)
    return dict(
        ddp=ddp,
        rank=rank,
        world=world,
        device=device,
        model=model,
        trained=trained,
        averaged=averaged,
        ema=ema,
        params=params,
        opt=opt,
        net=net,
        batches=batches,
        step=step,
        spent=spent,
        planned=planned,
        ended_budget=ended,
        resumed_from=path,
        skipped=resume.get("skipped_steps", 0) if resume else 0,
    )


def shared_with(ema, averaged):
    """The EMA's state keys whose tensors are the live model's own (frozen weights, shared rather
    than copied)."""
    live = {id(p) for p in averaged.parameters()}
    return {k for k, v in ema.state_dict(keep_vars=True).items() if id(v) in live}


def ema_state(ema, averaged):
    """The EMA's state to checkpoint: what it averages (a LoRA run's frozen base weights are the
    model's own, saved once with it)."""
    shared = shared_with(ema, averaged)
    return {k: v for k, v in ema.state_dict().items() if k not in shared}


def load_ema(ema, averaged, state, path):
    """Load a checkpoint's EMA state; the keys it lacks must be the frozen weights it shares."""
    missing, unexpected = ema.load_state_dict(state, strict=False)
    missing = set(missing) - shared_with(ema, averaged)
    if unexpected or missing:
        raise ValueError(
            f"{path}: its EMA does not fit this run's trained parameters (missing "
            f"{sorted(missing)[:3]}, unexpected {unexpected[:3]})"
        )


def train(cfg: TrainConfig):
    """Train (or resume) the run `cfg` describes; returns (model, ema). SIGINT or SIGTERM stop the
    run at the end of a step, with a checkpoint; the caller's signal handlers come back after."""
    check_config(cfg)
    stop = {"now": False}
    handlers = {
        sig: signal.signal(sig, lambda signum, frame: stop.update(now=True))
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        try:
            run = setup(cfg)
        except (ValueError, OSError) as e:  # WeightsError, data errors, devices, ...
            raise BadInput(str(e)) from e
        return _loop(cfg, run, stop)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def next_filled(batches, batch_size):
    """This process's next micro-batch, reading on past batches none of whose samples was readable
    (each counted as consumed); (batch, unreadable samples, samples read). batch is None once
    MIN_SAMPLES samples in a row were unreadable: this process has no data to train on."""
    bad = read = 0
    while True:
        batch = next(batches)
        bad, read = bad + batch["n_bad"], read + batch_size
        if batch["caption"]:
            return batch, bad, read
        if bad >= MIN_SAMPLES:
            return None, bad, read


def _loop(cfg, run, stop):  # noqa: C901, PLR0915 (the training step top to bottom, in named sections)
    model, ema, averaged, opt, batches = (
        run["model"],
        run["ema"],
        run["averaged"],
        run["opt"],
        run["batches"],
    )
    ddp, rank, world, device, step = (
        run["ddp"],
        run["rank"],
        run["world"],
        run["device"],
        run["step"],
    )
    main, out_dir = rank == 0, Path(cfg.out_dir)
    dtype = DTYPES[cfg.dtype or ("bf16" if device.type == "cuda" else "fp32")]
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    objective = OBJECTIVES[cfg.objective]
    settings = LossSettings(
        Diffusion.from_config(model.cfg.diffusion),
        autocast,
        "text_encoder" in averaged,
        cfg.timestep_power,
        cfg.min_snr_gamma,
        cfg.kl_weight,
        cfg.channels_last,
    )
    trained = sorted(run["trained"] | set(averaged))
    writer = None
    if main:
        from torch.utils.tensorboard import SummaryWriter

        out_dir.mkdir(parents=True, exist_ok=True)
        writer = SummaryWriter(out_dir / "tb")
        (out_dir / "config.json").write_text(
            json.dumps(dataclasses.asdict(cfg), indent=1, default=str)
        )
        log.info(
            "training %s (%s): %.2f M params, global batch %d (%d x %d accum x %d procs), %s %s",
            cfg.train,
            cfg.objective,
            sum(p.numel() for p in run["params"]) / 1e6,
            cfg.batch_size * cfg.grad_accum * world,
            cfg.batch_size,
            cfg.grad_accum,
            world,
            device,
            dtype,
        )
    flops = cfg.objective != "vae" and unet_train_flops(
        model.cfg.unet, cfg.image_size // model.vae.downsample, model.cfg.text.context_length
    )
    peak = peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None

    # The run's length: max_steps, or under a time budget the steps that the pace of the last
    # PACE_WINDOW steps leaves time for, re-planned every log_every steps (the cosine decay follows
    # the plan).
    total = first_plan(
        step, run["spent"], run["planned"], cfg.max_minutes, cfg.max_steps, run["ended_budget"]
    )
    t_run = time.perf_counter()

    def seconds():  # training time, resumes included
        return run["spent"] + time.perf_counter() - t_run

    last_saved = run["resumed_from"]

    def save():
        """Checkpoint and export (rank 0 writes; every rank takes part). Returns "" when they were
        written, else why not (rank 0's reason; "see rank 0's log" on the others): a failed write
        (SaveError) leaves the previous files as they were, and weights that are not finite are
        never written."""
        nonlocal last_saved
        datas = [batches.state()] * world
        if ddp:
            dist.all_gather_object(datas, batches.state())  # collective: every rank takes part
        error = "" if main else "see rank 0's log"
        if main:
            averaged_ema = ema_state(ema, averaged)
            weights = {
                **{f"model.{k}": v for k, v in averaged.state_dict().items()},
                **averaged_ema,
            }
            if nonfinite(weights) is not None:
                error = f"non-finite values in {nonfinite(weights)}"
            else:
                try:
                    path = save_checkpoint(
                        out_dir,
                        {
                            "step": step,
                            "model": model.state_dict(),
                            "ema": averaged_ema,
                            "optimizer": opt.state_dict(),
                            "model_config": model.cfg.to_dict(),
                            "trained": trained,
                            "data": datas,
                            "train_config": json.loads(
                                json.dumps(dataclasses.asdict(cfg), default=str)
                            ),
                            "train_seconds": seconds(),
                            "planned_steps": total,
                            "finished": step >= total,
                            "skipped_steps": skipped,
                        },
                        cfg.keep_last,
                    )
                    last_saved = path
                    export(
                        model,
                        ema,
                        averaged,
                        out_dir / "model.safetensors",
                        step,
                        trained,
                        cfg.image_size,
                        cfg.lora if cfg.lora.rank else None,
                        cfg.control_task,
                    )
                    log.info("saved %s", path)
                except SaveError as e:
                    error = str(e)
        if (
            sum_over_ranks([main and not error], device, ddp)[0] > 0
        ):  # every rank learns rank 0's outcome
            return ""
        log.error("step %d: not saved: %s", step, error)
        return error

    def last_checkpoint():
        return f"the last checkpoint is {last_saved}" if last_saved else "no checkpoint was written"

    step_ends = collections.deque([t_run], maxlen=PACE_WINDOW + 1)
    bar = tqdm(total=total, initial=step, disable=not main, desc=f"train {cfg.train}")
    t_last, imgs_since = time.perf_counter(), 0
    loss, stats, grad_norm = torch.tensor(float("nan")), {}, torch.tensor(float("nan"))
    skipped, streak, due, fault = run["skipped"], 0, False, None
    data_bad = data_read = 0
    while step < total:
        lr = lr_at(step, total, cfg.lr, cfg.warmup_steps, cfg.lr_decay)
        for group in opt.param_groups:
            group["lr"] = lr

        # The step's micro-batches first, and what every process read, before any of them computes:
        # a process with nothing readable must not leave the others waiting in DDP's all-reduce, and
        # all stop together.
        micro_batches, bad, read = [], 0, 0
        for _ in range(cfg.grad_accum):
            batch, b, r = next_filled(batches, cfg.batch_size)
            micro_batches.append(batch)
            bad, read = bad + b, read + r
        empty, bad, read = sum_over_ranks([None in micro_batches, bad, read], device, ddp)
        data_bad, data_read = data_bad + bad, data_read + read
        if empty:
            fault = BadInput(
                f"step {step}: a process read {MIN_SAMPLES} samples in a row that were all "
                "unreadable "
                "(see the 'skipping bad sample' warnings for each one); fix or remove them"
            )
            break
        if data_read >= MIN_SAMPLES and data_bad > cfg.max_bad_fraction * data_read:
            fault = BadInput(
                f"step {step}: {data_bad:.0f} of {data_read:.0f} samples read by {world} "
                "process(es) were "
                f"unreadable ({data_bad / data_read:.2%} > "
                f"--max_bad_fraction={cfg.max_bad_fraction}); "
                "the 'skipping bad sample' warnings name each one: fix or remove them, or raise "
                "--max_bad_fraction"
            )
            break

        loss_sum = torch.zeros((), device=device)
        for micro, batch in enumerate(micro_batches):
            draw = Draw(
                generator=sample_generator(
                    cfg.seed, step, micro
                ),  # this global micro-batch's draws
                idx=torch.arange(cfg.batch_size) * world + rank,  # ranks deal perm[r::W]
                global_batch=cfg.batch_size * world,
            )
            with (
                run["net"].no_sync()
                if ddp and micro < cfg.grad_accum - 1
                else contextlib.nullcontext()
            ):
                loss, stats = objective.loss(model, run["net"], batch, draw, settings)
                scaler.scale(loss / cfg.grad_accum).backward()
            loss_sum += loss.detach()
            imgs_since += len(batch["caption"])
        loss = loss_sum / cfg.grad_accum
        if ddp and len(averaged) > 1:  # parts outside DDP's module: by hand
            average_grads(
                [
                    p
                    for m in averaged.values()
                    if m is not run["net"].module
                    for p in m.parameters()
                ],
                world,
            )
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            run["params"], cfg.grad_clip if cfg.grad_clip > 0 else math.inf
        )

        # A non-finite loss (on any process) or gradient norm: the step is skipped, no optimizer or
        # EMA update.
        nonfinite_step, stop_now = sum_over_ranks(
            [not (loss.isfinite() and grad_norm.isfinite()), stop["now"]], device, ddp
        )
        if nonfinite_step:
            skipped, streak = skipped + 1, streak + 1
            log.warning(
                "step %d skipped: loss %.4g, gradient norm %.4g (%d in a row, %d in all)",
                step,
                loss.item(),
                grad_norm.item(),
                streak,
                skipped,
            )
        else:
            scaler.step(opt)
            ema_update(ema, averaged, cfg.ema_decay, step)  # parameters are identical on every rank
            streak = 0
        scaler.update()  # fp16: a skipped step lowers the loss scale
        opt.zero_grad(set_to_none=True)
        step += 1
        bar.update(1)
        step_ends.append(time.perf_counter())
        if cfg.max_minutes and step % cfg.log_every == 0 and len(step_ends) > PACE_MIN_STEPS:
            pace = (step_ends[-1] - step_ends[0]) / (len(step_ends) - 1)
            total = plan_steps(step, seconds(), pace, cfg.max_minutes, cfg.max_steps)
            total = from_rank0(total, device) if ddp else total  # every rank runs rank 0's plan
            bar.total = total
        if main and step % cfg.log_every == 0:
            ips = imgs_since * world / (time.perf_counter() - t_last)
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}")
            for k, v in {
                "loss": loss.item(),
                **stats,
                "lr": lr,
                "grad_norm": grad_norm.item(),
                "images_per_s": ips,
                "skipped_steps": skipped,
                **({"mfu": ips / world * flops / (peak * 1e12)} if flops and peak else {}),
            }.items():
                writer.add_scalar(k, v, step)
            t_last, imgs_since = time.perf_counter(), 0
        if main and cfg.sample_every and step % cfg.sample_every == 0 and cfg.objective == "t2i":
            images = preview(
                model,
                ema["unet"],
                cfg.sample_prompts,
                cfg.sample_levels,
                cfg.image_size,
                cfg.sample_steps,
            )
            (out_dir / "samples").mkdir(exist_ok=True)
            image_grid([tensor_to_pil(im) for im in images], cols=len(images)).save(
                out_dir / "samples" / f"step_{step:09d}.png"
            )
            writer.add_images("samples", (images + 1) / 2, step)
        if streak >= cfg.max_skipped_steps:
            fault = RunStopped(
                f"step {step}: the loss or gradient norm was not finite for {streak} steps in a "
                "row "
                f"(--max_skipped_steps={cfg.max_skipped_steps}): the run diverged; nothing was "
                "saved "
                f"during the skipped steps; {last_checkpoint()}: resume from it (or an earlier "
                "one if "
                "the loss was climbing) with a lower --lr, a --grad_clip, more --warmup_steps, or "
                "bf16 "
                "instead of fp16"
            )
            break

        # Checkpoints: every ckpt_every steps (one that falls in a run of skipped steps waits for
        # the next good step), at the last step and on a stop signal. A failed save stops the run
        # only when it was the last one.
        due = due or step % cfg.ckpt_every == 0
        last = step >= total or stop_now
        if last or (due and not streak):
            if (
                step >= total and cfg.objective == "vae"
            ):  # the latents' scale (EMA VAE) goes in the last save
                model.cfg.vae.scaling_factor = latent_scale(
                    ema["vae"], Batches(cfg, rank, world, **batches.state())
                )
                log.info("latent scaling factor set to %.4f", model.cfg.vae.scaling_factor)
            due, error = False, save()
            if error and last:
                fault = RunStopped(
                    f"step {step}: not saved: {error}; {last_checkpoint()}: make room and rerun "
                    "the "
                    "same command to resume"
                )
                break
            if error:
                log.error(
                    "training goes on; the save is tried again at step %d", step + cfg.ckpt_every
                )
        if stop_now:
            log.info("stopped by signal at step %d; resume with the same command", step)
            break
    bar.close()
    if (
        fault is None and step == run["step"] and step >= total and not stop["now"]
    ):  # nothing left: mark finished
        save()
    if fault is not None and isinstance(fault, BadInput) and not streak and step > run["step"]:
        save()  # the good steps before bad data stopped the run
    if writer is not None:
        writer.close()
    if ddp:
        dist.barrier()
        dist.destroy_process_group()
    if fault is not None:
        raise fault
    return model, ema


def write_shards(cfg):
    """The run's data (centre crops: augmentation happens at training time) as webdataset shards in
    cfg.write_shards, with the scaled latents of the model's VAE when it was trained
    (data/shards.py)."""
    try:
        device, model = init_processes(cfg.device)[3], Text2Earth(cfg.model).eval()
        trained = load_pretrained(model.to(device), cfg.init_from) if cfg.init_from else set()
        dataset = build_dataset(cfg)
        dataset.transform = eval_transform(cfg.image_size)
        encode = (lambda x: model.encode_images(x.to(device)).cpu()) if "vae" in trained else None
        paths = write(dataset, cfg.write_shards, encode_fn=encode, progress=True)
    except (ValueError, OSError) as e:  # FileExistsError: shards there already
        raise BadInput(str(e)) from e
    print(
        f"wrote {len(paths)} shards to {cfg.write_shards} ({'with' if encode else 'without'} "
        "latents)"
    )


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if {"-h", "--help"} & set(argv):
        print(usage(__doc__, TrainConfig()))
        return 0
    try:
        cfg = parse_config(argv)
        write_shards(cfg) if cfg.write_shards else train(cfg)
    except BadInput as e:  # bad input: one line naming it, exit code 2
        print(f"train.py: error: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # a fault the run stopped at: exit code 1
        print(f"train.py: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
