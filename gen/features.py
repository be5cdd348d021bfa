"""Feature spaces for evaluation: every metric is computed on features of images in [-1, 1].

    inception  the standard Inception-v3 pool features (2048-d) as torch-fidelity / torchmetrics
               compute them (FID's reference network), from --inception-weights or their cache
    domain     a small network deepgen trains on the real shards themselves, offline, in minutes
               on a CPU: a classifier when the shards are labeled (its penultimate layer, and its
               class probabilities for legibility and class coverage), else a contrastive
               (SimCLR) encoder. Cached per data set, keyed by the shards' sha256s and the seed.

Scores in different feature spaces are not comparable; the output always names the space.
"""
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import load_real, to_float, to_uint8
from .durable import atomic_save_tensors, atomic_write_bytes
from .shard_format import DataError, read_manifest

log = logging.getLogger("gen.features")
DOMAIN_VERSION = 1  # bump when the domain nets or their training change: old caches are not reused
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name for the FID weights


def cache_dir():
    return Path(os.environ.get("DEEPGEN_CACHE", Path.home() / ".cache" / "deepgen"))


# ----------------------------------------------------------------------------- domain networks

class DomainNet(nn.Module):
    """Conv encoder -> `num_features`-d features; a linear head gives class logits (classifier)
    or a projection for the contrastive loss. Forward returns the features."""

    def __init__(self, channels, size, num_classes, width=24, num_features=128):
        super().__init__()
        layers, c, s = [], channels, size
        for i in range(4 if size >= 64 else 3):
            c_out = width * 2 ** min(i, 2)
            layers += [nn.Conv2d(c, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, 1, 1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c, s = c_out, s // 2
        self.encoder = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                     nn.Linear(c, num_features), nn.BatchNorm1d(num_features), nn.ReLU())
        self.num_features = num_features
        self.head = nn.Linear(num_features, num_classes) if num_classes else \
            nn.Sequential(nn.Linear(num_features, num_features), nn.ReLU(), nn.Linear(num_features, 64))
        self.num_classes = num_classes

    def forward(self, x):
        return self.encoder(x)

    @torch.no_grad()
    def probs(self, x):
        return self.head(self.encoder(x)).softmax(dim=1)


def _augment(x, gen, strength):
    """Random translation (+-12 %), and for the contrastive net also flips, crops and colour
    jitter: what must not change an image's identity."""
    b, c, h, w = x.shape
    theta = torch.zeros(b, 2, 3)
    scale = 1 - strength * 0.35 * torch.rand(b, generator=gen)  # zoom in up to 35 %: a random crop
    flip = torch.where(torch.rand(b, generator=gen) < 0.5 * strength, -1.0, 1.0) if c == 3 else torch.ones(b)
    theta[:, 0, 0], theta[:, 1, 1] = scale * flip, scale
    theta[:, :, 2] = (torch.rand(b, 2, generator=gen) - 0.5) * 0.25
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    # pad with the background colour (the corner pixel): white for the Pokémon, black for digits
    background = x[:, :, :1, :1]
    out = F.grid_sample(x - background, grid, padding_mode="zeros", align_corners=False) + background
    if strength and c == 3:
        out = out * (1 + strength * 0.4 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)) \
            + strength * 0.4 * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5)
        gray = out.mean(dim=1, keepdim=True)
        out = gray + (out - gray) * (1 + strength * (torch.rand(b, 1, 1, 1, generator=gen) - 0.5))
    return out.clamp(-1, 1)


def _nt_xent(z1, z2, temperature=0.2):
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.t() / temperature
    sim.fill_diagonal_(float("-inf"))
    n = len(z1)
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
    return F.cross_entropy(sim, targets)


def train_domain_net(images, labels, num_classes, seed=0, steps=None, batch_size=None, progress=True):
    """A classifier (num_classes > 0) or a SimCLR encoder on uint8 images. Deterministic for a seed."""
    from tqdm import tqdm
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    _, c, size, _ = images.shape
    net = DomainNet(c, size, num_classes)
    steps, batch_size = steps or _domain_steps(), batch_size or _domain_batch()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps)
    net.train()
    bar = tqdm(range(steps), desc=f"training the domain {'classifier' if num_classes else 'encoder'}",
               disable=not progress, mininterval=2.0)
    for _ in bar:
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        x = to_float(images[idx])
        if num_classes:
            loss = F.cross_entropy(net.head(net(_augment(x, gen, 0.0))), labels[idx])
        else:
            loss = _nt_xent(net.head(net(_augment(x, gen, 1.0))), net.head(net(_augment(x, gen, 1.0))))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    return net.eval()


