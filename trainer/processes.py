"""The processes of a training run: torchrun's process group and this process's device, and the few
collectives the training loop makes itself (gradients outside DDP's module, rank 0's plan, the sums
every process decides from)."""

import os

import torch
import torch.distributed as dist


def init_processes(device_name):
    """(ddp, rank, world, device): torchrun's process group when its variables are set (nccl on
    GPUs, gloo on CPUs), else one process; device_name "" = cuda when available. A device this
    machine lacks is a ValueError."""
    ddp = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    want_cuda = device_name.startswith("cuda") or (not device_name and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        raise ValueError(f"--device={device_name}: this machine has no CUDA GPU (use --device=cpu)")
    try:
        device = torch.device(device_name or ("cuda" if want_cuda else "cpu"))
    except RuntimeError:
        raise ValueError(f"--device={device_name!r} is not a device (cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"--device={device_name}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    rank, world = 0, 1
    if ddp:
        # torchrun's agent keeps one store for every restart of the workers, so the keys through
        # which the first workers met (each rank's address) are still there when restarted ones
        # look: they would connect to the dead ones' addresses ("Connection refused"). Each restart
        # meets under a prefix of its own.
        store, rank, world = next(dist.rendezvous("env://"))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(
            "nccl" if want_cuda else "gloo",
            store=dist.PrefixStore(f"restart_{attempt}", store),
            rank=rank,
            world_size=world,
        )
        device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if want_cuda else "cpu")
        if want_cuda:
            torch.cuda.set_device(device)
    return ddp, rank, world, device


def average_grads(params, world):
    """Average the gradients of `params` over the processes with one all-reduce of their
    concatenation (one collective per tensor costs ~1 ms over gloo). Every rank runs the same model,
    so has the same set."""
    grads = [p.grad for p in params if p.grad is not None]
    if grads:
        flat = torch.cat([g.flatten() for g in grads])
        dist.all_reduce(flat)
        flat /= world
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))


def from_rank0(value, device):
    """An int every process takes from rank 0 (its plan of the run's length)."""
    t = torch.tensor([value], device=device)
    dist.broadcast(t, 0)
    return int(t.item())


def sum_over_ranks(values, device, ddp=True):
    """The sums of `values` (numbers) over the processes, as floats, with one all-reduce: what every
    process decides from them (stop, skip a step) it decides alike. One process (ddp False): the
    values themselves."""
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    if ddp:
        dist.all_reduce(t)
    return t.tolist()
