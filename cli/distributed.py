"""Generation over torchrun's processes: the same command runs as one process or as N
(`torchrun --nproc_per_node=N sample.py ...`), each process making its share of the images.

    args.device = local_device(args.device)   # before the checks: cuda -> cuda:LOCAL_RANK
    ...                                       # every check that can refuse, alike on every rank
    with processes(args.device) as (rank, world):
        with rank0_first():                   # rank 0 writes the files the others then read
            ...
        mine, missing = share_of_batches(paths, batch)   # ranges into the job list
        for r in mine: ...                    # generate jobs[r] whole, write its missing files
    if rank:                                  # every rank is done: the summary is rank 0's
        return 0

The processes only synchronise (barriers, rank 0's list of batches), so the group is gloo on every
device; each process samples on its own GPU. Batches are fixed slices of the whole job list and a
batch is always generated whole, so every image is made in the same batch as on one process: the
same pixels on any number of processes and after any interruption, the ddpm sampler (noise drawn
per batch) included.

A process that fails ends the run: torchrun stops the others; under another launcher they give up
at the next barrier after TIMEOUT, naming the ranks that did not arrive.
"""

import datetime
import os
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist

# how long a process waits at a barrier for the others: past model loading and one batch's skew
TIMEOUT = datetime.timedelta(minutes=30)


def rank_and_world():
    """(rank, world) of this process: torchrun's RANK and WORLD_SIZE, (0, 1) without them."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def local_device(name):
    """The device this process samples on: under torchrun (more than one process) a CUDA device
    ("cuda", "cuda:N") is this process's own GPU, cuda:LOCAL_RANK; otherwise `name` as it is."""
    if rank_and_world()[1] > 1 and str(name).startswith("cuda"):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return name


@contextmanager
def processes(device):
    """The process group for the block, yielding (rank, world): gloo, started from torchrun's
    variables when there is more than one process (nothing on one). Leaving the block normally,
    every process waits for the others; the group then ends, also on an error."""
    rank, world = rank_and_world()
    if world == 1:
        yield 0, 1
        return
    # torchrun's agent keeps one store across restarts of the workers (--max-restarts), holding
    # the addresses of the dead ones; each attempt meets under a prefix of its own
    store, rank, world = next(dist.rendezvous("env://"))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        "gloo",
        store=dist.PrefixStore(f"generate_{attempt}", store),
        rank=rank,
        world_size=world,
        timeout=TIMEOUT,
    )
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    try:
        yield rank, world
        barrier()
    finally:
        dist.destroy_process_group()


def barrier():
    """Wait for every process (nothing without a group); after TIMEOUT a RuntimeError names the
    ranks that did not arrive."""
    if dist.is_initialized():
        dist.monitored_barrier(timeout=TIMEOUT, wait_all_ranks=True)


@contextmanager
def rank0_first():
    """Rank 0 runs the block before the others: the files it writes there (test renders) exist
    when they run it."""
    rank = rank_and_world()[0] if dist.is_initialized() else 0
    if rank:
        barrier()
    yield
    if not rank:
        barrier()


def from_rank0(value):
    """Rank 0's `value` (any picklable object) on every process; the value itself on one."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def share_of_batches(paths, batch, redo=False):
    """(mine, missing): this process's batches to generate, as ranges into `paths` (the files of
    the whole job list, in order), and how many files were missing. The batches are the fixed
    slices [i, i + batch) that have a file missing (every one with redo); rank 0 lists them, which
    every process waits for, so any check a process makes before this call precedes every write.
    They are dealt round-robin: the processes' shares differ by one batch at most."""
    rank, world = rank_and_world() if dist.is_initialized() else (0, 1)
    listed = None
    if rank == 0:
        exists = [Path(path).exists() for path in paths]
        starts = [i for i in range(0, len(paths), batch) if redo or not all(exists[i : i + batch])]
        listed = (starts, len(paths) if redo else exists.count(False))
    starts, missing = from_rank0(listed)
    ranges = [range(i, min(i + batch, len(paths))) for i in starts]
    return ranges[rank::world], missing