def _domain_steps():
    return int(os.environ.get("DEEPGEN_DOMAIN_STEPS", 600))  # tests train shorter nets


DOMAIN_BATCH = 128


def _domain_batch():
    return int(os.environ.get("DEEPGEN_DOMAIN_BATCH", DOMAIN_BATCH))  # and on smaller batches (128 px)


def _domain_key(manifest, split, seed):
    shards = sorted(s["sha256"] for sp in manifest["splits"].values() for s in sp["shards"])
    batch = _domain_batch()
    batch = [batch] if batch != DOMAIN_BATCH else []  # (caches from before the knob: no batch)
    text = json.dumps([DOMAIN_VERSION, shards, split, manifest["image_size"], manifest["channels"], seed, _domain_steps(),
                       *batch])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def domain_net(shards, seed=0, split="train", progress=True):
    """(DomainNet, info) for a shard folder: loaded from the cache, or trained (and cached).
    info: kind (classifier | contrastive), held-out accuracy, which images were held out."""
    from safetensors.torch import load_file
    manifest = read_manifest(shards)
    num_classes = len(manifest.get("class_names") or [])
    key = _domain_key(manifest, split, seed)
    path = cache_dir() / "domain" / f"{manifest.get('dataset', 'data')}-{key}"
    c, size = manifest["channels"], manifest["image_size"]
    if (path.with_suffix(".json")).is_file() and path.with_suffix(".safetensors").is_file():
        info = json.loads(path.with_suffix(".json").read_text())
        net = DomainNet(c, size, info["num_classes"])
        net.load_state_dict(load_file(str(path.with_suffix(".safetensors"))))
        return net.eval(), info
    images, labels = load_real(shards, split, seed=seed)
    held_out = _held_out_mask(len(images), manifest, split)
    labeled = num_classes and bool((labels >= 0).all())
    net = train_domain_net(images[~held_out], labels[~held_out], num_classes if labeled else 0, seed, progress=progress)
    info = {"kind": "classifier" if labeled else "contrastive", "num_classes": num_classes if labeled else 0,
            "seed": seed, "split": split, "trained_on": int((~held_out).sum()), "key": key,
            "class_names": manifest.get("class_names") if labeled else None}
    test_x, test_y = _held_out_images(shards, manifest, split, images, labels, held_out, seed)
    if labeled:
        probs = batched(net.probs, to_float(test_x))
        info["held_out_accuracy"] = float((probs.argmax(1) == test_y).float().mean())
        info["held_out_count"] = len(test_y)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path.with_suffix(".safetensors"), net.state_dict())
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(info, indent=1).encode())
    return net, info


def _held_out_mask(n, manifest, split):
    """With a test split, nothing of the training split is held out; without one (the offline
    MNIST digits), every 10th image in the seeded order is."""
    if "test" in manifest["splits"] and split != "test":
        return torch.zeros(n, dtype=torch.bool)
    return torch.arange(n) % 10 == 9


def _held_out_images(shards, manifest, split, images, labels, held_out, seed):
    if held_out.any():
        return images[held_out], labels[held_out]
    return load_real(shards, "test", seed=seed)


def held_out_real(shards, seed=0, split="train"):
    """Real images the domain network never saw: the test split, or the held-out tenth."""
    manifest = read_manifest(shards)
    images, labels = load_real(shards, split, seed=seed)
    return _held_out_images(shards, manifest, split, images, labels, _held_out_mask(len(images), manifest, split), seed)


# ----------------------------------------------------------------------------- Inception

class InceptionFeatures(nn.Module):
    """FID's Inception-v3 (torchmetrics' port of torch-fidelity's network) on images in [-1, 1]:
    grayscale is repeated to RGB, values go to uint8 as the reference implementation expects."""

    def __init__(self, weights_path=None):
        super().__init__()
        from torchmetrics.image.fid import NoTrainInceptionV3
        self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                      feature_extractor_weights_path=str(weights_path) if weights_path else None)
        self.num_features = 2048

    def forward(self, x):
        x = to_uint8(x)
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        return self.net(x).reshape(len(x), -1)


def find_inception_weights(path=None):
    """The FID Inception weights: --inception-weights, $DEEPGEN_CACHE, or torch's hub cache
    (where torch-fidelity downloads them when online). None if none is on disk."""
    candidates = [Path(path)] if path else []
    candidates += [cache_dir() / INCEPTION_FILE, Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE]
    if path and not Path(path).is_file():
        raise DataError(f"--inception-weights {path}: no such file")
    return next((p for p in candidates if p.is_file()), None)


@torch.no_grad()
def batched(fn, images, batch_size=500, device="cpu"):
    """fn over float images in batches (on `device`), results concatenated on the CPU."""
    out = [fn(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out)
