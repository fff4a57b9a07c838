"""From a run's config to endless, resumable micro-batches: the dataset it names
and this process's batches.

`cfg` is any object with train.py's data fields (data, data_path, data_split, image_size, gsd_m,
min_quality, max_bad_fraction, seed, batch_size, num_workers, synthetic_*, places): TrainConfig in
practice.
Paired data for a ControlNet (data/modalities.py) reads control_task, control_path, pair_replace
and pair_captions, and a text -> SAR/NIR/PAN fine-tune on the procedural Earth reads modality;
configs without these fields get none of it.
"""

from pathlib import Path

import torch

from data.datasets import CaptionFolder, Git10M, KarpathyCaptions, PairCaptions
from data.levels import level_from_resolution
from data.modalities import DERIVED, TASKS, ControlPairs, PairedFolder
from data.sampler import ResumableSampler
from data.shards import ShardDataset
from data.samples import BadDataCounter, collate
from data.transforms import train_transform

DATA = ("synthetic", "karpathy", "folder", "git10m", "shards", "paired")
SINGLE_MODALITIES = ("pan", "nir", "sar")  # cfg.modality: the procedural Earth's image is that view


def _replace_pairs(v):
    """pair_replace as ((old, new), ...) from pairs or a flat (old1, new1, old2, new2, ...)."""
    v = tuple(v)
    if all(isinstance(s, str) for s in v):
        if len(v) % 2:
            raise ValueError(
                f"--pair_replace: a flat list needs old, new strings in pairs, got {len(v)}: {v!r}"
            )
        return tuple(zip(v[::2], v[1::2]))
    return tuple(tuple(p) for p in v)


def _control_fields(cfg):
    """(control_task, modality) of the run, checked against the data it reads."""
    task, modality = getattr(cfg, "control_task", ""), getattr(cfg, "modality", "")
    if task and task not in TASKS:
        raise ValueError(f"--control_task={task!r} is unknown; tasks: {sorted(TASKS)}")
    if modality and (modality not in SINGLE_MODALITIES or cfg.data != "synthetic" or task):
        raise ValueError(
            f"--modality={modality!r}: one of {SINGLE_MODALITIES}, with --data=synthetic and no "
            f"--control_task (got --data={cfg.data}, --control_task={task!r})"
        )
    if cfg.data == "paired" and not task:
        raise ValueError("--data=paired needs --control_task (e.g. sar2rgb) and --control_path")
    if getattr(cfg, "pair_captions", "") and cfg.data != "paired":
        raise ValueError(
            f"--pair_captions captions --data=paired's pairs; --data={cfg.data} reads its "
            "captions from --data_path"
        )
    if cfg.data == "shards" and task:
        raise ValueError(
            f"--control_task={task}: tar shards hold no control images; not supported with "
            "--data=shards"
        )
    return task, modality


def _places(cfg):
    """The side of the spatial split the run reads (data/places.py): "all", "train", "held_out"."""
    return getattr(cfg, "places", "all")


def build_dataset(cfg, max_bad_fraction=None):
    """A map-style dataset of sample dicts (image (3, H, W) in [-1, 1], caption, level,
    ...; + control (3, H, W) with a control_task). Its readers stop at max_bad_fraction unreadable
    samples (default: cfg.max_bad_fraction; 1.0 never: a training run counts them over all
    its processes instead)."""
    task, modality = _control_fields(cfg)
    counter = BadDataCounter(
        max_bad_fraction=cfg.max_bad_fraction if max_bad_fraction is None else max_bad_fraction
    )
    tf = train_transform(cfg.image_size)
    if cfg.data == "synthetic":
        from data.synthetic import ProceduralEarth

        return ProceduralEarth(
            cfg.synthetic_samples,
            size=cfg.image_size,
            levels=cfg.synthetic_levels,
            seed=cfg.seed,
            integer_levels=cfg.synthetic_integer_levels,
            pair=TASKS[task] if task else (modality or None),
            located=getattr(cfg, "synthetic_located", False),
            places=_places(cfg),
            omit_class=getattr(cfg, "synthetic_omit_class", 0.0),
        )
    if not cfg.data_path:
        raise ValueError(f"--data={cfg.data} needs --data_path")
    if cfg.data == "paired":
        if not getattr(cfg, "control_path", ""):
            raise ValueError(
                "--data=paired needs --control_path (the control images; --data_path holds the "
                "targets)"
            )
        pairs = PairedFolder(
            cfg.control_path,
            cfg.data_path,
            replace=_replace_pairs(getattr(cfg, "pair_replace", ())),
            level=level_from_resolution(cfg.gsd_m) if cfg.gsd_m else 0.0,
            transform=tf,
            counter=counter,
            seed=cfg.seed,
        )
        captions = getattr(cfg, "pair_captions", "")
        return PairCaptions(pairs, captions, split=cfg.data_split) if captions else pairs
    if task and TASKS[task][0] not in DERIVED:
        raise ValueError(
            f"--control_task={task}: its control ({TASKS[task][0]}) cannot be derived from "
            f"--data={cfg.data}'s RGB images; it needs --data=paired (with --control_path) or "
            "--data=synthetic"
        )
    reader = _reader(cfg, tf, counter)
    return ControlPairs(reader, task, seed=cfg.seed) if task else reader


