"""Quality of generated images, measured beside the floors of the same feature space and count.

    ev = Evaluator("data/mnist", n=10000, space="domain")    # real features and floors, once
    scores = ev.score(images)                                 # any sample set in [-1, 1]

FID and KID come from torchmetrics (its Fréchet distance and polynomial-kernel MMD, fed our
features through an identity 'feature network'), precision / recall / density / coverage from
the `prdc` package (Naeem et al. 2020, k = 5). Every score is printed beside:
  real vs real   two disjoint halves of the real data: the floor a perfect model reaches
  blurred real   real images under a Gaussian blur (a 'blurry VAE' reference)
  noise          uniform noise: the ceiling
With labeled data the domain classifier also gives class coverage (histogram of the predicted
classes of the samples) and legibility (share labeled with probability >= 0.9), beside the
same share on held-out real images.
"""
import contextlib
import io
import logging
import time

import torch
from torch import nn

from . import features as feats
from .data import load_real
from .errors import UserError

log = logging.getLogger("gen.metrics")
LEGIBLE_P = 0.9
SMALL_N = 2048  # below this FID is strongly biased upward


class _Identity(nn.Module):
    """Lets torchmetrics' FID/KID run on features we computed once."""

    def __init__(self, num_features):
        super().__init__()
        self.num_features = num_features

    def forward(self, x):
        return x


def fid(real_f, fake_f):
    from torchmetrics.image.fid import FrechetInceptionDistance
    metric = FrechetInceptionDistance(feature=_Identity(real_f.shape[1]), reset_real_features=False)
    metric.update(real_f.double(), real=True)
    metric.update(fake_f.double(), real=False)
    return float(metric.compute())


def kid(real_f, fake_f, subsets=50, subset_size=1000, seed=0):
    """(mean, std) of the unbiased MMD^2 with the cubic polynomial kernel over random subsets."""
    import warnings

    from torchmetrics.image.kid import KernelInceptionDistance
    warnings.filterwarnings("ignore", message="Metric `Kernel Inception Distance` will save all")
    size = min(subset_size, len(real_f), len(fake_f))
    metric = KernelInceptionDistance(feature=_Identity(real_f.shape[1]), subsets=subsets, subset_size=size,
                                     reset_real_features=False)
    metric.update(real_f.double(), real=True)
    metric.update(fake_f.double(), real=False)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the subsets are drawn from torch's global RNG
        mean, std = metric.compute()
    return float(mean), float(std)


def prdc(real_f, fake_f, k=5):
    import prdc as prdc_lib
    with contextlib.redirect_stdout(io.StringIO()):  # it prints the sample counts
        out = prdc_lib.compute_prdc(real_f.numpy(), fake_f.numpy(), nearest_k=k)
    return {name: float(v) for name, v in out.items()}


def scores(real_f, fake_f, seed=0, with_prdc=True):
    out = {"fid": fid(real_f, fake_f)}
    out["kid_mean"], out["kid_std"] = kid(real_f, fake_f, seed=seed)
    if with_prdc:
        out.update(prdc(real_f, fake_f))
    return out


def gaussian_blur(images, sigma=1.5):
    from torchvision.transforms.functional import gaussian_blur as blur
    k = int(2 * round(3 * sigma) + 1)
    return blur(images, [k, k], [sigma, sigma])


def label_scores(probs, num_classes):
    """Legibility and the predicted-class histogram of a set of images."""
    conf, cls = probs.max(dim=1)
    hist = torch.bincount(cls, minlength=num_classes).float() / len(cls)
    return {"legibility": float((conf >= LEGIBLE_P).float().mean()), "class_hist": hist.tolist(),
            "class_min": float(hist.min()), "class_max": float(hist.max())}


class Evaluator:
    """Real-data features and floors computed once; `score(images)` then rates any sample set.
    Used by jobs.evaluate and, with a smaller n, every --eval.every steps during training."""

    def __init__(self, shards, n=10000, space="domain", seed=0, inception_weights=None, device="cpu",
                 split="train", with_prdc=True, progress=True):
        t0 = time.perf_counter()
        self.seed, self.device, self.with_prdc = seed, device, with_prdc
        self.domain, self.domain_info = feats.domain_net(shards, seed=seed, split=split, progress=progress)
        self.domain.to(device)
        if space == "inception":
            weights = feats.find_inception_weights(inception_weights)
            if weights is None:
                log.warning("no Inception weights on disk: torch-fidelity will try to download them")
            try:
                self.features = feats.InceptionFeatures(weights).to(device).eval()
            except OSError as e:  # URLError included: no network and no weights
                raise feats.DataError(f"cannot get the Inception weights ({type(e).__name__}: {e}); pass "
                                      f"--inception-weights PATH or put {feats.INCEPTION_FILE} in {feats.cache_dir()} "
                                      "(README: Inception weights), or use --space domain") from None
            self.space = f"inception-v3 pool3 (2048-d){'' if weights is None else f', weights {weights}'}"
        elif space == "domain":
            self.features = self.domain
            kind = self.domain_info["kind"]
            acc = self.domain_info.get("held_out_accuracy")
            self.space = (f"domain {kind} ({self.domain.num_features}-d, key {self.domain_info['key']}"
                          + (f", held-out accuracy {acc:.4f}" if acc is not None else "") + ")")
        else:
            raise UserError(f"unknown feature space {space!r} (domain or inception)")
        real, _ = load_real(shards, split, limit=2 * n, seed=seed)
        half = len(real) // 2
        self.n = min(n, half)
        if self.n < n:
            log.warning("only %d real images: scores use n=%d per set (asked for %d)", len(real), self.n, n)
        if self.n < SMALL_N:
            log.warning("n=%d < %d: FID is biased upward at small n; compare runs only at the same n", self.n, SMALL_N)
        real_a, real_b = feats.to_float(real[:self.n]), feats.to_float(real[half:half + self.n])
        self.real_f = self.embed(real_a)
        self.floors = {
            "real_vs_real": scores(self.real_f, self.embed(real_b), seed, with_prdc),
            "blurred_real": scores(self.real_f, self.embed(gaussian_blur(real_b)), seed, with_prdc),
            "noise": scores(self.real_f, self.embed(self._noise(real_b.shape)), seed, with_prdc),
        }
        self.labeled = self.domain_info["kind"] == "classifier"
        if self.labeled:
            held_x, _ = feats.held_out_real(shards, seed=seed, split=split)
            self.floors["real_vs_real"].update(self.label_scores(feats.to_float(held_x)))
        self.setup_s = time.perf_counter() - t0

    def _noise(self, shape):
        g = torch.Generator().manual_seed(self.seed + 1)
        return torch.rand(shape, generator=g) * 2 - 1

    def embed(self, images):
        return feats.batched(self.features, images, device=self.device)

    def label_scores(self, images):
        probs = feats.batched(self.domain.probs, images, device=self.device)
        return label_scores(probs, self.domain_info["num_classes"])

    def score(self, images):
        out = scores(self.real_f, self.embed(images), self.seed, self.with_prdc)
        if self.labeled:
            out.update(self.label_scores(images))
        return out
