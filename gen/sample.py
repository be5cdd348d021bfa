"""Sample grids, interpolations (PNG and GIF), npz files, reconstructions and latent figures;
models rebuilt from a checkpoint or export alone.

    python -m jobs.sample runs/mnist-gan --out samples.png --n 64
"""
import copy
import io
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import extract_model_from_parallel
from torchvision.utils import make_grid, save_image

from . import latent_prior
from .batch_stats import batch_norms, recompute_batch_stats
from .artifacts import load_sampling_module
from .data import make_loader, to_uint8
from .durable import atomic_write_bytes
from .shard_format import read_manifest


def save_grid(images, path, nrow=None):
    """images in [-1, 1] (B, C, H, W) -> PNG grid, written atomically; returns the grid in [0, 1]."""
    images = (images.detach().float().cpu() + 1) / 2
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    save_image(grid, buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return grid


def slerp(a, b, t):
    """Spherical interpolation between latent batches (Gaussian latents keep their norm)."""
    a_n, b_n = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b


def truncated_normal(shape, threshold, generator=None):
    """BigGAN's truncation trick: N(0, I) with every |z_i| > threshold redrawn (trades variety for fidelity)."""
    z = torch.randn(shape, generator=generator)
    while threshold and (bad := z.abs() > threshold).any():
        z[bad] = torch.randn(int(bad.sum()), generator=generator)
    return z


class Sampler:
    """A trained generator (GAN) or decoder (VAE), rebuilt from safetensors + config alone.

        g = gen.load_generator("runs/mnist-gan")   # a run dir, a checkpoint or an export folder
        images = g.sample(16, seed=0)               # (16, C, H, W) in [-1, 1]
    """

    def __init__(self, family, module, cfg, meta, device="cpu"):
        self.family, self.module, self.config, self.meta, self.device = family, module, cfg, meta, device
        self.latent_dim = cfg.model.latent_dim
        self.num_classes = meta.get("num_classes", 0)
        self.class_names = meta.get("class_names")
        self.shape = tuple(meta["shape"])
        self.is_vae = cfg.model.family == "vae"
        self.prior = None  # a VAE's ex-post latent density (gen.latent_prior); None: N(0, I)

    @property
    def prior_name(self):
        return "N(0, I)" if self.prior is None else f"ex-post mixture ({len(self.prior['weights'])} Gaussians)"

    def latents(self, n, seed=0, truncation=None):
        if self.prior is not None:
            return latent_prior.sample(self.prior, n, torch.Generator().manual_seed(seed))
        return truncated_normal((n, self.latent_dim), truncation, torch.Generator().manual_seed(seed))

    def default_labels(self, n):
        """The family's: classes 0, 1, ... in turn; a self-conditioned GAN's clusters in proportion to their sizes."""
        return self.family.sample_labels(self.module, n)

    @torch.no_grad()
    def generate(self, z, labels=None, batch_size=500):
        """Images in [-1, 1] on the CPU, generated in batches on the sampler's device."""
        labels = self.default_labels(len(z)) if labels is None else labels
        out = [self.family.generate(self.module, z[i:i + batch_size].to(self.device),
                                    labels[i:i + batch_size].to(self.device)).cpu()
               for i in range(0, len(z), batch_size)]
        return torch.cat(out) if out else torch.empty(0, *self.shape)

    def sample(self, n, seed=0, labels=None, truncation=None):
        return self.generate(self.latents(n, seed, truncation), labels)

    @torch.no_grad()
    def reconstruct(self, x, labels=None):
        labels = self.default_labels(len(x)) if labels is None else labels
        return self.family.reconstruct(self.module, x.to(self.device), labels.to(self.device)).cpu()

    @torch.no_grad()
    def encode(self, x, labels=None):
        """VAE posterior means."""
        labels = self.default_labels(len(x)) if labels is None else labels
        mean, _ = self.module.encoder(x.to(self.device), self.family.labels(labels.to(self.device)))
        return mean.float().cpu()

    @torch.no_grad()
    def elbo(self, x, labels=None, seed=0, batch_size=500):
        """VAE: each image's evidence lower bound in nats (one posterior sample, analytic KL), under
        the model's own likelihood (Bernoulli on binarised pixels for seed-vae, Gaussian on [-1, 1])."""
        labels = self.default_labels(len(x)) if labels is None else labels
        out = []
        with torch.random.fork_rng(devices=[self.device] if str(self.device).startswith("cuda") else []):
            torch.manual_seed(seed)
            for i in range(0, len(x), batch_size):
                nll, kl = self.family.elbo_terms(self.module, self.module.log_sigma, x[i:i + batch_size].to(self.device),
                                                 self.family.labels(labels[i:i + batch_size].to(self.device)),
                                                 kl="analytic")
                out.append(-(nll + kl).cpu())
        return torch.cat(out)


# ----------------------------------------------------------------------------- what is sampled

def sampler_for(family, module, cfg, meta, device="cpu", seed=0, choose=True):
    """The one sampling policy, for a trained target module (the EMA copy, or the live module
    without EMA): a copy of it in eval mode whose BatchNorm statistics are recomputed from its
    own activations (gen.batch_stats), and the family's latent prior (a VAE's ex-post mixture,
    fitted on the training images the family kept: its size chosen where `choose`). Training-time
    grids, --eval.every, checkpoints (sampling.safetensors, latent_prior.safetensors) and so
    every later load_generator, jobs.sample/evaluate/export, the report and the bench sample this."""
    # fp32, as load_generator samples: a copy of a module Accelerate prepared for mixed precision
    # keeps its autocast-wrapped forward (bf16 grids would differ from the checkpoint's)
    module = extract_model_from_parallel(copy.deepcopy(module), keep_fp32_wrapper=False).to(device)
    recompute_batch_stats(module, family.generate, cfg.model.latent_dim, _labels_of(family, module), seed=seed,
                          device=device)
    g = Sampler(family, module, cfg, dict(meta, batch_stats="recomputed"), device)
    g.prior = family.sampling_prior(g, seed, choose)
    return g


class StepSampler:
    """What a training run samples at a step (sampler_for), made at most once per step for the
    grid, the evaluation and the checkpoint together, under its own RNG (the training stream is the
    same with it or without). A VAE's mixture size is chosen where a checkpoint is written."""

    def __init__(self, family, cfg, meta, device, rng_devices):
        self.family, self.cfg, self.meta, self.device, self.rng_devices = family, cfg, meta, device, rng_devices
        self.cache = {}

    def at(self, step, module):
        if step not in self.cache:
            self.cache.clear()
            tc = self.cfg.train
            with torch.random.fork_rng(devices=self.rng_devices):
                self.cache[step] = sampler_for(self.family, module, self.cfg, self.meta, self.device, seed=tc.seed,
                                               choose=step % tc.ckpt_every == 0 or step == tc.steps)
        return self.cache[step]


def _labels_of(family, module):
    return lambda n, generator: family.draw_labels(module, n, generator)


def load_generator(path, device="cpu", prior="auto", data=None):
    """A Sampler from a run dir (newest checkpoint), a checkpoint folder or an export folder.
    Reads only the config and safetensors files: nothing is unpickled. The weights come with the
    BatchNorm statistics and (VAE) latent mixture saved beside them by sampler_for; files from
    before those were saved get them recomputed here (the mixture fitted on the run's shards and
    cached in the run dir), and so does a mixture asked for on other shards (`data`).
    prior="normal": a VAE samples N(0, I) instead."""
    family, module, cfg, meta, saved_prior = load_sampling_module(path, device)
    if meta.get("batch_stats") != "recomputed" and batch_norms(module):
        recompute_batch_stats(module, family.generate, cfg.model.latent_dim, _labels_of(family, module), device=device)
    g = Sampler(family, module, cfg, meta, device)
    if g.is_vae and prior == "auto":
        other_data = data is not None and Path(data).resolve() != Path(cfg.data.path).resolve()
        g.prior = saved_prior if saved_prior is not None and not other_data else latent_prior.load_or_fit(g, path, data)
    return g


# ----------------------------------------------------------------------------- figures a user looks at

def write_npz(g, path, n, seed, truncation, batch=1000):
    """uint8 NHWC `arr_0`, the convention of the common GAN evaluation tools."""
    from tqdm import tqdm

    out = np.empty((n, g.shape[1], g.shape[2], g.shape[0]), dtype=np.uint8)
    z = g.latents(n, seed, truncation)
    for i in tqdm(range(0, n, batch), desc="npz", unit="batch"):
        images = g.generate(z[i:i + batch], g.default_labels(n)[i:i + batch])
        out[i:i + batch] = to_uint8(images).permute(0, 2, 3, 1).numpy()
    buf = io.BytesIO()
    np.savez(buf, arr_0=out)
    atomic_write_bytes(path, buf.getvalue())


def write_gif(frames, path, ms=120):
    """frames: list of grids in [0, 1] (C, H, W); played forward then back. Enlarged (nearest
    neighbour) to at least 128 px high: a row of 28 px digits is otherwise too small to watch."""
    from PIL import Image

    images = [Image.fromarray(f.mul(255).round().byte().permute(1, 2, 0).squeeze(-1).numpy()) for f in frames]
    scale = max(1, 128 // images[0].height)
    images = [im.resize((im.width * scale, im.height * scale), Image.NEAREST) for im in images]
    if images[0].mode == "RGB":  # fast octree: ~35x faster than GIF's default median cut, as good to the eye
        images = [im.quantize(256, method=Image.Quantize.FASTOCTREE) for im in images]
    images = images + images[-2:0:-1]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=ms, loop=0)
    atomic_write_bytes(path, buf.getvalue())


def interpolations(g, out, steps, seed, truncation):

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
        atomic_write_bytes(out / "latent_scatter.png", buf.getvalue())
        written += ["manifold.png", "latent_scatter.png"]
    return written


def write_figures(g, out, seed=0, n=64, steps=10, truncation=None):
    """Every picture jobs.sample writes, for a Sampler; returns the file names."""
    out = Path(out)
    save_grid(g.sample(min(n, 256), seed=seed, truncation=truncation), out / "samples.png")
    interpolations(g, out, steps, seed, truncation)
    written = ["samples.png", "interpolations.png", "interpolations.gif"]
    if g.num_classes and g.config.model.conditional:
        per = 10
        labels = torch.arange(g.num_classes).repeat_interleave(per)
        save_grid(g.generate(g.latents(len(labels), seed + 3, truncation), labels), out / "classes.png", nrow=per)
        written.append("classes.png")
    if g.is_vae and Path(g.config.data.path, "manifest.json").is_file():
        written += vae_figures(g, out, g.config.data.path)
    return written
