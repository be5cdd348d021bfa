"""Loader for deepgen shards (as written by `python -m data_prep`).

    loader, stream, tracker = make_loader("data/mnist", batch_size=64, seed=0, rank=0, world_size=1, workers=2)
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

Reading and decoding live in gen/shard_reader.py; this module plans the streams and batches.
Indexed shards (the `.idx` beside each tar, recorded in the manifest) are read by sample: the
stream is made of sample ids, shuffled and split before any byte is read, and each id becomes
one `os.pread` of that sample's bytes at its indexed offset. A slot reads exactly its own
samples (no tar parsing, no read amplification when shards < slots), replaying a resume point
costs nothing, and the stream is the same one the tar reader gives. Shards without a valid
index are streamed through webdataset's tar reader, as before. Positional reads rather than
mmap: the kernel counts them (each batch reports its worker's bytes read, from
/proc/self/io), and file pages of a data set larger than memory do not pile up in the
workers' RSS.

Small data sets can live on the accelerator (`DeviceData`): the decoded split as uint8, each
batch gathered there by sample id, in the same order and positions as the worker processes
would deliver them, so checkpoints resume the same on either path.
"""
import logging
import os
import random
import signal
import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .augment import random_mirror
from .device_data import DeviceData
from .shard_reader import ShardReader, rate_limited_warning
from .shard_format import DataError, DecodeError

log = logging.getLogger("gen.data")


def stream_seed(seed, epoch, slot):
    """The integer that seeds one slot's stream in one epoch (shard draws, shuffle buffer).
    Plain arithmetic, so it is the same in every process and Python version."""
    return (seed * 1_000_003 + epoch) * 1_000_003 + slot


def read_bytes_so_far():
    """Bytes this process has read through read()/pread() so far, as the kernel counts them."""
    try:
        with open("/proc/self/io", "rb") as f:
            return int(f.read().split(b"rchar:", 1)[1].split(b"\n", 1)[0])
    except (OSError, IndexError, ValueError):
        return 0


class ShardStream(IterableDataset):
    """Decoded, batched samples of one rank: each logical worker's epochs planned (shard order,
    its share, the shuffle buffer) over a ShardReader, which reads and decodes. `positions[w]` =
    {"epoch", "offset", "skipped"} is where logical worker w resumes; `rotation` maps DataLoader
    worker p to logical (p + rotation) % W."""

    def __init__(self, root, split="train", batch_size=64, seed=0, rank=0, world_size=1, num_workers=0,
                 shuffle_buffer=1000, resampled=False, epochs=None, positions=None, rotation=0, cache_mb=1024,
                 use_index=True):
        self.reader = reader = ShardReader(root, split, rank=rank, cache_mb=cache_mb, use_index=use_index)
        self.urls, self.index, self.num_samples = reader.urls, reader.index, reader.num_samples
        self.size, self.channels, self.class_names = reader.size, reader.channels, reader.class_names
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers = max(1, num_workers)
        self.shuffle_buffer, self.resampled, self.epochs = shuffle_buffer, resampled, epochs
        self.positions = positions or {}
        self.rotation = rotation
        slots = world_size * self.num_workers
        if not resampled and len(self.urls) < slots and len(self.index.indexed) < len(self.urls) and rank == 0:
            log.warning("%d shards for %d loader slots (%d ranks x %d workers) and no index: every slot reads every "
                        "shard and keeps 1 sample in %d, so each epoch reads the data %d times. Run `python -m data_prep "
                        "index %s` (slots then read only their own samples), or write >= %d shards, or use "
                        "--data.resampled", len(self.urls), slots, world_size, self.num_workers, slots, slots, root, slots)

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
        samples = (s for url in urls for s in self.reader.read_shard(url, stats))
        if stride:
            samples = (s for i, s in enumerate(samples) if i % stride[1] == stride[0])
        rng = random.Random(stream_seed(self.seed, epoch, slot))
        return _shuffle(samples, self.shuffle_buffer, rng) if self.shuffle_buffer > 1 else samples

    def __iter__(self):
        info = get_worker_info()
        logical = ((info.id if info else 0) + self.rotation) % self.num_workers
        yield from self.batches(logical, self.reader.decode, _stack)

    def batches(self, logical, resolve, collate):
        """Logical worker `logical`'s batches: `resolve` turns a stream item into a decoded item
        or a DecodeError, `collate` a list of decoded items into {"image", "label", "key"}."""
        slot, slots = self.rank * self.num_workers + logical, self.world_size * self.num_workers
        pos = self.positions.get(logical, {"epoch": 0, "offset": 0, "skipped": 0})
        stats = {"skipped": pos.get("skipped", 0), "warned": 0, "read_from": read_bytes_so_far()}
        epoch, start = pos["epoch"], pos["offset"]
        items = []
        while self.epochs is None or epoch < self.epochs:
            offset = -1
            for offset, sample in enumerate(self._raw_epoch(epoch, slot, slots, stats)):
                if offset < start:
                    continue  # replaying up to the resume point: no decode (and no read, with an index)
                decoded = resolve(sample)
                if isinstance(decoded, DecodeError):
                    stats["skipped"] += 1
                    rate_limited_warning(stats, str(decoded))
                    continue
                items.append(decoded)
                if len(items) == self.batch_size:
                    yield self._batch(collate(items), logical, epoch, offset + 1, stats)
                    items = []
            if offset < 0 and not self.resampled and start == 0:
                log.warning("worker %d of rank %d has no data in epoch %d (more workers than samples?)", logical, self.rank, epoch)
                if self.epochs is None:
                    return
            epoch, start = epoch + 1, 0
        if items:  # finite runs (evaluation, tests) keep the last partial batch
            yield self._batch(collate(items), logical, epoch - 1, offset + 1, stats)

    def _batch(self, batch, logical, epoch, offset, stats):
        batch["position"] = {"worker": logical, "epoch": epoch, "offset": offset, "skipped": stats["skipped"],
                             "read_bytes": read_bytes_so_far() - stats["read_from"]}
        return batch


