"""Train a GAN or VAE on deepgen shards.

    python -m jobs.train --preset gan --data data/mnist --train.run_dir runs/mnist-gan
    accelerate launch -m jobs.train --preset vae --data data/pokemon --train.mixed_precision bf16
    python -m jobs.train --help

Presets: seed-gan, seed-vae (the notebook models), gan, gan-small-data, vae. Any field can be
overridden: --train.batch_size 256, --model.conditional True, --log.wandb off.
Exit codes: 0 done (or stopped by a signal after saving), 1 a one-line error (bad data, a run dir
in use, disk full, incompatible checkpoint), 2 impossible option values (one line each, nothing
created), 3 non-finite or diverged losses (nothing saved after the last good checkpoint).
"""
import os
import sys

from gen.cli import command, configure_logging


@command
def main(argv=None):
    configure_logging()
    from gen.config import parse, validate
    cfg = parse(argv)
    validate(cfg)  # --help and impossible values answer before torch is imported (~8 s)
    from gen.train import train

    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        how = f"stopped by signal {result.stopped_by}" if result.stopped_by else "done"
        print(f"{how} at step {result.step}: run dir {result.run_dir}, checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
