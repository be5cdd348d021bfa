"""Ex-post latent density of a VAE: a Gaussian mixture fitted on the posterior means of the
training images (Ghosh et al. 2020, "From variational to deterministic autoencoders"; the
second-stage VAE of Dai & Wipf 2019 plays the same role). Latents drawn from N(0, I) fall in
the holes of the aggregate posterior, where no training image maps, and decode to glyphs no
one drew; drawn from the mixture they land where the data lies.

    from gen import load_generator, latent_prior
    g = load_generator("runs/mnist-vae")
    g.prior = latent_prior.load_or_fit(g, "runs/mnist-vae")  # fitted once, cached in the run dir
    images = g.sample(64)                                     # from the mixture

`jobs.sample` and `jobs.evaluate` do this by default for VAEs (`--prior normal` to compare).
The fit is cached as RUN/latent_prior/step-NNNNNNN.safetensors (written atomically)."""
import logging
from pathlib import Path

import torch

log = logging.getLogger("gen.latent_prior")
COMPONENTS = 10
FIT_IMAGES = 10000


def fit(latents, components=COMPONENTS, seed=0):
    """A full-covariance Gaussian mixture (scikit-learn's EM) on (N, d) latents, as tensors."""
    from sklearn.mixture import GaussianMixture
    components = max(1, min(components, len(latents) // 10))
    gm = GaussianMixture(components, covariance_type="full", reg_covar=1e-4, max_iter=300, random_state=seed)
    gm.fit(latents.double().numpy())
    covariances = torch.from_numpy(gm.covariances_)
    return {"weights": torch.from_numpy(gm.weights_).float().contiguous(),
            "means": torch.from_numpy(gm.means_).float().contiguous(),
            "scale_tril": torch.linalg.cholesky(covariances).float().contiguous()}


def sample(prior, n, generator):
    """n latents from the mixture: a component by its weight, then mean + L @ eps."""
    component = torch.multinomial(prior["weights"], n, replacement=True, generator=generator)
    eps = torch.randn(n, prior["means"].shape[1], generator=generator)
    return prior["means"][component] + (prior["scale_tril"][component] @ eps.unsqueeze(-1)).squeeze(-1)


def cache_path(g, source):
    from .checkpoint import run_dir_of
    return run_dir_of(source) / "latent_prior" / f"step-{int(g.meta.get('step') or 0):07d}.safetensors"


def load_or_fit(g, source, data=None, n=FIT_IMAGES, components=COMPONENTS, seed=0):
    """The mixture for sampler `g` loaded from `source` (run dir, checkpoint or export): from the
    cache, else fitted on up to `n` training images of `data` (default: the run's data path)
    and cached. None for GANs, or (with a warning) when the training data is not at hand."""
    from safetensors.torch import load_file, save_file
    if not g.is_vae:
        return None
    path = cache_path(g, source)
    if path.is_file():
        return load_file(path)
    data = data or g.config.data.path
    if not (Path(data) / "manifest.json").is_file():
        log.warning("no shards at %s to fit the VAE's ex-post latent density: sampling from N(0, I)", data)
        return None
    from . import features as feats
    x, labels = feats.load_real(data, g.config.data.split, limit=n, seed=seed)
    prior = fit(g.encode(feats.to_float(x), labels), components, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(prior, tmp, metadata={"images": str(len(x)), "data": str(data), "seed": str(seed)})
    tmp.replace(path)
    return prior
