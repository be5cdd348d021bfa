"""Samples, latent interpolations and (VAE) reconstructions from a trained run.

    python -m jobs.sample runs/quickstart-gan --out runs/quickstart-gan/final
    python -m jobs.sample runs/pokemon-vae/checkpoints/checkpoint-0020000 --n 100 --seed 3

The model is rebuilt from the checkpoint and its saved config alone (EMA weights when kept).
Writes samples.png, interpolations.png and, for a VAE, reconstructions.png (real vs decoded).
"""
import argparse
import sys
from pathlib import Path

import torch


def main(argv=None):
    from gen.checkpoint import CheckpointError
    from gen.sample import load_generator, save_grid, slerp
    p = argparse.ArgumentParser(prog="python -m jobs.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (newest checkpoint) or a checkpoint folder")
    p.add_argument("--out", default=None, help="output folder (default RUN/final)")
    p.add_argument("--n", type=int, default=64, help="samples in the grid")
    p.add_argument("--steps", type=int, default=10, help="interpolation steps per row")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        g = load_generator(args.run)
    except (CheckpointError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = g.config
    out = Path(args.out or (Path(args.run) / "final" if (Path(args.run) / "checkpoints").is_dir() else Path(args.run).parent.parent / "final"))
    save_grid(g.sample(args.n, seed=args.seed), out / "samples.png")
    rows = 8
    gen = torch.Generator().manual_seed(args.seed + 1)
    a, b = torch.randn(rows, g.latent_dim, generator=gen), torch.randn(rows, g.latent_dim, generator=gen)
    path = torch.cat([slerp(a, b, t) for t in torch.linspace(0, 1, args.steps)], dim=0)
    order = torch.arange(rows * args.steps).view(args.steps, rows).t().flatten()  # one interpolation per row
    row_labels = g.default_labels(rows).repeat(args.steps)
    save_grid(g.generate(path, row_labels)[order], out / "interpolations.png", nrow=args.steps)
    written = ["samples.png", "interpolations.png"]
    if g.is_vae and Path(cfg.data.path, "manifest.json").is_file():
        from gen.data import make_loader
        loader, _, _ = make_loader(cfg.data.path, batch_size=32, workers=0, epochs=1, split=cfg.data.split)
        batch = next(iter(loader))
        recon = g.reconstruct(batch["image"], batch["label"])
        save_grid(torch.stack([batch["image"], recon], dim=1).flatten(0, 1), out / "reconstructions.png", nrow=8)
        written.append("reconstructions.png")
    print(f"wrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
