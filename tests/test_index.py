"""Indexed shards: the index matches the tar (GNU tar's own listing), `data_prep index` adds it to
old or foreign shards, the indexed reader gives the tar reader's stream while each slot reads
only its own bytes (counted by the kernel), and the on-device data path gives the loader's stream."""
import json
import subprocess
from pathlib import Path

import pytest
import torch
import webdataset as wds

from helpers import damage, gnu_tar_members, make_color_folder, run, without_index
from gen.data import make_loader
from gen.shard_format import index_text, parse_index


def shard_files(shards):
    return sorted(Path(shards).glob("train-*.tar"))


def test_index_written_with_the_shards_matches_gnu_tar(mnist_shards):
    manifest = json.loads((mnist_shards / "manifest.json").read_text())
    for shard in manifest["splits"]["train"]["shards"]:
        idx = (mnist_shards / shard["index"]["name"]).read_text()
        assert idx.startswith(f"v1.2 {shard['count']}\n")
        assert parse_index(idx) == parse_index(index_text(gnu_tar_members(mnist_shards / shard["name"])))


def test_index_command_restores_indexes_and_indexes_foreign_tars(mnist_shards, tmp_path):
    old = without_index(mnist_shards, tmp_path / "old")
    assert run(["-m", "data_prep", "index", str(old)], check=True).returncode == 0
    for a, b in zip(shard_files(old), shard_files(mnist_shards)):
        idx = a.with_suffix(".idx").name
        assert (old / idx).read_bytes() == (mnist_shards / idx).read_bytes()
    assert json.loads((old / "manifest.json").read_text()) == json.loads((mnist_shards / "manifest.json").read_text())
    assert "OK" in run(["-m", "data_prep", "verify", str(old)], check=True).stdout

    # a tar written by webdataset's own writer (pax headers for the long names), no manifest
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    long_key = "x" * 120
    with wds.TarWriter(str(foreign / "a.tar")) as sink:
        for i in range(5):
            sink.write({"__key__": f"{long_key}{i}", "png": bytes([i]) * (700 + i), "cls": str(i).encode()})
    assert run(["-m", "data_prep", "index", str(foreign)], check=True).returncode == 0
    samples, keys = parse_index((foreign / "a.idx").read_text())
    assert keys == [f"{long_key}{i}" for i in range(5)]
    data = (foreign / "a.tar").read_bytes()
    for i, sample in enumerate(samples):  # offsets point at what GNU tar extracts for that member
        for ext, (offset, size) in sample.items():
            extracted = subprocess.run(["tar", "-xOf", str(foreign / "a.tar"), f"{long_key}{i}.{ext}"],
                                       capture_output=True, check=True).stdout
            assert data[offset:offset + size] == extracted


@pytest.mark.parametrize("world_size,workers,resampled", [(1, 2, False), (2, 2, False), (4, 3, False), (2, 2, True)])
def test_indexed_stream_equals_the_tar_readers(mnist_shards, tmp_path_factory, world_size, workers, resampled):
    """5 shards: split by shard (1x2, 2x2 slots) and by sample (4x3 = 12 slots > 5 shards)."""
    streamed = tmp_path_factory.mktemp("plain") / "shards"
    without_index(mnist_shards, streamed)
    rank = world_size - 1
    args = dict(batch_size=8, seed=3, rank=rank, world_size=world_size, workers=workers, shuffle_buffer=40,
                resampled=resampled, cache_mb=0)
    batches = []
    for shards in (mnist_shards, streamed):
        loader, stream, _ = make_loader(shards, **args)
        batches.append([b for _, b in zip(range(25), loader)])
    assert len(stream.index.indexed) == 0
    for a, b in zip(*batches):
        assert a["key"] == b["key"] and torch.equal(a["image"], b["image"]) and torch.equal(a["label"], b["label"])
        assert {k: v for k, v in a["position"].items() if k != "read_bytes"} == \
               {k: v for k, v in b["position"].items() if k != "read_bytes"}


