"""One typed config for every run: dataclasses with commented defaults, named presets, and
command-line overrides parsed by tyro (`--train.batch_size 256`, `--model.family vae`)."""
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal, Optional

import tyro

from .errors import ConfigError  # noqa: F401 (raised by validate; its home for callers)


@dataclass
class DataConfig:
    path: str = "data/mnist"        # shard folder written by `python -m data_prep`
    split: str = "train"
    workers: int = 2                # DataLoader worker processes per rank (resume needs the same number)
    shuffle_buffer: int = 2000      # samples held for shuffling, per worker
    resampled: bool = False         # draw shards with replacement (multi-node, few shards)
    cache_mb: int = 1024            # per worker: keep decoded images in memory when the split fits; 0 = off
    # keep the decoded split on the GPU and gather batches there (no workers): auto = on CUDA when
    # it takes at most 5 % of the GPU's memory (MNIST: 55 MB); on = also on CPU
    device_data: Literal["auto", "on", "off"] = "auto"
    # mirror each training image left-right with probability 1/2 (stylegan2-ada's --mirror): twice
    # the images for data whose mirror images are as real (Pokemon, faces); not for digits
    hflip: bool = False


@dataclass
class ModelConfig:
    family: Literal["gan", "vae"] = "gan"
    # seed: faithful ports of the notebook GAN / TF CVAE tutorial; deep: residual nets; dcgan (GAN
    # only): DCGAN generator + the SN-GAN paper's CNN discriminator, cheaper per image (the gan preset's)
    arch: Literal["seed", "deep", "dcgan"] = "deep"
    latent_dim: int = 128
    width: int = 64                 # base channel count of the deep nets
    conditional: bool = False       # class-conditional on the shards' labels
    # gan
    # unconditional GAN: self-conditioned on K clusters of the training images (PCA + clustering,
    # gen/clusters.py; Liu et al. 2020), no labels used; ignored with --model.conditional; 0 = off
    self_condition: int = 0
    # how those clusters are found (gen/clusters.py): spectral clustering of the images' nearest-
    # neighbour graph (clusters that hold one kind of image more often: MNIST legibility 0.92 -> 0.96
    # at 775k), or k-means of their PCA features (runs saved before this option had no other)
    cluster_method: Literal["spectral", "kmeans"] = "spectral"
    gan_loss: Literal["hinge", "nonsat"] = "hinge"
    spectral_norm: bool = True      # in D
    # BatchNorm in D, reals and fakes in separate passes (DCGAN): D sees each batch's spread, so a
    # G that sends every z to one image is caught; on the 819 Pokemon every norm-free D let G collapse
    d_batchnorm: bool = False
    # dcgan D: 2 = the SN-GAN paper's (a 3x3 conv before each stride-2 conv); 1 = DCGAN's (stride-2
    # convs only); both end with a 3x3 conv at the smallest map
    d_convs_per_level: Literal[1, 2] = 2
    # dcgan G: conv = a 3x3 conv writes the image from a full-size map of `width` channels; deconv =
    # the last stride-2 transposed conv writes it (DCGAN's): no full-size feature map, less time per image
    g_image_layer: Literal["conv", "deconv"] = "conv"
    r1_gamma: float = 0.0           # R1 penalty on reals; 0 = off
    r1_every: int = 4               # lazy R1: every N steps, scaled by N
    # alternating: D steps, then G through the updated D (stylegan2-ada); simultaneous: one forward,
    # both losses, both optimizers step together (the Keras notebook's two GradientTapes)
    gan_update: Literal["alternating", "simultaneous"] = "alternating"
    # simultaneous with the nonsat loss and no BatchNorm in D: G's gradient comes out of D's own
    # backward pass, rescaled per image (exact: see GANFamily._both_phase): one backward through D
    # instead of two. seed-gan keeps the notebook's two tapes, so its time per image is the notebook's
    one_backward: bool = True
    diffaug: tuple[str, ...] = ()   # DiffAugment policy for D's inputs: color, translation, cutout
    ema_decay: float = 0.999        # EMA of G (or of the VAE) used for samples; 0 = off
    # vae
    likelihood: Literal["gaussian", "bernoulli"] = "gaussian"
    binarize: bool = False          # Bernoulli on binarised pixels, as the TF tutorial does
    kl: Literal["analytic", "mc"] = "analytic"  # mc: the tutorial's single-sample estimate
    beta: float = 1.0
    kl_warmup_steps: int = 1000     # KL weight ramps 0 -> beta over these steps


