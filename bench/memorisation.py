"""The memorisation check of bench/quality.py: how near the samples sit to the training images,
beside real images the model never saw, in pixels and in features."""
import torch


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
