"""The shard format, owned here and imported by both the prep tool and the library: the manifest,
a split's shard list, the one error type, and atomic writes. Nothing here imports PIL, torch
or multiprocessing, so reading shards never pulls in the prep tool.

A shard folder holds `{split}-{i:06d}.tar` (members `KEY.png`, `KEY.cls`, `KEY.json`) and
`manifest.json` (format, counts per split and class, image size, channels, class names, each
shard's name, count and sha256)."""
import hashlib
import json
import os
from pathlib import Path

MANIFEST = "manifest.json"
FORMAT = "deepgen-shards/1"


class DataError(Exception):
    """A shard folder or an input that cannot be used: printed as one line, exit code `code`."""

    def __init__(self, message, code=1):
        super().__init__(message)
        self.code = code


def atomic_write_bytes(path, data):
    """Temp file + fsync + rename: a kill leaves the previous file or the new one, never half."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_json(path, obj, indent=1):
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode())


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
