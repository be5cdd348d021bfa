"""Write WebDataset shards (verify and index: check.py; preview: preview.py).

Layout of an output folder: `{split}-{i:06d}.tar` (samples `png`, `cls`, `json`), beside each
its index `{split}-{i:06d}.idx` (DALI's wds2idx v1.2 text format: every member's byte offset and
size, so a reader can fetch one sample without parsing the tar), and `manifest.json`. Every file is written under a temporary name and renamed, so a kill leaves
either the previous file or the new one. `.progress.json` records finished shards, so a re-run
keeps every complete shard whose sha256 still matches and writes only the rest."""
import errno
import hashlib
import io
import json
import logging
import math
import multiprocessing as mp
import os
import shutil
import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from gen.errors import one_line
from gen.durable import atomic_write_json, sha256_file
from gen.shard_format import FORMAT, MANIFEST, write_index

from . import PrepError
from .images import normalise, png_bytes

log = logging.getLogger("data_prep")
PROGRESS = ".progress.json"


# ----------------------------------------------------------------------------- encoding (worker processes)

_zips = {}  # per worker process: open zip files, so each member read does not reopen the archive


def _load(ref):
    kind = ref[0]
    if kind == "array":
        return Image.fromarray(np.asarray(ref[1], dtype=np.uint8))
    if kind == "file":
        return Image.open(ref[1])
    z = _zips.get(ref[1]) or _zips.setdefault(ref[1], zipfile.ZipFile(ref[1]))
    return Image.open(io.BytesIO(z.read(ref[2])))


def encode_item(item, size, crop, grayscale):
    """(png bytes, None) or (None, reason). Never raises for bad images."""
    try:
        img = _load(item.ref)
        img.load()
        if item.ref[0] == "array" and size is None:
            return png_bytes(img), None  # IDX digits: already 8-bit grayscale and square
        return png_bytes(normalise(img, size, crop, grayscale)), None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, zipfile.BadZipFile, Image.DecompressionBombError) as e:
        return None, one_line(e).strip(": ")


# ----------------------------------------------------------------------------- writing

