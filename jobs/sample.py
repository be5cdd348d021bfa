"""Samples, interpolations and (VAE) reconstructions from a trained run, checkpoint or export.

    python -m jobs.sample runs/quickstart-gan --out runs/quickstart-gan/final
    python -m jobs.sample runs/pokemon-vae/checkpoints/checkpoint-0020000 --n 100 --seed 3
    python -m jobs.sample runs/mnist-gan --npz samples.npz --n 50000      # for external FID tools
    python -m jobs.sample runs/mnist-gan --truncation 1.0                 # GAN truncation trick

The model is rebuilt from the config and safetensors weights alone (EMA weights when kept).
Writes samples.png (the first 256 at most), interpolations.png and .gif (slerp paths),
classes.png (one row per class, conditional models), and for a VAE reconstructions.png
(real | decoded); with a 2-D latent also manifold.png (the decoder over the latent plane) and
latent_scatter.png (the test set's latent means, coloured by class).
"""
import argparse
import io
import sys
from pathlib import Path

import numpy as np
import torch


def write_npz(g, path, n, seed, truncation, batch=1000):
    """uint8 NHWC `arr_0`, the convention of the common GAN evaluation tools."""
    from tqdm import tqdm

    from gen.shard_format import atomic_write_bytes
    out = np.empty((n, g.shape[1], g.shape[2], g.shape[0]), dtype=np.uint8)
    z = g.latents(n, seed, truncation)
    for i in tqdm(range(0, n, batch), desc="npz", unit="batch"):
        images = g.generate(z[i:i + batch], g.default_labels(n)[i:i + batch])
        out[i:i + batch] = ((images + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    buf = io.BytesIO()
    np.savez(buf, arr_0=out)
    atomic_write_bytes(path, buf.getvalue())


def write_gif(frames, path, ms=120):
    """frames: list of grids in [0, 1] (C, H, W); played forward then back."""
    from PIL import Image

    from gen.shard_format import atomic_write_bytes
    images = [Image.fromarray(f.mul(255).round().byte().permute(1, 2, 0).squeeze(-1).numpy()) for f in frames]
    images = images + images[-2:0:-1]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=ms, loop=0)
    atomic_write_bytes(path, buf.getvalue())


def interpolations(g, out, steps, seed, truncation):
    from torchvision.utils import make_grid

    from gen.sample import save_grid, slerp
    rows = 8
    a, b = g.latents(rows, seed + 1, truncation), g.latents(rows, seed + 2, truncation)
    ts = torch.linspace(0, 1, steps)
    images = g.generate(torch.cat([slerp(a, b, t) for t in ts]), g.default_labels(rows).repeat(steps))
    images = images.view(steps, rows, *images.shape[1:])
    save_grid(images.transpose(0, 1).flatten(0, 1), out / "interpolations.png", nrow=steps)  # one path per row
    write_gif([make_grid((images[i] + 1) / 2, nrow=rows, padding=2, pad_value=1.0) for i in range(steps)],
              out / "interpolations.gif")


def vae_figures(g, out, data_path):
    """Reconstructions; with a 2-D latent the manifold and the latent scatter."""
    from gen.data import make_loader
    from gen.sample import save_grid
    from gen.shard_format import read_manifest
    written = []
    manifest = read_manifest(data_path)
    split = "test" if "test" in manifest["splits"] else "train"
    loader, _, _ = make_loader(data_path, batch_size=500, workers=0, epochs=1, split=split, shuffle_buffer=0)
    batch = next(iter(loader))
    x, y = batch["image"], batch["label"]
    recon = g.reconstruct(x[:32], y[:32])
    save_grid(torch.stack([x[:32], recon], dim=1).flatten(0, 1), out / "reconstructions.png", nrow=8)
    written.append("reconstructions.png")
    if g.latent_dim == 2:
        from statistics import NormalDist
        k = 20
        q = torch.tensor([NormalDist().inv_cdf((i + 0.5) / k) for i in range(k)])
        zz = torch.stack(torch.meshgrid(q, q.flip(0), indexing="xy"), dim=-1).reshape(-1, 2)
        save_grid(g.generate(zz), out / "manifold.png", nrow=k)
        mean = g.encode(x, y).numpy()
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 5), dpi=100)
        points = ax.scatter(mean[:, 0], mean[:, 1], c=y.numpy(), cmap="tab10", s=6)
        names = g.class_names or [str(i) for i in range(int(y.max()) + 1)]
        ax.legend(points.legend_elements()[0], names, fontsize=7, loc="best", markerscale=0.8)
        ax.set(xlabel="z[0]", ylabel="z[1]", title=f"latent means of {len(y)} {split} images")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        from gen.shard_format import atomic_write_bytes
        atomic_write_bytes(out / "latent_scatter.png", buf.getvalue())
        written += ["manifold.png", "latent_scatter.png"]
    return written


def main(argv=None):
    from gen.checkpoint import CheckpointError
    from gen.sample import load_generator, save_grid
    p = argparse.ArgumentParser(prog="python -m jobs.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (newest checkpoint), a checkpoint folder or an export folder")
    p.add_argument("--out", default=None, help="output folder (default RUN/final)")
    p.add_argument("--n", type=int, default=64, help="samples (the grid shows at most 256)")
    p.add_argument("--npz", default=None, help="also write all n samples as uint8 NHWC arr_0 to this .npz")
    p.add_argument("--steps", type=int, default=10, help="interpolation steps per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncation", type=float, default=None, help="GAN: redraw latents beyond this |z| (e.g. 1.0)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    try:
        g = load_generator(args.run, device=args.device)
    except (CheckpointError, KeyError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.truncation is not None and g.is_vae:
        print("error: --truncation is for GANs", file=sys.stderr)
        return 1
    run = Path(args.run)
    out = Path(args.out or (run / "final" if (run / "checkpoints").is_dir()
                            else run.parent.parent / "final" if run.parent.name == "checkpoints" else run / "final"))
    shown = min(args.n, 256)
    save_grid(g.sample(shown, seed=args.seed, truncation=args.truncation), out / "samples.png")
    interpolations(g, out, args.steps, args.seed, args.truncation)
    written = ["samples.png", "interpolations.png", "interpolations.gif"]
    if g.num_classes and g.config.model.conditional:
        per = 10
        labels = torch.arange(g.num_classes).repeat_interleave(per)
        save_grid(g.generate(g.latents(len(labels), args.seed + 3, args.truncation), labels), out / "classes.png", nrow=per)
        written.append("classes.png")
    if g.is_vae and Path(g.config.data.path, "manifest.json").is_file():
        written += vae_figures(g, out, g.config.data.path)
    if args.npz:
        write_npz(g, Path(args.npz), args.n, args.seed, args.truncation)
        written.append(str(args.npz))
    print(f"wrote {', '.join(written)} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
