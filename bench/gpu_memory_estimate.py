"""GPU memory a preset needs at its default batch, estimated on any machine (no GPU needed):
weights, their gradients, Adam's two moments and the EMA copy, plus the activations autograd
keeps for the backward pass of the largest phase (counted with saved_tensors_hooks, each storage
once). What a GPU adds on top (cuDNN workspaces, the allocator's rounding, the CUDA context,
~0.5 GB) is not counted; the training log's `perf/gpu_peak_MB` is the measured figure on a GPU.

    python bench/gpu_memory_estimate.py --size 64                # every preset, fp32
    python bench/gpu_memory_estimate.py --size 128 --batch-size 256 --presets gan-small-data
"""
import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def saved_bytes(fn):
    """Bytes of the distinct storages autograd saves while fn() runs (what the backward pass needs)."""
    storages = {}

    def pack(t):
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def estimate(preset, size, channels, batch_size=None):
    from gen.config import PRESETS
    from gen.families import build_family
    cfg = PRESETS[preset]
    family = build_family(cfg.model, cfg.optim, (channels, size, size), 0)
    b = batch_size or cfg.train.batch_size
    batch = {"image": torch.rand(b, channels, size, size) * 2 - 1, "label": torch.zeros(b, dtype=torch.long)}
    params = {n: sum(p.numel() * p.element_size() for p in m.parameters()) for n, m in family.modules.items()}
    state = 4 * sum(params.values()) + (params[family.ema_target] if cfg.model.ema_decay > 0 else 0)
    activations = max(saved_bytes(lambda: phase.loss(batch, 1, family.modules)) for phase in family.phases(1))
    return b, sum(params.values()), state, activations


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=None, help="default: each preset's own")
    p.add_argument("--presets", nargs="+", default=None)
    args = p.parse_args()
    from gen.config import PRESETS
    print(f"| preset | {args.size} px batch | parameters | weights, grads, Adam, EMA | activations kept | estimate |")
    print("|---|---|---|---|---|---|")
    for preset in args.presets or PRESETS:
        if preset == "seed-vae" and args.size != 28:
            continue  # the tutorial model is 28 px only
        b, n, state, act = estimate(preset, args.size, 1 if args.size == 28 else args.channels, args.batch_size)
        mb = lambda x: f"{x / 2**20:,.0f} MB"  # noqa: E731
        print(f"| {preset} | {b} | {n / 4 / 1e6:.1f} M | {mb(state)} | {mb(act)} | {mb(state + act)} |")


if __name__ == "__main__":
    main()
