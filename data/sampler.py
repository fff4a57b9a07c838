"""
Index order for the map-style readers of data/datasets.py: a per-epoch permutation split by
rank, resumable mid-epoch; and the rank / world-size lookup it shares with data/shards.py.
(The diffusion samplers are in model/samplers.py.)
"""

import torch


def _dist_rank_world(rank, world_size):
    """Explicit (rank, world_size), else torch.distributed's when initialised, else (0, 1)."""
    if rank is None or world_size is None:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank = torch.distributed.get_rank() if rank is None else rank
            world_size = torch.distributed.get_world_size() if world_size is None else world_size
        else:
            rank, world_size = (
                (0 if rank is None else rank),
                (1 if world_size is None else world_size),
            )
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} must be in [0, world_size={world_size})")
    return rank, world_size


class ResumableSampler(torch.utils.data.Sampler):
    """Per-epoch permutation of range(n) (seeded by seed + epoch), split by rank as
    perm[rank::world_size], starting at `start_index` (samples this rank already consumed in
    the epoch). Since it runs in the main process, the order does not depend on num_workers.
    drop_last=True truncates to a multiple of world_size; False pads by wrapping around
    (so every rank gets the same count)."""

    def __init__(
        self, n, seed=0, rank=None, world_size=None, start_index=0, shuffle=True, drop_last=True
    ):
        if n <= 0:
            raise ValueError(f"ResumableSampler needs n > 0, got {n}")
        self.n, self.seed, self.shuffle, self.drop_last = n, seed, shuffle, drop_last
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        if drop_last and n < self.world_size:
            raise ValueError(
                f"n={n} samples cannot be split over world_size={self.world_size} with drop_last"
            )
        self.epoch = 0
        self._set_start(start_index)

    def _set_start(self, start_index):
        if not 0 <= start_index <= self.num_per_rank:
            raise ValueError(f"start_index {start_index} not in [0, {self.num_per_rank}]")
        self.start_index = start_index

    @property
    def num_per_rank(self):
        W = self.world_size
        return self.n // W if self.drop_last else -(-self.n // W)

    def set_epoch(self, epoch, start_index=0):
        """Select the epoch; start_index > 0 resumes it mid-way."""
        self.epoch = int(epoch)
        self._set_start(start_index)

    def indices(self):
        """All of this rank's indices for the current epoch (ignoring start_index)."""
        if self.shuffle:
            perm = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch)
            )
        else:
            perm = torch.arange(self.n)
        total = self.num_per_rank * self.world_size
        perm = perm.repeat(-(-total // self.n))[:total]  # truncate, or pad by wrapping around
        return perm[self.rank : total : self.world_size].tolist()

    def __iter__(self):
        return iter(self.indices()[self.start_index :])

    def __len__(self):
        return self.num_per_rank - self.start_index
