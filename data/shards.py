"""
Webdataset-layout tar shards: a streaming reader (ShardDataset) and a converter (write_shards).

A shard is a plain tar whose members come in groups sharing a key:
    {key}.jpg | {key}.png        encoded image (optional when a latent is present)
    {key}.json                   {"caption", "level", "quality", "key"} + the sample's other
                                 numeric fields (e.g. "cloud"), read back as the same fields
    {key}.latent.npy             optional pre-encoded VAE latent (4, h, w)
write_shards also writes `index.json` (per-shard sample counts); without it the reader counts
samples by scanning tar headers once.

Splitting: every epoch the shard order is permuted (seed, epoch); the concatenated stream of
N samples is cut into world_size equal contiguous ranges (one per rank, the N % world_size
remainder dropped unless drop_remainder=False), and each rank's range into num_workers
contiguous ranges. So every sample is read exactly once per epoch and, with drop_remainder,
every rank yields the same count (DDP needs equal step counts). Each worker shuffles its range
with a buffer seeded by (seed, epoch, rank, worker); bad samples are yielded as None and
filtered ones as FILTERED (collate drops both) so positions, and thus `skip_batches`, stay
exact. For a heavily filtered subset (stage 2: quality > 4.8) write its own shards,
Git10M(min_quality=4.8) -> write_shards, rather than filtering the stream.

    write_shards(Git10M(root, transform=eval_transform(256)), "shards/", 1000,
                 encode_fn=vae_encode)
    ds = ShardDataset("shards/", seed=seed, batch_size=B)  # rank from torch.distributed
    loader = DataLoader(ds, batch_size=B, num_workers=K, collate_fn=collate)
    for epoch in ...:
        ds.set_epoch(epoch, skip_batches=steps_done_in_epoch)  # 0 unless resuming
        for batch in loader: ...

Git-10M is CC-BY-NC-ND-4.0: shards made from it are for your own training, not for sharing.
"""

import io
import json
import logging
import math
import tarfile
from pathlib import Path

import numpy as np
import torch

from data.places import check_split, in_split
from data.sampler import _dist_rank_world
from data.samples import FILTERED, BadDataCounter, build_sample, extra_fields, sample_generator
from data.transforms import random_dihedral, tensor_to_pil

logger = logging.getLogger(__name__)

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "tif", "tiff")

# -----------------------------------------------------------------------------
# tar access


def _split_name(name):
    """'dir/abc.latent.npy' -> ('dir/abc', 'latent.npy'): the key ends at the basename's first
    dot."""
    head, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{head}/{stem}" if head else stem), ext


def _iter_records(path, start=0, count=None):
    """Yield (key, {ext: bytes}) for records start .. start+count-1 of a tar; the members of
    records before `start` are skipped without reading their data."""
    end = math.inf if count is None else start + count
    with tarfile.open(path, "r:") as tar:
        n, cur_key, cur = -1, None, None
        for m in tar:
            if not m.isfile():
                continue
            key, ext = _split_name(m.name)
            if key != cur_key:
                if cur is not None:
                    yield cur_key, cur
                n += 1
                if n >= end:
                    return
                cur_key, cur = key, ({} if n >= start else None)
            if cur is not None:
                cur[ext] = tar.extractfile(m).read()
        if cur is not None:
            yield cur_key, cur


def _count_records(path):
    """Records in a tar, from its headers only."""
    n, cur_key = 0, None
    with tarfile.open(path, "r:") as tar:
        for m in tar:
            if m.isfile() and _split_name(m.name)[0] != cur_key:
                n, cur_key = n + 1, _split_name(m.name)[0]
    return n


def list_shards(paths):
    """A folder (its *.tar, sorted), one tar, or a list of tars -> list of Paths."""
    if isinstance(paths, (str, Path)):
        p = Path(paths)
        if p.is_dir():
            out = sorted(p.glob("*.tar"))
            if not out:
                raise ValueError(f"no .tar shards in {p}")
            return out
        paths = [p]
    out = [Path(p) for p in paths]
    for p in out:
        if not p.is_file():
            raise ValueError(f"shard {p} does not exist")
    if not out:
        raise ValueError("empty list of shards")
    return out