@dataclass
class OptimConfig:
    lr: float = 2e-4                # G (GAN) or the VAE
    lr_d: float = 2e-4              # D
    optimizer_d: Literal["adam", "rmsprop"] = "adam"
    betas: tuple[float, float] = (0.0, 0.99)
    eps: float = 1e-8               # Adam/RMSprop epsilon (Keras uses 1e-7)
    weight_decay: float = 0.0
    grad_clip: float = 0.0          # max grad norm; 0 = off
    warmup_steps: int = 0           # linear LR warm-up
    schedule: Literal["constant", "cosine"] = "constant"


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"   # config, checkpoints, samples, metrics.jsonl, wandb/
    steps: int = 5000               # optimizer steps
    batch_size: int = 64            # per process, per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step: global batch = batch_size x grad_accum x processes
    # auto: bf16 where the device computes it natively (a CUDA GPU with bf16; a CPU with AMX, Intel
    # Sapphire Rapids or newer: the gan preset 1.5x faster at 28 px), else no (fp32)
    mixed_precision: Annotated[Literal["no", "bf16", "fp16", "auto"], tyro.conf.arg(aliases=("--mixed-precision",))] = "no"
    seed: int = 0
    log_every: int = 50             # console line + metrics.jsonl + W&B scalars
    sample_every: int = 500         # sample grid (fixed latents, EMA weights)
    ckpt_every: int = 500
    keep_last: int = 3              # checkpoints kept
    ddp_bucket_mb: int = 25         # DDP gradient bucket size: larger buckets, fewer all-reduce calls (docs/scaling.md)
    check_every: int = 25           # steps between host syncs: non-finite losses and stop signals (always before a save)
    compile: bool = False           # torch.compile the prepared modules (GPU)
    # NHWC memory format for modules and batches: faster on GPUs and, for small convs, on CPUs too
    # (oneDNN: the gan preset's G 1.5x at 28 px)
    channels_last: bool = False
    # auto: the newest valid checkpoint in run_dir (none there: a fresh start); none: a fresh start,
    # refused where run_dir holds checkpoints; restart: a fresh start, the earlier run's files moved
    # into run_dir/replaced-DATE/; or a checkpoint's path (newer ones in its run dir are moved aside)
    resume: Annotated[str, tyro.conf.arg(aliases=("--resume",))] = "auto"
    cpu: bool = False               # force CPU even where a GPU exists
    force_unlock: bool = False      # take the run dir's lock even if another run seems to hold it


@dataclass
class LogConfig:
    # auto: online if a key and network exist
    wandb: Annotated[Literal["auto", "online", "offline", "off"], tyro.conf.arg(aliases=("--wandb",))] = "auto"
    project: str = "deepgen"
    group: Optional[str] = None
    name: Optional[str] = None      # default: the run_dir's name
    num_samples: int = 64           # images in each sample grid


