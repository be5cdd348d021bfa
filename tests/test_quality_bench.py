"""bench/quality.py end to end at tiny budgets (the real budgets are a benchmark, not a test), and
its memorisation check against a brute-force reference."""
import json
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.spatial.distance import cdist

from helpers import ROOT, run
sys.path.insert(0, str(ROOT / "bench"))
from memorisation import copy_check, nearest_distances  # noqa: E402


def test_nearest_distances_and_copy_check():
    g = torch.Generator().manual_seed(0)
    train, held, fresh = (torch.rand(n, 1, 8, 8, generator=g) for n in (300, 100, 100))
    d = nearest_distances(fresh, train, chunk=7)
    ref = cdist(fresh.flatten(1).numpy(), train.flatten(1).numpy()).min(axis=1)
    assert np.allclose(d.numpy(), ref, atol=1e-4)
    embed = lambda x: x.flatten(1)[:, :16] * 3  # noqa: E731 (any fixed feature map)
    assert not any(v["copied"] for v in copy_check(fresh, train, held, embed).values())
    copies = train[:100] + 0.001 * torch.rand(100, 1, 8, 8, generator=g)  # near-duplicates of training images
    report = copy_check(copies, train, held, embed)
    assert all(v["copied"] for v in report.values()) and report["pixels"]["samples_median"] < 0.01
    some = copy_check(torch.cat([copies[:20], fresh[20:]]), train, held, embed)  # a fifth copied: the p5 drops
    assert all(v["copied"] for v in some.values()) and some["pixels"]["relative"]["samples_p5"] < 0.01
    # blobs near the middle of the data: nearer every real image than real images are to each other,
    # so the plain distances fire, but they sit no nearer the training images than the held-out ones
    blobs = 0.5 + 0.05 * torch.randn(100, 1, 8, 8, generator=g)
    report = copy_check(blobs, train, held, embed)
    assert all(v["closer_than_held_out"] and not v["copied"] for v in report.values())


def test_random_mirror_and_copy_check_of_mirrored_copies():
    from gen.augment import random_mirror
    torch.manual_seed(0)
    x = torch.rand(4000, 1, 3, 5)
    y = random_mirror(x)
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    assert (flipped | (y == x).flatten(1).all(1)).all()  # each image whole: itself or its mirror
    assert abs(flipped.float().mean().item() - 0.5) < 0.03  # binomial sd 0.008
    g = torch.Generator().manual_seed(1)
    train, held = (torch.rand(n, 1, 8, 8, generator=g) for n in (300, 100))
    embed = lambda x: x.flatten(1)[:, :16] * 3  # noqa: E731
    mirror_copies = train[:100].flip(-1)
    assert not copy_check(mirror_copies, train, held, embed)["pixels"]["copied"]  # unflipped set: far from all
    report = copy_check(mirror_copies, train, held, embed, mirrored=True)
    assert report["pixels"]["copied"] and report["pixels"]["samples_median"] == 0


@pytest.mark.bench  # ~7 min on 2 cores: nine tiny trainings, two domain networks
def test_quality_bench_tiny_runs_every_stage(tmp_path):
    proc = run([str(ROOT / "bench" / "quality.py"), "--tiny", "--out", str(tmp_path)], timeout=900)
    assert proc.returncode in (0, 1), proc.stderr[-3000:]  # 1 = a model flagged as copying (printed)
    rows = json.loads((tmp_path / "quality.json").read_text())
    assert [(r["data"], r["label"]) for r in rows] == [  # seed-gan trained once for its three pairs
        ("mnist", "seed-gan"), ("mnist", "gan"), ("mnist", "gan without self-conditioning"), ("mnist", "gan conditional"),
        ("mnist", "seed-vae"), ("mnist", "vae"),
        ("mnist", "vae Bernoulli"), ("pokemon", "seed-gan"), ("pokemon", "gan-small-data")]
    for r in rows:
        assert r["images"] >= 64 and r["train_s"] > 0
        assert math.isfinite(r["scores"]["model"]["fid"]) and r["floor"]["fid"] < r["scores"]["model"]["fid"]
        assert set(r["scores"]["copy"]) == {"pixels", "features"}
        assert ("test_elbo" in r["scores"]) == r["preset"].endswith("vae")
    manifest = json.loads((tmp_path / "mnist" / "manifest.json").read_text())
    assert all(len(manifest["splits"][split]["per_class"]) == 10 for split in ("train", "test"))  # every digit held out
    table = (tmp_path / "quality.md").read_text()
    for pair in ("gan vs seed-gan", "gan conditional vs seed-gan", "vae vs seed-vae", "vae Bernoulli vs seed-vae",
                 "gan-small-data vs seed-gan"):
        assert f"| {pair} |" in table
    assert Image.open(tmp_path / "grid-mnist.png").size[0] > 4 * Image.open(tmp_path / "grid-mnist.png").size[1]
    assert Image.open(tmp_path / "grid-pokemon.png").size[0] > 2.5 * Image.open(tmp_path / "grid-pokemon.png").size[1]
