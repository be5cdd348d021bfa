"""Submit deepgen training to SLURM with submitit; the job checkpoints and requeues itself on
timeout or preemption and resumes from its newest checkpoint (same W&B run).

    python -m slurm.submit --partition gpu --nodes 2 --gpus-per-node 4 --time 1440 -- \\
        --preset gan --data /scratch/me/pokemon --train.run_dir /scratch/me/runs/poke-gan
    python -m slurm.submit --array sweep.yaml --array-parallelism 4 -- --train.steps 20000
    python -m slurm.submit --dry-run -- --preset vae --data data/mnist   # print the sbatch script
    python -m slurm.submit --cluster local --tasks-per-node 2 -- ...     # no SLURM: run here

Everything after `--` goes to the training job (see `python -m jobs.train --help`).
"""
import argparse
import itertools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import submitit

from gen.cli import command
from gen.errors import UserError
from gen.run_dir import RunDir

from .task import TrainTask


def build_parser():
    p = argparse.ArgumentParser(prog="python -m slurm.submit", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cluster", choices=("slurm", "local"), default="slurm",
                   help="slurm: sbatch; local: submitit's local executor (no SLURM)")
    p.add_argument("--partition", default=None)
    p.add_argument("--account", default=None)
    p.add_argument("--qos", default=None)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU")
    p.add_argument("--tasks-per-node", type=int, default=None, help="CPU-only jobs: DDP processes per node")
    p.add_argument("--cpus-per-task", type=int, default=None)
    p.add_argument("--mem-gb", type=int, default=None, help="memory per node")
    p.add_argument("--time", type=int, default=240, dest="time_min", help="time limit in minutes")
    p.add_argument("--constraint", default=None)
    p.add_argument("--exclude", default=None)
    p.add_argument("--job-name", default="deepgen")
    p.add_argument("--slurm-param", action="append", default=[], metavar="KEY=VALUE",
                   help="extra #SBATCH parameter, repeatable (e.g. reservation=ml)")
    p.add_argument("--max-requeues", type=int, default=20, help="preemptions/timeouts before giving up")
    p.add_argument("--logs", default=None, help="submitit folder (default RUN_DIR/slurm); %%j is the job id")
    p.add_argument("--array", default=None, metavar="GRID.yaml|json",
                   help="sweep: {option: [values]}, one array element per combination")
    p.add_argument("--array-parallelism", type=int, default=8, help="array elements running at once")
    p.add_argument("--dry-run", action="store_true", help="print the sbatch script, submit nothing")
    return p


class SubmitError(UserError):
    """A job that cannot be submitted as asked (nothing was submitted)."""
    exit_code = 2


def split_argv(argv):
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def load_grid(path):
    """[(name, extra training args)] for every combination of the grid's values."""
    text = Path(path).read_text()
    if str(path).endswith((".yaml", ".yml")):
        import yaml
        grid = yaml.safe_load(text)
    else:
        grid = json.loads(text)
    if not isinstance(grid, dict) or not grid or not all(isinstance(v, list) and v for v in grid.values()):
        raise SubmitError(f"{path}: expected a mapping of option -> non-empty list of values")
    keys = list(grid)
    runs = []
    for values in itertools.product(*(grid[k] for k in keys)):
        args, name = [], []
        for k, v in zip(keys, values):
            flag = k if k.startswith("--") else f"--{k}"
            args += [flag, str(v)]
            name.append(f"{k.lstrip('-').split('.')[-1]}={Path(str(v)).name}")
        runs.append(("_".join(name), args))
    return runs


def run_dir_of(train_args):
    from gen.config import parse
    return parse(train_args).train.run_dir


