"""Reading one split of a shard folder, for the loader (gen.data.ShardStream): a tar streamed
through webdataset's reader, or an indexed shard read sample by sample (`os.preadv` of each
sample's byte span, file descriptors kept in an LRU); PNG decode; the decoded-image cache that
replays small data sets from memory. Samples are named by global sample ids: shard url holds
[base, base + count). A corrupt sample is a DecodeError (skipped and counted by the stream); a
truncated or unreadable shard is counted as lost samples, with a rate-limited warning."""
import logging
import os
import tarfile
from collections import OrderedDict
from pathlib import Path

import torch
import webdataset as wds
from torchvision.io import ImageReadMode, decode_png

from .shard_format import DecodeError, SplitIndex, read_manifest, split_shards

log = logging.getLogger("gen.data")
OPEN_SHARDS = 64  # file descriptors kept open per worker for indexed reads


def decode_png_tensor(data, channels):
    """uint8 (C, H, W) from a 1-D uint8 tensor of PNG bytes. torchvision's op called directly: its
    Python wrapper (API-usage log, a deprecation warning per call) adds ~7 us to a ~95 us decode
    of a 64 px image. Falls back to the wrapper where the op is not registered."""
    mode = ImageReadMode.GRAY if channels == 1 else ImageReadMode.RGB
    op = getattr(torch.ops.image, "decode_png", None) if hasattr(torch.ops, "image") else None
    return op(data, mode.value, False) if op is not None else decode_png(data, mode=mode)


def rate_limited_warning(stats, message):
    stats["warned"] += 1
    n = stats["warned"]
    if n <= 5 or n % 100 == 0:
        log.warning("%s (%d skipped so far in this worker)", message, stats["skipped"])


class ShardReader:
    def __init__(self, root, split="train", rank=0, cache_mb=1024, use_index=True):
        manifest = read_manifest(root)
        shards = split_shards(root, split, manifest)
        self.urls = [url for url, _ in shards]
        self.expected = dict(shards)  # url -> sample count, to detect truncated shards
        self.base, total = {}, 0      # global sample ids: shard url holds [base, base + count)
        for url, n in shards:
            self.base[url], total = total, total + n
        self.names = [Path(u).name for u in self.urls]
        self.size, self.channels = manifest["image_size"], manifest["channels"]
        self.class_names = manifest.get("class_names")
        self.num_samples = total
        records = {s["name"]: s.get("index") for s in manifest["splits"][split]["shards"]}
        self.index = SplitIndex(root, [(u, n, records[Path(u).name] if use_index else None) for u, n in shards],
                                self.base, rank)
        # shards replayed as sample ids: indexed ones, and streamed ones once fully read into the cache
        self.known = {url: (self.expected[url], 0) for url in self.index.indexed}  # url -> (samples, lost)
        self._fds = OrderedDict()
        # Decoded-image cache, per worker: PNG decode costs ~100-200 us per 64 px sample, so small
        # data sets (MNIST, Pokémon) are decoded once and replayed from memory. Every worker may meet
        # every shard (shard order changes per epoch), so the whole split must fit the budget; the
        # replayed stream is sample for sample the one read from disk.
        decoded_mb = self.num_samples * self.channels * self.size * self.size / 2**20
        self.cache = {} if 0 < decoded_mb <= cache_mb else None

    def read_shard(self, url, stats):
        """The samples of one tar, in order: sample ids (indexed or already cached shards: nothing
        is read here), else raw dicts from webdataset's tar reader (ids when caching). A read
        error skips the rest of the shard; a tar that ends early (webdataset stops quietly at a
        truncation) is caught by comparing with the manifest's count."""
        base = self.base[url]
        if url in self.known:
            n, lost = self.known[url]
            yield from range(base, base + n)
            self._count_lost(url, lost, stats)
            return

        def on_tar_error(exn):
            rate_limited_warning(stats, f"{Path(url).name}: read error, rest of shard skipped: {type(exn).__name__}: {exn}")
            return False  # stop this shard; the count check below records what was lost

        n = 0
        try:
            for sample in wds.tarfile_to_samples(handler=on_tar_error)(iter([{"url": url}])):
                if self.cache is not None:
                    self.cache[base + n] = self.decode(sample)
                    sample = base + n
                n += 1
                yield sample
        except (OSError, ValueError, tarfile.TarError) as e:
            rate_limited_warning(stats, f"{Path(url).name}: unreadable ({type(e).__name__}: {e})")
        lost = self.expected[url] - n
        if self.cache is not None:
            self.known[url] = (n, lost)
        self._count_lost(url, lost, stats)

    def _count_lost(self, url, lost, stats):
        if lost > 0:
            stats["skipped"] += lost
            rate_limited_warning(stats, f"{Path(url).name}: truncated or damaged, {lost} samples missing")

    def decode(self, sample):
        """(image, label, key), or a DecodeError for a corrupt sample. `sample` is a sample id
        (from the cache, else read through the index) or a raw dict from the tar reader."""
        if isinstance(sample, int):
            hit = self.cache.get(sample) if self.cache is not None else None
            if hit is None:
                hit = self._read_indexed(sample)
                if self.cache is not None:
                    self.cache[sample] = hit
            return hit
        try:
            label = int(sample["cls"]) if "cls" in sample else -1
            return self._decode_png(sample.get("png"), label, f"{Path(sample['__url__']).name}/{sample['__key__']}")
        except (RuntimeError, ValueError, KeyError) as e:
            return DecodeError(f"corrupt sample {sample.get('__url__')}/{sample.get('__key__')} skipped: {e}")

    def _read_indexed(self, sample_id):
        """One sample by its index entry: one positional read of its byte span, then decode."""
        start, length, png_at, png_size, cls_at, cls_size, shard = self.index.spans[sample_id].tolist()
        key = f"{self.names[shard]}/{self.index.keys[sample_id].decode()}"
        try:
            buf = bytearray(length)
            if os.preadv(self._fd(self.urls[shard]), [buf], start) != length:
                raise ValueError("shard ends before the sample (truncated?)")
            label = int(buf[cls_at:cls_at + cls_size]) if cls_at >= 0 else -1
            return self._decode_png(torch.frombuffer(memoryview(buf)[png_at:png_at + png_size], dtype=torch.uint8), label, key)
        except (OSError, RuntimeError, ValueError) as e:
            return DecodeError(f"corrupt sample {key} skipped: {e}")

    def _fd(self, url):
        fd = self._fds.pop(url, None)
        if fd is None:
            fd = os.open(url, os.O_RDONLY)
            if len(self._fds) >= OPEN_SHARDS:
                os.close(self._fds.popitem(last=False)[1])
        self._fds[url] = fd  # most recently used last
        return fd

    def _decode_png(self, png, label, key):
        if png is None:
            raise ValueError("sample has no png")
        if not isinstance(png, torch.Tensor):
            png = torch.frombuffer(bytearray(png), dtype=torch.uint8)
        img = decode_png_tensor(png, self.channels)
        if img.shape != (self.channels, self.size, self.size):
            raise ValueError(f"image of shape {tuple(img.shape)}, expected {(self.channels, self.size, self.size)}")
        return img, label, key

    def decode_split(self):
        """Every sample of the split, read once: (sample id, (image, label, key) or DecodeError).
        For a reader that keeps the decoded split itself (DeviceData): streamed shards become
        replayable as ids on the way, and no decoded-image cache is kept here afterwards."""
        self.cache, stats = {}, {"skipped": 0, "warned": 0}
        for url in self.urls:
            for sample_id in self.read_shard(url, stats):
                yield sample_id, self.decode(sample_id)
        self.cache = None
