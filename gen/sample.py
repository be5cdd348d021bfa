"""Sample grids, interpolations and reconstructions; models rebuilt from a checkpoint alone.

    python -m jobs.sample runs/mnist-gan --out samples.png --n 64
"""
import io
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image

from .shard_format import atomic_write_bytes


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

    def latents(self, n, seed=0, truncation=None):
        return truncated_normal((n, self.latent_dim), truncation, torch.Generator().manual_seed(seed))

    def default_labels(self, n):
        return torch.arange(n) % max(self.num_classes, 1)

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
        mean, _ = self.module.encoder(x.to(self.device), labels.to(self.device) if self.config.model.conditional else None)
        return mean.float().cpu()


def load_generator(path, device="cpu"):
    """A Sampler from a run dir (newest checkpoint), a checkpoint folder or an export folder.
    Reads only the config and the safetensors weights: nothing is unpickled."""
    from .checkpoint import load_sampling_module
    family, module, cfg, meta = load_sampling_module(path, device)
    return Sampler(family, module, cfg, meta, device)
