"""Self-conditioning (Liu et al. 2020, "Diverse Image Generation via Self-Conditioned GANs"): an
unconditional GAN made conditional on clusters of the training images that it finds itself, with
no labels. Before training, the images are projected on their first principal components (PCA of
the pixels) and split into K clusters (k-means); each real batch is labeled with its images'
clusters, G and D are conditioned on those labels, and samples draw clusters in proportion to
their sizes. A GAN told which mode to produce covers the modes better than one that must find
them from noise alone (mode collapse is the unconditional GAN's failure).

The projection, the centroids and the cluster sizes are buffers of G, so checkpoints, exports,
DDP (broadcast from rank 0) and EMA carry them with the weights.
"""
import math

import torch

PCA_DIMS = 64
BUFFERS = ("clusters_mean", "clusters_components", "clusters_centroids", "clusters_freq")


def count(model_cfg):
    """The clusters a model is conditioned on: --model.self_condition for an unconditional GAN, else
    0 (a conditional model has the shards' labels)."""
    return 0 if model_cfg.conditional or model_cfg.family != "gan" else model_cfg.self_condition


def attach(G, k, shape):
    """Zero buffers for k clusters of images of `shape` on G (filled by fit, or by a load)."""
    d = math.prod(shape)
    p = min(PCA_DIMS, d)
    for name, size in zip(BUFFERS, ((d,), (d, p), (k, p), (k,))):
        G.register_buffer(name, torch.zeros(size))


def fit(G, images, seed=0):
    """Fill G's buffers from float images in [-1, 1] (N, C, H, W): PCA, then k-means++ (sklearn).
    Fewer distinct images than clusters (a toy data set): the spare clusters copy the first
    centroid and get no share, so they are never assigned nor drawn."""
    from sklearn.cluster import KMeans
    x = images.flatten(1).double()
    mean = x.mean(0)
    (d, p), k = G.clusters_components.shape, G.clusters_centroids.shape[0]
    q = min(p, len(x))
    torch.manual_seed(seed)  # pca_lowrank's random projection (the caller forks the RNG)
    _, _, v = torch.pca_lowrank(x - mean, q=q, center=False, niter=4)
    v = torch.cat([v, v.new_zeros(d, p - q)], dim=1)
    feats = ((x - mean) @ v).numpy()
    found = min(k, len(torch.unique(x, dim=0)))
    km = KMeans(n_clusters=found, n_init=3, random_state=seed).fit(feats)
    centroids = torch.from_numpy(km.cluster_centers_)
    centroids = torch.cat([centroids, centroids[:1].expand(k - found, -1)])
    freq = torch.bincount(torch.from_numpy(km.labels_).long(), minlength=k).double()
    with torch.no_grad():
        G.clusters_mean.copy_(mean.float())
        G.clusters_components.copy_(v.float())
        G.clusters_centroids.copy_(centroids.float())
        G.clusters_freq.copy_((freq / freq.sum()).float())
    return freq


@torch.no_grad()
def assign(G, images):
    """Each image's cluster: the nearest centroid of its projection."""
    x = images.reshape(len(images), -1).float()
    feats = (x - G.clusters_mean) @ G.clusters_components
    return torch.cdist(feats, G.clusters_centroids).argmin(dim=1)


def sizes(G):
    """A self-conditioned G's cluster shares, or None (not self-conditioned, or not fitted yet)."""
    freq = getattr(G, "clusters_freq", None)
    return freq if freq is not None and float(freq.sum()) > 0 else None


def draw(freq, n):
    """n cluster labels in proportion to the clusters' sizes, spread evenly (a low-discrepancy
    sequence through the cumulative sizes: deterministic, every cluster in turn)."""
    u = (torch.arange(n, dtype=torch.float64) * 0.6180339887498949 + 0.5) % 1.0
    freq = freq.double().cpu()
    cumulative = torch.cumsum(freq, 0) / freq.sum()
    return torch.searchsorted(cumulative, u, right=True).clamp(max=int(freq.nonzero().max()))
