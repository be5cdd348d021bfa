"""Sample grids, interpolations and reconstructions; models rebuilt from a checkpoint alone.

    python -m jobs.sample runs/mnist-gan --out samples.png --n 64
"""
import io
import os
from pathlib import Path

import torch
from torchvision.utils import make_grid, save_image


def save_grid(images, path, nrow=None):
    """images in [-1, 1] (B, C, H, W) -> PNG grid, written atomically; returns the grid in [0, 1]."""
    images = (images.detach().float().cpu() + 1) / 2
    nrow = nrow or max(1, int(len(images) ** 0.5))
    grid = make_grid(images, nrow=nrow, padding=2, pad_value=1.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    save_image(grid, buf, format="png")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return grid


def slerp(a, b, t):
    """Spherical interpolation between latent batches (Gaussian latents keep their norm)."""
    a_n, b_n = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
    omega = torch.acos((a_n * b_n).sum(-1, keepdim=True).clamp(-1 + 1e-7, 1 - 1e-7))
    so = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / so) * a + (torch.sin(t * omega) / so) * b
