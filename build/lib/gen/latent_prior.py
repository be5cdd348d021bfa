"""Ex-post latent density of a VAE: a Gaussian mixture fitted on the posterior means of the
training images (Ghosh et al. 2020, "From variational to deterministic autoencoders"; the
second-stage VAE of Dai & Wipf 2019 plays the same role). Latents drawn from N(0, I) fall in
the holes of the aggregate posterior, where no training image maps, and decode to glyphs no
one drew; drawn from the mixture they land where the data lies.

    from gen import load_generator
    g = load_generator("runs/mnist-vae")     # the mixture saved in the checkpoint
    images = g.sample(64)                     # from the mixture; load_generator(..., prior="normal"): N(0, I)

Every VAE sampler is made this way (gen.sample.sampler_for): the training loop fits the mixture
whenever it samples or saves and writes it into each checkpoint (latent_prior.safetensors), so
grids, --eval.every, jobs.sample/evaluate/export and the report all sample the same density.
Checkpoints from before that get it fitted on first use and cached as
RUN/latent_prior/step-NNNNNNN-DATA-nN-sSEED.safetensors (written atomically; DATA: the shards'
manifest's sha256, so a mixture fitted on other shards is never served for these)."""
import hashlib
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from .data import load_real, to_float
from .durable import atomic_save_tensors
from .run_dir import RunDir

log = logging.getLogger("gen.latent_prior")
# mixture sizes tried, in order; the one with the best held-out log-likelihood is kept. Too many
# components memorise the training latents (each collapses onto a few points, and samples
# decode to near-copies): held-out likelihood falls first, so it picks the size (MNIST, 4,500
# digits: 10 components for a 64-d latent, 20-30 for a 16-d one)
COMPONENT_CHOICES = (1, 2, 5, 10, 20, 30, 50, 100)
FIT_IMAGES = 10000


def _gaussian_mixture(latents, components, seed):
    from sklearn.mixture import GaussianMixture
    gm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, max_iter=300, random_state=seed)
    return gm.fit(latents)


def choose_components(latents, choices=COMPONENT_CHOICES, held_out=0.2, seed=0):
    """The mixture size in `choices` whose fit on 80 % of the latents gives the other 20 % the
    highest mean log-likelihood (stops once two larger sizes in a row did worse)."""
    import numpy as np
    x = latents.double().numpy()
    order = np.random.default_rng(seed).permutation(len(x))
    cut = int(len(x) * (1 - held_out))
    fit_x, test_x = x[order[:cut]], x[order[cut:]]
    best, best_ll, worse = 1, -float("inf"), 0
    for k in choices:
        if k > len(fit_x) // 10:  # at least ten latents per component
            break
        ll = _gaussian_mixture(fit_x, k, seed).score(test_x)
        log.debug("latent mixture: %d components, held-out log-likelihood %.2f", k, ll)
        if ll > best_ll:
            best, best_ll, worse = k, ll, 0
        else:
            worse += 1
            if worse == 2:
                break
    return best


def fit(latents, components=None, seed=0):
    """A full-covariance Gaussian mixture (scikit-learn's EM) on (N, d) latents, as tensors;
    `components` None: chosen by held-out likelihood (choose_components)."""
    components = max(1, min(components or choose_components(latents, seed=seed), len(latents) // 10))
    gm = _gaussian_mixture(latents.double().numpy(), components, seed)
    covariances = torch.from_numpy(gm.covariances_)
    return {"weights": torch.from_numpy(gm.weights_).float().contiguous(),
            "means": torch.from_numpy(gm.means_).float().contiguous(),
            "scale_tril": torch.linalg.cholesky(covariances).float().contiguous()}


def sample(prior, n, generator):
    """n latents from the mixture: a component by its weight, then mean + L @ eps."""
    component = torch.multinomial(prior["weights"], n, replacement=True, generator=generator)
    eps = torch.randn(n, prior["means"].shape[1], generator=generator)
    return prior["means"][component] + (prior["scale_tril"][component] @ eps.unsqueeze(-1)).squeeze(-1)


def fit_on(g, images, labels, components=None, seed=0):
    """The mixture for VAE sampler `g`, fitted on the posterior means of uint8 `images`."""
    return fit(g.encode(to_float(images), labels), components, seed)


def cache_path(g, source, data, n, seed):
    """Where the mixture of checkpoint step, data, n and seed is cached: the data by its
    manifest's sha256 (which holds every shard's), so other shards never get this one."""
    key = hashlib.sha256((Path(data) / "manifest.json").read_bytes()).hexdigest()[:12]
    return RunDir.of(source).latent_prior(int(g.meta.get("step") or 0), f"{key}-n{n}-s{seed}")


def load_or_fit(g, source, data=None, n=FIT_IMAGES, components=None, seed=0):
    """The mixture for sampler `g` loaded from `source` (run dir, checkpoint or export): from the
    cache, else fitted on up to `n` training images of `data` (default: the run's data path)
    and cached. None for GANs, or (with a warning) when the training data is not at hand."""
    if not g.is_vae:
        return None
    data = data or g.config.data.path
    if not (Path(data) / "manifest.json").is_file():
        log.warning("no shards at %s to fit the VAE's ex-post latent density: sampling from N(0, I)", data)
        return None
    path = cache_path(g, source, data, n, seed)
    if path.is_file():
        return load_file(path)
    x, labels = load_real(data, g.config.data.split, limit=n, seed=seed)
    prior = fit_on(g, x, labels, components, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_tensors(path, prior, metadata={"images": str(len(x)), "data": str(data), "seed": str(seed)})
    return prior
