"""Check shards against their manifest (`python -m data_prep verify`) and index shards written
before indexes existed or by other tools (`python -m data_prep index`)."""
import hashlib
import io
import tarfile
from pathlib import Path

from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from gen.durable import atomic_write_json, sha256_file
from gen.shard_format import MANIFEST, DataError, index_text, parse_index, read_manifest, scan_tar, write_index

from . import PrepError


def verify(root):
    """Every problem found, as one line each; an empty list means the shards match the manifest."""
    import webdataset as wds  # here, not at the top: it imports torch, which writing shards does not need
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    size, channels = manifest["image_size"], manifest["channels"]
    shards = [(split, s) for split, meta in manifest["splits"].items() for s in meta["shards"]]
    for split, shard in tqdm(shards, desc="verify", unit="shard", dynamic_ncols=True):
        path = root / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        if sha256_file(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 differs from the manifest")
        count = 0
        try:
            for sample in wds.WebDataset(str(path), shardshuffle=False, empty_check=False):
                count += 1
                try:
                    img = Image.open(io.BytesIO(sample["png"]))
                    img.load()
                except (KeyError, OSError, UnidentifiedImageError) as e:
                    problems.append(f"{shard['name']}/{sample.get('__key__')}: undecodable image ({e})")
                    continue
                if img.size != (size, size) or len(img.getbands()) != channels:
                    problems.append(f"{shard['name']}/{sample['__key__']}: {img.size} {img.mode}, expected {size}px x {channels}ch")
        except (tarfile.TarError, OSError, ValueError) as e:
            problems.append(f"{shard['name']}: unreadable tar ({type(e).__name__}: {e})")
        if count != shard["count"]:
            problems.append(f"{shard['name']}: {count} samples, manifest says {shard['count']}")
        problems += _index_problems(path, shard.get("index"))
    for split, meta in manifest["splits"].items():
        if sum(s["count"] for s in meta["shards"]) != meta["count"]:
            problems.append(f"split {split}: shard counts do not add up to {meta['count']}")
    return problems


def _index_problems(tar_path, record):
    """An index must be the one recorded in the manifest and agree with a fresh scan of its tar."""
    if record is None:
        return []  # no index: readers stream the tar (python -m data_prep index adds one)
    path = tar_path.with_name(record["name"])
    if not path.is_file():
        return [f"{record['name']}: index missing (python -m data_prep index {tar_path.parent} rewrites it)"]
    text = path.read_bytes()
    if hashlib.sha256(text).hexdigest() != record["sha256"]:
        return [f"{record['name']}: sha256 differs from the manifest"]
    try:
        if parse_index(text.decode()) != parse_index(index_text(scan_tar(tar_path))):
            return [f"{record['name']}: offsets differ from the tar's own headers"]
    except DataError as e:
        return [f"{record['name']}: {e}"]
    return []


def index_folder(root):
    """Add an index beside every shard of `root`, for shards written before indexes existed or by
    other tools. With a manifest, each index is recorded in it (the manifest is rewritten
    atomically, once at the end); without one, every *.tar gets its .idx. Returns
    (shards indexed, problems)."""
    root = Path(root)
    if not root.is_dir():
        raise PrepError(f"{root}: no such folder")
    if not (root / MANIFEST).is_file():
        tars = sorted(root.glob("*.tar"))
        if not tars:
            raise PrepError(f"{root} has no manifest.json and no .tar files")
        for tar in tqdm(tars, desc="index", unit="shard", dynamic_ncols=True):
            write_index(tar)
        return len(tars), []
    manifest = read_manifest(root)
    problems, done = [], 0
    shards = [s for meta in manifest["splits"].values() for s in meta["shards"]]
    for shard in tqdm(shards, desc="index", unit="shard", dynamic_ncols=True):
        path = root / shard["name"]
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        try:
            record = write_index(path)
        except DataError as e:
            problems.append(str(e))
            continue
        if record.pop("count") != shard["count"]:
            problems.append(f"{shard['name']}: the tar holds a different number of samples than the manifest says "
                            "(truncated or replaced?): not indexed; run python -m data_prep verify")
            (root / record["name"]).unlink(missing_ok=True)
            shard.pop("index", None)
            continue
        shard["index"] = record
        done += 1
    atomic_write_json(root / MANIFEST, manifest)
    return done, problems