@dataclass
class EvalConfig:
    every: int = 0                  # FID/KID (+ legibility) of the EMA weights every N steps; 0 = off
    n: int = 2000                   # samples (and real images) per evaluation: small n biases FID up
    space: Literal["domain", "inception"] = "domain"  # feature space (see python -m jobs.evaluate)
    seed: int = 0                   # the evaluation's own RNG: the training stream is unchanged


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    log: LogConfig = field(default_factory=LogConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


def _preset(model=None, optim=None, train=None, data=None):
    return Config(model=ModelConfig(**(model or {})), optim=OptimConfig(**(optim or {})),
                  train=TrainConfig(**(train or {})), data=DataConfig(**(data or {})))


PRESETS = {
    # timsainb/tensorflow2-generative-models 2.0-GAN-fashion-mnist, ported layer for layer
    "seed-gan": _preset(model=dict(family="gan", arch="seed", latent_dim=64, gan_loss="nonsat",
                                   spectral_norm=False, ema_decay=0.0, gan_update="simultaneous", one_backward=False),
                        optim=dict(lr=1e-3, lr_d=5e-3, optimizer_d="rmsprop", betas=(0.5, 0.999), eps=1e-7),
                        train=dict(batch_size=512)),
    # the TensorFlow CVAE tutorial: latent 2, Bernoulli likelihood, single-sample MC ELBO
    "seed-vae": _preset(model=dict(family="vae", arch="seed", latent_dim=2, likelihood="bernoulli",
                                   binarize=True, kl="mc", kl_warmup_steps=0, ema_decay=0.0),
                        optim=dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-7),
                        train=dict(batch_size=32)),
    # stabilised GAN: spectral norm, hinge loss, light lazy R1, EMA of G, TTUR-style separate LRs.
    # Tuned on MNIST at the quickstart's budget (bench/quality.py, docs/quality.md): G/D at 5e-4/1e-3
    # and no augmentation (DiffAugment slows learning on tens of thousands of images) gave FID 12.2,
    # legibility 0.50 at 64k images, against 21.0 / 0.37 with 2e-4/4e-4 and translation. DCGAN G +
    # SN-CNN D: at 200k conditional MNIST images FID 0.45, legibility 0.95, as the residual nets
    # (0.48, 0.96), at 1.5x their images per second on a CPU. For the notebook's wall time per image
    # (docs/quality.md, 775k conditional images, width 16): DCGAN's D (no 3x3 conv before the
    # stride-2 convs: FID 0.59 at 200k vs 0.45; without the last 3x3 conv too: 2.71), batch 128,
    # NHWC, and the notebook's simultaneous step, which beat alternating steps over 775k images
    # (FID 0.37 vs 1.56; alternating without R1 degraded to 4.82). R1 every 16 steps (every 4 cost 20 %).
    # Unconditional, self-conditioned on 20 clusters of the images (no labels): unconditional MNIST at
    # 200k images FID 4.1 (4.07-4.28 over 3 sample seeds), legibility 0.72, against 9.3 (9.15-9.39) /
    # 0.50 without and 11.3 / 0.55 with 50 clusters (D then wins: too few images per cluster)
    # At the notebook's 775k images: FID 0.92 / legibility 0.86 against 2.92 / 0.73 without (notebook 16.6 / 0.40)
    # 10 clusters: better at 200k (3.3), not better at 775k (1.00 vs 20's 0.92, seed ranges overlapping)
    # Constant LRs: a cosine decay over the run scored FID 10.9 / legibility 0.56 at 200k (constant: 4.1 / 0.72)
    # G/D at 1e-3/2e-3 (2x): unconditional 200k FID 1.77 / legibility 0.80 (5e-4/1e-3: 4.12 / 0.72), 775k
    # 0.61 / 0.89 (0.92 / 0.86); DiffAugment translation on the 4,500 digits: 10.4 / 0.53 at 200k.
    # 3x (1.5e-3/3e-3): 1.19 / 0.83 at 200k, 775k 0.49 (0.49-0.61) / 0.887: inside 2x's seed range
    # nonsat loss instead of hinge (200k: 2x 1.92 / 0.81, 3x 1.43 / 0.83; hinge 1.77 / 0.80, 1.19 / 0.83):
    # it lets G's gradient come out of D's one backward pass (one_backward): 0.81x -> 0.73x the notebook's
    # time per image. nonsat at 3x, 775k: 0.50 (0.50-0.54) / 0.900, beyond hinge 2x's range
    # 6x (3e-3/6e-3), screened on an H200 with the CPU settings (bench/gpu_gan_screen.sh, docs/quality.md),
    # over 5 training runs: 200k FID 1.03-1.10 / legibility 0.85-0.87, 775k 0.41-0.53 / 0.89-0.91
    # (3x over 2 seeds: 1.47-1.53 / 0.82-0.84, 0.49-0.53 / 0.88-0.89); 4x, 8x, 10x, G = D rates, R1
    # 0.03-1.0, warm-up, EMA 0.9995, 10 clusters, D's 3x3 convs, latent 64: none better over seeds
    # 30 clusters at 6x (CPU, 3 training seeds): 200k FID 0.94-1.00 / legibility 0.87-0.89 against 20's
    # 1.08-1.15 / 0.85 (2 seeds); 775k, means over 6 sample sets: 0.45-0.47 / 0.914-0.922 against
    # 0.47-0.49 / 0.90. Each cluster holds ~150 of the 4,500 digits; on the 737 Pokemon, 8 clusters
    # of ~90 collapsed (gan-small-data leaves it off). 40 clusters (2 seeds): 775k legibility 0.922-0.930 but
    # 200k FID 1.09-1.24 (misses 3x the floor); --model.g_image_layer deconv: 1.29x faster, worse at both budgets
    # Spectral clusters (--model.cluster_method, the default since): each cluster is one digit for 87 % of
    # its images against k-means' 75 %; 200k FID 0.49-0.72 / legibility 0.91-0.93, 775k 0.35-0.37 / 0.954-0.960
    # (means over 6 sample sets, 4 runs, fp32 and bf16) against k-means' 0.93-1.00 / 0.87-0.89 and
    # 0.45-0.47 / 0.914-0.922. A linear LR decay over the last 20 % of the steps: no better (200k 0.99 / 0.86)
    "gan": _preset(model=dict(family="gan", arch="dcgan", latent_dim=128, gan_loss="nonsat", d_convs_per_level=1,
                              gan_update="simultaneous", r1_gamma=0.1, r1_every=16, diffaug=(), ema_decay=0.999,
                              self_condition=30),
                   optim=dict(lr=3e-3, lr_d=6e-3, betas=(0.0, 0.99)),
                   train=dict(batch_size=128, channels_last=True)),
    # deeper conv VAE, learned-variance Gaussian likelihood (sharper than a fixed sigma), KL warm-up.
    # Latent 16: the ex-post mixture fits a 16-d aggregate posterior with 20-30 components
    # (MNIST 200k images: legibility 0.92, FID 0.75) where a 64-d one supports only 10 (0.77, 3.1)
    "vae": _preset(model=dict(family="vae", arch="deep", latent_dim=16, likelihood="gaussian",
                              beta=1.0, kl_warmup_steps=1000, ema_decay=0.999),
                   optim=dict(lr=1e-3, betas=(0.9, 0.999), grad_clip=1.0, warmup_steps=100)),
}
# small data sets (the 819 Pokémon): the DCGAN recipe (Radford et al.) with BatchNorm in D, fed
# reals and fakes apart, so D sees that a batch of fakes lacks the spread of a batch of reals. Every
# norm-free D tried (residual or CNN, spectral norm or not, R1 0.05-1, minibatch-std, lr 2e-4-1e-3)
# went flat after ~50 steps (D(real) = D(fake)) and G collapsed to one image. DiffAugment (all
# three ops) keeps D from memorising a few hundred images over long runs; it costs FID early (30k
# images on a CPU: 54 with it, 35 without; docs/quality.md). Mirror images double the 737
# (H200, 220k images: D's features of samples no longer nearer the training set than held-out ones)
PRESETS["gan-small-data"] = _preset(
    model=dict(family="gan", arch="dcgan", latent_dim=128, gan_loss="nonsat", spectral_norm=False, d_batchnorm=True,
               r1_gamma=0.0, diffaug=("color", "translation", "cutout"), ema_decay=0.999),
    data=dict(hflip=True),
    optim=dict(lr=2e-4, lr_d=2e-4, betas=(0.5, 0.999)))


