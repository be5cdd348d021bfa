"""Nothing lost, ever: kill -9 at random moments, two runs on one run dir, impossible option
values, a full disk (a real tmpfs), diverging losses, torn resumes and symlink loops."""
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

from helpers import NO_CLUSTERS, ROOT, assert_same, built_once, metrics, run, state_files, train_cmd

KILL_ARGS = ["--train.ckpt_every", "1", "--train.log_every", "1", "--train.sample_every", "1000", "--log.wandb", "off",
             "--data.workers", "0", *NO_CLUSTERS]
CKPT_FILES = {"meta.json", "sampling.safetensors", "model.safetensors", "model_1.safetensors", "optimizer.bin",
              "optimizer_1.bin", "random_states_0.pkl"}


def complete_checkpoints(run_dir):
    from gen.checkpoint import checkpoints
    return checkpoints(run_dir)


def start(args, env=None):
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", WANDB_MODE="offline", **(env or {}))
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=full_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_until(condition, proc=None, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        if proc is not None and proc.poll() is not None:
            return condition()
        time.sleep(0.05)
    raise AssertionError("timed out")


@pytest.mark.parametrize("keep_last", [1, 3])
def test_kill9_at_random_moments_always_leaves_a_complete_checkpoint(mnist_shards, tmp_path, tmp_path_factory,
                                                                    keep_last):
    """ckpt_every 1 and SIGKILL at random moments (often mid-save): after every kill the newest
    complete checkpoint is whole and loads, and resuming each time ends with the weights of an
    uninterrupted run of the same length (one run for both cases: keep_last only prunes)."""
    steps = 24
    args = [*KILL_ARGS, "--train.keep_last", str(keep_last), "--train.steps", str(steps)]
    straight = built_once(tmp_path_factory, "kill9-straight", lambda folder: run(train_cmd(
        mnist_shards, folder / "run", *KILL_ARGS, "--train.keep_last", "1", "--train.steps", str(steps)), check=True))
    rng = random.Random(keep_last)
    run_dir = tmp_path / "killed"
    kills = 0
    for _ in range(3):  # three kills (each one a process start-up, ~4 CPU-s)
        before = complete_checkpoints(run_dir)[0][0] if complete_checkpoints(run_dir) else 0
        proc = start(train_cmd(mnist_shards, run_dir, *args))
        wait_until(lambda: complete_checkpoints(run_dir) and complete_checkpoints(run_dir)[0][0] > before, proc)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:
            break  # finished before the kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        found = complete_checkpoints(run_dir)
        assert found, "a kill left no complete checkpoint"
        newest = found[0][1]
        assert CKPT_FILES <= {f.name for f in newest.iterdir()}, sorted(f.name for f in newest.iterdir())
        for f in newest.glob("*.safetensors"):
            load_file(f)  # whole, not torn
        assert len(found) <= keep_last + 1
    assert kills == 3
    run(train_cmd(mnist_shards, run_dir, *args), check=True)
    assert [m["step"] for m in metrics(run_dir) if "train/loss_d" in m] == list(range(1, steps + 1))
    assert_same(state_files(run_dir / f"checkpoints/checkpoint-{steps:07d}"),
                state_files(straight / f"run/checkpoints/checkpoint-{steps:07d}"))
    assert len(complete_checkpoints(run_dir)) == keep_last
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))