def shard_counts(shards):
    """Samples per shard, from each folder's index.json when it lists the shard, else by
    scanning."""
    counts, indexes = [], {}
    for p in shards:
        if p.parent not in indexes:
            f = p.parent / "index.json"
            listed = json.loads(f.read_text())["shards"] if f.is_file() else []
            indexes[p.parent] = {s["file"]: s["count"] for s in listed}
        c = indexes[p.parent].get(p.name)
        counts.append(int(c) if c is not None else _count_records(p))
    return counts


def _split_range(a, b, parts, i):
    """i-th of `parts` contiguous near-equal pieces of [a, b)."""
    n = b - a
    return a + (n * i) // parts, a + (n * (i + 1)) // parts


def _resume_plan(skip_batches, batch_size, worker_counts):
    """Where a resumed epoch starts, for DataLoader workers playing "roles" (contiguous ranges of
    the rank's stream, worker_counts samples each). The DataLoader delivers batches in a cycle
    over workers 0..K-1, skipping workers that have run out (each worker batches its own stream).
    After skip_batches batches, returns (first, done): the role next in the cycle, and the samples
    each role already produced. A fresh DataLoader starts its cycle at worker 0, so worker d
    must play role (first + d) % K."""
    K = len(worker_counts)
    batches = [-(-n // batch_size) for n in worker_counts]  # ceil
    if skip_batches > sum(batches):
        raise ValueError(
            f"skip_batches={skip_batches} is past the end of this rank's epoch ({sum(batches)} "
            f"batches of {batch_size})"
        )
    left = skip_batches
    taken, c = [0] * K, 0
    while left > 0:
        if taken[c % K] < batches[c % K]:
            taken[c % K] += 1
            left -= 1
        c += 1
    return c % K, [min(t * batch_size, n) for t, n in zip(taken, worker_counts)]


# -----------------------------------------------------------------------------
# reader


class ShardDataset(torch.utils.data.IterableDataset):
    """Stream samples (the dict of data/samples.py, None when unreadable, FILTERED when filtered)
    from tar shards.

    rank / world_size: explicit, else from torch.distributed, else (0, 1).
    shuffle_buffer: 0 keeps the stream order. seed + epoch (set_epoch) fix the order.
    skip_batches: batches this rank's DataLoader already delivered this epoch (resume);
    batch_size: that DataLoader's batch size (1 when iterating the dataset directly). The skip is
    mapped onto DataLoader workers assuming its in-order round-robin (see _resume_plan); resume
    with the same num_workers, batch_size and world_size as the interrupted run.
    load_images=False ignores image members (latent-only training). augment_latents applies
    random flips / rot90 to latents (only without images, so both never disagree).
    min_quality: samples whose quality is not > min_quality are filtered (yielded as FILTERED),
    as are, with places "train" or "held_out", the samples on the other side of the spatial split
    (data/places.py; their json's "lat" and "lon").
    """

    def __init__(  # noqa: PLR0913 (every option of the reader, all keywords)
        self,
        shards,
        rank=None,
        world_size=None,
        seed=0,
        shuffle_buffer=1000,
        shuffle_shards=True,
        transform=None,
        skip_batches=0,
        batch_size=1,
        drop_remainder=True,
        load_images=True,
        augment_latents=False,
        min_quality=None,
        min_size=0,
        counter=None,
        allow_empty_caption=False,
        places="all",
    ):
        check_split(places)
        if augment_latents and load_images:
            raise ValueError(
                "augment_latents=True needs load_images=False (image and latent would get "
                "different flips)"
            )
        if shuffle_buffer < 0 or batch_size < 1 or skip_batches < 0:
            raise ValueError(
                "need shuffle_buffer >= 0, batch_size >= 1, skip_batches >= 0; got "
                f"{shuffle_buffer}, {batch_size}, {skip_batches}"
            )
        self.shards = list_shards(shards)
        self.counts = shard_counts(self.shards)
        self.rank, self.world_size = _dist_rank_world(rank, world_size)
        self.seed, self.epoch = seed, 0
        self.shuffle_buffer, self.shuffle_shards = shuffle_buffer, shuffle_shards
        self.transform, self.skip_batches, self.batch_size = transform, skip_batches, batch_size
        self.drop_remainder, self.load_images = drop_remainder, load_images
        self.augment_latents = augment_latents
        self.min_quality, self.min_size, self.places = min_quality, min_size, places
        self.allow_empty_caption = allow_empty_caption
        self.counter = counter if counter is not None else BadDataCounter()
        if self.num_samples() == 0:
            raise ValueError(
                f"{sum(self.counts)} samples in {len(self.shards)} shards: none left for rank "
                f"{self.rank} of {self.world_size}"
            )

    def set_epoch(self, epoch, skip_batches=0):
        """Select the epoch; skip_batches > 0 resumes it mid-way."""
        self.epoch, self.skip_batches = int(epoch), int(skip_batches)

    def _rank_range(self, rank):
        N, W = sum(self.counts), self.world_size
        if self.drop_remainder:
            M = N // W
            return rank * M, (rank + 1) * M
        return _split_range(0, N, W, rank)

    def num_samples(self):
        """Samples (including skipped ones, yielded as None) this rank yields per full epoch."""
        a, b = self._rank_range(self.rank)
        return b - a

    def _segments(self, a, b):
        """Global stream range [a, b) in this epoch's shard order -> [(shard, start, count)]."""
        order = list(range(len(self.shards)))
        if self.shuffle_shards:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        segs, pos = [], 0
        for s in order:
            lo, hi = max(a, pos), min(b, pos + self.counts[s])
            if lo < hi:
                segs.append((self.shards[s], lo - pos, hi - lo))
            pos += self.counts[s]
        return segs

    def _raw(self, wa, wb, rng):
        """(global position, key, record) over [wa, wb), through the shuffle buffer."""
        records = (
            rec
            for path, start, count in self._segments(wa, wb)
            for rec in _iter_records(path, start, count)
        )
        stream = ((wa + n, k, r) for n, (k, r) in enumerate(records))
        if self.shuffle_buffer == 0:
            yield from stream
            return
        buf = []
        for item in stream:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = int(rng.integers(len(buf)))
            buf[j], item = item, buf[j]
            yield item
        rng.shuffle(buf)
        yield from buf

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, K = (info.id, info.num_workers) if info is not None else (0, 1)
        a, b = self._rank_range(self.rank)
        ranges = [_split_range(a, b, K, w) for w in range(K)]
        sizes = [hi - lo for lo, hi in ranges]
        first, done = _resume_plan(self.skip_batches, self.batch_size, sizes)
        role = (first + wid) % K
        wa, wb = ranges[role]
        skip = done[role]
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, role])
        for n, (pos, key, rec) in enumerate(self._raw(wa, wb, rng)):
            if n >= skip:
                yield self._decode(pos, key, rec)

    def _decode(self, pos, key, rec):
        """Raw tar record -> sample dict, None (unreadable) or FILTERED."""
        c = self.counter
        try:
            meta = json.loads(rec["json"]) if "json" in rec else {}
            if not isinstance(meta, dict):
                raise ValueError("not a json object")
        except (ValueError, UnicodeDecodeError) as e:
            c.record_bad(key, f"bad json: {e}")
            return None
        key = str(meta.get("key") or key)
        quality = float("nan") if meta.get("quality") is None else float(meta["quality"])
        fields = {
            **extra_fields(meta),
            "key": key,
            "caption": meta.get("caption", ""),
            "level": float(meta.get("level") or 0.0),
            "quality": quality,
        }
        if self.min_quality is not None and not quality > self.min_quality:
            c.record_filtered(key, f"quality {quality} <= {self.min_quality}")
            return FILTERED
        if not in_split(fields.get("lat"), fields.get("lon"), self.places):
            c.record_filtered(key, f"place outside the spatial split {self.places!r}")
            return FILTERED
        g = sample_generator(self.seed, self.epoch, pos)
        latent = None
        if "latent.npy" in rec:
            try:
                z = np.load(io.BytesIO(rec["latent.npy"]), allow_pickle=False)
                latent = torch.from_numpy(z).float()
            except (ValueError, OSError, EOFError) as e:
                c.record_bad(key, f"unreadable latent: {e}")
                return None
            if latent.ndim != 3:
                shape = tuple(latent.shape)
                c.record_bad(key, f"latent: expected (C, h, w), got shape {shape}")
                return None
            if self.augment_latents:
                latent = random_dihedral(latent, g)
        image = None
        if self.load_images:
            image = next((rec[e] for e in IMAGE_EXTS if e in rec), None)
            if image is None and latent is None:
                c.record_bad(key, f"missing file: no image member ({sorted(rec)})")
                return None
        return build_sample(
            fields,
            image,
            transform=self.transform,
            generator=g,
            counter=c,
            min_size=self.min_size,
            allow_empty_caption=self.allow_empty_caption,
            latent=latent,
        )