def _stack(items):
    # uint8 across the process boundary (4x less than float32); to_float() runs in the consumer.
    # numpy's stack: a third of torch.stack's per-image cost for 64 small images
    images, labels, keys = zip(*items)
    return {"image": torch.from_numpy(np.stack([image.numpy() for image in images])),
            "label": torch.tensor(labels, dtype=torch.long), "key": list(keys)}


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


class PositionTracker:
    """Main-process record of where each logical worker's stream stands, from consumed batches.
    Its state goes into checkpoints; `resume_args()` rebuilds the same stream."""

    def __init__(self, num_workers, state=None):
        self.num_workers = max(1, num_workers)
        self.positions, self.read_bytes = {}, {}
        self.batches = 0
        if state:
            self.positions = {int(k): v for k, v in state["positions"].items()}
            self.batches = state["batches"]

    def update(self, position):
        self.positions[position["worker"]] = {k: position[k] for k in ("epoch", "offset", "skipped")}
        self.read_bytes[position["worker"]] = position.get("read_bytes", 0)
        self.batches += 1

    @property
    def bytes_read(self):
        """Bytes the loader's workers have read since they started (this session, not resumed)."""
        return sum(self.read_bytes.values())

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


def to_float(images):
    """uint8 images -> float in [-1, 1]; training calls it after the copy to the accelerator."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images):
    """Images in [-1, 1] (clipped) -> uint8, to_float's inverse up to rounding."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


class FloatBatches:
    """Iterates a DataLoader of uint8 batches, giving float images in [-1, 1] (one vectorised op
    per batch, in the consuming process). `.loader` gives the uint8 batches."""

    def __init__(self, loader):
        self.loader = loader

    def __iter__(self):
        for batch in self.loader:
            batch["image"] = to_float(batch["image"])
            yield batch


def make_loader(root, batch_size, seed=0, rank=0, world_size=1, workers=2, split="train", shuffle_buffer=1000,
                resampled=False, epochs=None, tracker_state=None, pin_memory=False, cache_mb=1024, device=None,
                use_index=True):
    """(iterable of batches, ShardStream, PositionTracker). Batches are built inside the workers,
    or, with `device`, gathered from the decoded split held there (`DeviceData`)."""
    tracker = PositionTracker(workers, tracker_state)
    if tracker_state and tracker_state.get("num_workers", workers) != max(1, workers):
        raise DataError(f"checkpoint was written with data.workers={tracker_state['num_workers']}; "
                        f"resume with the same number of workers to continue the data stream exactly")
    stream = ShardStream(root, split, batch_size, seed=seed, rank=rank, world_size=world_size, num_workers=workers,
                         shuffle_buffer=shuffle_buffer, resampled=resampled, epochs=epochs, **tracker.resume_args(),
                         cache_mb=cache_mb, use_index=use_index)
    if device is not None:
        return FloatBatches(DeviceData(stream, device)), stream, tracker
    if workers > 0:
        # Batches cross from workers as shared-memory files named in the pickle, not as file
        # descriptors passed over a socket with an authenticated handshake per tensor (torch's
        # default): ~20 % more images/s on 2 cores. torch's shm manager removes the files even if
        # the job is killed.
        torch.multiprocessing.set_sharing_strategy("file_system")
    loader = DataLoader(stream, batch_size=None, num_workers=workers, pin_memory=pin_memory,
                        persistent_workers=workers > 0, worker_init_fn=_worker_signals,
                        # its own generator: creating the iterator must not draw from the global RNG
                        generator=torch.Generator().manual_seed(seed))
    return FloatBatches(loader), stream, tracker


