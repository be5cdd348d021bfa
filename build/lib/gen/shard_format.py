"""The shard format, owned here and imported by both the prep tool and the library: the manifest,
a split's shard list, the one error type, and the per-shard index (writing it,
and reading a split's indexes into arrays for the loader). Nothing here imports PIL, torch or
multiprocessing, so reading shards never pulls in the prep tool.

A shard folder holds `{split}-{i:06d}.tar` (members `KEY.png`, `KEY.cls`, `KEY.json`), each
tar's index `{split}-{i:06d}.idx`, and `manifest.json` (format, counts per split and class,
image size, channels, class names, each shard's name, count and sha256, and its index's)."""
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np

from .durable import atomic_write_bytes
from .errors import UserError

_log = logging.getLogger("gen.data")

MANIFEST = "manifest.json"
FORMAT = "deepgen-shards/1"


class DataError(UserError):
    """A shard folder or an input that cannot be used: printed as one line, exit code `code`."""


class DecodeError(ValueError):
    """A sample that failed to decode: skipped and counted (remembered in the decoded-image cache,
    so every epoch skips it again)."""


def read_manifest(root):
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise DataError(f"{root} has no {MANIFEST}: not a deepgen shard folder (run python -m data_prep first)")
    try:
        manifest = json.loads(path.read_text())
    except ValueError as e:
        raise DataError(f"{path} is not valid JSON: {e}") from None
    if manifest.get("format") != FORMAT:
        raise DataError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def split_shards(root, split, manifest=None):
    """[(path, sample count)] of one split's shards, in manifest order."""
    manifest = manifest or read_manifest(root)
    if split not in manifest["splits"]:
        raise DataError(f"{root} has no split {split!r} (has: {', '.join(manifest['splits'])})")
    return [(str(Path(root) / s["name"]), s["count"]) for s in manifest["splits"][split]["shards"]]


# --- per-shard index ---------------------------------------------------------------------
# NVIDIA DALI's `wds2idx` text format, v1.2, so DALI's webdataset reader can use our shards as is:
#   line 1: "v1.2 <number of samples>"
#   then one line per sample: "<ext> <data offset> <size> <member name>" for each of its members,
# where the data offset is the byte where the member's contents start (after its tar header).
# Members belong to one sample while their name up to the first dot of the base name repeats
# (webdataset's grouping rule). Member names must not contain spaces (the format's limit).
INDEX_VERSION = "v1.2"


def index_name(tar_name):
    """`train-000000.tar` -> `train-000000.idx` (wds2idx's default name: up to the first dot)."""
    base = Path(tar_name).name
    return (base[:base.index(".")] if "." in base else base) + ".idx"


def split_member_name(name):
    """(sample key, extension) of a member name, or None for names without an extension."""
    dot = name.find(".", name.rfind("/") + 1)
    return (name[:dot], name[dot + 1:]) if dot > 0 and not name[:dot].endswith("/") else None


def index_text(members):
    """The v1.2 index of a tar's regular files [(name, data offset, size)], in archive order."""
    samples, last = [], None
    for name, offset, size in members:
        parts = split_member_name(name)
        if parts is None:
            continue
        if " " in name or "\n" in name:
            raise DataError(f"tar member {name!r} has a space in its name: the index format cannot hold it")
        if parts[0] != last:
            samples.append([])
            last = parts[0]
        samples[-1].append(f"{parts[1]} {offset} {size} {name}")
    return "".join([f"{INDEX_VERSION} {len(samples)}\n"] + [" ".join(s) + "\n" for s in samples])


def scan_tar(path):
    """[(name, data offset, size)] of a tar's regular files, by Python's tarfile (which handles
    the pax and GNU long-name headers other tools write); reads headers only."""
    import tarfile
    try:
        with tarfile.open(path, mode="r:") as tar:
            return [(m.name, m.offset_data, m.size) for m in tar if m.isreg()]
    except (tarfile.TarError, OSError) as e:
        raise DataError(f"{Path(path).name}: unreadable tar ({type(e).__name__}: {e})") from None


def parse_index(text, source="index"):
    """[{ext: (offset, size)}] per sample, plus the sample keys, from v1.2 index text."""
    lines = text.splitlines()
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise DataError(f"{source}: not a {INDEX_VERSION} index with a matching sample count")
    samples, keys = [], []
    for line in lines[1:]:
        fields = line.split()
        if not fields or len(fields) % 4:
            raise DataError(f"{source}: malformed line {line[:80]!r}")
        samples.append({fields[i]: (int(fields[i + 1]), int(fields[i + 2])) for i in range(0, len(fields), 4)})
        keys.append(split_member_name(fields[3])[0])
    return samples, keys


def write_index(tar_path, members=None):
    """Write `tar_path`'s index beside it (atomically); returns its manifest record."""
    tar_path = Path(tar_path)
    text = index_text(scan_tar(tar_path) if members is None else members).encode()
    out = tar_path.with_name(index_name(tar_path.name))
    atomic_write_bytes(out, text)
    return {"name": out.name, "sha256": hashlib.sha256(text).hexdigest(), "tar_bytes": tar_path.stat().st_size,
            "count": int(text.split(b"\n", 1)[0].split()[1])}


class SplitIndex:
    """The indexes of one split's shards, reduced to what the loader reads. Row `id` (the global
    sample id: shard base + position in the shard) holds the byte span covering the sample's png
    and cls members and where each lies in it. numpy arrays: forked workers share their pages."""

    def __init__(self, root, shards, base, rank=0):
        # per sample: span start, span length, png at (in the span), png size, cls at (-1: none), cls size, shard
        self.spans = np.zeros((sum(n for _, n, _ in shards), 7), dtype=np.int64)
        self.keys = np.zeros(len(self.spans), dtype="S32")
        self.indexed, stale = set(), []
        for number, (url, count, record) in enumerate(shards):
            problem = self._load(url, count, record, base[url], number) if record else "no index"
            if problem:
                stale.append(f"{Path(url).name} ({problem})")
            else:
                self.indexed.add(url)
        if stale and len(stale) < len(shards) and rank == 0:
            _log.warning("%d of %d shards are streamed without their index: %s%s (python -m data_prep index %s "
                        "rewrites them)", len(stale), len(shards), ", ".join(stale[:3]), " ..." if len(stale) > 3 else "",
                        root)

    def _load(self, url, count, record, base, number):
        path = Path(url).with_name(record["name"])
        try:
            if os.path.getsize(url) != record["tar_bytes"]:
                return "the tar changed size since it was indexed"
            text = path.read_bytes()
        except OSError as e:
            return f"{type(e).__name__}"
        if hashlib.sha256(text).hexdigest() != record["sha256"]:
            return "index sha256 differs from the manifest"
        try:
            samples, keys = parse_index(text.decode(), path.name)
        except (DataError, UnicodeDecodeError) as e:
            return str(e)
        if len(samples) != count or any("png" not in s for s in samples):
            return "index does not match the manifest"
        for i, (sample, key) in enumerate(zip(samples, keys)):
            png, cls = sample["png"], sample.get("cls", (-1, 0))
            start = min(png[0], cls[0]) if cls[0] >= 0 else png[0]
            end = max(png[0] + png[1], cls[0] + cls[1])
            self.spans[base + i] = (start, end - start, png[0] - start, png[1], cls[0] - start if cls[0] >= 0 else -1,
                                    cls[1], number)
            self.keys[base + i] = key.encode()
        return None
