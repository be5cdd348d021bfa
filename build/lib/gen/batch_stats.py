"""BatchNorm statistics that belong to the weights being sampled ("precise BN", Wu & Johnson 2021).

A generator with BatchNorm normalises by running statistics in eval mode. The live generator's
running statistics follow its last ~10 training batches (momentum 0.1), and an EMA copy of the
weights has no statistics of its own at all: copied from the live generator, they normalise the
averaged weights with another network's activations (a GAN's MNIST FID went from 4.3 to 62.7 that
way, and moved by 12 points between checkpoints three steps apart). So before a generator is
sampled or saved, its statistics are recomputed from its own activations: every BatchNorm's
running mean and variance reset, then a cumulative average over `batches` forward passes of
fresh latents (deterministic for a seed, from a private RNG), then eval mode.

    from gen.batch_stats import recompute_batch_stats
    recompute_batch_stats(G, lambda m, z, y: m(z, y), latent_dim=128,
                          draw_labels=lambda n, rng: torch.randint(10, (n,), generator=rng))
"""
import os

import torch
from torch import nn

# 40 batches of 256: the statistics of ~10k generated images; their run-to-run spread is far
# below a checkpoint's (tests/test_sampling.py checks them against the activations themselves)
BATCHES, BATCH_SIZE = 40, 256


def default_batches():
    # the tests that do not check the statistics themselves checkpoint every step: fewer batches
    return int(os.environ.get("DEEPGEN_BN_BATCHES", BATCHES))


def batch_norms(module):
    """The BatchNorm layers that keep running statistics (what eval mode normalises with)."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def recompute_batch_stats(module, forward, latent_dim, draw_labels=None, batches=None, batch_size=BATCH_SIZE,
                          seed=0, device=None):
    """Set `module`'s BatchNorm running statistics to the average of its own per-batch statistics
    over `batches` batches of N(0, I) latents (and labels drawn as sampling draws them,
    `draw_labels(n, generator)`: the family's draw_labels; None: zeros), then leave it in eval mode.
    `forward(module, z, labels)` runs the generator. No-op (but eval mode) without BatchNorm.
    Only the BatchNorm layers run in train mode; the caller's RNG streams are untouched."""
    norms = batch_norms(module)
    batches = batches or default_batches()
    module.eval()
    if not norms:
        return module
    device = device or next(module.parameters()).device
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: each batch weighs the same
        m.train()
    rng = torch.Generator().manual_seed(seed)
    try:
        for _ in range(batches):
            z = torch.randn(batch_size, latent_dim, generator=rng)
            labels = (draw_labels(batch_size, rng) if draw_labels is not None
                      else torch.randint(1, (batch_size,), generator=rng))
            forward(module, z.to(device), labels.to(device))
    finally:
        for m, momentum in zip(norms, momenta):
            m.momentum = momentum
        module.eval()
    return module
