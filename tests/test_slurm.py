"""slurm/ against the real local SLURM (.ci/run starts it with ../shared/slurm/start-local-slurm.sh):
real sbatch, srun tasks, USR2 preemption as submitit sends it, requeue, arrays."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from helpers import (NO_CLUSTERS, ROOT, TINY, assert_same, job_running, launch2, logs, metrics, run, state_files, submit,
                     train_args, wait_done, wait_for_step)

pytestmark = [pytest.mark.slurm,
              pytest.mark.skipif(shutil.which("sbatch") is None or subprocess.run(["sinfo"], capture_output=True).returncode,
                                 reason="no SLURM here: run ../shared/slurm/start-local-slurm.sh")]


def test_two_tasks_on_one_node_train_with_ddp(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    (job,), out = submit("--partition", "debug", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "60",
                         "--", *train_args(mnist_shards, run_dir, 8, "--train.sample_every", "4", *NO_CLUSTERS))
    assert f"run dir {run_dir}" in out and "logs:" in out
    assert wait_done(job) == ("COMPLETED", 0), logs(run_dir)[-3000:]
    assert (run_dir / "samples/step-0000008.png").is_file()
    ckpt = run_dir / "checkpoints/checkpoint-0000008"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()  # 2 ranks
    assert metrics(run_dir)[-1]["perf/img_per_s"] > 0


def test_preemption_checkpoints_requeues_and_matches_an_uninterrupted_run(mnist_shards, tmp_path):
    steps = 90  # the USR2 lands at step ~10-30 (25 on a busy machine): far from the end
    extra = ["--train.log_every", "5", "--train.ckpt_every", "1000", "--train.sample_every", "1000"]
    reference = tmp_path / "reference"
    # the uninterrupted reference runs beside the job (it mostly waits: for SLURM, the requeue)
    ref = subprocess.Popen([sys.executable, *launch2(), "-m", "jobs.train",
                            *train_args(mnist_shards, reference, steps, *extra)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                           env=dict(os.environ, WANDB_MODE="offline"))

    run_dir = tmp_path / "preempted"
    # timeout >= 60 min: below ~50, submitit counts every USR2 as a timeout (../shared/slurm/README.md)
    (job,), _ = submit("--partition", "debug", "--tasks-per-node", "2", "--cpus-per-task", "1", "--time", "60",
                       "--", *train_args(mnist_shards, run_dir, steps, *extra))
    wait_for_step(run_dir, 10, job_running(job, run_dir), timeout=180)
    subprocess.run(["scancel", "--signal=USR2", str(job)], check=True)  # what submitit's job._interrupt() sends
    state, restarts = wait_done(job, timeout=400)
    text = logs(run_dir)
    assert (state, restarts) == ("COMPLETED", 1), text[-3000:]
    saved = re.search(r"stop signal: checkpoint saved at step (\d+)", text)
    assert saved and 10 <= int(saved.group(1)) < steps, text[-3000:]
    assert f"checkpoint-{int(saved.group(1)):07d} at step {saved.group(1)}" in text  # resumed, not restarted
    assert [m["step"] for m in metrics(run_dir)][-1] == steps
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]
    assert_same(state_files(reference / f"checkpoints/checkpoint-{steps:07d}"),
                state_files(run_dir / f"checkpoints/checkpoint-{steps:07d}"))


def test_array_of_two_finishes_both(mnist_shards, tmp_path):
    grid = tmp_path / "grid.json"
    grid.write_text(json.dumps({"preset": ["gan", "vae"]}))
    run_dir = tmp_path / "sweep"
    jobs, out = submit("--partition", "debug", "--time", "60", "--array", str(grid), "--array-parallelism", "2",
                       "--", "--data", str(mnist_shards), "--train.run_dir", str(run_dir), *TINY,
                       "--train.steps", "3", "--log.wandb", "off", "--data.workers", "0")
    assert len(jobs) == 2 and all("_" in j for j in re.findall(r"submitted job (\S+):", out))
    for j in re.findall(r"submitted job (\S+):", out):
        assert wait_done(j)[0] == "COMPLETED", logs(run_dir)[-3000:]
    for name, family in (("preset=gan", "gan"), ("preset=vae", "vae")):
        cfg = json.loads((run_dir / name / "config.json").read_text())
        assert cfg["model"]["family"] == family and (run_dir / name / "checkpoints/checkpoint-0000003").is_dir()


def test_dry_run_prints_the_sbatch_script(mnist_shards, tmp_path):
    proc = run(["-m", "slurm.submit", "--dry-run", "--partition", "gpu", "--nodes", "2", "--gpus-per-node", "4",
                "--account", "lab", "--qos", "high", "--constraint", "a100", "--exclude", "n1", "--mem-gb", "64",
                "--slurm-param", "reservation=ml", "--time", "1440", "--",
                "--data", str(mnist_shards), "--train.run_dir", str(tmp_path / "r")], check=True)
    for line in ("--partition=gpu", "--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4", "--account=lab",
                 "--qos=high", "--constraint=a100", "--exclude=n1", "--mem=64GB", "--reservation=ml",
                 "--time=1440", "--signal=USR2@90"):
        assert f"#SBATCH {line}" in proc.stdout, line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("args,message", [
    (["--partition", "no-such-partition"], "does not exist"),
    (["--gpus-per-node", "4", "--tasks-per-node", "2"], "conflicts"),
    (["--cluster", "local", "--nodes", "2"], "--nodes must be 1"),
])
def test_bad_launch_options_are_one_line_errors(mnist_shards, tmp_path, args, message):
    proc = run(["-m", "slurm.submit", *args, "--", "--data", str(mnist_shards), "--train.run_dir", str(tmp_path / "r")])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and message in proc.stderr


def test_missing_sbatch_is_a_one_line_error(mnist_shards, tmp_path):
    env = {"PATH": os.path.dirname(sys.executable)}
    proc = run(["-m", "slurm.submit", "--", "--data", str(mnist_shards)], env=env)
    assert proc.returncode == 2 and "sbatch not found" in proc.stderr and "Traceback" not in proc.stderr


def test_local_cluster_runs_without_slurm(mnist_shards, tmp_path):
    run_dir = tmp_path / "local"
    proc = run(["-m", "slurm.submit", "--cluster", "local", "--time", "10", "--",
                *train_args(mnist_shards, run_dir, 3, "--data.workers", "0")], check=True)
    job = re.search(r"submitted job (\S+):", proc.stdout).group(1)
    deadline = time.time() + 180
    while not (run_dir / "checkpoints/checkpoint-0000003/meta.json").is_file():
        assert time.time() < deadline, logs(run_dir)[-3000:]
        time.sleep(1)
    assert job