def parse(args=None, prog="python -m jobs.train"):
    """--preset NAME (default gan), --data PATH (short for --data.path), then any field override."""
    import argparse
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="gan", choices=sorted(PRESETS))
    pre.add_argument("--data", dest="data_path", default=None)
    known, rest = pre.parse_known_args(args)
    default = dataclasses.replace(PRESETS[known.preset])
    if known.data_path:
        default = dataclasses.replace(default, data=dataclasses.replace(default.data, path=known.data_path))
    description = f"Train a GAN or VAE (preset {known.preset}; presets: {', '.join(PRESETS)}). --data PATH sets data.path."
    return tyro.cli(Config, args=rest, default=default, prog=prog, description=description)


def validate(cfg):
    """Every impossible value, one line each, as one ConfigError (before anything is created)."""
    d, m, o, t, e = cfg.data, cfg.model, cfg.optim, cfg.train, cfg.eval
    rules = [
        (t.steps >= 1, f"--train.steps {t.steps}: must be at least 1"),
        (t.batch_size >= 1, f"--train.batch_size {t.batch_size}: must be at least 1"),
        (t.grad_accum >= 1, f"--train.grad_accum {t.grad_accum}: must be at least 1"),
        (t.keep_last >= 1, f"--train.keep_last {t.keep_last}: must be at least 1 (the newest checkpoint is always kept)"),
        (d.workers >= 0, f"--data.workers {d.workers}: must be 0 or more"),
        (cfg.train.ddp_bucket_mb >= 1, f"--train.ddp_bucket_mb {cfg.train.ddp_bucket_mb}: must be 1 or more"),
        (d.shuffle_buffer >= 0, f"--data.shuffle_buffer {d.shuffle_buffer}: must be 0 or more"),
        (d.cache_mb >= 0, f"--data.cache_mb {d.cache_mb}: must be 0 or more"),
        (m.latent_dim >= 1, f"--model.latent_dim {m.latent_dim}: must be at least 1"),
        (m.width >= 4, f"--model.width {m.width}: must be at least 4"),
        (0 <= m.ema_decay < 1, f"--model.ema_decay {m.ema_decay}: must be in [0, 1)"),
        (m.r1_gamma >= 0, f"--model.r1_gamma {m.r1_gamma}: must be 0 or more"),
        (m.r1_every >= 1, f"--model.r1_every {m.r1_every}: must be at least 1"),
        (m.beta >= 0, f"--model.beta {m.beta}: must be 0 or more"),
        (m.kl_warmup_steps >= 0, f"--model.kl_warmup_steps {m.kl_warmup_steps}: must be 0 or more"),
        (o.lr > 0, f"--optim.lr {o.lr}: must be positive"),
        (o.lr_d > 0, f"--optim.lr_d {o.lr_d}: must be positive"),
        (o.eps > 0, f"--optim.eps {o.eps}: must be positive"),
        (all(0 <= b < 1 for b in o.betas), f"--optim.betas {tuple(o.betas)}: each must be in [0, 1)"),
        (o.weight_decay >= 0, f"--optim.weight_decay {o.weight_decay}: must be 0 or more"),
        (o.grad_clip >= 0, f"--optim.grad_clip {o.grad_clip}: must be 0 (off) or more"),
        (o.warmup_steps >= 0, f"--optim.warmup_steps {o.warmup_steps}: must be 0 or more"),
        (e.every >= 0, f"--eval.every {e.every}: must be 0 (off) or more"),
        (e.n >= 2, f"--eval.n {e.n}: must be at least 2"),
        (cfg.log.num_samples >= 1, f"--log.num_samples {cfg.log.num_samples}: must be at least 1"),
        (m.self_condition == 0 or m.self_condition >= 2, f"--model.self_condition {m.self_condition}: 0 (off) or at least 2 clusters"),
        (m.self_condition == 0 or m.family == "gan", "--model.self_condition is for GANs"),
    ]
    for name in ("log_every", "sample_every", "ckpt_every", "check_every"):
        value = getattr(t, name)
        rules.append((value >= 1, f"--train.{name} {value}: must be at least 1"))
    problems = [message for ok, message in rules if not ok]
    if problems:
        raise ConfigError("\n".join(problems))


def to_dict(cfg):
    return asdict(cfg)


def from_dict(d):
    """Rebuild a Config saved with to_dict (tuples come back from JSON as lists). Keys added since
    take their defaults, except where the old behaviour differs from the new default."""
    if "self_condition" in d.get("model", {}) and "cluster_method" not in d["model"]:
        d = {**d, "model": {**d["model"], "cluster_method": "kmeans"}}  # saved before spectral existed
    def build(cls, values):
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in values:
                v = values[f.name]
                kwargs[f.name] = tuple(v) if isinstance(v, list) else v
        return cls(**kwargs)
    return Config(data=build(DataConfig, d.get("data", {})), model=build(ModelConfig, d.get("model", {})),
                  optim=build(OptimConfig, d.get("optim", {})), train=build(TrainConfig, d.get("train", {})),
                  log=build(LogConfig, d.get("log", {})), eval=build(EvalConfig, d.get("eval", {})))