def write_shards(source, out, shard_size=1000, seed=0, workers=None, overwrite=False, crop="pad",
                 grayscale=False, prep_args=None):
    """Encode every item of `source` into shards under `out`; returns the manifest dict.
    Shards are encoded and written in parallel, one whole shard per worker process: plan which
    items go in which shard, keep the shards an earlier run finished, write the rest, then the
    manifest."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise PrepError(f"--out {out} exists and is not a directory")
    out.mkdir(parents=True, exist_ok=True)
    prep_args = dict(prep_args or {}, shard_size=shard_size, seed=seed, size=source.size, crop=crop, grayscale=grayscale)
    progress = Progress(out, source.dataset, prep_args, overwrite)
    plan = plan_shards(source.splits, shard_size, seed)
    todo, kept = [], 0
    for split in source.splits:
        for name in plan[split]:
            if progress.kept(name):
                kept += 1
            else:
                chunk, first = plan[name]
                todo.append((str(out / name), chunk, first, source.class_names, (source.size, crop, grayscale)))
    _encode(todo, workers, progress, source.dataset)
    manifest = _manifest(source, plan, progress.shards, channels=1 if (grayscale or source.channels == 1) else 3,
                         prep_args=prep_args)
    atomic_write_json(out / MANIFEST, manifest)
    if kept:
        log.info("kept %d complete shard(s) from an earlier run", kept)
    return manifest


def plan_shards(splits, shard_size, seed):
    """{split: [shard names]} and {shard name: (its items, the first item's index)}: a seeded
    shuffle per split mixes classes in every shard; shard s holds items [s*S, (s+1)*S)."""
    plan = {}
    for split, items in splits.items():
        order = np.random.default_rng(seed).permutation(len(items))
        items = [items[i] for i in order]
        names = [f"{split}-{s:06d}.tar" for s in range(max(1, math.ceil(len(items) / shard_size)))]
        plan[split] = names
        for s, name in enumerate(names):
            plan[name] = (items[s * shard_size:(s + 1) * shard_size], s * shard_size)
    return plan


class Progress:
    """`.progress.json`: the shards an earlier run of the same command finished. A re-run keeps
    each one whose tar and index still match their sha256; other arguments are refused."""

    def __init__(self, out, dataset, prep_args, overwrite):
        self.out, self.path, self.dataset, self.prep_args, self.shards = out, out / PROGRESS, dataset, prep_args, {}
        if overwrite:
            for old in list(out.glob("*.tar")) + [out / MANIFEST, self.path]:
                old.unlink(missing_ok=True)
        elif self.path.is_file():
            try:
                saved = json.loads(self.path.read_text())
            except ValueError:
                saved = {}
            if saved.get("prep_args") == prep_args and saved.get("dataset") == dataset:
                self.shards = saved.get("shards", {})
            elif saved.get("prep_args") is not None:
                raise PrepError(f"{out} holds shards made with other arguments; use --overwrite to replace them or "
                                "another --out")

    def kept(self, name):
        record = self.shards.get(name)
        return bool(record) and (self.out / name).is_file() and sha256_file(self.out / name) == record["sha256"] \
            and _index_ok(self.out, record)

    def add(self, record):
        self.shards[record["name"]] = record
        self.save()

    def save(self):
        atomic_write_json(self.path, {"dataset": self.dataset, "prep_args": self.prep_args, "shards": self.shards},
                          indent=None)


def _encode(todo, workers, progress, dataset):
    """Write the shards of `todo` in a pool of worker processes, recording each one finished. A full
    disk: the partial files swept, the finished shards recorded, one PrepError line."""
    out = progress.out
    total = sum(len(job[1]) for job in todo)
    workers = min(workers or os.cpu_count() or 1, max(1, len(todo)))
    with tqdm(total=total, desc=f"{dataset} shards", unit="img", dynamic_ncols=True) as bar:
        pool = mp.get_context("fork").Pool(workers) if workers > 1 else None
        disk_full = False
        try:
            for record in pool.imap_unordered(write_one_shard, todo) if pool else map(write_one_shard, todo):
                progress.add(record)
                bar.update(record["count"] + len(record["skipped"]))
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            disk_full = True
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()  # workers gone before their partial files are swept below
            for partial in out.glob(".*.partial"):
                partial.unlink(missing_ok=True)
        if disk_full:
            # the other workers' partial shards may have taken the space the record needed: with
            # them swept, record the finished shards again so a re-run keeps them
            if progress.shards:
                try:
                    progress.save()
                except OSError:
                    pass
            raise PrepError(_disk_full(out, progress.shards, total, bar.n))


def _manifest(source, plan, records_by_name, channels, prep_args):
    """The manifest: counts per split and class, each shard's count, sha256 and index, skipped inputs."""
    splits_meta, image_size, skipped = {}, source.size, [{"name": n, "reason": why} for n, why in source.skipped]
    for split in source.splits:
        records = [records_by_name[name] for name in plan[split]]
        per_class = {}
        for r in records:
            image_size = image_size or r.get("image_size")
            skipped += [{"name": n, "reason": why, "split": split} for n, why in r["skipped"]]
            for k, v in r["per_class"].items():
                per_class[k] = per_class.get(k, 0) + v
        splits_meta[split] = {
            "count": sum(r["count"] for r in records),
            "per_class": dict(sorted(per_class.items())),
            "shards": [{"name": r["name"], "count": r["count"], "sha256": r["sha256"], "index": r["index"]}
                       for r in records],
        }
    if not any(m["count"] for m in splits_meta.values()):
        first = f" (first: {skipped[0]['name']}: {skipped[0]['reason']})" if skipped else ""
        raise PrepError(f"no readable images in {source.dataset}: {len(skipped)} inputs skipped{first}")
    return {"format": FORMAT, "dataset": source.dataset, "image_size": image_size, "channels": channels,
            "class_names": source.class_names, "splits": splits_meta, "skipped": skipped, "prep_args": prep_args}


def _index_ok(out, record):
    index = record.get("index")
    return bool(index) and (out / index["name"]).is_file() and sha256_file(out / index["name"]) == index["sha256"]


def _disk_full(out, progress, total, done):
    """One line for a full disk: where, how much is free and about how much is still needed."""
    written = [(out / r["name"]).stat().st_size for r in progress.values() if (out / r["name"]).is_file()]
    counted = sum(r["count"] for r in progress.values())
    per_sample = sum(written) / counted if counted else None
    free = shutil.disk_usage(out).free / 2**20
    need = f"about {per_sample * max(total - done, 1) / 2**20:.1f} MiB more" if per_sample else "more space"
    return (f"disk full writing shards to {out} ({free:.1f} MiB free, {need}); no partial file is left and "
            "complete shards are kept: free space and run the same command again to write the rest")


def write_one_shard(job):
    """Encode one shard's items and write the tar under a temp name, then rename. Returns its record."""
    path, chunk, first_index, class_names, (size, crop, grayscale) = job
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    record = {"name": path.name, "count": 0, "per_class": {}, "skipped": [], "image_size": None}
    try:
        sink = _write_tar(tmp, chunk, first_index, class_names, size, crop, grayscale, record)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill of the pool: no partial file left behind
        raise
    os.replace(tmp, path)
    record["sha256"] = sink.sha256.hexdigest()
    record["index"] = write_index(path, sink.members)  # offsets known from writing: no re-read
    record["index"].pop("count")
    return record


def _write_tar(tmp, chunk, first_index, class_names, size, crop, grayscale, record):
    with open(tmp, "wb") as raw:
        sink = UstarWriter(raw)  # fixed mtime and owner: a re-run gives byte-identical shards
        for offset, item in enumerate(chunk):
            png, error = encode_item(item, size, crop, grayscale)
            if error:
                record["skipped"].append((item.name, error))
                continue
            if record["image_size"] is None:
                record["image_size"] = Image.open(io.BytesIO(png)).size[0]
            class_name = class_names[item.label] if item.label is not None and class_names else None
            sample = {"__key__": f"{first_index + offset:08d}", "png": png,
                      "json": json.dumps({"name": item.name, "class": class_name}).encode()}
            if item.label is not None:
                sample["cls"] = str(item.label).encode()
                record["per_class"][class_name] = record["per_class"].get(class_name, 0) + 1
            sink.write(sample)
            record["count"] += 1
        sink.close()
        raw.flush()
        os.fsync(raw.fileno())
    return sink


class UstarWriter:
    """Writes WebDataset samples ({"__key__", ext: bytes}) as a plain ustar archive and hashes it.

    tarfile's header code (which webdataset's TarWriter calls) took 60 % of prep time for small
    images; these headers are the same POSIX ustar bytes, built with one struct.pack. The output is
    read by tarfile and by the real webdataset reader (tests check both)."""

    _HEADER = struct.Struct("100s8s8s8s12s12s8s1s100s6s2s32s32s8s8s155s12s")

    def __init__(self, f):
        self.f, self.sha256, self.size = f, hashlib.sha256(), 0
        self.members = []  # (name, data offset, size): the shard's index

    def _out(self, b):
        self.sha256.update(b)
        self.f.write(b)
        self.size += len(b)

    def _member(self, name, data):
        name = name.encode()
        if len(name) > 100:
            raise ValueError(f"tar member name too long: {name!r}")
        fields = [name, b"0000444\0", b"0000000\0", b"0000000\0", b"%011o\0" % len(data), b"00000000000\0",
                  b" " * 8, b"0", b"", b"ustar\0", b"00", b"deepgen", b"deepgen", b"", b"", b"", b""]
        header = bytearray(self._HEADER.pack(*fields))
        header[148:156] = b"%06o\0 " % sum(header)  # checksum computed with its own field as spaces
        self._out(bytes(header))
        self.members.append((name.decode(), self.size, len(data)))
        self._out(data)
        if len(data) % 512:
            self._out(b"\0" * (512 - len(data) % 512))

    def write(self, sample):
        key = sample["__key__"]
        for ext, data in sample.items():
            if ext != "__key__":
                self._member(f"{key}.{ext}", data)

    def close(self):
        self._out(b"\0" * 1024)  # end-of-archive marker, then pad to tarfile's 10 KiB record size
        if self.size % 10240:
            self._out(b"\0" * (10240 - self.size % 10240))
