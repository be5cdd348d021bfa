"""One typed config for every run: dataclasses with commented defaults, named presets, and
command-line overrides parsed by tyro (`--train.batch_size 256`, `--model.family vae`)."""
import dataclasses
from dataclasses import asdict, dataclass, field
from typing import Annotated, Literal, Optional

import tyro

from .errors import ConfigError  # noqa: F401 (raised by validate; its home for callers)


@dataclass
class DataConfig:
    """The shards and the loader."""
    path: str = "data/mnist"        # shard folder written by `python -m data_prep`
    split: str = "train"            # which split of the shards to train on
    workers: int = 2                # DataLoader worker processes per rank (resume needs the same number)
    shuffle_buffer: int = 2000      # samples held for shuffling, per worker
    resampled: bool = False         # draw shards with replacement (multi-node, few shards)
    cache_mb: int = 1024            # per worker: keep decoded images in memory when the split fits; 0 = off
    # no workers: batches are gathered on the GPU from the decoded split (MNIST takes 55 MB)
    device_data: Literal["auto", "on", "off"] = "auto"  # the decoded split on the GPU (auto: if <= 5 % of its memory)
    # (stylegan2-ada's --mirror: twice the images where a mirror image is as real; not for digits or text)
    hflip: bool = False             # mirror each training image left-right with probability 1/2


@dataclass
class ModelConfig:
    """The model family, its networks and its losses."""
    family: Literal["gan", "vae"] = "gan"  # GAN or VAE
    # seed: the notebook GAN / TF tutorial VAE ported layer for layer; dcgan (GAN only): DCGAN G +
    # the SN-GAN paper's CNN D, cheaper per image than the residual nets
    arch: Literal["seed", "deep", "dcgan"] = "deep"  # networks: seed (the notebooks'), deep (residual), dcgan
    latent_dim: int = 128           # size of the latent vector z
    width: int = 64                 # base channel count (64 on a GPU; 16 is CPU-sized)
    conditional: bool = False       # class-conditional on the shards' labels
    # (Liu et al. 2020; gen/clusters.py; ignored with --model.conditional)
    self_condition: int = 0         # GAN without labels: condition on K clusters of the training images; 0 = off
    # spectral: clustering of the images' nearest-neighbour graph (purer clusters); kmeans: of their
    # PCA features (runs saved before this option had no other)
    cluster_method: Literal["spectral", "kmeans"] = "spectral"  # how self-conditioning finds its clusters
    gan_loss: Literal["hinge", "nonsat"] = "hinge"  # GAN loss: hinge or non-saturating (BCE)
    spectral_norm: bool = True      # spectral norm in D
    # (DCGAN: D sees each batch's spread, so a G that sends every z to one image is caught)
    d_batchnorm: bool = False       # BatchNorm in D, reals and fakes in separate passes
    # 2: a 3x3 conv before each stride-2 conv (SN-GAN's CNN); 1: stride-2 convs only (DCGAN's)
    d_convs_per_level: Literal[1, 2] = 2  # dcgan D: convolutions per resolution
    # conv: a 3x3 conv from a full-size map of `width` channels; deconv: the last stride-2 transposed conv
    g_image_layer: Literal["conv", "deconv"] = "conv"  # dcgan G: the layer that writes the image
    # (FastGAN, Liu et al. 2021): the 4 and 8 px maps gate the 32 and 64 px ones, channel by channel
    g_skip_excitation: bool = False  # dcgan G: skip-layer excitation
    r1_gamma: float = 0.0           # R1 penalty on reals; 0 = off
    r1_every: int = 4               # lazy R1: every N steps, scaled by N
    # LeCam (Tseng et al. 2021, for limited data): D's logits pulled toward the EMA of the other
    # set's, which bounds how far D can separate the few real images from the fakes
    lecam: float = 0.0              # weight of the LeCam regulariser on D; 0 = off
    # FastGAN's self-supervised D (Liu et al. 2021): a decoder on D's 8 px map rebuilds each real
    # image D sees at half size (MSE), so D must keep features that describe the image, not just split it
    d_reconstruct: float = 0.0      # weight of D's reconstruction loss on reals; 0 = off
    # alternating: D steps, then G through the updated D (stylegan2-ada); simultaneous: one forward,
    # both losses, both optimizers step together (the Keras notebook's two GradientTapes)
    gan_update: Literal["alternating", "simultaneous"] = "alternating"  # the GAN step: alternating or simultaneous
    # exact with the nonsat loss and no BatchNorm in D (docs/design.md); seed-gan keeps the notebook's two
    one_backward: bool = True       # simultaneous step: G's gradient out of D's one backward pass
    diffaug: tuple[str, ...] = ()   # DiffAugment policy for D's inputs: color, translation, cutout
    # ADA (Karras et al. 2020): each op on each image with probability p, p raised while D is
    # too sure of the reals (E[sign(D(real))] above the target), lowered otherwise; p starts at 0
    ada_target: float = 0.0         # ADA: target of E[sign(D(real))] (the paper's 0.6); 0 = off (p = 1)
    ada_kimg: float = 10.0          # ADA: thousands of real images for p to move from 0 to 1
    ema_decay: float = 0.999        # EMA of G (or of the VAE) used for samples; 0 = off
    likelihood: Literal["gaussian", "bernoulli"] = "gaussian"  # VAE: Gaussian (learned scale) or Bernoulli pixels
    binarize: bool = False          # VAE: Bernoulli on binarised pixels, as the TF tutorial does
    kl: Literal["analytic", "mc"] = "analytic"  # VAE KL term: analytic, or mc (the tutorial's single sample)
    beta: float = 1.0               # VAE: weight of the KL term
    kl_warmup_steps: int = 1000     # VAE: the KL weight ramps 0 -> beta over these steps


