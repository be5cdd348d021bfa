"""Quality of generated images, measured beside the floors of the same feature space and count.

    results, evaluator, sampler = evaluate_run("runs/mnist-gan", n=10000, space="domain")

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
            raise ValueError(f"unknown feature space {space!r} (domain or inception)")
        real, _ = feats.load_real(shards, split, limit=2 * n, seed=seed)
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


def seed_spread(ev, g, seed, seeds, first, truncation=None):
    """FID and KID of `seeds` sample sets (sample seeds seed+1000, +1001, ...; `first` is the first
    one's scores) as {"fid_seeds": [...], "fid_range": [lo, hi], likewise kid}: the noise two
    models or checkpoints are held against (a difference inside it is no difference)."""
    fids, kids = [first["fid"]], [first["kid_mean"]]
    for i in range(1, seeds):
        s = scores(ev.real_f, ev.embed(g.sample(ev.n, seed=seed + 1000 + i, truncation=truncation)), ev.seed,
                   with_prdc=False)
        fids.append(s["fid"])
        kids.append(s["kid_mean"])
    return {"fid_seeds": fids, "fid_range": [min(fids), max(fids)], "kid_seeds": kids, "kid_range": [min(kids), max(kids)]}


def evaluate_run(run, data=None, n=10000, space="auto", seed=0, inception_weights=None, truncation=None,
                 device="cpu", seeds=3):
    """Score a run and write RUN/eval/metrics.json; returns (results, evaluator, sampler). FID and
    KID also over `seeds` sample seeds (seed_spread)."""
    from .checkpoint import run_dir_of
    from .sample import load_generator
    from .shard_format import atomic_write_json
    g = load_generator(run, device=device, data=data)
    data = data or g.config.data.path
    if space == "auto":
        space = "inception" if feats.find_inception_weights(inception_weights) else "domain"
    t0 = time.perf_counter()
    ev = Evaluator(data, n=n, space=space, seed=seed, inception_weights=inception_weights, device=device)
    t1 = time.perf_counter()
    extra = {}
    if g.is_vae:  # scored as sampled (the ex-post latent mixture), and beside it from N(0, I)
        prior, g.prior = g.prior, None
        extra["model_normal_prior"] = ev.score(g.sample(ev.n, seed=seed + 1000))
        g.prior = prior
        extra["prior"] = g.prior_name
    model = ev.score(g.sample(ev.n, seed=seed + 1000, truncation=truncation))
    model.update(seed_spread(ev, g, seed, seeds, model, truncation))
    results = {"run": str(run), "step": g.meta.get("step"), "data": str(data), "n": ev.n, "requested_n": n, "space": ev.space,
               "seed": seed, "seeds": seeds, "truncation": truncation, "model": model, **extra, "floors": ev.floors,
               "domain_net": ev.domain_info, "seconds": {"setup": round(t1 - t0, 1),
                                                         "sample_and_score": round(time.perf_counter() - t1, 1)}}
    out = run_dir_of(run) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "metrics.json", results)
    return results, ev, g


def nearest_neighbours(queries, references, chunk=1000):
    """Each query row's Euclidean distance to its nearest reference row, and that row's index."""
    queries, references = queries.flatten(1).float(), references.flatten(1).float()
    found = [torch.cdist(queries[i:i + chunk], references).min(dim=1) for i in range(0, len(queries), chunk)]
    return torch.cat([f.values for f in found]), torch.cat([f.indices for f in found])


def nearest_distances(queries, references, chunk=1000):
    """Each query row's Euclidean distance to its nearest reference row."""
    return nearest_neighbours(queries, references, chunk)[0]


def with_mirrors(images, mirrored=True):
    """The images followed by their left-right mirror images (a model trained with --data.hflip saw both)."""
    return torch.cat([images, images.flip(-1)]) if mirrored else images


def _bootstrap_low(values, q, resamples=2000, seed=0):
    """The 5th percentile of each quantile q over bootstrap resamples of `values`: how low that
    quantile of a set this size comes out by chance (the p5 of 82 held-out Pokemon is their 4th
    smallest value, so it moves a lot)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(values), (resamples, len(values)), generator=g)
    return torch.quantile(torch.quantile(values[idx], q, dim=1), 0.05, dim=1).tolist()


def copy_check(samples, train, held_out, embed, tolerance=0.1, mirrored=False):
    """Memorisation check, in pixels and in `embed`'s features: each sample's distance to its
    nearest training image, beside the same for real images the model never saw (held out).
    `closer_than_held_out`: the samples' 5th percentile or median lies more than `tolerance` (10 %)
    below the held-out images'. Alone that also fires for samples that are merely close to
    everything: on a white page a blurry, barely trained generator's blobs sit nearer every real
    image (training or not) than real images sit to each other. So each distance is also taken
    relative to the same point's distance to its nearest held-out image (for a held-out image: the
    nearest other one; both sides against the same number of held-out images). A copy is near
    its training image only, so its relative distance drops; a blob's does not. `copied` needs
    both, the relative quantile below the held-out one by more than `tolerance` and by more than
    its bootstrap noise (_bootstrap_low). mirrored: the model also trained on left-right mirror
    images (--data.hflip), so they count as training images, and the held-out images' mirrors as
    held-out ones."""
    n, q = len(held_out), torch.tensor([0.05, 0.5])
    copies = 2 if mirrored else 1
    rest = torch.ones(copies * n, dtype=torch.bool)
    rest[n - 1::n] = False  # samples meet n - 1 held-out images (and mirrors), as each held-out image meets the others
    out = {}
    for space, f in (("pixels", lambda x: x), ("features", embed)):
        train_f = f(with_mirrors(train, mirrored))
        held_f, samples_f = f(with_mirrors(held_out, mirrored)), f(samples)
        d_samples, d_held = nearest_distances(samples_f, train_f), nearest_distances(held_f[:n], train_f)
        among_held = torch.cdist(held_f[:n].flatten(1).float(), held_f.flatten(1).float())
        own = torch.arange(n)
        among_held[own, own] = float("inf")
        if mirrored:
            among_held[own, own + n] = float("inf")
        rel_held = d_held / among_held.min(dim=1).values
        rel_samples = d_samples / nearest_distances(samples_f, held_f[rest])
        s5, s50 = torch.quantile(d_samples, q).tolist()
        h5, h50 = torch.quantile(d_held, q).tolist()
        r5, r50 = torch.quantile(rel_samples, q).tolist()
        rh5, rh50 = torch.quantile(rel_held, q).tolist()
        closer = s5 < (1 - tolerance) * h5 or s50 < (1 - tolerance) * h50
        low5, low50 = _bootstrap_low(rel_held, q)
        relatively_closer = r5 < min((1 - tolerance) * rh5, low5) or r50 < min((1 - tolerance) * rh50, low50)
        out[space] = {"samples_p5": s5, "samples_median": s50, "held_out_p5": h5, "held_out_median": h50,
                      "relative": {"samples_p5": r5, "samples_median": r50, "held_out_p5": rh5, "held_out_median": rh50,
                                   "held_out_p5_low": low5, "held_out_median_low": low50},
                      "closer_than_held_out": closer, "copied": closer and relatively_closer}
    return out