# -----------------------------------------------------------------------------
# converter


def _add(tar, name, data):
    ti = tarfile.TarInfo(name)
    ti.size, ti.mode, ti.mtime = len(data), 0o644, 0
    tar.addfile(ti, io.BytesIO(data))


def _prepare_out_dir(out_dir, prefix, overwrite):
    """Create out_dir; its existing shards and index.json are removed with overwrite=True, else
    a FileExistsError."""
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(out_dir.glob(f"{prefix}-*.tar"))
    if (out_dir / "index.json").exists():
        existing.append(out_dir / "index.json")
    if existing:
        if not overwrite:
            names = ", ".join(p.name for p in existing[:3]) + (", ..." if len(existing) > 3 else "")
            raise FileExistsError(
                f"{out_dir} already holds shards ({names}); pass overwrite=True to replace them"
            )
        for p in existing:
            p.unlink()


class _ShardWriter:
    """Samples into `{out_dir}/{prefix}-000000.tar`, ..., samples_per_shard each; a shard is
    written as .tar.tmp and renamed once complete. `index` lists the finished shards' counts."""

    def __init__(
        self,
        out_dir,
        prefix,
        samples_per_shard,
        write_images,
        image_format,
        jpeg_quality,
        latent_dtype,
    ):
        self.out_dir, self.prefix, self.samples_per_shard = out_dir, prefix, samples_per_shard
        self.write_images, self.image_format = write_images, image_format
        self.jpeg_quality, self.latent_dtype = jpeg_quality, latent_dtype
        self.index, self.paths = [], []
        self.tar, self.n_in_shard, self.n = None, 0, 0

    def put(self, sample, latent):
        if self.tar is None or self.n_in_shard == self.samples_per_shard:
            self.close()
            path = self.out_dir / f"{self.prefix}-{len(self.paths):06d}.tar"
            self.paths.append(path)
            self.tar = tarfile.open(path.with_suffix(".tar.tmp"), "w")
            self.n_in_shard = 0
        # tar keys must not contain dots; the sample's own key is in the json
        k, tar = f"{self.n:09d}", self.tar
        q = sample["quality"]
        meta = {
            **extra_fields(sample),
            "caption": sample["caption"],
            "level": sample["level"],
            "quality": None if q != q else q,
            "key": sample["key"],
        }
        _add(tar, f"{k}.json", json.dumps(meta).encode())
        if self.write_images and "image" in sample:
            buf = io.BytesIO()
            pil = tensor_to_pil(sample["image"])
            if self.image_format == "jpg":
                pil.save(buf, format="JPEG", quality=self.jpeg_quality)
            else:
                pil.save(buf, format="PNG")
            _add(tar, f"{k}.{self.image_format}", buf.getvalue())
        if latent is not None:
            buf = io.BytesIO()
            np.save(buf, latent.detach().to("cpu", self.latent_dtype).numpy())
            _add(tar, f"{k}.latent.npy", buf.getvalue())
        self.n_in_shard += 1
        self.n += 1

    def close(self):
        if self.tar is not None:
            self.tar.close()
            # a shard appears only when complete
            self.paths[-1].with_suffix(".tar.tmp").rename(self.paths[-1])
            self.index.append({"file": self.paths[-1].name, "count": self.n_in_shard})
            self.tar = None