@pytest.mark.parametrize("use_index", [True, False])
def test_damaged_shards_are_skipped_and_counted_on_both_readers(mnist_shards, tmp_path, use_index):
    shards = damage(mnist_shards, tmp_path / "damaged")  # truncated tar: its index no longer fits, so streamed
    loader, stream, tracker = make_loader(shards, batch_size=10, workers=2, epochs=1, cache_mb=0, use_index=use_index)
    n = 0
    for batch in loader:
        tracker.update(batch["position"])
        n += len(batch["key"])
    assert 240 - 48 < n < 240 - 1 and tracker.skipped >= 2
    assert len(stream.index.indexed) == (4 if use_index else 0)


@pytest.fixture(scope="module")
def color_shards(tmp_path_factory):
    """640 RGB images at 48 px in 3 shards and in 64 shards."""
    root = tmp_path_factory.mktemp("color")
    folder = make_color_folder(root / "images", 640)
    out = {}
    for n_shards, size in ((3, 214), (64, 10)):
        out[n_shards] = root / f"s{n_shards}"
        run(["-m", "data_prep", "folder", str(folder), "--size", "48", "--out", str(out[n_shards]),
             "--shard-size", str(size)], check=True)
        assert len(shard_files(out[n_shards])) == n_shards
    return out


def bytes_read_per_epoch(shards, use_index, ranks=2, workers=4):
    """Bytes all slots of `ranks` x `workers` read in one epoch (the kernel's rchar of each worker
    process, reported with its batches), and the keys they delivered."""
    total, keys = 0, []
    for rank in range(ranks):
        loader, _, tracker = make_loader(shards, batch_size=16, rank=rank, world_size=ranks, workers=workers,
                                         epochs=1, cache_mb=0, use_index=use_index)
        for batch in loader:
            tracker.update(batch["position"])
            keys += batch["key"]
        total += tracker.bytes_read
    return total, keys


@pytest.mark.parametrize("n_shards", [3, 64])
def test_bytes_read_per_epoch_is_the_data_set_once(color_shards, n_shards):
    shards = color_shards[n_shards]
    data_bytes = sum(p.stat().st_size for p in shard_files(shards))
    read, keys = bytes_read_per_epoch(shards, use_index=True)
    assert len(keys) == len(set(keys)) == 640  # an epoch: every sample once
    assert read <= 1.05 * data_bytes, (read, data_bytes)
    assert read >= 0.5 * data_bytes  # the images themselves were read, by the workers
    if n_shards == 3:  # the counter sees the amplification of the tar reader (8 slots, 3 shards)
        streamed, keys = bytes_read_per_epoch(without_index(shards, shards.parent / "plain3"), use_index=False)
        assert len(keys) == 640 and streamed >= 6 * data_bytes, (streamed, data_bytes)


@pytest.mark.parametrize("use_index", [True, False])
def test_device_data_gives_the_loaders_stream_and_resume(mnist_shards, tmp_path, use_index):
    """The gathered stream (here on the CPU device) equals 2 worker processes' stream, batch for
    batch, on shards with a truncated tar and a corrupt sample, into the third epoch; and a resume
    from a mid-epoch position continues it the same way."""
    shards = damage(mnist_shards, tmp_path / "damaged")
    args = dict(batch_size=16, seed=2, workers=2, shuffle_buffer=50, use_index=use_index)
    loader, _, _ = make_loader(shards, **args)
    reference = [b for _, b in zip(range(36), loader)]
    assert reference[-1]["position"]["epoch"] >= 2 and reference[-1]["position"]["skipped"] > 0
    gathered, _, tracker = make_loader(shards, device="cpu", **args)
    it = iter(gathered)
    for i in range(36):
        batch = next(it)
        if i < 21:
            tracker.update(batch["position"])
        assert batch["key"] == reference[i]["key"]
        assert torch.equal(batch["image"], reference[i]["image"]) and torch.equal(batch["label"], reference[i]["label"])
        assert {k: batch["position"][k] for k in ("worker", "epoch", "offset", "skipped")} == \
               {k: reference[i]["position"][k] for k in ("worker", "epoch", "offset", "skipped")}
    resumed, _, _ = make_loader(shards, device="cpu", tracker_state=tracker.state_dict(), **args)
    for i, batch in zip(range(21, 36), resumed):
        assert batch["key"] == reference[i]["key"] and torch.equal(batch["image"], reference[i]["image"])
