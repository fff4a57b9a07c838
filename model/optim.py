"""The trainer's processes, schedule and collectives: torchrun's process group and the device, the learning rate,
the length of a run under a time budget, the collectives outside DDP's module, the optimizer and the EMA. `cfg` is
train.py's TrainConfig."""
import math
import os

import torch
import torch.distributed as dist


def init_processes(device_name):
    """(ddp, rank, world, device): torchrun's process group when its variables are set (nccl on GPUs, gloo on
    CPUs), else one process; device_name "" = cuda when available. A device this machine lacks is a ValueError."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    want_cuda = device_name.startswith("cuda") or (not device_name and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device={device_name}: this machine has no CUDA GPU (use --device=cpu)")
    try:
        device = torch.device(device_name or ("cuda" if want_cuda else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device={device_name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"--device={device_name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    rank, world = 0, 1
    if ddp:
        # torchrun's agent keeps one store for every restart of the workers, so the keys through which the first
        # workers met (each rank's address) are still there when restarted ones look: they would connect to the
        # dead ones' addresses ("Connection refused"). Each restart meets under a prefix of its own.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group("nccl" if want_cuda else "gloo", store=dist.PrefixStore(f"restart_{attempt}", store),
                                rank=rank, world_size=world)
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if want_cuda else "cpu")
        if want_cuda:
            torch.cuda.set_device(device)
    return ddp, rank, world, device


def lr_at(cfg, step, total):
    """Learning rate of `step` in a run of `total` steps: linear warmup, then constant or cosine to 10%."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps > 0 else 1.0
    if cfg.lr_decay == "cosine":
        return cfg.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, step / max(1, total)))))
    return cfg.lr * warm


PACE_WINDOW = 50          # max_minutes: the pace is that of the last PACE_WINDOW steps (steps and checkpoints)
PACE_MIN_STEPS = 10       # and is not trusted before this many steps of the run (or of its resume) have passed


def plan_steps(cfg, step, spent, pace):
    """The run's length under a time budget: at `step`, with `spent` seconds of training behind it and `pace`
    seconds a step measured lately, the steps that fit in cfg.max_minutes (at least `step`, at most max_steps)."""
    left = cfg.max_minutes * 60 - spent
    return max(step, min(cfg.max_steps, step + int(left // max(pace, 1e-9))))


def first_plan(cfg, step, spent, planned, ended_budget=0.0):
    """The run's length when it (re)starts at `step`: max_steps; under a time budget the plan it stopped with
    (`planned`) until re-planned, or `step` itself once the budget is spent or the run ended by it
    (`ended_budget`: the budget in minutes it finished with; a larger one now continues it)."""
    if cfg.max_minutes and (spent >= cfg.max_minutes * 60 or cfg.max_minutes <= ended_budget):
        return step
    if cfg.max_minutes and planned > step:
        return min(cfg.max_steps, planned)
    return cfg.max_steps


def average_grads(params, world):
    """Average the gradients of `params` over the processes with one all-reduce of their concatenation (one
    collective per tensor costs ~1 ms over gloo). Every rank runs the same model, so has the same set."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def adamw(params, cfg, device):
    """AdamW over `params`, weight decay on matrices and kernels only (not on biases and norms), fused into one
    kernel on CUDA and the CPU."""
    return torch.optim.AdamW([{"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
                              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}], lr=cfg.lr,
                             betas=cfg.betas, eps=cfg.adam_eps, fused=torch.device(device).type in ("cuda", "cpu"))


@torch.no_grad()
def ema_update(ema, live, decay, step):
    """ema <- lerp(ema, live, 1 - d) with d = min(decay, (1 + step) / (10 + step)) (the warm-up of the average lets
    early steps count more), over the parameters that train: frozen ones (a LoRA run's base weights) stay equal."""
    d = min(decay, (1 + step) / (10 + step))
    pairs = [(e, p) for e, p in zip(ema.parameters(), live.parameters()) if p.requires_grad]
    if pairs:
        torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1 - d)


def from_rank0(value, device):
    """An int every process takes from rank 0 (its plan of the run's length)."""
    t = torch.tensor([value], device=device)
    dist.broadcast(t, 0)
    return int(t.item())


def sum_over_ranks(values, device, ddp=True):
    """The sums of `values` (numbers) over the processes, as floats, with one all-reduce: what every process
    decides from them (stop, skip a step) it decides alike. One process (ddp False): the values themselves."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(t)
    return t.tolist()