def _encode_latents(encode_fn, pending):
    """encode_fn on the images of the pending samples, one batch: a list of latents (C, h, w)."""
    shapes = {tuple(s["image"].shape) for s in pending}
    if len(shapes) > 1:
        keys = [s["key"] for s in pending[:4]]
        raise ValueError(
            "write_shards: encode_fn needs equal image sizes in a batch, got "
            f"{sorted(shapes)} (keys {keys}); give the reader a fixed-size transform"
        )
    with torch.no_grad():
        z = encode_fn(torch.stack([s["image"] for s in pending]))  # (B, C, h, w)
    if z.ndim != 4 or z.shape[0] != len(pending):
        raise ValueError(
            f"write_shards: encode_fn returned shape {tuple(z.shape)} for {len(pending)} "
            "images; expected (B, C, h, w)"
        )
    return list(z)


def _samples(dataset, progress):
    """The dataset's items in order, with a progress bar if asked."""
    if isinstance(dataset, torch.utils.data.IterableDataset):
        iterator = iter(dataset)
    else:
        iterator = (dataset[i] for i in range(len(dataset)))
    if progress:
        from tqdm.auto import tqdm

        if hasattr(dataset, "__len__"):
            total = len(dataset)
        else:
            total = getattr(dataset, "num_samples", lambda: None)()
        iterator = tqdm(iterator, total=total, desc="write shards")
    return iterator


