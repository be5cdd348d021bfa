"""Helpers shared by the tests (one home: test modules import from here, never from each other):
running our commands as a user would, real DDP launches, IDX folders, checkpoint comparison,
polling a run, damaging shards, and talking to the local SLURM."""
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from data_prep.sources import write_idx_split

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
POKEMON_ZIP = SHARED / "datasets" / "pokemon-819-128px.zip"


# commands a test runs in its own process unless a real process is the point: jobs.X.main(argv)
# with captured output costs no interpreter start-up and no ~4 s of imports
IN_PROCESS = ("jobs.train", "jobs.sample", "jobs.export", "jobs.evaluate", "jobs.compare", "data_prep")


def run(args, env=None, timeout=600, cwd=None, check=False, process=False):
    """Run `python -m ...` like a user; returns CompletedProcess with text output. Our commands
    (IN_PROCESS) run in this process, through the same main(argv) and exit code a user's process
    gets, unless `process` (signals, kill -9, DDP, a fresh interpreter are the point) or `cwd` is
    given; DEEPGEN_TEST_PROCESSES=1 runs every one in its own process."""
    if (not process and cwd is None and args[:1] == ["-m"] and args[1] in IN_PROCESS
            and not os.environ.get("DEEPGEN_TEST_PROCESSES")):
        proc = run_in_process(args[1], args[2:], env)
    else:
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE=os.environ.get("WANDB_MODE", "offline"))
        full_env.update(env or {})
        proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=full_env, timeout=timeout,
                              cwd=cwd or ROOT)
    if check and proc.returncode != 0:
        raise AssertionError(f"{args} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


def run_in_process(module, argv, env=None):
    """module.main(argv) here, as `python -m module argv` would run it: the environment (env, and
    offline W&B), stdout, stderr and the log lines captured, an uncaught exception printed as its
    traceback with exit code 1, SystemExit's code kept; Accelerate's per-process state reset."""
    import contextlib
    import importlib
    import io
    import logging
    import traceback

    from accelerate.state import AcceleratorState
    out, err = io.StringIO(), io.StringIO()
    saved_env = dict(os.environ)
    os.environ.update({"PYTHONUNBUFFERED": "1", "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), **(env or {})})
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    AcceleratorState._reset_state(True)  # one precision per process: a run before may have used another
    code = 1
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = importlib.import_module(f"{module}.__main__" if module == "data_prep" else module).main(argv)
            except SystemExit as e:  # argparse: --help, a bad option
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            except Exception:  # a bug: its traceback, as a process would print it
                traceback.print_exc()
                code = 1
    finally:
        end_wandb(code)
        root.removeHandler(handler)
        root.setLevel(level)
        os.environ.clear()
        os.environ.update(saved_env)
        AcceleratorState._reset_state(True)
    return subprocess.CompletedProcess([sys.executable, "-m", module, *argv], code or 0, out.getvalue(), err.getvalue())


def end_wandb(code):
    """What a process's exit does for W&B: finish a run still open and stop wandb's service, which
    writes the last records of the run files (a later test reading them must find them whole)."""
    wandb = sys.modules.get("wandb")
    if wandb is None:
        return
    if wandb.run is not None:
        wandb.run.finish(exit_code=code or 0)
    wandb.teardown()


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


def split_cases(argv):
    """[(name, args)] of a script that runs several cases in one launch (`--case NAME ARGS...`
    repeated: the processes start and import torch once); with no --case, one case named None."""
    if "--case" not in argv:
        return [(None, argv)]
    found = []
    for arg in argv:
        if arg == "--case":
            found.append([None, []])
        elif found[-1][0] is None:
            found[-1][0] = arg
        else:
            found[-1][1].append(arg)
    return [tuple(case) for case in found]


def make_idx_dir(root, digits, n_train, n_test, gz=True, offset=0):
    x, y = digits
    tr, te = slice(offset, offset + n_train), slice(offset + n_train, offset + n_train + n_test)
    write_idx_split(root, "train", x[tr], y[tr], gz)
    write_idx_split(root, "test", x[te], y[te], gz)
    return Path(root)


def built_once(tmp_path_factory, name, build):
    """A folder built once per test session, shared by every xdist worker: the first worker to
    need it builds it (build(folder)) under a file lock; the others wait and reuse it. Tests that
    write into what they get should copy it first."""
    from filelock import FileLock
    base = tmp_path_factory.getbasetemp()
    root = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # workers: popen-gwN in one session folder
    folder = root / f"shared-{name}"
    with FileLock(str(folder) + ".lock"):
        if not (folder / ".built").is_file():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            build(folder)
            (folder / ".built").touch()
    return folder


def make_mnist_shards(root, digits, n_train, n_test, shard_size):
    """Real digits -> IDX files -> shards, by the real CLI; returns the shard folder."""
    make_idx_dir(Path(root) / "idx", digits, n_train, n_test)
    run(["-m", "data_prep", "mnist", "--source", str(Path(root) / "idx"), "--out", str(Path(root) / "shards"),
         "--shard-size", str(shard_size)], check=True)
    return Path(root) / "shards"


TINY = ["--model.width", "8", "--train.batch_size", "16", "--log.num_samples", "16"]
# the gan preset without its self-conditioning, for the tests of processes (signals, kills, W&B's
# key): a fresh run then skips the clustering and sklearn's import, ~2 of its ~7 CPU-s
NO_CLUSTERS = ["--model.self_condition", "0"]


def train_cmd(shards, run_dir, *extra, preset="gan"):
    return ["-m", "jobs.train", "--preset", preset, "--data", str(shards), "--train.run_dir", str(run_dir),
            *TINY, *extra]


def metrics(run_dir):
    return [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def state_files(ckpt):
    """Every tensor a checkpoint holds: models, optimizers, EMA, RNG and loop state."""
    out = {}
    for f in sorted(Path(ckpt).iterdir()):
        if f.suffix == ".safetensors":
            out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
        elif f.name.startswith(("optimizer", "custom_checkpoint", "random_states")):
            out[f.name] = torch.load(f, weights_only=False)
            if isinstance(out[f.name], dict):
                out[f.name].pop("elapsed", None)  # the loop's wall time: the one value that may differ
    return out


def assert_same(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), f"{path} differs"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_same(a[k], b[k], f"{path}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif hasattr(a, "__array__"):
        import numpy as np
        assert np.array_equal(np.asarray(a), np.asarray(b)), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


def process_running(proc):
    def check():
        assert proc.poll() is None, proc.communicate()
    return check


def wait_for_step(run_dir, step, assert_running, timeout=120):
    """Poll metrics.jsonl until the run logs `step`; `assert_running()` fails (saying why) if it ended."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        rows = metrics(run_dir) if (Path(run_dir) / "metrics.jsonl").is_file() else []
        if rows and rows[-1]["step"] >= step:
            return
        assert_running()
        time.sleep(0.2)
    raise TimeoutError(f"no step {step} in {run_dir}")


def damage(shards, dest):
    """A copy of the shards with train-000001 truncated mid-file and one corrupt PNG in train-000002."""
    shutil.copytree(shards, dest)
    t1 = dest / "train-000001.tar"
    t1.write_bytes(t1.read_bytes()[: t1.stat().st_size // 2 + 100])
    t2 = dest / "train-000002.tar"
    with tarfile.open(t2) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(t2, "w") as tar:
        for i, (m, data) in enumerate(members):
            if i == 0:
                data = b"\x89PNG\r\n\x1a\n garbage"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    return dest


def job_info(job_id):
    out = subprocess.run(["scontrol", "show", "job", str(job_id)], capture_output=True, text=True).stdout
    state = re.search(r"JobState=(\w+)", out)
    restarts = re.search(r"Restarts=(\d+)", out)
    return (state.group(1) if state else "UNKNOWN"), int(restarts.group(1)) if restarts else 0


def job_running(job_id, run_dir):
    def check():
        assert job_info(job_id)[0] in ("PENDING", "RUNNING", "CONFIGURING"), logs(run_dir)
    return check


def wait_done(job_id, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        state, restarts = job_info(job_id)
        if state in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
            return state, restarts
        time.sleep(1)
    subprocess.run(["scancel", str(job_id)])
    raise TimeoutError(f"job {job_id} still {job_info(job_id)} after {timeout}s")


def submit(*args):
    proc = run(["-m", "slurm.submit", *args], check=True)
    return [int(j) for j in re.findall(r"submitted job (\d+)", proc.stdout)], proc.stdout


def logs(run_dir):
    return "\n".join(p.read_text(errors="replace") for p in Path(run_dir).glob("slurm/*/*_log.*"))


def train_args(shards, run_dir, steps, *extra):
    return ["--preset", "gan", "--data", str(shards), "--train.run_dir", str(run_dir), *TINY,
            "--train.steps", str(steps), "--log.wandb", "off", *extra]


def without_index(shards, dest):
    """A copy of a shard folder as written before indexes existed: no .idx files, none in the manifest."""
    shutil.copytree(shards, dest, ignore=shutil.ignore_patterns("*.idx"))
    manifest = json.loads((dest / "manifest.json").read_text())
    for meta in manifest["splits"].values():
        for shard in meta["shards"]:
            shard.pop("index", None)
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def make_color_folder(root, n, size=48, seed=0):
    """n RGB PNGs of smooth colour fields with noise (~6 KB each), in two class folders."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    for i in range(n):
        (Path(root) / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        a, b, c = rng.uniform(0, 255, (3, 3))
        img = np.stack([a[k] * xx + b[k] * yy + c[k] * xx * yy for k in range(3)], -1)
        img = np.clip(img / 2 + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(Path(root) / f"c{i % 2}" / f"{i:05d}.png")
    return Path(root)


def gnu_tar_members(path):
    """[(name, data offset, size)] of a ustar file as GNU tar lists them (header block + 1)."""
    out = subprocess.run(["tar", "-tvR", "-f", str(path)], capture_output=True, text=True, check=True).stdout
    members = []
    for line in out.splitlines():
        m = re.match(r"block (\d+): (\S)\S* \S+ +(\d+) \S+ \S+ (.+)$", line)
        if m and m.group(2) == "-":
            members.append((m.group(4), (int(m.group(1)) + 1) * 512, int(m.group(3))))
    return members
