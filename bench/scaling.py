"""The numbers behind docs/scaling.md: measured throughput per rank, gradient bytes per step, and a
model of step time on 1-64 GPUs.

    python bench/scaling.py [--steps 60] [--no-slurm] [--gpu-img-s gan=1929,vae=4421] [--gpu-batch 128]

1. Measured here (CPU, gloo): images/s per rank of `jobs.train` (presets gan and vae at the
   README's CPU settings, MNIST) with 1 process, with 2 processes (`accelerate launch`), and, when
   `sinfo` shows 2 nodes (../shared/slurm/start-local-slurm-2nodes.sh), as one job on 2 SLURM nodes.
2. Gradient bytes all-reduced per optimizer step, per preset and image size (fp32 gradients:
   DDP reduces in the parameters' dtype, also under bf16 autocast).
3. The model: compute time per step from one GPU's measured images/s (--gpu-img-s; default: the
   NVIDIA H200 figures of bench/gpu_step.sh, bf16, batch 128, 64 px), ring all-reduce of each
   phase's gradients (GAN: D's in D's phase, G's in G's), overlapped with that phase's backward
   except for the last bucket; NVLink inside a node of 8, the node's network link across nodes.
   Prints step time, scaling efficiency (also with --train.ddp_comm_hook bf16: half the bytes) and
   the read bandwidth per node the loader must supply. A faster step exposes more of the
   all-reduce: --gpu-img-s gan=19290,vae=44210 models the 10x step issue 36 aims at.
"""
import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
from gen.run_dir import RunDir  # noqa: E402 (after the path is set)

GPUS_PER_NODE = 8
NVLINK_BUS_GBPS = 300.0       # GB/s, effective all-reduce bus bandwidth inside an H100/H200 node (NCCL)
LATENCY_INTRA_S = 5e-6        # per ring hop
LATENCY_INTER_S = 20e-6
LINK_EFFICIENCY = 0.8         # of the nominal network rate that NCCL reaches
BACKWARD_SHARE = 2 / 3        # of a phase's compute: the part an all-reduce can hide behind
D_PHASE_SHARE = 0.5           # GAN: D's phase of the step's compute (D fwd/bwd on real + fake)


def train_args(shards, run_dir, preset, steps):
    """jobs.train at the README's CPU settings, logging every 10 steps, no checkpoint or grid on the way."""
    return ["--preset", preset, "--data", str(shards), "--train.run_dir", str(run_dir), "--model.width", "16",
            "--train.batch_size", "64", "--train.steps", str(steps), "--train.log_every", "10", "--log.wandb", "off",
            "--train.ckpt_every", str(10 * steps), "--train.sample_every", str(10 * steps)]


def cpu_run(shards, run_dir, preset, steps, ranks):
    cmd = [sys.executable, "-m", "jobs.train"] if ranks == 1 else \
          [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(ranks),
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
           "-m", "jobs.train"]
    cmd += train_args(shards, run_dir, preset, steps)
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return per_rank_rate(run_dir, ranks)


def per_rank_rate(run_dir, ranks):
    rows = RunDir(run_dir).read_metrics()
    rates = [r["perf/img_per_s"] for r in rows if "perf/img_per_s" in r][1:]  # the first window holds start-up
    return sum(rates) / len(rates) / ranks


def slurm_nodes():
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%D"], capture_output=True, text=True, timeout=10).stdout.split()
        return int(out[0]) if out else 0
    except (OSError, ValueError, subprocess.TimeoutExpired):
        return 0


def slurm_run(shards, run_dir, preset, steps):
    # --cpus-per-task 1: the two local "nodes" share this machine's cores (a real node has its own)
    args = ["--partition", "debug", "--nodes", "2", "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "60", "--",
            *train_args(shards, run_dir, preset, steps)]
    out = subprocess.run([sys.executable, "-m", "slurm.submit", *args], check=True, capture_output=True, text=True,
                         cwd=ROOT).stdout
    job = re.search(r"submitted job (\d+)", out).group(1)
    deadline = time.time() + 900
    while time.time() < deadline:
        state = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
        if re.search(r"JobState=(COMPLETED|FAILED|CANCELLED|TIMEOUT)", state):
            break
        time.sleep(2)
    return per_rank_rate(run_dir, 2)


def gradient_bytes():
    """{(preset, size): {module: bytes}} for the presets that build at that size."""
    from gen.config import PRESETS
    from gen.errors import UserError
    from gen.families import build_family
    out = {}
    for preset in ("gan", "vae", "seed-gan", "seed-vae"):
        for size, channels in ((28, 1), (64, 3), (128, 3)):
            cfg = PRESETS[preset]
            try:
                family = build_family(cfg.model, cfg.optim, (channels, size, size), 0)
            except UserError:
                continue  # the seed ports are 28 px models
            out[preset, size] = {name: 4 * sum(p.numel() for p in m.parameters() if p.requires_grad)
                                 for name, m in family.modules.items()}
    return out


def allreduce_s(nbytes, gpus, link_gbps):
    """Ring all-reduce: each GPU sends and receives 2 (N-1)/N of the bytes, over NVLink inside a
    node and over the node's network link (one per node) once the ring leaves it."""
    if gpus == 1:
        return 0.0
    if gpus <= GPUS_PER_NODE:
        return 2 * (gpus - 1) / gpus * nbytes / (NVLINK_BUS_GBPS * 1e9) + 2 * (gpus - 1) * LATENCY_INTRA_S
    return 2 * (gpus - 1) / gpus * nbytes / (link_gbps / 8 * 1e9 * LINK_EFFICIENCY) + 2 * (gpus - 1) * LATENCY_INTER_S