def load_real(shards, split, limit=None, seed=0):
    """(uint8 images (N, C, H, W), labels (N,)) of one split, in a seeded shuffled order."""
    loader, _, _ = make_loader(shards, batch_size=500, seed=seed, workers=0, epochs=1, split=split,
                               shuffle_buffer=5000)
    images, labels, n = [], [], 0
    for batch in loader:
        images.append(to_uint8(batch["image"]))
        labels.append(batch["label"])
        n += len(batch["label"])
        if limit and n >= limit:
            break
    if not images:
        raise DataError(f"{shards}: split {split!r} has no readable images")
    x, y = torch.cat(images), torch.cat(labels)
    return (x[:limit], y[:limit]) if limit else (x, y)


# ----------------------------------------------------------------------------- a training run's loader

class TrainingBatches:
    """This rank's share of the shards for a training run, continuing exactly where a checkpoint
    left off (`saved`: its data positions, every rank's): micro-batches on the device as float in
    [-1, 1] (mirrored with --data.hflip) in the modules' memory format. `position` is what a
    checkpoint saves; uint8 crosses the bus, the conversion runs on the device."""

    def __init__(self, cfg, accelerator, manifest, saved, memory_format):
        d = cfg.data
        self.device, self.hflip, self.memory_format = accelerator.device, d.hflip, memory_format
        self.on_device = data_on_device(d.device_data, accelerator.device, manifest, d.split)
        self.loader, self.stream, self.position = make_loader(
            d.path, cfg.train.batch_size, seed=cfg.train.seed, rank=accelerator.process_index,
            world_size=accelerator.num_processes, workers=d.workers, split=d.split, shuffle_buffer=d.shuffle_buffer,
            resampled=d.resampled, cache_mb=d.cache_mb, tracker_state=data_position_for_rank(saved, accelerator),
            pin_memory=accelerator.device.type == "cuda", device=accelerator.device if self.on_device else None)
        self.uint8 = iter(self.loader.loader)
        self.workers = d.workers

    def describe(self, ranks):
        return (f"{len(self.stream.urls)} shards ({len(self.stream.index.indexed)} indexed), "
                f"{ranks * max(1, self.workers)} loader slots, "
                + ("decoded split on the device" if self.on_device else f"{self.workers} worker processes"))

    def next(self):
        batch = next(self.uint8)
        self.position.update(batch["position"])
        image = to_float(batch["image"].to(self.device, non_blocking=True))
        if self.hflip:
            image = random_mirror(image)
        return {"image": image.contiguous(memory_format=self.memory_format),
                "label": batch["label"].to(self.device, non_blocking=True)}


def data_position_for_rank(saved, accelerator):
    """This rank's saved stream position. A checkpoint from another world size cannot continue
    the same streams: restart the saved epoch on the new split, with a warning."""
    if not saved:
        return None
    if len(saved) == accelerator.num_processes:
        return saved[accelerator.process_index]
    epoch = min(p["epoch"] for p in saved[0]["positions"].values()) if saved[0]["positions"] else 0
    if accelerator.is_main_process:
        log.warning("checkpoint was written by %d processes, this run has %d: the data stream restarts at epoch %d",
                    len(saved), accelerator.num_processes, epoch)
    workers = saved[0]["num_workers"]
    return {"positions": {w: {"epoch": epoch, "offset": 0, "skipped": 0} for w in range(workers)},
            "batches": 0, "num_workers": workers}


def data_on_device(setting, device, manifest, split, share=0.05):
    """Whether the decoded split lives on the device (DataConfig.device_data)."""
    if setting != "auto":
        return setting == "on"
    if device.type != "cuda":
        return False  # on CPU, worker processes overlap decode with the step
    split_bytes = manifest["splits"][split]["count"] * manifest["channels"] * manifest["image_size"] ** 2
    return split_bytes <= share * torch.cuda.get_device_properties(device).total_memory
