"""Loader benchmark: images/s with the decoded-image cache off, against the raw PNG decode rate,
and bytes read per epoch; on the real Pokémon artworks at 64 px and a generated 64 px RGB set.

    python bench/bench_loader.py [--big 100000] [--workers 2] [--batch 64]

Side by side in one run (interleaved, best of two: this VM's speed drifts between minutes):
  raw decode:   one process per core decoding the same PNG bytes from memory, nothing else
                (the same decode call as the loader's), the ceiling for any loader
  indexed:      gen.data.make_loader with the shards' index (one pread per sample), cache off
  tar reader:   the same shards without their index (webdataset's tar parsing), cache off
  cached:       indexed with the decoded-image cache on (Pokémon only; the default for small sets)
  ImageFolder:  torchvision ImageFolder + ToTensor over the same PNG files (Pokémon only)
Torch's DataLoader costs ~1-1.5 ms per batch to move it from a worker to the trainer (shared
memory), so the ratio is measured at the default batch (64) and at 256.
Loader rates count the uint8 batches as they reach the training process (the float conversion
runs on the accelerator, as part of the step). Then the bytes all slots of 2 ranks x 4 workers
read in one epoch (the kernel's count), over the data set's size, on 3 and on 64 shards.
Targets: indexed / raw >= 0.90; bytes read <= 1.05x the data set with the index."""
import argparse
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

ROOT = Path(__file__).resolve().parents[1]
ZIP = ROOT.parent / "shared" / "datasets" / "pokemon-819-128px.zip"
sys.path.insert(0, str(ROOT))
from gen.data import make_loader  # noqa: E402
from gen.shard_reader import decode_png_tensor  # noqa: E402