@dataclass
class OptimConfig:
    """Optimizers and learning rates."""
    lr: float = 2e-4                # learning rate of G (GAN) or the VAE
    lr_d: float = 2e-4              # learning rate of D
    optimizer_d: Literal["adam", "rmsprop"] = "adam"  # D's optimizer (rmsprop: the notebook's)
    betas: tuple[float, float] = (0.0, 0.99)  # Adam's betas
    eps: float = 1e-8               # Adam/RMSprop epsilon (Keras uses 1e-7)
    weight_decay: float = 0.0       # L2 weight decay
    grad_clip: float = 0.0          # max grad norm; 0 = off
    warmup_steps: int = 0           # linear LR warm-up
    schedule: Literal["constant", "cosine"] = "constant"  # LR schedule after the warm-up


@dataclass
class TrainConfig:
    """The run: its folder, length, batch, precision, checkpoints and resume."""
    run_dir: str = "runs/default"   # config, checkpoints, samples, metrics.jsonl, wandb/
    steps: int = 5000               # optimizer steps
    batch_size: int = 64            # per process, per micro-batch
    grad_accum: int = 1             # micro-batches per optimizer step: global batch = batch_size x grad_accum x processes
    # auto: bf16 where the device computes it natively (a CUDA GPU with bf16; a CPU with AMX, Intel
    # Sapphire Rapids or newer), else fp32; fp16 keeps a grad scaler in every checkpoint
    mixed_precision: Annotated[Literal["no", "bf16", "fp16", "auto"],
                               tyro.conf.arg(aliases=("--mixed-precision",))] = "no"  # no (fp32), bf16, fp16 or auto
    seed: int = 0                   # everything random: initial weights, data order, noise
    log_every: int = 50             # console line + metrics.jsonl + W&B scalars
    sample_every: int = 500         # sample grid (fixed latents, EMA weights)
    ckpt_every: int = 500           # checkpoint interval (and always at the end or on a stop signal)
    keep_last: int = 3              # checkpoints kept
    ddp_bucket_mb: int = 25         # DDP gradient bucket size: larger buckets, fewer all-reduce calls (docs/scaling.md)
    # gradients cast to bf16/fp16 for the all-reduce, then back: half the bytes across nodes (docs/scaling.md);
    # the ranks still agree bit for bit, but the update differs from an fp32 all-reduce's in the last bits
    ddp_comm_hook: Literal["no", "bf16", "fp16"] = "no"  # compress DDP's gradient all-reduce
    check_every: int = 25           # steps between host syncs: non-finite losses and stop signals (always before a save)
    # each wrapped module's forward and backward as one graph (inductor: C++ on a CPU, Triton on a GPU);
    # the plain modules stay eager for R1's double backward and for sampling. Compiled once per process
    compile: bool = False           # torch.compile the modules the step runs through
    # reduce-overhead: CUDA graphs (GPU); max-autotune: also tries kernel configurations (slow to compile)
    compile_mode: Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "default"  # torch.compile's mode
    channels_last: bool = False     # NHWC memory format for modules and batches (faster convolutions)
    # auto: the newest valid checkpoint in run_dir (none there: a fresh start); none: a fresh start,
    # refused where run_dir holds checkpoints; restart: a fresh start, the earlier run's files moved
    # into run_dir/replaced-DATE/; or a checkpoint's path (newer ones in its run dir are moved aside)
    resume: Annotated[str, tyro.conf.arg(aliases=("--resume",))] = "auto"  # auto, none, restart, or a checkpoint's path
    cpu: bool = False               # force CPU even where a GPU exists
    force_unlock: bool = False      # take the run dir's lock even if another run seems to hold it