def check_options(opts):
    if opts.gpus_per_node and opts.tasks_per_node and opts.tasks_per_node != opts.gpus_per_node:
        raise SubmitError("--tasks-per-node conflicts with --gpus-per-node (one task per GPU)")
    if opts.cluster == "local" and opts.nodes > 1:
        raise SubmitError("--cluster local runs on this machine: --nodes must be 1")
    if opts.cluster == "local" and opts.array and opts.dry_run:
        raise SubmitError("--dry-run prints an sbatch script: it needs --cluster slurm")
    for kv in opts.slurm_param:
        if "=" not in kv:
            raise SubmitError(f"--slurm-param {kv!r}: expected KEY=VALUE")
    if opts.cluster == "slurm" and not opts.dry_run:
        if shutil.which("sbatch") is None:
            raise SubmitError("sbatch not found: this is not a SLURM login node (use --cluster local to run here)")
        if opts.partition:
            out = subprocess.run(["sinfo", "-h", "-p", opts.partition, "-o", "%P"], capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                known = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True).stdout.replace("*", "").split()
                raise SubmitError(f"partition {opts.partition!r} does not exist (known: {', '.join(known) or 'none'})")


def make_executor(opts, folder):
    tasks = opts.gpus_per_node or opts.tasks_per_node or 1
    executor = submitit.AutoExecutor(folder=folder, cluster=None if opts.cluster == "slurm" else "local",
                                     slurm_max_num_timeout=opts.max_requeues)
    params = dict(name=opts.job_name, nodes=opts.nodes, tasks_per_node=tasks, timeout_min=opts.time_min,
                  gpus_per_node=opts.gpus_per_node or None)
    if opts.cpus_per_task:
        params["cpus_per_task"] = opts.cpus_per_task
    if opts.mem_gb:
        params["mem_gb"] = opts.mem_gb
    if opts.cluster == "slurm":
        extra = dict(kv.split("=", 1) for kv in opts.slurm_param)
        params.update(slurm_partition=opts.partition, slurm_account=opts.account, slurm_qos=opts.qos,
                      slurm_constraint=opts.constraint, slurm_exclude=opts.exclude,
                      slurm_additional_parameters=extra or None, slurm_array_parallelism=opts.array_parallelism)
    executor.update_parameters(**{k: v for k, v in params.items() if v is not None})
    return executor


def sbatch_script(executor, folder):
    from submitit.slurm.slurm import _make_sbatch_string
    inner = executor._executor
    command = " ".join(inner._submitit_command_str.split()) if hasattr(inner, "_submitit_command_str") else "python -m submitit.core._submit"
    return _make_sbatch_string(command=command, folder=folder, **inner.parameters)


def submit(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    launcher_argv, train_args = split_argv(argv)
    opts = build_parser().parse_args(launcher_argv)
    check_options(opts)
    runs = load_grid(opts.array) if opts.array else [(None, [])]
    base_dir = Path(run_dir_of(train_args))
    tasks, run_dirs = [], []
    for name, extra in runs:
        args = train_args + extra
        if name:
            run_dir = base_dir / name
            args += ["--train.run_dir", str(run_dir)]
        else:
            run_dir = base_dir
        run_dir_of(args)  # a bad training option fails here, on the login node
        tasks.append(TrainTask(args, opts.max_requeues))
        run_dirs.append(run_dir)
    folder = opts.logs or str(RunDir(base_dir).slurm_logs)
    executor = make_executor(opts, folder)
    if opts.dry_run:
        print(sbatch_script(executor, folder))
        print(f"# {len(tasks)} job(s); training args: {' '.join(tasks[0].train_args)}")
        return []
    if len(tasks) == 1:
        jobs = [executor.submit(tasks[0])]
    else:
        with executor.batch():
            jobs = [executor.submit(t) for t in tasks]
    for job, run_dir in zip(jobs, run_dirs):
        print(f"submitted job {job.job_id}: run dir {run_dir}")
        print(f"  logs: {job.paths.stdout} / {job.paths.stderr}")
    return jobs


@command
def main(argv=None):
    try:
        submit(argv)
    except submitit.core.utils.FailedJobError as e:  # sbatch refused the job
        raise SubmitError(f"sbatch failed: {str(e).strip().splitlines()[-1]}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
