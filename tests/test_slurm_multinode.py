"""A multi-node job on two real SLURM nodes (../shared/slurm/start-local-slurm-2nodes.sh: two
slurmd in their own network namespaces). .ci/run runs this module with that cluster up, before
switching to the single-node cluster for the rest; elsewhere it is skipped."""
import re
import subprocess

import pytest

from helpers import job_running, logs, submit, train_args, wait_done, wait_for_step


def _nodes():
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True, timeout=10).stdout
        return int(out.split()[0]) if out.split() else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


pytestmark = [pytest.mark.slurm, pytest.mark.skipif(_nodes() < 2, reason="needs the 2-node local SLURM")]


def test_two_nodes_train_one_ddp_job_and_survive_preemption(mnist_shards, tmp_path):
    run_dir = tmp_path / "run"
    (job,), _ = submit("--partition", "debug", "--nodes", "2", "--tasks-per-node", "1", "--time", "60", "--",
                       *train_args(mnist_shards, run_dir, 120, "--train.log_every", "5"))
    wait_for_step(run_dir, 10, job_running(job, run_dir), timeout=180)
    subprocess.run(["scancel", "--signal=USR2", str(job)], check=True)
    assert wait_done(job, timeout=400) == ("COMPLETED", 1), logs(run_dir)[-3000:]
    text = logs(run_dir)
    assert "hostname=node1" in text and "hostname=node2" in text and "global_rank=1(2)" in text
    saved = int(re.search(r"stop signal: checkpoint saved at step (\d+)", text).group(1))
    assert f"at step {saved}" in text.split("stop signal")[-1]  # the requeued job resumed there
    ckpt = run_dir / "checkpoints/checkpoint-0000120"
    assert (ckpt / "random_states_0.pkl").is_file() and (ckpt / "random_states_1.pkl").is_file()
