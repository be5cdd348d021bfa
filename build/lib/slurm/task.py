"""The job submitit runs: training under SLURM, handing preemption back to submitit."""
import os
import signal
import sys
import time

import submitit


class TrainTask(submitit.helpers.Checkpointable):
    """The callable submitit runs on every task. `checkpoint()` (called by submitit on global
    rank 0 when the preemption/timeout signal arrives) returns a fresh task with the same
    arguments: the requeued job resumes through `--train.resume auto`."""

    def __init__(self, train_args, max_requeues=20, requeues=0):
        self.train_args = list(train_args)
        self.max_requeues, self.requeues = max_requeues, requeues

    def __call__(self):
        # lazy imports: the login node only pickles this object
        from gen.cli import configure_logging, end_process_group, error
        from gen.config import parse
        from gen.errors import UserError
        from gen.train import train

        configure_logging()
        env = submitit.JobEnvironment()
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus and "OMP_NUM_THREADS" not in os.environ:
            # torch (and Accelerate, from the node's core count) would give every task threads for
            # every core it can see, which without cgroups is the whole node; SLURM states this
            # task's share (the environment variable also stops Accelerate's override)
            os.environ["OMP_NUM_THREADS"] = cpus
            import torch
            torch.set_num_threads(int(cpus))
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cfg = parse(self.argv())
        try:
            result = train(cfg)
        except UserError as e:  # one line in the job's log, as on the command line; the job fails
            error(e)
            end_process_group()
            sys.exit(e.exit_code)
        if result.stopped_by is not None:
            self._hand_over_to_submitit(env, result.stopped_by)
        return {"step": result.step, "run_dir": result.run_dir, "checkpoint": result.checkpoint,
                "requeues": self.requeues}

    def argv(self):
        """jobs.train's arguments for this start: the user's on the first (their --train.resume:
        auto, none, restart or a path, by the same rule as on the command line); `auto` on every
        requeue, by submitit (a checkpoint() copy) or by SLURM itself (a node failure, `scontrol
        requeue`: the original task, started again with SLURM_RESTART_COUNT > 0), so a requeued job
        continues its own run and never starts it over."""
        requeued = self.requeues > 0 or int(os.environ.get("SLURM_RESTART_COUNT") or 0) > 0
        return self.train_args + (["--train.resume", "auto"] if requeued else [])

    def _hand_over_to_submitit(self, env, signum):
        """Every rank has saved. Rank 0 now runs submitit's own handler for the signal
        (checkpoint() + scontrol requeue + exit); the others wait to be stopped by the requeue."""
        handler = signal.getsignal(signum)
        if env.global_rank == 0 and callable(handler) and signum != signal.SIGTERM:
            handler(signum, None)
        time.sleep(600)  # SIGTERM (scontrol requeue, scancel): SLURM ends the job itself
        raise RuntimeError(f"stopped by signal {signum} but the job was not requeued")

    def checkpoint(self, *args, **kwargs):
        if self.requeues >= self.max_requeues:
            return None  # submitit then ends the job instead of requeueing
        return submitit.helpers.DelayedSubmission(TrainTask(self.train_args, self.max_requeues, self.requeues + 1))
