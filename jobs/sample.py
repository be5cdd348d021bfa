"""Samples, interpolations and (VAE) reconstructions from a trained run, checkpoint or export.

    python -m jobs.sample runs/quickstart-gan --out runs/quickstart-gan/final
    python -m jobs.sample runs/pokemon-vae/checkpoints/checkpoint-0020000 --n 100 --seed 3
    python -m jobs.sample runs/mnist-gan --npz samples.npz --n 50000      # for external FID tools
    python -m jobs.sample runs/mnist-gan --truncation 1.0                 # GAN truncation trick
    python -m jobs.sample runs/mnist-vae --prior normal                   # VAE: N(0, I) instead of the ex-post mixture

The model is rebuilt from the config and safetensors weights alone (EMA weights when kept).
Writes samples.png (the first 256 at most), interpolations.png and .gif (slerp paths),
classes.png (one row per class, conditional models), and for a VAE reconstructions.png
(real | decoded); with a 2-D latent also manifold.png (the decoder over the latent plane) and
latent_scatter.png (the test set's latent means, coloured by class).
"""
import argparse
import sys
from pathlib import Path

from gen.errors import UserError
from gen.cli import command


@command
def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m jobs.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="run dir (newest checkpoint), a checkpoint folder or an export folder")
    p.add_argument("--out", default=None, help="output folder (default RUN/final)")
    p.add_argument("--n", type=int, default=64, help="samples (the grid shows at most 256)")
    p.add_argument("--npz", default=None, help="also write all n samples as uint8 NHWC arr_0 to this .npz")
    p.add_argument("--steps", type=int, default=10, help="interpolation steps per row")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--truncation", type=float, default=None, help="GAN: redraw latents beyond this |z| (e.g. 1.0)")
    p.add_argument("--prior", choices=("auto", "normal"), default="auto",
                   help="VAE latents: auto = the ex-post mixture fitted on the training latents (gen.latent_prior); normal = N(0, I)")
    p.add_argument("--data", default=None, help="VAE: shards to fit the ex-post mixture on (default: the run's data)")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    from gen.run_dir import RunDir  # after parsing: --help and usage errors without importing torch
    from gen.sample import load_generator, write_figures, write_npz
    g = load_generator(args.run, device=args.device, prior=args.prior, data=args.data)
    if args.truncation is not None and g.is_vae:
        raise UserError("--truncation is for GANs")
    out = Path(args.out or RunDir.of(args.run).final)
    written = write_figures(g, out, args.seed, args.n, args.steps, args.truncation)
    if args.npz:
        write_npz(g, Path(args.npz), args.n, args.seed, args.truncation)
        written.append(str(args.npz))
    print(f"wrote {', '.join(written)} to {out}" + (f" (latents from {g.prior_name})" if g.is_vae else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