def step_time(compute_s, phases, gpus, link_gbps, bucket_mb=25, grad_accum=1):
    """(step seconds, exposed communication seconds) for one optimizer step of grad_accum
    micro-batches; `phases` = [(share of compute, gradient bytes)]. Only the last micro-batch's
    backward overlaps the all-reduce (accumulation runs under no_sync)."""
    exposed = 0.0
    for share, nbytes in phases:
        comm = allreduce_s(nbytes, gpus, link_gbps)
        last_bucket = comm * min(1.0, bucket_mb * 2**20 / nbytes)
        exposed += max(comm - BACKWARD_SHARE * share * compute_s, last_bucket)
    return grad_accum * compute_s + exposed, exposed


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--no-slurm", action="store_true")
    p.add_argument("--skip-measure", action="store_true", help="only the gradient sizes and the model")
    p.add_argument("--gpu-img-s", default="gan=1929,vae=4421", help="one GPU's images/s per preset (64 px)")
    p.add_argument("--gpu-batch", type=int, default=128)
    p.add_argument("--bytes-per-image", type=float, default=7600, help="shard bytes per 64 px sample")
    args = p.parse_args()

    if not args.skip_measure:
        from bench_prep import make_digit_idx
        with tempfile.TemporaryDirectory() as tmp:
            make_digit_idx(Path(tmp) / "idx", n_train=5000, n_test=100)
            shards = Path(tmp) / "shards"
            subprocess.run([sys.executable, "-m", "data_prep", "mnist", "--source", f"{tmp}/idx", "--out", str(shards)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            print(f"## Measured on this machine ({os.cpu_count()} cores, CPU, gloo): images/s per rank\n")
            print("| preset | 1 rank | 2 ranks (1 node) | 2 nodes (SLURM) |")
            print("|---|---|---|---|")
            slurm = not args.no_slurm and slurm_nodes() >= 2
            for preset in ("gan", "vae"):
                one = cpu_run(shards, Path(tmp) / f"{preset}-1", preset, args.steps, 1)
                two = cpu_run(shards, Path(tmp) / f"{preset}-2", preset, args.steps, 2)
                nodes = slurm_run(shards, Path(tmp) / f"{preset}-slurm", preset, args.steps) if slurm else None
                print(f"| {preset} | {one:,.0f} | {two:,.0f} ({two / one:.2f}x of 1) | "
                      + (f"{nodes:,.0f} ({nodes / one:.2f}x of 1) |" if nodes else "not run (no 2-node SLURM) |"))
            print("\n(the 2 ranks and the 2 SLURM nodes share this machine's cores)\n")

    sizes = gradient_bytes()
    print("## Gradient bytes all-reduced per optimizer step (fp32)\n")
    print("| preset | 28 px | 64 px | 128 px |")
    print("|---|---|---|---|")
    for preset in ("gan", "vae", "seed-gan", "seed-vae"):
        cells = []
        for size in (28, 64, 128):
            mods = sizes.get((preset, size))
            cells.append(" + ".join(f"{k} {v / 2**20:.1f}" for k, v in mods.items()) + " MiB" if mods else "-")
        print(f"| {preset} | " + " | ".join(cells) + " |")

    gpu = dict((k, float(v)) for k, v in (kv.split("=") for kv in args.gpu_img_s.split(",")))
    print(f"\n## Model: one optimizer step, batch {args.gpu_batch} per GPU, 64 px, bf16; compute from one GPU's "
          f"measured images/s ({', '.join(f'{k} {v:,.0f}' for k, v in gpu.items())})\n")
    for preset in ("gan", "vae"):
        mods = sizes[preset, 64]
        compute = args.gpu_batch / gpu[preset]
        phases = [(D_PHASE_SHARE, mods["D"]), (1 - D_PHASE_SHARE, mods["G"])] if preset == "gan" else [(1.0, mods["vae"])]
        print(f"### {preset}: {compute * 1e3:.1f} ms compute per step, {sum(mods.values()) / 2**20:.1f} MiB of gradients\n")
        print("| GPUs | 25 Gb/s: step ms (efficiency) | 100 Gb/s | 400 Gb/s | 25 Gb/s, grad_accum 4 "
              "| 25 Gb/s, bf16 all-reduce | read MB/s per node |")
        print("|---|---|---|---|---|---|---|")
        for gpus in (1, 2, 4, 8, 16, 32, 64):
            cells = []
            for link in (25, 100, 400):
                t, _ = step_time(compute, phases, gpus, link)
                cells.append(f"{t * 1e3:.1f} ({compute / t:.0%})")
            t4, _ = step_time(compute, phases, gpus, 25, grad_accum=4)
            cells.append(f"{t4 / 4 * 1e3:.1f} per micro-batch ({4 * compute / t4:.0%})")
            # --train.ddp_comm_hook bf16: the gradients cross the network as bf16, half the bytes
            tb, _ = step_time(compute, [(share, nbytes / 2) for share, nbytes in phases], gpus, 25)
            cells.append(f"{tb * 1e3:.1f} ({compute / tb:.0%})")
            t100, _ = step_time(compute, phases, gpus, 100)
            per_node = min(gpus, GPUS_PER_NODE) * args.gpu_batch / t100 * args.bytes_per_image / 1e6
            cells.append(f"{per_node:,.0f}")
            print(f"| {gpus} | " + " | ".join(cells) + " |")
        print()


if __name__ == "__main__":
    main()