@dataclass
class LogConfig:
    """W&B and sample grids."""
    # auto: online if a key and network exist, else offline with one warning
    wandb: Annotated[Literal["auto", "online", "offline", "off"], tyro.conf.arg(aliases=("--wandb",))] = "auto"  # W&B mode
    project: str = "deepgen"        # W&B project
    group: Optional[str] = None     # W&B group
    name: Optional[str] = None      # W&B run name (default: the run_dir's name)
    num_samples: int = 64           # images in each sample grid


@dataclass
class EvalConfig:
    """Scores during training (FID/KID, legibility) of what is sampled."""
    every: int = 0                  # evaluate every N steps; 0 = off
    n: int = 2000                   # samples (and real images) per evaluation: small n biases FID up
    space: Literal["domain", "inception"] = "domain"  # feature space (see python -m jobs.evaluate)
    seed: int = 0                   # the evaluation's own RNG: the training stream is unchanged
    # the last checkpoint stays the last; this one is kept beside it, under its own name
    keep_best: bool = False         # keep what was sampled at the lowest FID as RUN/checkpoints/best


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


# what each preset is; how it was chosen, with every measurement: docs/quality.md
PRESETS = {
    # the Fashion-MNIST notebook's GAN (timsainb/tensorflow2-generative-models 2.0-GAN-fashion-mnist),
    # ported layer for layer, with its optimizers and its simultaneous two-tape step: a baseline
    "seed-gan": _preset(model=dict(family="gan", arch="seed", latent_dim=64, gan_loss="nonsat",
                                   spectral_norm=False, ema_decay=0.0, gan_update="simultaneous", one_backward=False),
                        optim=dict(lr=1e-3, lr_d=5e-3, optimizer_d="rmsprop", betas=(0.5, 0.999), eps=1e-7),
                        train=dict(batch_size=512)),
    # the TensorFlow CVAE tutorial: latent 2, Bernoulli likelihood, single-sample MC ELBO: a baseline
    "seed-vae": _preset(model=dict(family="vae", arch="seed", latent_dim=2, likelihood="bernoulli",
                                   binarize=True, kl="mc", kl_warmup_steps=0, ema_decay=0.0),
                        optim=dict(lr=1e-4, betas=(0.9, 0.999), eps=1e-7),
                        train=dict(batch_size=32)),
    # the default GAN: DCGAN G, spectral-norm DCGAN D (stride-2 convs, a last 3x3 conv), the nonsat
    # loss in the notebook's simultaneous step with G's gradient out of D's one backward pass, lazy
    # R1 every 16 steps, EMA of G, separate G/D rates, batch 128 in NHWC; without labels it is
    # self-conditioned on 30 spectral clusters of the training images
    "gan": _preset(model=dict(family="gan", arch="dcgan", latent_dim=128, gan_loss="nonsat", d_convs_per_level=1,
                              gan_update="simultaneous", r1_gamma=0.1, r1_every=16, diffaug=(), ema_decay=0.999,
                              self_condition=30),
                   optim=dict(lr=3e-3, lr_d=6e-3, betas=(0.0, 0.99)),
                   train=dict(batch_size=128, channels_last=True)),
    # a deeper conv VAE: 16-d latent, learned-variance Gaussian likelihood, KL warm-up, EMA; sampled
    # from the ex-post mixture of its training latents (gen/latent_prior.py)
    "vae": _preset(model=dict(family="vae", arch="deep", latent_dim=16, likelihood="gaussian",
                              beta=1.0, kl_warmup_steps=1000, ema_decay=0.999),
                   optim=dict(lr=1e-3, betas=(0.9, 0.999), grad_clip=1.0, warmup_steps=100)),
    # small data sets (~1k images, the 819 Pokémon): the DCGAN recipe (Radford et al.) with BatchNorm
    # in D, fed reals and fakes apart (so a batch of fakes that lacks the reals' spread is caught),
    # DiffAugment colour/translation/cutout and mirror images against memorising, EMA of G
    "gan-small-data": _preset(
        model=dict(family="gan", arch="dcgan", latent_dim=128, gan_loss="nonsat", spectral_norm=False,
                   d_batchnorm=True, r1_gamma=0.0, diffaug=("color", "translation", "cutout"), ema_decay=0.999,
                   lecam=0.3),
        data=dict(hflip=True),
        optim=dict(lr=2e-4, lr_d=2e-4, betas=(0.5, 0.999))),
}
# one line each, for --help and the README
PRESET_SUMMARY = {
    "gan": "DCGAN + spectral-norm D, one simultaneous step, lazy R1, EMA; self-conditioned on 30 clusters "
           "without labels (the default)",
    "gan-small-data": "DCGAN with BatchNorm in D, DiffAugment, LeCam on D, mirror images, EMA: for ~1k images",
    "vae": "conv VAE, 16-d latent, learned-variance Gaussian likelihood, KL warm-up, EMA, ex-post latent mixture",
    "seed-gan": "the Fashion-MNIST notebook's GAN, ported layer for layer (a baseline)",
    "seed-vae": "the TensorFlow CVAE tutorial, step for step (a baseline)",
}


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
    presets = "\n".join(f"  {name:15} {PRESET_SUMMARY.get(name, '')}" for name in PRESETS)
    description = (f"Train a GAN or VAE. These are the defaults of --preset {known.preset}.\n\nPresets (--preset NAME, "
                   f"then any option below overrides):\n{presets}\n\nShort forms: --data PATH (--data.path), --wandb, "
                   "--resume, --mixed-precision.\nGuide: README.md (workstation, SLURM cluster, your own images, "
                   "evaluating); docs/design.md.")
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
        (m.lecam >= 0, f"--model.lecam {m.lecam}: must be 0 or more"),
        (m.d_reconstruct >= 0, f"--model.d_reconstruct {m.d_reconstruct}: must be 0 or more"),
        (0 <= m.ada_target < 1, f"--model.ada_target {m.ada_target}: must be in [0, 1)"),
        (m.ada_target == 0 or m.diffaug, f"--model.ada_target {m.ada_target}: needs a --model.diffaug policy"),
        (m.ada_kimg > 0, f"--model.ada_kimg {m.ada_kimg}: must be positive"),
        (m.d_reconstruct == 0 or m.arch == "dcgan",
         f"--model.d_reconstruct {m.d_reconstruct}: only the dcgan D has the decoder (--model.arch dcgan)"),
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
        (not e.keep_best or e.every > 0, "--eval.keep_best needs --eval.every N (the FID curve it keeps the best of)"),
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
