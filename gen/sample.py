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


def load_for_sampling(run_or_checkpoint, device="cpu"):
    """(family, module, config, meta) rebuilt from a checkpoint folder and its meta.json alone;
    a run dir means its newest checkpoint. The EMA weights are used when the run kept them."""
    from safetensors.torch import load_file

    from .checkpoint import checkpoints, read_meta
    from .config import from_dict
    from .families import build_family

    path = Path(run_or_checkpoint)
    if not (path / "meta.json").is_file():
        found = checkpoints(path)
        if not found:
            raise FileNotFoundError(f"{path}: no complete checkpoint (checkpoints/checkpoint-*/meta.json)")
        path = found[0][1]
    meta = read_meta(path)
    cfg = from_dict(meta["config"])
    num_classes = meta.get("num_classes", 0)
    family = build_family(cfg.model, cfg.optim, tuple(meta["shape"]), num_classes)
    names = list(family.modules)
    target = family.ema_target
    module = family.modules[target]
    ema_file = path / "custom_checkpoint_0.pkl"
    if cfg.model.ema_decay > 0 and ema_file.is_file():
        state = torch.load(ema_file, map_location="cpu", weights_only=False)
        module.load_state_dict({k[len("module."):]: v for k, v in state.items() if k.startswith("module.")})
    else:  # accelerate names the i-th prepared model model.safetensors, model_1.safetensors, ...
        i = names.index(target)
        module.load_state_dict(load_file(path / ("model.safetensors" if i == 0 else f"model_{i}.safetensors")))
    return family, module.to(device).eval(), cfg, meta
