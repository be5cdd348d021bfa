"""Exponential moving average of a model's weights, kept as a separate copy (G_ema)."""
import copy

import torch
from torch import nn


class EMA(nn.Module):
    """`ema.module` is the averaged copy used for sampling; registered with the accelerator
    (`register_for_checkpointing`) so it is saved and restored with every checkpoint."""

    def __init__(self, model, decay):
        super().__init__()
        self.decay = decay
        self.module = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model, step):
        # warm-up (as diffusers' EMAModel): early averages must not drag the random init along
        decay = min(self.decay, (1 + step) / (10 + step))
        # one fused kernel per list rather than one per tensor (a GPU step is short)
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], 1.0 - decay)
        buffers = list(self.module.buffers())
        if buffers:
            torch._foreach_copy_(buffers, list(model.buffers()))
