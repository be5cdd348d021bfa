"""Self-conditioning (Liu et al. 2020, "Diverse Image Generation via Self-Conditioned GANs"): an
unconditional GAN made conditional on clusters of the training images that it finds itself, with
no labels. Before training, the images are projected on their first principal components (PCA of
the pixels) and split into K clusters; each real batch is labeled with its images' clusters, G and
D are conditioned on those labels, and samples draw clusters in proportion to their sizes. A GAN
told which mode to produce covers the modes better than one that must find them from noise alone
(mode collapse is the unconditional GAN's failure).

How the K clusters are found (--model.cluster_method):
- kmeans: k-means; an image belongs to its nearest centroid.
- spectral: spectral clustering of the images' 10-nearest-neighbour graph, which follows the
  curved shapes a class takes in pixel space where k-means cuts straight through them (4,500
  MNIST digits, 30 clusters: 87 % of each cluster is one digit, against k-means' 73-76 %). The
  clusters are kept as ~600 prototypes (k-means inside each cluster), each labeled with its
  cluster: an image, seen in training or not, belongs to its nearest prototype's cluster.

The projection, the centroids (or prototypes and their clusters) and the cluster sizes are
buffers of G, so checkpoints, exports, DDP (broadcast from rank 0) and EMA carry them with the weights.
"""
import math
import warnings

import torch

PCA_DIMS = 64
BUFFERS = ("clusters_mean", "clusters_components", "clusters_centroids", "clusters_freq")
PROTOTYPES = 600   # spectral: nearest-prototype cells drawing the clusters' outlines
NEIGHBOURS = 10    # spectral: the graph's neighbours per image (5: purer, but clusters of ~30 digits)


def count(model_cfg):
    """The clusters a model is conditioned on: --model.self_condition for an unconditional GAN, else
    0 (a conditional model has the shards' labels)."""
    return 0 if model_cfg.conditional or model_cfg.family != "gan" else model_cfg.self_condition


def attach(G, k, shape, method="kmeans"):
    """Zero buffers for k clusters of images of `shape` on G (filled by fit, or by a load)."""
    d = math.prod(shape)
    p = min(PCA_DIMS, d)
    cells = k if method == "kmeans" else PROTOTYPES + k  # (each cluster holds >= 1 prototype)
    for name, size in zip(BUFFERS, ((d,), (d, p), (cells, p), (k,))):
        G.register_buffer(name, torch.zeros(size))
    if method == "spectral":
        G.register_buffer("clusters_of", torch.zeros(cells, dtype=torch.long))  # each prototype's cluster


def fit(G, images, seed=0):
    """Fill G's buffers from float images in [-1, 1] (N, C, H, W): PCA, then k-means++ or spectral
    clustering (sklearn), as attach laid them out. Fewer distinct images than clusters (a toy data
    set): the spare clusters copy the first centroid and get no share, so they are never assigned
    nor drawn."""
    from sklearn.cluster import KMeans
    x = images.flatten(1).double()
    mean = x.mean(0)
    (d, p), k = G.clusters_components.shape, G.clusters_freq.shape[0]
    q = min(p, len(x))
    torch.manual_seed(seed)  # pca_lowrank's random projection (the caller forks the RNG)
    _, _, v = torch.pca_lowrank(x - mean, q=q, center=False, niter=4)
    v = torch.cat([v, v.new_zeros(d, p - q)], dim=1)
    feats = ((x - mean) @ v).numpy()
    found = min(k, len(torch.unique(x, dim=0)))
    spectral = hasattr(G, "clusters_of")
    if spectral and found > 1:
        centroids, cluster_of = _spectral_prototypes(feats, found, len(G.clusters_of), seed)
    else:  # (one distinct image has no neighbour graph: its one cluster is its centroid)
        centroids = torch.from_numpy(KMeans(n_clusters=found, n_init=3, random_state=seed).fit(feats).cluster_centers_)
        cluster_of = torch.arange(found) if spectral else None
    with torch.no_grad():
        G.clusters_mean.copy_(mean.float())
        G.clusters_components.copy_(v.float())
        G.clusters_centroids.copy_(_pad_with_first(centroids, len(G.clusters_centroids)).float())
        if cluster_of is not None:
            G.clusters_of.copy_(_pad_with_first(cluster_of, len(G.clusters_of)))
        # the shares of the clusters the images are assigned to in training (the prototypes'
        # cells, for spectral: they agree with the spectral labels on ~97 % of the images)
        freq = torch.bincount(assign(G, x.float()), minlength=k).double()
        G.clusters_freq.copy_((freq / freq.sum()).float())
    return freq


def _pad_with_first(rows, n):
    """rows, then copies of its first row up to n: spare cells that are never anyone's nearest alone."""
    return torch.cat([rows, rows[:1].expand(n - len(rows), *rows.shape[1:])])


def _spectral_prototypes(feats, k, cells, seed):
    """(prototypes, each one's cluster): spectral clustering of the k-nearest-neighbour graph into
    k clusters, then k-means inside each cluster, cells - k prototypes in all, shared by size."""
    import numpy as np
    from sklearn.cluster import KMeans, SpectralClustering
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "graph is not fully connected": separate groups are welcome
        labels = SpectralClustering(n_clusters=k, affinity="nearest_neighbors", n_neighbors=min(NEIGHBOURS, len(feats) - 1),
                                    random_state=seed, assign_labels="cluster_qr",
                                    # lobpcg: MNIST's clusters as arpack finds them (1 image of 4,500 apart), but
                                    # 1 s where arpack took 2 min on 10,000 images without structure (noise)
                                    eigen_solver="lobpcg").fit(feats).labels_
    prototypes, cluster_of = [], []
    for i, c in enumerate(np.unique(labels)):
        members = np.unique(feats[labels == c], axis=0)
        m = min(len(members), max(1, (cells - k) * len(members) // len(feats)))
        km = KMeans(n_clusters=m, n_init=1, random_state=seed).fit(members) if m < len(members) else None
        prototypes.append(torch.from_numpy(km.cluster_centers_ if km is not None else members))
        cluster_of += [i] * m
    return torch.cat(prototypes), torch.tensor(cluster_of, dtype=torch.long)


@torch.no_grad()
def assign(G, images):
    """Each image's cluster: the nearest centroid (or prototype's cluster) of its projection."""
    x = images.reshape(len(images), -1).float()
    feats = (x - G.clusters_mean) @ G.clusters_components
    nearest = torch.cdist(feats, G.clusters_centroids).argmin(dim=1)
    return G.clusters_of[nearest] if hasattr(G, "clusters_of") else nearest


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