def _reader(cfg, tf, counter):
    """The RGB reader that --data names (karpathy, folder, git10m). A folder --data_path of
    --data=folder is read as Hugging Face imagefolder lays it out (CaptionFolder)."""
    if cfg.data == "karpathy" and Path(cfg.data_path).is_dir():
        raise ValueError(
            f"--data=karpathy: --data_path={cfg.data_path} is a folder; give the caption json in it"
        )
    if cfg.data == "karpathy":
        return KarpathyCaptions(
            cfg.data_path,
            split=cfg.data_split,
            transform=tf,
            gsd_m=cfg.gsd_m or None,
            counter=counter,
            seed=cfg.seed,
            places=_places(cfg),
        )
    if cfg.data == "folder":
        return CaptionFolder(
            cfg.data_path,
            transform=tf,
            min_quality=cfg.min_quality or None,
            counter=counter,
            seed=cfg.seed,
            places=_places(cfg),
            split=cfg.data_split,
        )
    if cfg.data == "git10m":
        return Git10M(
            cfg.data_path,
            split=cfg.data_split,
            transform=tf,
            min_quality=cfg.min_quality or None,
            counter=counter,
            seed=cfg.seed,
            places=_places(cfg),
        )
    raise ValueError(f"--data must be one of {DATA}; got {cfg.data!r}")


class Batches:
    """Endless micro-batches for this rank, with a resumable position (epoch, batches into the
    epoch). Each batch counts its unreadable samples ("n_bad"; collate); the readers do not stop on
    them, the training loop judges the bad fraction over all processes (a process that stopped alone
    would leave the others waiting)."""

    def __init__(self, cfg, rank, world, epoch=0, batch_in_epoch=0):
        self.cfg, self.rank, self.world = cfg, rank, world
        self.epoch, self.batch_in_epoch = epoch, batch_in_epoch
        self.collate = collate
        if cfg.data == "shards":
            _control_fields(cfg)
            self.dataset = ShardDataset(
                cfg.data_path,
                rank=rank,
                world_size=world,
                seed=cfg.seed,
                transform=train_transform(cfg.image_size),
                batch_size=cfg.batch_size,
                min_quality=cfg.min_quality or None,
                counter=BadDataCounter(1.0),
                places=_places(cfg),
            )
            self.sampler = None
        else:
            self.dataset = build_dataset(cfg, max_bad_fraction=1.0)
            self.sampler = ResumableSampler(
                len(self.dataset), seed=cfg.seed, rank=rank, world_size=world
            )
            if self.sampler.num_per_rank < cfg.batch_size:
                raise ValueError(
                    f"{len(self.dataset)} samples: fewer than batch_size={cfg.batch_size} per rank"
                )
        self._start()

    def _start(self):
        if self.sampler is not None:
            self.sampler.set_epoch(
                self.epoch, start_index=self.batch_in_epoch * self.cfg.batch_size
            )
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
        else:
            self.dataset.set_epoch(self.epoch, skip_batches=self.batch_in_epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=self.cfg.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=self.cfg.num_workers,
            collate_fn=self.collate,
            persistent_workers=False,
            prefetch_factor=2 if self.cfg.num_workers else None,
        )
        self.iterator = iter(loader)

    def __next__(self):
        """The next batch (empty, {"caption": [], ...}, when no sample in it was readable;
        it counts as consumed)."""
        while True:
            try:
                batch = next(self.iterator)
                self.batch_in_epoch += 1
                return batch
            except StopIteration:
                self.epoch, self.batch_in_epoch = self.epoch + 1, 0
                self._start()

    def state(self):
        return {"epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch}
