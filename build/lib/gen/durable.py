"""Durable file I/O, in one place: a write is a temp file, fsynced, then renamed over the old
name (a kill leaves the previous file or the new one, never half), and folders are fsynced so
the names in them survive a crash too. Shards, checkpoints, exports, grids, metrics and locks are
all written through here."""
import hashlib
import json
import os
from pathlib import Path


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


def atomic_save_tensors(path, tensors, metadata=None):
    """A safetensors file written as atomic_write_bytes writes."""
    from safetensors.torch import save
    atomic_write_bytes(path, save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata))


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_path(path):
    """fsync a file or a folder (a folder's fsync makes the names in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