def test_one_run_per_run_dir(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    first = start(train_cmd(mnist_shards, run_dir, *NO_CLUSTERS, "--train.steps", "2000", "--train.ckpt_every", "25",
                            "--train.log_every", "1", "--log.wandb", "off", "--data.workers", "0"))
    wait_until(lambda: (run_dir / "metrics.jsonl").is_file() and metrics(run_dir), first)
    assert first.poll() is None, first.communicate()[1][-2000:]
    second = run(train_cmd(mnist_shards, run_dir, "--train.steps", "10", "--log.wandb", "off"))
    if second.returncode != 1:
        first.kill()
        raise AssertionError(f"first: {first.poll()} {first.communicate()[1][-1500:]}\nsecond: {second.stderr[-1500:]}")
    errors = [l for l in second.stderr.splitlines() if l.startswith("error:")]
    assert len(errors) == 1 and "in use by another run" in errors[0] and f"pid {first.pid}" in errors[0], second.stderr
    assert socket.gethostname() in errors[0]
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 2000  # untouched by the refused run
    # a stale lock (its process killed) is taken over
    wait_until(lambda: complete_checkpoints(run_dir), first)
    first.send_signal(signal.SIGKILL)
    first.wait()
    third = run(train_cmd(mnist_shards, run_dir, *NO_CLUSTERS, "--train.steps", "30", "--train.ckpt_every", "25",
                          "--log.wandb", "off", "--data.workers", "0"), check=True)
    assert "took over the run dir lock" in third.stderr and "its process has ended" in third.stderr
    assert not (run_dir / ".lock").exists()  # released at the end


def test_lock_of_another_host_is_kept_unless_same_slurm_job_or_forced(mnist_shards, tmp_path):
    """A live owner elsewhere (fresh heartbeat) refuses; a requeued SLURM job (same id) or
    --train.force_unlock takes over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = {"host": "node-elsewhere", "pid": 1, "slurm_job_id": "777", "token": "t", "heartbeat": time.time()}
    (run_dir / ".lock").write_text(json.dumps(lock))
    cmd = train_cmd(mnist_shards, run_dir, "--train.steps", "2", "--log.wandb", "off", "--data.workers", "0")
    refused = run(cmd, env={"SLURM_JOB_ID": "778"})
    assert refused.returncode == 1 and "node-elsewhere" in refused.stderr and "SLURM job 777" in refused.stderr
    requeued = run(cmd, env={"SLURM_JOB_ID": "777"}, check=True)
    assert "same SLURM job (requeued)" in requeued.stderr
    (run_dir / ".lock").write_text(json.dumps(lock))
    forced = run([*cmd, "--train.steps", "3", "--train.force_unlock"], check=True)
    assert "--train.force_unlock" in forced.stderr


@pytest.mark.parametrize("args,expected", [
    (["--train.batch_size", "0"], ["--train.batch_size 0: must be at least 1"]),
    (["--train.steps", "-1"], ["--train.steps -1: must be at least 1"]),
    (["--train.grad_accum", "0", "--train.log_every", "0"], ["--train.grad_accum 0", "--train.log_every 0"]),
    (["--data.workers", "-1"], ["--data.workers -1"]),
    (["--optim.lr", "0"], ["--optim.lr 0.0: must be positive"]),
    (["--model.ema_decay", "1.5"], ["--model.ema_decay 1.5"]),
    (["--train.keep_last", "0"], ["--train.keep_last 0"]),
])
def test_impossible_values_are_one_line_each_and_create_nothing(mnist_shards, tmp_path, args, expected):
    run_dir = tmp_path / "never"
    proc = run(train_cmd(mnist_shards, run_dir, *args), timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == len(expected) and all(l.startswith("error: ") and e in l for l, e in zip(lines, expected)), lines
    assert not run_dir.exists()


def test_image_size_the_architecture_cannot_take_is_refused_before_any_folder(tmp_path):
    from PIL import Image
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.new("RGB", (36, 36), (i * 60, 0, 0)).save(tmp_path / "imgs" / f"{i}.png")
    run(["-m", "data_prep", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "shards"), "--size", "36"],
        check=True)
    proc = run(["-m", "jobs.train", "--data", str(tmp_path / "shards"), "--train.run_dir", str(tmp_path / "never")],
               timeout=120)
    assert proc.returncode == 1 and proc.stderr.count("error:") == 1 and "image size 36" in proc.stderr
    assert not (tmp_path / "never").exists()


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (root only); yields a function that mounts it with a given size."""
    mounted = []

    def mount(size_kb):
        target = tmp_path / f"full{len(mounted)}"
        target.mkdir()
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(target)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
        mounted.append(target)
        return target
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    yield mount
    for target in mounted:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_disk_full_during_training_is_one_line_and_keeps_the_last_checkpoint(mnist_shards, tmp_path, tmpfs):
    args = ["--train.steps", "4", "--train.ckpt_every", "2", "--train.sample_every", "1000", "--log.wandb", "off",
            "--data.workers", "0"]
    run(train_cmd(mnist_shards, tmp_path / "probe", *args), check=True)
    from gen.checkpoint import folder_bytes
    ckpt_kb = folder_bytes(tmp_path / "probe/checkpoints/checkpoint-0000002") // 1024
    disk = tmpfs(int(ckpt_kb * 1.6) + 64)  # the first checkpoint fits, the second does not
    run_dir = disk / "run"
    proc = run(train_cmd(mnist_shards, run_dir, *args))
    errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert "disk full" in errors[0] and str(run_dir / "checkpoints") in errors[0] and "MiB" in errors[0]
    assert "checkpoint-0000002 is intact" in errors[0]
    assert "Traceback" not in proc.stderr
    found = complete_checkpoints(run_dir)
    assert [s for s, _ in found] == [2]
    for f in found[0][1].glob("*.safetensors"):
        load_file(f)
    assert not list((run_dir / "checkpoints").glob(".tmp-*")) and not list(run_dir.rglob(".*.tmp*"))


def test_disk_full_during_prep_is_one_line_and_leaves_no_partial_files(mnist_shards, tmp_path, tmpfs):
    src = Path(mnist_shards).parent / "idx"
    disk = tmpfs(200)  # two shards (80 KiB each, tar blocks) and their records fit, the third does not
    out = disk / "shards"
    proc = run(["-m", "data_prep", "mnist", "--source", str(src), "--out", str(out), "--shard-size", "24"])
    assert proc.returncode == 1 and proc.stderr.count("error:") == 1, proc.stderr[-2000:]
    assert "disk full" in proc.stderr and str(out) in proc.stderr and "Traceback" not in proc.stderr
    assert not list(out.glob(".*.partial")) and not list(out.glob(".*.tmp*"))
    # the shards recorded as finished are whole: a re-run with space keeps them, writes the rest
    recorded = sorted(json.loads((out / ".progress.json").read_text())["shards"])
    assert recorded
    bigger = tmp_path / "bigger"
    shutil.copytree(out, bigger)
    mtimes = {n: (bigger / n).stat().st_mtime_ns for n in recorded}
    run(["-m", "data_prep", "mnist", "--source", str(src), "--out", str(bigger), "--shard-size", "24"], check=True)
    assert {n: (bigger / n).stat().st_mtime_ns for n in recorded} == mtimes  # kept, not written again
    splits = json.loads((bigger / "manifest.json").read_text())["splits"]
    assert (splits["train"]["count"], splits["test"]["count"]) == (240, 60)
    run(["-m", "data_prep", "verify", str(bigger)], check=True)


def test_diverging_gan_stops_clearly(mnist_shards, tmp_path):
    """D without spectral norm or R1 and with a huge learning rate wins outright (BCE loss): the
    losses explode without becoming NaN. The run stops (exit 3) instead of saving a diverged model.
    Pinned to the residual D, which this recipe makes win within 200 steps at the tests' tiny sizes."""
    run_dir = tmp_path / "run"
    proc = run(train_cmd(mnist_shards, run_dir, "--model.arch", "deep", "--model.no-spectral-norm", "--model.r1_gamma", "0",
                         "--model.gan_loss", "nonsat", "--optim.lr_d", "0.05", "--optim.lr",
                         "1e-6", "--train.steps", "200", "--train.check_every", "2", "--train.ckpt_every", "100",
                         "--model.diffaug", "--log.wandb", "off", "--data.workers", "0"))
    assert proc.returncode == 3, proc.stderr[-2000:]
    line = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert len(line) == 1 and "training diverged" in line[0] and "Last good checkpoint" in line[0]
    assert not complete_checkpoints(run_dir) or complete_checkpoints(run_dir)[0][0] < 200


def test_resume_after_a_torn_checkpoint_keeps_each_step_once_in_metrics(mnist_shards, tmp_path):
    args = ["--train.steps", "10", "--train.ckpt_every", "5", "--train.log_every", "1", "--log.wandb", "off",
            "--data.workers", "0"]
    run_dir = tmp_path / "run"
    run(train_cmd(mnist_shards, run_dir, *args), check=True)
    (run_dir / "checkpoints/checkpoint-0000010/meta.json").unlink()  # torn: resume from step 5
    moved = tmp_path / "moved"
    shutil.move(run_dir, moved)  # and the folder moved: errors must name where it is now
    again = run(train_cmd(mnist_shards, moved, *args), check=True)
    assert "checkpoint-0000005" in again.stderr
    assert [m["step"] for m in metrics(moved)] == list(range(1, 11))
    bad = run(train_cmd(mnist_shards, moved, *args, "--model.latent_dim", "7", "--train.steps", "20"))
    assert bad.returncode == 1 and str(moved / "checkpoints/checkpoint-0000010") in bad.stderr


def test_symlink_loops_and_broken_links_are_listed_as_skipped(tmp_path):
    from PIL import Image
    src = tmp_path / "imgs" / "cats"
    src.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (16, 16), (i * 80, 10, 10)).save(src / f"{i}.png")
    (src / "loop.png").symlink_to("loop.png")
    (src / "gone.png").symlink_to("missing.png")
    run(["-m", "data_prep", "folder", str(tmp_path / "imgs"), "--out", str(tmp_path / "shards")], check=True)
    skipped = json.loads((tmp_path / "shards/manifest.json").read_text())["skipped"]
    assert {(s["name"], s["reason"]) for s in skipped} == {("cats/loop.png", "symlink loop"),
                                                          ("cats/gone.png", "broken symlink")}
