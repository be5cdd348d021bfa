"""WebDataset loader for deepgen shards (as written by `python -m data_prep`).

    loader = make_loader("data/mnist", batch_size=64, seed=0, rank=0, world_size=1, workers=2)
    for batch in loader:  # {"image": float (B,C,H,W) in [-1, 1], "label": long (B,), "position": ...}

Every DataLoader worker runs one deterministic stream per epoch: the epoch's shard order
(seeded with seed+epoch), its share of the data (split by rank and worker), a seeded shuffle
buffer, then PNG decode. The stream is a pure function of (seed, epoch, slot) (`stream_seed`), so a run resumes
exactly from the positions stored in a checkpoint: each worker replays its epoch up to the
stored offset without decoding, and the round-robin order of workers is rotated to match.

Epoch mode (default): each sample exactly once per epoch across all ranks and workers, by shard
when there are at least as many shards as slots, else by sample index. Resampled mode: each
slot draws shards with replacement (open_clip's ResampledShards), for multi-node runs on few
large shards. Streams are infinite unless `epochs` is given; training counts steps, not epochs.
"""
import logging
import os
import random
import signal
import tarfile
import threading
from pathlib import Path

import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision.io import ImageReadMode, decode_png

from .shard_format import DataError, read_manifest, split_shards  # noqa: F401 (DataError re-exported)

log = logging.getLogger("gen.data")


