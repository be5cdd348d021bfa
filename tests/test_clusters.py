"""Self-conditioning (gen/clusters.py): the clusters found on images made from known prototypes,
the labels drawn in proportion to the clusters' sizes, and a self-conditioned run whose real
batches are labeled by those clusters and whose samples draw them."""
import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from gen import clusters


def prototype_images(counts, seed=0):
    """Noisy copies of len(counts) random 1x28x28 prototypes in [-1, 1]; (images, which prototype)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(len(counts), 1, 28, 28, generator=g) * 2 - 1
    which = torch.cat([torch.full((c,), i) for i, c in enumerate(counts)])
    images = (protos[which] + 0.1 * torch.randn(len(which), 1, 28, 28, generator=g)).clamp(-1, 1)
    return images, which


@pytest.mark.parametrize("method", ["kmeans", "spectral"])
def test_clusters_recover_the_prototypes_and_their_shares(method):
    counts = [300, 200, 100, 50]
    images, which = prototype_images(counts)
    G = nn.Module()
    clusters.attach(G, len(counts), (1, 28, 28), method)
    clusters.fit(G, images, seed=0)
    found = clusters.assign(G, images)
    # one cluster per prototype: the same partition up to the clusters' names
    pairs = set(zip(found.tolist(), which.tolist()))
    assert len(pairs) == len(counts) and len({f for f, _ in pairs}) == len(counts)
    by_cluster = {f: w for f, w in pairs}
    want = torch.tensor([counts[by_cluster[c]] for c in range(len(counts))], dtype=torch.float) / sum(counts)
    assert torch.allclose(G.clusters_freq, want, atol=1e-6)
    # assign is the nearest centroid of the projection (spectral: the nearest prototype's cluster),
    # written out in numpy
    x = images.flatten(1).numpy().astype(np.float64)
    feats = (x - G.clusters_mean.numpy()) @ G.clusters_components.numpy()
    d = ((feats[:, None, :] - G.clusters_centroids.numpy()[None]) ** 2).sum(-1)
    nearest = d.argmin(1)
    assert ((G.clusters_of.numpy()[nearest] if method == "spectral" else nearest) == found.numpy()).all()


def test_spectral_clusters_hold_one_digit_more_often_than_kmeans(digits):
    """On 2,000 real digits, 20 clusters found without labels: the share of each cluster that is
    its most common digit (purity, from the labels the clustering never saw) is higher with
    spectral clustering of the neighbour graph than with k-means, and images new to the fit
    (other digits) fall in clusters as pure."""
    from gen.data import to_float
    x, y = digits
    images = to_float(torch.from_numpy(x[:3000, None]))

    def purity(found, labels):
        return sum(np.bincount(labels[found == c]).max() for c in np.unique(found)) / len(labels)
    got = {}
    for method in ("kmeans", "spectral"):
        G = nn.Module()
        clusters.attach(G, 20, (1, 28, 28), method)
        clusters.fit(G, images[:2000], seed=0)
        got[method] = [purity(clusters.assign(G, part).numpy(), labels)
                       for part, labels in ((images[:2000], y[:2000]), (images[2000:], y[2000:3000]))]
    assert got["spectral"][0] > got["kmeans"][0] + 0.05, got
    assert got["spectral"][1] > got["kmeans"][1] + 0.03, got


def test_drawn_labels_follow_the_cluster_sizes():
    freq = torch.tensor([0.5, 0.3, 0.15, 0.05])
    for n in (20, 64, 1000, 2000):
        labels = clusters.draw(freq, n)
        share = torch.bincount(labels, minlength=4).float()
        assert (share - freq * n).abs().max() <= 1.5, (n, share)  # within a label or so of n * freq
    assert len(set(clusters.draw(freq, 8).tolist())) == 4  # spread: every cluster early, not in blocks


def test_self_conditioned_run_labels_batches_by_cluster_and_samples_them(mnist_shards, tmp_path, monkeypatch):
    from gen import load_generator
    from gen.config import parse
    from gen.data import to_float
    from gen.data import load_real
    from gen.train import train
    cfg = parse(["--preset", "gan", "--data", str(mnist_shards), "--train.run_dir", str(tmp_path / "r"),
                 "--model.width", "8", "--train.steps", "2", "--log.wandb", "off", "--data.workers", "0",
                 "--model.self_condition", "6"])
    result = train(cfg)
    G = result.modules["G"]
    assert float(G.clusters_freq.sum()) > 0.999 and len(G.clusters_freq) == 6
    x, _ = load_real(str(mnist_shards), "train", limit=512, seed=0)
    labels = clusters.assign(G, to_float(x))
    assert len(set(labels.tolist())) == 6  # every cluster holds real digits
    g = load_generator(tmp_path / "r")  # the checkpoint carries the clusters
    assert torch.equal(g.module.clusters_centroids, G.clusters_centroids.cpu())
    drawn = g.default_labels(600)
    assert (torch.bincount(drawn, minlength=6).float() - 600 * g.module.clusters_freq).abs().max() <= 1.5
    # the label reaches G: the same latents with other clusters give other images
    z = g.latents(16, seed=0)
    assert not torch.equal(g.generate(z, torch.zeros(16, dtype=torch.long)), g.generate(z, torch.ones(16, dtype=torch.long)))
    # resumed, the run takes its clusters from the checkpoint and fits none (the fit is the start's work)
    fits = []
    monkeypatch.setattr(clusters, "fit", lambda *a, **k: fits.append(1))
    resumed = train(dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=4)))
    assert resumed.step == 4 and fits == []
    assert torch.equal(resumed.modules["G"].clusters_centroids, G.clusters_centroids)


def test_runs_saved_before_spectral_clusters_still_load_as_kmeans(mnist_shards, tmp_path):
    """A k-means run whose saved configs lack cluster_method (as every run made before the option
    existed) samples from its checkpoint and resumes with k-means; the default is spectral."""
    import json

    from gen import load_generator
    from gen.checkpoint import sealed
    from gen.config import parse
    from gen.train import train
    args = ["--preset", "gan", "--data", str(mnist_shards), "--train.run_dir", str(tmp_path / "r"), "--model.width", "8",
            "--train.steps", "2", "--log.wandb", "off", "--data.workers", "0", "--model.self_condition", "6"]
    assert parse(args).model.cluster_method == "spectral"
    first = train(parse(args + ["--model.cluster_method", "kmeans"]))
    for path in [tmp_path / "r/config.json", *tmp_path.glob("r/checkpoints/*/meta.json")]:
        saved = json.loads(path.read_text())
        config = saved.get("config", saved)
        del config["model"]["cluster_method"]
        path.write_text(json.dumps(sealed(saved) if "meta_sha256" in saved else saved))
    g = load_generator(tmp_path / "r")
    assert g.config.model.cluster_method == "kmeans" and not hasattr(g.module, "clusters_of")
    assert torch.equal(g.module.clusters_centroids, first.modules["G"].clusters_centroids.cpu())
    assert g.sample(8, seed=0).shape == (8, 1, 28, 28)
    resumed = train(parse(args + ["--model.cluster_method", "kmeans", "--train.steps", "3"]))
    assert resumed.step == 3
