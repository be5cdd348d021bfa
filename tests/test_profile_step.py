"""bench/profile_step.py runs on a CPU (its GPU figures need a GPU): the real loop profiled, the
bare reference step timed, and FLOPs per image equal to the layers' multiply-adds written out."""
import json

import torch

from helpers import run


def multiply_adds_x2(net, *inputs):
    """2 x multiply-adds of every Linear and (transposed) convolution, from the layer definitions."""
    total = []

    def hook(m, inp, out):
        if isinstance(m, torch.nn.Linear):
            total.append(2 * m.in_features * m.out_features * out.shape[0])
        elif isinstance(m, torch.nn.ConvTranspose2d):  # every input pixel meets every kernel weight
            k = m.kernel_size[0] * m.kernel_size[1]
            total.append(2 * m.in_channels * m.out_channels * k * inp[0].shape[0] * inp[0].shape[2] * inp[0].shape[3])
        elif isinstance(m, torch.nn.Conv2d):  # every output pixel
            k = m.kernel_size[0] * m.kernel_size[1] * m.in_channels // m.groups
            total.append(2 * k * out.shape[1] * out.shape[0] * out.shape[2] * out.shape[3])
    hooks = [m.register_forward_hook(hook) for m in net.modules()]
    with torch.no_grad():
        net(*inputs)
    for h in hooks:
        h.remove()
    return sum(total) / inputs[0].shape[0]


def test_profile_step_runs_tiny_on_a_cpu(mnist_shards, tmp_path):
    out = tmp_path / "profile.json"
    # on the suite's 240 digits, not the bench's 4,000: its self-conditioned preset clusters them
    # twice (16.8 -> 12 CPU-s)
    proc = run(["bench/profile_step.py", "--preset", "gan", "--tiny", "--data", str(mnist_shards), "--out", str(out)],
               check=True, timeout=900)
    figures = json.loads(out.read_text())
    assert "aten::" in proc.stdout and "loop/bare" in proc.stdout  # the op table and the comparison
    assert figures["loop_img_per_s"] > 0 and figures["bare_img_per_s"] > 0 and figures["aten_ops_per_step"] > 100
    from gen.config import parse
    from gen.families import build_family
    cfg = parse(["--preset", "gan", "--model.width", "8"])
    family = build_family(cfg.model, cfg.optim, (1, 28, 28), 10)
    clusters = torch.zeros(4, dtype=torch.long)  # the preset is self-conditioned: G and D take a label
    g = multiply_adds_x2(family.modules["G"], torch.randn(4, cfg.model.latent_dim), clusters)
    d = multiply_adds_x2(family.modules["D"], torch.randn(4, 1, 28, 28), clusters)
    assert abs(figures["flops_per_image"]["G_forward"] - g) / g < 1e-6
    assert abs(figures["flops_per_image"]["D_forward"] - d) / d < 1e-6
    # a whole step: G forward, D on reals and fakes, both backwards (~2x forward) and more
    assert figures["flops_per_image"]["step"] > 3 * (g + d)