def stream_seed(seed, epoch, slot):
    """The integer that seeds one slot's stream in one epoch (shard draws, shuffle buffer).
    Plain arithmetic, so it is the same in every process and Python version."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + slot


class DecodeError(ValueError):
    """A sample that failed to decode, remembered in the cache so every epoch skips it again."""


class ShardStream(IterableDataset):
    """Decoded, batched samples of one rank. `positions[w]` = {"epoch", "offset", "skipped"} is
    where logical worker w resumes; `rotation` maps DataLoader worker p to logical (p + rotation) % W."""

    def __init__(self, root, split="train", batch_size=64, seed=0, rank=0, world_size=1, num_workers=0,
                 shuffle_buffer=1000, resampled=False, epochs=None, positions=None, rotation=0, cache_mb=1024):
        manifest = read_manifest(root)
        shards = split_shards(root, split, manifest)
        self.urls = [url for url, _ in shards]
        self.expected = dict(shards)  # url -> sample count, to detect truncated shards
        self.size, self.channels = manifest["image_size"], manifest["channels"]
        self.class_names = manifest.get("class_names")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.shuffle_buffer, self.resampled, self.epochs = shuffle_buffer, resampled, epochs
        self.positions = positions or {}
        self.rotation = rotation
        self.num_samples = sum(self.expected.values())
        # Decoded-image cache, per worker: tar parsing and PNG decode cost ~180 + ~220 us per 64 px
        # sample, so small data sets (MNIST, Pokémon) are decoded once and replayed from memory.
        # Every worker may meet every shard (shard order changes per epoch), so the whole split
        # must fit the budget; the replayed stream is sample for sample the one read from disk.
        decoded_mb = self.num_samples * self.channels * self.size * self.size / 2**20
        self.cache = {} if 0 < decoded_mb <= cache_mb else None

    # --- one worker's stream -------------------------------------------------------------
    def _slot(self):
        info = get_worker_info()
        physical = info.id if info else 0
        logical = (physical + self.rotation) % self.num_workers
        return logical, self.rank * self.num_workers + logical, self.world_size * self.num_workers

    def _epoch_sources(self, epoch, slot, slots):
        """(shard urls, sample stride) this slot reads in `epoch`."""
        if self.resampled:
            rng = random.Random(stream_seed(self.seed, epoch, slot))
            return [rng.choice(self.urls) for _ in range(max(1, len(self.urls) // slots))], None
        order = list(self.urls)
        random.Random(self.seed + epoch).shuffle(order)  # same order on every rank and worker
        if len(order) >= slots:
            return order[slot::slots], None
        return order, (slot, slots)  # fewer shards than slots: split by sample index

    def _raw_epoch(self, epoch, slot, slots, stats):
        urls, stride = self._epoch_sources(epoch, slot, slots)
        samples = (s for url in urls for s in self._read_shard(url, stats))
        if stride:
            samples = (s for i, s in enumerate(samples) if i % stride[1] == stride[0])
        rng = random.Random(stream_seed(self.seed, epoch, slot))
        return _shuffle(samples, self.shuffle_buffer, rng) if self.shuffle_buffer > 1 else samples

    def _read_shard(self, url, stats):
        """Samples of one tar: raw dicts, or (image, label, key) / DecodeError when cached. A read
        error skips the rest of the shard; a tar that ends early (webdataset stops quietly at a
        truncation) is caught by comparing with the manifest's count."""
        if self.cache is not None and url in self.cache:
            samples, lost = self.cache[url]
            yield from samples
            self._count_lost(url, lost, stats)
            return

        def on_tar_error(exn):
            _rate_limited_warning(stats, f"{Path(url).name}: read error, rest of shard skipped: {type(exn).__name__}: {exn}")
            return False  # stop this shard; the count check below records what was lost

        n, kept = 0, []
        try:
            for sample in wds.tarfile_to_samples(handler=on_tar_error)(iter([{"url": url}])):
                n += 1
                if self.cache is not None:
                    sample = self._decode_or_error(sample)
                    kept.append(sample)
                yield sample
        except (OSError, ValueError, tarfile.TarError) as e:
            _rate_limited_warning(stats, f"{Path(url).name}: unreadable ({type(e).__name__}: {e})")
        lost = self.expected[url] - n
        if self.cache is not None:
            self.cache[url] = (kept, lost)
        self._count_lost(url, lost, stats)

    def _count_lost(self, url, lost, stats):
        if lost > 0:
            stats["skipped"] += lost
            _rate_limited_warning(stats, f"{Path(url).name}: truncated or damaged, {lost} samples missing")

    def _decode_or_error(self, sample):
        """(image, label, key), or a DecodeError for a corrupt sample; cached items pass through."""
        if isinstance(sample, (tuple, DecodeError)):
            return sample
        try:
            return self._decode(sample)
        except (RuntimeError, ValueError, KeyError) as e:
            return DecodeError(f"corrupt sample {sample.get('__url__')}/{sample.get('__key__')} skipped: {e}")

    def _decode(self, sample):
        data = sample.get("png")
        if data is None:
            raise ValueError("sample has no png")
        mode = ImageReadMode.GRAY if self.channels == 1 else ImageReadMode.RGB
        img = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
        if img.shape != (self.channels, self.size, self.size):
            raise ValueError(f"image of shape {tuple(img.shape)}, expected {(self.channels, self.size, self.size)}")
        label = int(sample["cls"]) if "cls" in sample else -1
        return img, label, f"{Path(sample['__url__']).name}/{sample['__key__']}"

    def __iter__(self):
        logical, slot, slots = self._slot()
        pos = self.positions.get(logical, {"epoch": 0, "offset": 0, "skipped": 0})
        stats = {"skipped": pos.get("skipped", 0), "warned": 0}
        epoch, start = pos["epoch"], pos["offset"]
        images, labels, keys = [], [], []
        while self.epochs is None or epoch < self.epochs:
            offset = -1
            for offset, sample in enumerate(self._raw_epoch(epoch, slot, slots, stats)):
                if offset < start:
                    continue  # replaying up to the resume point: no decode
                decoded = self._decode_or_error(sample)
                if isinstance(decoded, DecodeError):
                    stats["skipped"] += 1
                    _rate_limited_warning(stats, str(decoded))
                    continue
                img, label, key = decoded
                images.append(img)
                labels.append(label)
                keys.append(key)
                if len(images) == self.batch_size:
                    yield self._batch(images, labels, keys, logical, epoch, offset + 1, stats)
                    images, labels, keys = [], [], []
            if offset < 0 and not self.resampled and start == 0:
                log.warning("worker %d of rank %d has no data in epoch %d (more workers than samples?)", logical, self.rank, epoch)
                if self.epochs is None:
                    return
            epoch, start = epoch + 1, 0
        if images:  # finite runs (evaluation, tests) keep the last partial batch
            yield self._batch(images, labels, keys, logical, epoch - 1, offset + 1, stats)

    def _batch(self, images, labels, keys, logical, epoch, offset, stats):
        # uint8 across the process boundary (4x less than float32); to_float() runs in the consumer
        return {"image": torch.stack(images), "label": torch.tensor(labels, dtype=torch.long), "key": keys,
                "position": {"worker": logical, "epoch": epoch, "offset": offset, "skipped": stats["skipped"]}}


