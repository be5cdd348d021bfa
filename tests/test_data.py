"""The streaming loader on real shards: epoch split over real DDP ranks, exact resume, and
damaged data skipped and counted."""
import json
import tarfile
from pathlib import Path

import pytest
import torch

from helpers import damage, launch2, run
from gen.data import make_loader

def all_keys(shards):
    m = json.loads((Path(shards) / "manifest.json").read_text())
    keys = set()
    for s in m["splits"]["train"]["shards"]:
        with tarfile.open(Path(shards) / s["name"]) as tar:
            keys |= {f"{s['name']}/{n.name.split('.')[0]}" for n in tar.getmembers()}
    return keys


@pytest.fixture(scope="module")
def two_shards(mnist_shards, tmp_path_factory, digits):
    """The same 240 digits in 2 shards: fewer shards than ranks x workers, so split by sample."""
    out = tmp_path_factory.mktemp("two") / "shards"
    src = Path(mnist_shards).parent / "idx"
    run(["-m", "data_prep", "mnist", "--source", str(src), "--out", str(out), "--shard-size", "120"], check=True)
    return out


EPOCH_CASES = {"five-2": ("five", 2), "two-2": ("two", 2), "five-0": ("five", 0)}  # layout, workers


@pytest.fixture(scope="module")
def epoch_keys(mnist_shards, two_shards, tmp_path_factory):
    """Which keys each of 2 ranks read in one epoch, per case of EPOCH_CASES, in one launch."""
    out = tmp_path_factory.mktemp("epoch") / "keys.json"
    shards = {name: mnist_shards if layout == "five" else two_shards for name, (layout, _) in EPOCH_CASES.items()}
    cases = [arg for name, (_, workers) in EPOCH_CASES.items() for arg in ("--case", name, str(shards[name]), str(workers))]
    proc = run([*launch2(), str(Path(__file__).parent / "loader_ranks.py"), str(out), *cases], timeout=300)
    return proc, json.loads(out.read_text()) if out.is_file() else {}, shards


@pytest.mark.parametrize("case", list(EPOCH_CASES))
def test_epoch_mode_under_two_processes_is_a_partition(case, epoch_keys):
    proc, report, shards = epoch_keys
    assert case in report, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    shards = shards[case]
    rank0, rank1 = (set(k) for k in report[case])
    assert rank0 and rank1 and not rank0 & rank1          # disjoint
    assert rank0 | rank1 == all_keys(shards)               # together: the whole data set, once
    assert len(rank0) + len(rank1) == 240


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_mid_second_epoch_gives_the_same_batches(workers, mnist_shards):
    args = dict(batch_size=16, seed=5, workers=workers, shuffle_buffer=64)
    loader, _, _ = make_loader(mnist_shards, **args)
    reference = [b for _, b in zip(range(40), loader)]     # 15 batches per epoch: into epoch 2
    loader, _, tracker = make_loader(mnist_shards, **args)
    it = iter(loader)
    for _ in range(23):
        tracker.update(next(it)["position"])
    state = tracker.state_dict()
    assert tracker.epoch == 1
    del it, loader
    loader, _, resumed = make_loader(mnist_shards, tracker_state=state, **args)
    for i, batch in zip(range(23, 40), loader):
        assert batch["key"] == reference[i]["key"]
        assert torch.equal(batch["image"], reference[i]["image"])
        assert batch["position"]["epoch"] == reference[i]["position"]["epoch"]
    # a different seed gives a different order (the test above can fail)
    other, _, _ = make_loader(mnist_shards, **dict(args, seed=6))
    assert next(iter(other))["key"] != reference[0]["key"]


def test_values_shapes_labels(mnist_shards):
    loader, stream, _ = make_loader(mnist_shards, batch_size=32, workers=0, epochs=1)
    batch = next(iter(loader))
    assert batch["image"].shape == (32, 1, 28, 28) and batch["image"].dtype == torch.float32
    assert batch["image"].min() == -1 and batch["image"].max() == 1
    assert batch["label"].dtype == torch.long and 0 <= batch["label"].min() and batch["label"].max() <= 9
    assert stream.class_names == [str(i) for i in range(10)]


def test_truncated_shard_and_corrupt_sample_are_skipped_and_counted(mnist_shards, tmp_path, caplog):
    shards = damage(mnist_shards, tmp_path / "damaged")
    for workers in (0, 2):
        loader, _, tracker = make_loader(shards, batch_size=10, workers=workers, epochs=1)
        n = 0
        for batch in loader:
            tracker.update(batch["position"])
            n += len(batch["key"])
        assert 240 - 48 < n < 240 - 1       # half a shard lost, one sample corrupt
        assert tracker.skipped >= 2         # the truncation and the corrupt sample
        if workers == 0:  # warnings from worker processes do not reach caplog
            warned = [r.message for r in caplog.records]
            assert any("corrupt sample" in m for m in warned) and any("truncated or damaged" in m for m in warned)


def test_missing_manifest_is_a_clear_error(tmp_path):
    from gen.shard_format import DataError
    with pytest.raises(DataError, match="python -m data_prep"):
        make_loader(tmp_path, batch_size=4)


def test_resampled_mode_streams_with_replacement(mnist_shards):
    loader, _, tracker = make_loader(mnist_shards, batch_size=16, workers=2, resampled=True, world_size=2, rank=1)
    it = iter(loader)
    keys = []
    for _ in range(40):  # past a nominal epoch of this rank's slots: the stream does not end
        batch = next(it)
        tracker.update(batch["position"])
        keys += batch["key"]
    assert len(keys) == 640 and len(set(keys)) < len(keys)  # drawn with replacement
    assert tracker.epoch >= 1