def colour_images(n, size=64, seed=0):
    """n RGB images: smooth colour fields with sensor-like noise (~10 KB as PNG at 64 px)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for _ in range(n):
        a, b, c = rng.uniform(0, 255, (3, 3, 1, 1))
        img = (a * xx + b * yy + c * xx * yy) / 2 + rng.normal(0, 10, (3, size, size))
        yield np.clip(img, 0, 255).astype(np.uint8).transpose(1, 2, 0)


def write_colour_shards(out, n, shard_size):
    from data_prep.shards import write_shards
    from data_prep.sources import Item, Source
    items = [Item(("array", img), f"colour/{i}") for i, img in enumerate(colour_images(n))]
    source = Source("colours", {"train": items}, None, 3, None)
    write_shards(source, out, shard_size=shard_size)
    return Path(out)


def strip_index(shards, dest):
    """The same shards as written before indexes existed."""
    import json
    shutil.copytree(shards, dest, ignore=shutil.ignore_patterns("*.idx"))
    manifest = json.loads((dest / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        shard.pop("index", None)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def loader_rate(shards, workers, batch, cache_mb, images):
    loader, stream, _ = make_loader(shards, batch_size=batch, workers=workers, shuffle_buffer=1000, cache_mb=cache_mb)
    it = iter(loader.loader)  # uint8 batches, as training consumes them
    warm = stream.num_samples if cache_mb else 10 * batch  # the cache fills in the first epoch: not counted
    n = 0
    while n < warm:
        n += len(next(it)["key"])
    n, t0 = 0, time.perf_counter()
    while n < images:
        n += len(next(it)["key"])
    return n / (time.perf_counter() - t0)


def imagefolder_rate(folder, workers, batch, images):
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
    loader = DataLoader(datasets.ImageFolder(folder, transform=tf), batch_size=batch, shuffle=True,
                        num_workers=workers, persistent_workers=workers > 0)
    for _ in loader:  # warm-up epoch
        pass
    n, t0 = 0, time.perf_counter()
    while n < images:
        for x, _ in loader:
            n += len(x)
    return n / (time.perf_counter() - t0)


def _decode_all(args):
    blobs, channels = args
    torch.set_num_threads(1)
    for b in blobs:
        decode_png_tensor(torch.frombuffer(b, dtype=torch.uint8), channels)
    return len(blobs)


def raw_decode_rate(blobs, images, procs):
    reps = max(1, images // len(blobs))
    work = [(blobs[i::procs] * reps, 3) for i in range(procs)]
    with mp.get_context("fork").Pool(procs) as pool:
        pool.map(_decode_all, [(b[:50], 3) for b, _ in work])  # warm-up
        t0 = time.perf_counter()
        n = sum(pool.map(_decode_all, work))
        return n / (time.perf_counter() - t0)


def bytes_read_per_epoch(shards, ranks=2, workers=4):
    total = 0
    for rank in range(ranks):
        loader, _, tracker = make_loader(shards, batch_size=64, rank=rank, world_size=ranks, workers=workers,
                                         epochs=1, cache_mb=0)
        for batch in loader.loader:
            tracker.update(batch["position"])
        total += tracker.bytes_read
    return total


def png_blobs(shards, limit):
    blobs = []
    for s in wds.WebDataset(sorted(str(p) for p in Path(shards).glob("train-*.tar")), shardshuffle=False):
        blobs.append(bytearray(s["png"]))
        if len(blobs) == limit:
            break
    return blobs


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--big", type=int, default=100_000, help="images in the generated 64 px set")
    p.add_argument("--workers", type=int, default=os.cpu_count())
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--images", type=int, default=30_000, help="images counted per measurement")
    args = p.parse_args()
    cores = os.cpu_count()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        poke = tmp / "poke"
        subprocess.run([sys.executable, "-m", "data_prep", "pokemon", "--source", str(ZIP), "--out", str(poke),
                        "--size", "64", "--shard-size", "103"], check=True, stderr=subprocess.DEVNULL)
        folder = tmp / "folder" / "pokemon"
        folder.mkdir(parents=True)
        for s in wds.WebDataset(sorted(str(p) for p in poke.glob("train-*.tar")), shardshuffle=False):
            (folder / f"{s['__key__']}.png").write_bytes(s["png"])
        t0 = time.perf_counter()
        big = write_colour_shards(tmp / "big", args.big, shard_size=1000)
        print(f"generated {args.big:,} images at 64 px in {time.perf_counter() - t0:.0f} s")
        sets = {"pokemon": (poke, strip_index(poke, tmp / "poke-plain")),
                f"generated {args.big // 1000}k": (big, strip_index(big, tmp / "big-plain"))}
        blobs = {name: png_blobs(shards, 5000) for name, (shards, _) in sets.items()}

        best = {}
        for _ in range(2):
            for name, (indexed, plain) in sets.items():
                runs = {"raw decode": lambda: raw_decode_rate(blobs[name], args.images, cores),
                        "indexed": lambda: loader_rate(indexed, args.workers, args.batch, 0, args.images),
                        "indexed, batch 256": lambda: loader_rate(indexed, args.workers, 256, 0, args.images),
                        "tar reader": lambda: loader_rate(plain, args.workers, args.batch, 0, args.images)}
                if name == "pokemon":
                    runs["cached"] = lambda: loader_rate(indexed, args.workers, args.batch, 1024, args.images)
                    runs["ImageFolder"] = lambda: imagefolder_rate(folder.parent, args.workers, args.batch, args.images)
                for what, fn in runs.items():
                    best[name, what] = max(best.get((name, what), 0), fn())

        print(f"\nloader, cache off unless said: images/s ({cores} cores, {args.workers} workers, batch {args.batch})")
        print("| data set | raw decode x%d | indexed | tar reader | cached | ImageFolder | indexed, batch 256 "
              "| indexed / raw | same, batch 256 |" % cores)
        print("|---|---|---|---|---|---|---|---|---|")
        for name in sets:
            raw = best[name, "raw decode"]
            cells = [f"{best[name, w]:,.0f}" if (name, w) in best else "-"
                     for w in ("raw decode", "indexed", "tar reader", "cached", "ImageFolder", "indexed, batch 256")]
            ratios = [best[name, w] / raw for w in ("indexed", "indexed, batch 256")]
            print(f"| {name} | " + " | ".join(cells) + " | "
                  + " | ".join(f"{r:.2f} ({'PASS' if r >= 0.9 else 'FAIL'} >= 0.90)" for r in ratios) + " |")
        print("tar reader / raw: " + ", ".join(f"{n} {best[n, 'tar reader'] / best[n, 'raw decode']:.2f}" for n in sets))

        print("\nbytes read per epoch, all slots of 2 ranks x 4 workers, over the shards' size")
        print("| shards | with index | without (tar reader) |")
        print("|---|---|---|")
        for n_shards in (3, 64):
            shards = write_colour_shards(tmp / f"b{n_shards}", 6400, shard_size=-(-6400 // n_shards))
            size = sum(f.stat().st_size for f in shards.glob("train-*.tar"))
            with_index = bytes_read_per_epoch(shards) / size
            without = bytes_read_per_epoch(strip_index(shards, tmp / f"b{n_shards}-plain")) / size
            print(f"| {n_shards} ({size / 2**20:.0f} MiB) | {with_index:.3f}x ({'PASS' if with_index <= 1.05 else 'FAIL'} "
                  f"<= 1.05) | {without:.2f}x |")


if __name__ == "__main__":
    main()