def _shuffle(samples, bufsize, rng):
    """Seeded shuffle buffer (webdataset's, but with an rng we own so the order is reproducible)."""
    buf = []
    for sample in samples:
        if len(buf) < bufsize:
            buf.append(sample)
            continue
        i = rng.randrange(len(buf))
        buf[i], sample = sample, buf[i]
        yield sample
    rng.shuffle(buf)
    yield from buf


def _rate_limited_warning(stats, message):
    stats["warned"] += 1
    n = stats["warned"]
    if n <= 5 or n % 100 == 0:
        log.warning("%s (%d skipped so far in this worker)", message, stats["skipped"])


class PositionTracker:
    """Main-process record of where each logical worker's stream stands, from consumed batches.
    Its state goes into checkpoints; `resume_args()` rebuilds the same stream."""

    def __init__(self, num_workers, state=None):
        self.num_workers = max(1, num_workers)
        self.positions = {}
        self.batches = 0
        if state:
            self.positions = {int(k): v for k, v in state["positions"].items()}
            self.batches = state["batches"]

    def update(self, position):
        self.positions[position["worker"]] = {k: position[k] for k in ("epoch", "offset", "skipped")}
        self.batches += 1

    @property
    def skipped(self):
        return sum(p["skipped"] for p in self.positions.values())

    @property
    def epoch(self):
        """Epoch of the next batch: the one its worker is reading."""
        nxt = self.positions.get(self.batches % self.num_workers)
        return nxt["epoch"] if nxt else 0

    def state_dict(self):
        return {"positions": dict(self.positions), "batches": self.batches, "num_workers": self.num_workers}

    def resume_args(self):
        # the next batch must come from logical worker (batches % W); DataLoader starts at worker 0
        return {"positions": dict(self.positions), "rotation": self.batches % self.num_workers}


def _worker_signals(_worker_id):
    """SLURM signals every process of a job step. A worker must not die on SLURM's SIGTERM (the
    main process may still need a batch before its checkpoint) nor run a handler inherited at
    fork (submitit's USR2 requeue). But it must still end when its own parent terminates it
    (DataLoader and multiprocessing shutdown do): SIGTERM is taken by a thread that reads who sent
    it, and only the parent's ends the worker."""
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    parent = os.getppid()
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})  # threads started below inherit the mask

    def wait_for_parent_sigterm():
        while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
            pass
        os._exit(0)

    threading.Thread(target=wait_for_parent_sigterm, daemon=True, name="sigterm-from-parent").start()


class FloatBatches:
    """Iterates a DataLoader of uint8 batches, giving float images in [-1, 1] (one vectorised op
    per batch, in the consuming process)."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            batch["image"] = batch["image"].float().div_(127.5).sub_(1.0)
            yield batch


def make_loader(root, batch_size, seed=0, rank=0, world_size=1, workers=2, split="train", shuffle_buffer=1000,
                resampled=False, epochs=None, tracker_state=None, pin_memory=False, cache_mb=1024):
    """(iterable of batches, ShardStream, PositionTracker). Batches are built inside the workers."""
    tracker = PositionTracker(workers, tracker_state)
    if tracker_state and tracker_state.get("num_workers", workers) != max(1, workers):
        raise DataError(f"checkpoint was written with data.workers={tracker_state['num_workers']}; "
                        f"resume with the same number of workers to continue the data stream exactly")
    stream = ShardStream(root, split, batch_size, seed, rank, world_size, workers, shuffle_buffer, resampled,
                         epochs, **tracker.resume_args(), cache_mb=cache_mb)
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=workers > 0, worker_init_fn=_worker_signals,
                        # its own generator: creating the iterator must not draw from the global RNG
                        generator=torch.Generator().manual_seed(seed))
    return FloatBatches(loader), stream, tracker
