"""What is sampled: a generator's BatchNorm statistics belong to the weights that are sampled.

The reference is independent of the code under test: forward hooks record every BatchNorm
layer's input while the sampled generator runs in eval mode on a large batch of new latents,
and the per-channel mean and variance of those activations must be what the layer normalises
with. The statistics the EMA copy used to carry (copied from the live generator) fail it."""
import pytest
import torch
from safetensors.torch import load_file

from helpers import run, train_cmd


@pytest.fixture(autouse=True)
def full_batch_stats(monkeypatch):
    """The statistics as users get them (conftest lowers their batch count for speed elsewhere)."""
    monkeypatch.delenv("DEEPGEN_BN_BATCHES", raising=False)


def activation_stats(module, forward, latent_dim, num_classes, n=4096, seed=123, label_weights=None):
    """Per BatchNorm layer: (mean, var) of its inputs over (N, H, W), the module in eval mode; labels
    uniform, or drawn by `label_weights` (a self-conditioned G samples its clusters by size)."""
    from gen.batch_stats import batch_norms
    sums = {}  # per layer: [count, sum, sum of squares] per channel, in float64, batch by batch

    def record(i, x):
        x = x.detach().transpose(0, 1).flatten(1).double()  # (C, N*H*W)
        acc = sums.setdefault(i, [0, 0.0, 0.0])
        acc[0], acc[1], acc[2] = acc[0] + x.shape[1], acc[1] + x.sum(1), acc[2] + x.pow(2).sum(1)
    hooks = [m.register_forward_hook(lambda m, inp, out, i=i: record(i, inp[0]))
             for i, m in enumerate(batch_norms(module))]
    g = torch.Generator().manual_seed(seed)
    module.eval()
    with torch.no_grad():
        for _ in range(n // 1024):
            labels = (torch.multinomial(label_weights, 1024, replacement=True, generator=g) if label_weights is not None
                      else torch.randint(max(num_classes, 1), (1024,), generator=g))
            forward(module, torch.randn(1024, latent_dim, generator=g), labels)
    for h in hooks:
        h.remove()
    out = []
    for i in sorted(sums):
        count, total, squares = sums[i]
        mean = total / count
        out.append((mean, (squares / count - mean.pow(2)) * count / (count - 1)))  # the unbiased variance, as var() gave
    return out


def stats_error(module, forward, latent_dim, num_classes, label_weights=None, n=4096):
    """Largest gap between a layer's running statistics and its inputs' own, in units of the
    inputs' standard deviation (mean) and relative (variance)."""
    from gen.batch_stats import batch_norms
    worst = 0.0
    for m, (mean, var) in zip(batch_norms(module), activation_stats(module, forward, latent_dim, num_classes, n=n,
                                                                    label_weights=label_weights)):
        worst = max(worst, float(((m.running_mean.double() - mean).abs() / var.sqrt()).max()),
                    float(((m.running_var.double() - var).abs() / var).max()))
    return worst


@pytest.mark.parametrize("preset,extra", [("gan", []), ("gan", ["--model.conditional"]),
                                          ("gan", ["--model.arch", "deep"]), ("gan-small-data", [])])
def test_sampler_statistics_are_those_of_its_own_activations(preset, extra):
    """Every generator with batch statistics: statistics that belong to other weights (here:
    random ones, as a copy from the live G is) are replaced by the sampled weights' own."""
    from gen.config import parse
    from gen.families import build_family
    from gen.sample import sampler_for
    cfg = parse(["--preset", preset, "--model.width", "8", *extra])
    shape = (1, 28, 28) if preset == "gan" else (3, 32, 32)
    family = build_family(cfg.model, cfg.optim, shape, 10)
    G = family.modules["G"]
    for m in G.modules():
        if isinstance(m, torch.nn.BatchNorm2d):  # statistics that belong to other weights
            m.running_mean.normal_(0, 3)
            m.running_var.uniform_(0.1, 10)
    n = family.num_labels  # 10 classes, 20 (unfitted, so uniform) clusters of the self-conditioned preset, or none
    assert stats_error(G, family.generate, cfg.model.latent_dim, n, n=1024) > 0.5  # the check can fail (here > 100)
    g = sampler_for(family, G, cfg, {"shape": list(shape), "num_classes": n})
    assert stats_error(g.module, family.generate, cfg.model.latent_dim, n) < 0.05
    assert not g.module.training and g.module is not G
    again = sampler_for(family, G, cfg, {"shape": list(shape), "num_classes": n})  # deterministic
    assert all(torch.equal(a, b) for a, b in zip(g.module.state_dict().values(), again.module.state_dict().values()))


def test_checkpoint_and_export_hold_the_sampled_statistics(mnist_shards, tmp_path):
    """A trained run: sampling.safetensors, the export and jobs.sample all carry the EMA weights'
    own statistics; the live G's (what the EMA copy used to be sampled with) are far off."""
    import gen
    from gen.batch_stats import batch_norms
    run_dir = tmp_path / "run"
    run(train_cmd(mnist_shards, run_dir, "--train.steps", "40", "--train.ckpt_every", "40", "--log.wandb", "off"),
        check=True)
    ckpt = run_dir / "checkpoints/checkpoint-0000040"
    g = gen.load_generator(ckpt)
    latent, forward = g.latent_dim, g.family.generate
    # the preset is self-conditioned: its samples draw the image clusters by their sizes
    k, sizes = g.family.num_labels, g.module.clusters_freq.clone()
    assert stats_error(g.module, forward, latent, k, sizes) < 0.05
    saved = load_file(ckpt / "sampling.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in g.module.state_dict().items())  # nothing recomputed on load
    live = load_file(ckpt / "model.safetensors")  # the live G's running statistics
    with torch.no_grad():
        for k, v in g.module.state_dict().items():
            if "running" in k:
                v.copy_(live[k])
    assert stats_error(g.module, forward, latent, k, sizes) > 0.2
    run(["-m", "jobs.export", str(run_dir), "--out", str(tmp_path / "export")], check=True)
    exported = load_file(tmp_path / "export/generator.safetensors")
    assert all(torch.equal(saved[k], exported[k]) for k in saved)
    # a checkpoint from before the fix (the live statistics, no mark) gets them recomputed on load
    import json

    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in g.module.state_dict().items()}, ckpt / "sampling.safetensors")
    meta = json.loads((ckpt / "meta.json").read_text())
    for key in ("batch_stats", "files", "meta_sha256"):  # written before statistics and checksums were
        meta.pop(key)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    old = gen.load_generator(ckpt)
    assert len(batch_norms(old.module)) > 0 and stats_error(old.module, forward, latent, k, sizes) < 0.05