def write_shards(
    dataset,
    out_dir,
    samples_per_shard=1000,
    encode_fn=None,
    batch_size=16,
    write_images=True,
    image_format="jpg",
    jpeg_quality=95,
    latent_dtype=torch.float16,
    overwrite=False,
    prefix="shard",
    progress=False,
):
    """Write any reader's samples (None and FILTERED ones skipped) to
    `{out_dir}/{prefix}-000000.tar`, ... plus index.json. Each sample's json holds caption,
    level, quality, key and every other numeric field it has (ShardDataset reads them back).
    encode_fn(images (B, 3, H, W) in [-1, 1]) -> latents (B, C, h, w) pre-encodes latents
    (stored as `latent_dtype` .npy), batch_size images at a time, which needs equal image sizes
    (use a fixed-size transform on the reader, e.g. eval_transform(256)).
    Existing shards are never overwritten unless overwrite=True. Returns the shard paths.
    Images are re-encoded from the transformed tensors (jpg at jpeg_quality, or lossless png).
    progress=True shows a progress bar over the samples read."""
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if not write_images and encode_fn is None:
        raise ValueError(
            "write_images=False needs an encode_fn (a sample needs an image or a latent)"
        )
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir, prefix, overwrite)
    writer = _ShardWriter(
        out_dir, prefix, samples_per_shard, write_images, image_format, jpeg_quality, latent_dtype
    )

    def flush(pending):
        latents = [None] * len(pending)
        if encode_fn is not None and pending:
            latents = _encode_latents(encode_fn, pending)
        for s, z in zip(pending, latents):
            writer.put(s, z)
        pending.clear()

    skipped, pending = 0, []
    for s in _samples(dataset, progress):
        if not isinstance(s, dict):  # unreadable (None) or filtered
            skipped += 1
            continue
        if "image" not in s:
            raise ValueError(f"write_shards: sample {s['key']} has no image")
        pending.append(s)
        if len(pending) == batch_size:
            flush(pending)
    flush(pending)
    writer.close()
    (out_dir / "index.json").write_text(
        json.dumps(
            {"shards": writer.index, "total": writer.n, "latents": encode_fn is not None},
            indent=1,
        )
    )
    logger.info(
        "wrote %d samples in %d shards to %s (%d skipped)",
        writer.n,
        len(writer.paths),
        out_dir,
        skipped,
    )
    return writer.paths


def write_once(out_dir, spec, write):
    """Call write() (which fills out_dir with shards) unless out_dir already holds finished
    shards made from `spec` (a JSON-able dict saved beside them as made_from.json once write()
    returns). An interrupted rewrite never passes as finished: the old made_from.json goes
    first. Returns whether it wrote."""
    made = Path(out_dir) / "made_from.json"
    if made.exists() and json.loads(made.read_text()) == spec:
        return False
    made.unlink(missing_ok=True)
    write()
    made.write_text(json.dumps(spec))
    return True
