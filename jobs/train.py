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
import logging
import os
import sys
import warnings


def configure_logging():
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    warnings.filterwarnings("ignore", module="webdataset")
    warnings.filterwarnings("ignore", message="The image decoding and encoding capabilities of TorchVision")


def end_process_group():
    """After an error during set-up (before the loop, which cleans up itself): end the process
    group now, not during interpreter exit, where its gloo threads can abort the process."""
    import gc

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the failed run's DDP wrappers hold the group
        dist.destroy_process_group()


def main(argv=None):
    configure_logging()
    import errno

    from gen.checkpoint import CheckpointError
    from gen.config import ConfigError, parse, validate
    from gen.data import DataError
    from gen.runlock import RunDirLocked
    from gen.train import NonFiniteLoss, TrainingDiverged, train

    cfg = parse(argv)
    try:
        validate(cfg)
    except ConfigError as e:
        for line in str(e).splitlines():
            print(f"error: {line}", file=sys.stderr)
        return 2
    try:
        result = train(cfg)
    except (NonFiniteLoss, TrainingDiverged) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    except (CheckpointError, DataError, RunDirLocked, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        end_process_group()
        return 1
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        print(f"error: disk full while writing {e.filename or cfg.train.run_dir}; checkpoints already written are "
              "intact: free space, then run the same command to resume", file=sys.stderr)
        end_process_group()
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        how = f"stopped by signal {result.stopped_by}" if result.stopped_by else "done"
        print(f"{how} at step {result.step}: run dir {result.run_dir}, checkpoint {result.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
